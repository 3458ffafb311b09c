"""Hardware page tables (drivers/iommu/iommufd/hw_pagetable.c).

Lives here: ``HwPagetable`` (an iommu_domain built on an IOAS: auto, made by
attaching a device to an IOAS, or manual, made by IOMMU_HWPT_ALLOC) and the
IOMMU_HWPT_ALLOC handler. Attaching devices is in ``device.py``.

The modelled IOMMU is Intel VT-d-like: 4 KiB smallest page, a 48-bit
aperture ([0, 2**48 - 1] usable; the rest is reserved in the IOAS while the
domain is on it), cache coherency enforced, no dirty tracking, no nesting.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from fakedev.kernel.errors import KernelError
from fakedev.kernel.iommufd.ioas import Ioas
from fakedev.kernel.iommufd.main import IommufdCtx, IommufdObject, ObjType, Ucmd
from fakedev.uapi import consts as C

if TYPE_CHECKING:
    from fakedev.kernel.iommufd.device import IommufdDevice

APERTURE = (0, (1 << 48) - 1)
DOMAIN_PGSIZE = 4096


class HwPagetable(IommufdObject):
    """struct iommufd_hw_pagetable (a paging HWPT)."""

    type = ObjType.HWPT_PAGING

    def __init__(self, ictx: IommufdCtx, ioas: Ioas, auto_domain: bool) -> None:
        super().__init__(ictx)
        self.ioas = ioas
        self.auto_domain = auto_domain
        self.devices: list[IommufdDevice] = []  # attached (each holds a user)
        self.nest_parent = False

    def __repr__(self) -> str:
        kind = "auto" if self.auto_domain else "manual"
        return f"<HwPagetable {self.obj_id} {kind} ioas={self.ioas.obj_id}>"

    def destroy(self) -> None:
        """Models iommufd_hwpt_paging_destroy(): the domain leaves its IOAS."""
        if self in self.ioas.hwpts:
            self.ioas.hwpts.remove(self)
            self.ioas.iopt.remove_domain(self)
            self.ioas.users -= 1


def iommufd_hw_pagetable_alloc(ictx: IommufdCtx, ioas: Ioas, auto_domain: bool) -> HwPagetable:
    """Models iommufd_hw_pagetable_alloc(): new ID, domain added to the IOAS.

    Fails (nothing changed) when the IOAS cannot take the domain's aperture or
    alignment (EADDRINUSE).
    """
    hwpt = HwPagetable(ictx, ioas, auto_domain)
    ictx.obj_alloc(hwpt)
    try:
        ioas.iopt.add_domain(hwpt, APERTURE, DOMAIN_PGSIZE)
    except KernelError:
        ictx.obj_abort(hwpt)
        raise
    ioas.hwpts.append(hwpt)
    ioas.users += 1
    return hwpt


def _hwpt_alloc_checks_6_7(ucmd: Ucmd) -> Ioas:
    """The 6.7+ checks: pt_id may name an IOAS or a (nesting parent) HWPT.

    An unknown or wrong-kind ``pt_id`` is EINVAL here (ENOENT in 6.6). The
    modelled IOMMU has no driver data for paging domains, no dirty tracking
    and no nested domains (EOPNOTSUPP).
    """
    cmd, ictx = ucmd.cmd, ucmd.ictx
    if (cmd["data_type"] == C.IOMMU_HWPT_DATA_NONE) != (cmd["data_len"] == 0):
        raise KernelError(errno.EINVAL, "data_type and data_len disagree")
    if cmd["flags"] & C.IOMMU_HWPT_ALLOC_NEST_PARENT and cmd["data_type"] != C.IOMMU_HWPT_DATA_NONE:
        raise KernelError(errno.EINVAL, "a nesting parent takes no driver data")
    ictx.get_device(cmd["dev_id"])
    pt = ictx.objects.get(cmd["pt_id"])
    if isinstance(pt, Ioas):
        if cmd["data_len"]:
            raise KernelError(errno.EOPNOTSUPP, "driver data for a paging domain")
        if cmd["flags"] & C.IOMMU_HWPT_ALLOC_DIRTY_TRACKING:
            raise KernelError(errno.EOPNOTSUPP, "IOMMU has no dirty tracking")
        return pt
    if isinstance(pt, HwPagetable):
        if cmd["data_type"] == C.IOMMU_HWPT_DATA_NONE or pt.auto_domain or not pt.nest_parent:
            raise KernelError(errno.EINVAL, "not a valid nested HWPT request")
        raise KernelError(errno.EOPNOTSUPP, "nested HWPTs are not supported by this IOMMU")
    raise KernelError(errno.EINVAL, f"pt_id {cmd['pt_id']} is neither an IOAS nor a HWPT")


def iommufd_hwpt_alloc(ucmd: Ucmd) -> int:
    """Models iommufd_hwpt_alloc(): a manual HWPT (6.6 shape; 6.7+ flags and data)."""
    cmd, ictx = ucmd.cmd, ucmd.ictx
    new = ictx.version.has_dirty_tracking
    allowed = (C.IOMMU_HWPT_ALLOC_NEST_PARENT | C.IOMMU_HWPT_ALLOC_DIRTY_TRACKING) if new else 0
    if cmd["flags"] & ~allowed or cmd["__reserved"]:
        raise KernelError(errno.EOPNOTSUPP, "unsupported flags or __reserved set")
    if new:
        ioas = _hwpt_alloc_checks_6_7(ucmd)
    else:
        ictx.get_device(cmd["dev_id"])
        ioas = ictx.get_ioas(cmd["pt_id"])
    hwpt = iommufd_hw_pagetable_alloc(ictx, ioas, auto_domain=False)
    hwpt.nest_parent = bool(cmd["flags"] & C.IOMMU_HWPT_ALLOC_NEST_PARENT)
    cmd["out_hwpt_id"] = hwpt.obj_id
    try:
        ucmd.respond()
    except KernelError:
        hwpt.users = 0
        ictx.obj_remove(hwpt)
        raise
    return 0
