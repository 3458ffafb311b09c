"""Processes racing open, bind, attach, hot reset and close on one dev_set
(dual-function-nic, bus 0000:01): the model stays consistent after every
served call and every hot reset that succeeded had every dev_set member owned
by the caller's context, checked both inside the model at the moment of the
reset and from the trace. The second race adds fault rules armed and cleared
by another process throughout and one function unplugged mid-run (its REQ
timer ticking while holders keep it), in rounds with a fresh model each."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

import fakedev.kernel.kernel as kernel_module
from tests.robustness import harness as H

pytestmark = pytest.mark.needs_root

#: 16 processes on 2 cores: the server is one loop, so more processes only
#: lengthen its queue; 10 s is enough for a few thousand resets.
PROCS = 16
MILLIS = 10_000


def check_trace(path: Path, members: list[str], unplugs: Sequence[tuple[float, str]] = ()
                ) -> tuple[int, list[str]]:
    """(successful hot resets, violations) from the JSON-lines trace.

    The trace is written under the model lock, so its order is the order of the
    calls. Each open is followed by its open number (``open``) from its open
    record to its release record; a successful VFIO_DEVICE_BIND_IOMMUFD binds
    that open (pid, iommufd fd) until its release. For each successful
    VFIO_DEVICE_PCI_HOT_RESET by a process, every current dev_set member must
    have a live bound open, bound by that process to one iommufd fd.

    ``unplugs``: (time.time() taken under the model lock at the unplug, node):
    an unplugged member leaves the dev_set at its last release (at once if no
    open is live), as vfio_unregister_group_dev() lets it.
    """
    opens: dict[int, str] = {}  # live open number -> node
    bound: dict[int, tuple[int, Any]] = {}  # open number -> (pid, iommufd fd)
    pending = sorted(unplugs)
    unplugged: set[str] = set()
    gone: set[str] = set()
    ok = 0
    bad: list[str] = []

    def live(node: str) -> list[int]:
        return [fh for fh, n in opens.items() if n == node]

    with open(path) as f:
        for n, line in enumerate(f, 1):
            r = json.loads(line)
            while pending and pending[0][0] < r["t"]:
                node = pending.pop(0)[1]
                unplugged.add(node)
                if not live(node):
                    gone.add(node)
            op, fh = r["op"], r.get("open")
            if op == "open":
                if r["errno"] is None:
                    opens[fh] = r["node"]
                continue
            if op == "release":
                node = opens.pop(fh, "")
                bound.pop(fh, None)
                if node in unplugged and not live(node):
                    gone.add(node)
                continue
            if op != "ioctl" or r["errno"] is not None:
                continue
            if r["name"] == "VFIO_DEVICE_BIND_IOMMUFD":
                req = r["request"]
                bound[fh] = (r["pid"], req.get("iommufd") if isinstance(req, dict) else None)
            elif r["name"] == "VFIO_DEVICE_PCI_HOT_RESET":
                ok += 1
                owners: dict[str, list[tuple[int, Any]]] = {
                    m: [bound[o] for o in live(m) if o in bound] for m in members if m not in gone}
                if r["node"] not in owners:
                    bad.append(f"line {n}: pid {r['pid']} reset {r['node']}, which is not a member")
                elif any(len(b) != 1 or b[0][0] != r["pid"] for b in owners.values()):
                    bad.append(f"line {n}: pid {r['pid']} reset {r['node']} with bound opens {owners}")
                elif len({b[0][1] for b in owners.values()}) != 1:
                    bad.append(f"line {n}: pid {r['pid']} reset {r['node']} with members in two iommufds {owners}")
    return ok, bad


async def test_hot_reset_race(mnt: Path, tmp_path: Path, fuzz_client: str, kclient: str) -> None:
    trace = tmp_path / "trace.jsonl"
    async with H.served(mnt, trace=trace) as (k, srv):
        watch = H.ResetWatch(k).install()
        iw = H.InvariantWatch(k).install(srv)
        res = await H.run_clients(fuzz_client, mnt, "race", list(range(1, PROCS + 1)), MILLIS, timeout=120)
        reset_ok = sum(r["reset_ok"] for r in res)
        assert reset_ok > 0
        assert sum(r["split_reset_ok"] for r in res) == 0  # two contexts never reset
        inv, lk = await H.settle(k, srv)
        assert (inv, lk, srv.unexpected_errors) == ([], [], 0)
        assert (watch.violations, iw.violations) == ([], [])
        assert iw.checks > sum(sum(r["errno"].values()) for r in res)  # every call (and release) checked
        members = [f"vfio{d.index}" for d in k.vfio_devices()]
        assert watch.hot_resets == len(members) * reset_ok  # one record per function reset
        assert watch.events == reset_ok
        srv.tracer.flush()
        traced_ok, bad = check_trace(trace, members)
        assert bad == []
        assert traced_ok == reset_ok
        out = await H.fresh_client_works(kclient, mnt)
        assert out[-1] == "reset 0", out


async def race_round(mnt: Path, trace: Path, client: str, *, millis: int, procs: int, seed: int,
                     unplug: bool = True) -> dict[str, Any]:
    """One round on a fresh dual-function-nic model: ``procs`` race loops, a
    chaos process arming and clearing fault rules, and (with ``unplug``) one
    function unplugged at a random moment. Returns the figures and every
    problem found (``problems`` empty when all held)."""
    rnd = random.Random(seed)
    problems: list[str] = []
    async with H.served(mnt, trace=trace) as (k, srv):
        base_fds = H.own_fds(trace)
        watch = H.ResetWatch(k).install()
        iw = H.InvariantWatch(k).install(srv)
        fw = H.FaultWatch(k).install()
        members = [f"vfio{d.index}" for d in k.vfio_devices()]
        names = {f"vfio{d.index}": d.pdev.name for d in k.vfio_devices()}
        unplugs: list[tuple[float, str]] = []
        env = H.fuzz_env(k)
        out: dict[str, Any] = {}

        async def unplug_one() -> None:
            await trio.sleep(rnd.uniform(0.2, 0.6) * millis / 1000)
            node = members[seed % len(members)]

            def go() -> None:
                unplugs.append((time.time(), node))
                srv.unplug(names[node])

            await srv.locked(go)

        async with trio.open_nursery() as n:
            async def chaos() -> None:
                out["chaos"] = await H.run_client(client, mnt, "chaos", seed, millis, timeout=millis / 1000 + 120,
                                                  env=env)

            async def race() -> None:
                out["race"] = await H.run_clients(client, mnt, "race", [seed * 100 + i for i in range(procs)],
                                                  millis, timeout=millis / 1000 + 120)

            n.start_soon(chaos)
            n.start_soon(race)
            if unplug:
                n.start_soon(unplug_one)
        await H.control(srv, "clear")
        inv, lk = await H.settle(k, srv)
        res = out["race"]
        reset_ok = sum(r["reset_ok"] for r in res)
        srv.tracer.flush()
        traced_ok, bad = check_trace(trace, members, unplugs)
        listed = await trio.to_thread.run_sync(lambda: sorted((mnt / "vfio" / "devices").iterdir()))
        for label, problem in [
            ("invariants", inv), ("leaks", lk), ("invariants after a call", iw.violations),
            ("ownership in the model", watch.violations), ("ownership from the trace", bad),
            ("an injected failure changed the model", fw.changed),
        ]:
            if problem:
                problems.append(f"{label}: {problem}")
        if srv.unexpected_errors:
            problems.append(f"unexpected model exceptions: {srv.unexpected_errors}")
        if sum(r["split_reset_ok"] for r in res) and not unplugs:  # (one member left: legitimate)
            problems.append("a reset from two contexts succeeded")
        if watch.events != reset_ok or traced_ok != reset_ok:
            problems.append(f"resets: clients {reset_ok}, model {watch.events}, trace {traced_ok}")
        if H.own_fds(trace) != base_fds:
            problems.append(f"server fds: {base_fds} before, {H.own_fds(trace)} after: {H.fd_targets()}")
        gone = [node for _, node in unplugs]
        if [p.name for p in listed] != [m for m in members if m not in gone]:
            problems.append(f"nodes after unplugging {gone}: {[p.name for p in listed]}")
        out.update(problems=problems, reset_ok=reset_ok, traced_ok=traced_ok, unplugged=gone,
                   injected=fw.injected, checks=iw.checks, hot_resets=watch.hot_resets,
                   requests=k.describe().get("unplugs", []))
    return out


async def test_race_with_unplug_and_faults(mnt: Path, tmp_path: Path, fuzz_client: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Two rounds of 4 s: 16 race loops, fault rules armed and cleared by a
    chaos process, one function unplugged mid-run with its REQ timer ticking
    every 50 ms (10 s in the kernel) while holders keep it."""
    monkeypatch.setattr(kernel_module, "UNPLUG_REQUEST_INTERVAL", 0.05)
    injected = resets = 0
    for rnd in range(2):
        out = await race_round(mnt, tmp_path / f"trace{rnd}.jsonl", fuzz_client, millis=4000, procs=PROCS,
                               seed=rnd + 1)
        print(f"round {rnd}: resets {out['reset_ok']}, injected {out['injected']}, unplugged {out['unplugged']}, "
              f"calls checked {out['checks']}, chaos {out['chaos']['armed']} armed")
        assert out["problems"] == [], rnd
        assert len(out["unplugged"]) == 1
        assert out["chaos"]["armed"] > 10
        injected += out["injected"]
        resets += out["reset_ok"]
    assert injected > 0  # calls failed as injected while the race ran
    assert resets > 0
