"""Device DMA on the host: HostDmaMemory over real memory and a real memfd,
the model driven with a task whose memory and foreign fds are this process's
(so MAP_FILE holds a real dup of the memfd, closed when the mapping goes),
and the dma-read / dma-write control commands."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from fakedev.host.control import ControlError, run_command
from fakedev.host.dma import HostDmaMemory, attach_dma_memory, device_name
from fakedev.host.proc import HostContext, HostForeignFile, ProcessTask, check_mapped
from fakedev.kernel.dma import DmaPiece
from fakedev.kernel.errors import KernelError
from fakedev.kernel.file import File
from fakedev.kernel.task import ForeignFile, ForeignKind
from fakedev.kernel.vfio.pci import dma_engine as R
from fakedev.tree import load_tree
from fakedev.tree.loader import FIXTURES
from fakedev.uapi import consts as C
from fakedev.uapi import ioctls as IO
from fakedev.uapi import structs as S

PAGE = 4096
BDF = "0000:03:00.0"


def addr_of(m: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def open_fds() -> set[int]:
    return {int(x) for x in os.listdir("/proc/self/fd")}


class SelfTask:
    """A model Task that is this process: real memory, real foreign fds, model Files by number."""

    def __init__(self) -> None:
        self._real = ProcessTask(threading.get_native_id(), HostContext(lambda fh: None), on_loop=False)
        self.files: dict[int, File] = {}
        self._next = 10_000

    @property
    def pid(self) -> int:
        return os.getpid()

    @property
    def tid(self) -> int:
        return threading.get_native_id()

    def read(self, addr: int, size: int) -> bytes:
        return self._real.read(addr, size)

    def write(self, addr: int, data: bytes) -> None:
        self._real.write(addr, data)

    def pin_pages(self, addr: int, length: int, write: bool) -> None:
        check_mapped(self.pid, addr, length, write)

    def fget(self, fd: int) -> File | ForeignFile:
        if fd in self.files:
            return self.files[fd]
        return self._real.fget(fd)

    def capable(self, cap: int) -> bool:
        return True

    def fd_install(self, file: File) -> int:
        self._next += 1
        self.files[self._next] = file
        return self._next

    # helpers
    def open(self, kernel: Any, path: str) -> int:
        return self.fd_install(kernel.open(path, self))

    def ioctl(self, fd: int, cmd: int, arg: int) -> int:
        return self.files[fd].ioctl(self, cmd, arg)

    def struct(self, data: bytes) -> tuple[mmap.mmap, int]:
        m = mmap.mmap(-1, PAGE)
        m[:len(data)] = data
        return m, addr_of(m)


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("dma-test")
    os.ftruncate(fd, 4 * PAGE)
    yield fd
    os.close(fd)


def test_host_memory_reads_and_writes_process_memory() -> None:
    m = mmap.mmap(-1, 2 * PAGE)
    m[:5] = b"hello"
    mem = HostDmaMemory()
    a = addr_of(m)
    assert mem.read(DmaPiece(0, 5, 3, os.getpid(), a, None)) == b"hello"
    mem.write(DmaPiece(0, 3, 3, os.getpid(), a + PAGE - 1, None), b"xyz")
    assert m[PAGE - 1:PAGE + 2] == b"xyz"
    with pytest.raises(KernelError) as e:
        mem.read(DmaPiece(0, 4, 3, os.getpid(), 0x10, None))
    assert e.value.errno == errno.EFAULT
    with pytest.raises(KernelError):
        mem.read(DmaPiece(0, 4, 3, 0, a, None))


def test_host_memory_file_pieces(memfd: int) -> None:
    os.pwrite(memfd, b"in the file", PAGE)
    f = HostForeignFile(os.dup(memfd), ForeignKind.OTHER)
    mem = HostDmaMemory()
    try:
        assert mem.read(DmaPiece(0, 11, 3, 1, PAGE, f)) == b"in the file"
        mem.write(DmaPiece(0, 3, 3, 1, 2 * PAGE, f), b"dev")
        assert os.pread(memfd, 3, 2 * PAGE) == b"dev"
        for op in (lambda: mem.read(DmaPiece(0, 8, 3, 1, 4 * PAGE - 4, f)),
                   lambda: mem.write(DmaPiece(0, 8, 3, 1, 4 * PAGE - 4, f), b"12345678")):
            with pytest.raises(KernelError) as e:
                op()
            assert e.value.errno == errno.EFAULT
        assert os.fstat(memfd).st_size == 4 * PAGE  # a DMA never grows the file
    finally:
        f.close()
    with pytest.raises(KernelError):
        mem.read(DmaPiece(0, 1, 3, 1, 0, f))  # closed


def test_model_dma_engine_with_real_memory_and_map_file(memfd: int) -> None:
    k = load_tree(FIXTURES / "dma-engine.toml").make_kernel()
    attach_dma_memory(k)
    assert isinstance(k.dma_memory, HostDmaMemory)
    t = SelfTask()
    ifd = t.open(k, "iommu")
    dfd = t.open(k, "vfio/devices/vfio0")
    _b, a = t.struct(S.VFIO_DEVICE_BIND_IOMMUFD.pack(argsz=16, iommufd=ifd))
    t.ioctl(dfd, IO.VFIO_DEVICE_BIND_IOMMUFD, a)
    _i, a = t.struct(S.IOMMU_IOAS_ALLOC.pack(size=12))
    t.ioctl(ifd, IO.IOMMU_IOAS_ALLOC, a)
    ioas = S.IOMMU_IOAS_ALLOC.unpack(_i[:12])["out_ioas_id"]
    _at, a = t.struct(S.VFIO_DEVICE_ATTACH_IOMMUFD_PT.pack(argsz=12, pt_id=ioas))
    t.ioctl(dfd, IO.VFIO_DEVICE_ATTACH_IOMMUFD_PT, a)
    src = mmap.mmap(-1, PAGE)
    src[:PAGE] = bytes(range(256)) * 16
    rw = C.IOMMU_IOAS_MAP_FIXED_IOVA | C.IOMMU_IOAS_MAP_READABLE | C.IOMMU_IOAS_MAP_WRITEABLE
    _m, a = t.struct(S.IOMMU_IOAS_MAP.pack(size=40, flags=rw, ioas_id=ioas, user_va=addr_of(src),
                                           length=PAGE, iova=0x100000))
    t.ioctl(ifd, IO.IOMMU_IOAS_MAP, a)
    before = open_fds()
    _f, a = t.struct(S.IOMMU_IOAS_MAP_FILE.pack(size=40, flags=rw, ioas_id=ioas, fd=memfd, start=PAGE,
                                                length=2 * PAGE, iova=0x200000))
    t.ioctl(ifd, IO.IOMMU_IOAS_MAP_FILE, a)
    held = open_fds() - before
    assert len(held) == 1  # the mapping holds a dup of the memfd
    # program the engine through BAR0 region writes: copy memory -> file
    dev = t.files[dfd]
    cfg = C.VFIO_PCI_CONFIG_REGION_INDEX << 40
    command = int.from_bytes(dev.read(t, cfg + 4, 2), "little") | 4
    dev.write(t, cfg + 4, command.to_bytes(2, "little"))
    dev.write(t, R.REG_SRC, struct.pack("<Q", 0x100000 + 10))
    dev.write(t, R.REG_DST, struct.pack("<Q", 0x200000 + PAGE - 50))
    dev.write(t, R.REG_LEN, struct.pack("<I", 100))
    dev.write(t, R.REG_COMMAND, struct.pack("<I", R.CMD_COPY))
    assert int.from_bytes(dev.read(t, R.REG_STATUS, 4), "little") == R.STATUS_DONE
    assert os.pread(memfd, 100, 2 * PAGE - 50) == src[10:110]
    # and back: the file into memory, through the external API
    assert k.dma_read(BDF, 0x200000 + PAGE - 50, 100) == src[10:110]
    k.dma_write(BDF, 0x100000, b"from the device")
    assert src[:15] == b"from the device"
    # unmapping the file drops the server's dup
    _u, a = t.struct(S.IOMMU_IOAS_UNMAP.pack(size=24, ioas_id=ioas, iova=0x200000, length=2 * PAGE))
    t.ioctl(ifd, IO.IOMMU_IOAS_UNMAP, a)
    assert not (open_fds() & held)
    # so does releasing the context with a file mapping in place
    t.ioctl(ifd, IO.IOMMU_IOAS_MAP_FILE, addr_of(_f))
    assert len(open_fds() - before) == 1
    for fd in sorted(t.files, reverse=True):
        t.files.pop(fd).release()
    assert open_fds() - before == set()
    assert k.check_invariants() == []


class _Server:
    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel


def test_control_commands() -> None:
    k = load_tree(FIXTURES / "dma-engine.toml").make_kernel()
    srv: Any = _Server(k)
    mem = mmap.mmap(-1, PAGE)

    class Mem:
        def read(self, piece: DmaPiece) -> bytes:
            return bytes(mem[piece.addr:piece.addr + piece.length])

        def write(self, piece: DmaPiece, data: bytes) -> None:
            mem[piece.addr:piece.addr + len(data)] = data

    k.dma_memory = Mem()
    # blocked: the device is not attached
    with pytest.raises(KernelError) as e:
        run_command(srv, "dma-read 03:00.0 0x1000 4")
    assert e.value.errno == errno.EFAULT
    assert k.describe()["dma"]["fault_counts"] == {"blocked": 1}
    for bad in ("dma-read 0000:03:00.0 0x1000", "dma-read 0000:09:00.0 0 4", "dma-read vfio0 zz 4",
                "dma-read vfio0 0 0", "dma-write vfio0 0 abc", "dma-write vfio0 0 -1"):
        with pytest.raises(ControlError):
            run_command(srv, bad)
    assert device_name("03:00.0") == BDF and device_name("vfio0") == "vfio0"


def test_control_commands_reach_memory() -> None:
    """dma-write then dma-read through an attached IOAS, against a fake memory."""
    from tests.kernel.test_dma import Rig, ioas_map, iommufd_attached

    r = Rig()
    ifd, _d, ioas = iommufd_attached(r)
    buf = r.p.p.alloc(PAGE)
    ioas_map(r.p, ifd, ioas, buf, PAGE, 0x100000)
    srv: Any = _Server(r.k)
    assert run_command(srv, "dma-write vfio0 0x100010 c0ffee") == "wrote 3 bytes\n"
    assert r.p.p.peek(buf + 16, 3) == b"\xc0\xff\xee"
    assert run_command(srv, f"dma-read {BDF} 0x10000f 5") == "00c0ffee00\n"
