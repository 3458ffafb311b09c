"""The 6.6 zero-length hot reset, end to end: tools/hotreset.c (kernel uAPI
only) under ``fakedev run`` on the fixtures, at the real /dev and /sys paths."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import fakedev_cmd, fakedev_env, fakedev_run

pytestmark = pytest.mark.needs_root


def lines_of(out: str, tag: str) -> list[str]:
    return [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith(tag + ": ")]


def state_after(stdout: str) -> dict[str, object]:
    """The JSON state printed after the client's lines (see run_then_state)."""
    start = stdout.index("\n{") + 1 if not stdout.startswith("{") else 0
    return json.loads(stdout[start:])


def run_then_state(client: list[str]) -> list[str]:
    """Shell command: the client, then the server's state file; exit = client's."""
    quoted = " ".join(f"'{a}'" for a in client)
    return ["sh", "-c", f'{quoted}; rc=$?; cat "$FAKEDEV_MOUNT/.fakedev/state.json"; exit $rc']


def hot_reset_bdfs(state: dict[str, object]) -> list[str]:
    """The functions the kernel model's reset log says a hot reset reset."""
    log = state.get("reset_log")
    assert isinstance(log, list), f"no reset_log in state: {sorted(state)}"
    return [
        rec["bdf"] for rec in log
        if rec["cause"] == "VFIO_DEVICE_PCI_HOT_RESET" and rec["method"] == "bus"
    ]


def test_all_functions_one_iommufd_reset_succeeds(hotreset: str) -> None:
    r = fakedev_run(
        "dual-function-nic",
        run_then_state([hotreset, "0000:01:00.0", "0000:01:00.1"]),
        extra=["--trace-text"],
    )
    assert r.returncode == 0, r.stdout + r.stderr
    binds = lines_of(r.stdout, "bind")
    assert binds[0].startswith("0000:01:00.0 vfio0 devid=")
    assert binds[1].startswith("0000:01:00.1 vfio1 devid=")
    devids = [b.rsplit("=", 1)[1] for b in binds]
    # 6.6.0-6.9 report the computed flags with ENOSPC, later kernels 0.
    assert lines_of(r.stdout, "probe")[0] in (
        "-1 ENOSPC flags=0x3 count=2", "-1 ENOSPC flags=0x0 count=2"
    )
    assert lines_of(r.stdout, "info") == ["flags=0x3 count=2"]
    assert lines_of(r.stdout, "dev") == [
        f"0000:01:00.0 devid={devids[0]}", f"0000:01:00.1 devid={devids[1]}"
    ]
    assert lines_of(r.stdout, "reset") == ["0"]
    assert sorted(hot_reset_bdfs(state_after(r.stdout))) == ["0000:01:00.0", "0000:01:00.1"]
    # The decoded trace went to stderr.
    assert "VFIO_DEVICE_PCI_HOT_RESET" in r.stderr


def test_sibling_bound_by_another_process_is_not_owned(hotreset: str) -> None:
    script = f"""
        set -e
        d=$(mktemp -d)
        mkfifo "$d/hold"
        '{hotreset}' --no-info --no-reset --hold 0000:01:00.1 < "$d/hold" > "$d/holder" &
        exec 3> "$d/hold"
        while ! grep -q '^ready$' "$d/holder"; do sleep 0.05; done
        set +e
        '{hotreset}' --expect-reset EINVAL 0000:01:00.0
        rc=$?
        exec 3>&-
        wait
        sed 's/^/holder /' "$d/holder"
        rm -rf "$d"
        exit $rc
    """
    r = fakedev_run("dual-function-nic", ["sh", "-c", script])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "holder bind: 0000:01:00.1 vfio1 devid=" in r.stdout
    assert lines_of(r.stdout, "info") == ["flags=0x1 count=2"]
    devs = lines_of(r.stdout, "dev")
    assert devs[0].startswith("0000:01:00.0 devid=") and "OWNED" not in devs[0]
    assert devs[1] == "0000:01:00.1 devid=NOT_OWNED"
    assert lines_of(r.stdout, "reset") == ["-1 EINVAL"]


def test_nonzero_count_from_cdev_device_is_einval(hotreset: str) -> None:
    r = fakedev_run(
        "dual-function-nic",
        [hotreset, "--count", "1", "--expect-reset", "EINVAL", "0000:01:00.0", "0000:01:00.1"],
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert lines_of(r.stdout, "info") == ["flags=0x3 count=2"]
    assert lines_of(r.stdout, "reset") == ["-1 EINVAL"]


def test_unexpected_errno_makes_the_client_fail(hotreset: str) -> None:
    # Only one function bound: the sibling's group is not owned -> EINVAL,
    # which the client was not told to expect.
    r = fakedev_run("dual-function-nic", [hotreset, "0000:01:00.0"])
    assert r.returncode == 1
    assert lines_of(r.stdout, "dev")[1] == "0000:01:00.1 devid=NOT_OWNED"
    assert lines_of(r.stdout, "reset") == ["-1 EINVAL"]
    assert "PCI_HOT_RESET: got EINVAL, expected 0" in r.stderr


def test_root_bus_device_has_no_hot_reset(hotreset: str) -> None:
    r = fakedev_run(
        "root-bus",
        [hotreset, "--expect-info", "ENODEV", "--expect-reset", "ENODEV", "0000:00:02.0"],
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert lines_of(r.stdout, "bind")[0].startswith("0000:00:02.0 vfio0 devid=")
    assert lines_of(r.stdout, "info") == ["-1 ENODEV"]
    assert lines_of(r.stdout, "reset") == ["-1 ENODEV"]


def test_shared_group_unbound_sibling_is_owned_and_reset(hotreset: str) -> None:
    r = fakedev_run("shared-group", run_then_state([hotreset, "0000:01:00.0"]))
    assert r.returncode == 0, r.stdout + r.stderr
    assert lines_of(r.stdout, "info") == ["flags=0x3 count=2"]
    devs = lines_of(r.stdout, "dev")
    assert devs[1] == "0000:01:00.1 devid=OWNED"
    assert lines_of(r.stdout, "reset") == ["0"]
    assert sorted(hot_reset_bdfs(state_after(r.stdout))) == ["0000:01:00.0", "0000:01:00.1"]


def test_shared_group_second_iommufd_bind_is_eperm(hotreset: str) -> None:
    r = fakedev_run(
        "shared-group",
        [hotreset, "--no-info", "--no-reset", "0000:01:00.0", "--iommufd2", "0000:01:00.1"],
    )
    # Devices bind in argument order: vfio0 to iommufd 1, then vfio1 to 2.
    binds = lines_of(r.stdout, "bind")
    assert binds[0].startswith("0000:01:00.0 vfio0 devid=")
    assert binds[1] == "0000:01:00.1 vfio1 -1 EPERM", r.stdout + r.stderr


def test_host_driver_sibling_cannot_be_reset(hotreset: str) -> None:
    r = fakedev_run(
        "host-driver-sibling", [hotreset, "--expect-reset", "EINVAL", "0000:01:00.0"]
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert lines_of(r.stdout, "info") == ["flags=0x1 count=2"]
    assert lines_of(r.stdout, "dev")[1] == "0000:01:00.1 devid=NOT_OWNED"
    assert lines_of(r.stdout, "reset") == ["-1 EINVAL"]


# The legacy group path: GROUP_GET_DEVICE_FD creates an fd in the caller,
# which needs `fakedev run --supervise` (seccomp user notification).


def test_legacy_group_path_reset_with_every_group_fd(hotreset: str) -> None:
    r = fakedev_run(
        "dual-function-nic",
        run_then_state([hotreset, "--legacy", "0000:01:00.0", "0000:01:00.1"]),
        extra=["--supervise"],
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert lines_of(r.stdout, "group") == [
        "0000:01:00.0 group=13 viable=1", "0000:01:00.1 group=14 viable=1"
    ]
    assert [d.split(" fd=")[0] for d in lines_of(r.stdout, "device")] == [
        "0000:01:00.0", "0000:01:00.1"
    ]
    assert lines_of(r.stdout, "info") == ["flags=0x0 count=2"]
    assert lines_of(r.stdout, "dev") == ["0000:01:00.0 group=13", "0000:01:00.1 group=14"]
    assert lines_of(r.stdout, "reset") == ["0"]
    assert sorted(hot_reset_bdfs(state_after(r.stdout))) == ["0000:01:00.0", "0000:01:00.1"]


@pytest.mark.parametrize(
    ("count", "why"),
    [(1, "group 14 not proven"), (3, "more fds than devices"), (0, "group caller must pass fds")],
)
def test_legacy_group_path_wrong_fd_arrays(hotreset: str, count: int, why: str) -> None:
    r = fakedev_run(
        "dual-function-nic",
        [hotreset, "--legacy", "--count", str(count), "--expect-reset", "EINVAL",
         "0000:01:00.0", "0000:01:00.1"],
        extra=["--supervise"],
    )
    assert r.returncode == 0, why + "\n" + r.stdout + r.stderr
    assert lines_of(r.stdout, "reset") == ["-1 EINVAL"]


def test_legacy_get_device_fd_without_supervisor_fails_cleanly(hotreset: str) -> None:
    r = fakedev_run("dual-function-nic", [hotreset, "--legacy", "0000:01:00.0"])
    assert r.returncode == 2
    assert "GROUP_GET_DEVICE_FD" in r.stderr


def test_stat_mode_nodes_are_char_devices_and_still_served(hotreset: str) -> None:
    r = fakedev_run(
        "dual-function-nic",
        ["sh", "-c", "stat -c '%F %t:%T' /dev/vfio/devices/vfio1 /dev/iommu;"
                     f" cat /sys/class/vfio-dev/vfio1/dev; '{hotreset}' 0000:01:00.0 0000:01:00.1"],
        extra=["--stat-mode"],
    )
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    major, minor = (int(x) for x in lines[2].split(":"))
    assert lines[0] == f"character special file {major:x}:{minor:x}"
    assert lines[1].startswith("character special file a:")
    assert lines_of(r.stdout, "reset") == ["0"]


def test_trace_file_and_trace_decode(hotreset: str, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    r = fakedev_run(
        "dual-function-nic", [hotreset, "0000:01:00.0", "0000:01:00.1"],
        extra=["--trace", str(trace)],
    )
    assert r.returncode == 0, r.stdout + r.stderr
    d = subprocess.run(fakedev_cmd("trace-decode", str(trace)), capture_output=True, text=True,
                       env=fakedev_env())
    assert d.returncode == 0, d.stderr
    calls = [line.split("] ", 1)[1].split("(", 1)[0] for line in d.stdout.splitlines()]
    assert calls == [
        "open", "IOMMU_IOAS_ALLOC",
        "open", "VFIO_DEVICE_BIND_IOMMUFD", "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
        "open", "VFIO_DEVICE_BIND_IOMMUFD", "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
        "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO", "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO",
        "VFIO_DEVICE_PCI_HOT_RESET",
        "release", "release", "release",
    ]
    assert d.stdout.splitlines()[-4].endswith("{argsz=12, flags=0, count=0, group_fds=[]}) = 0")
