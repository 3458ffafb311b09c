"""The VFIO side of iommufd: bind, attach, device ids.

Mirrors drivers/vfio/iommufd.c: ``vfio_df_iommufd_bind``/``unbind``,
``vfio_iommufd_physical_bind``/``unbind``/``attach_ioas``/``detach_ioas``,
``vfio_iommufd_compat_attach_ioas``, ``vfio_iommufd_get_dev_id``,
``vfio_iommufd_device_ictx``. Everything iommufd itself does is called through
the API of ``fakedev.kernel.iommufd`` (device.py, main.py, vfio_compat).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from fakedev.kernel.errors import KernelError

if TYPE_CHECKING:
    from .vfio_main import VfioDevice, VfioDeviceFile


def ctx_from_file(f: object) -> Any:
    """iommufd_ctx_from_file() for a file that may not be an iommufd: None then."""
    from fakedev.kernel.iommufd.main import IommufdFile, iommufd_ctx_from_file

    if not isinstance(f, IommufdFile):
        return None
    return iommufd_ctx_from_file(f)


def compat_ioas_create(ictx: Any) -> None:
    """iommufd_vfio_compat_ioas_create() (SET_CONTAINER with an iommufd)."""
    from fakedev.kernel.iommufd.vfio_compat import iommufd_vfio_compat_ioas_create

    iommufd_vfio_compat_ioas_create(ictx)


def compat_set_no_iommu(ictx: Any) -> None:
    """iommufd_vfio_compat_set_no_iommu() (SET_CONTAINER of a noiommu group with an iommufd)."""
    from fakedev.kernel.iommufd.vfio_compat import iommufd_vfio_compat_set_no_iommu

    iommufd_vfio_compat_set_no_iommu(ictx)


def vfio_iommufd_device_has_compat_ioas(vdev: VfioDevice, ictx: Any) -> bool:
    """Models vfio_iommufd_device_has_compat_ioas(): the context has a compat IOAS."""
    return ictx.vfio_ioas is not None


def vfio_iommufd_device_ictx(vdev: VfioDevice) -> Any:
    """Models vfio_iommufd_device_ictx(): the context the device is bound to, or None."""
    if vdev.iommufd_device is not None:
        return vdev.iommufd_ictx
    return None


def vfio_iommufd_device_id(vdev: VfioDevice) -> int:
    """Models vfio_iommufd_device_id(): devid, or -EINVAL if not bound."""
    if vdev.iommufd_device is not None:
        return int(vdev.iommufd_device.obj_id)
    return -errno.EINVAL


def vfio_iommufd_get_dev_id(vdev: VfioDevice, ictx: Any) -> int:
    """Models vfio_iommufd_get_dev_id() (6.6+).

    Bound to ``ictx``: its devid (> 0). Else ``-ENODEV`` without an iommu group,
    ``-ENOENT`` ("owned, no ID") if ``ictx`` has a device of the same iommu
    group bound, else ``-ENODEV``.
    """
    from fakedev.kernel.iommufd.device import iommufd_ctx_has_group

    if ictx is not None and vfio_iommufd_device_ictx(vdev) is ictx:
        return vfio_iommufd_device_id(vdev)
    group = vdev.iommu_group
    if group is None:
        return -errno.ENODEV
    if iommufd_ctx_has_group(ictx, group):
        return -errno.ENOENT
    return -errno.ENODEV


def vfio_df_iommufd_bind(df: VfioDeviceFile) -> int:
    """Models vfio_df_iommufd_bind() -> vfio_iommufd_physical_bind(); returns the devid."""
    from fakedev.kernel.iommufd.device import iommufd_device_bind

    vdev = df.device
    if vdev.group.noiommu:
        return 0  # a noiommu device is opened without an iommufd device
    idev = iommufd_device_bind(df.iommufd, vdev.pdev, vdev.iommu_group)
    vdev.iommufd_device = idev
    vdev.iommufd_ictx = df.iommufd
    return int(idev.obj_id)


def vfio_df_iommufd_unbind(df: VfioDeviceFile) -> None:
    """Models vfio_df_iommufd_unbind() -> vfio_iommufd_physical_unbind()."""
    from fakedev.kernel.iommufd.device import iommufd_device_detach, iommufd_device_unbind

    vdev = df.device
    if vdev.iommufd_device is None:
        return
    if vdev.iommufd_attached:
        iommufd_device_detach(vdev.iommufd_device)
        vdev.iommufd_attached = False
        vdev.pt_id = None
    iommufd_device_unbind(vdev.iommufd_device)
    vdev.iommufd_device = None
    vdev.iommufd_ictx = None


def vfio_iommufd_physical_attach_ioas(vdev: VfioDevice, pt_id: int) -> int:
    """Models vfio_iommufd_physical_attach_ioas(): attach, or replace when attached."""
    from fakedev.kernel.iommufd.device import iommufd_device_attach, iommufd_device_replace

    if vdev.iommufd_device is None:
        raise KernelError(errno.EINVAL)
    if vdev.iommufd_attached:
        out = iommufd_device_replace(vdev.iommufd_device, pt_id)
    else:
        out = iommufd_device_attach(vdev.iommufd_device, pt_id)
    vdev.iommufd_attached = True
    vdev.pt_id = int(out)
    return int(out)


def vfio_iommufd_physical_detach_ioas(vdev: VfioDevice) -> None:
    """Models vfio_iommufd_physical_detach_ioas(): a no-op when not attached."""
    from fakedev.kernel.iommufd.device import iommufd_device_detach

    if vdev.iommufd_device is None:
        raise KernelError(errno.EINVAL)
    if not vdev.iommufd_attached:
        return
    iommufd_device_detach(vdev.iommufd_device)
    vdev.iommufd_attached = False
    vdev.pt_id = None


def vfio_iommufd_compat_attach_ioas(vdev: VfioDevice, ictx: Any) -> None:
    """Models vfio_iommufd_compat_attach_ioas(): attach to the compat IOAS (group path)."""
    from fakedev.kernel.iommufd.vfio_compat import iommufd_vfio_compat_ioas_get_id

    ioas_id = iommufd_vfio_compat_ioas_get_id(ictx)
    vfio_iommufd_physical_attach_ioas(vdev, ioas_id)
