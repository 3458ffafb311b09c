"""IOMMU groups and DMA ownership (fakedev.kernel.iommu)."""

from __future__ import annotations

import errno

import pytest

from fakedev.kernel.errors import KernelError
from fakedev.kernel.iommu import (
    BLOCKING_DOMAIN,
    DEFAULT_DOMAIN,
    IommuGroup,
    build_iommu_groups,
    iommu_check_invariants,
    iommu_device_claim_dma_owner,
    iommu_device_release_dma_owner,
    iommu_group_claim_dma_owner,
    iommu_group_dma_owner_claimed,
    iommu_group_release_dma_owner,
)
from fakedev.kernel.pci import PciBus, PciDev, PciTopology


def topology(drivers: dict[int, tuple[int | None, str | None]]) -> PciTopology:
    """devfn -> (iommu group, driver) on one root bus."""
    bus = PciBus(0, 0)
    for devfn, (grp, drv) in drivers.items():
        bus.devices.append(PciDev(bus, devfn, bytearray(256), iommu_group=grp, driver=drv))
    return PciTopology([bus])


def group_of(*drivers: str | None) -> IommuGroup:
    topo = topology({i: (7, d) for i, d in enumerate(drivers)})
    return build_iommu_groups(topo)[7]


def test_build_groups_members_in_order_and_skip_groupless() -> None:
    topo = topology({0x08: (3, "vfio-pci"), 0x10: (1, None), 0x11: (3, "e1000e"), 0x18: (None, "ahci")})
    groups = build_iommu_groups(topo)
    assert list(groups) == [1, 3]
    assert [d.devfn for d in groups[3].devices] == [0x08, 0x11]
    assert groups[1].id == 1 and groups[1].owner_cnt == 0


@pytest.mark.parametrize(
    ("drivers", "claimed"),
    [
        ((None,), False),
        (("vfio-pci",), False),
        (("vfio-pci", "pci-stub"), False),
        (("vfio-pci", "pcieport"), False),
        (("vfio-pci", "e1000e"), True),
        (("nvme",), True),
    ],
)
def test_host_driver_counts_as_owner(drivers: tuple[str | None, ...], claimed: bool) -> None:
    g = group_of(*drivers)
    assert iommu_group_dma_owner_claimed(g) is claimed


@pytest.mark.parametrize("claim", [iommu_group_claim_dma_owner, iommu_device_claim_dma_owner])
def test_claim_with_host_driver_member_is_eperm(claim: object) -> None:
    g = group_of("vfio-pci", "e1000e")
    with pytest.raises(KernelError) as e:
        claim(g, object())  # type: ignore[operator]
    assert e.value.errno == errno.EPERM
    assert g.user_owner_cnt == 0 and g.owner is None and g.domain is DEFAULT_DOMAIN


def test_driver_rebind_is_seen_at_once() -> None:
    g = group_of("vfio-pci", "e1000e")
    g.devices[1].driver = "vfio-pci"
    iommu_device_claim_dma_owner(g, "ctx")
    assert g.owner == "ctx"


def test_device_claim_same_cookie_counts_up_and_down() -> None:
    g = group_of("vfio-pci", "vfio-pci")
    cookie = object()
    iommu_device_claim_dma_owner(g, cookie)
    assert g.domain is BLOCKING_DOMAIN
    iommu_device_claim_dma_owner(g, cookie)
    assert g.owner_cnt == 2
    iommu_device_release_dma_owner(g)
    assert g.owner is cookie and g.owner_cnt == 1
    iommu_device_release_dma_owner(g)
    assert g.owner is None and g.owner_cnt == 0 and g.domain is DEFAULT_DOMAIN
    assert iommu_check_invariants({7: g}) == []


def test_device_claim_other_cookie_is_eperm() -> None:
    g = group_of("vfio-pci", "vfio-pci")
    iommu_device_claim_dma_owner(g, "a")
    with pytest.raises(KernelError) as e:
        iommu_device_claim_dma_owner(g, "b")
    assert e.value.errno == errno.EPERM
    assert g.owner_cnt == 1


def test_group_claim_is_exclusive_even_for_same_owner() -> None:
    g = group_of("vfio-pci")
    iommu_group_claim_dma_owner(g, "c")
    for claim in (iommu_group_claim_dma_owner, iommu_device_claim_dma_owner):
        with pytest.raises(KernelError) as e:
            claim(g, "other")
        assert e.value.errno == errno.EPERM
    with pytest.raises(KernelError) as e2:
        iommu_group_claim_dma_owner(g, "c")
    assert e2.value.errno == errno.EPERM
    iommu_group_release_dma_owner(g)
    assert not iommu_group_dma_owner_claimed(g)


def test_foreign_domain_makes_first_claim_ebusy() -> None:
    g = group_of("vfio-pci")
    g.domain = object()
    with pytest.raises(KernelError) as e:
        iommu_device_claim_dma_owner(g, "c")
    assert e.value.errno == errno.EBUSY
    assert g.owner is None


def test_release_without_owner_is_einval_and_null_cookie_rejected() -> None:
    g = group_of("vfio-pci")
    for rel in (iommu_group_release_dma_owner, iommu_device_release_dma_owner):
        with pytest.raises(KernelError) as e:
            rel(g)
        assert e.value.errno == errno.EINVAL
    with pytest.raises(KernelError):
        iommu_device_claim_dma_owner(g, None)


def test_invariants_catch_cookie_without_count() -> None:
    g = group_of("vfio-pci")
    g.owner = "x"
    assert iommu_check_invariants({7: g})
