"""A tiny stand-in for the kernel model, for serving tests.

``FakeKernel`` serves three nodes (a device, /dev/iommu and the container)
whose files implement just enough to exercise the server: a GET_INFO-like
ioctl (struct read and written in the caller's memory), BIND_IOMMUFD (an fd
inside the struct, resolved with ``task.fget``), SET_IRQS (an eventfd in the
payload, signalled), a slow PCI_HOT_RESET (runs in a worker), DEVICE_RESET
that raises an unexpected exception, and region reads/writes at
``index << 40``. Every open and release is recorded.

Run as a script (``python fakekernel.py MOUNTPOINT``) it serves until killed.
"""

from __future__ import annotations

import errno
import struct
import sys
import threading
import time
from typing import Any

from fakedev.kernel.errors import KernelError
from fakedev.kernel.file import DevNode, File
from fakedev.kernel.task import ForeignKind, Task
from fakedev.uapi import ioctls as I
from fakedev.uapi.ioctls import FileKind

DEVICE = "vfio/devices/vfio0"
IOMMU = "iommu"
CONTAINER = "vfio/vfio"



#: a command the uapi table does not know, so the server cannot know it takes
#: fds: the fake kernel looks one up anyway (the server's NeedsWorker re-run)
RETRY_CMD = 0x3B9F

class FakeIommu(File):
    kind = FileKind.IOMMUFD

    def __init__(self, k: FakeKernel, ctx_id: int) -> None:
        self.k = k
        self.ctx_id = ctx_id
        self.label = f"iommu{ctx_id}"

    def ioctl(self, task: Task, cmd: int, arg: int) -> int:
        if cmd == I.VFIO_GET_API_VERSION:
            return 0
        raise KernelError(errno.ENOTTY)

    def release(self) -> None:
        self.k.released.append(self.label)


class FakeContainer(File):
    kind = FileKind.CONTAINER
    label = "vfio"

    def __init__(self, k: FakeKernel) -> None:
        self.k = k

    def release(self) -> None:
        self.k.released.append(self.label)


class FakeDevice(File):
    kind = FileKind.DEVICE

    def __init__(self, k: FakeKernel, n: int) -> None:
        self.k = k
        self.label = f"vfio0#{n}"
        self.bound: FakeIommu | None = None
        self.regs = bytearray(4096)
        self.regs[0:4] = b"\x86\x80\x3a\x15"

    def ioctl(self, task: Task, cmd: int, arg: int) -> int:
        k = self.k
        k.calls += 1
        if cmd == I.VFIO_DEVICE_GET_INFO:  # vfio_ioctl_device_get_info's shape
            argsz, _ = struct.unpack("<II", task.read(arg, 8))
            if argsz < 16:
                raise KernelError(errno.EINVAL)
            task.write(arg, struct.pack("<IIII", 24, 0x2, 9, 5))
            return 0
        if cmd == I.VFIO_DEVICE_BIND_IOMMUFD:
            argsz, flags, fd, _ = struct.unpack("<IIiI", task.read(arg, 16))
            if argsz < 16 or flags:
                raise KernelError(errno.EINVAL)
            f = task.fget(fd)
            if not isinstance(f, FakeIommu):
                if not isinstance(f, File):
                    f.close()
                raise KernelError(errno.EBADF)
            task.write(arg + 12, struct.pack("<I", 1000 + f.ctx_id))
            self.bound = f
            k.binds.append((self.label, f.ctx_id))
            return 0
        if cmd == I.VFIO_DEVICE_SET_IRQS:
            _argsz, _flags, _index, _start, count = struct.unpack("<IIIII", task.read(arg, 20))
            fds = struct.unpack(f"<{count}i", task.read(arg + 20, 4 * count))
            got = [task.fget(fd) for fd in fds]
            for g in got:
                if isinstance(g, File) or g.kind is not ForeignKind.EVENTFD:
                    for h in got:
                        if not isinstance(h, File):
                            h.close()
                    raise KernelError(errno.EINVAL)
            for g in got:
                assert not isinstance(g, File)
                g.signal(1)
                g.close()
            return 0
        if cmd == I.VFIO_DEVICE_PCI_HOT_RESET:  # slow, in a worker thread
            k.resets_started += 1
            k.reset_threads.add(threading.get_ident())
            time.sleep(k.reset_delay)
            k.resets_done += 1
            return 0
        if cmd == I.VFIO_DEVICE_RESET:
            raise RuntimeError("model bug")
        if cmd == RETRY_CMD:  # not marked takes_fds (unknown to the table), yet looks up an fd
            (fd,) = struct.unpack("<i", task.read(arg, 4))
            f = task.fget(fd)
            k.feature_threads.add(threading.get_ident())
            if not isinstance(f, File):
                f.close()
                return 0
            return 1 if isinstance(f, FakeIommu) else 2
        raise KernelError(errno.ENOTTY)

    def poll(self) -> int:
        return 0x1 if self.k.readable else 0

    def read(self, task: Task, offset: int, size: int) -> bytes:
        index, off = offset >> 40, offset & ((1 << 40) - 1)
        if index != 7 or off + size > len(self.regs):
            raise KernelError(errno.EINVAL)
        return bytes(self.regs[off:off + size])

    def write(self, task: Task, offset: int, data: bytes) -> int:
        index, off = offset >> 40, offset & ((1 << 40) - 1)
        if index != 7 or off + len(data) > len(self.regs):
            raise KernelError(errno.EINVAL)
        self.regs[off:off + len(data)] = data
        return len(data)

    def release(self) -> None:
        self.k.released.append(self.label)


class FakeKernel:
    def __init__(self) -> None:
        self.opened: list[File] = []
        self.released: list[str] = []
        self.binds: list[tuple[str, int]] = []
        self.calls = 0
        self.resets_started = 0
        self.resets_done = 0
        self.reset_delay = 0.0
        self.reset_threads: set[int] = set()
        self.feature_threads: set[int] = set()
        self.readable = True
        self.open_pids: list[tuple[int, int]] = []

    def nodes(self) -> list[DevNode]:
        return [DevNode(DEVICE, 511, 0, 0o600), DevNode(IOMMU, 10, 123, 0o666),
                DevNode(CONTAINER, 10, 196, 0o666)]

    def open(self, path: str, task: Task) -> File:
        self.open_pids.append((task.pid, task.tid))
        f: File
        if path == DEVICE:
            f = FakeDevice(self, len(self.opened))
        elif path == IOMMU:
            f = FakeIommu(self, len(self.opened))
        elif path == CONTAINER:
            f = FakeContainer(self)
        else:
            raise KernelError(errno.ENODEV)
        self.opened.append(f)
        return f

    def describe(self) -> dict[str, Any]:
        return {"opened": len(self.opened), "released": len(self.released), "binds": self.binds}


if __name__ == "__main__":
    import trio

    from fakedev.host.server import Server

    k = FakeKernel()
    if len(sys.argv) > 2:
        k.reset_delay = float(sys.argv[2])

    async def main() -> None:
        async def announce(srv: Server) -> None:
            print("ready", flush=True)

        async with trio.open_nursery() as n:
            srv = await n.start(Server(k).serve, sys.argv[1])
            await announce(srv)

    trio.run(main)
