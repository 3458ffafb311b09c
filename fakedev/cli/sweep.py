"""``fakedev sweep``: fail each call a program makes, one run per call.

In the spirit of the kernel's fail_nth tests. A first run of CMD under
``fakedev run`` with nothing failing counts the calls it makes (the model's
``FaultPlan.log_calls``, written by ``fakedev run --fault-report``). Then CMD
runs once per counted call i = 1..N, each time under a fresh ``fakedev run``
(a fresh model) with ``--fault call=OP,nth=i,errno=E``, so only that call
fails. Every run gets a verdict:

    ok              CMD exited 0 (it coped with the failure)
    failed-cleanly  CMD exited non-zero
    CRASHED         CMD was killed by a signal (SIGSEGV, SIGABRT, ...)
    HUNG            CMD did not end within the timeout (its process group is killed)
    LEAKED          after CMD ended and its files were released, the model
                    still holds something (an open device or group, a live
                    iommufd context, an eventfd)
    BROKEN          the model's invariants do not hold, or fakedev itself failed

A run whose failing call was never reached (the program took another path)
says so (``reached: false``). The exit status is 1 when any run is CRASHED,
HUNG, LEAKED or BROKEN, else 0. Runs are sequential and each one is bounded
by the timeout, so a sweep is deterministic for a deterministic program.

What lives here: the sweep loop, the verdicts, the table and JSON output, and
``leftovers`` (what ``Kernel.describe()`` shows still held). What must not:
start servers or namespaces itself (each run is a ``fakedev run`` process).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

#: the errno a sweep fails calls with unless told: like fail_nth's failed
#: allocations, ENOMEM is an errno nearly every VFIO/iommufd path can return
DEFAULT_ERRNO = "ENOMEM"
DEFAULT_TIMEOUT = 30.0
BAD_VERDICTS = ("CRASHED", "HUNG", "LEAKED", "BROKEN")
_KEEP_OUTPUT = 20  # lines of a run's output kept in the JSON


def leftovers(state: Mapping[str, Any]) -> list[str]:
    """What ``Kernel.describe()`` ``state`` shows still held once every file is released."""
    out: list[str] = []
    for d in state.get("devices", []):
        held = [k for k in ("open_count", "cdev_files") if d.get(k)]
        if d.get("iommufd") is not None:
            held.append("iommufd")
        if d.get("irqs", {}).get("eventfds"):
            held.append(f"{d['irqs']['eventfds']} eventfds")
        if held:
            out.append(f"device {d.get('bdf')}: {', '.join(held)}")
    for g in state.get("groups", []):
        held = [k for k in ("open", "container", "container_users", "cdev_device_open_cnt") if g.get(k)]
        if g.get("iommufd") is not None:
            held.append("iommufd")
        if held:
            out.append(f"group {g.get('id')}: {', '.join(held)}")
    for name, ctx in state.get("iommufd", {}).items():
        if not ctx.get("dead", False):
            out.append(f"iommufd context {name} is alive")
    return out


@attrs.define
class Run:
    """One run of CMD: ``nth`` 0 is the counting run (nothing fails)."""

    nth: int
    call: dict[str, Any] | None  # the counted call failed in this run
    status: int | None = None  # CMD's exit status (128+N: signal N), None if hung
    verdict: str = ""
    signal: str | None = None
    reached: bool = True
    injected: list[dict[str, Any]] = attrs.field(factory=list)
    problems: list[str] = attrs.field(factory=list)
    output: list[str] = attrs.field(factory=list)

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _verdict(run: Run, report: Mapping[str, Any] | None, fakedev_failed: bool) -> None:
    if run.status is None:
        run.verdict = "HUNG"
        return
    if report is None or fakedev_failed:
        run.verdict = "BROKEN"
        run.problems.append("fakedev did not report (the device server failed?)")
        return
    invariants = list(report.get("invariants", []))
    left = list(report.get("leftovers", []))
    run.problems += invariants + left
    if run.status > 128 and (run.status - 128) in {s.value for s in signal.Signals}:
        run.verdict = "CRASHED"
        run.signal = signal.Signals(run.status - 128).name
    elif invariants:
        run.verdict = "BROKEN"
    elif left:
        run.verdict = "LEAKED"
    else:
        run.verdict = "ok" if run.status == 0 else "failed-cleanly"


def call_text(call: Mapping[str, Any] | None) -> str:
    if call is None:
        return "(none)"
    devs = ",".join(call.get("devices", []))
    return f"#{call['seq']} {call['op']} on {call.get('node', '?')}" + (f" [{devs}]" if devs else "")


@attrs.define
class Sweep:
    """One sweep: ``run_args`` are the ``fakedev run`` options (``--tree T`` ...)."""

    cmd: Sequence[str]
    run_args: Sequence[str] = ()
    op: str = "*"
    errno: str = DEFAULT_ERRNO
    device: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    limit: int | None = None
    fakedev: Sequence[str] = (sys.executable, "-m", "fakedev.cli.main")
    progress: Any = None  # a file to print one line per run to, or None
    runs: list[Run] = attrs.field(factory=list)
    counted: int = 0
    calls: list[dict[str, Any]] = attrs.field(factory=list)  # the counted calls

    def _run(self, fault: str | None, workdir: Path, nth: int, call: dict[str, Any] | None) -> Run:
        report_path = workdir / f"report-{nth}.json"
        argv = [*self.fakedev, "run", *self.run_args, "--fault-report", str(report_path)]
        if fault is not None:
            argv += ["--fault", fault]
        argv += ["--", *self.cmd]
        run = Run(nth, call)
        out_path = workdir / f"output-{nth}.txt"
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                status: int | None = proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                status = None
                _kill_group(proc)
        run.status = status
        run.output = out_path.read_text(errors="replace").splitlines()[-_KEEP_OUTPUT:]
        report: dict[str, Any] | None = None
        if status is not None:
            try:
                report = json.loads(report_path.read_text())
            except (OSError, ValueError):
                report = None
        if report is not None:
            run.injected = list(report.get("injected", []))
            run.reached = fault is None or bool(run.injected)
            run.status = int(report.get("status", status if status is not None else 0))
        _verdict(run, report, fakedev_failed=report is None)
        if report is not None and fault is None:
            self.calls = [c for c in report.get("calls", []) if self._matches(c)]
        return run

    def _matches(self, call: Mapping[str, Any]) -> bool:
        return (self.op == "*" or call.get("op") == self.op) and (
            self.device is None or self.device in call.get("devices", []))

    def fault_spec(self, nth: int) -> str:
        spec = f"call={self.op},nth={nth},errno={self.errno}"
        return spec + (f",device={self.device}" if self.device else "")

    def run(self) -> int:
        """Run the sweep; the exit status (1 if any run went badly)."""
        self.calls = []
        with tempfile.TemporaryDirectory(prefix="fakedev-sweep-") as tmp:
            work = Path(tmp)
            base = self._run(None, work, 0, None)
            self.runs.append(base)
            self._say(base)
            self.counted = len(self.calls)
            calls = self.calls if self.limit is None else self.calls[: self.limit]
            if base.verdict in ("HUNG", "BROKEN"):
                calls = []  # nothing reliable to sweep over
            for i, call in enumerate(calls, 1):
                r = self._run(self.fault_spec(i), work, i, call)
                self.runs.append(r)
                self._say(r)
        return 1 if any(r.verdict in BAD_VERDICTS for r in self.runs) else 0

    def _say(self, r: Run) -> None:
        if self.progress is not None:
            print(f"sweep: run {r.nth}: {call_text(r.call)}: {r.verdict}", file=self.progress, flush=True)

    # -- output ----------------------------------------------------------------------
    def as_dict(self) -> dict[str, Any]:
        return {
            "cmd": list(self.cmd), "op": self.op, "errno": self.errno, "device": self.device,
            "timeout": self.timeout, "counted_calls": self.counted,
            "runs": [r.as_dict() for r in self.runs],
            "bad": sum(1 for r in self.runs if r.verdict in BAD_VERDICTS),
        }

    def table(self) -> str:
        rows = [("run", "failed call", "errno", "exit", "verdict")]
        for r in self.runs:
            exit_text = "-" if r.status is None else str(r.status)
            if r.signal:
                exit_text += f" ({r.signal})"
            verdict = r.verdict + ("" if r.reached else " (not reached)")
            if r.problems and r.verdict in ("LEAKED", "BROKEN"):
                verdict += ": " + "; ".join(r.problems[:3])
            rows.append((str(r.nth), call_text(r.call), "-" if r.call is None else self.errno, exit_text, verdict))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4]
                 for row in rows]
        bad = sum(1 for r in self.runs if r.verdict in BAD_VERDICTS)
        lines.append(f"{self.counted} calls counted ({'any call' if self.op == '*' else self.op}), "
                     f"{len(self.runs) - 1} failed one by one with {self.errno}: "
                     f"{bad} run(s) crashed, hung, leaked or broke")
        return "\n".join(lines)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """A run past its time: kill everything in its session (fakedev and CMD)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
