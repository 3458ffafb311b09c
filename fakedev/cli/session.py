"""One ``fakedev run``: a trio nursery owning the FUSE server and the child.

Sequence: mount a private tmpfs (staging) -> start the server on
``staging/fuse`` -> in a worker thread (placement looks paths up on the FUSE
mount, which this thread's loop answers) generate the sysfs and put the nodes
and sysfs at the real paths -> run CMD -> cancel the server -> unmount staging.

The process is already inside its private namespace when this runs (see
fakedev.cli.main); every mount made here dies with it.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from fakedev.host import namespace

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
KILL_GRACE_SECONDS = 5.0


TERMINAL_SIGNALS = (signal.SIGINT, signal.SIGQUIT)


def _from_terminal() -> bool:
    """True when we are in the terminal's foreground process group: a Ctrl-C
    there already reached the child (same group), so it is not sent twice."""
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


class ServerStopped(Exception):
    """The FUSE server ended while the program was still running."""


def vfio_index_of(kernel: Any) -> dict[str, int]:
    """BDF name -> N of vfioN, for every vfio-pci function."""
    out: dict[str, int] = {}
    for vdev in kernel.vfio_devices():
        out[vdev.pdev.name] = vdev.index
    return out


def generate_sysfs_into(root: Path, tree: Any, kernel: Any) -> None:
    """Write the tree's sysfs under ``root`` (mirroring /sys)."""
    from fakedev.host.sysfs import generate_sysfs

    topology = getattr(tree, "topology", None)
    if topology is None:
        topology = kernel.topology
    generate_sysfs(root, topology, kernel.nodes(), vfio_index_of(kernel))


def unplace_node(rel: str, dev: Path = Path("/dev")) -> None:
    """A served node went (unplug): take its bind mount and placeholder out of
    our private ``dev`` (``rel`` as in ``DevNode.path``)."""
    target = dev / rel
    try:
        namespace.umount(target, namespace.MNT_DETACH)
    except OSError:
        pass
    try:
        target.unlink()
    except OSError:
        pass


class OwnedNodes:
    """``kernel`` with every node owned by ``uid``/``gid``: in rootless mode
    the caller stands where an administrator would have chowned the nodes to
    the user (as libvirt does for the VFIO nodes it hands to QEMU)."""

    def __init__(self, kernel: Any, uid: int, gid: int) -> None:
        self._kernel = kernel
        self._uid = uid
        self._gid = gid

    def nodes(self) -> list[Any]:
        return [attrs.evolve(n, uid=self._uid, gid=self._gid) for n in self._kernel.nodes()]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kernel, name)


@attrs.define
class RunSession:
    tree: Any
    kernel: Any
    server: Any
    cmd: Sequence[str]
    rootless: bool
    staging_root: Path
    stderr: Any = sys.stderr
    generate: Callable[[Path, Any, Any], None] = generate_sysfs_into
    returncode: int | None = None
    #: run CMD under the seccomp supervisor: GROUP_GET_DEVICE_FD answered
    supervise: bool = False
    #: ... and the served nodes stat as char devices (QEMU's open_cdev)
    stat_mode: bool = False
    _nursery: trio.Nursery | None = None
    _staging: namespace.Staging | None = None
    _scope: trio.CancelScope | None = None

    def _say(self, message: str) -> None:
        print(f"fakedev: {message}", file=self.stderr, flush=True)

    def _place(self) -> None:
        """Runs in a worker thread: mounts over /dev and /sys."""
        staging = self._staging
        assert staging is not None
        nodes = [(n.path, staging.fuse_dir / n.path) for n in self.kernel.nodes()]
        namespace.place_dev(staging, nodes, use_overlay=not self.rootless)
        self.generate(staging.sys_dir, self.tree, self.kernel)
        if hasattr(self.server, "sysfs_root"):  # unplugged devices leave both
            self.server.sysfs_root = staging.sys_dir
            self.server.node_removed_hooks.append(unplace_node)
        namespace.place_sysfs(staging, staging.sys_dir / "sys")

    async def run(self) -> int:
        try:
            self._staging = namespace.make_staging(self.staging_root)
        except OSError as exc:
            self._say(f"cannot mount the private tmpfs: {exc.strerror}")
            os.rmdir(self.staging_root)
            return 1
        status = 1
        try:
            status = await self._run()
        except* ServerStopped as group:
            self._say(f"the device server stopped: {group.exceptions[0]}")
            status = 1
        except* KeyboardInterrupt:
            status = 130
        finally:
            self._cleanup()
        return status

    async def _serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        assert self._staging is not None
        try:
            await self.server.serve(self._staging.fuse_dir, task_status=task_status)
        except trio.Cancelled:
            raise
        except Exception as exc:
            raise ServerStopped(f"{type(exc).__name__}: {exc}") from exc
        raise ServerStopped("it exited")

    async def _run(self) -> int:
        assert self._staging is not None
        env = dict(os.environ)
        env["FAKEDEV_MOUNT"] = str(self._staging.fuse_dir)
        env["FAKEDEV_PID"] = str(os.getpid())
        with trio.open_signal_receiver(*FORWARDED_SIGNALS) as signals:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                self._nursery = nursery
                await nursery.start(self._serve)
                try:
                    await trio.to_thread.run_sync(self._place)
                except OSError as exc:
                    self._say(f"cannot place the devices: {exc}")
                    nursery.cancel_scope.cancel()
                    return 1
                try:
                    proc = await nursery.start(self._run_child, env)
                except OSError as exc:
                    self._say(f"cannot run {self.cmd[0]}: {exc.strerror}")
                    nursery.cancel_scope.cancel()
                    return 127 if isinstance(exc, FileNotFoundError) else 126
                nursery.start_soon(self._forward_signals, signals, proc)
        assert self.returncode is not None
        return self.returncode

    async def _run_child(
        self, env: dict[str, str], *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        async def deliver_cancel(proc: trio.Process) -> None:
            proc.terminate()
            with trio.move_on_after(KILL_GRACE_SECONDS):
                await proc.wait()
                return
            proc.kill()

        if self.supervise or self.stat_mode:
            from fakedev.host.vfio_supervisor import start_supervised

            assert self._nursery is not None
            proc, _sup = await start_supervised(
                self._nursery, self.server, self.cmd, env,
                device_fds=self.supervise, stat_mode=self.stat_mode,
            )
        else:
            proc = await trio.lowlevel.open_process(list(self.cmd), env=env)
        task_status.started(proc)
        try:
            rc = await proc.wait()
        except trio.Cancelled:
            with trio.CancelScope(shield=True):
                await deliver_cancel(proc)
                await proc.wait()
            raise
        self.returncode = 128 - rc if rc < 0 else rc
        # The program is done: stop the server (and everything else).
        assert self._scope is not None
        self._scope.cancel()

    async def _forward_signals(self, signals: Any, proc: trio.Process) -> None:
        deadline = math.inf
        async for signum in signals:
            if proc.returncode is not None:
                return
            if trio.current_time() >= deadline:
                proc.kill()
                continue
            if not (signum in TERMINAL_SIGNALS and _from_terminal()):
                proc.send_signal(signum)
            deadline = trio.current_time() + KILL_GRACE_SECONDS

    def _cleanup(self) -> None:
        staging = self._staging
        if staging is not None and staging.mounted:
            try:
                namespace.umount(staging.root, namespace.MNT_DETACH)
            except OSError:
                pass
            staging.mounted = False
        try:
            os.rmdir(self.staging_root)
        except OSError:
            pass
