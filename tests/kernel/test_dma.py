"""Device DMA through the IOMMU model: translation by the group's domain
(iommufd IOAS_MAP / MAP_FILE / COPY, legacy type1 MAP_DMA), direction checks,
the fault log, and the "dma-engine" behaviour driven through region writes."""

from __future__ import annotations

import errno as E
import struct

import pytest

from fakedev.kernel.dma import DmaPiece
from fakedev.kernel.errors import KernelError
from fakedev.kernel.kernel import Kernel
from fakedev.kernel.testing import FakeOther, FakeProcess
from fakedev.kernel.vfio.pci import dma_engine as R
from fakedev.tree import load_tree
from fakedev.tree.loader import FIXTURES
from fakedev.uapi import consts as C
from fakedev.uapi import ioctls as IO
from fakedev.uapi import structs as S
from tests.kernel.conftest import Proc, errno_of

BDF = "0000:03:00.0"
GROUP = 31
PAGE = 4096
CFG = C.VFIO_PCI_CONFIG_REGION_INDEX << 40
BAR0 = 0


class FakeMemfd(FakeOther):
    """A memfd: a foreign file with contents (what IOMMU_IOAS_MAP_FILE maps)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.data = bytearray(size)


class FakeDmaMemory:
    """DmaMemory over FakeProcesses (by pid) and FakeMemfds."""

    def __init__(self) -> None:
        self.procs: dict[int, FakeProcess] = {}
        self.calls = 0

    def add(self, p: FakeProcess) -> None:
        self.procs[p.pid] = p

    def read(self, piece: DmaPiece) -> bytes:
        self.calls += 1
        if piece.file is not None:
            assert isinstance(piece.file, FakeMemfd)
            if piece.addr + piece.length > len(piece.file.data):
                raise KernelError(E.EFAULT, "past the end of the file")
            return bytes(piece.file.data[piece.addr:piece.addr + piece.length])
        proc = self.procs.get(piece.pid)
        if proc is None:
            raise KernelError(E.EFAULT, "no such process")
        return proc.peek(piece.addr, piece.length)

    def write(self, piece: DmaPiece, data: bytes) -> None:
        self.calls += 1
        assert len(data) == piece.length
        if piece.file is not None:
            assert isinstance(piece.file, FakeMemfd)
            if piece.addr + piece.length > len(piece.file.data):
                raise KernelError(E.EFAULT, "past the end of the file")
            piece.file.data[piece.addr:piece.addr + piece.length] = data
            return
        proc = self.procs.get(piece.pid)
        if proc is None:
            raise KernelError(E.EFAULT, "no such process")
        proc.poke(piece.addr, data)


class Rig:
    """The dma-engine fixture's kernel, one process, a fake memory."""

    def __init__(self, kernel: str | None = None) -> None:
        tree = load_tree(FIXTURES / "dma-engine.toml")
        if kernel is not None:
            from attrs import evolve

            from fakedev.kernel.version import KernelVersion
            tree = evolve(tree, version=KernelVersion.parse(kernel))
        self.k: Kernel = tree.make_kernel()
        self.mem = FakeDmaMemory()
        self.k.dma_memory = self.mem
        self.p = self.proc()

    def proc(self) -> Proc:
        p = Proc(self.k)
        self.mem.add(p.p)
        return p

    def check(self) -> None:
        assert self.k.check_invariants() == []


def ioas_map(p: Proc, ifd: int, ioas: int, addr: int, length: int, iova: int,
             flags: int = C.IOMMU_IOAS_MAP_READABLE | C.IOMMU_IOAS_MAP_WRITEABLE) -> None:
    a = p.buf(S.IOMMU_IOAS_MAP.pack(size=40, flags=flags | C.IOMMU_IOAS_MAP_FIXED_IOVA, ioas_id=ioas,
                                    user_va=addr, length=length, iova=iova))
    p.ioctl(ifd, IO.IOMMU_IOAS_MAP, a)


def iommufd_attached(r: Rig) -> tuple[int, int, int]:
    """(iommufd, device fd, ioas): the engine bound and attached to a fresh IOAS."""
    p = r.p
    ifd = p.open("iommu")
    d, _ = p.cdev_bound(0, ifd)
    ioas = p.ioas_alloc(ifd)
    p.attach(d, ioas)
    return ifd, d, ioas


def legacy_container(r: Rig) -> tuple[int, int, int]:
    """(group fd, container fd, device fd) on the type1v2 container path."""
    p = r.p
    g, c = p.group_setup(GROUP)
    d = p.get_device_fd(g, BDF)
    return g, c, d


def map_dma(p: Proc, c: int, addr: int, size: int, iova: int,
            flags: int = C.VFIO_DMA_MAP_FLAG_READ | C.VFIO_DMA_MAP_FLAG_WRITE) -> None:
    a = p.buf(S.VFIO_IOMMU_TYPE1_DMA_MAP.pack(argsz=32, flags=flags, vaddr=addr, iova=iova, size=size))
    p.ioctl(c, IO.VFIO_IOMMU_MAP_DMA, a)


# ---------------------------------------------------------------------------- translation paths


def test_iommufd_map_read_and_write() -> None:
    r = Rig()
    ifd, _d, ioas = iommufd_attached(r)
    buf = r.p.p.alloc(b"hello, device!" + bytes(2 * PAGE - 14))
    ioas_map(r.p, ifd, ioas, buf, 2 * PAGE, 0x100000)
    assert r.k.dma_read(BDF, 0x100000, 14) == b"hello, device!"
    # a range across the two pages of one mapping, by node name too
    r.k.dma_write("vfio0", 0x100000 + PAGE - 3, b"abcdef")
    assert r.p.p.peek(buf + PAGE - 3, 6) == b"abcdef"
    desc = r.k.describe()["dma"]
    assert (desc["reads"], desc["writes"], desc["bytes_written"], desc["faults"]) == (1, 1, 6, 0)
    r.check()


def test_iommufd_two_mappings_contiguous_in_iova() -> None:
    r = Rig()
    ifd, _d, ioas = iommufd_attached(r)
    a = r.p.p.alloc(b"A" * PAGE)
    b = r.p.p.alloc(b"B" * PAGE)
    ioas_map(r.p, ifd, ioas, a, PAGE, 0x200000)
    ioas_map(r.p, ifd, ioas, b, PAGE, 0x201000)
    assert r.k.dma_read(BDF, 0x200000 + PAGE - 2, 4) == b"AABB"


def test_map_file_reaches_the_file_and_drops_it_on_unmap() -> None:
    r = Rig()
    assert r.k.version.has_map_file
    ifd, _d, ioas = iommufd_attached(r)
    memfd = FakeMemfd(4 * PAGE)
    memfd.data[PAGE:PAGE + 5] = b"filed"
    fd = r.p.p.install(memfd)
    a = r.p.buf(S.IOMMU_IOAS_MAP_FILE.pack(
        size=40, flags=C.IOMMU_IOAS_MAP_FIXED_IOVA | C.IOMMU_IOAS_MAP_READABLE | C.IOMMU_IOAS_MAP_WRITEABLE,
        ioas_id=ioas, fd=fd, start=PAGE, length=2 * PAGE, iova=0x300000))
    r.p.ioctl(ifd, IO.IOMMU_IOAS_MAP_FILE, a)
    assert memfd.refs == 2  # the mapping holds the file
    assert r.k.dma_read(BDF, 0x300000, 5) == b"filed"
    r.k.dma_write(BDF, 0x300000 + PAGE, b"device")
    assert memfd.data[2 * PAGE:2 * PAGE + 6] == b"device"
    r.p.close(fd)
    assert r.k.dma_read(BDF, 0x300000, 5) == b"filed"  # still mapped: still reachable
    u = r.p.buf(S.IOMMU_IOAS_UNMAP.pack(size=24, ioas_id=ioas, iova=0x300000, length=2 * PAGE))
    r.p.ioctl(ifd, IO.IOMMU_IOAS_UNMAP, u)
    assert memfd.refs == 0
    assert errno_of(lambda: r.k.dma_read(BDF, 0x300000, 5)) == E.EFAULT
    r.check()


def test_map_file_past_the_end_of_the_file_faults_memory() -> None:
    r = Rig()
    ifd, _d, ioas = iommufd_attached(r)
    memfd = FakeMemfd(PAGE)
    fd = r.p.p.install(memfd)
    a = r.p.buf(S.IOMMU_IOAS_MAP_FILE.pack(
        size=40, flags=C.IOMMU_IOAS_MAP_FIXED_IOVA | C.IOMMU_IOAS_MAP_READABLE,
        ioas_id=ioas, fd=fd, start=0, length=2 * PAGE, iova=0x300000))
    r.p.ioctl(ifd, IO.IOMMU_IOAS_MAP_FILE, a)
    assert errno_of(lambda: r.k.dma_read(BDF, 0x300000 + PAGE, 4)) == E.EFAULT
    assert r.k.dma.faults[-1].reason == "memory"


def test_ioas_copy_shares_the_source_pages() -> None:
    r = Rig()
    p = r.p
    ifd = p.open("iommu")
    src_ioas = p.ioas_alloc(ifd)
    buf = p.p.alloc(b"copied" + bytes(PAGE - 6))
    ioas_map(p, ifd, src_ioas, buf, PAGE, 0x10000)
    d, _ = p.cdev_bound(0, ifd)
    dst_ioas = p.ioas_alloc(ifd)
    p.attach(d, dst_ioas)
    a = p.buf(S.IOMMU_IOAS_COPY.pack(size=40, flags=C.IOMMU_IOAS_MAP_FIXED_IOVA | C.IOMMU_IOAS_MAP_READABLE,
                                     dst_ioas_id=dst_ioas, src_ioas_id=src_ioas, length=PAGE,
                                     dst_iova=0x800000, src_iova=0x10000))
    p.ioctl(ifd, IO.IOMMU_IOAS_COPY, a)
    assert r.k.dma_read(BDF, 0x800000, 6) == b"copied"
    # the device's IOAS is the copy's: the source IOVA is not mapped there
    assert errno_of(lambda: r.k.dma_read(BDF, 0x10000, 6)) == E.EFAULT
    # the copy is read-only
    assert errno_of(lambda: r.k.dma_write(BDF, 0x800000, b"x")) == E.EFAULT
    assert r.k.dma.faults[-1].reason == "permission"
    assert p.p.peek(buf, 6) == b"copied"
    r.check()


@pytest.mark.parametrize("iommu_type", [C.VFIO_TYPE1_IOMMU, C.VFIO_TYPE1v2_IOMMU])
def test_type1_map_dma(iommu_type: int) -> None:
    r = Rig()
    p = r.p
    g = p.open(f"vfio/{GROUP}")
    c = p.open("vfio/vfio")
    p.ioctl(g, IO.VFIO_GROUP_SET_CONTAINER, p.buf(struct.pack("<i", c)))
    # in a container but no IOMMU driver yet: blocked
    assert errno_of(lambda: r.k.dma_read(BDF, 0x100000, 4)) == E.EFAULT
    assert r.k.dma.faults[-1].reason == "blocked"
    p.ioctl(c, IO.VFIO_SET_IOMMU, iommu_type)
    buf = p.p.alloc(b"legacy" + bytes(2 * PAGE - 6))
    map_dma(p, c, buf, 2 * PAGE, 0x100000)
    assert r.k.dma_read(BDF, 0x100000, 6) == b"legacy"
    r.k.dma_write(BDF, 0x100000 + PAGE + 8, b"written")
    assert p.p.peek(buf + PAGE + 8, 7) == b"written"
    # read-only mapping: device writes fault and change nothing
    ro = p.p.alloc(b"r" * PAGE)
    map_dma(p, c, ro, PAGE, 0x200000, flags=C.VFIO_DMA_MAP_FLAG_READ)
    assert errno_of(lambda: r.k.dma_write(BDF, 0x200000, b"w")) == E.EFAULT
    f = r.k.dma.faults[-1]
    assert (f.bdf, f.iova, f.write, f.reason) == (BDF, 0x200000, True, "permission")
    assert p.p.peek(ro, 1) == b"r"
    # unmap: gone
    u = p.buf(S.VFIO_IOMMU_TYPE1_DMA_UNMAP.pack(argsz=24, iova=0x100000, size=2 * PAGE))
    p.ioctl(c, IO.VFIO_IOMMU_UNMAP_DMA, u)
    assert errno_of(lambda: r.k.dma_read(BDF, 0x100000, 6)) == E.EFAULT
    assert r.k.dma.faults[-1].reason == "unmapped"
    r.check()


def test_type1_vaddr_update_moves_the_mapping_to_the_new_process() -> None:
    r = Rig()
    p = r.p
    _g, c, _d = legacy_container(r)
    buf = p.p.alloc(b"old" + bytes(PAGE - 3))
    map_dma(p, c, buf, PAGE, 0x100000)
    u = p.buf(S.VFIO_IOMMU_TYPE1_DMA_UNMAP.pack(argsz=24, flags=C.VFIO_DMA_UNMAP_FLAG_VADDR,
                                                 iova=0x100000, size=PAGE))
    p.ioctl(c, IO.VFIO_IOMMU_UNMAP_DMA, u)
    assert r.k.dma_read(BDF, 0x100000, 3) == b"old"  # pinned pages still reachable
    q = r.proc()
    nbuf = q.p.alloc(b"new" + bytes(PAGE - 3))
    m = q.buf(S.VFIO_IOMMU_TYPE1_DMA_MAP.pack(argsz=32, flags=C.VFIO_DMA_MAP_FLAG_VADDR, vaddr=nbuf,
                                               iova=0x100000, size=PAGE))
    drv = p.file(c)
    drv.ioctl(q.t, IO.VFIO_IOMMU_MAP_DMA, m)
    assert r.k.dma_read(BDF, 0x100000, 3) == b"new"


def test_iommufd_compat_container_map_dma() -> None:
    """A group set to an iommufd (/dev/iommu as the container): MAP_DMA goes to the compat IOAS."""
    r = Rig()
    p = r.p
    g = p.open(f"vfio/{GROUP}")
    ifd = p.open("iommu")
    p.ioctl(g, IO.VFIO_GROUP_SET_CONTAINER, p.buf(struct.pack("<i", ifd)))
    p.ioctl(ifd, IO.VFIO_SET_IOMMU, C.VFIO_TYPE1v2_IOMMU)
    p.get_device_fd(g, BDF)
    buf = p.p.alloc(b"compat" + bytes(PAGE - 6))
    map_dma(p, ifd, buf, PAGE, 0x100000)
    assert r.k.dma_read(BDF, 0x100000, 6) == b"compat"
    r.check()


# ---------------------------------------------------------------------------- faults


def test_unmapped_fault_records_the_first_unmapped_iova() -> None:
    r = Rig()
    ifd, _d, ioas = iommufd_attached(r)
    buf = r.p.p.alloc(2 * PAGE)
    ioas_map(r.p, ifd, ioas, buf, 2 * PAGE, 0x100000)
    before = r.mem.calls
    err = errno_of(lambda: r.k.dma_write(BDF, 0x100000 + PAGE, b"z" * (2 * PAGE)))
    assert err == E.EFAULT
    f = r.k.dma.faults[-1]
    assert (f.iova, f.length, f.write, f.reason) == (0x102000, PAGE, True, "unmapped")
    assert r.mem.calls == before  # all or nothing: nothing was written
    assert r.p.p.peek(buf + PAGE, 1) == b"\0"
    assert r.k.describe()["dma"]["fault_counts"] == {"unmapped": 1}


def test_blocked_when_bound_but_not_attached_and_after_detach() -> None:
    r = Rig()
    p = r.p
    # not opened by anyone: the group is in its DMA-API default domain
    assert errno_of(lambda: r.k.dma_read(BDF, 0x1000, 4)) == E.EFAULT
    assert "default domain" in r.k.dma.faults[-1].detail
    ifd = p.open("iommu")
    d, _ = p.cdev_bound(0, ifd)
    assert errno_of(lambda: r.k.dma_read(BDF, 0x1000, 4)) == E.EFAULT
    assert r.k.dma.faults[-1].reason == "blocked"
    ioas = p.ioas_alloc(ifd)
    buf = p.p.alloc(PAGE)
    ioas_map(p, ifd, ioas, buf, PAGE, 0x1000)
    p.attach(d, ioas)
    assert r.k.dma_read(BDF, 0x1000, 4) == bytes(4)
    p.detach(d)
    assert errno_of(lambda: r.k.dma_read(BDF, 0x1000, 4)) == E.EFAULT
    assert r.k.dma.faults[-1].reason == "blocked"
    assert r.k.describe()["dma"]["fault_counts"] == {"blocked": 3}
    r.check()


def test_write_only_mapping_refuses_device_reads() -> None:
    r = Rig()
    ifd, _d, ioas = iommufd_attached(r)
    buf = r.p.p.alloc(PAGE)
    ioas_map(r.p, ifd, ioas, buf, PAGE, 0x100000, flags=C.IOMMU_IOAS_MAP_WRITEABLE)
    r.k.dma_write(BDF, 0x100000, b"ok")
    assert errno_of(lambda: r.k.dma_read(BDF, 0x100000, 2)) == E.EFAULT
    assert r.k.dma.faults[-1].reason == "permission"


def test_process_gone_and_no_memory_access() -> None:
    r = Rig()
    ifd, _d, ioas = iommufd_attached(r)
    buf = r.p.p.alloc(PAGE)
    ioas_map(r.p, ifd, ioas, buf, PAGE, 0x100000)
    r.p.p.munmap(buf, PAGE)  # the memory went away under the mapping
    assert errno_of(lambda: r.k.dma_read(BDF, 0x100000, 2)) == E.EFAULT
    assert r.k.dma.faults[-1].reason == "memory"
    r.k.dma_memory = None
    assert errno_of(lambda: r.k.dma_read(BDF, 0x100000, 2)) == E.EFAULT
    assert r.k.dma.faults[-1].reason == "no-memory"


def test_bad_lengths_and_unknown_device() -> None:
    r = Rig()
    assert errno_of(lambda: r.k.dma_read(BDF, 0x1000, 0)) == E.EINVAL
    assert errno_of(lambda: r.k.dma_read(BDF, (1 << 64) - 2, 4)) == E.EFAULT
    with pytest.raises(KeyError):
        r.k.dma_read("0000:09:00.0", 0, 4)


def test_fault_log_is_bounded_but_counts_everything() -> None:
    r = Rig()
    for i in range(300):
        with pytest.raises(KernelError):
            r.k.dma_read(BDF, i * PAGE, 4)
    assert len(r.k.dma.faults) == 256
    assert r.k.describe()["dma"]["faults"] == 300
    assert len(r.k.describe()["dma"]["recent_faults"]) == 8


# ---------------------------------------------------------------------------- the engine


def reg_write(p: Proc, d: int, off: int, value: int, size: int = 4) -> None:
    p.write(d, BAR0 + off, value.to_bytes(size, "little"))


def reg_read(p: Proc, d: int, off: int, size: int = 4) -> int:
    return int.from_bytes(p.read(d, BAR0 + off, size), "little")


def bus_master(p: Proc, d: int, on: bool = True) -> None:
    cmd = int.from_bytes(p.read(d, CFG + 4, 2), "little")
    cmd = cmd | 4 if on else cmd & ~4
    p.write(d, CFG + 4, cmd.to_bytes(2, "little"))


def msi_eventfd(p: Proc, d: int, index: int = C.VFIO_PCI_MSI_IRQ_INDEX) -> object:
    efd, ev = p.p.eventfd()
    irq = S.VFIO_IRQ_SET.pack(argsz=24, flags=C.VFIO_IRQ_SET_DATA_EVENTFD | C.VFIO_IRQ_SET_ACTION_TRIGGER,
                              index=index, start=0, count=1) + struct.pack("<i", efd)
    p.ioctl(d, IO.VFIO_DEVICE_SET_IRQS, p.buf(irq))
    return ev


def program(p: Proc, d: int, src: int, dst: int, length: int, cmd: int = R.CMD_COPY,
            split: bool = False) -> None:
    if split:  # 8-byte registers as two 4-byte halves, high half first
        for reg, v in ((R.REG_SRC, src), (R.REG_DST, dst)):
            reg_write(p, d, reg + 4, v >> 32)
            reg_write(p, d, reg, v & 0xFFFFFFFF)
    else:
        reg_write(p, d, R.REG_SRC, src, 8)
        reg_write(p, d, R.REG_DST, dst, 8)
    reg_write(p, d, R.REG_LEN, length)
    reg_write(p, d, R.REG_COMMAND, cmd)


@pytest.mark.parametrize("split", [False, True])
def test_engine_copy_through_iommufd_raises_msi(split: bool) -> None:
    r = Rig()
    p = r.p
    ifd, d, ioas = iommufd_attached(r)
    assert reg_read(p, d, R.REG_ID) == R.ENGINE_ID
    assert reg_read(p, d, R.REG_VERSION) == 1
    src = p.p.alloc(bytes(range(256)) * 32)
    dst = p.p.alloc(2 * PAGE)
    ioas_map(p, ifd, ioas, src, 2 * PAGE, 0x1_0000_0000, flags=C.IOMMU_IOAS_MAP_READABLE)
    ioas_map(p, ifd, ioas, dst, 2 * PAGE, 0x2_0000_0000, flags=C.IOMMU_IOAS_MAP_WRITEABLE)
    ev = msi_eventfd(p, d)
    bus_master(p, d)
    program(p, d, 0x1_0000_0000 + 16, 0x2_0000_0000 + 100, 5000, split=split)
    assert ev.counter == 1  # type: ignore[attr-defined]
    assert reg_read(p, d, R.REG_STATUS) == R.STATUS_DONE
    assert reg_read(p, d, R.REG_COMPLETED) == 1
    assert p.p.peek(dst + 100, 5000) == (bytes(range(256)) * 32)[16:5016]
    assert p.p.peek(dst + 99, 1) == b"\0" and p.p.peek(dst + 5100, 1) == b"\0"
    assert reg_read(p, d, R.REG_COMMAND) == 0
    # W1C
    reg_write(p, d, R.REG_STATUS, R.STATUS_DONE)
    assert reg_read(p, d, R.REG_STATUS) == 0
    r.check()


def test_engine_fill_and_intx() -> None:
    r = Rig()
    p = r.p
    _g, c, d = legacy_container(r)
    dst = p.p.alloc(PAGE)
    map_dma(p, c, dst, PAGE, 0x40000)
    ev = msi_eventfd(p, d, C.VFIO_PCI_INTX_IRQ_INDEX)
    bus_master(p, d)
    reg_write(p, d, R.REG_PATTERN, 0x44332211)
    program(p, d, 0, 0x40000 + 1, 10, cmd=R.CMD_FILL)
    assert p.p.peek(dst, 12) == b"\0" + bytes([0x11, 0x22, 0x33, 0x44]) * 2 + b"\x11\x22\0"
    assert reg_read(p, d, R.REG_STATUS) == R.STATUS_DONE
    assert ev.counter == 1  # type: ignore[attr-defined]


def test_engine_fault_sets_status_and_still_interrupts() -> None:
    r = Rig()
    p = r.p
    ifd, d, ioas = iommufd_attached(r)
    src = p.p.alloc(b"s" * PAGE)
    ioas_map(p, ifd, ioas, src, PAGE, 0x100000, flags=C.IOMMU_IOAS_MAP_READABLE)
    ev = msi_eventfd(p, d)
    bus_master(p, d)
    # destination read-only
    program(p, d, 0x100000, 0x100000, 16)
    assert reg_read(p, d, R.REG_STATUS) == R.STATUS_DONE | R.STATUS_FAULT
    assert reg_read(p, d, R.REG_FAULT_REASON) == R.FAULT_CODES["permission"]
    assert reg_read(p, d, R.REG_FAULT_IOVA, 8) == 0x100000
    assert reg_read(p, d, R.REG_COMPLETED) == 0
    assert ev.counter == 1  # type: ignore[attr-defined]
    assert p.p.peek(src, 1) == b"s"
    # unmapped source
    reg_write(p, d, R.REG_STATUS, 0xFFFFFFFF)
    program(p, d, 0x100000 + PAGE - 4, 0x900000, 16)
    assert reg_read(p, d, R.REG_STATUS) == R.STATUS_DONE | R.STATUS_FAULT
    assert reg_read(p, d, R.REG_FAULT_REASON) == R.FAULT_CODES["unmapped"]
    assert reg_read(p, d, R.REG_FAULT_IOVA, 8) == 0x100000 + PAGE
    # a bad command or length: ERROR, no fault record
    n = len(r.k.dma.faults)
    reg_write(p, d, R.REG_STATUS, 0xFFFFFFFF)
    program(p, d, 0x100000, 0x100000, 0)
    assert reg_read(p, d, R.REG_STATUS) == R.STATUS_DONE | R.STATUS_ERROR
    reg_write(p, d, R.REG_STATUS, 0xFFFFFFFF)
    program(p, d, 0x100000, 0x100000, 4, cmd=7)
    assert reg_read(p, d, R.REG_STATUS) == R.STATUS_DONE | R.STATUS_ERROR
    assert len(r.k.dma.faults) == n
    assert ev.counter == 4  # type: ignore[attr-defined]


def test_engine_needs_bus_master() -> None:
    r = Rig()
    p = r.p
    ifd, d, ioas = iommufd_attached(r)
    buf = p.p.alloc(b"x" * PAGE)
    ioas_map(p, ifd, ioas, buf, PAGE, 0x100000)
    bus_master(p, d, False)
    program(p, d, 0x100000, 0x100000 + 8, 4)
    assert reg_read(p, d, R.REG_STATUS) == R.STATUS_DONE | R.STATUS_FAULT
    assert reg_read(p, d, R.REG_FAULT_REASON) == R.FAULT_CODES["bus-master"]
    assert r.k.dma.faults[-1].reason == "bus-master"


def test_engine_registers_reset_with_the_function() -> None:
    r = Rig()
    p = r.p
    _ifd, d, _ioas = iommufd_attached(r)
    reg_write(p, d, R.REG_SRC, 0x1234, 8)
    reg_write(p, d, R.REG_ID, 0)  # read-only
    assert reg_read(p, d, R.REG_ID) == R.ENGINE_ID
    assert reg_read(p, d, R.REG_SRC, 8) == 0x1234
    assert reg_read(p, d, 0x100) == 0  # past the register block
    p.ioctl(d, IO.VFIO_DEVICE_RESET, 0)
    assert reg_read(p, d, R.REG_SRC, 8) == 0
    assert reg_read(p, d, R.REG_ID) == R.ENGINE_ID
    # other BARs are RAM
    p.write(d, (2 << 40) + 8, b"ram!")
    assert p.read(d, (2 << 40) + 8, 4) == b"ram!"


def test_engine_interrupts_msix_vector_0_and_nothing_when_none_is_set() -> None:
    r = Rig()
    p = r.p
    ifd, d, ioas = iommufd_attached(r)
    buf = p.p.alloc(b"q" * PAGE)
    ioas_map(p, ifd, ioas, buf, PAGE, 0x100000)
    bus_master(p, d)
    program(p, d, 0x100000, 0x100000 + 64, 8)  # no trigger set: completes silently
    assert reg_read(p, d, R.REG_STATUS) == R.STATUS_DONE
    ev = msi_eventfd(p, d, C.VFIO_PCI_MSIX_IRQ_INDEX)
    program(p, d, 0x100000, 0x100000 + 128, 8)
    assert ev.counter == 1  # type: ignore[attr-defined]
    assert p.p.peek(buf + 128, 8) == b"q" * 8
    assert reg_read(p, d, R.REG_COMPLETED) == 2
