"""vfio-pci device calls: GET_INFO, REGION_INFO, IRQ_INFO, RESET, FEATURE, BAR/ROM access (SPEC 3.7-3.9)."""

from __future__ import annotations

import errno as E
import struct

import pytest

from fakedev.uapi import consts as C
from fakedev.uapi import ioctls as IO
from fakedev.uapi import structs as S
from tests.kernel.conftest import VERSIONS, Proc, Rig, errno_of


def bound(topology: str, index: int = 0, ver: str = "6.12") -> tuple[Rig, Proc, int]:
    r = Rig(topology, ver)
    p = r["p"]
    a = p.open("iommu")
    d, _ = p.cdev_bound(index, a)
    return r, p, d


def region(p: Proc, d: int, index: int, argsz: int = 32) -> dict[str, int]:
    a = p.buf(S.VFIO_REGION_INFO.pack(argsz=argsz, index=index, cap_offset=0x77))
    p.ioctl(d, IO.VFIO_DEVICE_GET_REGION_INFO, a)
    return S.VFIO_REGION_INFO.unpack(p.p.peek(a, 32))


def irq_info(p: Proc, d: int, index: int) -> dict[str, int]:
    a = p.buf(S.VFIO_IRQ_INFO.pack(argsz=16, index=index))
    p.ioctl(d, IO.VFIO_DEVICE_GET_IRQ_INFO, a)
    return S.VFIO_IRQ_INFO.unpack(p.p.peek(a, 16))


@pytest.mark.parametrize("ver", VERSIONS)
def test_get_info(ver: str) -> None:
    _, p, d = bound("dual-function-nic", ver=ver)
    lay = S.VFIO_DEVICE_INFO
    a = p.buf(lay.pack(argsz=16)[:16] + b"\xa5" * 8)
    p.ioctl(d, IO.VFIO_DEVICE_GET_INFO, a)
    info = lay.unpack(p.p.peek(a, 24))
    assert (info["flags"], info["num_regions"], info["num_irqs"]) == (C.VFIO_DEVICE_FLAGS_PCI, 9, 5)
    assert p.p.peek(a + 16, 8) == b"\xa5" * 8  # argsz 16: 16 bytes copied back
    b = p.buf(lay.pack(argsz=24, cap_offset=5, pad=5))
    p.ioctl(d, IO.VFIO_DEVICE_GET_INFO, b)
    assert lay.unpack(p.p.peek(b, 24))["cap_offset"] == 0
    assert errno_of(lambda: p.ioctl(d, IO.VFIO_DEVICE_GET_INFO, p.buf(lay.pack(argsz=15)))) == E.EINVAL
    _, q, fd = bound("flr-device", ver=ver)
    c = q.buf(lay.pack(argsz=24))
    q.ioctl(fd, IO.VFIO_DEVICE_GET_INFO, c)
    assert lay.unpack(q.p.peek(c, 24))["flags"] == C.VFIO_DEVICE_FLAGS_PCI | C.VFIO_DEVICE_FLAGS_RESET


def test_region_info() -> None:
    _, p, d = bound("flr-device")
    cfg = region(p, d, 7)
    rw = C.VFIO_REGION_INFO_FLAG_READ | C.VFIO_REGION_INFO_FLAG_WRITE
    assert (cfg["size"], cfg["offset"], cfg["flags"]) == (4096, 7 << 40, rw)
    assert cfg["cap_offset"] == 0x77  # copied in, not touched without caps
    b0 = region(p, d, 0)
    assert (b0["size"], b0["offset"], b0["flags"]) == (0x100000, 0, rw)  # no MMAP through FUSE
    b1 = region(p, d, 1)  # upper half of the 64-bit BAR0
    assert (b1["size"], b1["flags"], b1["offset"]) == (0, 0, 1 << 40)
    assert region(p, d, 4)["size"] == 0x1000
    rom = region(p, d, 6)
    assert (rom["size"], rom["flags"]) == (0x10000, C.VFIO_REGION_INFO_FLAG_READ)
    assert errno_of(lambda: region(p, d, 8)) == E.EINVAL
    assert errno_of(lambda: region(p, d, 9)) == E.EINVAL
    assert errno_of(lambda: region(p, d, 0, argsz=31)) == E.EINVAL
    _, q, e = bound("root-bus")
    assert region(q, e, 7)["size"] == 256
    assert region(q, e, 6) | {"cap_offset": 0} == {"argsz": 32, "flags": 0, "index": 6, "cap_offset": 0,
                                                   "size": 0, "offset": 6 << 40}


def test_irq_info_counts() -> None:
    _, p, d = bound("flr-device")
    assert irq_info(p, d, 0) == {"argsz": 16, "index": 0, "count": 1, "flags": C.VFIO_IRQ_INFO_EVENTFD
                                 | C.VFIO_IRQ_INFO_MASKABLE | C.VFIO_IRQ_INFO_AUTOMASKED}
    assert irq_info(p, d, 1)["count"] == 4  # QMASK = 2 -> 4 vectors
    assert irq_info(p, d, 1)["flags"] == C.VFIO_IRQ_INFO_EVENTFD | C.VFIO_IRQ_INFO_NORESIZE
    assert irq_info(p, d, 2)["count"] == 4
    assert irq_info(p, d, 2)["flags"] == C.VFIO_IRQ_INFO_EVENTFD  # dynamic MSI-X
    assert irq_info(p, d, 3)["count"] == 1
    assert irq_info(p, d, 4)["count"] == 1
    assert errno_of(lambda: irq_info(p, d, 5)) == E.EINVAL
    _, q, e = bound("root-bus")  # conventional PCI: no ERR index, no MSI-X
    assert errno_of(lambda: irq_info(q, e, 3)) == E.EINVAL
    assert irq_info(q, e, 2)["count"] == 0
    assert irq_info(q, e, 1)["count"] == 1


def test_device_reset() -> None:
    r, p, d = bound("flr-device")
    n = len(r.k.reset_log)
    assert p.ioctl(d, IO.VFIO_DEVICE_RESET, 0) == 0
    rec = r.k.reset_log[n]
    assert (rec.bdf, rec.method, rec.cause, rec.pid, rec.reset_count) == (
        "0000:02:00.0", "flr", "VFIO_DEVICE_RESET", p.p.pid, 2)  # the first was at open
    r.k.hooks.device_lock_contended.add("0000:02:00.0")
    assert errno_of(lambda: p.ioctl(d, IO.VFIO_DEVICE_RESET, 0)) == E.EAGAIN
    r.k.hooks.device_lock_contended.clear()
    r.k.hooks.reset_errno["0000:02:00.0"] = E.EIO
    assert errno_of(lambda: p.ioctl(d, IO.VFIO_DEVICE_RESET, 0)) == E.EIO
    assert len(r.k.reset_log) == n + 1
    _, q, e = bound("dual-function-nic")
    assert errno_of(lambda: q.ioctl(e, IO.VFIO_DEVICE_RESET, 0)) == E.EINVAL


def test_open_fails_eagain_when_device_lock_contended() -> None:
    r = Rig("flr-device")
    r.k.hooks.device_lock_contended.add("0000:02:00.0")
    p = r["p"]
    a = p.open("iommu")
    d = p.open("vfio/devices/vfio0")
    assert errno_of(lambda: p.bind(d, a)) == E.EAGAIN
    dev = r.k.device("vfio0")
    assert dev.open_count == 0 and dev.iommufd_device is None and dev.group.cdev_device_open_cnt == 0
    assert r.k.iommu_groups[20].owner is None
    r.check()


def feature(p: Proc, d: int, flags: int, argsz: int = 8, payload: bytes = b"") -> int:
    return p.ioctl(d, IO.VFIO_DEVICE_FEATURE, p.buf(S.VFIO_DEVICE_FEATURE.pack(argsz=argsz, flags=flags) + payload))


def test_feature_header_rules() -> None:
    r, p, d = bound("dual-function-nic")
    GET, SET, PROBE = C.VFIO_DEVICE_FEATURE_GET, C.VFIO_DEVICE_FEATURE_SET, C.VFIO_DEVICE_FEATURE_PROBE
    assert errno_of(lambda: feature(p, d, GET | 1, argsz=7)) == E.EINVAL
    assert errno_of(lambda: feature(p, d, 1 << 19)) == E.EINVAL
    assert errno_of(lambda: feature(p, d, GET | SET | 3)) == E.EINVAL
    assert errno_of(lambda: feature(p, d, GET | C.VFIO_DEVICE_FEATURE_MIGRATION)) == E.ENOTTY
    assert errno_of(lambda: feature(p, d, SET | C.VFIO_DEVICE_FEATURE_DMA_LOGGING_START)) == E.ENOTTY
    assert errno_of(lambda: feature(p, d, GET | C.VFIO_DEVICE_FEATURE_PCI_VF_TOKEN)) == E.ENOTTY
    assert errno_of(lambda: feature(p, d, GET | 40)) == E.ENOTTY
    lp = C.VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY
    assert feature(p, d, PROBE | SET | lp) == 0
    assert errno_of(lambda: feature(p, d, PROBE | GET | lp)) == E.EINVAL
    assert errno_of(lambda: feature(p, d, lp)) == E.EINVAL
    assert feature(p, d, SET | lp) == 0 and r.k.device("vfio0").low_power
    assert feature(p, d, SET | C.VFIO_DEVICE_FEATURE_LOW_POWER_EXIT) == 0
    wake = C.VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP
    assert errno_of(lambda: feature(p, d, SET | wake, argsz=12, payload=b"\0" * 4)) == E.EINVAL
    efd, ev = p.p.eventfd()
    assert feature(p, d, SET | wake, argsz=16, payload=struct.pack("<iI", efd, 0)) == 0
    assert ev.refs == 1
    assert errno_of(lambda: feature(p, d, SET | wake, argsz=16, payload=struct.pack("<iI", 77, 0))) == E.EBADF


def test_bar_access() -> None:
    _, p, d = bound("dual-function-nic")
    assert p.write(d, 0x100, struct.pack("<Q", 0x1122334455667788)) == 8
    assert p.read(d, 0x100, 8) == struct.pack("<Q", 0x1122334455667788)
    assert p.read(d, 0x102, 3) == bytes([0x66, 0x55, 0x44])
    assert errno_of(lambda: p.read(d, 0x20000, 4)) == E.EINVAL  # past the 128K BAR
    assert p.read(d, 0x1FFFE, 8) == bytes(2)  # clipped to the BAR end
    assert errno_of(lambda: p.read(d, 1 << 40, 4)) == E.EINVAL  # BAR1 unimplemented
    io = 2 << 40
    assert p.write(d, io + 4, b"\x5a") == 1 and p.read(d, io + 4, 1) == b"\x5a"
    # MSI-X table (BAR3 offset 0, 10 vectors -> one page) reads as 0xff and drops writes
    bar3 = 3 << 40
    p.write(d, bar3 + 0x10, b"\0\0\0\0")
    assert p.read(d, bar3 + 0x10, 4) == b"\xff" * 4
    assert p.write(d, bar3 + 0x1000, b"\1\2") == 2 and p.read(d, bar3 + 0x1000, 2) == b"\1\2"
    # memory decode off -> EIO on memory BARs, I/O BARs still work
    cfg = 7 << 40
    cmd = int.from_bytes(p.read(d, cfg + 4, 2), "little")
    assert cmd & 0x3 == 0x3  # pci_enable_device turned decode on
    p.write(d, cfg + 4, (cmd & ~0x2).to_bytes(2, "little"))
    assert errno_of(lambda: p.read(d, 0x100, 4)) == E.EIO
    assert p.read(d, io + 4, 1) == b"\x5a"
    assert errno_of(lambda: p.read(d, 9 << 40, 4)) == E.EINVAL


def test_rom_read() -> None:
    _, p, d = bound("flr-device")
    assert p.read(d, 6 << 40, 2) == b"\x55\xaa"
    assert errno_of(lambda: p.write(d, 6 << 40, b"\0")) == E.EINVAL
    assert errno_of(lambda: p.read(d, (6 << 40) + 0x10000, 1)) == E.EINVAL


def test_bar_behaviour_object() -> None:
    from fakedev.kernel.kernel import Kernel
    from tests.kernel import topologies as T

    class Counter:
        def __init__(self) -> None:
            self.reads: list[tuple[int, int, int]] = []
            self.resets = 0

        def read(self, bar: int, off: int, size: int) -> bytes:
            self.reads.append((bar, off, size))
            return bytes([off & 0xFF]) * size

        def write(self, bar: int, off: int, data: bytes) -> None:
            pass

        def reset(self) -> None:
            self.resets += 1

    beh = Counter()
    k = Kernel(T.flr_device(), behaviours={"0000:02:00.0": beh})
    p = Proc(k)
    a = p.open("iommu")
    d, _ = p.cdev_bound(0, a)
    assert beh.resets == 1  # the FLR at open
    assert p.read(d, 0x3, 7) == b"\x03\x04\x04\x04\x04\x08\x08"
    assert beh.reads == [(0, 3, 1), (0, 4, 4), (0, 8, 2)]  # naturally aligned pieces
    beh.reads.clear()
    p.read(d, 0x10, 16)
    assert beh.reads == [(0, 0x10, 8), (0, 0x18, 8)]


def test_region_info_mmap_when_enabled() -> None:
    from fakedev.kernel.kernel import Kernel
    from tests.kernel import topologies as T

    k = Kernel(T.dual_function_nic(), bar_mmap=True)
    p = Proc(k)
    a = p.open("iommu")
    d, _ = p.cdev_bound(0, a)
    rw = C.VFIO_REGION_INFO_FLAG_READ | C.VFIO_REGION_INFO_FLAG_WRITE
    assert region(p, d, 0)["flags"] == rw | C.VFIO_REGION_INFO_FLAG_MMAP
    assert region(p, d, 2)["flags"] == rw  # I/O BAR
    short = region(p, d, 3)  # the MSI-X BAR: MSIX_MAPPABLE cap, buffer too small
    assert (short["argsz"], short["cap_offset"]) == (40, 0)
    assert short["flags"] == rw | C.VFIO_REGION_INFO_FLAG_MMAP | C.VFIO_REGION_INFO_FLAG_CAPS
    a3 = p.buf(S.VFIO_REGION_INFO.pack(argsz=40, index=3) + bytes(8))
    p.ioctl(d, IO.VFIO_DEVICE_GET_REGION_INFO, a3)
    assert S.VFIO_REGION_INFO.unpack(p.p.peek(a3, 32))["cap_offset"] == 32
    assert S.VFIO_INFO_CAP_HEADER.unpack(p.p.peek(a3 + 32, 8)) == {
        "id": C.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, "version": 1, "next": 0}
