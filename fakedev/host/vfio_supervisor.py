"""Stat mode for fakedev's nodes: the seccomp supervisor reports them as char devices.

What lives here: ``NodeStat`` (the ``on_stat`` decision: a node of our mount
stats as ``S_IFCHR`` with the ``DevNode``'s major, minor and mode), the
``StatModeHandler`` that puts it in front of another supervisor handler (the
one answering GROUP_GET_DEVICE_FD, or none), and ``start_supervised`` which
starts a program under a supervisor in a caller's nursery. What must not: VFIO
rules (the model decides everything; here only identity is reported) and any
access to the mount from the trio loop thread (the loop serves that mount).

Why. FUSE serves the nodes as regular files: an ``S_IFCHR`` FUSE inode would
be opened through the host's real char driver for that major:minor, not
through FUSE. Upstream QEMU's ``open_cdev`` (cdev path with ``host=``) reads
``vfio-dev/vfioN/dev`` in sysfs, opens ``/dev/vfio/devices/vfioN`` and gives
up unless ``fstat`` says ``S_ISCHR`` with ``st_rdev == MAJ:MIN``. In stat mode
the supervisor traps every stat call of the supervised tree; this module
answers those about our nodes, everything else runs as the caller made it.

How a file is recognised as ours: the supervisor resolves the caller's path
(or fd) to ``st_dev``/``st_ino``; ``st_dev`` must be our FUSE mount's device and
``Server.devnode_for_ino`` must name a node at that inode. Bind mounts of the
nodes at /dev keep the FUSE inode, so /dev/vfio/... and the mount agree.
Cost: every stat of the tree pays the trap (see fakedev.host.supervisor), so
stat mode is for programs that need it.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Mapping, Sequence
from typing import Protocol

import trio

from fakedev.host.supervisor import (
    Call,
    CharDevice,
    Continue,
    Decision,
    FilterConfig,
    Handler,
    StatTarget,
    Supervisor,
)
from fakedev.kernel.file import DevNode


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
    server: ServedNodes,
    cmd: Sequence[str],
    env: Mapping[str, str] | None = None,
    *,
    inner: Handler | None = None,
    stat_mode: bool = True,
) -> tuple[trio.Process, Supervisor]:
    """Start ``cmd`` under a supervisor served in ``nursery``.

    ``inner`` answers the trapped ioctls (e.g. the GROUP_GET_DEVICE_FD handler);
    with ``stat_mode`` our nodes stat as char devices. The supervisor serves
    until the supervised tree is gone or ``nursery`` is cancelled; in stat mode
    it must outlive the tree (a stat without it fails with ENOSYS).
    """
    handler = StatModeHandler(server, inner)
    sup = Supervisor(handler, filter_config(ioctls=inner is not None, stat_mode=stat_mode))
    nursery.start_soon(sup.run)
    proc = await sup.start_process(list(cmd), env=None if env is None else dict(env))
    return proc, sup
