"""Fault injection: make chosen calls fail, set the fault hooks, plan unplugs.

What lives here: ``FaultSpec`` (one fault, as a tree's ``[[fault]]`` table or
a ``--fault`` argument describes it), ``parse_spec`` (the command-line form),
``make_spec`` (checks the fields of either form), and ``FaultPlan``: the
rules a ``Kernel`` carries as ``kernel.faults``.

A ``call-fails`` rule fails the ``nth`` call (1-based) of an operation with
``errno``, and with ``count`` the ``count`` calls from the nth on (``count =
"all"``: every call from the nth on). The operation is an ioctl name from
``fakedev.uapi.ioctls``, ``"open"``, ``"read"``, ``"write"`` or ``"*"`` (any of
them). With ``device`` only calls targeting that function count: an open of
its ``/dev/vfio/devices/vfioN`` or of its group's node, any call on a device
fd of it, any call on a group fd of its group (a group with two functions
matches either); calls on /dev/iommu and /dev/vfio/vfio target no device.
The failure happens before the model runs the call, so it changes nothing;
each one is recorded (``injected``) and raised as ``InjectedError``, a
``KernelError`` a tracer can tell from the model's own failures.

An ``unplug`` entry asks for ``device`` to be unplugged once the ``nth``
call of ``after`` (same vocabulary, any device) has returned from the model;
the plan only queues the BDF (``take_unplugs``), whoever serves the nodes
does the unplug. The hook kinds (``memory-lock-busy``, ``device-lock-busy``,
``reset-fails``) set ``KernelHooks`` (fakedev.kernel.vfio.vfio_main).

With ``log_calls`` set, every call is recorded in ``calls`` (the counting run
of ``fakedev sweep``). With nothing armed, ``armed`` is False and callers go
straight to the model: that one attribute is the whole cost.

What must not: I/O of any kind; know about FUSE or processes beyond ``Task``.
"""

from __future__ import annotations

import errno as E
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from attrs import define, frozen

from fakedev.kernel.errors import KernelError, errname
from fakedev.kernel.file import File
from fakedev.kernel.task import Task
from fakedev.uapi import ioctls

#: the kinds a fault may be
CALL_FAILS = "call-fails"
UNPLUG = "unplug"
HOOK_KINDS = ("memory-lock-busy", "device-lock-busy", "reset-fails")
KINDS = (CALL_FAILS, UNPLUG, *HOOK_KINDS)
#: operations that are not ioctls
PLAIN_OPS = ("open", "read", "write", "*")
#: fields each kind takes (besides ``kind``)
KIND_FIELDS: dict[str, tuple[str, ...]] = {
    CALL_FAILS: ("call", "nth", "count", "device", "errno"),
    UNPLUG: ("device", "after", "nth"),
    "memory-lock-busy": ("device",),
    "device-lock-busy": ("device",),
    "reset-fails": ("device", "errno"),
}
#: keep at most this many injection and call records
KEEP = 100_000

_BDF = re.compile(r"^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-1][0-9a-fA-F])\.([0-7])$")
_IOCTL_NAMES = frozenset(io.name for io in ioctls.IOCTLS)


class FaultSpecError(ValueError):
    """A fault that cannot be armed: ``field`` names the bad field ("" for the whole)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field = field
        self.problem = problem


class InjectedError(KernelError):
    """A failure made by a fault rule, not by the model."""


def known_op(op: str) -> bool:
    return op in PLAIN_OPS or op in _IOCTL_NAMES


def op_names() -> list[str]:
    """Every operation a rule may name."""
    return [*PLAIN_OPS, *sorted(_IOCTL_NAMES)]


def canonical_bdf(text: str) -> str | None:
    """``"01:00.1"`` -> ``"0000:01:00.1"``; None if ``text`` is not a function address."""
    m = _BDF.match(text)
    if m is None:
        return None
    dom, bus, dev, fn = int(m.group(1) or "0", 16), int(m.group(2), 16), int(m.group(3), 16), int(m.group(4))
    return f"{dom:04x}:{bus:02x}:{dev:02x}.{fn}"


def errno_of(name: object) -> int | None:
    """The number of an errno name ("EIO"), None if it is not one."""
    if not isinstance(name, str) or not name.startswith("E") or not name.isupper():
        return None
    code = getattr(E, name, None)
    return code if isinstance(code, int) else None


@frozen
class FaultSpec:
    """One fault. ``count`` None means every call from the ``nth`` on."""

    kind: str
    device: str | None = None
    call: str | None = None
    nth: int = 1
    count: int | None = 1
    errno: int | None = None
    after: str | None = None

    def text(self) -> str:
        """The command-line form (``parse_spec(s.text()) == s``)."""
        if self.kind == CALL_FAILS:
            out = f"call={self.call},nth={self.nth}"
            if self.count != 1:
                out += f",count={'all' if self.count is None else self.count}"
            if self.device is not None:
                out += f",device={self.device}"
            return out + f",errno={errname(self.errno or E.EIO)}"
        if self.kind == UNPLUG:
            return f"unplug={self.device},after={self.after},nth={self.nth}"
        out = f"{self.kind}={self.device}"
        if self.kind == "reset-fails":
            out += f",errno={errname(self.errno or E.EIO)}"
        return out

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "device": self.device}
        if self.kind == CALL_FAILS:
            out.update(call=self.call, nth=self.nth, count=self.count)
        if self.kind == UNPLUG:
            out.update(after=self.after, nth=self.nth)
        if self.errno is not None:
            out["errno"] = errname(self.errno)
        return out


def _int_field(fields: Mapping[str, object], key: str, default: int, lo: int) -> int:
    v = fields.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise FaultSpecError(key, f"must be an integer, not {v!r}")
    if v < lo:
        raise FaultSpecError(key, f"must be at least {lo}, not {v}")
    return v


def make_spec(kind: object, fields: Mapping[str, object]) -> FaultSpec:
    """Check one fault's fields (a ``[[fault]]`` table without ``kind``, or a
    parsed ``--fault``) and return it; FaultSpecError naming the bad field.

    Devices are not checked against a topology here (the caller knows it).
    """
    if not isinstance(kind, str) or kind not in KINDS:
        raise FaultSpecError("kind", f"must be one of {', '.join(KINDS)}, not {kind!r}")
    allowed = KIND_FIELDS[kind]
    for k in fields:
        if k not in allowed:
            raise FaultSpecError(k, f"unknown field for kind {kind} (allowed: {', '.join(allowed)})")
    device: str | None = None
    if "device" in fields:
        raw = fields["device"]
        device = canonical_bdf(raw) if isinstance(raw, str) else None
        if device is None:
            raise FaultSpecError("device", f'must be a function address like "0000:01:00.0", not {raw!r}')
    elif kind != CALL_FAILS:
        raise FaultSpecError("device", f"{kind} needs a device")
    err: int | None = None
    if "errno" in allowed:
        raw_err = fields.get("errno", "EIO")
        err = errno_of(raw_err)
        if err is None:
            raise FaultSpecError("errno", f'must be an errno name like "EIO", not {raw_err!r}')
    if kind == CALL_FAILS:
        call = fields.get("call")
        if call is None:
            raise FaultSpecError("call", "call-fails needs call (an ioctl name, open, read, write or *)")
        if not isinstance(call, str) or not known_op(call):
            raise FaultSpecError("call", f"unknown call {call!r} (an ioctl name like "
                                 "VFIO_DEVICE_PCI_HOT_RESET, or open, read, write, *)")
        nth = _int_field(fields, "nth", 1, 1)
        raw_count = fields.get("count", 1)
        count: int | None = None if raw_count == "all" else _int_field(fields, "count", 1, 1)
        return FaultSpec(CALL_FAILS, device=device, call=call, nth=nth, count=count, errno=err)
    if kind == UNPLUG:
        after = fields.get("after")
        if after is None:
            raise FaultSpecError("after", "unplug needs after (the call after which to unplug)")
        if not isinstance(after, str) or not known_op(after):
            raise FaultSpecError("after", f"unknown call {after!r}")
        return FaultSpec(UNPLUG, device=device, after=after, nth=_int_field(fields, "nth", 1, 1))
    return FaultSpec(kind, device=device, errno=err)


def parse_spec(text: str) -> FaultSpec:
    """The command-line form: ``KIND_KEY=VALUE[,KEY=VALUE...]`` where the
    first pair names the kind: ``call=OP`` (call-fails), ``unplug=BDF``,
    ``memory-lock-busy=BDF``, ``device-lock-busy=BDF``, ``reset-fails=BDF``.
    Integer values (nth, count) are decimal; ``count=all``."""
    pairs: list[tuple[str, str]] = []
    for part in text.strip().split(","):
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise FaultSpecError("", f"{part!r} is not KEY=VALUE (in {text!r})")
        pairs.append((key, value))
    first, value = pairs[0]
    if first == "call":
        kind = CALL_FAILS
    elif first == "unplug":
        kind = UNPLUG
        first = "device"
    elif first in HOOK_KINDS:
        kind = first
        first = "device"
    else:
        raise FaultSpecError("", f"a fault starts with call=OP, unplug=BDF or "
                             f"{'=BDF, '.join(HOOK_KINDS)}=BDF, not {pairs[0][0]}=")
    fields: dict[str, object] = {first: value}
    for key, value in pairs[1:]:
        if key in fields:
            raise FaultSpecError(key, "given twice")
        fields[key] = int(value) if value.lstrip("-").isdigit() else value
    return make_spec(kind, fields)


# ------------------------------------------------------------------ targets


def file_targets(file: object) -> tuple[str, ...]:
    """The functions a call on ``file`` targets: a device fd's function, a group
    fd's functions, nothing for the container and /dev/iommu."""
    dev = getattr(file, "device", None)
    if dev is not None:
        return (str(dev.name),)
    group = getattr(file, "group", None)
    if group is not None:
        return tuple(str(d.name) for d in getattr(group, "devices", ()))
    return ()


def path_targets(vfio: Any, path: str) -> tuple[str, ...]:
    """The functions an open of /dev/``path`` targets (``vfio``: the model's Vfio)."""
    path = path.removeprefix("/dev/").strip("/")
    if path.startswith("vfio/devices/vfio"):
        num = path.removeprefix("vfio/devices/vfio")
        return tuple(str(d.name) for d in vfio.devices if num.isdigit() and d.index == int(num))
    gid = path.removeprefix("vfio/")
    if path.startswith("vfio/") and gid.isdigit():
        group = vfio.groups.get(int(gid))
        return tuple(str(d.name) for d in group.devices) if group is not None else ()
    return ()


def ioctl_name(file: object, cmd: int) -> str:
    kind = getattr(file, "kind", None)
    io = ioctls.lookup(kind, cmd) if kind is not None else None
    return io.name if io is not None else f"ioctl[{cmd:#x}]"


# ------------------------------------------------------------------ the plan


@define
class Rule:
    spec: FaultSpec
    seen: int = 0  # matching calls so far
    fired: int = 0  # failures injected

    def matches(self, op: str, targets: tuple[str, ...]) -> bool:
        """A call-fails rule: ``call`` on its device (if any); an unplug: ``after`` on any."""
        s = self.spec
        if s.kind == CALL_FAILS:
            return (s.call == "*" or s.call == op) and (s.device is None or s.device in targets)
        return s.after == "*" or s.after == op


@frozen
class Injection:
    """One injected failure: the call, who made it, the errno."""

    seq: int  # call number (every call the plan saw, from 1)
    op: str
    label: str  # the node: "vfio0", "13", "iommu", "vfio/devices/vfio1"
    devices: tuple[str, ...]
    pid: int | None
    errno: int
    rule: str  # the rule, in command-line form

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "op": self.op, "node": self.label, "devices": list(self.devices),
                "pid": self.pid, "errno": errname(self.errno), "rule": self.rule}


@frozen
class CallRecord:
    """One call seen with ``log_calls`` on."""

    seq: int
    op: str
    label: str
    devices: tuple[str, ...]
    pid: int | None

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "op": self.op, "node": self.label, "devices": list(self.devices),
                "pid": self.pid}


class FaultPlan:
    """The fault rules of one model (``kernel.faults``).

    ``vfio`` is the model's Vfio (its ``hooks`` for the hook kinds, its devices
    and groups to tell which function an open targets); None for a plan with
    call rules only. ``functions``: the BDFs a rule's device may name (None:
    any).
    """

    def __init__(self, vfio: Any = None, functions: Iterable[str] | None = None) -> None:
        self.vfio = vfio
        self.functions = frozenset(functions) if functions is not None else None
        self.armed = False
        self.rules: list[Rule] = []
        self.unplugs: list[Rule] = []
        self.hook_specs: list[FaultSpec] = []
        self.injected: list[Injection] = []
        self.injected_total = 0
        self.calls: list[CallRecord] = []
        self.seq = 0
        self._log_calls = False
        self._pending: list[str] = []

    # -- arming ------------------------------------------------------------------
    @property
    def log_calls(self) -> bool:
        return self._log_calls

    @log_calls.setter
    def log_calls(self, on: bool) -> None:
        self._log_calls = on
        self._rearm()

    def _rearm(self) -> None:
        self.armed = bool(self.rules or self.unplugs or self._log_calls)

    def add(self, spec: FaultSpec) -> None:
        """Arm ``spec``. A device that is not a function of the model: FaultSpecError."""
        if spec.device is not None and self.functions is not None and spec.device not in self.functions:
            raise FaultSpecError("device", f"no function {spec.device} in this model")
        if spec.kind == CALL_FAILS:
            self.rules.append(Rule(spec))
        elif spec.kind == UNPLUG:
            self.unplugs.append(Rule(spec))
        else:
            if self.vfio is None:
                raise FaultSpecError("kind", f"{spec.kind} needs a model")
            hooks = self.vfio.hooks
            assert spec.device is not None
            if spec.kind == "memory-lock-busy":
                hooks.memory_lock_contended.add(spec.device)
            elif spec.kind == "device-lock-busy":
                hooks.device_lock_contended.add(spec.device)
            else:
                hooks.reset_errno[spec.device] = spec.errno if spec.errno is not None else E.EIO
            self.hook_specs.append(spec)
        self._rearm()

    def clear(self) -> None:
        """Disarm every rule, unplug and hook (the records stay)."""
        self.rules.clear()
        self.unplugs.clear()
        self._pending.clear()
        if self.vfio is not None:
            hooks = self.vfio.hooks
            hooks.memory_lock_contended.clear()
            hooks.device_lock_contended.clear()
            hooks.reset_errno.clear()
        self.hook_specs.clear()
        self._rearm()

    # -- the two points every call passes ----------------------------------------------
    def before(self, op: str, devices: tuple[str, ...], label: str, pid: int | None) -> None:
        """A call ``op`` on ``devices`` is about to run: count it; raise
        InjectedError (recorded) if a rule says it fails."""
        self.seq += 1
        if self._log_calls and len(self.calls) < KEEP:
            self.calls.append(CallRecord(self.seq, op, label, devices, pid))
        hit: Rule | None = None
        for r in self.rules:
            if r.matches(op, devices):
                r.seen += 1
                s = r.spec
                if hit is None and r.seen >= s.nth and (s.count is None or r.seen < s.nth + s.count):
                    hit = r
        if hit is None:
            return
        hit.fired += 1
        err = hit.spec.errno if hit.spec.errno is not None else E.EIO
        self.injected_total += 1
        if len(self.injected) < KEEP:
            self.injected.append(Injection(self.seq, op, label, devices, pid, err, hit.spec.text()))
        raise InjectedError(err, f"injected by fault {hit.spec.text()}")

    def after(self, op: str, devices: tuple[str, ...]) -> None:
        """The call ``op`` returned from the model (succeeded or failed): count
        it for the unplug triggers; a trigger reaching its nth queues its device."""
        for r in self.unplugs:
            if r.matches(op, devices):
                r.seen += 1
                if r.seen == r.spec.nth:
                    r.fired += 1
                    assert r.spec.device is not None
                    self._pending.append(r.spec.device)

    def take_unplugs(self) -> list[str]:
        """The devices whose unplug is due (each returned once)."""
        out, self._pending = self._pending, []
        return out

    # -- calls through the plan ------------------------------------------------------
    def ioctl(self, file: File, task: Task, cmd: int, arg: int) -> int:
        """``file.ioctl`` with the rules applied."""
        op = ioctl_name(file, cmd)
        devs = file_targets(file)
        self.before(op, devs, getattr(file, "label", "?"), task.pid)
        try:
            return file.ioctl(task, cmd, arg)
        finally:
            self.after(op, devs)

    def read(self, file: File, task: Task, offset: int, size: int) -> bytes:
        devs = file_targets(file)
        self.before("read", devs, getattr(file, "label", "?"), task.pid)
        try:
            return file.read(task, offset, size)
        finally:
            self.after("read", devs)

    def write(self, file: File, task: Task, offset: int, data: bytes) -> int:
        devs = file_targets(file)
        self.before("write", devs, getattr(file, "label", "?"), task.pid)
        try:
            return file.write(task, offset, data)
        finally:
            self.after("write", devs)

    def open(self, opener: Callable[[str, Task], File], path: str, task: Task) -> File:
        """``opener(path, task)`` (``Kernel.open``) with the rules applied."""
        devs = path_targets(self.vfio, path) if self.vfio is not None else ()
        self.before("open", devs, path.removeprefix("/dev/").strip("/"), task.pid)
        try:
            return opener(path, task)
        finally:
            self.after("open", devs)

    # -- showing ---------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {
            "rules": [{**r.spec.as_dict(), "spec": r.spec.text(), "seen": r.seen, "fired": r.fired}
                      for r in self.rules],
            "unplugs": [{**r.spec.as_dict(), "spec": r.spec.text(), "seen": r.seen, "fired": r.fired}
                        for r in self.unplugs],
            "hooks": [s.text() for s in self.hook_specs],
            "calls_seen": self.seq,
            "injected_total": self.injected_total,
            "injected": [i.as_dict() for i in self.injected[-100:]],
        }

