"""The call sequences QEMU makes (shared/QEMU.md), end to end against the model."""

from __future__ import annotations

import errno as E
import struct

import pytest

from fakedev.uapi import consts as C
from fakedev.uapi import ioctls as IO
from fakedev.uapi import structs as S
from tests.kernel.conftest import VERSIONS, Proc, Rig, errno_of

F0, F1 = "0000:01:00.0", "0000:01:00.1"


def realize_iommufd(p: Proc, ifd: int, index: int, ioas: int | None) -> tuple[int, int]:
    """BIND(argsz 24), IOAS_ALLOC, GET_HW_INFO, HWPT_ALLOC, ATTACH; returns (device fd, ioas)."""
    d = p.open(f"vfio/devices/vfio{index}")
    devid = p.bind(d, ifd, argsz=24)
    if ioas is None:
        ioas = p.ioas_alloc(ifd)
    hw = p.buf(S.IOMMU_HW_INFO.pack(size=S.IOMMU_HW_INFO.size, dev_id=devid))
    p.ioctl(ifd, IO.IOMMU_GET_HW_INFO, hw)
    ha = p.buf(S.IOMMU_HWPT_ALLOC.pack(size=S.IOMMU_HWPT_ALLOC.size, dev_id=devid, pt_id=ioas))
    p.ioctl(ifd, IO.IOMMU_HWPT_ALLOC, ha)
    hwpt = S.IOMMU_HWPT_ALLOC.unpack(p.p.peek(ha, S.IOMMU_HWPT_ALLOC.size))["out_hwpt_id"]
    assert p.attach(d, hwpt) == hwpt
    return d, ioas


def device_probe(p: Proc, d: int) -> None:
    """What vfio_realize reads: info, regions, config, IRQ info, FEATURE(MIGRATION)."""
    a = p.buf(S.VFIO_DEVICE_INFO.pack(argsz=24))
    p.ioctl(d, IO.VFIO_DEVICE_GET_INFO, a)
    info = S.VFIO_DEVICE_INFO.unpack(p.p.peek(a, 24))
    assert info["flags"] & C.VFIO_DEVICE_FLAGS_PCI and info["num_regions"] >= 8 and info["num_irqs"] >= 3
    for idx in (0, 1, 2, 3, 4, 5, 7):
        ra = p.buf(S.VFIO_REGION_INFO.pack(argsz=32, index=idx))
        p.ioctl(d, IO.VFIO_DEVICE_GET_REGION_INFO, ra)
        size = S.VFIO_REGION_INFO.unpack(p.p.peek(ra, 32))["size"]
        assert size & (size - 1) == 0  # 0 or a power of two
    cfg = p.read(d, 7 << 40, 4096)
    assert len(cfg) == 4096
    p.write(d, (7 << 40) + 0x30, struct.pack("<I", 0xFFFFF800))
    p.read(d, (7 << 40) + 0x30, 4)
    for idx in (0, 1, 2, 3, 4):
        ia = p.buf(S.VFIO_IRQ_INFO.pack(argsz=16, index=idx))
        p.ioctl(d, IO.VFIO_DEVICE_GET_IRQ_INFO, ia)
    f = p.buf(S.VFIO_DEVICE_FEATURE.pack(argsz=16, flags=C.VFIO_DEVICE_FEATURE_GET
                                         | C.VFIO_DEVICE_FEATURE_MIGRATION) + bytes(8))
    assert errno_of(lambda: p.ioctl(d, IO.VFIO_DEVICE_FEATURE, f)) == E.ENOTTY
    efd, _ = p.p.eventfd()
    irq = S.VFIO_IRQ_SET.pack(argsz=24, flags=C.VFIO_IRQ_SET_DATA_EVENTFD | C.VFIO_IRQ_SET_ACTION_TRIGGER,
                              index=0, start=0, count=1) + struct.pack("<i", efd)
    p.ioctl(d, IO.VFIO_DEVICE_SET_IRQS, p.buf(irq))


def qemu_hot_reset_cdev(p: Proc, d: int) -> int:
    """vfio_pci_hot_reset on the iommufd path: INFO(12), INFO(full), checks, zero-length reset."""
    err, hdr, _ = p.hot_reset_info(d, argsz=12)
    assert err in (0, E.ENOSPC)
    err, hdr, ents = p.hot_reset_info(d, argsz=12 + 8 * hdr["count"])
    assert err == 0
    assert hdr["flags"] & C.VFIO_PCI_HOT_RESET_FLAG_DEV_ID
    if not hdr["flags"] & C.VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED:
        return -1  # "depends on device ... which is not owned": QEMU sends no reset
    assert all(e[0] != C.VFIO_PCI_DEVID_NOT_OWNED for e in ents)
    return p.hot_reset(d)


@pytest.mark.parametrize("ver", VERSIONS)
def test_qemu_iommufd_two_functions_system_reset(ver: str) -> None:
    r = Rig("dual-function-nic", ver)
    p = r["p"]
    ifd = p.open("iommu")
    d0, ioas = realize_iommufd(p, ifd, 0, None)
    device_probe(p, d0)
    # with only one function assigned, QEMU finds the dependency unowned
    assert qemu_hot_reset_cdev(p, d0) == -1
    d1, _ = realize_iommufd(p, ifd, 1, ioas)
    device_probe(p, d1)
    mark = len(r.k.reset_log)
    assert qemu_hot_reset_cdev(p, d0) == 0
    assert [x.bdf for x in r.k.reset_log[mark:]] == [F0, F1]
    # no FLR on this card: VFIO_DEVICE_RESET is not offered
    assert errno_of(lambda: p.ioctl(d0, IO.VFIO_DEVICE_RESET, 0)) == E.EINVAL
    r.check()
    p.close(d0)
    p.close(d1)
    p.close(ifd)
    r.check()
    assert all(not d.cdev_opened for d in r.k.vfio_devices())


@pytest.mark.parametrize("ver", VERSIONS)
def test_qemu_legacy_group_flow(ver: str) -> None:
    r = Rig("dual-function-nic", ver)
    p = r["p"]
    g13 = p.open("vfio/13")
    st = p.buf(S.VFIO_GROUP_STATUS.pack(argsz=8))
    p.ioctl(g13, IO.VFIO_GROUP_GET_STATUS, st)
    assert S.VFIO_GROUP_STATUS.unpack(p.p.peek(st, 8))["flags"] & C.VFIO_GROUP_FLAGS_VIABLE
    c = p.open("vfio/vfio")
    assert p.ioctl(c, IO.VFIO_GET_API_VERSION, 0) == C.VFIO_API_VERSION
    assert p.ioctl(c, IO.VFIO_CHECK_EXTENSION, C.VFIO_TYPE1v2_IOMMU) == 1
    p.ioctl(g13, IO.VFIO_GROUP_SET_CONTAINER, p.buf(struct.pack("<i", c)))
    p.ioctl(c, IO.VFIO_SET_IOMMU, C.VFIO_TYPE1v2_IOMMU)
    g14 = p.open("vfio/14")
    p.ioctl(g14, IO.VFIO_GROUP_SET_CONTAINER, p.buf(struct.pack("<i", c)))
    ram = p.p.mmap(0x20000)
    m = S.VFIO_IOMMU_TYPE1_DMA_MAP.pack(argsz=32, flags=3, vaddr=ram, iova=0, size=0x20000)
    p.ioctl(c, IO.VFIO_IOMMU_MAP_DMA, p.buf(m))
    d0 = p.get_device_fd(g13, F0)
    d1 = p.get_device_fd(g14, F1)
    device_probe(p, d0)
    device_probe(p, d1)
    err, hdr, _ = p.hot_reset_info(d0, argsz=12)
    assert err == E.ENOSPC and hdr["count"] == 2
    err, hdr, ents = p.hot_reset_info(d0, argsz=12 + 8 * 2)
    assert err == 0 and [e[0] for e in ents] == [13, 14]
    mark = len(r.k.reset_log)
    assert p.hot_reset(d0, [g13, g14]) == 0
    assert len(r.k.reset_log) == mark + 2
    r.check()
    p.p.exit()
    r.check()
    assert r.k.iommu_groups[13].owner is None and r.k.iommu_groups[14].owner is None
    assert r.k.describe()["groups"][0]["open"] is False
