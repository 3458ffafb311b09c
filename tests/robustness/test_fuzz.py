"""Random and mutated calls from real processes at every node of a served
kernel model: afterwards the model is consistent, nothing is held, and a new
client still opens, binds, attaches and hot-resets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

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
    failing a call, and `fakedev trace-decode` prints every record it wrote."""
    from fakedev.cli.render import decode_trace_record

    trace = tmp_path / "trace.jsonl"
    async with H.served(mnt, trace=trace) as (k, srv):
        res = await H.run_clients(fuzz_client, mnt, "fuzz", [5, 6], 2500)
        res += await H.run_clients(fuzz_client, mnt, "deep", [7], 1500)
        inv, lk = await H.settle(k, srv)
        assert (inv, lk, srv.unexpected_errors) == ([], [], 0)
        srv.tracer.flush()
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(records) > 2000
    assert {r["node"] for r in records} >= {"vfio0", "vfio1", "13", "14", "iommu"}
    for r in records:
        assert decode_trace_record(r)
