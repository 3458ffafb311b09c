"""The reset log stays bounded in a long-running server while every reset is counted."""

from __future__ import annotations

from fakedev.kernel.kernel import Kernel
from fakedev.kernel.version import KernelVersion
from tests.kernel.harness import build_topology


def test_reset_log_keeps_the_recent_records_and_counts_all() -> None:
    k = Kernel(build_topology("dual-function-nic"), version=KernelVersion.parse("6.6"))
    k.vfio.reset_log_keep = 5
    pdev = k.device("0000:01:00.0").pdev
    for i in range(23):
        k.vfio.record_reset(pdev, "bus", f"test{i}", None)
    log = k.reset_log
    assert 5 <= len(log) <= 10
    assert [r.cause for r in log] == [f"test{i}" for i in range(23 - len(log), 23)]  # the newest, in order
    assert k.reset_count("0000:01:00.0") == 23
    d = k.describe()
    assert d["resets"] == 23 and d["reset_log_dropped"] == 23 - len(log)
    assert len(d["reset_log"]) == len(log)
