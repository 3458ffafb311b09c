"""IOMMU groups and DMA ownership (drivers/iommu/iommu.c).

Lives here: ``IommuGroup`` (members, owner count, owner cookie, the domain the
group is attached to), the DMA-ownership calls VFIO and iommufd make, and
``build_iommu_groups`` for a ``PciTopology``. Not here: anything about VFIO
groups or iommufd objects (they only pass their cookie in).

A member bound to a host kernel driver that does not manage DMA itself counts
as one owner with a NULL cookie (``iommu_device_use_default_domain`` at probe),
so every user claim on such a group fails with EPERM. ``PciDev.driver`` is read
at the time of the call, so rebinding a driver in the topology is seen at once.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable

from fakedev.kernel.errors import KernelError
from fakedev.kernel.pci import PciDev, PciTopology

#: Drivers that set ``driver_managed_dma``: binding them claims no ownership.
DRIVER_MANAGED_DMA: frozenset[str] = frozenset({"vfio-pci", "pci-stub", "pcieport"})


class _Domain:
    """A kernel-owned iommu_domain that is not an iommufd HWPT."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<domain {self.name}>"


DEFAULT_DOMAIN = _Domain("default")  # the DMA-API domain a group boots with
BLOCKING_DOMAIN = _Domain("blocking")  # what a user owner gets until it attaches


class IommuGroup:
    """struct iommu_group: id, member functions, DMA owner, current domain."""

    def __init__(self, group_id: int, devices: Iterable[PciDev] = (), name: str | None = None) -> None:
        self.id = group_id
        #: iommu_group_set_name(): only VFIO's noiommu groups are named ("vfio-noiommu")
        self.name = name
        self.devices: list[PciDev] = list(devices)
        #: claims by user owners (VFIO container, iommufd); kernel drivers are
        #: counted from ``devices`` on demand (see ``kernel_owner_cnt``)
        self.user_owner_cnt = 0
        self.owner: object | None = None  # the cookie of the user owner
        #: the group's attached domain: DEFAULT_DOMAIN, BLOCKING_DOMAIN, an
        #: iommufd HWPT, or any object a user owner attached
        self.domain: object = DEFAULT_DOMAIN

    def __repr__(self) -> str:
        return f"<IommuGroup {self.id} owner_cnt={self.owner_cnt}>"

    @property
    def kernel_owner_cnt(self) -> int:
        """Members bound to a host driver that uses the DMA API (NULL-cookie owners)."""
        return sum(1 for d in self.devices if d.driver is not None and d.driver not in DRIVER_MANAGED_DMA)

    @property
    def owner_cnt(self) -> int:
        return self.kernel_owner_cnt + self.user_owner_cnt

    @property
    def user_owned(self) -> bool:
        return self.user_owner_cnt > 0


def _take_dma_ownership(group: IommuGroup, owner: object) -> None:
    """Models __iommu_take_dma_ownership(): EBUSY if a non-default domain is attached."""
    if group.domain is not DEFAULT_DOMAIN and group.domain is not BLOCKING_DOMAIN:
        raise KernelError(errno.EBUSY, f"iommu group {group.id} has a foreign domain attached")
    group.domain = BLOCKING_DOMAIN
    group.owner = owner
    group.user_owner_cnt = 1


def _release_dma_ownership(group: IommuGroup) -> None:
    """Models __iommu_release_dma_ownership(): back to the default domain."""
    group.user_owner_cnt = 0
    group.owner = None
    group.domain = DEFAULT_DOMAIN


def iommu_group_claim_dma_owner(group: IommuGroup, owner: object) -> None:
    """Models iommu_group_claim_dma_owner(): whole-group claim (legacy VFIO container).

    Any existing owner, even ``owner`` itself, gives EPERM.
    """
    if owner is None:
        raise KernelError(errno.EINVAL, "NULL owner cookie")
    if group.owner_cnt:
        raise KernelError(errno.EPERM, f"iommu group {group.id} is already owned")
    _take_dma_ownership(group, owner)


def iommu_group_release_dma_owner(group: IommuGroup) -> None:
    """Models iommu_group_release_dma_owner()."""
    if not group.user_owned:
        raise KernelError(errno.EINVAL, f"iommu group {group.id} has no user owner")
    _release_dma_ownership(group)


def iommu_device_claim_dma_owner(group: IommuGroup, owner: object) -> None:
    """Models iommu_device_claim_dma_owner(): per-device claim with a cookie.

    Same cookie: owner_cnt++. Another cookie, or a host driver on a member
    (NULL cookie): EPERM. First claim with a foreign domain attached: EBUSY.
    """
    if owner is None:
        raise KernelError(errno.EINVAL, "NULL owner cookie")
    if group.owner_cnt:
        if group.kernel_owner_cnt or group.owner is not owner:
            raise KernelError(errno.EPERM, f"iommu group {group.id} is owned by someone else")
        group.user_owner_cnt += 1
        return
    _take_dma_ownership(group, owner)


def iommu_device_release_dma_owner(group: IommuGroup) -> None:
    """Models iommu_device_release_dma_owner(): owner_cnt--, released at 0."""
    if not group.user_owned:
        raise KernelError(errno.EINVAL, f"iommu group {group.id} has no user owner")
    if group.user_owner_cnt > 1:
        group.user_owner_cnt -= 1
        return
    _release_dma_ownership(group)


def iommu_group_dma_owner_claimed(group: IommuGroup) -> bool:
    """Models iommu_group_dma_owner_claimed(): owner_cnt != 0 (VIABLE is its negation)."""
    return group.owner_cnt != 0


def build_iommu_groups(topology: PciTopology) -> dict[int, IommuGroup]:
    """One IommuGroup per ``PciDev.iommu_group`` id, members in topology order."""
    groups: dict[int, IommuGroup] = {}
    for dev in topology.devices():
        if dev.iommu_group is None:
            continue
        grp = groups.get(dev.iommu_group)
        if grp is None:
            grp = groups[dev.iommu_group] = IommuGroup(dev.iommu_group)
        grp.devices.append(dev)
    return dict(sorted(groups.items()))


def iommu_group_alloc_id(groups: dict[int, IommuGroup]) -> int:
    """The id iommu_group_alloc() takes: the lowest free one (iommu_group_ida)."""
    used = set(groups)
    return min(set(range(len(used) + 1)) - used)


def iommu_check_invariants(groups: dict[int, IommuGroup]) -> list[str]:
    """Consistency of ownership state; [] when fine."""
    out: list[str] = []
    for gid, g in groups.items():
        if g.id != gid:
            out.append(f"iommu group keyed {gid} has id {g.id}")
        if g.user_owner_cnt < 0:
            out.append(f"iommu group {gid}: negative owner count")
        if (g.user_owner_cnt == 0) != (g.owner is None):
            out.append(f"iommu group {gid}: owner cookie {g.owner!r} with user_owner_cnt {g.user_owner_cnt}")
        if g.user_owner_cnt == 0 and g.domain is not DEFAULT_DOMAIN:
            out.append(f"iommu group {gid}: unowned but domain is {g.domain!r}")
    return out
