"""Long kill and race runs against kernel models served through FUSE.

1. 1,000 clients (random, mostly-valid, race loops, DMA-engine fuzzing, DMA
   loops) SIGKILLed at random points, two at a time, in batches of 100 on a
   fresh dma-nic model (tests/robustness/dma-nic.toml: the dual-function NIC
   plus a DMA engine); the clients write control commands (fault rules armed
   and cleared, so kills land while faults are armed), every batch but the
   first unplugs one function (rotating) while the clients hold it, the REQ
   timer asking every 50 ms; in every other batch the first DMA of each killed
   client SIGKILLs it while the DMA is in flight. After each batch: the
   pending removal completed, the leak check, the server's fds, invariants and
   fresh clients.
2. A 60 s hot-reset race of 16 processes on one dev_set (dual-function-nic),
   with the trace on; every successful reset checked in the model (at the
   moment of the reset) and from the trace; invariants after every call.
3. The same race with the new features, 4 rounds of 15 s: fault rules armed
   and cleared by a chaos process throughout, one function unplugged mid-round
   in 3 rounds (the REQ timer asking every 50 ms).

usage: python benchmarks/kill_race.py [--kills N] [--race-seconds S] [--procs P] [--part 1|2|3|all]
Run as root (it mounts). Prints the figures as a Markdown block.
"""

from __future__ import annotations

import argparse
import functools
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import fakedev.kernel.kernel as kernel_module  # noqa: E402
from tests.robustness import harness as H  # noqa: E402
from tests.robustness.test_kill import KillingMemory, kill_many  # noqa: E402
from tests.robustness.test_race import check_trace, race_round  # noqa: E402

MODES = ("fuzz", "deep", "race", "dma", "dmaloop")


async def kill_batch(mnt: Path, client: str, kclient: str, b: int, n: int, figs: dict[str, int],
                     problems: list[str], fresh: dict[str, int]) -> None:
    """One batch of ``n`` kills on a fresh dma-nic model (see the module doc)."""
    async with H.served(mnt, H.DMA_NIC) as (k, srv):
        base = H.own_fds()
        watch = H.ResetWatch(k).install()
        iw = H.InvariantWatch(k).install(srv)
        fw = H.FaultWatch(k).install()
        mem = KillingMemory(k.dma_memory)
        if b % 2:
            k.dma_memory = mem
        env = H.fuzz_env(k, control=10, dma=True)
        bdf = ("0000:01:00.0", "0000:03:00.0", "0000:01:00.1")[b % 3] if b else None
        statuses: list[int] = []

        async def killer() -> None:
            statuses.extend(await kill_many(client, mnt, n, seed=2024 + b, modes=MODES, env=env))

        async def unplugger() -> None:
            assert bdf is not None
            await trio.sleep(random.Random(b).uniform(0.5, 2.0))
            with trio.move_on_after(3):  # when a client holds it
                while not any(d["bdf"] == bdf and d["open_count"] for d in k.describe()["devices"]):
                    await trio.sleep(0.001)
            await srv.locked(functools.partial(srv.unplug, bdf))
            figs["pending"] += k.unplug_pending(bdf)

        async def mid_dma() -> None:
            # the pids of the running clients, as they start: /proc children of this process
            while True:
                for pid in _children():
                    mem.victims.add(pid)
                await trio.sleep(0.005)

        async with trio.open_nursery() as nursery:
            if bdf is not None:
                nursery.start_soon(unplugger)
            if b % 2:
                nursery.start_soon(mid_dma)
            await killer()
            nursery.cancel_scope.cancel()
        mem.victims.clear()
        k.dma_memory = mem.mem
        await H.control(srv, "clear")
        inv, lk = await H.settle(k, srv, timeout=60)
        figs["killed"] += sum(1 for s in statuses if s == -9)
        figs["started"] += len(statuses)
        figs["own_exit"] += sum(1 for s in statuses if s != -9)
        figs["resets"] += int(watch.events)
        figs["injected"] += fw.injected
        figs["mid_dma"] += len(mem.killed)
        if bdf is not None:
            figs["unplugs"] += bdf not in H.functions(k)
            if k.unplugs or bdf in H.functions(k):
                problems.append(f"batch {b}: unplug of {bdf} not complete")
        for label, p in [("invariants", inv), ("leaks", lk), ("invariants after a call", iw.violations),
                         ("ownership", watch.violations), ("injected changed state", fw.changed)]:
            if p:
                problems.append(f"batch {b}: {label}: {p}")
        if srv.unexpected_errors:
            problems.append(f"batch {b}: {srv.unexpected_errors} unexpected model exceptions")
        if H.own_fds() != base:
            problems.append(f"batch {b}: server fds {base} -> {H.own_fds()}: {H.fd_targets()}")
        left = {f"vfio{d.index}" for d in k.vfio_devices()}
        outs: list[str] = []
        if {"vfio0", "vfio1"} <= left:
            outs += (await H.fresh_client_works(kclient, mnt))[-1:]
        if "vfio2" in left:
            outs += await H.fresh_dma_works(client, mnt, k)
        for o in outs:
            fresh[o] = fresh.get(o, 0) + 1
        if any(o not in ("reset 0", "dma ok") for o in outs):
            problems.append(f"batch {b}: fresh clients {outs}")


async def kills(tmp: Path, client: str, kclient: str, total: int) -> bool:
    mnt = tmp / "mnt"
    mnt.mkdir()
    batch = 100
    t0 = time.monotonic()
    problems: list[str] = []
    figs: dict[str, int] = {"killed": 0, "started": 0, "resets": 0, "injected": 0, "unplugs": 0,
                            "pending": 0, "mid_dma": 0, "own_exit": 0}
    fresh: dict[str, int] = {}
    for b in range((total + batch - 1) // batch):
        await kill_batch(mnt, client, kclient, b, min(batch, total - b * batch), figs, problems, fresh)
        print(f"  kill batch {b}: {figs}", file=sys.stderr, flush=True)
    wall = time.monotonic() - t0
    print("## Kills (benchmarks/kill_race.py, part 1)\n")
    print(f"- clients SIGKILLed: {figs['killed']} of {figs['started']} started (random delay 0-80 ms after start; "
          f"modes {'/'.join(MODES)}, two at a time; 1% of their steps control commands; "
          f"{figs['own_exit']} ended first), "
          f"{(total + batch - 1) // batch} batches of {batch} on a fresh dma-nic model, {wall:.1f} s")
    print(f"- killed while their DMA was in flight: {figs['mid_dma']}; calls failed by armed fault rules: "
          f"{figs['injected']}; hot resets reached: {figs['resets']}")
    print(f"- functions unplugged while clients held them: {figs['unplugs']} (pending at the unplug: "
          f"{figs['pending']}); every removal completed once its holders were killed")
    print(f"- problems (invariants after every call, leaks, server fds, unexpected exceptions, ownership, "
          f"injected-changed-state): {problems if problems else 'none'}")
    print(f"- fresh clients after each batch: {fresh}\n", flush=True)
    return not problems


def _children() -> list[int]:
    import os

    me = os.getpid()
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            out.append(int(d))
    return out


async def classic_race(tmp: Path, client: str, kclient: str, race_seconds: float, procs: int) -> bool:
    mnt2 = tmp / "mnt3"
    mnt2.mkdir()
    trace = tmp / "trace.jsonl"
    async with H.served(mnt2, trace=trace) as (k, srv):
        watch = H.ResetWatch(k).install()
        iw = H.InvariantWatch(k).install(srv)
        t0 = time.monotonic()
        res = await H.run_clients(client, mnt2, "race", list(range(1, procs + 1)), int(race_seconds * 1000),
                                  timeout=race_seconds + 300)
        wall = time.monotonic() - t0
        inv, lk = await H.settle(k, srv, timeout=60)
        srv.tracer.flush()
        members = [f"vfio{d.index}" for d in k.vfio_devices()]
        traced_ok, bad = check_trace(trace, members)
        reset_ok = sum(int(r["reset_ok"]) for r in res)
        calls = sum(sum(r["errno"].values()) for r in res)
        top = H.errno_top([r["errno"] for r in res], 8)
        events = watch.events
        fresh = await H.fresh_client_works(kclient, mnt2)
        print(f"## Race ({procs} processes, {race_seconds:.0f} s, trace on; part 2)\n")
        print(f"- iterations: {sum(int(r['iterations']) for r in res)}, calls: {calls} ({calls / wall:.0f} calls/s), wall {wall:.1f} s")
        print(f"- hot resets: {reset_ok} succeeded, {sum(int(r['reset_fail']) for r in res)} refused; "
              f"split-context resets that succeeded: {sum(int(r['split_reset_ok']) for r in res)}")
        print(f"- ownership at the moment of each reset (model): {len(watch.violations)} violations of {events}")
        print(f"- ownership from the trace: {len(bad)} violations of {traced_ok} traced resets")
        print(f"- invariants after each of {iw.checks} served calls: {len(iw.violations)} violations")
        print(f"- errno histogram (top): {', '.join(f'{name} {c}' for name, c in top)}")
        print(f"- check_invariants(): {inv if inv else '[] (holds)'}; leaks: {lk if lk else 'none'}; "
              f"fresh client: {fresh[-1:]}\n", flush=True)
        return (not inv and not lk and not bad and not watch.violations and not iw.violations
                and traced_ok == reset_ok == events and fresh[-1:] == ["reset 0"])


async def chaos_race(tmp: Path, client: str, race_seconds: float, procs: int) -> bool:
    kernel_module.UNPLUG_REQUEST_INTERVAL = 0.05
    rounds = 4
    millis = int(race_seconds * 1000 / rounds)
    t0 = time.monotonic()
    outs: list[dict[str, Any]] = []
    for r in range(rounds):
        mnt = tmp / f"mnt-race{r}"
        mnt.mkdir()
        out = await race_round(mnt, tmp / f"trace-chaos{r}.jsonl", client, millis=millis, procs=procs, seed=r + 1,
                               unplug=r != 0)
        outs.append(out)
        print(f"  race round {r}: resets {out['reset_ok']}, injected {out['injected']}, unplugged {out['unplugged']}, "
              f"problems {out['problems']}", file=sys.stderr, flush=True)
    wall = time.monotonic() - t0
    calls = sum(sum(sum(x["errno"].values()) for x in o["race"]) for o in outs)
    problems = [f"round {i}: {p}" for i, o in enumerate(outs) for p in o["problems"]]
    top = H.errno_top([x["errno"] for o in outs for x in o["race"]], 8)
    print(f"## Race with fault rules and unplug ({procs} processes + a chaos process, {rounds} rounds of "
          f"{millis / 1000:.0f} s, trace on; part 3)\n")
    print(f"- calls: {calls} ({calls / wall:.0f} calls/s), wall {wall:.1f} s; invariants checked after each of "
          f"{sum(o['checks'] for o in outs)} served calls")
    print(f"- fault rules armed by the chaos process: {sum(o['chaos']['armed'] for o in outs)} (cleared "
          f"{sum(o['chaos']['cleared'] for o in outs)} times); calls failed as injected: "
          f"{sum(o['injected'] for o in outs)}, none changed the model")
    print(f"- unplugged mid-round: {[u for o in outs for u in o['unplugged']]} (REQ asked again every 50 ms "
          f"while held; each removal completed)")
    print(f"- hot resets: {sum(o['reset_ok'] for o in outs)} succeeded; traced: {sum(o['traced_ok'] for o in outs)}; "
          f"every one with every current dev_set member bound to the caller's context (model and trace)")
    print(f"- errno histogram (top): {', '.join(f'{name} {c}' for name, c in top)}")
    print(f"- problems: {problems if problems else 'none'}\n", flush=True)
    return not problems


async def main(kills_n: int, race_seconds: float, procs: int, part: str) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="fakedev-kill-"))
    client = H.build_fuzz_client(tmp)
    kclient = H.build_kclient(tmp)
    ok = True
    if part in ("1", "all"):
        ok = await kills(tmp, client, kclient, kills_n) and ok
    if part in ("2", "all"):
        ok = await classic_race(tmp, client, kclient, race_seconds, procs) and ok
    if part in ("3", "all"):
        ok = await chaos_race(tmp, client, race_seconds, procs) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=1000)
    ap.add_argument("--race-seconds", type=float, default=60)
    ap.add_argument("--procs", type=int, default=16)
    ap.add_argument("--part", choices=("1", "2", "3", "all"), default="all")
    a = ap.parse_args()
    sys.exit(trio.run(main, a.kills, a.race_seconds, a.procs, a.part))
