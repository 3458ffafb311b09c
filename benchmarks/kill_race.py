"""Long kill and race runs against the dual-function-nic model served through FUSE.

1. 1,000 clients (random, mostly-valid and race loops) SIGKILLed at random
   points, two at a time; then the leak check, invariants and a fresh client.
2. A 60 s hot-reset race of 16 processes on one dev_set, with the trace on;
   every successful reset checked in the model (at the moment of the reset)
   and from the trace.

usage: python benchmarks/kill_race.py [--kills N] [--race-seconds S] [--procs P]
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
from tests.robustness.test_fuzz import eventfds  # noqa: E402
from tests.robustness.test_kill import kill_many  # noqa: E402
from tests.robustness.test_race import check_trace  # noqa: E402


async def main(kills: int, race_seconds: float, procs: int) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="fakedev-kill-"))
    client = H.build_fuzz_client(tmp)
    kclient = H.build_kclient(tmp)
    mnt = tmp / "mnt"
    mnt.mkdir()
    ok = True
    base_efd = eventfds()
    async with H.served(mnt) as (k, srv):
        watch = H.ResetWatch(k).install()
        t0 = time.monotonic()
        statuses = await kill_many(client, mnt, kills, seed=2024)
        wall = time.monotonic() - t0
        inv, lk = await H.settle(k, srv, timeout=60)
        efd = eventfds() - base_efd
        fresh = await H.fresh_client_works(kclient, mnt)
        print("## Kills (benchmarks/kill_race.py)\n")
        print(f"- clients SIGKILLed: {sum(1 for s in statuses if s == -9)} of {len(statuses)} started "
              f"(random delay 0-80 ms after start; modes fuzz/deep/race), {wall:.1f} s")
        print(f"- hot resets reached by the killed clients: {watch.hot_resets // 2}")
        print(f"- check_invariants(): {inv if inv else '[] (holds)'}")
        print(f"- left after the kills: {lk if lk else 'no context, object, open or binding'}; "
              f"eventfd copies held by the server: {efd}")
        print(f"- unexpected model exceptions (EIO): {srv.unexpected_errors}")
        print(f"- fresh client afterwards: {fresh[-1] if fresh else 'no output'}\n")
        ok = ok and not inv and not lk and efd == 0 and fresh[-1:] == ["reset 0"] and not watch.violations

    mnt2 = tmp / "mnt2"
    mnt2.mkdir()
    trace = tmp / "trace.jsonl"
    async with H.served(mnt2, trace=trace) as (k, srv):
        watch = H.ResetWatch(k).install()
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
        print(f"## Race ({procs} processes, {race_seconds:.0f} s, trace on)\n")
        print(f"- iterations: {sum(int(r['iterations']) for r in res)}, calls: {calls} ({calls / wall:.0f} calls/s), wall {wall:.1f} s")
        print(f"- hot resets: {reset_ok} succeeded, {sum(int(r['reset_fail']) for r in res)} refused; "
              f"split-context resets that succeeded: {sum(int(r['split_reset_ok']) for r in res)}")
        print(f"- ownership at the moment of each reset (model): {len(watch.violations)} violations of {watch.hot_resets // 2}")
        print(f"- ownership from the trace: {len(bad)} violations of {traced_ok} traced resets")
        print(f"- errno histogram (top): {', '.join(f'{name} {c}' for name, c in top)}")
        print(f"- check_invariants(): {inv if inv else '[] (holds)'}; leaks: {lk if lk else 'none'}")
        ok = ok and not inv and not lk and not bad and not watch.violations and traced_ok == reset_ok
    return 0 if ok else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=1000)
    ap.add_argument("--race-seconds", type=float, default=60)
    ap.add_argument("--procs", type=int, default=16)
    a = ap.parse_args()
    sys.exit(trio.run(main, a.kills, a.race_seconds, a.procs))
