"""``fakedev run --supervise``: the legacy group path's GROUP_GET_DEVICE_FD.

That ioctl returns a *new* fd in the caller, which a FUSE server cannot
create. Here the seccomp supervisor (fakedev.host.supervisor) traps it before
it reaches FUSE; the handler runs the model's group ioctl for the caller, gets
the device File the model would install, opens it as one of *our* fds on the
mount (a hidden node whose open hands out that File), and the supervisor
installs our fd in the caller (SECCOMP_IOCTL_NOTIF_ADDFD), returning the new
number as the ioctl's result. The caller's later calls on that fd go through
FUSE like any other.

What lives here: the kernel proxy with the hidden node and the supervisor
handler. What must not: VFIO rules (the model decides everything, including
errors; a trapped call on a file that is not one of our group files is
resumed unchanged and answered as usual).
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Any

import trio

from fakedev.host.proc import HostForeignFile, ProcessTask
from fakedev.host.supervisor import Call, Continue, Decision, Error, InstallFd, StatTarget
from fakedev.kernel.errors import KernelError
from fakedev.kernel.file import DevNode, File
from fakedev.kernel.task import Task
from fakedev.uapi.ioctls import VFIO_GROUP_GET_DEVICE_FD, FileKind

ADOPT_NODE = ".adopt"  # at the mount's root; never placed under /dev


class AdoptingKernel:
    """``kernel`` plus a hidden node whose open returns the File set in
    ``pending`` (one at a time, under ``lock``)."""

    def __init__(self, kernel: Any) -> None:
        self._kernel = kernel
        self.pending: File | None = None
        self.lock = threading.Lock()

    def nodes(self) -> list[DevNode]:
        nodes: list[DevNode] = list(self._kernel.nodes())
        return [*nodes, DevNode(ADOPT_NODE, 0, 0, 0o600)]

    def open(self, path: str, task: Task) -> File:
        if path.strip("/") == ADOPT_NODE:
            f, self.pending = self.pending, None
            if f is None:
                raise KernelError(errno.ENXIO)
            return f
        opened: File = self._kernel.open(path, task)
        return opened

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kernel, name)


class _InstallingTask:
    """The caller's task, except that fd_install keeps the File for us."""

    def __init__(self, task: ProcessTask) -> None:
        self._task = task
        self.installed: File | None = None

    def fd_install(self, file: File) -> int:
        self.installed = file
        return 0  # the real number comes from the supervisor's install

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)


class DeviceFdHandler:
    """Supervisor handler: answers GROUP_GET_DEVICE_FD on our group files."""

    def __init__(self, server: Any, adopting: AdoptingKernel, mountpoint: Path) -> None:
        self.server = server
        self.adopting = adopting
        self.mountpoint = mountpoint

    async def on_ioctl(self, call: Call, fd: int, cmd: int, arg: int) -> Decision:
        if cmd != VFIO_GROUP_GET_DEVICE_FD:
            return Continue()
        async with self.server.lock:
            outcome = await trio.to_thread.run_sync(self._get_device_file, call.tid, fd, arg)
        if not isinstance(outcome, File):
            return outcome
        try:
            ours = await trio.to_thread.run_sync(self._adopt, outcome)
        except OSError as exc:
            outcome.release()
            return Error(exc.errno or errno.EIO)
        return InstallFd(ours, cloexec=True)

    def on_stat(self, call: Call, target: StatTarget) -> Decision:
        return Continue()

    def _get_device_file(self, tid: int, fd: int, arg: int) -> File | Decision:
        """Worker thread, server lock held: the model's group ioctl for the caller."""
        task = _InstallingTask(ProcessTask(tid, self.server.ctx, on_loop=False))
        try:
            f = task.fget(fd)
        except KernelError:
            return Continue()  # not an fd we can see: let the kernel answer
        if isinstance(f, HostForeignFile):
            f.close()
            return Continue()
        if f.kind is not FileKind.GROUP:
            return Continue()  # same number on another of our files: FUSE answers it
        try:
            f.ioctl(task, VFIO_GROUP_GET_DEVICE_FD, arg)
        except KernelError as exc:
            return Error(exc.errno)
        if task.installed is None:
            return Error(errno.EIO)
        return task.installed

    def _adopt(self, file: File) -> int:
        """Worker thread: open the hidden node, which hands out ``file``."""
        with self.adopting.lock:
            self.adopting.pending = file
            try:
                return os.open(self.mountpoint / ADOPT_NODE, os.O_RDWR | os.O_CLOEXEC)
            finally:
                self.adopting.pending = None
