"""Device objects: bind, attach, replace, detach (drivers/iommu/iommufd/device.c).

Lives here: ``IommufdDevice`` (the object whose ID is VFIO's devid), the
per-context iommu-group record ``IommufdGroup`` (which HWPT the group is
attached to and which bound devices of it are attached), the calls VFIO makes
(``iommufd_device_bind`` ... ``iommufd_ctx_has_group``) and the
IOMMU_GET_HW_INFO handler. DMA ownership itself is ``fakedev.kernel.iommu``.

Attaching a device reserves the x86 MSI window (0xfee00000-0xfeefffff) in
its IOAS for as long as it stays attached (the device's reserved region).
"""

from __future__ import annotations

import errno

from fakedev.kernel.errors import KernelError
from fakedev.kernel.iommu import (
    BLOCKING_DOMAIN,
    IommuGroup,
    iommu_device_claim_dma_owner,
    iommu_device_release_dma_owner,
)
from fakedev.kernel.iommufd.hw_pagetable import HwPagetable, iommufd_hw_pagetable_alloc
from fakedev.kernel.iommufd.io_pagetable import DmaPiece
from fakedev.kernel.iommufd.ioas import Ioas
from fakedev.kernel.iommufd.main import IommufdCtx, IommufdObject, ObjType, Ucmd
from fakedev.kernel.pci import PciDev
from fakedev.uapi import consts as C
from fakedev.uapi import structs as S

MSI_WINDOW = (0xFEE00000, 0xFEEFFFFF)

#: what the modelled VT-d unit reports in IOMMU_GET_HW_INFO
VTD_CAP_REG = 0x00D2008C40660462
VTD_ECAP_REG = 0x0000000000F050DA


class IommufdGroup:
    """struct iommufd_group: one per iommu group with devices bound to this context."""

    def __init__(self, group: IommuGroup) -> None:
        self.group = group
        self.hwpt: HwPagetable | None = None
        self.devices: list[IommufdDevice] = []  # attached, in attach order
        self.bound = 0  # bound devices of the group (the igroup's refcount)


class IommufdDevice(IommufdObject):
    """struct iommufd_device: ``obj_id`` is the devid VFIO reports."""

    type = ObjType.DEVICE

    def __init__(self, ictx: IommufdCtx, dev: PciDev, group: IommuGroup) -> None:
        super().__init__(ictx)
        self.dev = dev
        self.group = group
        self.hwpt: HwPagetable | None = None

    def __repr__(self) -> str:
        return f"<IommufdDevice {self.obj_id} {self.dev.name}>"

    @property
    def attached_hwpt_id(self) -> int | None:
        return self.hwpt.obj_id if self.hwpt is not None else None

    @property
    def igroup(self) -> IommufdGroup:
        return self.ictx.igroups[self.group.id]

    def destroy(self) -> None:
        """Models iommufd_device_destroy(): ownership released, context put."""
        iommu_device_release_dma_owner(self.group)
        ig = self.ictx.igroups[self.group.id]
        ig.bound -= 1
        if ig.bound == 0:
            del self.ictx.igroups[self.group.id]
        self.ictx.put()


def iommufd_device_bind(ictx: IommufdCtx, dev: PciDev, group: IommuGroup | None) -> IommufdDevice:
    """Models iommufd_device_bind().

    ENODEV without an iommu group; EPERM when the group is owned by another
    cookie (another context, a VFIO container, a host driver on a member);
    EBUSY when a foreign domain is attached. Takes a context reference that
    ``iommufd_device_unbind`` drops.
    """
    if group is None:
        raise KernelError(errno.ENODEV, f"{dev.name} has no iommu group")
    if ictx.dead:
        raise KernelError(errno.EBADFD, "iommufd context released")
    iommu_device_claim_dma_owner(group, ictx)
    idev = IommufdDevice(ictx, dev, group)
    try:
        ictx.obj_alloc(idev)
    except KernelError:
        iommu_device_release_dma_owner(group)
        raise
    ictx.get()
    idev.users += 1  # the caller's, until unbind
    ig = ictx.igroups.get(group.id)
    if ig is None:
        ig = ictx.igroups[group.id] = IommufdGroup(group)
    ig.bound += 1
    return idev


def iommufd_device_unbind(idev: IommufdDevice) -> None:
    """Models iommufd_device_unbind(): detaches if still attached, frees the devid."""
    if idev.hwpt is not None:
        iommufd_device_detach(idev)
    ictx = idev.ictx
    if ictx.objects.get(idev.obj_id) is not idev:
        raise AssertionError(f"{idev!r} unbound twice")
    idev.users -= 1
    ictx.obj_remove(idev)


def _reserve_msi(ioas: Ioas, owner: object) -> None:
    """Models iopt_table_enforce_dev_resv_regions() for an x86 PCI function."""
    ioas.iopt.reserve(MSI_WINDOW[0], MSI_WINDOW[1], owner)


def _do_attach(idev: IommufdDevice, hwpt: HwPagetable) -> None:
    """Models iommufd_device_do_attach(). EINVAL if the group sits on another HWPT."""
    ig = idev.igroup
    if ig.hwpt is not None and ig.hwpt is not hwpt:
        raise KernelError(errno.EINVAL, f"iommu group {idev.group.id} is attached to hwpt {ig.hwpt.obj_id}")
    _reserve_msi(hwpt.ioas, idev)
    if not ig.devices:
        ig.hwpt = hwpt
        idev.group.domain = hwpt
    ig.devices.append(idev)
    hwpt.devices.append(idev)
    hwpt.users += 1
    idev.users += 1
    idev.hwpt = hwpt


def _do_replace(idev: IommufdDevice, hwpt: HwPagetable) -> HwPagetable | None:
    """Models iommufd_device_do_replace(): the whole group moves. Returns the old HWPT."""
    ig = idev.igroup
    old = ig.hwpt
    if old is None or idev.hwpt is None:
        raise KernelError(errno.EINVAL, "device is not attached")
    if hwpt is old:
        return None
    if hwpt.ioas is not old.ioas:
        hwpt.ioas.iopt.check_reserve(MSI_WINDOW[0], MSI_WINDOW[1])
        for cur in ig.devices:
            _reserve_msi(hwpt.ioas, cur)
            old.ioas.iopt.remove_reserved(cur)
    for cur in ig.devices:
        old.devices.remove(cur)
        hwpt.devices.append(cur)
        cur.hwpt = hwpt
    n = len(ig.devices)
    hwpt.users += n
    old.users -= n
    ig.hwpt = hwpt
    idev.group.domain = hwpt
    return old


def _put_hwpt(hwpt: HwPagetable | None) -> None:
    """Models iommufd_hw_pagetable_put(): an auto HWPT dies with its last device."""
    if hwpt is not None and hwpt.auto_domain and not hwpt.devices and hwpt.obj_id:
        hwpt.users -= 1
        hwpt.ictx.obj_remove(hwpt)


def _abort_hwpt(hwpt: HwPagetable) -> None:
    hwpt.destroy()
    hwpt.ictx.obj_abort(hwpt)


def _change_pt(idev: IommufdDevice, pt_id: int, replace: bool) -> int:
    """Models iommufd_device_change_pt() + iommufd_device_auto_get_domain()."""
    ictx = idev.ictx
    pt = ictx.get_object(pt_id)

    def run(hwpt: HwPagetable) -> None:
        if replace:
            _put_hwpt(_do_replace(idev, hwpt))
        else:
            _do_attach(idev, hwpt)

    if isinstance(pt, HwPagetable):
        run(pt)
        return pt.obj_id
    if not isinstance(pt, Ioas):
        raise KernelError(errno.EINVAL, f"object {pt_id} is neither an IOAS nor a HWPT")
    for hwpt in list(pt.hwpts):
        if not hwpt.auto_domain:
            continue
        try:
            run(hwpt)
        except KernelError as e:
            if e.errno == errno.EINVAL:
                continue
            raise
        return hwpt.obj_id
    if not pt.iopt.domains:
        # The kernel attaches the new domain (device reserved regions:
        # EADDRINUSE) before iopt_table_add_domain() fills it (pinning: EFAULT).
        pt.iopt.check_reserve(MSI_WINDOW[0], MSI_WINDOW[1])
    hwpt = iommufd_hw_pagetable_alloc(ictx, pt, auto_domain=True)
    try:
        run(hwpt)
    except KernelError:
        _abort_hwpt(hwpt)
        raise
    return hwpt.obj_id


def iommufd_device_attach(idev: IommufdDevice, pt_id: int) -> int:
    """Models iommufd_device_attach(): returns the HWPT id (auto one for an IOAS).

    ENOENT unknown ``pt_id``; EINVAL not an IOAS/HWPT, or the device's group is
    attached to a different HWPT, or the device is already attached (VFIO
    calls ``iommufd_device_replace`` then); EADDRINUSE when the MSI window
    collides with a mapping or allowed range of the IOAS.
    """
    if idev.hwpt is not None:
        raise KernelError(errno.EINVAL, "already attached: use replace")
    return _change_pt(idev, pt_id, replace=False)


def iommufd_device_replace(idev: IommufdDevice, pt_id: int) -> int:
    """Models iommufd_device_replace(): move the (attached) device's group; same HWPT = no-op."""
    return _change_pt(idev, pt_id, replace=True)


def iommufd_device_detach(idev: IommufdDevice) -> None:
    """Models iommufd_device_detach(): back to blocked DMA; a no-op if not attached."""
    hwpt = idev.hwpt
    if hwpt is None:
        return
    ig = idev.igroup
    ig.devices.remove(idev)
    hwpt.devices.remove(idev)
    hwpt.users -= 1
    idev.users -= 1
    idev.hwpt = None
    hwpt.ioas.iopt.remove_reserved(idev)
    if not ig.devices:
        ig.hwpt = None
        idev.group.domain = BLOCKING_DOMAIN
    _put_hwpt(hwpt)


def iommufd_ctx_has_group(ictx: IommufdCtx | None, group: IommuGroup | None) -> bool:
    """Models iommufd_ctx_has_group(): a device of ``group`` is bound to ``ictx``."""
    if ictx is None or group is None:
        return False
    return any(isinstance(o, IommufdDevice) and o.group is group for o in ictx.objects.values())


def iommufd_device_dma_translate(idev: IommufdDevice, iova: int, length: int) -> list[DmaPiece]:
    """What a DMA by ``idev`` at [iova, iova+length) reaches, through its HWPT's IOAS.

    ENOENT when the device is not attached (DMA blocked) or a byte is unmapped;
    callers check ``DmaPiece.prot`` for the direction.
    """
    if idev.hwpt is None:
        raise KernelError(errno.ENOENT, "device DMA is blocked (not attached)")
    return idev.hwpt.ioas.iopt.translate(iova, length)


def iommufd_get_hw_info(ucmd: Ucmd) -> int:
    """Models iommufd_get_hw_info(): an Intel VT-d report."""
    cmd, task = ucmd.cmd, ucmd.task
    if cmd["flags"] or cmd["__reserved"]:
        raise KernelError(errno.EOPNOTSUPP, "flags or __reserved set")
    ucmd.ictx.get_device(cmd["dev_id"])
    data = S.IOMMU_HW_INFO_VTD.pack(cap_reg=VTD_CAP_REG, ecap_reg=VTD_ECAP_REG)
    want = cmd["data_len"]
    copy_len = min(want, len(data))
    if copy_len:
        task.write(cmd["data_uptr"], data[:copy_len])
    off = copy_len
    while off < want:
        n = min(want - off, 1 << 16)
        task.write(cmd["data_uptr"] + off, bytes(n))
        off += n
    cmd["data_len"] = len(data)
    cmd["out_data_type"] = C.IOMMU_HW_INFO_TYPE_INTEL_VTD
    cmd["out_capabilities"] = 0  # no IOMMU_HW_CAP_DIRTY_TRACKING (6.7+ field)
    ucmd.respond()
    return 0
