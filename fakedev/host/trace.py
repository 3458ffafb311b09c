"""The call trace: every ioctl (and, tersely, every read/write) served.

What lives here: ``Tracer``, switched on and off at run time, which decodes
an ioctl's struct from the caller's memory before the call (the request) and
after it (the result) with the ``fakedev.uapi`` layouts, and writes one JSON
object per call to a file plus a strace-like line, e.g.

    [pid 4242] VFIO_DEVICE_PCI_HOT_RESET(fd=5 vfio1, {argsz=12, flags=0, count=0}) = -1 EINVAL

The fd number is found best-effort by matching /proc/<pid>/fd links against
the node's path.

What must not: change anything in the caller or the model (reads only).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import IO, Any

from fakedev.host.proc import ProcessTask
from fakedev.kernel.errors import KernelError, errname
from fakedev.kernel.file import File
from fakedev.uapi import ioctls
from fakedev.uapi.ioctls import Arg

log = logging.getLogger("fakedev.trace")


def _fmt_struct(vals: dict[str, int] | None) -> str:
    if vals is None:
        return "?"
    return "{" + ", ".join(f"{k}={v:#x}" if k.endswith(("flags", "ptr", "va", "iova")) and v else f"{k}={v}"
                           for k, v in vals.items()) + "}"


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

    def _emit(self, rec: dict[str, Any], text: str) -> None:
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

    # -- helpers ---------------------------------------------------------------
    @staticmethod
    def fd_of(task: ProcessTask, node_path: str | None) -> int | None:
        """The caller's fd number for ``node_path`` (relative to the mount), if unique."""
        found = Tracer.fds_of(task, node_path)
        return found[0] if len(found) == 1 else None

    @staticmethod
    def fds_of(task: ProcessTask, node_path: str | None) -> list[int]:
        """The caller's fd numbers open on ``node_path`` (two opens of a node are not told apart)."""
        if not node_path:
            return []
        try:
            pid = task.pid
            d = f"/proc/{pid}/fd"
            found = []
            for name in os.listdir(d):
                try:
                    link = os.readlink(f"{d}/{name}")
                except OSError:
                    continue
                if link.endswith("/" + node_path):
                    found.append(int(name))
            return sorted(found)
        except (OSError, KernelError):
            return []

    @staticmethod
    def _read_arg(task: ProcessTask, io: ioctls.Ioctl | None, arg: int) -> Any:
        if io is None:
            return None
        try:
            if io.arg is Arg.INT:
                return arg
            if io.arg is Arg.PTR_INT:
                return int.from_bytes(task.read(arg, 4), "little", signed=True)
            if io.arg is Arg.STRING:
                raw = b""
                for off in range(0, 256, 16):
                    try:
                        chunk = task.read(arg + off, 16)
                    except KernelError:
                        break
                    raw += chunk
                    if b"\0" in chunk:
                        break
                return raw.split(b"\0")[0].decode(errors="replace")
            if io.arg is Arg.STRUCT and io.layout is not None:
                lay = io.layout
                size = lay.size
                if lay.fields and lay.fields[0].name in ("argsz", "size") and lay.fields[0].fmt == "I":
                    # read no further than the caller said its struct goes
                    size = max(4, min(size, int.from_bytes(task.read(arg, 4), "little")))
                return lay.unpack(task.read(arg, size), partial=True)
        except KernelError:
            return "EFAULT"
        return None

    # -- ioctls ------------------------------------------------------------------
    def ioctl_before(self, task: ProcessTask, file: File, cmd: int, arg: int) -> tuple[ioctls.Ioctl | None, Any]:
        io = ioctls.lookup(file.kind, cmd) if hasattr(file, "kind") else None
        return io, self._read_arg(task, io, arg)

    def ioctl_after(self, task: ProcessTask, file: File, node_path: str | None, cmd: int, arg: int,
                    before: tuple[ioctls.Ioctl | None, Any], result: int | None, err: int | None) -> None:
        io, req = before
        out = self._read_arg(task, io, arg) if io is not None and io.arg is Arg.STRUCT else None
        name = io.name if io is not None else f"ioctl[{cmd:#x}]"
        fds = self.fds_of(task, node_path)
        fd = fds[0] if len(fds) == 1 else None
        label = getattr(file, "label", "?")
        if isinstance(req, dict):
            shown = _fmt_struct(req)
        elif isinstance(req, str) and io is not None and io.arg is Arg.STRING:
            shown = json.dumps(req)
        elif req is None:
            shown = f"{arg:#x}" if io is None else ""
        else:
            shown = str(req) if io is None or io.arg is not Arg.PTR_INT else f"[{req}]"
        args = f"fd={'|'.join(map(str, fds)) or '?'} {label}" + (f", {shown}" if shown else "")
        ret = f"{result}" if err is None else f"-1 {errname(err)}"
        text = f"[pid {task.tid}] {name}({args}) = {ret}"
        if isinstance(out, dict) and err is None and out != req:
            text += f" => {_fmt_struct(out)}"
        self._emit({"t": time.time(), "op": "ioctl", "pid": task.tid, "fd": fd, "fd_candidates": fds,
                    "node": label,
                    "name": name, "cmd": cmd, "arg": arg, "request": req, "result_struct": out,
                    "result": result, "errno": None if err is None else errname(err)}, text)

    # -- read / write --------------------------------------------------------------
    def rw(self, task: ProcessTask, file: File, op: str, offset: int, size: int,
           result: int | None, err: int | None) -> None:
        label = getattr(file, "label", "?")
        ret = f"{result}" if err is None else f"-1 {errname(err)}"
        text = f"[pid {task.tid}] p{op}({label}, {size}, {offset:#x}) = {ret}"
        self._emit({"t": time.time(), "op": op, "pid": task.tid, "node": label, "offset": offset,
                    "size": size, "result": result, "errno": None if err is None else errname(err)}, text)
