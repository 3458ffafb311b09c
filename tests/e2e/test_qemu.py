"""Unmodified QEMU (Debian 12's 7.2: legacy group/container path, TCG) under
``fakedev run --supervise``: at machine reset it hot-resets the assigned
functions with the group fds, or refuses when a dependent group is not owned."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.e2e.conftest import fakedev_run

pytestmark = pytest.mark.needs_root

QEMU = shutil.which("qemu-system-x86_64")


def qemu_cmd(*functions: str) -> list[str]:
    assert QEMU is not None
    cmd = [QEMU, "-machine", "q35,accel=tcg", "-nodefaults", "-display", "none", "-m", "64",
           "-S", "-monitor", "stdio",
           "-device", "pcie-root-port,id=rp0,multifunction=on"]
    for fn, bdf in enumerate(functions):
        cmd += ["-device", f"vfio-pci,host={bdf},bus=rp0,addr=0.{fn},multifunction=on"]
    # The monitor reads "quit" once the machine (and its reset) is set up.
    return ["sh", "-c", 'echo quit | "$@"', "qemu", *cmd]


@pytest.fixture
def needs_qemu() -> None:
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed (optional: apt install qemu-system-x86)")


def hot_resets(trace: Path) -> list[dict[str, object]]:
    recs = [json.loads(line) for line in trace.read_text().splitlines() if line.strip()]
    return [r for r in recs if r.get("name") == "VFIO_DEVICE_PCI_HOT_RESET"]


def test_qemu_legacy_hot_reset_of_both_functions(needs_qemu: None, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    r = fakedev_run(
        "dual-function-nic", qemu_cmd("0000:01:00.0", "0000:01:00.1"),
        extra=["--supervise", "--trace", str(trace)],
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Cannot reset" not in r.stdout + r.stderr
    resets = hot_resets(trace)
    assert resets, "QEMU did not hot reset"
    assert all(rec["result"] == 0 and rec["errno"] is None for rec in resets)
    assert all(rec["request"]["count"] == 2 for rec in resets)  # type: ignore[index]


def test_qemu_refuses_reset_when_a_group_is_not_owned(needs_qemu: None, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    r = fakedev_run(
        "dual-function-nic", qemu_cmd("0000:01:00.0"),
        extra=["--supervise", "--trace", str(trace)],
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Cannot reset device 0000:01:00.0, depends on group 14 which is not owned" in (
        r.stdout + r.stderr
    )
    assert hot_resets(trace) == []
