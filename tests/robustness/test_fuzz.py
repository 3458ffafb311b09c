"""Random and mutated calls from real processes at every node of a served
kernel model: afterwards the model is consistent, nothing is held, and a new
client still opens, binds, attaches and hot-resets."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.robustness import harness as H

pytestmark = pytest.mark.needs_root


def eventfds() -> int:
    """eventfd copies this process holds (the server keeps callers' eventfds)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]":
                n += 1
        except OSError:
            pass
    return n


@pytest.mark.parametrize("tree", ["dual-function-nic", "shared-group"])
async def test_fuzz_every_node(tree: str, mnt: Path, fuzz_client: str, kclient: str) -> None:
    base_efd = eventfds()
    async with H.served(mnt, tree) as (k, srv):
        watch = H.ResetWatch(k).install()
        n = 3000 if tree == "dual-function-nic" else 2000
        res = await H.run_clients(fuzz_client, mnt, "fuzz", [11, 12], n)
        res += await H.run_clients(fuzz_client, mnt, "deep", [13], n // 2)
        calls = sum(r["calls"] for r in res)
        assert calls >= 2 * n + n // 2
        hist = H.errno_top([r["errno"] for r in res], 50)
        kinds = dict(hist)
        # the calls reached the model's deep states and its error paths, not only the VFS
        assert kinds.get("ok", 0) > calls // 20
        for e in ("EINVAL", "ENOTTY", "EFAULT"):
            assert kinds.get(e, 0) > 0, hist
        inv, lk = await H.settle(k, srv)
        assert inv == []
        assert lk == []
        assert srv.unexpected_errors == 0
        assert watch.violations == []
        assert eventfds() == base_efd
        if tree == "dual-function-nic":
            assert watch.hot_resets > 0  # the deep sequences got as far as a reset
            out = await H.fresh_client_works(kclient, mnt)
            assert out[-1] == "reset 0", out
            inv, lk = await H.settle(k, srv)
            assert inv == [] and lk == []


async def test_fuzz_large_run(mnt: Path, fuzz_client: str, kclient: str) -> None:
    """At least 20,000 calls on the default tree from two processes at once."""
    async with H.served(mnt) as (k, srv):
        base = len(os.listdir("/proc/self/fd"))
        res = await H.run_clients(fuzz_client, mnt, "fuzz", [101, 102], 8000)
        res += await H.run_clients(fuzz_client, mnt, "deep", [105, 104], 2500)  # 105, 102: with SIGALRM
        assert sum(r["calls"] for r in res) >= 20_000
        inv, lk = await H.settle(k, srv)
        assert (inv, lk, srv.unexpected_errors) == ([], [], 0)
        assert len(os.listdir("/proc/self/fd")) == base  # no pidfd, fd copy or eventfd kept
        assert not srv._pollers  # no poll registration outlives its open
        out = await H.fresh_client_works(kclient, mnt)
        assert out[-1] == "reset 0", out


async def test_fuzz_with_the_trace_on(mnt: Path, tmp_path: Path, fuzz_client: str) -> None:
    """The tracer decodes every fuzzed struct (bad pointers, short structs) without
    failing a call, failures injected by fault rules included, and `fakedev
    trace-decode` prints every record it wrote."""
    from fakedev.cli.render import decode_trace_record

    trace = tmp_path / "trace.jsonl"
    async with H.served(mnt, H.DMA_NIC, trace=trace) as (k, srv):
        env = H.fuzz_env(k, control=30, dma=True)  # faults armed: injected failures traced too
        res = await H.run_clients(fuzz_client, mnt, "fuzz", [5, 6], 2500, env=env)
        res += await H.run_clients(fuzz_client, mnt, "deep", [7], 1500, env=env)
        res += await H.run_clients(fuzz_client, mnt, "dma", [8], 1500, env=env)
        await H.control(srv, "clear")
        inv, lk = await H.settle(k, srv)
        assert (inv, lk, srv.unexpected_errors) == ([], [], 0)
        srv.tracer.flush()
        injected = k.faults.injected_total
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(records) > 2000
    assert {r["node"] for r in records} >= {"vfio0", "vfio1", "vfio2", "13", "14", "iommu"}
    # every injected failure is in the trace as one, and no failure of the model is marked injected
    assert injected > 0
    assert sum(1 for r in records if r.get("injected")) == injected
    assert all(r["errno"] for r in records if r.get("injected"))
    for r in records:
        assert decode_trace_record(r)


async def fuzz_batch(mnt: Path, client: str, kclient: str, seed: int, n: int, *, unplug_ppm: int,
                     unplug_only: str | None = None, control: int = 20, test_unplug: str | None = None,
                     max_argsz: int | None = H.SUITE_MAX_ARGSZ, timeout: float = 300,
                     fuzzers: int = 1) -> dict[str, Any]:
    """One batch on a fresh dma-nic model (unplugs are permanent, so each batch
    starts whole): a DMA-engine client, a mostly-valid one and ``fuzzers`` random ones, all
    writing control commands (faults armed and cleared, unplugs, DMA through the
    control file, garbage); with ``test_unplug``, this process unplugs a
    function mid-batch too. Afterwards every check; ``problems`` lists what failed."""
    problems: list[str] = []
    t0 = time.monotonic()
    async with H.served(mnt, H.DMA_NIC) as (k, srv):
        base_fds = H.own_fds()
        watch = H.ResetWatch(k).install()
        iw = H.InvariantWatch(k).install(srv)
        fw = H.FaultWatch(k).install()
        unplugged: list[str] = []
        orig_unplug = srv.unplug

        def unplug(bdf: str) -> None:
            orig_unplug(bdf)
            unplugged.append(bdf)

        srv.unplug = unplug  # type: ignore[method-assign]
        env = H.fuzz_env(k, control=control, unplug_ppm=unplug_ppm, unplug_only=unplug_only, dma=True)
        res: list[dict[str, Any]] = []

        async def clients() -> None:
            res.extend(await H.run_clients(client, mnt, "dma", [seed], n, timeout, max_argsz, env))

        async def more(mode: str, s: int) -> None:
            res.extend(await H.run_clients(client, mnt, mode, [s], n, timeout, max_argsz, env))

        memfd_copies = 0

        async def watch_memfds() -> None:  # MAP_FILE mappings hold copies of the clients' memfds
            nonlocal memfd_copies
            while True:
                memfd_copies = max(memfd_copies, sum(1 for t in H.fd_targets() if ":/memfd:" in t))
                await trio.sleep(0.05)

        async with trio.open_nursery() as watcher:
            watcher.start_soon(watch_memfds)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(clients)
                nursery.start_soon(more, "deep", seed + 1)
                for f in range(fuzzers):
                    nursery.start_soon(more, "fuzz", seed + 2 + f)
                if test_unplug is not None:
                    await trio.sleep(1.5)
                    bdf = test_unplug
                    if bdf in H.functions(k) and not k.unplug_pending(bdf):  # (a client may have been first)
                        await srv.locked(lambda: srv.unplug(bdf))
            watcher.cancel_scope.cancel()
        await H.control(srv, "clear")
        inv, lk = await H.settle(k, srv)
        for label, problem in [("invariants", inv), ("leaks", lk), ("invariants after a call", iw.violations),
                               ("ownership", watch.violations),
                               ("an injected failure changed the model", fw.changed)]:
            if problem:
                problems.append(f"{label}: {problem}")
        if srv.unexpected_errors:
            problems.append(f"unexpected model exceptions: {srv.unexpected_errors}")
        if H.own_fds() != base_fds:
            problems.append(f"server fds: {base_fds} before, {H.own_fds()} after: {H.fd_targets()}")
        left = {f"vfio{d.index}": d.pdev.name for d in k.vfio_devices()}
        listed = await trio.to_thread.run_sync(lambda: sorted(p.name for p in (mnt / "vfio" / "devices").iterdir()))
        if listed != sorted(left):
            problems.append(f"nodes {listed}, model {sorted(left)} (unplugged {unplugged})")
        fresh: list[str] = []
        if {"vfio0", "vfio1"} <= left.keys():
            out = await H.fresh_client_works(kclient, mnt)
            fresh += out[-1:]
            if out[-1:] != ["reset 0"]:
                problems.append(f"fresh client: {out}")
        if "vfio2" in left:
            out = await H.fresh_dma_works(client, mnt, k)
            fresh += out
            if out != ["dma ok"]:
                problems.append(f"fresh DMA: {out}")
        inv, lk = await H.settle(k, srv)
        if inv or lk:
            problems.append(f"after the fresh clients: {inv} {lk}")
        dma = k.describe()["dma"]
        return {"problems": problems, "calls": sum(r["calls"] for r in res), "injected": fw.injected,
                "unplugged": unplugged, "hot_resets": watch.hot_resets, "dma_reads": dma["reads"],
                "dma_writes": dma["writes"], "dma_faults": dma["faults"], "checks": iw.checks,
                "errno": [r["errno"] for r in res], "wall": time.monotonic() - t0,
                "fresh": fresh, "memfd_copies": memfd_copies}


async def test_fuzz_control_dma_unplug(mnt: Path, fuzz_client: str, kclient: str) -> None:
    """Control commands (valid and mutated), DMA-engine programming and calls
    while faults are armed, in three batches on a fresh model each: one with an
    unplug by this process mid-run, all with the clients' own rare unplugs (of
    one NIC function in the first two, of the engine in the last)."""
    total: dict[str, int] = {"calls": 0, "injected": 0, "unplugs": 0, "dma": 0, "moved": 0}
    plan = [("0000:01:00.1", "0000:01:00.0"), ("0000:01:00.0", None), ("0000:03:00.0", None)]
    for b, (only, mine) in enumerate(plan):
        out = await fuzz_batch(mnt, fuzz_client, kclient, 31 + 3 * b, 2500, unplug_ppm=300_000,
                               unplug_only=only, test_unplug=mine)
        print(f"batch {b}: {out['calls']} calls, {out['injected']} injected, unplugged {out['unplugged']}, "
              f"DMA {out['dma_reads']} reads {out['dma_writes']} writes {out['dma_faults']} faults, "
              f"hot resets {out['hot_resets']}")
        assert out["problems"] == [], b
        total["calls"] += out["calls"]
        total["injected"] += out["injected"]
        total["unplugs"] += len(out["unplugged"])
        total["dma"] += out["dma_reads"] + out["dma_writes"] + out["dma_faults"]
        total["moved"] += out["dma_reads"] + out["dma_writes"]
        total["memfd_copies"] = max(total.get("memfd_copies", 0), out["memfd_copies"])
    assert total["calls"] >= 3 * 3 * 2500
    assert total["injected"] >= 10  # calls failed as injected, state compared around each
    assert total["unplugs"] >= 1
    assert total["dma"] > 100 and total["moved"] > 30  # the engine moved data (or faulted) many times
    assert total["memfd_copies"] > 0  # MAP_FILE fd copies were held (and, per batch, all went)
