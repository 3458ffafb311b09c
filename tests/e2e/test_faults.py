"""Fault injection end to end: --fault, tree [[fault]] entries and the control
file, seen by tools/hotreset.c under `fakedev run`."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import FIXTURES, fakedev_run

pytestmark = pytest.mark.needs_root

A, B = "0000:01:00.0", "0000:01:00.1"
FAKEDEV = f"{shlex.quote(sys.executable)} -m fakedev.cli.main"


def _hot_resets(state: dict[str, object]) -> list[object]:
    log = state["reset_log"]
    assert isinstance(log, list)
    return [r for r in log if r["cause"] == "VFIO_DEVICE_PCI_HOT_RESET"]


def _script(hotreset: str, *lines: str) -> list[str]:
    text = "\n".join(lines).replace("@HOTRESET@", shlex.quote(hotreset)).replace("@FAKEDEV@", FAKEDEV)
    return ["sh", "-c", text]


def test_command_line_fault_fails_the_hot_reset_and_resets_nothing(hotreset: str, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    trace = tmp_path / "trace.jsonl"
    r = fakedev_run("dual-function-nic", _script(
        hotreset,
        f"@HOTRESET@ --expect-reset EBUSY {A} {B}; echo status=$?",
        f"cat $FAKEDEV_MOUNT/.fakedev/state.json > {state}",
        "@FAKEDEV@ show",
    ), extra=["--fault", "call=VFIO_DEVICE_PCI_HOT_RESET,nth=1,errno=EBUSY", "--trace", str(trace)])
    assert r.returncode == 0, r.stderr
    assert "reset: -1 EBUSY" in r.stdout and "status=0" in r.stdout
    s = json.loads(state.read_text())
    assert _hot_resets(s) == []
    (inj,) = s["faults"]["injected"]
    assert (inj["op"], inj["errno"], inj["node"], inj["devices"]) == (
        "VFIO_DEVICE_PCI_HOT_RESET", "EBUSY", "vfio0", [A])
    assert f"VFIO_DEVICE_PCI_HOT_RESET on vfio0 [{A}] by pid" in r.stdout  # fakedev show
    recs = [json.loads(ln) for ln in trace.read_text().splitlines()]
    (rec,) = [x for x in recs if x.get("name") == "VFIO_DEVICE_PCI_HOT_RESET"]
    assert rec["errno"] == "EBUSY" and rec["injected"] is True
    assert not any(x.get("injected") for x in recs if x is not rec)


def test_without_the_fault_the_same_reset_happens(hotreset: str, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    r = fakedev_run("dual-function-nic", _script(
        hotreset, f"@HOTRESET@ {A} {B} || exit 9", f"cat $FAKEDEV_MOUNT/.fakedev/state.json > {state}"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "reset: 0" in r.stdout
    assert len(_hot_resets(json.loads(state.read_text()))) == 2  # both functions


def test_tree_call_fails_entry(hotreset: str, tmp_path: Path) -> None:
    tree = tmp_path / "t.toml"
    tree.write_text((FIXTURES / "dual-function-nic.toml").read_text() + (
        '\n[[fault]]\nkind = "call-fails"\ncall = "VFIO_DEVICE_BIND_IOMMUFD"\nnth = 2\n'
        f'device = "{B}"\nerrno = "ENOSPC"\n'))
    mine = str(tree.with_suffix(""))  # an absolute path: FIXTURES / it is it
    r = fakedev_run(mine, [hotreset, "--no-reset", A, B])
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"bind: {A} vfio0 devid=" in r.stdout
    assert f"bind: {B} vfio1 devid=" in r.stdout  # the first bind on vfio1 counts as 1st
    r = fakedev_run(mine, [hotreset, "--no-reset", B, B])
    assert f"bind: {B} vfio1 -1 ENOSPC" in r.stdout, r.stdout


def test_control_file_arms_lists_clears_and_refuses(hotreset: str, tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os\n"
        "fd = os.open(os.environ['FAKEDEV_MOUNT'] + '/.fakedev/control', os.O_RDWR)\n"
        "try:\n"
        "    os.write(fd, b'frobnicate 1')\n"
        "except OSError as e:\n"
        "    print('write', e.errno)\n"
        "print(os.pread(fd, 4096, 0).decode().strip())\n")
    r = fakedev_run("dual-function-nic", _script(
        hotreset,
        "@FAKEDEV@ fault call=VFIO_DEVICE_PCI_HOT_RESET,nth=1,errno=EPERM",
        f"@HOTRESET@ --expect-reset EPERM {A} {B} >/dev/null && echo first=ok",
        "@FAKEDEV@ fault --list",
        "@FAKEDEV@ fault --clear",
        f"@HOTRESET@ {A} {B} >/dev/null && echo second=ok",
        f"{shlex.quote(sys.executable)} {probe}",
        "@FAKEDEV@ fault memory-lock-busy=0000:09:00.0; echo refused=$?",
        f"@FAKEDEV@ unplug {B}",
        "@FAKEDEV@ show --json > " + shlex.quote(str(tmp_path / "s.json")),
    ))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "armed call=VFIO_DEVICE_PCI_HOT_RESET,nth=1,errno=EPERM" in out
    assert "first=ok" in out and "second=ok" in out and "cleared" in out
    assert "call=VFIO_DEVICE_PCI_HOT_RESET,nth=1,errno=EPERM  (matched 1, failed 1)" in out
    assert "write 22" in out and "error: unknown command 'frobnicate'" in out
    assert "refused=1" in out and "no function 0000:09:00.0" in r.stderr
    assert f"unplugged {B}" in out
    s = json.loads((tmp_path / "s.json").read_text())
    assert [d["bdf"] for d in s["devices"]] == [A]


def test_unplug_after_a_call(hotreset: str, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    r = fakedev_run("dual-function-nic", _script(
        hotreset, f"@HOTRESET@ {A} {B}; echo status=$?", f"cat $FAKEDEV_MOUNT/.fakedev/state.json > {state}",
    ), extra=["--fault", f"unplug={B},after=VFIO_DEVICE_ATTACH_IOMMUFD_PT,nth=1"])
    assert r.returncode == 0, r.stderr
    assert f"attach: {A} pt_id=" in r.stdout
    assert f"bind: {B}" not in r.stdout and "status=2" in r.stdout  # 01:00.1 was gone by then
    s = json.loads(state.read_text())
    assert [d["bdf"] for d in s["devices"]] == [A]
    assert s["faults"]["unplugs"][0]["fired"] == 1


def test_supervised_group_get_device_fd_goes_through_the_fault_plan(
    hotreset: str, tmp_path: Path
) -> None:
    """GROUP_GET_DEVICE_FD answered by the seccomp supervisor is counted and
    can be failed like any served call: the second one (01:00.1) fails
    EMFILE, no fd is installed and the device is not left open."""
    state = tmp_path / "state.json"
    r = fakedev_run("dual-function-nic", _script(
        hotreset,
        f"@HOTRESET@ --legacy {A} {B}; echo status=$?",
        f"cat $FAKEDEV_MOUNT/.fakedev/state.json > {state}",
    ), extra=["--supervise", "--fault", "call=VFIO_GROUP_GET_DEVICE_FD,nth=2,errno=EMFILE"])
    assert r.returncode == 0, r.stderr
    assert "status=0" not in r.stdout, r.stdout
    s = json.loads(state.read_text())
    (inj,) = s["faults"]["injected"]
    assert (inj["op"], inj["errno"]) == ("VFIO_GROUP_GET_DEVICE_FD", "EMFILE"), inj
    assert _hot_resets(s) == []
    assert all(d["open_count"] == 0 for d in s["devices"]), s["devices"]
