"""The seccomp supervisor's handler for fakedev: GROUP_GET_DEVICE_FD and stat mode.

What lives here: ``DeviceFdHandler`` (the legacy group path's
VFIO_GROUP_GET_DEVICE_FD, which must create an fd in the caller), ``NodeStat``
(stat mode: a node of our mount stats as ``S_IFCHR`` with the ``DevNode``'s
major, minor and mode), ``VfioHandler`` combining them, and
``start_supervised`` which starts a program under a supervisor in a caller's
nursery. What must not: VFIO rules (the model decides everything, errors
included; here only fds and identities are moved around) and any access to
the mount from the trio loop thread (the loop serves that mount).

GROUP_GET_DEVICE_FD. The supervisor traps the ioctl before it reaches FUSE.
The caller's fd is copied (pidfd_getfd) and identified: not one of our group
files -> CONTINUE, the call runs as made (FUSE or the real kernel answer it).
For one of our groups: open ``<mount>/.fakedev/devfd`` here (an fh with no
model file yet), then, under the server's model lock and only while the
caller is still waiting, run the model's group ioctl with a task whose
``fd_install(file)`` binds the new device File to that fh
(``Server.bind_fh``). The supervisor then installs our fd in the caller
(SECCOMP_IOCTL_NOTIF_ADDFD) and the ioctl returns its number; the caller's
later calls on it go through FUSE to that File. A model error is the ioctl's
errno and the devfd open is closed unbound. With the server's trace on, each
answered call is recorded through the server's ``Tracer`` (caller, group fd,
device name, the new fd's number and open, or the errno), like the calls
FUSE serves. The copy of the caller's group fd
is held until the model call is over, so the group file cannot be released
under it (as the kernel's fdget holds it).

Stat mode. FUSE serves the nodes as regular files: an ``S_IFCHR`` FUSE inode
would be opened through the host's real char driver for that major:minor.
Upstream QEMU's ``open_cdev`` (cdev path with ``host=``) reads
``vfio-dev/vfioN/dev`` in sysfs, opens ``/dev/vfio/devices/vfioN`` and gives
up unless ``fstat`` says ``S_ISCHR`` with ``st_rdev == MAJ:MIN``. In stat mode
the supervisor traps every stat call of the supervised tree; ``NodeStat``
answers those about our nodes (``st_dev`` is our FUSE mount's and
``Server.devnode_for_ino`` names a node at ``st_ino``; bind mounts at /dev
keep the FUSE inode), everything else runs as the caller made it. Every stat
of the tree pays the trap, so stat mode is for programs that need it.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import trio

from fakedev.host.proc import ProcessTask, fd_dev, identify, pidfd_getfd
from fakedev.host.server import DEVFD_PATH, Server
from fakedev.host.supervisor import (
    Call,
    CharDevice,
    Continue,
    Decision,
    Error,
    FilterConfig,
    Handler,
    InstallFd,
    StatTarget,
    Supervisor,
)
from fakedev.kernel.errors import KernelError
from fakedev.kernel.file import DevNode, File
from fakedev.kernel.task import ForeignFile
from fakedev.uapi.ioctls import VFIO_GROUP_GET_DEVICE_FD, FileKind


class _BindingTask:
    """The caller's task for the model's GROUP_GET_DEVICE_FD, except that
    ``fd_install`` binds the new File to our devfd open instead."""

    def __init__(self, task: ProcessTask, server: Server, fh: int) -> None:
        self._task = task
        self._server = server
        self._fh = fh
        self.bound: File | None = None

    @property
    def pid(self) -> int:
        return self._task.pid

    @property
    def tid(self) -> int:
        return self._task.tid

    def read(self, addr: int, size: int) -> bytes:
        return self._task.read(addr, size)

    def write(self, addr: int, data: bytes) -> None:
        self._task.write(addr, data)

    def pin_pages(self, addr: int, length: int, write: bool) -> None:
        self._task.pin_pages(addr, length, write)

    def fget(self, fd: int) -> File | ForeignFile:
        return self._task.fget(fd)

    def capable(self, cap: int) -> bool:
        return self._task.capable(cap)

    def fd_install(self, file: File) -> int:
        if self.bound is not None:
            raise KernelError(errno.EMFILE, "one fd per call")
        self._server.bind_fh(self._fh, file)
        self.bound = file
        return 0  # the caller's number comes from the supervisor's ADDFD


class DeviceFdHandler:
    """Supervisor handler: VFIO_GROUP_GET_DEVICE_FD on our group files (see module doc)."""

    def __init__(self, server: Server, mountpoint: str | Path) -> None:
        self.server = server
        self.devfd = Path(mountpoint) / DEVFD_PATH
        self.installed = 0

    def on_stat(self, call: Call, target: StatTarget) -> Decision:
        return Continue()

    async def on_ioctl(self, call: Call, fd: int, cmd: int, arg: int) -> Decision:
        if cmd != VFIO_GROUP_GET_DEVICE_FD:
            return Continue()
        pinned = await trio.to_thread.run_sync(self._pin_group, call.tid, fd)
        if pinned is None:
            return Continue()  # not one of our groups: the call runs as made
        copy, group, group_fh = pinned
        local = -1
        tracer = self.server.tracer
        try:
            local = await trio.to_thread.run_sync(os.open, self.devfd, os.O_RDWR | os.O_CLOEXEC)
            fh = await trio.to_thread.run_sync(identify, local)
            if fh < 0:
                raise OSError(-fh, f"identity of {self.devfd}")
            async with self.server.lock:
                if not call.is_valid():
                    return Continue()  # the caller is gone: nobody reads the answer
                caller = ProcessTask(call.tid, self.server.ctx, False)
                traced = tracer.enabled
                name = tracer.device_name(caller, arg) if traced else None
                task = _BindingTask(caller, self.server, fh)
                try:
                    await trio.to_thread.run_sync(
                        self.server.model_ioctl, group, task, VFIO_GROUP_GET_DEVICE_FD, arg
                    )
                except KernelError as exc:
                    if traced:
                        tracer.device_fd(call.tid, fd, group_fh, group, name, None, None, None, exc.errno)
                    return Error(exc.errno)
            if task.bound is None:
                if traced:
                    tracer.device_fd(call.tid, fd, group_fh, group, name, None, None, None, errno.EIO)
                return Error(errno.EIO)  # the model returned without a file
            ours, local = local, -1
            self.installed += 1
            if not traced:
                return InstallFd(ours, cloexec=True)
            device = task.bound

            def installed(number: int) -> None:
                """The caller's new fd (or -errno): the record of the call."""
                if number >= 0:
                    tracer.device_fd(call.tid, fd, group_fh, group, name, fh, device, number, None)
                else:
                    tracer.device_fd(call.tid, fd, group_fh, group, name, fh, device, None, -number)

            return InstallFd(ours, cloexec=True, installed=installed)
        finally:
            with trio.CancelScope(shield=True):  # closed even when cancelled
                if local >= 0:  # unbound: its release just drops the fh
                    await trio.to_thread.run_sync(os.close, local)
                await trio.to_thread.run_sync(os.close, copy)

    def _pin_group(self, tid: int, fd: int) -> tuple[int, File, int] | None:
        """Worker thread: a copy of the caller's ``fd``, its File and fh, if it
        is one of our group files; the copy keeps it open until we are done."""
        mount_dev = self.server.ctx.mount_dev
        if mount_dev is None or fd < 0:
            return None
        task = ProcessTask(tid, self.server.ctx, False)
        try:
            copy = pidfd_getfd(tid, fd, lambda: task.pid)
        except KernelError:
            return None  # no such fd, or the caller is gone: the kernel answers
        try:
            if fd_dev(copy) == mount_dev:
                fh = identify(copy)
                f = self.server.ctx.file_for_fh(fh) if fh >= 0 else None
                if f is not None and getattr(f, "kind", None) is FileKind.GROUP:
                    return copy, f, fh
        except BaseException:
            os.close(copy)
            raise
        os.close(copy)
        return None


class ServedNodes(Protocol):
    """What stat mode needs of the FUSE server (``fakedev.host.server.Server``)."""

    @property
    def ctx(self) -> _MountDev: ...

    def devnode_for_ino(self, ino: int) -> DevNode | None: ...


class _MountDev(Protocol):
    @property
    def mount_dev(self) -> tuple[int, int] | None: ...


class NodeStat:
    """The ``on_stat`` of stat mode: our nodes are char devices, the rest is untouched."""

    def __init__(self, server: ServedNodes) -> None:
        self.server = server

    def devnode(self, target: StatTarget) -> DevNode | None:
        """The node ``target`` is, if it is one of the mount's device nodes."""
        mount_dev = self.server.ctx.mount_dev
        if mount_dev is None or target.st_dev != os.makedev(*mount_dev):
            return None
        dn = self.server.devnode_for_ino(target.st_ino)
        if dn is None or dn.major == 0:  # major 0: a hidden node, not a device
            return None
        return dn

    def on_stat(self, call: Call, target: StatTarget) -> Decision:
        dn = self.devnode(target)
        if dn is None:
            return Continue()
        return CharDevice(dn.major, dn.minor, dn.mode & 0o7777)


class StatModeHandler:
    """A supervisor ``Handler``: stats answered by ``NodeStat``, ioctls by
    ``inner`` (CONTINUE when there is none)."""

    def __init__(self, server: ServedNodes, inner: Handler | None = None) -> None:
        self.nodes = NodeStat(server)
        self.inner = inner

    def on_ioctl(self, call: Call, fd: int, cmd: int, arg: int) -> Decision | Awaitable[Decision]:
        if self.inner is None:
            return Continue()
        return self.inner.on_ioctl(call, fd, cmd, arg)

    def on_stat(self, call: Call, target: StatTarget) -> Decision:
        return self.nodes.on_stat(call, target)


def filter_config(*, ioctls: bool, stat_mode: bool) -> FilterConfig:
    """The filter for a supervised run: GROUP_GET_DEVICE_FD trapped when an
    ioctl handler is present, the stat calls in stat mode."""
    base = FilterConfig()
    return FilterConfig(ioctl_cmds=base.ioctl_cmds if ioctls else (), stat=stat_mode)


async def start_supervised(
    nursery: trio.Nursery,
    server: Server,
    cmd: Sequence[str],
    env: Mapping[str, str] | None = None,
    *,
    device_fds: bool = True,
    stat_mode: bool = False,
    **options: object,
) -> tuple[trio.Process, Supervisor]:
    """Start ``cmd`` under a supervisor served in ``nursery``.

    ``device_fds``: answer GROUP_GET_DEVICE_FD (the server must be mounted);
    ``stat_mode``: our nodes stat as char devices. The supervisor serves until
    the supervised tree is gone or ``nursery`` is cancelled; in stat mode it
    must outlive the tree (a stat without it fails with ENOSYS). ``options``
    go to ``trio.lowlevel.open_process`` (stdout, stderr, ...).
    """
    inner: Handler | None = None
    if device_fds:
        assert server.mountpoint is not None, "start the server first"
        inner = DeviceFdHandler(server, server.mountpoint)
    handler = StatModeHandler(server, inner)
    sup = Supervisor(handler, filter_config(ioctls=inner is not None, stat_mode=stat_mode))
    nursery.start_soon(sup.run)
    proc = await sup.start_process(list(cmd), env=None if env is None else dict(env), **options)
    return proc, sup
