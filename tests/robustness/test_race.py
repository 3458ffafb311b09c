"""Processes racing open, bind, attach, hot reset and close on one dev_set
(dual-function-nic, bus 0000:01): the model stays consistent and every hot
reset that succeeded had every dev_set member owned by the caller's context,
checked both inside the model at the moment of the reset and from the trace."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.robustness import harness as H

pytestmark = pytest.mark.needs_root

#: 16 processes on 2 cores: the server is one loop, so more processes only
#: lengthen its queue; 10 s is enough for a few thousand resets.
PROCS = 16
MILLIS = 10_000


def check_trace(path: Path, members: list[str]) -> tuple[int, list[str]]:
    """(successful hot resets, violations) from the JSON-lines trace.

    The trace is written under the model lock, so its order is the order of the
    calls. For each successful VFIO_DEVICE_PCI_HOT_RESET by a process, the latest
    successful VFIO_DEVICE_BIND_IOMMUFD of every dev_set member must be by that
    process with the same iommufd fd, and after the reset's device was bound.
    """
    last_bind: dict[str, tuple[int, Any]] = {}
    ok = 0
    bad: list[str] = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            r = json.loads(line)
            if r["op"] != "ioctl" or r["errno"] is not None:
                continue
            if r["name"] == "VFIO_DEVICE_BIND_IOMMUFD":
                req = r["request"]
                last_bind[r["node"]] = (r["pid"], req.get("iommufd") if isinstance(req, dict) else None)
            elif r["name"] == "VFIO_DEVICE_PCI_HOT_RESET":
                ok += 1
                owners = {m: last_bind.get(m) for m in members}
                if any(o is None or o[0] != r["pid"] for o in owners.values()):
                    bad.append(f"line {n}: pid {r['pid']} reset {r['node']} with binds {owners}")
                elif len({o[1] for o in owners.values() if o is not None}) != 1:
                    bad.append(f"line {n}: pid {r['pid']} reset {r['node']} with members in two iommufds {owners}")
    return ok, bad


async def test_hot_reset_race(mnt: Path, tmp_path: Path, fuzz_client: str, kclient: str) -> None:
    trace = tmp_path / "trace.jsonl"
    async with H.served(mnt, trace=trace) as (k, srv):
        watch = H.ResetWatch(k).install()
        res = await H.run_clients(fuzz_client, mnt, "race", list(range(1, PROCS + 1)), MILLIS, timeout=120)
        reset_ok = sum(r["reset_ok"] for r in res)
        assert reset_ok > 0
        assert sum(r["split_reset_ok"] for r in res) == 0  # two contexts never reset
        inv, lk = await H.settle(k, srv)
        assert (inv, lk, srv.unexpected_errors) == ([], [], 0)
        assert watch.violations == []
        members = [f"vfio{d.index}" for d in k.vfio_devices()]
        assert watch.hot_resets == len(members) * reset_ok  # one record per function reset
        srv.tracer.flush()
        traced_ok, bad = check_trace(trace, members)
        assert bad == []
        assert traced_ok == reset_ok
        out = await H.fresh_client_works(kclient, mnt)
        assert out[-1] == "reset 0", out
