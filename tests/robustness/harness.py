"""Shared pieces of the robustness tests and benchmarks: the fuzz client built
with gcc, a kernel model served in this process (so the model can be inspected
after the clients are gone), the leak check, the hot-reset ownership check, the
watches that check the invariants after every served call and that an injected
failure changed nothing, and a fresh client that proves the daemon still serves.

Used by tests/robustness/test_*.py and benchmarks/{fuzz,kill_race}.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fakedev.fuse import mount as M  # noqa: E402
from fakedev.host.server import Server  # noqa: E402
from fakedev.host.trace import Tracer  # noqa: E402
from fakedev.kernel.fault_inject import InjectedError  # noqa: E402
from fakedev.kernel.kernel import Kernel  # noqa: E402
from fakedev.tree import load_tree  # noqa: E402

FIXTURES = REPO / "fixtures"
#: the dual-function NIC (vfio0, vfio1: one dev_set) plus a DMA engine (vfio2)
DMA_NIC = str(Path(__file__).resolve().parent / "dma-nic.toml")
FUZZ_UNPLUG_ORDER = ("0000:01:00.0", "0000:03:00.0", "0000:01:00.1")
FUZZ_C = REPO / "tools" / "fuzz_client.c"
KCLIENT_C = REPO / "tests" / "fuse" / "kclient.c"


def build(src: Path, out: Path) -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("gcc is missing")
    subprocess.run([gcc, "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(src)],
                   check=True)
    return str(out)


def build_fuzz_client(outdir: Path) -> str:
    return build(FUZZ_C, outdir / "fuzz_client")


def build_kclient(outdir: Path) -> str:
    gcc = shutil.which("gcc") or "gcc"
    out = outdir / "kclient"
    subprocess.run([gcc, "-O2", "-Wall", "-o", str(out), str(KCLIENT_C)], check=True)
    return str(out)


def make_kernel(tree: str = "dual-function-nic") -> Kernel:
    """A fixture by name, or a tree file by path."""
    path = Path(tree) if tree.endswith(".toml") else FIXTURES / f"{tree}.toml"
    return load_tree(path).make_kernel()


# ----------------------------------------------------------------- hot reset ownership


@dataclass
class ResetWatch:
    """Checks, at the moment the model records a hot reset, that the dev_set is
    owned by one iommufd context (the caller's: its own device is a bound member):
    every member bound to it, or unbound in an iommu group it owns. Installed
    over ``kernel.vfio.record_reset``; counts one record per function reset."""

    kernel: Kernel
    hot_resets: int = 0
    #: hot resets (calls): each record counts 1/len(dev_set) of one
    events: Fraction = Fraction(0)
    violations: list[str] = field(default_factory=list)

    def install(self) -> ResetWatch:
        vfio = self.kernel.vfio
        orig = vfio.record_reset

        def record_reset(pdev: Any, method: str, cause: str, pid: int | None) -> Any:
            if cause == "VFIO_DEVICE_PCI_HOT_RESET":
                self.hot_resets += 1
                self.check(pdev, pid)
            return orig(pdev, method, cause, pid)

        vfio.record_reset = record_reset  # type: ignore[method-assign]
        return self

    def check(self, pdev: Any, pid: int | None) -> None:
        """Models the rule of vfio_pci_dev_set_hot_reset() on the cdev path: every
        member is bound to the caller's context, or unbound with its iommu group
        owned by that context (no other context can hold it then)."""
        dev = next((d for d in self.kernel.vfio.devices if d.pdev is pdev), None)
        if dev is None:
            return  # a function not bound to vfio-pci
        members = dev.dev_set.device_list
        self.events += Fraction(1, len(members))
        if any(d.group.container is not None for d in members):
            return  # the group path (group fds are checked by the model's own tests)
        ctxs = {id(d.iommufd_ictx): d.iommufd_ictx for d in members if d.iommufd_device is not None}
        if len(ctxs) != 1:
            self.violations.append(f"pid {pid}: hot reset of {pdev.name} with members in {len(ctxs)} contexts")
            return
        (ctx,) = ctxs.values()
        for d in members:
            if d.iommufd_device is None:
                ig = d.iommu_group
                if ig is None or ig.owner is not ctx:
                    self.violations.append(f"pid {pid}: hot reset of {pdev.name} while {d.name} is not owned")


# ----------------------------------------------------------------- leaks


def leaks(state: dict[str, Any]) -> list[str]:
    """What is still held in a ``describe()`` snapshot once every client is gone."""
    out = []
    for d in state["devices"]:
        if d.get("open_count"):
            out.append(f"device {d.get('name')}: open_count {d['open_count']}")
        if d.get("iommufd") is not None:
            out.append(f"device {d.get('name')}: bound to {d['iommufd']}")
    for g in state["groups"]:
        if g["open"] or g["container"] or g["iommufd"] or g["cdev_device_open_cnt"] or g["dma_owner"]:
            out.append(f"group {g['id']}: {g}")
    for name, c in state["iommufd"].items():
        if not c.get("dead"):
            out.append(f"{name}: not released ({len(c.get('objects', []))} objects)")
    for gid, ig in state["iommu_groups"].items():
        if ig.get("owner_cnt"):
            out.append(f"iommu group {gid}: owner_cnt {ig['owner_cnt']}")
    for u in state.get("unplugs", []):
        out.append(f"unplug still pending: {u}")
    return out


def own_fds(trace: Path | None = None) -> int:
    """File descriptors of this (the serving) process: pidfds, fd copies (eventfds,
    MAP_FILE files held by a mapping) and the fds of the served connection; not
    counting the trace file (opened at its first record)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if trace is not None and os.readlink(f"/proc/self/fd/{fd}") == str(trace):
                continue
        except OSError:
            continue
        n += 1
    return n


def fd_targets() -> list[str]:
    """What this process's fds are (for a leak report)."""
    out = []
    for fd in sorted(os.listdir("/proc/self/fd"), key=int):
        try:
            out.append(f"{fd}:{os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            pass
    return out


@dataclass
class InvariantWatch:
    """``kernel.check_invariants()`` after every model call the server runs
    through ``_guard`` (every call but the untraced fast-path ioctls; with the
    trace on or a fault armed, every call), with the lock still held."""

    kernel: Kernel
    checks: int = 0
    violations: list[str] = field(default_factory=list)

    def install(self, srv: Server) -> InvariantWatch:
        orig = srv._guard

        def guard(req: Any, fn: Any, task: Any) -> bytes:
            try:
                return orig(req, fn, task)
            finally:
                self.checks += 1
                bad = self.kernel.check_invariants()
                if bad and len(self.violations) < 20:
                    self.violations.append(f"after {type(req).__name__} of pid {req.pid}: {bad}")

        srv._guard = guard  # type: ignore[method-assign]
        return self


def _comparable(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k != "faults"}


@dataclass
class FaultWatch:
    """Around every call through the fault plan: ``describe()`` (without the
    plan's own records) before and after each injected failure must be equal.
    The plan fails a call before the model runs it; this proves it."""

    kernel: Kernel
    injected: int = 0
    changed: list[str] = field(default_factory=list)

    def install(self) -> FaultWatch:
        plan = self.kernel.faults
        for name in ("ioctl", "read", "write", "open"):
            setattr(plan, name, self._wrap(name, getattr(plan, name)))
        return self

    def _wrap(self, name: str, orig: Any) -> Any:
        def call(*args: Any) -> Any:
            before = _comparable(self.kernel.describe())
            try:
                return orig(*args)
            except InjectedError:
                self.injected += 1
                after = _comparable(self.kernel.describe())
                if after != before and len(self.changed) < 20:
                    diff = sorted(k for k in before if before[k] != after.get(k))
                    self.changed.append(f"injected {name} changed {diff}")
                raise

        return call


def functions(kernel: Kernel) -> list[str]:
    """The BDFs of the tree's vfio-pci functions."""
    return [d.pdev.name for d in kernel.vfio_devices()]


def fuzz_env(kernel: Kernel, *, control: int = 0, unplug_ppm: int = 0, unplug_only: str | None = None,
             dma: bool = False) -> dict[str, str]:
    """The environment of a fuzz client: ``control`` of every 1000 steps a
    control-file command; an unplug command (or unplug fault) names a real
    function ``unplug_ppm`` times in 1,000,000 (only ``unplug_only`` if given);
    the DMA engine's node when ``dma`` (the tree's dma-engine function)."""
    e = {"FUZZ_CONTROL": str(control), "FUZZ_UNPLUG": str(unplug_ppm),
         "FUZZ_BDFS": ",".join(functions(kernel))}
    if unplug_only is not None:
        e["FUZZ_UNPLUG_ONLY"] = unplug_only
    if dma:
        eng = [d for d in kernel.vfio_devices() if type(d.behaviour).__name__ == "DmaEngine"]
        if eng:
            e["FUZZ_DMA"] = f"vfio/devices/vfio{eng[0].index}"
    return e


async def settle(kernel: Kernel, srv: Server, timeout: float = 20.0) -> tuple[list[str], list[str]]:
    """Wait (bounded) until every open is released; (invariant violations, leaks)."""
    with trio.move_on_after(timeout):
        while srv.open_files:
            await trio.sleep(0.02)
    async with srv.lock:
        inv = kernel.check_invariants()
        state = kernel.describe()
    lk = leaks(state)
    if srv.open_files:
        lk.append(f"server: {srv.open_files} opens not released after {timeout} s")
    return inv, lk


# ----------------------------------------------------------------- serving


@asynccontextmanager
async def served(mnt: Path, tree: str = "dual-function-nic", *, trace: Path | None = None
                 ) -> AsyncIterator[tuple[Kernel, Server]]:
    """The kernel model of ``tree`` served at ``mnt`` by this process; unmounted after."""
    k = make_kernel(tree)
    tracer = Tracer(str(trace), None, enabled=True) if trace is not None else None
    srv = Server(k, tracer=tracer)
    try:
        async with trio.open_nursery() as n:
            await n.start(srv.serve, str(mnt))
            try:
                yield k, srv
            finally:
                n.cancel_scope.cancel()
    finally:
        if tracer is not None:
            tracer.close()
        M.clear_stale(str(mnt))


# ----------------------------------------------------------------- clients


def parse_summary(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {"errno": {}}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "errno":
            out["errno"][int(parts[1])] = int(parts[2])
        elif len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


#: argsz cap of the suite's fuzz runs: a 4 GiB argsz makes the model allocate the
#: whole tail (see tests/robustness/test_argsz.py), seconds per call; the
#: benchmarks run uncapped.
SUITE_MAX_ARGSZ = 1 << 16


async def run_client(client: str, mnt: Path, mode: str, seed: int, n: int, timeout: float = 120,
                     max_argsz: int | None = SUITE_MAX_ARGSZ, env: dict[str, str] | None = None) -> dict[str, Any]:
    cap = [] if max_argsz is None else [str(max_argsz)]
    with trio.fail_after(timeout):
        r = await trio.run_process([client, str(mnt), mode, str(seed), str(n), *cap], capture_stdout=True,
                                   capture_stderr=True, check=False, env=dict(os.environ, **(env or {})))
    if r.returncode != 0:
        raise AssertionError(f"{mode} seed {seed}: exit {r.returncode}: {r.stderr.decode()[-2000:]}")
    return parse_summary(r.stdout.decode())


async def run_clients(client: str, mnt: Path, mode: str, seeds: Sequence[int], n: int,
                      timeout: float = 300, max_argsz: int | None = SUITE_MAX_ARGSZ,
                      env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = [{} for _ in seeds]

    async def one(i: int, seed: int) -> None:
        results[i] = await run_client(client, mnt, mode, seed, n, timeout, max_argsz, env)

    async with trio.open_nursery() as nursery:
        for i, s in enumerate(seeds):
            nursery.start_soon(one, i, s)
    return results


async def readline(stream: trio.abc.ReceiveStream) -> bytes:
    out = b""
    while not out.endswith(b"\n"):
        chunk = await stream.receive_some(1)
        if not chunk:
            break
        out += chunk
    return out


async def start_client(client: str, mnt: Path, mode: str, seed: int, n: int = 100000000,
                       env: dict[str, str] | None = None) -> trio.Process:
    """A client started (stdout piped) and under way: its "go" line was read."""
    p = await trio.lowlevel.open_process([client, str(mnt), mode, str(seed), str(n), str(SUITE_MAX_ARGSZ)],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                         env=dict(os.environ, **(env or {})))
    assert p.stdout is not None
    with trio.fail_after(30):
        await readline(p.stdout)
    return p


async def kill_one(client: str, mnt: Path, mode: str, seed: int, delay: float,
                   env: dict[str, str] | None = None) -> int:
    """Start a client, wait for it to be under way plus ``delay`` s, SIGKILL it; its status."""
    p = await trio.lowlevel.open_process([client, str(mnt), mode, str(seed), "100000000", str(SUITE_MAX_ARGSZ)],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                         env=dict(os.environ, **(env or {})))
    try:
        assert p.stdout is not None
        with trio.fail_after(30):
            await readline(p.stdout)
            await trio.sleep(delay)
            p.send_signal(signal.SIGKILL)
            return await p.wait()
    finally:
        if p.returncode is None:
            p.kill()
            with trio.move_on_after(30):
                await p.wait()
        if p.stdout is not None:
            await p.stdout.aclose()


async def fresh_dma_works(client: str, mnt: Path, kernel: Kernel) -> list[str]:
    """A new process sets up the DMA engine and checks a copy and a fill byte for byte."""
    with trio.fail_after(60):
        r = await trio.run_process([client, str(mnt), "dmacheck", "1", "1"], capture_stdout=True, check=False,
                                   env=dict(os.environ, **fuzz_env(kernel, dma=True)))
    return r.stdout.decode().splitlines()


async def control(srv: Server, command: str) -> str:
    """Run one control-file command in the server, as a write to .fakedev/control would."""
    from fakedev.host import control as C

    return await srv.locked(lambda: C.run_command(srv, command))


async def fresh_client_works(kclient: str, mnt: Path) -> list[str]:
    """A new process opens, binds, attaches and hot-resets the dual-function NIC."""
    with trio.fail_after(60):
        r = await trio.run_process([kclient, str(mnt), "cdev"], capture_stdout=True, check=False)
    return r.stdout.decode().splitlines()


def errno_top(hists: Sequence[dict[int, int]], n: int = 10) -> list[tuple[str, int]]:
    total: dict[int, int] = {}
    for h in hists:
        for e, c in h.items():
            total[e] = total.get(e, 0) + c
    import errno as E

    name = {0: "ok"} | dict(E.errorcode)
    return [(name.get(e, str(e)), c) for e, c in sorted(total.items(), key=lambda x: -x[1])[:n]]


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), *sys.path[1:]]))
