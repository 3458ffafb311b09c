"""Scenario runner for the kernel-model conformance suite.

A ``Scenario`` is data: a topology name (one of the fixture topologies built by
``tests/kernel/topologies.py``), the kernel versions it holds for, and a list
of steps. A step is one call made by a named ``FakeProcess`` (open a node,
close an fd, an ioctl whose argument is built from the ``fakedev.uapi``
layouts, a region read/write, a process exit) or a check of visible state
(``reset_log`` growth, a field of ``describe()``). Each call step names what
must come back: an errno (``err=``) or a return value (``ret=``), and the
fields/entries the kernel must have written into the caller's buffer.

After *every* step the runner asserts ``k.check_invariants() == []``, and
after every failed call that the kernel state did not change: the
``describe()`` snapshot, the length of ``reset_log`` and every process's fd
table compare equal to what they were before the call.

Steps refer to fds by name (``"d0"``, ``"ictx"``) and to values saved from
earlier outputs with ``V("devid0")``; ``FD("name")`` is the fd number itself
where a struct field carries an fd. Nothing in this module knows what the
right answer is: the answers live in ``tests/kernel/scenarios/``.
"""

from __future__ import annotations

import copy
import errno as E
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fakedev.kernel.errors import KernelError, errname
from fakedev.kernel.testing import FakeProcess, FakeTask
from fakedev.kernel.version import KernelVersion
from fakedev.uapi import consts as C
from fakedev.uapi import ioctls as IO
from fakedev.uapi import structs as S
from fakedev.uapi.layout import Layout

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"

BOTH = ("6.6", "6.12")
V66 = ("6.6",)
V612 = ("6.12",)

#: fill byte for output areas the kernel must not touch
SENTINEL = 0xA5
UNTOUCHED = "untouched"
ANY = "any"


# --------------------------------------------------------------------------
# References resolved when a step runs
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class V:
    """A value saved by an earlier step (``save={"name": "field"}``)."""

    name: str
    plus: int = 0


@dataclass(frozen=True)
class FD:
    """The fd number of a named open (in whichever process opened it)."""

    name: str


@dataclass(frozen=True)
class Lazy:
    """Computed from the world when the step runs (group ids, bdfs...)."""

    fn: Callable[[World], Any]
    text: str = "lazy"

    def __repr__(self) -> str:
        return self.text


def resolve(x: Any, w: World) -> Any:
    if isinstance(x, V):
        return w.vals[x.name] + x.plus
    if isinstance(x, FD):
        return w.fd(x.name)
    if isinstance(x, Lazy):
        return x.fn(w)
    if isinstance(x, list | tuple):
        return type(x)(resolve(i, w) for i in x)
    if isinstance(x, dict):
        return {k: resolve(v, w) for k, v in x.items()}
    return x


def group_of(bdf: str) -> Lazy:
    """The iommu group id of PCI function ``bdf`` in this world's topology."""
    return Lazy(lambda w: w.pdev(bdf).iommu_group, f"group_of({bdf})")


def group_path(bdf: str) -> Lazy:
    return Lazy(lambda w: f"vfio/{w.pdev(bdf).iommu_group}", f"group_path({bdf})")


def host_driver(bdf: str, driver: str = "ixgbe") -> Callable[[Any], None]:
    """A topology tweak: bind ``bdf`` to a host kernel driver."""

    def tweak(topo: Any) -> None:
        d = topo.find(bdf)
        assert d is not None, bdf
        d.driver = driver

    return tweak


def cdev_path(bdf: str) -> Lazy:
    return Lazy(lambda w: f"vfio/devices/vfio{w.vfio_index(bdf)}", f"cdev_path({bdf})")


def entry(devid: Any, bdf: str) -> tuple[Any, int, int, int]:
    """One vfio_pci_dependent_device as (devid|group_id, segment, bus, devfn)."""
    dom, bus, df = bdf.split(":")
    slot, fn = df.split(".")
    return (devid, int(dom, 16), int(bus, 16), (int(slot, 16) << 3) | int(fn))


def gentry(bdf: str) -> Any:
    """Group-mode entry: (group_id of ``bdf``, seg, bus, devfn)."""
    return Lazy(lambda w: entry(w.pdev(bdf).iommu_group, bdf), f"gentry({bdf})")


# --------------------------------------------------------------------------
# The world a scenario runs in
# --------------------------------------------------------------------------


def build_topology(name: str) -> Any:
    """A fresh PciTopology for fixture topology ``name``.

    From ``tests/kernel/topologies.py`` when it offers a builder, else from
    ``fixtures/<name>.toml`` through the device-tree loader.
    """
    try:
        from tests.kernel import topologies as T
    except ImportError:
        T = None
    known = getattr(T, "NAMES", None) if T is not None else None
    if T is not None and (known is None or name in known):
        for attr in ("build", "build_topology", "topology", "make"):
            fn = getattr(T, attr, None)
            if callable(fn):
                return fn(name)
        for attr in ("TOPOLOGIES", "BUILDERS", "ALL"):
            table = getattr(T, attr, None)
            if isinstance(table, dict) and name in table:
                b = table[name]
                return b() if callable(b) else copy.deepcopy(b)
        fn = getattr(T, name.replace("-", "_"), None)
        if callable(fn):
            return fn()
    from fakedev.tree import load_tree

    return load_tree(FIXTURES / f"{name}.toml").topology


class StepFailure(AssertionError):
    pass


#: describe() keys that only record resets (compared separately, see ``snapshot``)
RESET_KEYS = ("resets", "reset_log")


def _strip_resets(d: Any) -> Any:
    d = copy.deepcopy(d)
    for k in RESET_KEYS:
        d.pop(k, None)
    for dev in d.get("devices", []):
        dev.pop("needs_reset", None)
    return d


def snapshot(w: World) -> Any:
    """Kernel state a failed call must leave alone: describe() (minus reset records) and fd tables.

    Resets are compared separately (``unwind_resets``): the kernel itself
    resets a dev_set when it unwinds a half-done open (vfio_df_close in the
    error path of vfio_df_group_open), so a failed call may add reset records
    whose cause is "close", and nothing else.
    """
    return (
        _strip_resets(w.k.describe()),
        {p: sorted(proc.fds) for p, proc in w.procs.items() if proc.fds},
        foreign_refs(w),
    )


def foreign_refs(w: World) -> dict[tuple[str, int], int]:
    """References held on each foreign file (eventfd, pipe): fget without fput leaks one."""
    return {(p, fd): f.refs for p, proc in w.procs.items() for fd, f in proc.fds.items()
            if hasattr(f, "refs") and not hasattr(f, "ioctl")}


def bad_failure_resets(w: World, mark: int) -> list[str]:
    """Reset records added since ``mark`` that a failed call may not make."""
    return [f"{r.bdf} {r.method} ({r.cause})" for r in w.k.reset_log[mark:] if r.cause != "close"]


class World:
    """One Kernel and the processes that talk to it."""

    def __init__(self, topology: str, version: str, tweak: Callable[[Any], None] | None = None) -> None:
        from fakedev.kernel.kernel import Kernel

        self.topology_name = topology
        self.version = KernelVersion.parse(version)
        self.topo = build_topology(topology)
        if tweak is not None:
            tweak(self.topo)
        self.k = Kernel(self.topo, version=self.version)
        self.procs: dict[str, FakeProcess] = {}
        self.tasks: dict[str, FakeTask] = {}
        self.fds: dict[str, tuple[str, int]] = {}
        self.vals: dict[str, int] = {}
        self.reset_mark = 0
        self.last: Any = None  # last call's output (dict of fields) for Check steps

    # -- lookups -------------------------------------------------------
    def proc(self, name: str) -> FakeProcess:
        if name not in self.procs:
            self.procs[name] = FakeProcess()
            self.tasks[name] = self.procs[name].task()
        return self.procs[name]

    def task(self, name: str) -> FakeTask:
        self.proc(name)
        return self.tasks[name]

    def fd(self, name: str) -> int:
        if name not in self.fds:
            raise StepFailure(f"no fd named {name!r}")
        return self.fds[name][1]

    def pdev(self, bdf: str) -> Any:
        d = self.topo.find(bdf)
        if d is None:
            raise StepFailure(f"topology {self.topology_name} has no {bdf}")
        return d

    def vfio_index(self, bdf: str) -> int:
        for vd in self.k.vfio_devices():
            if vd.pdev.name == bdf:
                return int(vd.index)
        raise StepFailure(f"{bdf} is not a vfio device in {self.topology_name}")

    def file_of(self, name: str) -> Any:
        p, fd = self.fds[name]
        return self.procs[p].fds[fd]

    def resets_since_mark(self) -> list[str]:
        out = [reset_bdf(r) for r in self.k.reset_log[self.reset_mark :]]
        self.reset_mark = len(self.k.reset_log)
        return out

    def invariants(self) -> list[str]:
        return list(self.k.check_invariants())


def reset_bdf(rec: Any) -> str:
    """The function a reset_log record names, as a BDF string."""
    for attr in ("bdf", "name", "device", "pdev", "dev"):
        v = getattr(rec, attr, None)
        if v is None and isinstance(rec, dict):
            v = rec.get(attr)
        if v is None:
            continue
        if isinstance(v, str):
            return v
        n = getattr(v, "name", None)
        if isinstance(n, str):
            return n
    if isinstance(rec, tuple | list):
        for v in rec:
            if isinstance(v, str) and v.count(":") == 2:
                return v
            n = getattr(v, "name", None)
            if isinstance(n, str):
                return n
    return str(rec)


def reset_kind(rec: Any) -> str:
    for attr in ("method", "kind", "how", "why", "reason"):
        v = getattr(rec, attr, None)
        if v is None and isinstance(rec, dict):
            v = rec.get(attr)
        if v is not None:
            return str(getattr(v, "value", v))
    return ""


# --------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------


class Step:
    """One step; subclasses are dataclasses with ``proc``, ``err``, ``ret``."""

    proc: str
    err: int | None
    ret: Any

    def call(self, w: World) -> Any:
        """Make the call; return its value or raise KernelError."""
        raise NotImplementedError

    def after(self, w: World, result: Any, err: int | None) -> None:
        """Check outputs (only when the errno/return matched)."""

    def is_call(self) -> bool:
        return True


@dataclass
class Open(Step):
    proc: str
    path: Any
    name: str
    err: int | None = None
    ret: Any = ANY

    def call(self, w: World) -> Any:
        path = resolve(self.path, w)
        f = w.k.open(path, w.task(self.proc))
        fd = w.proc(self.proc).install(f)
        w.fds[self.name] = (self.proc, fd)
        return fd


@dataclass
class Close(Step):
    proc: str
    name: str
    err: int | None = None
    ret: Any = ANY

    def call(self, w: World) -> Any:
        p, fd = w.fds.pop(self.name)
        w.procs[p].close(fd)
        return 0


@dataclass
class Exit(Step):
    proc: str
    err: int | None = None
    ret: Any = ANY

    def call(self, w: World) -> Any:
        w.proc(self.proc).exit()
        for n, (p, _fd) in list(w.fds.items()):
            if p == self.proc:
                del w.fds[n]
        return 0


@dataclass
class Pipe(Step):
    """A foreign fd: ``kind`` "eventfd" or "pipe"."""

    proc: str
    name: str
    kind: str = "eventfd"
    err: int | None = None
    ret: Any = ANY

    def call(self, w: World) -> Any:
        p = w.proc(self.proc)
        fd = p.eventfd()[0] if self.kind == "eventfd" else p.pipe()
        w.fds[self.name] = (self.proc, fd)
        return fd


@dataclass
class NewProc(Step):
    """A process with the given capabilities (default: none)."""

    proc: str
    caps: frozenset[int] = frozenset({17, 21, 24})
    #: the glue cannot create fds in this process (fd_install -> ENOTTY)
    no_fd_install: bool = False
    err: int | None = None
    ret: Any = ANY

    def call(self, w: World) -> Any:
        assert self.proc not in w.procs, f"process {self.proc} exists"
        w.procs[self.proc] = FakeProcess(caps=self.caps)
        w.tasks[self.proc] = (NoInstallTask(w.procs[self.proc], w.procs[self.proc].pid) if self.no_fd_install
                              else w.procs[self.proc].task())
        return 0


class NoInstallTask(FakeTask):
    """A task whose fds the glue cannot create (Task.fd_install raises ENOTTY)."""

    def fd_install(self, file: Any) -> int:
        raise KernelError(E.ENOTTY, "cannot install fds in this process")


@dataclass
class Dup(Step):
    """A second fd of the same open file (dup(2))."""

    proc: str
    name: str
    new: str
    err: int | None = None
    ret: Any = ANY

    def call(self, w: World) -> Any:
        f = w.file_of(self.name)
        fd = w.proc(self.proc).install(f)
        w.fds[self.new] = (self.proc, fd)
        return fd


@dataclass
class Ioctl(Step):
    """ioctl(fd, cmd, arg) with ``arg`` a struct built from ``layout``.

    ``arg``: "struct" (pointer to the packed struct + ``trailer``), "int" (the
    integer ``value``), "ptr_int" (pointer to an int ``value``), "string"
    (pointer to a NUL-terminated ``value``), "none" (0).
    ``mapped``: only the first ``mapped`` bytes of the buffer exist, placed to
    end at a page boundary (the rest faults). ``addr``: a raw pointer instead.
    ``out``: fields expected in the buffer afterwards; ``entries``: expected
    8-byte dependent-device entries after a 12-byte header (or ``UNTOUCHED``).
    ``save``: {value name: output field} kept for later steps.
    """

    proc: str
    fdname: Any
    cmd: int
    layout: Layout | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    arg: str = "struct"
    value: Any = 0
    buflen: int | None = None
    trailer: Any = b""
    mapped: int | None = None
    addr: int | None = None
    err: int | None = None
    ret: Any = 0
    out: dict[str, Any] = field(default_factory=dict)
    #: keep only this many bytes of the packed struct (the rest of the buffer is SENTINEL)
    pack_len: int | None = None
    entries: Any = None
    entry_size: int = 8
    entry_at: int = 12
    save: dict[str, str] = field(default_factory=dict)
    save_fd: str | None = None
    check: Callable[[World, dict[str, int], bytes], None] | None = None

    def __repr__(self) -> str:
        io = None
        for cand in IO.IOCTLS:
            if cand.cmd == self.cmd:
                io = cand.name if io is None else f"{io}|{cand.name}"
        f = ", ".join(f"{k}={v!r}" for k, v in self.fields.items())
        exp = f"-> {errname(self.err)}" if self.err is not None else f"-> {self.ret!r}"
        return f"{self.proc}: ioctl({self.fdname}, {io or hex(self.cmd)}, {{{f}}}) {exp}"

    def _fd(self, w: World) -> int:
        if isinstance(self.fdname, int):
            return self.fdname
        return w.fd(self.fdname)

    def call(self, w: World) -> Any:
        p = w.proc(self.proc)
        t = w.task(self.proc)
        self._buf_addr: int | None = None
        if self.arg == "struct":
            assert self.layout is not None
            vals = resolve(self.fields, w)
            data = bytearray(self.layout.pack(vals))
            if self.pack_len is not None:
                data = data[: self.pack_len]
            trailer = resolve(self.trailer, w)
            if isinstance(trailer, list):  # list of s32 (group fds) / u32
                trailer = b"".join(struct.pack("<i", int(v)) if v < 0x80000000 else struct.pack("<I", v) for v in trailer)
            data += bytes(trailer)
            if self.buflen is not None and self.buflen > len(data):
                data += bytes([SENTINEL]) * (self.buflen - len(data))
            self._data = bytes(data)
            if self.addr is not None:
                addr = self.addr
            elif self.mapped is not None:
                addr = p.alloc_at_end(bytes(data[: self.mapped]))
                self._buf_addr = addr
            else:
                addr = p.alloc(bytes(data))
                self._buf_addr = addr
        elif self.arg == "int":
            addr = resolve(self.value, w)
        elif self.arg == "ptr_int":
            v = resolve(self.value, w)
            addr = self.addr if self.addr is not None else p.alloc(struct.pack("<i", v))
        elif self.arg == "string":
            v = resolve(self.value, w)
            addr = self.addr if self.addr is not None else p.alloc(v.encode() + b"\0")
        else:
            addr = 0
        fd = self._fd(w)
        f = p.fds.get(fd)
        if f is None:
            raise KernelError(E.EBADF, "test: fd not open")
        if not hasattr(f, "ioctl"):
            raise KernelError(E.ENOTTY, "test: foreign fd")
        r = f.ioctl(t, self.cmd, addr)
        if self.save_fd is not None:
            w.fds[self.save_fd] = (self.proc, int(r))
        return r

    def readback(self, w: World) -> tuple[dict[str, int], bytes]:
        if self._buf_addr is None or self.layout is None:
            return {}, b""
        n = self.mapped if self.mapped is not None else len(self._data)
        raw = w.proc(self.proc).peek(self._buf_addr, n)
        return self.layout.unpack(raw, partial=True), raw

    def after(self, w: World, result: Any, err: int | None) -> None:
        vals, raw = self.readback(w)
        w.last = vals
        for k, want in resolve(self.out, w).items():
            got = vals.get(k)
            if want != ANY and got != want:
                raise StepFailure(f"field {k}: expected {_fmt(want)}, got {_fmt(got)}")
        if self.entries is not None:
            want_e = resolve(self.entries, w)
            area = raw[self.entry_at :]
            if want_e == UNTOUCHED:
                if any(b != SENTINEL for b in area):
                    raise StepFailure(f"entries area was written: {area.hex()}")
            else:
                got_e = []
                for i in range(len(want_e)):
                    chunk = area[i * 8 : i * 8 + 8]
                    if len(chunk) < 8:
                        raise StepFailure("entries run past the buffer")
                    if chunk == bytes([SENTINEL]) * 8:
                        got_e.append(UNTOUCHED)
                    else:
                        got_e.append(struct.unpack("<IHBB", chunk))
                if [tuple(e) if e != UNTOUCHED else e for e in want_e] != got_e:
                    raise StepFailure(f"entries: expected {_fmt_entries(want_e)}, got {_fmt_entries(got_e)}")
        for name, fld in self.save.items():
            w.vals[name] = vals[fld]
        if self.check is not None:
            self.check(w, vals, raw)


@dataclass
class Read(Step):
    proc: str
    fdname: str
    offset: int
    size: int
    err: int | None = None
    ret: Any = ANY
    data: bytes | None = None

    def call(self, w: World) -> Any:
        p, fd = w.fds[self.fdname]
        return w.procs[p].fds[fd].read(w.task(self.proc), self.offset, self.size)

    def after(self, w: World, result: Any, err: int | None) -> None:
        if self.data is not None and result != self.data:
            raise StepFailure(f"read: expected {self.data.hex()}, got {bytes(result).hex()}")


@dataclass
class Write(Step):
    proc: str
    fdname: str
    offset: int
    data: bytes
    err: int | None = None
    ret: Any = ANY

    def call(self, w: World) -> Any:
        p, fd = w.fds[self.fdname]
        return w.procs[p].fds[fd].write(w.task(self.proc), self.offset, self.data)


@dataclass
class Check(Step):
    """A check of visible state; ``fn(world)`` raises AssertionError on failure."""

    fn: Callable[[World], None]
    text: str = "check"
    proc: str = "-"

    def is_call(self) -> bool:
        return False

    def call(self, w: World) -> Any:
        self.fn(w)
        return 0

    def __repr__(self) -> str:
        return f"check: {self.text}"


def Resets(*bdfs: str, exact: bool = True) -> Check:
    """The functions reset since the previous Resets check (order-free)."""

    def fn(w: World) -> None:
        got = w.resets_since_mark()
        if exact:
            assert sorted(got) == sorted(bdfs), f"resets: expected {sorted(bdfs)}, got {sorted(got)}"
        else:
            assert set(bdfs) <= set(got), f"resets: expected at least {sorted(bdfs)}, got {sorted(got)}"

    return Check(fn, f"resets == {list(bdfs)}")


def NoResets() -> Check:
    return Resets()


def MarkResets() -> Check:
    def fn(w: World) -> None:
        w.reset_mark = len(w.k.reset_log)

    return Check(fn, "mark reset_log")


def Same(a: str, b: Any) -> Check:
    def fn(w: World) -> None:
        va, vb = w.vals[a], resolve(b, w)
        assert va == vb, f"{a}={va} != {vb}"

    return Check(fn, f"{a} == {b!r}")


def Differ(a: str, b: str) -> Check:
    def fn(w: World) -> None:
        assert w.vals[a] != w.vals[b], f"{a} == {b} == {w.vals[a]}"

    return Check(fn, f"{a} != {b}")


# --------------------------------------------------------------------------
# uAPI-shaped step builders
# --------------------------------------------------------------------------


def _exp(kw: dict[str, Any]) -> dict[str, Any]:
    return kw


def ioctl(p: str, fd: Any, cmd: int, layout: Layout | None = None, **kw: Any) -> Ioctl:
    return Ioctl(p, fd, cmd, layout, **kw)


def vfio_struct(p: str, fd: Any, cmd: int, layout: Layout, minsz_default: int | None = None,
                argsz: int | None = None, fields: dict[str, Any] | None = None, **kw: Any) -> Ioctl:
    flds = dict(fields or {})
    flds.setdefault("argsz", argsz if argsz is not None else (minsz_default or layout.size))
    return Ioctl(p, fd, cmd, layout, fields=flds, **kw)


def iommufd_struct(p: str, fd: Any, cmd: int, layout: Layout, size: int | None = None,
                   fields: dict[str, Any] | None = None, **kw: Any) -> Ioctl:
    flds = dict(fields or {})
    flds.setdefault("size", size if size is not None else layout.size)
    return Ioctl(p, fd, cmd, layout, fields=flds, **kw)


# -- VFIO device ---------------------------------------------------------------


def bind(p: str, dev: str, ictx: Any, *, argsz: int = S.VFIO_DEVICE_BIND_IOMMUFD_SIZE_6_6, flags: int = 0,
         save: str | None = None, devid: Any = None, **kw: Any) -> Ioctl:
    """VFIO_DEVICE_BIND_IOMMUFD; ``ictx`` an fd name or a raw int fd."""
    ifd = FD(ictx) if isinstance(ictx, str) else ictx
    out = dict(kw.pop("out", {}))
    if devid is not None:
        out["out_devid"] = devid
    return vfio_struct(p, dev, IO.VFIO_DEVICE_BIND_IOMMUFD, S.VFIO_DEVICE_BIND_IOMMUFD,
                       argsz=argsz, fields={"flags": flags, "iommufd": ifd}, out=out,
                       save={save: "out_devid"} if save else {}, **kw)


def attach(p: str, dev: str, pt: Any, *, argsz: int = S.VFIO_DEVICE_ATTACH_IOMMUFD_PT_SIZE_6_6, flags: int = 0,
           save: str | None = None, pt_out: Any = None, **kw: Any) -> Ioctl:
    out = dict(kw.pop("out", {}))
    if pt_out is not None:
        out["pt_id"] = pt_out
    return vfio_struct(p, dev, IO.VFIO_DEVICE_ATTACH_IOMMUFD_PT, S.VFIO_DEVICE_ATTACH_IOMMUFD_PT,
                       argsz=argsz, fields={"flags": flags, "pt_id": pt}, out=out,
                       save={save: "pt_id"} if save else {}, **kw)


def detach(p: str, dev: str, *, argsz: int = S.VFIO_DEVICE_DETACH_IOMMUFD_PT_SIZE_6_6, flags: int = 0,
           **kw: Any) -> Ioctl:
    return vfio_struct(p, dev, IO.VFIO_DEVICE_DETACH_IOMMUFD_PT, S.VFIO_DEVICE_DETACH_IOMMUFD_PT,
                       argsz=argsz, fields={"flags": flags}, **kw)


def hot_reset_info(p: str, dev: str, *, argsz: int = 12 + 8 * 8, flags: int = 0, count: Any = None,
                   out_flags: Any = None, entries: Any = None, **kw: Any) -> Ioctl:
    """VFIO_DEVICE_GET_PCI_HOT_RESET_INFO; the entry area is prefilled with SENTINEL."""
    out = dict(kw.pop("out", {}))
    if count is not None:
        out["count"] = count
    if out_flags is not None:
        out["flags"] = out_flags
    buflen = kw.pop("buflen", max(argsz, 12))
    return vfio_struct(p, dev, IO.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, S.VFIO_PCI_HOT_RESET_INFO,
                       argsz=argsz, fields={"flags": flags, "count": 0}, buflen=buflen,
                       out=out, entries=entries, **kw)


def hot_reset(p: str, dev: str, fds: Sequence[Any] = (), *, count: int | None = None, argsz: int | None = None,
              flags: int = 0, **kw: Any) -> Ioctl:
    """VFIO_DEVICE_PCI_HOT_RESET with group fds ``fds`` (names, FD refs or raw ints)."""
    arr = [FD(f) if isinstance(f, str) else f for f in fds]
    n = len(arr) if count is None else count
    return vfio_struct(p, dev, IO.VFIO_DEVICE_PCI_HOT_RESET, S.VFIO_PCI_HOT_RESET,
                       argsz=argsz if argsz is not None else 12 + 4 * len(arr),
                       fields={"flags": flags, "count": n}, trailer=list(arr), **kw)


def device_info(p: str, dev: str, *, argsz: int = 24, **kw: Any) -> Ioctl:
    return vfio_struct(p, dev, IO.VFIO_DEVICE_GET_INFO, S.VFIO_DEVICE_INFO, argsz=argsz, **kw)


def region_info(p: str, dev: str, index: int, *, argsz: int = 32, **kw: Any) -> Ioctl:
    return vfio_struct(p, dev, IO.VFIO_DEVICE_GET_REGION_INFO, S.VFIO_REGION_INFO, argsz=argsz,
                       fields={"index": index}, buflen=kw.pop("buflen", max(argsz, 32)), **kw)


def irq_info(p: str, dev: str, index: int, *, argsz: int = 16, **kw: Any) -> Ioctl:
    return vfio_struct(p, dev, IO.VFIO_DEVICE_GET_IRQ_INFO, S.VFIO_IRQ_INFO, argsz=argsz,
                       fields={"index": index}, **kw)


def set_irqs(p: str, dev: str, *, index: int = 0, flags: int, start: int = 0, count: int = 0,
             data: Any = b"", argsz: int | None = None, **kw: Any) -> Ioctl:
    return vfio_struct(p, dev, IO.VFIO_DEVICE_SET_IRQS, S.VFIO_IRQ_SET,
                       argsz=argsz if argsz is not None else 20 + (len(data) if isinstance(data, bytes) else 4 * count),
                       fields={"flags": flags, "index": index, "start": start, "count": count},
                       trailer=data, **kw)


def device_reset(p: str, dev: str, **kw: Any) -> Ioctl:
    return Ioctl(p, dev, IO.VFIO_DEVICE_RESET, None, arg="none", **kw)


def feature(p: str, dev: str, flags: int, *, argsz: int = 8, data: bytes = b"", **kw: Any) -> Ioctl:
    return vfio_struct(p, dev, IO.VFIO_DEVICE_FEATURE, S.VFIO_DEVICE_FEATURE, argsz=argsz,
                       fields={"flags": flags}, trailer=data, **kw)


# -- VFIO group / container ------------------------------------------------------


def group_status(p: str, grp: str, *, argsz: int = 8, flags: Any = None, **kw: Any) -> Ioctl:
    out = dict(kw.pop("out", {}))
    if flags is not None:
        out["flags"] = flags
    return vfio_struct(p, grp, IO.VFIO_GROUP_GET_STATUS, S.VFIO_GROUP_STATUS, argsz=argsz, out=out, **kw)


def set_container(p: str, grp: str, fd: Any, **kw: Any) -> Ioctl:
    v = FD(fd) if isinstance(fd, str) else fd
    return Ioctl(p, grp, IO.VFIO_GROUP_SET_CONTAINER, None, arg="ptr_int", value=v, **kw)


def unset_container(p: str, grp: str, **kw: Any) -> Ioctl:
    return Ioctl(p, grp, IO.VFIO_GROUP_UNSET_CONTAINER, None, arg="none", **kw)


def get_device_fd(p: str, grp: str, name: str, save_fd: str | None = None, **kw: Any) -> Ioctl:
    kw.setdefault("ret", ANY)
    return Ioctl(p, grp, IO.VFIO_GROUP_GET_DEVICE_FD, None, arg="string", value=name, save_fd=save_fd, **kw)


def set_iommu(p: str, cont: str, typ: int = C.VFIO_TYPE1v2_IOMMU, **kw: Any) -> Ioctl:
    return Ioctl(p, cont, IO.VFIO_SET_IOMMU, None, arg="int", value=typ, **kw)


def check_extension(p: str, cont: str, ext: int, **kw: Any) -> Ioctl:
    return Ioctl(p, cont, IO.VFIO_CHECK_EXTENSION, None, arg="int", value=ext, **kw)


def api_version(p: str, cont: str, **kw: Any) -> Ioctl:
    return Ioctl(p, cont, IO.VFIO_GET_API_VERSION, None, arg="none", **kw)


# -- iommufd -----------------------------------------------------------------


def ioas_alloc(p: str, ictx: str, *, save: str | None = None, flags: int = 0, ioas: Any = None,
               **kw: Any) -> Ioctl:
    out = dict(kw.pop("out", {}))
    if ioas is not None:
        out["out_ioas_id"] = ioas
    return iommufd_struct(p, ictx, IO.IOMMU_IOAS_ALLOC, S.IOMMU_IOAS_ALLOC, fields={"flags": flags},
                          out=out, save={save: "out_ioas_id"} if save else {}, **kw)


def destroy(p: str, ictx: str, obj: Any, **kw: Any) -> Ioctl:
    return iommufd_struct(p, ictx, IO.IOMMU_DESTROY, S.IOMMU_DESTROY, fields={"id": obj}, **kw)


def ioas_map(p: str, ictx: str, ioas: Any, *, user_va: Any = 0x100000, length: int = 0x1000,
             iova: int = 0, flags: int = C.IOMMU_IOAS_MAP_READABLE | C.IOMMU_IOAS_MAP_WRITEABLE
             | C.IOMMU_IOAS_MAP_FIXED_IOVA, reserved: int = 0, save: str | None = None, **kw: Any) -> Ioctl:
    return iommufd_struct(p, ictx, IO.IOMMU_IOAS_MAP, S.IOMMU_IOAS_MAP,
                          fields={"flags": flags, "ioas_id": ioas, "__reserved": reserved, "user_va": user_va,
                                  "length": length, "iova": iova},
                          save={save: "iova"} if save else {}, **kw)


def ioas_unmap(p: str, ictx: str, ioas: Any, *, iova: int, length: int, **kw: Any) -> Ioctl:
    return iommufd_struct(p, ictx, IO.IOMMU_IOAS_UNMAP, S.IOMMU_IOAS_UNMAP,
                          fields={"ioas_id": ioas, "iova": iova, "length": length}, **kw)


def iova_ranges(p: str, ictx: str, ioas: Any, *, num_iovas: int = 0, reserved: int = 0, **kw: Any) -> Ioctl:
    return iommufd_struct(p, ictx, IO.IOMMU_IOAS_IOVA_RANGES, S.IOMMU_IOAS_IOVA_RANGES,
                          fields={"ioas_id": ioas, "num_iovas": num_iovas, "__reserved": reserved}, **kw)


def allow_iovas(p: str, ictx: str, ioas: Any, *, num_iovas: int = 0, reserved: int = 0, **kw: Any) -> Ioctl:
    return iommufd_struct(p, ictx, IO.IOMMU_IOAS_ALLOW_IOVAS, S.IOMMU_IOAS_ALLOW_IOVAS,
                          fields={"ioas_id": ioas, "num_iovas": num_iovas, "__reserved": reserved}, **kw)


def ioas_copy(p: str, ictx: str, dst: Any, src: Any, *, length: int, src_iova: int, dst_iova: int = 0,
              flags: int = C.IOMMU_IOAS_MAP_READABLE | C.IOMMU_IOAS_MAP_FIXED_IOVA, **kw: Any) -> Ioctl:
    return iommufd_struct(p, ictx, IO.IOMMU_IOAS_COPY, S.IOMMU_IOAS_COPY,
                          fields={"flags": flags, "dst_ioas_id": dst, "src_ioas_id": src, "length": length,
                                  "dst_iova": dst_iova, "src_iova": src_iova}, **kw)


def option(p: str, ictx: str, *, option_id: int, op: int, object_id: Any = 0, val64: int = 0,
           reserved: int = 0, **kw: Any) -> Ioctl:
    return iommufd_struct(p, ictx, IO.IOMMU_OPTION, S.IOMMU_OPTION,
                          fields={"option_id": option_id, "op": op, "__reserved": reserved,
                                  "object_id": object_id, "val64": val64}, **kw)


def vfio_ioas(p: str, ictx: str, *, op: int, ioas: Any = 0, reserved: int = 0, **kw: Any) -> Ioctl:
    return iommufd_struct(p, ictx, IO.IOMMU_VFIO_IOAS, S.IOMMU_VFIO_IOAS,
                          fields={"ioas_id": ioas, "op": op, "__reserved": reserved}, **kw)


def hwpt_alloc(p: str, ictx: str, dev_id: Any, pt_id: Any, *, flags: int = 0, reserved: int = 0,
               size: int = S.IOMMU_HWPT_ALLOC_SIZE_6_6, save: str | None = None, **kw: Any) -> Ioctl:
    return iommufd_struct(p, ictx, IO.IOMMU_HWPT_ALLOC, S.IOMMU_HWPT_ALLOC, size=size,
                          fields={"flags": flags, "dev_id": dev_id, "pt_id": pt_id, "__reserved": reserved},
                          save={save: "out_hwpt_id"} if save else {}, **kw)


def hw_info(p: str, ictx: str, dev_id: Any, *, flags: int = 0, reserved: int = 0, data_len: int = 0,
            data_uptr: int = 0, size: int = S.IOMMU_HW_INFO_SIZE_6_6, **kw: Any) -> Ioctl:
    return iommufd_struct(p, ictx, IO.IOMMU_GET_HW_INFO, S.IOMMU_HW_INFO, size=size,
                          fields={"flags": flags, "dev_id": dev_id, "__reserved": reserved,
                                  "data_len": data_len, "data_uptr": data_uptr}, **kw)


# --------------------------------------------------------------------------
# Scenarios and the runner
# --------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    topology: str
    versions: Sequence[str]
    steps: list[Step]
    #: {version or "*": reason}: known model bugs, marked xfail(strict=True)
    xfail: dict[str, str] = field(default_factory=dict)
    doc: str = ""
    #: applied to the fresh topology before the Kernel is built
    tweak: Callable[[Any], None] | None = None


def run(sc: Scenario, version: str) -> World:
    w = World(sc.topology, version, sc.tweak)
    bad = w.invariants()
    if bad:
        raise StepFailure(f"[{sc.name} @ {version}] invariants broken before step 0: {bad}")
    for i, step in enumerate(sc.steps):
        where = f"[{sc.name} @ {version}] step {i}: {step!r}"
        before = snapshot(w) if step.is_call() else None
        nresets = len(w.k.reset_log)
        try:
            result = step.call(w)
            err = None
        except KernelError as e:
            result, err = None, e.errno
        except AssertionError as e:
            raise StepFailure(f"{where}\n  {e}") from None
        bad = w.invariants()
        if bad:
            raise StepFailure(f"{where}\n  invariants broken: {bad}")
        leaked = {k: n for k, n in foreign_refs(w).items()
                  if n != 1 and type(w.procs[k[0]].fds[k[1]]).__name__ == "FakeOther"}
        if leaked:
            raise StepFailure(f"{where}\n  references leaked on foreign files: {leaked}")
        if err is not None and before is not None:
            after = snapshot(w)
            if after != before:
                raise StepFailure(f"{where}\n  failed with {errname(err)} but changed state:\n"
                                  f"  before={before}\n  after ={after}")
            bad_resets = bad_failure_resets(w, nresets)
            if bad_resets:
                raise StepFailure(f"{where}\n  failed with {errname(err)} but reset {bad_resets}")
        if step.is_call():
            if step.err is not None:
                if err != step.err:
                    got = errname(err) if err is not None else f"success ({result!r})"
                    raise StepFailure(f"{where}\n  expected {errname(step.err)}, got {got}")
            else:
                if err is not None:
                    raise StepFailure(f"{where}\n  expected success, got {errname(err)}")
                if step.ret != ANY and result != step.ret:
                    raise StepFailure(f"{where}\n  expected return {step.ret!r}, got {result!r}")
            try:
                step.after(w, result, err)
            except (StepFailure, AssertionError) as e:
                raise StepFailure(f"{where}\n  {e}") from None
    return w


def _fmt(v: Any) -> str:
    return hex(v) if isinstance(v, int) else repr(v)


def _fmt_entries(es: Any) -> str:
    return "[" + ", ".join(
        e if isinstance(e, str) else "{" + ", ".join(_fmt(x) for x in e) + "}" for e in es) + "]"


def SetHook(name: str, value: Any) -> Check:
    """Set a fault-injection hook of ``k.hooks`` (``memory_lock_contended``...)."""

    def fn(w: World) -> None:
        setattr(w.k.hooks, name, copy.deepcopy(value))

    return Check(fn, f"hooks.{name} = {value!r}")


def NothingLeft() -> Check:
    """No live iommufd context, no open device or group, no user DMA owner (from describe())."""

    def fn(w: World) -> None:
        d = w.k.describe()
        for name, ctx in d.get("iommufd", {}).items():
            assert ctx.get("dead", False) or not ctx.get("refs"), f"iommufd context {name} alive: {ctx}"
        for dev in d.get("devices", []):
            assert dev["open_count"] == 0 and not dev["cdev_opened"], f"device left open: {dev}"
        for g in d.get("groups", []):
            assert not g["open"] and g["dma_owner"] is None, f"group left in use: {g}"

    return Check(fn, "nothing left")


def Alive(ctx_count: int) -> Check:
    """Exactly ``ctx_count`` live iommufd contexts."""

    def fn(w: World) -> None:
        d = w.k.describe()
        live = [n for n, c in d.get("iommufd", {}).items() if not c.get("dead", False) and c.get("refs")]
        assert len(live) == ctx_count, f"live contexts {live}, expected {ctx_count}"

    return Check(fn, f"{ctx_count} live iommufd contexts")
