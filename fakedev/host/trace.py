"""The call trace: every open, ioctl, read/write and release served.

What lives here: ``Tracer``, switched on and off at run time, which decodes
an ioctl's struct from the caller's memory before the call (the request) and
after it (the result) with the ``fakedev.uapi`` layouts, and writes one JSON
object per call to a file plus a strace-like line (``format_record``, also
used by ``fakedev trace-decode``), e.g.

    [pid 4242] VFIO_DEVICE_PCI_HOT_RESET(fd=5 open#7 vfio1, {argsz=20, flags=0, count=2,
        group_fds=[fd 12 -> /dev/vfio/13 (group 13), fd 13 -> /dev/vfio/14 (group 14)]}) = 0

Which open. Every record names the open file it is about as ``open#N`` (N is
the FUSE file handle of that open: unique while it is open, and never reused
by the same server in practice), so two opens of one node are told apart, and
gives the caller's fd number for it when it can be found (``fd=?`` when not:
at open and release time there is none). The number is looked up in
``/proc/<pid>/fd``: when several fds of the caller are open on the node, each
is identified (pidfd_getfd + the identity ioctl, which must run off the FUSE
loop: ``NeedsWorker`` is raised before the call, never after it).

What is decoded. A struct is read only as far as the caller's ``argsz``
(``size`` for iommufd) says it goes, as the kernel's copy rules do; fields past
it are listed in ``absent`` and shown as ``<absent>``. Trailing arrays:
VFIO_DEVICE_PCI_HOT_RESET's group fds (``count`` of them, as
``vfio_pci_ioctl_pci_hot_reset_groups`` reads them; an entry past argsz is
marked), each with what it refers to in the caller (a group, an iommufd,
a non-VFIO file, EBADF); VFIO_DEVICE_GET_PCI_HOT_RESET_INFO's device entries
after a successful call (BDF, and group_id or devid by the flags).
GROUP_GET_DEVICE_FD answered by the seccomp supervisor is recorded with
``device_fd`` (the new fd's number and open).

What must not: change anything in the caller or the model (reads only), or
fail a call (a decoding failure is logged and the record is written without
the part that failed).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import IO, Any

from fakedev.host.proc import NeedsWorker, ProcessTask, identify, pidfd_getfd
from fakedev.kernel.errors import KernelError, errname
from fakedev.kernel.file import File
from fakedev.uapi import consts as C
from fakedev.uapi import ioctls
from fakedev.uapi import structs as S
from fakedev.uapi.ioctls import Arg, FileKind
from fakedev.uapi.layout import Layout

log = logging.getLogger("fakedev.trace")

HOT_RESET = "VFIO_DEVICE_PCI_HOT_RESET"
HOT_RESET_INFO = "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO"
#: at most this many group fds / device entries are read for the trace
ARRAY_LIMIT = 64
ABSENT = "<absent>"

_INFO_FLAGS = ((C.VFIO_PCI_HOT_RESET_FLAG_DEV_ID, "DEV_ID"), (C.VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED, "DEV_ID_OWNED"))
_DEVID_NAMES = {C.VFIO_PCI_DEVID_OWNED: "VFIO_PCI_DEVID_OWNED", C.VFIO_PCI_DEVID_NOT_OWNED: "VFIO_PCI_DEVID_NOT_OWNED"}


# -- text ------------------------------------------------------------------------------

def _num(key: str, v: Any) -> str:
    if isinstance(v, int) and not isinstance(v, bool) and v and key.endswith(("flags", "ptr", "va", "iova")):
        return f"{v:#x}"
    return _plain(v)


def _plain(v: Any) -> str:
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k}={_num(str(k), x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_plain(x) for x in v) + "]"
    return str(v)


def info_flags_text(flags: int) -> str:
    """GET_PCI_HOT_RESET_INFO flags by name: ``0x3 (DEV_ID|DEV_ID_OWNED)``."""
    if not flags:
        return "0"
    names = [n for bit, n in _INFO_FLAGS if flags & bit]
    rest = flags & ~sum(bit for bit, _ in _INFO_FLAGS)
    if rest:
        names.append(f"{rest:#x}")
    return f"{flags:#x} ({'|'.join(names)})"


def devid_text(devid: int) -> str:
    return _DEVID_NAMES.get(devid, str(devid))


def _entry_text(e: Mapping[str, Any]) -> str:
    if "devid" in e:
        return f"{e.get('bdf', '?')} devid={devid_text(int(e['devid']))}"
    return f"{e.get('bdf', '?')} group_id={e.get('group_id', '?')}"


def _group_fd_text(e: Any) -> str:
    if not isinstance(e, Mapping):
        return str(e)
    text = f"fd {e.get('fd', '?')}"
    if e.get("path"):
        text += f" -> {e['path']}"
    text += f" ({e.get('ref', '?')})"
    if e.get("past_argsz"):
        text += " past argsz"
    return text


def _struct_text(name: str, vals: Any, absent: list[str] | None = None) -> str:
    """A decoded struct with its trailing array, as ``{k=v, ...}``."""
    if not isinstance(vals, Mapping):
        return _plain(vals)
    parts = []
    for k, v in vals.items():
        if k in ("group_fds", "group_fds_more", "devices"):
            continue
        if k == "flags" and name == HOT_RESET_INFO and isinstance(v, int):
            parts.append(f"flags={info_flags_text(v)}")
        else:
            parts.append(f"{k}={_num(k, v)}")
    parts.extend(f"{k}={ABSENT}" for k in absent or ())
    if "group_fds" in vals:
        fds = vals["group_fds"]
        if isinstance(fds, list):
            shown = [_group_fd_text(e) for e in fds]
            if vals.get("group_fds_more"):
                shown.append(f"... {vals['group_fds_more']} more")
            parts.append("group_fds=[" + ", ".join(shown) + "]")
        else:
            parts.append(f"group_fds={fds}")
    if "devices" in vals and isinstance(vals["devices"], list):
        parts.append("devices=[" + ", ".join(_entry_text(e) for e in vals["devices"]) + "]")
    return "{" + ", ".join(parts) + "}"


def _changed(req: Any, out: Mapping[str, Any]) -> bool:
    """Whether the call wrote something worth showing after ``=>``."""
    if "devices" in out or not isinstance(req, Mapping):
        return True
    return any(req.get(k) != v for k, v in out.items())


def _who(rec: Mapping[str, Any]) -> str:
    """``fd=5 open#7 vfio1`` (``fd=5 vfio1`` for records written before opens were numbered)."""
    fd = rec.get("fd")
    parts = [f"fd={'?' if fd is None else fd}"]
    if rec.get("open") is not None:
        parts.append(f"open#{rec['open']}")
    parts.append(str(rec.get("node", "?")))
    return " ".join(parts)


def format_record(rec: Mapping[str, Any]) -> str:
    """One trace record as a strace-like line."""
    pid = rec.get("pid", "?")
    node = rec.get("node", "?")
    err = rec.get("errno")
    ret = f"-1 {err}" if err else str(rec.get("result"))
    if err and rec.get("injected"):
        ret += " (injected)"  # by a fault rule, before the model ran the call
    op = rec.get("op")
    if op == "ioctl":
        name = str(rec.get("name", "?"))
        req = rec.get("request")
        args = _who(rec)
        try:
            kind: Arg | None = ioctls.by_name(name).arg
        except KeyError:
            kind = None
        if isinstance(req, Mapping):
            args += ", " + _struct_text(name, req, rec.get("absent"))
        elif isinstance(req, str) and kind is Arg.STRING:
            args += ", " + json.dumps(req)
        elif isinstance(req, int) and kind is Arg.PTR_INT:
            args += f", [{req}]"
        elif req is not None:
            args += f", {req}"
        elif kind is None and isinstance(rec.get("arg"), int):
            args += f", {rec['arg']:#x}"
        if rec.get("new_open") is not None and not err:
            ret += f" (open#{rec['new_open']} {rec.get('new_node', '?')})"
        line = f"[pid {pid}] {name}({args}) = {ret}"
        out = rec.get("result_struct")
        if isinstance(out, Mapping) and _changed(req, out):
            line += " => " + _struct_text(name, out, rec.get("absent"))
        if rec.get("via"):
            line += f" [{rec['via']}]"
        return line
    if op in ("read", "write"):
        offset = int(rec.get("offset", 0))
        where = _who(rec) if "open" in rec else str(node)
        return f"[pid {pid}] p{op}({where}, {rec.get('size')}, {offset:#x}) = {ret}"
    if op == "open":
        if not err:
            ret = f"open#{rec.get('open')}"
        return f"[pid {pid}] open({rec.get('path', node)}) = {ret}"
    if op == "release":
        return f"[pid {pid}] release(open#{rec.get('open')} {node}) = {ret}"
    if op == "sysfs-write":
        line = f"[pid {pid}] write({rec.get('path')}, {json.dumps(rec.get('data', ''))}) = {ret}"
        return line + (" (waited for the device's release)" if rec.get("waited") else "")
    return f"[pid {pid}] {op} {_plain(dict(rec))}"


# -- decoding ----------------------------------------------------------------------------

Reader = Callable[[int, int], bytes]


def decode_struct(lay: Layout, read: Reader, arg: int, argsz: int | None = None) -> tuple[dict[str, int], list[str]]:
    """(present fields, absent field names) of ``lay`` at ``arg``.

    For a struct that starts with ``argsz``/``size`` only the bytes it covers
    are read (``argsz`` given: that bound, else read from the struct); fields
    ending past it are absent. KernelError (EFAULT) propagates.
    """
    first = lay.fields[0] if lay.fields else None
    if first is None or first.name not in ("argsz", "size") or first.fmt != "I":
        return lay.unpack(read(arg, lay.size)), []
    if argsz is None:
        argsz = int.from_bytes(read(arg, 4), "little")
    size = max(4, min(lay.size, argsz))
    data = read(arg, size)
    present = {f.name: v for f, v in zip(lay.fields, lay.unpack(data, partial=True).values(), strict=True)
               if f.end <= size}
    return present, [f.name for f in lay.fields if f.end > size]


def decode_info_entries(read: Reader, arg: int, hdr: Mapping[str, int], argsz: int) -> list[dict[str, Any]]:
    """The device entries a successful GET_PCI_HOT_RESET_INFO wrote after its header."""
    hl, el = S.VFIO_PCI_HOT_RESET_INFO, S.VFIO_PCI_DEPENDENT_DEVICE
    minsz = hl.offsetofend("count")
    n = min(int(hdr.get("count", 0)), max(0, argsz - minsz) // el.size, ARRAY_LIMIT)
    out: list[dict[str, Any]] = []
    if n <= 0:
        return out
    raw = read(arg + minsz, n * el.size)
    by_devid = bool(int(hdr.get("flags", 0)) & C.VFIO_PCI_HOT_RESET_FLAG_DEV_ID)
    for i in range(n):
        e = el.unpack(raw[i * el.size:(i + 1) * el.size])
        bdf = f"{e['segment']:04x}:{e['bus']:02x}:{e['devfn'] >> 3:02x}.{e['devfn'] & 7}"
        ent: dict[str, Any] = {"bdf": bdf, "segment": e["segment"], "bus": e["bus"], "devfn": e["devfn"]}
        ent["devid" if by_devid else "group_id"] = e["devid"]
        out.append(ent)
    return out


def file_ref(f: Any) -> str:
    """What one of our model files is, for the trace: ``group 13``, ``iommufd``, ..."""
    kind = getattr(f, "kind", None)
    label = getattr(f, "label", "?")
    if kind is FileKind.GROUP:
        return f"group {label}"
    if kind is FileKind.IOMMUFD:
        return "iommufd"
    if kind is FileKind.CONTAINER:
        return "container"
    if kind is FileKind.DEVICE:
        return f"device {label}"
    return "not a VFIO file"


def describe_fd(task: ProcessTask, fd: int) -> dict[str, Any]:
    """What the caller's ``fd`` refers to: ``{"fd", "path", "ref"}``.

    ``ref`` is what ``fdget`` would find: one of our files (``group 13``,
    ``iommufd``, ...), ``not a VFIO file``, or ``EBADF``. Looking at one of
    our opens needs a worker thread (NeedsWorker from the loop).
    """
    out: dict[str, Any] = {"fd": fd}
    if fd < 0:
        out["ref"] = "EBADF"
        return out
    try:
        out["path"] = os.readlink(f"/proc/{task.tid}/fd/{fd}")
    except OSError as e:
        out["ref"] = "EBADF" if e.errno == errno.ENOENT else errname(e.errno or errno.EIO)
        return out
    try:
        f = task.fget(fd)
    except KernelError as e:
        out["ref"] = errname(e.errno)
        return out
    if isinstance(f, File):
        out["ref"] = file_ref(f)
    else:
        f.close()
        out["ref"] = "not a VFIO file"
    return out


def decode_group_fds(task: ProcessTask, hdr: Mapping[str, int], argsz: int, arg: int) -> dict[str, Any]:
    """``group_fds`` of a PCI_HOT_RESET request: the ``count`` fds the kernel reads."""
    minsz = S.VFIO_PCI_HOT_RESET.offsetofend("count")
    count = int(hdr["count"])
    n = min(count, ARRAY_LIMIT)
    out: dict[str, Any] = {}
    try:
        raw = task.read(arg + minsz, 4 * n) if n else b""
    except KernelError:
        out["group_fds"] = "EFAULT"
        return out
    fds = []
    for i in range(n):
        fd = int.from_bytes(raw[4 * i:4 * i + 4], "little", signed=True)
        ent = describe_fd(task, fd)
        if minsz + 4 * (i + 1) > argsz:
            ent["past_argsz"] = True
        fds.append(ent)
    out["group_fds"] = fds
    if count > n:
        out["group_fds_more"] = count - n
    return out


def _injected(injected: bool) -> dict[str, bool]:
    """``"injected": true`` in a record whose errno a fault rule made (fakedev.kernel.fault_inject)."""
    return {"injected": True} if injected else {}


class Before:
    """What ``Tracer.ioctl_before`` saw: the call, its request, the caller's fd."""

    __slots__ = ("absent", "argsz", "fd", "fds", "fh", "io", "req")

    def __init__(self, io: ioctls.Ioctl | None, req: Any, absent: list[str], argsz: int | None,
                 fh: int | None, fd: int | None, fds: list[int]) -> None:
        self.io = io
        self.req = req
        self.absent = absent
        self.argsz = argsz
        self.fh = fh
        self.fd = fd
        self.fds = fds


class Tracer:
    """Writes trace records; ``enabled`` may be flipped at any time."""

    def __init__(self, jsonl_path: str | None = None, text_path: str | None = None, *,
                 enabled: bool = False) -> None:
        self.enabled = enabled
        self.jsonl_path = jsonl_path
        self.text_path = text_path
        self._json: IO[str] | None = None
        self._text: IO[str] | None = None
        self.lines: list[str] = []  # the last text lines, newest last
        self.keep = 1000
        # records come from the loop, model workers and the supervisor's callbacks
        self._lock = threading.Lock()

    def set(self, on: bool) -> None:
        self.enabled = on
        if not on:
            self.flush()

    def close(self) -> None:
        for f in (self._json, self._text):
            if f is not None:
                f.close()
        self._json = self._text = None

    def flush(self) -> None:
        for f in (self._json, self._text):
            if f is not None:
                f.flush()

    def _emit(self, rec: dict[str, Any]) -> None:
        text = format_record(rec)
        with self._lock:
            self._write(rec, text)

    def _write(self, rec: dict[str, Any], text: str) -> None:
        self.lines.append(text)
        if len(self.lines) > self.keep:
            del self.lines[: len(self.lines) - self.keep]
        if self.jsonl_path is not None:
            if self._json is None:
                self._json = open(self.jsonl_path, "a", buffering=1)
            self._json.write(json.dumps(rec) + "\n")
        if self.text_path is not None:
            if self._text is None:
                self._text = open(self.text_path, "a", buffering=1)
            self._text.write(text + "\n")
        if self.jsonl_path is None and self.text_path is None:
            log.info("%s", text)

    # -- which fd --------------------------------------------------------------------
    @staticmethod
    def fd_of(task: ProcessTask, node_path: str | None) -> int | None:
        """The caller's fd number for ``node_path`` (relative to the mount), if unique."""
        found = Tracer.fds_of(task, node_path)
        return found[0] if len(found) == 1 else None

    @staticmethod
    def fds_of(task: ProcessTask, node_path: str | None) -> list[int]:
        """The caller's fd numbers open on ``node_path`` (any open of it)."""
        if not node_path:
            return []
        try:
            d = f"/proc/{task.tid}/fd"
            found = []
            for name in os.listdir(d):
                try:
                    link = os.readlink(f"{d}/{name}")
                except OSError:
                    continue
                if link.endswith("/" + node_path):
                    found.append(int(name))
            return sorted(found)
        except (OSError, ValueError):
            return []

    @staticmethod
    def caller_fd(task: ProcessTask, fh: int | None, node_path: str | None) -> tuple[int | None, list[int]]:
        """(the caller's fd for the open ``fh`` of ``node_path`` or None, every fd on the node).

        One candidate is taken as it is; several are told apart by identifying
        each (NeedsWorker when called on the loop).
        """
        fds = Tracer.fds_of(task, node_path)
        if len(fds) <= 1 or fh is None:
            return (fds[0] if len(fds) == 1 else None), fds
        if task.on_loop:
            raise NeedsWorker()
        for fd in fds:
            try:
                copy = pidfd_getfd(task.tid, fd, lambda: task.pid)
            except KernelError:
                continue
            try:
                if identify(copy) == fh:
                    return fd, fds
            finally:
                os.close(copy)
        return None, fds

    # -- open / release ------------------------------------------------------------------
    def open(self, task: ProcessTask, node_path: str, fh: int | None, file: File | None, err: int | None,
             *, injected: bool = False) -> None:
        """An open of ``/dev/<node_path>``: its open number, or the errno."""
        self._emit({"t": time.time(), "op": "open", "pid": task.tid, "path": f"/dev/{node_path}",
                    "node": getattr(file, "label", node_path), "open": fh, "fd": None,
                    "result": 0 if err is None else None, "errno": None if err is None else errname(err),
                    **_injected(injected)})

    def release(self, task: ProcessTask, fh: int, file: File, err: int | None = None) -> None:
        """The last close of the open ``fh``."""
        self._emit({"t": time.time(), "op": "release", "pid": task.tid, "node": getattr(file, "label", "?"),
                    "open": fh, "fd": None, "result": 0 if err is None else None,
                    "errno": None if err is None else errname(err)})

    # -- sysfs attribute writes ----------------------------------------------------
    def sysfs_write(self, tid: int, sys_rel: str, data: bytes, err: int | None, *,
                    waited: bool = False) -> None:
        """A write to ``/sys/<sys_rel>`` (bind, unbind, driver_override, ...):
        what was written, and the result once the write returned (``waited``:
        it blocked until a device was released, as an unbind of a held device)."""
        self._emit({"t": time.time(), "op": "sysfs-write", "pid": tid, "path": f"/sys/{sys_rel}",
                    "data": data[:256].decode(errors="replace"), "size": len(data),
                    "result": len(data) if err is None else None,
                    "errno": None if err is None else errname(err), "waited": waited})

    # -- ioctls ------------------------------------------------------------------------
    def _read_arg(self, task: ProcessTask, io: ioctls.Ioctl | None, arg: int,
                  argsz: int | None = None) -> tuple[Any, list[str], int | None]:
        """(decoded argument, absent fields, the argsz used)."""
        if io is None:
            return None, [], None
        try:
            if io.arg is Arg.INT:
                return arg, [], None
            if io.arg is Arg.PTR_INT:
                return int.from_bytes(task.read(arg, 4), "little", signed=True), [], None
            if io.arg is Arg.STRING:
                raw = b""
                for off in range(0, 256, 16):
                    try:
                        chunk = task.read(arg + off, 16)
                    except KernelError:
                        if not raw:
                            raise
                        break
                    raw += chunk
                    if b"\0" in chunk:
                        break
                return raw.split(b"\0")[0].decode(errors="replace"), [], None
            if io.arg is Arg.STRUCT and io.layout is not None:
                lay = io.layout
                if argsz is None and lay.fields and lay.fields[0].name in ("argsz", "size"):
                    argsz = int.from_bytes(task.read(arg, 4), "little")
                vals, absent = decode_struct(lay, task.read, arg, argsz)
                return vals, absent, argsz
        except KernelError:
            return "EFAULT", [], argsz
        return None, [], argsz

    def ioctl_before(self, task: ProcessTask, file: File, cmd: int, arg: int,
                     fh: int | None = None, node_path: str | None = None) -> Before:
        """Read the request (and find the caller's fd) before the call. May raise
        NeedsWorker (nothing has happened yet)."""
        io = ioctls.lookup(file.kind, cmd) if hasattr(file, "kind") else None
        fd, fds = self.caller_fd(task, fh, node_path)
        req, absent, argsz = self._read_arg(task, io, arg)
        if io is not None and io.name == HOT_RESET and isinstance(req, dict) and "count" in req:
            try:
                req.update(decode_group_fds(task, req, argsz or 0, arg))
            except NeedsWorker:
                raise
            except Exception:
                log.exception("trace: group fds of %s", io.name)
        return Before(io, req, absent, argsz, fh, fd, fds)

    def ioctl_after(self, task: ProcessTask, file: File, node_path: str | None, cmd: int, arg: int,
                    before: Before, result: int | None, err: int | None, *, injected: bool = False) -> None:
        io, req = before.io, before.req
        out: Any = None
        if io is not None and io.arg is Arg.STRUCT and isinstance(req, dict):
            out, _absent, _ = self._read_arg(task, io, arg, before.argsz)
            if io.name == HOT_RESET_INFO and err is None and isinstance(out, dict):
                try:
                    out["devices"] = decode_info_entries(task.read, arg, out, before.argsz or 0)
                except KernelError:
                    out["devices"] = "EFAULT"
        name = io.name if io is not None else f"ioctl[{cmd:#x}]"
        self._emit({"t": time.time(), "op": "ioctl", "pid": task.tid, "fd": before.fd,
                    "fd_candidates": before.fds, "open": before.fh, "node": getattr(file, "label", "?"),
                    "name": name, "cmd": cmd, "arg": arg, "request": req, "absent": before.absent,
                    "result_struct": out if isinstance(out, dict) else None,
                    "result": result, "errno": None if err is None else errname(err), **_injected(injected)})

    def device_name(self, task: ProcessTask, arg: int) -> Any:
        """The device name a GROUP_GET_DEVICE_FD caller passed (or "EFAULT")."""
        return self._read_arg(task, ioctls.by_name("VFIO_GROUP_GET_DEVICE_FD"), arg)[0]

    def device_fd(self, tid: int, fd: int, group_fh: int | None, group: File, name: Any,
                  new_fh: int | None, device: File | None, result: int | None, err: int | None) -> None:
        """VFIO_GROUP_GET_DEVICE_FD answered by the seccomp supervisor: the
        caller's group fd, the device name asked for, and the new fd (its
        number in the caller and its open) or the errno."""
        self._emit({"t": time.time(), "op": "ioctl", "pid": tid, "fd": fd, "fd_candidates": [fd],
                    "open": group_fh, "node": getattr(group, "label", "?"), "name": "VFIO_GROUP_GET_DEVICE_FD",
                    "cmd": ioctls.VFIO_GROUP_GET_DEVICE_FD, "request": name, "absent": [],
                    "result_struct": None, "result": result if err is None else None,
                    "errno": None if err is None else errname(err),
                    "new_open": new_fh if err is None else None,
                    "new_node": getattr(device, "label", None), "via": "supervisor"})

    # -- read / write ----------------------------------------------------------------------
    def rw(self, task: ProcessTask, file: File, op: str, offset: int, size: int,
           result: int | None, err: int | None, *, fh: int | None = None, fd: int | None = None,
           injected: bool = False) -> None:
        self._emit({"t": time.time(), "op": op, "pid": task.tid, "fd": fd, "open": fh,
                    "node": getattr(file, "label", "?"), "offset": offset,
                    "size": size, "result": result, "errno": None if err is None else errname(err),
                    **_injected(injected)})
