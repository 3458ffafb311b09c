"""Long fuzz runs: 1,000,000 random and mutated calls from real processes.

Two parts, each with the invariants, the leak check and fresh clients afterwards:

1. ``--calls`` calls at every node of the dual-function-nic model served
   through FUSE, from ``--procs`` processes (three quarters random, one
   quarter mostly-valid sequences), argsz uncapped.
2. ``--calls`` calls in ``--batches`` batches on the dma-nic tree
   (tests/robustness/dma-nic.toml: the NIC plus a DMA engine), each batch on a
   fresh model: a DMA-engine client, a mostly-valid one and random ones, all
   writing control commands (fault rules armed and cleared, unplugs, dma-read /
   dma-write, garbage; valid and mutated), so calls run while faults are armed;
   real unplugs name one function per batch (rotating; every fourth batch none).
   The invariants are checked after every served call and ``describe()``
   compared around every injected failure.

usage: python benchmarks/fuzz.py [--calls N] [--procs P] [--seed S] [--batches B] [--part 1|2|both]
Run as root (it mounts). Prints the figures as a Markdown block.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.robustness import harness as H  # noqa: E402
from tests.robustness.test_fuzz import fuzz_batch  # noqa: E402


async def classic(tmp: Path, client: str, kclient: str, calls: int, procs: int, seed: int) -> bool:
    mnt = tmp / "mnt"
    mnt.mkdir()
    per = calls // procs
    async with H.served(mnt) as (k, srv):
        watch = H.ResetWatch(k).install()
        t0 = time.monotonic()
        seeds = [seed + i for i in range(procs)]
        # three quarters random, one quarter mostly valid sequences (deep states)
        n_deep = max(1, procs // 4)
        async with trio.open_nursery() as n:
            out: dict[str, list[dict[str, Any]]] = {}

            async def run(mode: str, ss: list[int]) -> None:
                out[mode] = await H.run_clients(client, mnt, mode, ss, per, timeout=7200, max_argsz=None)

            n.start_soon(run, "fuzz", seeds[n_deep:])
            n.start_soon(run, "deep", seeds[:n_deep])
        wall = time.monotonic() - t0
        res = out["fuzz"] + out["deep"]
        total = sum(int(r["calls"]) for r in res)
        inv, lk = await H.settle(k, srv, timeout=60)
        fresh = await H.fresh_client_works(kclient, mnt)
        top = H.errno_top([r["errno"] for r in res], 12)
        print("## Fuzz (benchmarks/fuzz.py, part 1: every node, dual-function-nic)\n")
        print(f"- calls: {total} from {procs} processes ({procs - n_deep} random, {n_deep} mostly-valid sequences), seeds {seeds[0]}..{seeds[-1]}")
        print(f"- wall time: {wall:.1f} s, {total / wall:.0f} calls/s")
        print(f"- hot resets reached: {watch.hot_resets // 2}, ownership violations: {len(watch.violations)}")
        print(f"- errno histogram (top): {', '.join(f'{name} {c}' for name, c in top)}")
        print(f"- check_invariants(): {inv if inv else '[] (holds)'}")
        print(f"- leaks after all clients exited: {lk if lk else 'none'}")
        print(f"- unexpected model exceptions (EIO): {srv.unexpected_errors}")
        print(f"- fresh client afterwards: {fresh[-1] if fresh else 'no output'}\n", flush=True)
        return not inv and not lk and not srv.unexpected_errors and fresh[-1:] == ["reset 0"] and not watch.violations


async def new_features(tmp: Path, client: str, kclient: str, calls: int, batches: int, seed: int) -> bool:
    mnt = tmp / "mnt2"
    mnt.mkdir()
    functions = ("0000:01:00.0", "0000:03:00.0", "0000:01:00.1")
    clients = 4  # dma, deep, two random
    per = calls // batches // clients
    tot: dict[str, int] = {"calls": 0, "injected": 0, "unplugs": 0, "reads": 0, "writes": 0, "faults": 0,
                           "resets": 0, "checks": 0}
    hists: list[dict[int, int]] = []
    problems: list[str] = []
    fresh: dict[str, int] = {}
    t0 = time.monotonic()
    for b in range(batches):
        only = None if b % 4 == 3 else functions[b % 3]
        out = await fuzz_batch(mnt, client, kclient, seed + 10 * b, per, unplug_ppm=70_000 if only else 0,
                               unplug_only=only, control=10, max_argsz=None, timeout=7200, fuzzers=2)
        tot["calls"] += out["calls"]
        tot["injected"] += out["injected"]
        tot["unplugs"] += len(out["unplugged"])
        tot["reads"] += out["dma_reads"]
        tot["writes"] += out["dma_writes"]
        tot["faults"] += out["dma_faults"]
        tot["resets"] += out["hot_resets"]
        tot["checks"] += out["checks"]
        hists += out["errno"]
        for f in out["fresh"]:
            fresh[f] = fresh.get(f, 0) + 1
        problems += [f"batch {b}: {p}" for p in out["problems"]]
        print(f"  batch {b}: {out['calls']} calls in {out['wall']:.1f} s, {out['injected']} injected, "
              f"unplugged {out['unplugged']}, DMA {out['dma_reads']}/{out['dma_writes']}/{out['dma_faults']}, "
              f"problems {out['problems']}", file=sys.stderr, flush=True)
    wall = time.monotonic() - t0
    top = H.errno_top(hists, 12)
    print("## Fuzz (benchmarks/fuzz.py, part 2: control file, faults armed, DMA engine, unplug; dma-nic)\n")
    print(f"- calls: {tot['calls']} in {batches} batches of {clients} processes (DMA-engine sequences, mostly-valid "
          f"sequences, 2 random), each batch on a fresh model; 1% of steps a control command; seeds {seed}..")
    print(f"- wall time: {wall:.1f} s, {tot['calls'] / wall:.0f} calls/s (with the invariants checked after each of "
          f"{tot['checks']} served calls)")
    print(f"- injected failures: {tot['injected']}, each with describe() equal before and after")
    print(f"- functions unplugged: {tot['unplugs']}; device DMA: {tot['reads']} reads, {tot['writes']} writes, "
          f"{tot['faults']} faults; hot-reset records: {tot['resets']}")
    print(f"- errno histogram (top): {', '.join(f'{name} {c}' for name, c in top)}")
    print(f"- problems (invariants, leaks, server fds, unexpected exceptions, ownership, nodes, "
          f"injected-changed-state, fresh clients): {problems if problems else 'none'}")
    print(f"- fresh clients after the batches: {fresh}\n", flush=True)
    return not problems


async def main(calls: int, procs: int, seed: int, batches: int, part: str) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="fakedev-fuzz-"))
    client = H.build_fuzz_client(tmp)
    kclient = H.build_kclient(tmp)
    ok = True
    if part in ("1", "both"):
        ok = await classic(tmp, client, kclient, calls, procs, seed) and ok
    if part in ("2", "both"):
        ok = await new_features(tmp, client, kclient, calls, batches, seed) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=1_000_000)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--part", choices=("1", "2", "both"), default="both")
    a = ap.parse_args()
    sys.exit(trio.run(main, a.calls, a.procs, a.seed, a.batches, a.part))
