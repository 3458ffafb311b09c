"""Shared builders for the kernel-model tests: a Kernel on a fixture topology
plus processes, and short helpers that make one VFIO call each."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from fakedev.kernel.errors import KernelError
from fakedev.kernel.file import File
from fakedev.kernel.kernel import Kernel
from fakedev.kernel.testing import FakeProcess, FakeTask
from fakedev.kernel.version import KernelVersion
from fakedev.uapi import consts as C
from fakedev.uapi import ioctls as IO
from fakedev.uapi import structs as S
from tests.kernel import topologies as T

VERSIONS = ("6.6", "6.12")


class Proc:
    """A FakeProcess with one task and helpers that call the model through its fds."""

    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.p = FakeProcess()
        self.t: FakeTask = self.p.task()

    # -- fds --------------------------------------------------------------------
    def open(self, path: str) -> int:
        return self.p.install(self.k.open(path, self.t))

    def close(self, fd: int) -> None:
        self.p.close(fd)

    def file(self, fd: int) -> File:
        f = self.p.fds[fd]
        assert isinstance(f, File)
        return f

    def ioctl(self, fd: int, cmd: int, arg: int) -> int:
        return self.file(fd).ioctl(self.t, cmd, arg)

    def buf(self, data: bytes | int) -> int:
        return self.p.alloc(data)

    def read(self, fd: int, off: int, n: int) -> bytes:
        return self.file(fd).read(self.t, off, n)

    def write(self, fd: int, off: int, data: bytes) -> int:
        return self.file(fd).write(self.t, off, data)

    # -- calls ------------------------------------------------------------------
    def bind(self, dfd: int, ifd: int, argsz: int = 16, flags: int = 0) -> int:
        a = self.buf(S.VFIO_DEVICE_BIND_IOMMUFD.pack(argsz=argsz, flags=flags, iommufd=ifd))
        self.ioctl(dfd, IO.VFIO_DEVICE_BIND_IOMMUFD, a)
        return S.VFIO_DEVICE_BIND_IOMMUFD.unpack(self.p.peek(a, 24))["out_devid"]

    def cdev_bound(self, index: int, ifd: int) -> tuple[int, int]:
        dfd = self.open(f"vfio/devices/vfio{index}")
        return dfd, self.bind(dfd, ifd)

    def ioas_alloc(self, ifd: int) -> int:
        a = self.buf(S.IOMMU_IOAS_ALLOC.pack(size=12))
        self.ioctl(ifd, IO.IOMMU_IOAS_ALLOC, a)
        return S.IOMMU_IOAS_ALLOC.unpack(self.p.peek(a, 12))["out_ioas_id"]

    def attach(self, dfd: int, pt_id: int, argsz: int = 12, flags: int = 0) -> int:
        a = self.buf(S.VFIO_DEVICE_ATTACH_IOMMUFD_PT.pack(argsz=argsz, flags=flags, pt_id=pt_id))
        self.ioctl(dfd, IO.VFIO_DEVICE_ATTACH_IOMMUFD_PT, a)
        return S.VFIO_DEVICE_ATTACH_IOMMUFD_PT.unpack(self.p.peek(a, 16))["pt_id"]

    def detach(self, dfd: int, argsz: int = 8, flags: int = 0) -> None:
        a = self.buf(S.VFIO_DEVICE_DETACH_IOMMUFD_PT.pack(argsz=argsz, flags=flags))
        self.ioctl(dfd, IO.VFIO_DEVICE_DETACH_IOMMUFD_PT, a)

    def hot_reset_info(self, dfd: int, argsz: int = 12 + 8 * 8) -> tuple[int, dict[str, int], list[tuple[int, int, int, int]]]:
        """(errno or 0, header, entries written) — entries read for the header's count."""
        size = max(argsz, 12)
        a = self.buf(b"\xa5" * (size + 64))
        self.p.poke(a, struct.pack("<III", argsz, 0x5A5A, 0x5A5A))
        err = 0
        try:
            self.ioctl(dfd, IO.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, a)
        except KernelError as e:
            err = e.errno
        hdr = S.VFIO_PCI_HOT_RESET_INFO.unpack(self.p.peek(a, 12))
        ents = []
        for i in range(min(hdr["count"], 16)):
            raw = self.p.peek(a + 12 + 8 * i, 8)
            if raw == b"\xa5" * 8:
                break
            e = S.VFIO_PCI_DEPENDENT_DEVICE.unpack(raw)
            ents.append((e["devid"], e["segment"], e["bus"], e["devfn"]))
        return err, hdr, ents

    def hot_reset(self, dfd: int, group_fds: list[int] | None = None, count: int | None = None,
                  argsz: int | None = None, flags: int = 0) -> int:
        fds = group_fds or []
        n = len(fds) if count is None else count
        data = S.VFIO_PCI_HOT_RESET.pack(argsz=argsz if argsz is not None else 12 + 4 * len(fds),
                                         flags=flags, count=n)
        data += b"".join(struct.pack("<i", fd) for fd in fds)
        return self.ioctl(dfd, IO.VFIO_DEVICE_PCI_HOT_RESET, self.buf(data))

    def group_setup(self, gid: int, container: int | None = None, set_iommu: bool = True) -> tuple[int, int]:
        """Open /dev/vfio/<gid>, attach it to ``container`` (or a new one), SET_IOMMU(TYPE1v2)."""
        g = self.open(f"vfio/{gid}")
        c = container if container is not None else self.open("vfio/vfio")
        self.ioctl(g, IO.VFIO_GROUP_SET_CONTAINER, self.buf(struct.pack("<i", c)))
        if set_iommu and container is None:
            self.ioctl(c, IO.VFIO_SET_IOMMU, C.VFIO_TYPE1v2_IOMMU)
        return g, c

    def get_device_fd(self, gfd: int, name: str) -> int:
        return self.ioctl(gfd, IO.VFIO_GROUP_GET_DEVICE_FD, self.buf(name.encode() + b"\0"))


class Rig:
    """A Kernel on a fixture topology, with processes made on demand."""

    def __init__(self, topology: str, version: str = "6.12") -> None:
        self.topo = T.build(topology)
        self.k = Kernel(self.topo, KernelVersion.parse(version))
        self.procs: dict[str, Proc] = {}

    def __getitem__(self, name: str) -> Proc:
        if name not in self.procs:
            self.procs[name] = Proc(self.k)
        return self.procs[name]

    def check(self) -> None:
        assert self.k.check_invariants() == []


def errno_of(fn: Callable[[], object]) -> int:
    """The errno ``fn`` fails with (0 if it succeeds)."""
    try:
        fn()
    except KernelError as e:
        return e.errno
    return 0


@pytest.fixture
def rig_factory() -> Callable[..., Rig]:
    return Rig
