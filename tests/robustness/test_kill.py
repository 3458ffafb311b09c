"""Clients SIGKILLed at random points (mid-call, between bind and attach, while
holding devices, contexts and interrupt eventfds): afterwards nothing is held
and a new process can open, bind, attach and hot-reset everything."""

from __future__ import annotations

import os
import random
import signal
import subprocess
from pathlib import Path

import pytest
import trio

from tests.robustness import harness as H
from tests.robustness.test_fuzz import eventfds

pytestmark = pytest.mark.needs_root

MODES = ("deep", "race", "fuzz")


async def kill_many(client: str, mnt: Path, kills: int, seed: int, parallel: int = 2) -> list[int]:
    rnd = random.Random(seed)
    plan = [(rnd.choice(MODES), rnd.randrange(1 << 30), rnd.uniform(0, 0.08)) for _ in range(kills)]
    statuses: list[int] = []

    async def worker(jobs: list[tuple[str, int, float]]) -> None:
        for mode, s, delay in jobs:
            statuses.append(await H.kill_one(client, mnt, mode, s, delay))

    async with trio.open_nursery() as n:
        for i in range(parallel):
            n.start_soon(worker, plan[i::parallel])
    return statuses


async def test_kills_leave_nothing(mnt: Path, fuzz_client: str, kclient: str) -> None:
    base_efd = eventfds()
    async with H.served(mnt) as (k, srv):
        watch = H.ResetWatch(k).install()
        statuses = await kill_many(fuzz_client, mnt, 50, seed=7)
        assert len(statuses) == 50
        assert sum(1 for s in statuses if s == -9) >= 45  # (a client may have ended first)
        inv, lk = await H.settle(k, srv)
        assert (inv, lk, srv.unexpected_errors, watch.violations) == ([], [], 0, [])
        assert eventfds() == base_efd
        for _ in range(2):  # twice: the first client's own close leaves nothing either
            out = await H.fresh_client_works(kclient, mnt)
            assert out[-1] == "reset 0", out
        inv, lk = await H.settle(k, srv)
        assert (inv, lk) == ([], [])


async def test_kill_while_holding(mnt: Path, fuzz_client: str, kclient: str) -> None:
    """Kills spread over the holding phase of the race loop (bound, attached, reset)."""
    async with H.served(mnt) as (k, srv):
        rnd = random.Random(3)
        for i in range(10):
            await H.kill_one(fuzz_client, mnt, "race", i, rnd.uniform(0.005, 0.05))
            inv, lk = await H.settle(k, srv)
            assert (inv, lk) == ([], []), i
        out = await H.fresh_client_works(kclient, mnt)
        assert out[-1] == "reset 0", out


def own_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_kill_while_the_server_holds_the_call(mnt: Path, fuzz_client: str, kclient: str) -> None:
    """Truly mid-call: the model lock is held, so the clients' requests are read
    and wait inside the server; the clients are SIGKILLed then; when the lock
    is released the server answers requests of processes that are gone (their
    memory and fds can no longer be reached)."""
    async with H.served(mnt) as (k, srv):
        base = own_fds()
        for round_ in range(6):
            procs = []
            for i in range(4):
                p = await trio.lowlevel.open_process(
                    [fuzz_client, str(mnt), ("race", "deep")[i % 2], str(100 * round_ + i), "100000000",
                     str(H.SUITE_MAX_ARGSZ)],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                procs.append(p)
            try:
                for p in procs:
                    assert p.stdout is not None
                    with trio.fail_after(30):
                        await H.readline(p.stdout)
                await trio.sleep(0.02 * round_)
                async with srv.lock:
                    await trio.sleep(0.2)  # every client is now blocked inside a call
                    for p in procs:
                        p.send_signal(signal.SIGKILL)
                    await trio.sleep(0.1)
                for p in procs:
                    with trio.fail_after(30):
                        assert await p.wait() == -signal.SIGKILL
            finally:
                for p in procs:
                    if p.returncode is None:
                        p.kill()
                        await p.wait()
                    if p.stdout is not None:
                        await p.stdout.aclose()
            inv, lk = await H.settle(k, srv)
            assert (inv, lk, srv.unexpected_errors) == ([], [], 0), round_
        assert own_fds() == base  # no pidfd, fd copy or eventfd kept
        out = await H.fresh_client_works(kclient, mnt)
        assert out[-1] == "reset 0", out
