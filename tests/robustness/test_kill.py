"""Clients SIGKILLed at random points (mid-call, between bind and attach, while
holding devices, contexts and interrupt eventfds; while an unplug of their
device is pending, while their DMA is in flight, while faults are armed):
afterwards nothing is held, a pending removal has completed, and a new process
can open, bind, attach and hot-reset everything (and run a DMA)."""

from __future__ import annotations

import functools
import os
import random
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

import fakedev.kernel.kernel as kernel_module
from fakedev.kernel.dma import DmaPiece
from tests.robustness import harness as H
from tests.robustness.test_fuzz import eventfds

pytestmark = pytest.mark.needs_root

MODES = ("deep", "race", "fuzz")


async def kill_many(client: str, mnt: Path, kills: int, seed: int, parallel: int = 2,
                    modes: Sequence[str] = MODES, env: dict[str, str] | None = None) -> list[int]:
    rnd = random.Random(seed)
    plan = [(rnd.choice(modes), rnd.randrange(1 << 30), rnd.uniform(0, 0.08)) for _ in range(kills)]
    statuses: list[int] = []

    async def worker(jobs: list[tuple[str, int, float]]) -> None:
        for mode, s, delay in jobs:
            statuses.append(await H.kill_one(client, mnt, mode, s, delay, env))

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


async def kill_all(procs: Sequence[trio.Process]) -> list[int]:
    """SIGKILL each (still running) process; their statuses once reaped."""
    for p in procs:
        if p.returncode is None:
            p.send_signal(signal.SIGKILL)
    out = []
    for p in procs:
        with trio.fail_after(30):
            out.append(await p.wait())
        if p.stdout is not None:
            await p.stdout.aclose()
    return out


async def nodes_listed(mnt: Path) -> list[str]:
    return await trio.to_thread.run_sync(lambda: sorted(p.name for p in (mnt / "vfio" / "devices").iterdir()))


async def test_kill_with_an_unplug_pending(mnt: Path, fuzz_client: str, kclient: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A function (or the NIC's root port, taking both functions) unplugged
    while clients hold it (race loops on the NIC, a DMA loop and DMA fuzzing
    on the engine, some with REQ eventfds; the REQ timer ticking every 50 ms),
    then every client SIGKILLed: the removal completes (nodes, groups, dev_set
    membership gone), nothing is left, what remains still serves."""
    monkeypatch.setattr(kernel_module, "UNPLUG_REQUEST_INTERVAL", 0.05)
    rnd = random.Random(5)
    pending_seen = 0
    ticks: list[float] = []
    order = (*H.FUZZ_UNPLUG_ORDER, "0000:00:1c.0")  # and the NIC's root port: both functions at once
    for i in range(8):
        async with H.served(mnt, H.DMA_NIC) as (k, srv):
            base = H.own_fds()
            env = H.fuzz_env(k, dma=True)
            bdf = order[i % 4]
            tick = k.unplug_tick

            def counted_tick(now: float | None = None, tick: Any = tick) -> float | None:
                ticks.append(0.0 if now is None else now)
                out: float | None = tick(now)
                return out

            k.unplug_tick = counted_tick  # type: ignore[method-assign]
            procs: list[trio.Process] = []
            try:
                for mode, n in (("race", 100_000), ("race", 100_000), ("dmaloop", 100_000), ("dma", 10**8)):
                    procs.append(await H.start_client(fuzz_client, mnt, mode, 10 * i + len(procs), n, env))
                await trio.sleep(rnd.uniform(0.02, 0.2))
                await srv.locked(functools.partial(srv.unplug, bdf))
                pending_seen += k.unplug_pending(bdf)
                await trio.sleep(rnd.uniform(0.05, 0.25))  # REQ asked again, new opens of it fail
                statuses = await kill_all(procs)
            finally:
                await kill_all(procs)
            assert all(s == -signal.SIGKILL for s in statuses), statuses
            inv, lk = await H.settle(k, srv)
            assert (inv, lk, srv.unexpected_errors) == ([], [], 0), i
            assert not k.unplugs and k.topology.find(bdf) is None
            left = sorted(f"vfio{d.index}" for d in k.vfio_devices())
            assert await nodes_listed(mnt) == left
            assert H.own_fds() == base, H.fd_targets()  # no pidfd, eventfd or MAP_FILE copy kept
            if "vfio2" in left:
                assert await H.fresh_dma_works(fuzz_client, mnt, k) == ["dma ok"]
            else:  # the engine went: the NIC is whole
                out = await H.fresh_client_works(kclient, mnt)
                assert out[-1] == "reset 0", out
    assert pending_seen >= 6  # most unplugs found their device held
    assert len(ticks) >= 8  # the server's REQ timer asked again while they were held


class KillingMemory:
    """The host's DMA memory, but the first access to a victim's memory SIGKILLs
    it first: the DMA is in flight (the doorbell write is being answered) when
    its caller is killed."""

    def __init__(self, mem: Any) -> None:
        self.mem = mem
        self.victims: set[int] = set()
        self.killed: list[int] = []

    def _kill(self, piece: DmaPiece) -> None:
        if piece.pid in self.victims and piece.pid not in self.killed:
            self.victims.discard(piece.pid)
            os.kill(piece.pid, signal.SIGKILL)
            self.killed.append(piece.pid)

    def read(self, piece: DmaPiece) -> bytes:
        self._kill(piece)
        data: bytes = self.mem.read(piece)
        return data

    def write(self, piece: DmaPiece, data: bytes) -> None:
        self._kill(piece)
        self.mem.write(piece, data)


async def test_kill_mid_dma(mnt: Path, fuzz_client: str) -> None:
    """Callers SIGKILLed while their DMA runs (inside the engine's memory access)
    and while their doorbell writes wait for the model lock: their mappings,
    pinned pages, MAP_FILE fd copies and interrupt eventfds all go."""
    async with H.served(mnt, H.DMA_NIC) as (k, srv):
        base = H.own_fds()
        mem = KillingMemory(k.dma_memory)
        k.dma_memory = mem
        env = H.fuzz_env(k, dma=True)
        for i in range(6):
            procs: list[trio.Process] = []
            try:
                loop = await H.start_client(fuzz_client, mnt, "dmaloop", i, 100_000, env)
                procs.append(loop)
                procs.append(await H.start_client(fuzz_client, mnt, "dma", 100 + i, 10**8, env))
                if i % 2:
                    mem.victims.update(p.pid for p in procs)
                    with trio.fail_after(30):
                        assert await loop.wait() == -signal.SIGKILL
                else:  # doorbells queued behind the model lock
                    async with srv.lock:
                        await trio.sleep(0.1)
                        for p in procs:
                            p.send_signal(signal.SIGKILL)
                        await trio.sleep(0.05)
            finally:
                mem.victims.clear()
                await kill_all(procs)
            inv, lk = await H.settle(k, srv)
            assert (inv, lk, srv.unexpected_errors) == ([], [], 0), i
            assert H.own_fds() == base, H.fd_targets()
        assert len(mem.killed) >= 3
        k.dma_memory = mem.mem
        assert await H.fresh_dma_works(fuzz_client, mnt, k) == ["dma ok"]


async def test_kill_with_faults_armed(mnt: Path, fuzz_client: str, kclient: str) -> None:
    """Kills while fault rules (and the clients' own control commands) fail calls:
    an injected failure at bind, attach, map or open leaves nothing half-done."""
    async with H.served(mnt, H.DMA_NIC) as (k, srv):
        base = H.own_fds()
        fw = H.FaultWatch(k).install()
        for spec in ("call=VFIO_DEVICE_ATTACH_IOMMUFD_PT,nth=3,count=all,errno=ENOMEM",
                     "call=IOMMU_IOAS_MAP,nth=2,count=5,errno=EFAULT", "call=open,nth=7,count=3,errno=EAGAIN",
                     "call=*,nth=50,count=20", "memory-lock-busy=0000:01:00.1",
                     "call=VFIO_DEVICE_BIND_IOMMUFD,nth=4,count=all,device=0000:03:00.0,errno=EBUSY"):
            await H.control(srv, f"fault {spec}")
        statuses = await kill_many(fuzz_client, mnt, 60, seed=17, modes=("deep", "race", "fuzz", "dma", "dmaloop"),
                                   env=H.fuzz_env(k, control=10, dma=True))
        assert sum(1 for s in statuses if s == -signal.SIGKILL) >= 55
        await H.control(srv, "clear")
        inv, lk = await H.settle(k, srv)
        assert (inv, lk, srv.unexpected_errors, fw.changed) == ([], [], 0, [])
        assert fw.injected > 0
        assert H.own_fds() == base, H.fd_targets()
        out = await H.fresh_client_works(kclient, mnt)
        assert out[-1] == "reset 0", out
        assert await H.fresh_dma_works(fuzz_client, mnt, k) == ["dma ok"]
