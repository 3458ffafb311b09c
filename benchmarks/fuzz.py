"""Long fuzz run: 1,000,000 random and mutated calls from real processes at
every node of the dual-function-nic model served through FUSE, then the
invariants, the leak check and a fresh client.

usage: python benchmarks/fuzz.py [--calls N] [--procs P] [--seed S]
Run as root (it mounts). Prints the figures as a Markdown block.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.robustness import harness as H  # noqa: E402


async def main(calls: int, procs: int, seed: int) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="fakedev-fuzz-"))
    client = H.build_fuzz_client(tmp)
    kclient = H.build_kclient(tmp)
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
            out: dict[str, list[dict[str, object]]] = {}

            async def run(mode: str, ss: list[int]) -> None:
                out[mode] = await H.run_clients(client, mnt, mode, ss, per, timeout=7200, max_argsz=None)

            n.start_soon(run, "fuzz", seeds[n_deep:])
            n.start_soon(run, "deep", seeds[:n_deep])
        wall = time.monotonic() - t0
        res = out["fuzz"] + out["deep"]
        total = sum(int(r["calls"]) for r in res)  # type: ignore[call-overload]
        inv, lk = await H.settle(k, srv, timeout=60)
        fresh = await H.fresh_client_works(kclient, mnt)
        top = H.errno_top([r["errno"] for r in res], 12)  # type: ignore[misc]
        print("## Fuzz (benchmarks/fuzz.py)\n")
        print(f"- calls: {total} from {procs} processes ({procs - n_deep} random, {n_deep} mostly-valid sequences), seeds {seeds[0]}..{seeds[-1]}")
        print(f"- wall time: {wall:.1f} s, {total / wall:.0f} calls/s")
        print(f"- hot resets reached: {watch.hot_resets // 2}, ownership violations: {len(watch.violations)}")
        print(f"- errno histogram (top): {', '.join(f'{name} {c}' for name, c in top)}")
        print(f"- check_invariants(): {inv if inv else '[] (holds)'}")
        print(f"- leaks after all clients exited: {lk if lk else 'none'}")
        print(f"- unexpected model exceptions (EIO): {srv.unexpected_errors}")
        print(f"- fresh client afterwards: {fresh[-1] if fresh else 'no output'}")
        ok = not inv and not lk and not srv.unexpected_errors and fresh[-1:] == ["reset 0"] and not watch.violations
    return 0 if ok else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=1_000_000)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1000)
    a = ap.parse_args()
    sys.exit(trio.run(main, a.calls, a.procs, a.seed))
