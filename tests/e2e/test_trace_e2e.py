"""The call trace of ``fakedev run`` with the C client (tools/hotreset.c): the
zero-length reset and its INFO on the cdev path, the whole legacy sequence
under ``--supervise`` with the group fds of the reset; and how a run ends the
processes CMD leaves behind (still served, in stat mode too)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import fakedev_cmd, fakedev_env, fakedev_run

pytestmark = pytest.mark.needs_root

F0, F1 = "0000:01:00.0", "0000:01:00.1"
TRACE_LINE = re.compile(r"^\[pid \d+\] ")


def lines_of(out: str, tag: str) -> list[str]:
    return [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith(f"{tag}: ")]


def traced_run(tmp_path: Path, cmd: list[str], *extra: str) -> tuple[subprocess.CompletedProcess[str],
                                                                     list[dict[str, Any]], list[str]]:
    """Run with ``--trace FILE --trace-text``: (the run, the records, the text lines on stderr),
    after checking that ``fakedev trace-decode FILE`` prints exactly those lines."""
    trace = tmp_path / "trace.jsonl"
    r = fakedev_run("dual-function-nic", cmd, extra=["--trace", str(trace), "--trace-text", *extra])
    assert r.returncode == 0, r.stdout + r.stderr
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    text = [line for line in r.stderr.splitlines() if TRACE_LINE.match(line)]
    d = subprocess.run(fakedev_cmd("trace-decode", str(trace)), capture_output=True, text=True,
                       env=fakedev_env())
    assert d.returncode == 0, d.stderr
    assert d.stdout.splitlines() == text
    assert len(text) == len(records)
    return r, records, text


def test_zero_length_reset_and_info_with_devids(hotreset: str, tmp_path: Path) -> None:
    r, records, text = traced_run(tmp_path, [hotreset, F0, F1])
    devids = [line.rsplit("=", 1)[1] for line in lines_of(r.stdout, "dev")]
    info = [line for line in text if "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO(" in line]
    assert info[0].endswith("{argsz=12, flags=0, count=0}) = -1 ENOSPC => {argsz=12, flags=0, count=2}") or \
        info[0].endswith("= -1 ENOSPC => {argsz=12, flags=0x3 (DEV_ID|DEV_ID_OWNED), count=2}"), info
    assert info[1].endswith(
        f"{{argsz=28, flags=0, count=0}}) = 0 => {{argsz=28, flags=0x3 (DEV_ID|DEV_ID_OWNED), count=2, "
        f"devices=[{F0} devid={devids[0]}, {F1} devid={devids[1]}]}}"), info
    reset = [line for line in text if "VFIO_DEVICE_PCI_HOT_RESET(" in line]
    assert len(reset) == 1 and reset[0].endswith("{argsz=12, flags=0, count=0, group_fds=[]}) = 0"), reset
    # each open is named, from its open to its release, with the caller's fd in between
    opens = {rec["open"]: rec["path"] for rec in records if rec["op"] == "open"}
    assert sorted(opens.values()) == ["/dev/iommu", "/dev/vfio/devices/vfio0", "/dev/vfio/devices/vfio1"]
    assert {rec["open"] for rec in records if rec["op"] == "release"} == set(opens)
    ioctls = [rec for rec in records if rec["op"] == "ioctl"]
    assert all(rec["open"] in opens and isinstance(rec["fd"], int) for rec in ioctls), ioctls
    vfio0 = next(n for n, p in opens.items() if p.endswith("vfio0"))
    assert f"(fd={ioctls[-1]['fd']} open#{vfio0} vfio0, " in reset[0]


def test_a_sibling_in_another_iommufd_is_not_owned(hotreset: str, tmp_path: Path) -> None:
    _r, _records, text = traced_run(tmp_path, [hotreset, "--no-reset", F0, "--iommufd2", F1])
    info = [line for line in text if "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO(" in line]
    assert "flags=0x1 (DEV_ID), count=2, devices=[" in info[1], info
    assert info[1].endswith(f"{F1} devid=VFIO_PCI_DEVID_NOT_OWNED]}}"), info


def test_legacy_sequence_with_the_group_fds(hotreset: str, tmp_path: Path) -> None:
    r, records, text = traced_run(tmp_path, [hotreset, "--legacy", F0, F1], "--supervise")
    assert lines_of(r.stdout, "reset") == ["0"]
    device_fds = dict(line.split(" fd=") for line in lines_of(r.stdout, "device"))
    # GROUP_GET_DEVICE_FD, answered by the supervisor, is in the trace with its result
    getfd = [rec for rec in records if rec.get("name") == "VFIO_GROUP_GET_DEVICE_FD"]
    assert [(rec["request"], rec["result"], rec["node"], rec["via"]) for rec in getfd] == [
        (F0, int(device_fds[F0]), "13", "supervisor"), (F1, int(device_fds[F1]), "14", "supervisor")]
    group_fd = {rec["node"]: rec["fd"] for rec in getfd}
    # the calls on the new fds name the open the supervisor made
    info = [rec for rec in records if rec.get("name") == "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO"]
    assert info[-1]["open"] == getfd[0]["new_open"] and info[-1]["fd"] == int(device_fds[F0])
    assert [(e["bdf"], e["group_id"]) for e in info[-1]["result_struct"]["devices"]] == [(F0, 13), (F1, 14)]
    # the order QEMU uses: container, groups, device fds, INFO, reset
    names = [rec.get("name") or rec["op"] for rec in records if rec["op"] in ("ioctl", "open")]
    order = [n for n in names if n in ("VFIO_SET_IOMMU", "VFIO_GROUP_SET_CONTAINER", "VFIO_GROUP_GET_DEVICE_FD",
                                         "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO", "VFIO_DEVICE_PCI_HOT_RESET")]
    assert order[-3:] == ["VFIO_DEVICE_GET_PCI_HOT_RESET_INFO", "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO",
                          "VFIO_DEVICE_PCI_HOT_RESET"]
    assert order.index("VFIO_GROUP_GET_DEVICE_FD") < order.index("VFIO_DEVICE_GET_PCI_HOT_RESET_INFO")
    reset = [line for line in text if "VFIO_DEVICE_PCI_HOT_RESET(" in line]
    assert len(reset) == 1
    assert reset[0].endswith(
        f"{{argsz=20, flags=0, count=2, group_fds=[fd {group_fd['13']} -> /dev/vfio/13 (group 13), "
        f"fd {group_fd['14']} -> /dev/vfio/14 (group 14)]}}) = 0"), reset


def test_a_leftover_is_ended_and_still_served_in_stat_mode() -> None:
    # CMD exits at once; its background job, told to stop, stats a node: the
    # supervisor still answers (a char device, not ENOSYS), then nothing is left
    script = ("(trap 'stat -c %F /dev/iommu; exit 0' TERM;"
              " while :; do sleep 0.05; done) & echo $!; sleep 0.3; exit 3")
    r = fakedev_run("dual-function-nic", ["sh", "-c", script], extra=["--stat-mode"])
    assert r.returncode == 3, r.stderr
    pid, answer = r.stdout.splitlines()
    assert answer == "character special file"
    assert not Path(f"/proc/{pid}").exists()
