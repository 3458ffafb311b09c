"""iommufd: /dev/iommu contexts, the object table, IOAS, HWPT, devices.

Mirrors drivers/iommu/iommufd/: ``main.py`` (context, object table, ioctl
dispatch), ``device.py``, ``ioas.py``, ``io_pagetable.py``,
``hw_pagetable.py``, ``vfio_compat.py``. DMA ownership of iommu groups is
``fakedev.kernel.iommu`` (``IommuGroup``, ``build_iommu_groups``).

What VFIO calls (the model's include/linux/iommufd.h). Every name below is
re-exported from this package; failures raise ``KernelError``:

- ``iommufd_fops_open(version, *, vfio_container=False) -> IommufdFile``:
  the File for an open of /dev/iommu (kind IOMMUFD, label "iommu");
  ``vfio_container=True`` when iommufd serves /dev/vfio/vfio (mm accounting).
  ``IommufdFile.ctx`` is its ``IommufdCtx``; ``IommufdFile.release()`` drops
  the file's reference.
- ``IommufdCtx``: ``get()``/``put()``; the context lives until the last
  reference goes (its file's release, every bound device's reference, and
  whatever a caller took with ``get``/``iommufd_ctx_from_file``); then every
  object is destroyed leaf-first (HWPTs before IOASes). ``ctx.version``,
  ``ctx.objects`` (id -> object), ``ctx.vfio_ioas``, ``ctx.describe()``.
- ``iommufd_ctx_from_file(f) -> IommufdCtx``: KernelError(EBADFD) unless ``f``
  is a live ``IommufdFile``; takes a reference (the caller ``put()``s it).
- ``iommufd_device_bind(ictx, pdev, group) -> IommufdDevice``: ``group`` is the
  ``IommuGroup`` of ``pdev`` or None (ENODEV). Claims DMA ownership with
  ``ictx`` as cookie (EPERM when owned by another cookie or a host driver on a
  member; EBUSY with a foreign domain attached), allocates the device object
  and takes a context reference. ``idev.obj_id`` is the devid; also
  ``idev.ictx``, ``idev.dev`` (the PciDev), ``idev.group``, ``idev.hwpt``,
  ``idev.attached_hwpt_id`` (None when not attached).
- ``iommufd_device_unbind(idev)``: detaches if attached, frees the devid,
  releases ownership, drops the context reference.
- ``iommufd_device_attach(idev, pt_id) -> int`` (the HWPT id; an IOAS id gives
  an auto HWPT, existing or new). ENOENT unknown id; EINVAL not an IOAS/HWPT,
  group on another HWPT, or already attached; EADDRINUSE MSI-window clash.
- ``iommufd_device_replace(idev, pt_id) -> int``: for an attached device (a
  second ATTACH); same HWPT is a no-op; an auto HWPT left empty is destroyed.
- ``iommufd_device_detach(idev)``: no-op when not attached; an auto HWPT left
  without devices is destroyed (its ID freed).
- ``iommufd_ctx_has_group(ictx, group) -> bool``: a device of ``group`` is
  bound to ``ictx`` (for hot-reset ownership checks).
- ``iommufd_vfio_compat_ioas_create(ictx)``, ``iommufd_vfio_compat_ioas_get_id
  (ictx) -> int`` (ENODEV without one), ``iommufd_vfio_compat_set_no_iommu
  (ictx)`` (EINVAL once a compat IOAS exists): for the group path.
- ``iommufd_translate(ictx, ioas_id, iova, length) -> list[DmaPiece]``: the
  backing (pid + user address, or file + offset) of an IOVA range, for DMA
  emulation; ENOENT if any byte is unmapped.
- ``iommufd_device_dma_translate(idev, iova, length) -> list[DmaPiece]``: the
  same through the device's attached HWPT (ENOENT when not attached: DMA is
  blocked). ``DmaPiece.prot`` has IOMMU_READ (1) / IOMMU_WRITE (2).
- ``iommufd_check_invariants(ctx) -> list[str]``: [] when consistent.
"""

from fakedev.kernel.iommufd.device import (
    IommufdDevice,
    iommufd_ctx_has_group,
    iommufd_device_attach,
    iommufd_device_bind,
    iommufd_device_detach,
    iommufd_device_dma_translate,
    iommufd_device_replace,
    iommufd_device_unbind,
)
from fakedev.kernel.iommufd.hw_pagetable import HwPagetable
from fakedev.kernel.iommufd.io_pagetable import DmaPiece
from fakedev.kernel.iommufd.ioas import Ioas, iommufd_translate
from fakedev.kernel.iommufd.main import (
    IommufdCtx,
    IommufdFile,
    iommufd_check_invariants,
    iommufd_ctx_from_file,
    iommufd_fops_open,
)
from fakedev.kernel.iommufd.vfio_compat import (
    iommufd_vfio_compat_ioas_create,
    iommufd_vfio_compat_ioas_get_id,
    iommufd_vfio_compat_set_no_iommu,
)

__all__ = [
    "DmaPiece",
    "HwPagetable",
    "Ioas",
    "IommufdCtx",
    "IommufdDevice",
    "IommufdFile",
    "iommufd_check_invariants",
    "iommufd_ctx_from_file",
    "iommufd_ctx_has_group",
    "iommufd_device_attach",
    "iommufd_device_bind",
    "iommufd_device_detach",
    "iommufd_device_dma_translate",
    "iommufd_device_replace",
    "iommufd_device_unbind",
    "iommufd_fops_open",
    "iommufd_translate",
    "iommufd_vfio_compat_ioas_create",
    "iommufd_vfio_compat_ioas_get_id",
    "iommufd_vfio_compat_set_no_iommu",
]
