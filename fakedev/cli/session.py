"""One ``fakedev run``: a trio nursery owning the FUSE server and the child.

Sequence: mount a private tmpfs (staging) -> start the server on
``staging/fuse`` -> in a worker thread (placement looks paths up on the FUSE
mount, which this thread's loop answers) generate the sysfs, bind the served
writable attributes (driver_override, bind, unbind, ...) over its files, and put
the nodes and sysfs at the real paths -> run CMD -> cancel the server ->
unmount staging. While CMD runs, nodes that appear (a bind to vfio-pci) are
placed in the private /dev, nodes that go are taken out, and the attribute
mounts of a removed function are unmounted before its sysfs directory goes.

The process is already inside its private namespace when this runs (see
fakedev.cli.main); every mount made here dies with it.

CMD's processes. fakedev makes itself a child subreaper
(PR_SET_CHILD_SUBREAPER), so every process CMD starts stays a descendant of
fakedev, even one that leaves CMD's process group or session (a daemon, a
``setsid`` child). SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to fakedev go to
all of them (CMD's whole tree), not only to CMD; a second signal after the
grace period kills the tree. Ctrl-C at a terminal already reaches every
process of the foreground job, so it is not sent twice. When CMD exits,
processes it left behind get SIGTERM and, after ``LEFTOVER_GRACE_SECONDS``,
SIGKILL; the device server and the supervisor keep answering them until they
are gone (then everything is torn down), so a leftover never sees a trapped
stat fail with ENOSYS or a node vanish under it while it runs. No process of
the run outlives ``fakedev run``.
"""

from __future__ import annotations

import ctypes
import functools
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
#: how long processes left behind by CMD have between SIGTERM and SIGKILL
LEFTOVER_GRACE_SECONDS = 3.0
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """prctl(PR_SET_CHILD_SUBREAPER): orphaned descendants are reparented to us."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _stat_fields(pid: int) -> tuple[int, str] | None:
    """(ppid, state) of ``pid`` from /proc/<pid>/stat, or None when gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    rest = raw[raw.rfind(b")") + 2:].split()  # the name may hold spaces and parens
    if len(rest) < 2:
        return None
    return int(rest[1]), rest[0].decode()


def descendants(root: int | None = None) -> dict[int, str]:
    """Every live descendant of ``root`` (default: this process): pid -> state
    (``Z`` for a zombie not yet reaped)."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    states: dict[int, str] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        got = _stat_fields(int(name))
        if got is None:
            continue
        children.setdefault(got[0], []).append(int(name))
        states[int(name)] = got[1]
    out: dict[int, str] = {}
    todo = list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        if pid in out or pid == root:
            continue
        out[pid] = states.get(pid, "?")
        todo.extend(children.get(pid, ()))
    return out


def signal_tree(signum: int, *, exclude: int | None = None) -> list[int]:
    """Send ``signum`` to every live descendant of this process; the pids signalled."""
    sent = []
    for pid, state in descendants().items():
        if state == "Z" or pid == exclude:
            continue
        try:
            os.kill(pid, signum)
            sent.append(pid)
        except ProcessLookupError:
            pass
    return sent


def reap_orphans(keep: int | None = None) -> None:
    """Reap our zombie children (reparented orphans), but never ``keep``
    (the child trio still waits for)."""
    for pid, state in descendants().items():
        if state != "Z" or pid == keep:
            continue
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass  # not our child: its own parent reaps it


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
    generate_sysfs(
        root, topology, kernel.nodes(), vfio_index_of(kernel), noiommu=kernel.vfio.noiommu,
        enable_sriov=kernel.vfio.enable_sriov,
    )


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


def place_node(staging: namespace.Staging, rel: str, dev: Path = Path("/dev")) -> None:
    """A served node appeared (a bind to vfio-pci): put it at ``dev/rel`` in
    our private ``dev``, as ``place_dev`` placed the first ones."""
    target = dev / rel
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.touch()
        namespace.bind(staging.fuse_dir / rel, target)
    except OSError as exc:
        print(f"fakedev: cannot place /dev/{rel}: {exc}", file=sys.stderr, flush=True)


def place_sysfs_attributes(staging: namespace.Staging, attrs: Sequence[Any]) -> int:
    """Bind each served writable attribute (``SysAttr``) over its file in the
    generated sysfs (before that is placed at /sys: the recursive binds
    carry these mounts along). Returns how many were placed."""
    placed = 0
    for attr in attrs:
        target = staging.sys_dir / "sys" / attr.sys_rel
        if not target.is_file():
            continue
        namespace.bind(staging.fuse_dir / attr.fuse_rel, target)
        placed += 1
    return placed


def unmount_under(staging: namespace.Staging, sys_rel: str, sys: Path = Path("/sys")) -> None:
    """Unmount what is mounted inside the sysfs directory ``sys_rel`` (a
    removed function's attribute files), at /sys and in the staging copy,
    so the directory can be removed."""
    prefixes = (f"{sys / sys_rel}/", f"{staging.sys_dir / 'sys' / sys_rel}/")
    points = [m.mountpoint for m in namespace.read_mountinfo() if m.mountpoint.startswith(prefixes)]
    for point in sorted(points, key=len, reverse=True):
        try:
            namespace.umount(point, namespace.MNT_DETACH)
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
        if hasattr(self.server, "sysfs_attributes"):  # writes reach the model
            place_sysfs_attributes(staging, self.server.sysfs_attributes())
            self.server.node_added_hooks.append(functools.partial(place_node, staging))
            self.server.sysfs_removing_hooks.append(functools.partial(unmount_under, staging))
        namespace.place_sysfs(staging, staging.sys_dir / "sys")

    async def run(self) -> int:
        become_subreaper()
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
            signal_tree(signal.SIGTERM)
            signal_tree(signal.SIGCONT)
            with trio.move_on_after(KILL_GRACE_SECONDS):
                await proc.wait()
                return
            signal_tree(signal.SIGKILL)

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
                await self._end_leftovers()
            raise
        self.returncode = 128 - rc if rc < 0 else rc
        # The program is done: end what it left behind while the devices are
        # still served, then stop the server (and everything else). Shielded:
        # bounded by the grace periods, and finished even if the server dies.
        with trio.CancelScope(shield=True):
            await self._end_leftovers()
        assert self._scope is not None
        self._scope.cancel()

    async def _end_leftovers(self) -> None:
        """SIGTERM to every process CMD left behind, SIGKILL after the grace
        period; returns when none is left (zombies reaped)."""
        deadline = trio.current_time() + LEFTOVER_GRACE_SECONDS
        termed = killed = False
        while True:
            reap_orphans()
            live = [pid for pid, state in descendants().items() if state != "Z"]
            if not live:
                return
            if not termed:
                signal_tree(signal.SIGTERM)
                signal_tree(signal.SIGCONT)  # a stopped process acts on SIGTERM only when continued
                termed = True
            elif trio.current_time() >= deadline and not killed:
                signal_tree(signal.SIGKILL)
                killed = True
            elif killed and trio.current_time() >= deadline + KILL_GRACE_SECONDS:
                self._say(f"processes left behind that would not die: {sorted(live)}")
                return
            await trio.sleep(0.02)

    async def _forward_signals(self, signals: Any, proc: trio.Process) -> None:
        """Signals to fakedev go to CMD's whole tree; a second one after the
        grace period (or any once CMD has exited) kills what is left."""
        deadline = math.inf
        async for signum in signals:
            if proc.returncode is not None or trio.current_time() >= deadline:
                signal_tree(signal.SIGKILL)
                continue
            if not (signum in TERMINAL_SIGNALS and _from_terminal()):
                signal_tree(signum)
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
