"""The FUSE server: the kernel model's nodes served to real processes.

What lives here: ``Server(kernel)`` and its ``serve(mountpoint)``: mount, build
the directory tree of the model's ``DevNode``s (regular files: a node reported
as S_IFCHR would be opened through a real char driver), then answer
OPEN/IOCTL/READ/WRITE/POLL/RELEASE by calling the model's ``File`` with a
``ProcessTask`` for the calling thread. A small control area lives at
``.fakedev/`` in the mount: ``state.json`` (read: ``kernel.describe()``) and
``trace`` (write ``on``/``off``; read the current setting), ``control``
(write one command, e.g. ``fault call=VFIO_DEVICE_RESET,nth=1,errno=EIO``,
``unplug BDF``, ``clear``; read the last command's reply; see
fakedev.host.control), and ``devfd``
(for the supervisor: each open is an fh with no model file yet, which
``bind_fh`` later makes an open of a model ``File``; an fh never bound is
simply dropped at release).
``.fakedev/sysfs/`` holds the writable sysfs attributes of a model with a
driver core (``driver_override``, ``bind``, ``unbind``, ``drivers_probe``, ...;
fakedev.host.sysfs ``writable_attributes``): a write runs the model's store and
is answered when the kernel's would return (see ``_write_sysattr``).

Concurrency: the model is synchronous and not thread-safe. Every model call
runs under one ``trio.Lock``. Calls that may look up the caller's fds
(``Ioctl.takes_fds``) run in a worker thread while the lock is held, so the
loop keeps reading /dev/fuse and can answer the identity ioctl those lookups
issue on our own mount. Everything else runs inline on the loop when the lock
is free (the fast path), or as its own task waiting for the lock when not.
A ``KernelError`` becomes its errno; any other exception from the model
becomes EIO and a logged traceback, and serving goes on.

Fault injection: every open/read/write/ioctl goes through the model's
``FaultPlan`` (``kernel.faults``, fakedev.kernel.fault_inject) when it is
armed; unarmed, the cost is one attribute check. An unplug a rule asks for
runs right after the call that triggered it, under the model lock.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import trio

from fakedev.fuse import mount as M
from fakedev.fuse import protocol as P
from fakedev.fuse.session import Deferred, Session
from fakedev.host import control as C
from fakedev.host import sysfs as SYS
from fakedev.host.dma import attach_dma_memory  # also registers dma-read / dma-write
from fakedev.host.proc import IDENTITY_IOCTL, HostContext, NeedsWorker, ProcessTask
from fakedev.host.trace import Tracer
from fakedev.kernel.errors import KernelError
from fakedev.kernel.fault_inject import FaultPlan, InjectedError
from fakedev.kernel.file import DevNode, File
from fakedev.kernel.task import Task
from fakedev.uapi import ioctls

log = logging.getLogger("fakedev.server")

OPEN_FLAGS = P.FOPEN_DIRECT_IO | P.FOPEN_NOFLUSH
CONTROL_DIR = ".fakedev"
DEVFD_PATH = f"{CONTROL_DIR}/devfd"
_FH_LIMIT = 1 << 31  # fh travels back as an ioctl result (int32)
T = TypeVar("T")


class KernelLike(Protocol):
    def nodes(self) -> list[DevNode]: ...

    def open(self, path: str, task: Task) -> File: ...

    def describe(self) -> dict[str, Any]: ...


class _Node:
    __slots__ = ("attr", "children", "control", "devpath", "gid", "ino", "mode", "name", "parent", "uid")

    def __init__(self, ino: int, name: str, parent: int, mode: int, uid: int = 0, gid: int = 0,
                 devpath: str | None = None, control: str | None = None, is_dir: bool = False) -> None:
        self.ino = ino
        self.name = name
        self.parent = parent
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.devpath = devpath
        self.control = control
        self.children: dict[str, _Node] | None = {} if is_dir else None
        self.attr = P.pack_attr(ino, mode, nlink=2 if is_dir else 1, uid=uid, gid=gid)


class _Control:
    __slots__ = ("data", "node")

    def __init__(self, node: _Node, data: bytes) -> None:
        self.node = node
        self.data = data


class Server:
    """Serves ``kernel`` (the model facade, or anything with nodes/open/describe)."""

    def __init__(self, kernel: KernelLike, *, name: str = "fakedev", tracer: Tracer | None = None,
                 allow_other: bool = True) -> None:
        self.kernel = kernel
        attach_dma_memory(kernel)  # device DMA reaches the memory behind the mappings
        self.name = name
        self.allow_other = allow_other
        self.tracer = tracer if tracer is not None else Tracer()
        self.lock = trio.Lock()
        self.ctx = HostContext(self._file_for_fh)
        self.session: Session | None = None
        self.mountpoint: str | None = None
        self.connection: int | None = None
        self.unexpected_errors = 0
        self._fd = -1
        self._worker_tids: set[int] = set()
        self.releases = 0
        self._files: dict[int, File] = {}
        self._paths: dict[int, str] = {}
        self._controls: dict[int, _Control] = {}
        self._unbound: set[int] = set()
        self._pollers: dict[int, tuple[int, int]] = {}
        self._nodes: dict[int, _Node] = {}
        self._devnodes: dict[int, DevNode] = {}
        self._next_fh = 1
        # -- node refresh and unplug (see "topology changes") --
        set_clock = getattr(kernel, "set_unplug_clock", None)
        if set_clock is not None:  # the REQ re-request timer runs on real time
            set_clock(time.monotonic)
        #: where the generated sysfs lives (``<root>/sys/...``), kept in step
        #: with the model's removals; None: no sysfs to maintain
        self.sysfs_root: Path | None = None
        self._sysfs_view: SYS.SysfsView | None = None
        self._next_ino = 1
        self._gone: dict[int, _Node] = {}  # removed nodes still open somewhere (getattr)
        self._bg: trio.Nursery | None = None
        self._notify_send, self._notify_recv = trio.open_memory_channel[bytes | Callable[[], None]](1 << 16)
        #: called (in a worker thread) with the path under /dev of each node that
        #: went, before the kernel's caches are told: who placed the node elsewhere
        #: (``fakedev run``'s private /dev) takes it away there
        self.node_removed_hooks: list[Callable[[str], None]] = []
        #: called (in a worker thread, after the node is served) with the path
        #: under /dev of each node that appeared (a bind to vfio-pci)
        self.node_added_hooks: list[Callable[[str], None]] = []
        #: called (in a worker thread) with the path relative to /sys of each
        #: function directory about to be removed from the generated sysfs,
        #: before it is: who mounted files in it (``fakedev run``) unmounts them
        self.sysfs_removing_hooks: list[Callable[[str], None]] = []
        #: the writable sysfs attributes served under .fakedev/sysfs, by inode
        self._sysattrs: dict[int, SYS.SysAttr] = {}
        self._unplug_timer_on = False
        self._unplug_wake = trio.Event()
        plan = getattr(kernel, "faults", None)
        #: the model's fault plan (a private, empty one for a model without)
        self.faults: FaultPlan = plan if isinstance(plan, FaultPlan) else FaultPlan()
        #: what a read of .fakedev/control gives: the reply of the last command
        self.control_reply = b""
        self._takes_fds = frozenset((k, io.cmd) for io in ioctls.IOCTLS if io.takes_fds for k in io.kinds)
        self._handlers: dict[int, Callable[[Any], bytes | Deferred | None]] = {
            P.Op.LOOKUP: self._h_lookup,
            P.Op.GETATTR: self._h_getattr,
            P.Op.SETATTR: self._h_setattr,
            P.Op.STATX: lambda r: P.reply_error(r.unique, errno.ENOSYS),
            P.Op.OPEN: self._h_open,
            P.Op.OPENDIR: self._h_opendir,
            P.Op.READDIR: self._h_readdir,
            P.Op.RELEASEDIR: lambda r: P.reply_empty(r.unique),
            P.Op.READ: self._h_read,
            P.Op.WRITE: self._h_write,
            P.Op.IOCTL: self._h_ioctl,
            P.Op.POLL: self._h_poll,
            P.Op.FLUSH: lambda r: P.reply_empty(r.unique),
            P.Op.RELEASE: self._h_release,
            P.Op.ACCESS: lambda r: P.reply_empty(r.unique),
            P.Op.STATFS: lambda r: P.reply_statfs(r.unique, files=len(self._nodes)),
            P.Op.DESTROY: lambda r: P.reply_empty(r.unique),
            P.Op.FORGET: self._h_forget,
            P.Op.BATCH_FORGET: self._h_forget,
        }

    # -- public ----------------------------------------------------------------
    def devnode_for_ino(self, ino: int) -> DevNode | None:
        """The model's ``DevNode`` served at inode ``ino`` of the mount (None for
        directories, the control area and unknown inodes). For reporting a node's
        char-device identity (major, minor, mode) where FUSE serves a regular file."""
        return self._devnodes.get(ino)

    def bind_fh(self, fh: int, file: File) -> None:
        """Make ``fh`` (an open of ``.fakedev/devfd`` not yet bound) an open of
        ``file``: later calls on it reach ``file``, its release releases it.

        Call with the model lock held (``file`` is model state). KeyError if
        ``fh`` is not an unbound devfd open.
        """
        self._unbound.remove(fh)
        self._files[fh] = file
        self._paths[fh] = DEVFD_PATH

    @property
    def open_files(self) -> int:
        """Opens of model nodes not yet released."""
        return len(self._files)

    async def locked(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` (something touching the model, e.g. ``kernel.raise_irq``) under the model lock.

        Pollers whose file became ready are woken afterwards.
        """
        async with self.lock:
            out = fn()
            self._poke_pollers()
            return out

    async def serve(self, mountpoint: str, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
        """Mount at ``mountpoint``, report started, serve until cancelled or ENODEV, unmount."""
        mountpoint = M.resolve(mountpoint)
        if M.clear_stale(mountpoint, self.name):
            log.warning("cleared a stale fuse.%s mount at %s", self.name, mountpoint)
        self._build_tree()
        fd = self._fd = M.open_dev_fuse()
        mounted = False
        try:
            M.mount(mountpoint, fd, name=self.name, allow_other=self.allow_other)
            mounted = True
            self.mountpoint = mountpoint
            info = M.mounts_at(mountpoint, f"fuse.{self.name}")[-1]
            self.ctx.mount_dev = (info.major, info.minor)
            self.connection = info.connection
            self.session = Session(fd, self, on_stop=self._stop)
            async with trio.open_nursery() as bg:
                self._bg = bg
                bg.start_soon(self._notifier)
                if getattr(self.kernel, "unplugs", None):
                    self._start_unplug_timer()
                task_status.started(self)
                await self.session.run()
                bg.cancel_scope.cancel()
            self._bg = None
        finally:
            if mounted:
                self._stop()
            if self._fd >= 0:
                os.close(fd)
                self._fd = -1
            self._release_all()
            self.tracer.flush()

    def _stop(self) -> None:
        """Unmount and abort: callers blocked on us (our own workers too) get an error."""
        if self.mountpoint is not None:
            try:
                M.umount(self.mountpoint, detach=True)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOENT):
                    log.warning("umount %s: %s", self.mountpoint, e)
            self.mountpoint = None
        if self.connection is not None:
            if not M.abort(self.connection) and self._fd >= 0:
                os.close(self._fd)  # the last /dev/fuse reference: aborts too
                self._fd = -1
            self.connection = None

    def _release_all(self) -> None:
        files, self._files = self._files, {}
        self._unbound.clear()
        self._paths.clear()
        self._pollers.clear()
        for f in files.values():
            try:
                f.release()
                self.releases += 1
            except Exception:
                log.exception("release of %r at shutdown", f)

    # -- tree ------------------------------------------------------------------
    def _build_tree(self) -> None:
        nodes: dict[int, _Node] = {}
        root = _Node(1, "", 1, P.S_IFDIR | 0o755, is_dir=True)
        nodes[1] = root

        def add(parent: _Node, name: str, **kw: Any) -> _Node:
            assert parent.children is not None
            if name in parent.children:
                return parent.children[name]
            n = _Node(len(nodes) + 1, name, parent.ino, **kw)
            nodes[n.ino] = n
            parent.children[name] = n
            return n

        def dirs(path: str) -> tuple[_Node, str]:
            parts = path.strip("/").split("/")
            d = root
            for p in parts[:-1]:
                d = add(d, p, mode=P.S_IFDIR | 0o755, is_dir=True)
            return d, parts[-1]

        devnodes: dict[int, DevNode] = {}
        for dn in self.kernel.nodes():
            d, leaf = dirs(dn.path)
            n = add(d, leaf, mode=P.S_IFREG | (dn.mode & 0o7777), uid=dn.uid, gid=dn.gid, devpath=dn.path)
            if n.children is None:
                devnodes[n.ino] = dn
        d, _ = dirs(f"{CONTROL_DIR}/x")
        add(d, "state.json", mode=P.S_IFREG | 0o444, control="state")
        add(d, "trace", mode=P.S_IFREG | 0o644, control="trace")
        add(d, C.CONTROL_NAME, mode=P.S_IFREG | 0o600, uid=os.geteuid(), gid=os.getegid(), control="control")
        # opened by this process only (the supervisor): owned by whoever serves,
        # the caller's own uid in a rootless run
        add(d, "devfd", mode=P.S_IFREG | 0o600, uid=os.geteuid(), gid=os.getegid(), control="devfd")
        self._sysattrs = {}
        for attr in self.sysfs_attributes():
            d, leaf = dirs(attr.fuse_rel)
            n = add(d, leaf, mode=P.S_IFREG | attr.mode, uid=os.geteuid(), gid=os.getegid(), control="sysfs")
            self._sysattrs[n.ino] = attr
        self._nodes = nodes
        self._devnodes = devnodes
        self._next_ino = len(nodes) + 1
        self._sysfs_view = self._current_sysfs_view()

    def _file_for_fh(self, fh: int) -> File | None:
        return self._files.get(fh)

    def _new_fh(self) -> int:
        fh = self._next_fh
        while fh in self._files or fh in self._controls or fh in self._unbound:
            fh = fh + 1 if fh + 1 < _FH_LIMIT else 1
        self._next_fh = fh + 1 if fh + 1 < _FH_LIMIT else 1
        return fh

    # -- Handler protocol ----------------------------------------------------------
    def init(self, req: P.InitRequest, agreed_flags: int) -> None:
        log.debug("FUSE %d.%d, flags %#x", req.major, req.minor, agreed_flags)

    def handle(self, req: P.Request) -> bytes | Deferred | None:
        h = self._handlers.get(req.opcode)
        if h is None:
            return P.reply_error(req.unique, errno.ENOSYS)
        return h(req)

    # -- running model calls -----------------------------------------------------
    def _guard(self, req: P.Request, fn: Callable[[ProcessTask], bytes], task: ProcessTask) -> bytes:
        try:
            return fn(task)
        except KernelError as e:
            return P.reply_error(req.unique, e.errno)
        except NeedsWorker:
            raise
        except Exception:
            self.unexpected_errors += 1
            log.exception("model failed on %r", req)
            return P.reply_error(req.unique, errno.EIO)

    def _model(self, req: P.Request, fn: Callable[[ProcessTask], bytes], worker: bool = False) -> bytes | Deferred:
        """Run ``fn`` with the lock held: inline if possible, else as a task (in a worker if asked)."""
        if not worker and not self.lock.locked():
            try:
                return self._guard(req, fn, ProcessTask(req.pid, self.ctx, True))
            except NeedsWorker:
                worker = True

        async def deferred() -> bytes:
            return await self._model_locked(req, fn, worker)

        return deferred

    async def _model_locked(self, req: P.Request, fn: Callable[[ProcessTask], bytes], worker: bool) -> bytes:
        async with self.lock:
            if not worker:
                try:
                    return self._guard(req, fn, ProcessTask(req.pid, self.ctx, True))
                except NeedsWorker:
                    pass
            task = ProcessTask(req.pid, self.ctx, False)
            return await trio.to_thread.run_sync(self._guard_in_worker, req, fn, task)

    def _guard_in_worker(self, req: P.Request, fn: Callable[[ProcessTask], bytes], task: ProcessTask) -> bytes:
        self._worker_tids.add(threading.get_native_id())  # so identity ioctls need no /proc lookup
        return self._guard(req, fn, task)

    def _poke_pollers(self) -> None:
        if not self._pollers or self.session is None:
            return
        for fh, (kh, events) in list(self._pollers.items()):
            f = self._files.get(fh)
            if f is None:
                del self._pollers[fh]
            elif f.poll() & events:
                del self._pollers[fh]
                self.session.notify_poll(kh)

    # -- namespace -------------------------------------------------------------------
    def _h_lookup(self, req: P.LookupRequest) -> bytes:
        d = self._nodes.get(req.nodeid)
        if d is None or d.children is None:
            return P.reply_error(req.unique, errno.ENOTDIR)
        n = d.children.get(req.name)
        if n is None:
            return P.reply_error(req.unique, errno.ENOENT)
        return P.reply_entry(req.unique, n.ino, n.attr, entry_valid=60.0, attr_valid=60.0)

    def _h_getattr(self, req: P.GetattrRequest) -> bytes:
        n = self._nodes.get(req.nodeid) or self._gone.get(req.nodeid)
        if n is None:
            return P.reply_error(req.unique, errno.ENOENT)
        return P.reply_attr(req.unique, n.attr, attr_valid=60.0)

    def _h_setattr(self, req: P.SetattrRequest) -> bytes:
        n = self._nodes.get(req.nodeid)
        if n is None:
            return P.reply_error(req.unique, errno.ENOENT)
        if n.control not in ("trace", "control", "sysfs"):  # only truncation (echo on > trace)
            return P.reply_error(req.unique, errno.EPERM)
        return P.reply_attr(req.unique, n.attr, attr_valid=60.0)

    def _h_opendir(self, req: P.OpenRequest) -> bytes:
        n = self._nodes.get(req.nodeid)
        if n is None or n.children is None:
            return P.reply_error(req.unique, errno.ENOTDIR)
        return P.reply_open(req.unique, n.ino, 0)

    def _h_readdir(self, req: P.ReadRequest) -> bytes:
        n = self._nodes.get(req.nodeid)
        if n is None or n.children is None:
            return P.reply_error(req.unique, errno.ENOTDIR)
        entries = [(".", n.ino, P.DT_DIR), ("..", n.parent, P.DT_DIR)]
        entries += [(c.name, c.ino, P.DT_DIR if c.children is not None else P.DT_REG) for c in n.children.values()]
        out = b""
        for i in range(req.offset, len(entries)):
            name, ino, dt = entries[i]
            ent = P.pack_dirent(ino, i + 1, name, dt)
            if len(out) + len(ent) > req.size:
                break
            out += ent
        return P.reply_data(req.unique, out)

    # -- files -------------------------------------------------------------------------
    def _h_open(self, req: P.OpenRequest) -> bytes | Deferred:
        n = self._nodes.get(req.nodeid)
        if n is None:
            return P.reply_error(req.unique, errno.ENOENT)
        if n.children is not None:
            return P.reply_error(req.unique, errno.EISDIR)
        if n.control is not None:
            return self._open_control(req, n)
        devpath = n.devpath
        assert devpath is not None

        def fn(task: ProcessTask) -> bytes:
            faults = self.faults
            try:
                if not faults.armed:
                    f = self.kernel.open(devpath, task)
                else:
                    try:
                        f = faults.open(self.kernel.open, devpath, task)
                    finally:
                        self._faults_done()
            except KernelError as e:
                if self.tracer.enabled:
                    self.tracer.open(task, devpath, None, None, e.errno,
                                     injected=isinstance(e, InjectedError))
                raise
            fh = self._new_fh()
            self._files[fh] = f
            self._paths[fh] = devpath
            if self.tracer.enabled:
                self.tracer.open(task, devpath, fh, f, None)
            return P.reply_open(req.unique, fh, OPEN_FLAGS)

        return self._model(req, fn)

    def _open_control(self, req: P.OpenRequest, n: _Node) -> bytes | Deferred:
        if n.control == "state":
            def fn(task: ProcessTask) -> bytes:
                data = json.dumps(self.kernel.describe(), indent=1, sort_keys=True, default=str).encode() + b"\n"
                fh = self._new_fh()
                self._controls[fh] = _Control(n, data)
                return P.reply_open(req.unique, fh, P.FOPEN_DIRECT_IO)

            return self._model(req, fn)
        if n.control == "sysfs":
            attr = self._sysattrs[n.ino]
            if req.flags & os.O_ACCMODE != os.O_WRONLY and not attr.mode & 0o444:
                return P.reply_error(req.unique, errno.EACCES)  # kernfs: no show method
        fh = self._new_fh()
        if n.control == "devfd":
            self._unbound.add(fh)
            return P.reply_open(req.unique, fh, OPEN_FLAGS)
        self._controls[fh] = _Control(n, self.control_reply if n.control == "control" else b"")
        return P.reply_open(req.unique, fh, P.FOPEN_DIRECT_IO)

    def _h_release(self, req: P.ReleaseRequest) -> bytes | Deferred:
        fh = req.fh
        if self._controls.pop(fh, None) is not None or fh not in self._files:
            self._unbound.discard(fh)
            return P.reply_empty(req.unique)

        def fn(task: ProcessTask) -> bytes:
            f = self._files.pop(fh)
            self._paths.pop(fh, None)
            self._pollers.pop(fh, None)
            self.releases += 1
            pending = bool(getattr(self.kernel, "unplugs", None) or getattr(self.kernel, "unbinds", None))
            f.release()
            if pending:  # this close may have let a removal complete
                self.refresh_nodes()
                self._start_unplug_timer()
            if self.tracer.enabled:
                self.tracer.release(task, fh, f)
            self._poke_pollers()
            return P.reply_empty(req.unique)

        return self._model(req, fn)

    def _h_read(self, req: P.ReadRequest) -> bytes | Deferred:
        c = self._controls.get(req.fh)
        if c is not None and c.node.control == "sysfs":
            return self._read_sysattr(req, self._sysattrs[c.node.ino])
        if c is not None:
            data = (b"on\n" if self.tracer.enabled else b"off\n") if c.node.control == "trace" else c.data
            return P.reply_data(req.unique, data[req.offset:req.offset + req.size])
        f = self._files.get(req.fh)
        if f is None:
            return P.reply_error(req.unique, errno.EBADF)
        offset, size = req.offset, req.size

        def fn(task: ProcessTask) -> bytes:
            if not self.tracer.enabled:
                return P.reply_data(req.unique, self._model_read(f, task, offset, size))
            fh = req.fh
            fd = self.tracer.caller_fd(task, fh, self._paths.get(fh))[0]  # may move us to a worker
            try:
                data = self._model_read(f, task, offset, size)
            except KernelError as e:
                self.tracer.rw(task, f, "read", offset, size, None, e.errno, fh=fh, fd=fd,
                               injected=isinstance(e, InjectedError))
                raise
            self.tracer.rw(task, f, "read", offset, size, len(data), None, fh=fh, fd=fd)
            return P.reply_data(req.unique, data)

        return self._model(req, fn)

    def _h_write(self, req: P.WriteRequest) -> bytes | Deferred:
        c = self._controls.get(req.fh)
        if c is not None:
            if c.node.control == "control":
                return self._write_control(req, c)
            if c.node.control == "sysfs":
                return self._write_sysattr(req, self._sysattrs[c.node.ino])
            if c.node.control != "trace":
                return P.reply_error(req.unique, errno.EBADF)
            word = req.data.strip().decode(errors="replace")
            if word not in ("on", "off"):
                return P.reply_error(req.unique, errno.EINVAL)
            self.tracer.set(word == "on")
            return P.reply_write(req.unique, len(req.data))
        f = self._files.get(req.fh)
        if f is None:
            return P.reply_error(req.unique, errno.EBADF)
        offset, data = req.offset, req.data

        def fn(task: ProcessTask) -> bytes:
            fh = req.fh
            fd = self.tracer.caller_fd(task, fh, self._paths.get(fh))[0] if self.tracer.enabled else None
            try:
                n = self._model_write(f, task, offset, data)
            except KernelError as e:
                if self.tracer.enabled:
                    self.tracer.rw(task, f, "write", offset, len(data), None, e.errno, fh=fh, fd=fd,
                                   injected=isinstance(e, InjectedError))
                raise
            if self.tracer.enabled:
                self.tracer.rw(task, f, "write", offset, len(data), n, None, fh=fh, fd=fd)
            self._poke_pollers()
            return P.reply_write(req.unique, n)

        return self._model(req, fn)

    def _h_poll(self, req: P.PollRequest) -> bytes | Deferred:
        f = self._files.get(req.fh)
        if f is None:
            return P.reply_poll(req.unique, 0x1 | 0x4)
        fh, kh, events = req.fh, req.kh, req.events or 0xFFFF
        notify = req.poll_flags & P.FUSE_POLL_SCHEDULE_NOTIFY

        def fn(task: ProcessTask) -> bytes:
            rev = f.poll() & events
            if not rev and notify:
                self._pollers[fh] = (kh, events)
            return P.reply_poll(req.unique, rev)

        return self._model(req, fn)

    def _h_ioctl(self, req: P.IoctlRequest) -> bytes | Deferred:
        cmd = req.cmd
        if cmd == IDENTITY_IOCTL:
            return self._identity(req)
        f = self._files.get(req.fh)
        if f is None or req.flags & P.FUSE_IOCTL_DIR:
            return P.reply_error(req.unique, errno.ENOTTY)
        worker = (getattr(f, "kind", None), cmd) in self._takes_fds
        arg = req.arg
        unique = req.unique
        tracer = self.tracer
        if self.faults.armed:
            # counted once: never started on the loop and retried in a worker
            worker = True
        if not worker and not tracer.enabled and not self.lock.locked():
            # the fast path: inline, no closure, no trace
            try:
                res = f.ioctl(ProcessTask(req.pid, self.ctx, True), cmd, arg)
            except KernelError as e:
                return P.reply_error(unique, e.errno)
            except NeedsWorker:
                # an fd lookup by a call the table does not mark (every ioctl
                # of the model that looks up fds is marked): safe to run again
                # only because the model looks fds up before changing anything
                pass
            except Exception:
                self.unexpected_errors += 1
                log.exception("model failed on %r", req)
                return P.reply_error(unique, errno.EIO)
            else:
                if self._pollers:
                    self._poke_pollers()
                return P.reply_ioctl(unique, res)
            worker = True

        def fn(task: ProcessTask) -> bytes:
            if not tracer.enabled:
                res = self.model_ioctl(f, task, cmd, arg)
            else:
                before = tracer.ioctl_before(task, f, cmd, arg, req.fh, self._paths.get(req.fh))
                try:
                    res = self.model_ioctl(f, task, cmd, arg)
                except KernelError as e:
                    tracer.ioctl_after(task, f, self._paths.get(req.fh), cmd, arg, before, None, e.errno,
                                       injected=isinstance(e, InjectedError))
                    raise
                except Exception:  # a model bug: answered EIO by _guard
                    tracer.ioctl_after(task, f, self._paths.get(req.fh), cmd, arg, before, None, errno.EIO)
                    raise
                tracer.ioctl_after(task, f, self._paths.get(req.fh), cmd, arg, before, res, None)
            if self._pollers:
                self._poke_pollers()
            return P.reply_ioctl(unique, res)

        return self._model(req, fn, worker)

    # -- fault injection and the control file ----------------------------------------
    def _model_read(self, file: File, task: ProcessTask, offset: int, size: int) -> bytes:
        """``file.read`` through the fault plan when armed (see ``model_ioctl``)."""
        if not self.faults.armed:
            return file.read(task, offset, size)[:size]
        try:
            return self.faults.read(file, task, offset, size)[:size]
        finally:
            self._faults_done()

    def _model_write(self, file: File, task: ProcessTask, offset: int, data: bytes) -> int:
        """``file.write`` through the fault plan when armed (see ``model_ioctl``)."""
        if not self.faults.armed:
            return file.write(task, offset, data)
        try:
            return self.faults.write(file, task, offset, data)
        finally:
            self._faults_done()

    def model_ioctl(self, file: File, task: Task, cmd: int, arg: int) -> int:
        """``file.ioctl`` as a served call makes it: through the fault plan when
        armed (the call may fail as injected; an unplug it makes due runs). For
        calls answered outside the FUSE handlers (the seccomp supervisor's
        GROUP_GET_DEVICE_FD). Model lock held, on the loop or in a worker."""
        faults = self.faults
        if not faults.armed:
            return file.ioctl(task, cmd, arg)
        try:
            return faults.ioctl(file, task, cmd, arg)
        finally:
            self._faults_done()

    def _faults_done(self) -> None:
        """After a call through the fault plan: run the unplugs it made due.

        Runs with the model lock held; from a worker thread, the unplug itself
        runs on the loop's thread (the worker waits), as every node change does.
        """
        due = self.faults.take_unplugs()
        if not due:
            return
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            trio.from_thread.run_sync(self._unplug_due, due)
        else:
            self._unplug_due(due)

    def _unplug_due(self, due: list[str]) -> None:
        unplug = getattr(self, "unplug", None)
        for bdf in due:
            if unplug is None:
                log.warning("fault: cannot unplug %s: this server has no unplug", bdf)
                continue
            try:
                unplug(bdf)
            except KernelError as e:
                log.warning("fault: unplug of %s failed: %s", bdf, e)
            except Exception:
                self.unexpected_errors += 1
                log.exception("fault: unplug of %s", bdf)
        self._poke_pollers()

    def _write_control(self, req: P.WriteRequest, c: _Control) -> bytes | Deferred:
        """A command written to .fakedev/control, run under the model lock."""
        text = bytes(req.data)

        def fn(task: ProcessTask) -> bytes:
            try:
                reply = C.run_command(self, text).encode()
            except C.ControlError as e:
                self.control_reply = c.data = f"error: {e}\n".encode()
                raise KernelError(errno.EINVAL, str(e)) from e
            except KernelError as e:
                self.control_reply = c.data = f"error: {e}\n".encode()
                raise
            self.control_reply = c.data = reply
            self._poke_pollers()
            return P.reply_write(req.unique, len(text))

        return self._model(req, fn)

    # -- topology changes: unplug, node refresh --------------------------------------
    def unplug(self, bdf: str) -> None:
        """Unplug the PCI function ``bdf`` (``kernel.unplug_device``) and show it.

        The model signals the REQ eventfd at once; while a file holds the
        device the removal is pending, the vfioN node stays (opens fail with
        ENODEV) and a timer in the server's nursery asks again every 10 s; at
        the last close the nodes and the function's sysfs go. A device nobody
        holds goes at once. KernelError as the model fails (ENODEV: no such
        function). Call on the server's thread with the model lock held (as
        control commands run), e.g. ``await server.locked(lambda: server.unplug(bdf))``.
        """
        unplug_device = getattr(self.kernel, "unplug_device", None)
        if unplug_device is None:
            raise KernelError(errno.ENOSYS, "this model cannot unplug devices")
        unplug_device(bdf)
        self.refresh_nodes()
        if getattr(self.kernel, "unplugs", None):
            self._start_unplug_timer()
        self._poke_pollers()

    def refresh_nodes(self) -> None:
        """Serve the model's current ``nodes()``: vanished nodes give ENOENT from
        now on (files open on them keep working), new ones appear; the kernel's
        dentry and attribute caches are told (FUSE_NOTIFY_INVAL_ENTRY /
        INVAL_INODE, sent from a worker thread: the kernel may need this loop to
        answer a lookup first). The generated sysfs loses what went.

        Call after any change of the model's topology, on the server's thread,
        with the model lock held. Inode numbers of surviving nodes do not change.
        """
        root = self._nodes.get(1)
        if root is None:  # not serving yet: serve() builds the tree
            return
        if self._bg is not None and not _on_trio_thread():
            # a model call in a worker thread (it holds the lock): the tree is the loop's
            trio.from_thread.run_sync(self.refresh_nodes)
            return
        self._sync_sysfs()  # first: what sees a node go finds its sysfs gone too
        wanted: dict[str, DevNode] = {dn.path: dn for dn in self.kernel.nodes()}
        have: dict[str, _Node] = {n.devpath: n for n in self._nodes.values() if n.devpath is not None}
        touched: set[int] = set()
        for path, n in have.items():
            if path not in wanted:
                self._drop_node(n, touched)
        for path, dn in wanted.items():
            if path not in have:
                self._add_devnode(dn, touched)
                for hook in self.node_added_hooks:
                    self._queue_notify(functools.partial(hook, path))
        for ino in sorted(touched):
            self._queue_notify(P.notify_inval_inode(ino))

    def _drop_node(self, n: _Node, touched: set[int]) -> None:
        """Take ``n`` out of the tree (and a node-made directory left empty)."""
        devpath = n.devpath
        if devpath is not None:
            for hook in self.node_removed_hooks:
                self._queue_notify(functools.partial(hook, devpath))
        while True:
            parent = self._nodes.get(n.parent)
            del self._nodes[n.ino]
            self._gone[n.ino] = n
            if parent is not None and parent.children is not None:
                parent.children.pop(n.name, None)
                self._queue_notify(P.notify_inval_entry(parent.ino, n.name))
                touched.add(parent.ino)
            if (parent is None or parent.ino == 1 or parent.children or parent.control is not None
                    or parent.name == CONTROL_DIR):
                return
            n = parent  # devtmpfs removes the directories it made once empty

    def _add_devnode(self, dn: DevNode, touched: set[int]) -> None:
        d = self._nodes[1]
        parts = dn.path.strip("/").split("/")
        for i, name in enumerate(parts):
            assert d.children is not None
            child = d.children.get(name)
            if child is None:
                leaf = i == len(parts) - 1
                ino = self._next_ino
                self._next_ino += 1
                if leaf:
                    child = _Node(ino, name, d.ino, P.S_IFREG | (dn.mode & 0o7777), uid=dn.uid, gid=dn.gid,
                                  devpath=dn.path)
                    self._devnodes[ino] = dn
                else:
                    child = _Node(ino, name, d.ino, P.S_IFDIR | 0o755, is_dir=True)
                self._nodes[ino] = child
                d.children[name] = child
                touched.add(d.ino)
            if child.children is None:
                return
            d = child

    def _current_sysfs_view(self) -> SYS.SysfsView | None:
        topology = getattr(self.kernel, "topology", None)
        vfio_devices = getattr(self.kernel, "vfio_devices", None)
        if topology is None or vfio_devices is None:
            return None
        index = {d.pdev.name: d.index for d in vfio_devices()}
        return SYS.sysfs_view(topology, self.kernel.nodes(), index)

    def _sync_sysfs(self) -> None:
        """Bring the generated sysfs in step with the model (``SYS.update_sysfs``).

        Serving, it runs in the notifier's worker thread, in order with the
        node hooks and cache invalidations queued after it (files bind-mounted
        in a removed function's directory must be unmounted first, and an
        unmount may need this loop); else at once."""
        before = self._sysfs_view
        after = self._current_sysfs_view()
        self._sysfs_view = after
        root = self.sysfs_root
        if root is None or before is None or after is None:
            return
        apply = functools.partial(self._apply_sysfs, root, before, after, list(self.kernel.nodes()))
        if self._bg is None:
            apply()
        else:
            self._queue_notify(apply)

    def _apply_sysfs(self, root: Path, before: SYS.SysfsView, after: SYS.SysfsView,
                     nodes: list[DevNode]) -> None:
        for bdf, fn in before.functions.items():
            if bdf not in after.functions:
                for hook in self.sysfs_removing_hooks:
                    try:
                        hook(SYS.device_path(fn.dev))
                    except Exception:
                        log.exception("sysfs removal hook for %s", bdf)
        try:
            changed = SYS.update_sysfs(root, before, after, nodes)
        except OSError:
            log.exception("updating the sysfs at %s", root)
            return
        if changed:
            log.debug("sysfs: %s", ", ".join(changed))

    # -- writable sysfs attributes (.fakedev/sysfs) ------------------------------------
    def sysfs_attributes(self) -> list[SYS.SysAttr]:
        """The writable attributes this server serves (none for a model without a driver core)."""
        topology = getattr(self.kernel, "topology", None)
        drivers = getattr(self.kernel, "drivers", None)
        if topology is None or drivers is None or not hasattr(self.kernel, "bind_store"):
            return []
        return SYS.writable_attributes(topology, list(drivers))

    def _read_sysattr(self, req: P.ReadRequest, attr: SYS.SysAttr) -> bytes | Deferred:
        def fn(task: ProcessTask) -> bytes:
            k: Any = self.kernel
            data = k.driver_override_show(attr.arg).encode() if attr.kind == "driver_override" else b""
            return P.reply_data(req.unique, data[req.offset:req.offset + req.size])

        return self._model(req, fn)

    def _sysattr_store(self, attr: SYS.SysAttr, data: bytes, pid: int) -> Any:
        """The model's store for ``attr`` (model lock held): an int, or a ``Blocked``."""
        k: Any = self.kernel
        kind, arg = attr.kind, attr.arg
        if kind == "drivers_probe":
            return k.drivers_probe_store(data)
        if kind == "reset":
            return k.reset_store(arg, data, pid)
        return getattr(k, f"{kind}_store")(arg, data)

    def _write_sysattr(self, req: P.WriteRequest, attr: SYS.SysAttr) -> Deferred:
        """A write to a sysfs attribute. It returns when the kernel's would: at
        once, or (an unbind or remove of a vfio-pci device a file holds, or any
        write waiting for that device's lock) when the device is released,
        the REQ timer asking meanwhile. The writer's fatal signal ends the wait
        with EINTR (the unbind stays pending, as the kernel's does once its
        wait was interrupted), so a killed writer never hangs in the FUSE
        request; the reply is sent once the nodes and sysfs show the change."""
        data = bytes(req.data)
        unique, tid = req.unique, req.pid
        tracer = self.tracer

        def done(err: int | None, waited: bool) -> bytes:
            if tracer.enabled:
                tracer.sysfs_write(tid, attr.sys_rel, data, err, waited=waited)
            return P.reply_write(unique, len(data)) if err is None else P.reply_error(unique, err)

        async def run() -> bytes:
            waited = False
            while True:
                async with self.lock:
                    try:
                        res = self._sysattr_store(attr, data, tid)
                    except KernelError as e:
                        return done(e.errno, waited)
                    except Exception:
                        self.unexpected_errors += 1
                        log.exception("sysfs %s %s failed on %r", attr.kind, attr.arg, data)
                        return done(errno.EIO, waited)
                    self.refresh_nodes()
                    if getattr(self.kernel, "unplugs", None) or getattr(self.kernel, "unbinds", None):
                        self._start_unplug_timer()
                    self._poke_pollers()
                pending = getattr(res, "pending", None)
                if pending is None:
                    await self._notified()
                    return done(None, waited)
                waited = True
                while not pending.done:
                    if _fatal_signal_pending(tid):
                        return done(errno.EINTR, waited)
                    await trio.sleep(SYSFS_WAIT_POLL)
                if not res.retry:
                    await self._notified()
                    return done(None, waited)

        return run

    async def _notified(self) -> None:
        """Wait until what is queued for the notifier (node hooks, sysfs) is done (10 s at most)."""
        if self._bg is None:
            return
        done = trio.Event()
        self._queue_notify(functools.partial(trio.from_thread.run_sync, done.set))
        with trio.move_on_after(10.0):
            await done.wait()

    def _queue_notify(self, msg: bytes | Callable[[], None]) -> None:
        if self._bg is None:
            return
        try:
            self._notify_send.send_nowait(msg)
        except trio.WouldBlock:
            log.warning("dropping a cache invalidation: too many queued")

    async def _notifier(self) -> None:
        """Write queued notifications, each from a worker thread (the kernel may
        block the write until a request this loop must answer is done)."""
        async for msg in self._notify_recv:
            if not isinstance(msg, bytes):
                await trio.to_thread.run_sync(self._run_hook, msg, abandon_on_cancel=True)
                continue
            session = self.session
            if session is None or session.closed:
                continue
            await trio.to_thread.run_sync(session.send, msg, abandon_on_cancel=True)

    @staticmethod
    def _run_hook(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            log.exception("node removal hook")

    def _start_unplug_timer(self) -> None:
        if self._bg is None:
            return
        if not _on_trio_thread():
            trio.from_thread.run_sync(self._start_unplug_timer)
            return
        self._unplug_wake.set()
        if self._unplug_timer_on:
            return
        self._unplug_timer_on = True
        self._bg.start_soon(self._unplug_timer)

    async def _unplug_timer(self) -> None:
        """vfio_unregister_group_dev()'s 10 s waits: tick the model while a removal is pending."""
        done = False
        try:
            while True:
                self._unplug_wake = trio.Event()
                async with self.lock:
                    nxt = self.kernel.unplug_tick(time.monotonic())  # type: ignore[attr-defined]
                    if nxt is None:
                        self.refresh_nodes()
                        done = True
                        return
                with trio.move_on_after(max(0.0, nxt - time.monotonic())):
                    await self._unplug_wake.wait()
        finally:
            self._unplug_timer_on = False
            if done and getattr(self.kernel, "unplugs", None):
                self._start_unplug_timer()  # an unplug came in while this timer was ending

    def _h_forget(self, req: P.ForgetRequest | P.BatchForgetRequest) -> None:
        """The kernel dropped these inodes: a removed node kept for getattr (``_gone``)
        can go now, no call can name it any more (inode numbers are never reused)."""
        inos = [req.nodeid] if isinstance(req, P.ForgetRequest) else [ino for ino, _ in req.forgets]
        for ino in inos:
            if self._gone.pop(ino, None) is not None:
                self._devnodes.pop(ino, None)

    def _identity(self, req: P.IoctlRequest) -> bytes:
        """Which open is this? Answered only to our own threads (fget's worker)."""
        if req.fh not in self._files and req.fh not in self._controls and req.fh not in self._unbound:
            return P.reply_error(req.unique, errno.ENOTTY)
        if req.pid not in self._worker_tids and not os.path.exists(f"/proc/self/task/{req.pid}"):
            return P.reply_error(req.unique, errno.ENOTTY)
        return P.reply_ioctl(req.unique, req.fh)


#: how often a write waiting for a release looks at the writer's signals
SYSFS_WAIT_POLL = 0.1
SIGKILL_MASK = 1 << 8  # bit (SIGKILL - 1) of /proc/<tid>/status SigPnd/ShdPnd


def _fatal_signal_pending(tid: int) -> bool:
    """True if thread ``tid`` is gone or has a fatal signal pending (the kernel
    marks a fatal signal as SIGKILL pending on every thread it kills)."""
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            text = f.read()
    except OSError:
        return True
    for line in text.splitlines():
        if line.startswith((b"SigPnd:", b"ShdPnd:")) and int(line.split()[1], 16) & SIGKILL_MASK:
            return True
    return False


def _on_trio_thread() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True
