"""``fakedev run`` machinery with a stand-in server (plain tmpfs files instead
of FUSE): placement at the real paths, exit status, server death, signals,
host untouched, rootless mode."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.cli.conftest import REPO, python_env, relevant_mounts, unprivileged_python

STANDIN = str(REPO / "tests" / "cli" / "standin_run.py")

pytestmark = pytest.mark.needs_root


def standin(mode: str, script: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, STANDIN, mode, "--", "sh", "-c", script],
        capture_output=True,
        text=True,
        env=python_env(),
        timeout=60,
        **kw,  # type: ignore[arg-type]
    )


def host_view() -> tuple[list[str], list[str], list[str], bool]:
    return (
        relevant_mounts(),
        sorted(os.listdir("/dev")),
        sorted(os.listdir("/sys/bus/pci/devices")),
        os.path.exists("/sys/class/vfio-dev"),
    )


def test_nodes_and_sysfs_at_real_paths_and_exit_status() -> None:
    before = host_view()
    r = standin(
        "ok",
        "cat /dev/iommu /dev/vfio/devices/vfio0; cat /sys/bus/pci/devices/0000:01:00.0/vendor;"
        " ls /sys/bus/pci/devices; ls /sys/class/vfio-dev; echo x > /dev/null && echo null-ok;"
        " test -d /dev/pts && echo pts-ok; exit 7",
    )
    assert r.returncode == 7, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:2] == ["served iommu", "served vfio/devices/vfio0"]
    assert "0x8086" in lines
    assert "0000:01:00.0" in lines
    assert "vfio0" in lines
    assert "null-ok" in lines and "pts-ok" in lines
    # The real PCI devices are hidden inside, the host sees no change.
    real = [d for d in before[2] if d != "0000:01:00.0"]
    assert not set(real) & set(lines)
    assert host_view() == before
    assert not [p for p in os.listdir("/tmp") if p.startswith("fakedev-") and
                os.path.ismount(f"/tmp/{p}")]


def test_child_sees_host_unchanged_outside() -> None:
    before = host_view()
    proc = subprocess.Popen(
        [sys.executable, STANDIN, "ok", "--", "sh", "-c", "echo ready; read x"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=python_env(),
    )
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline() == "ready\n"
    assert host_view() == before  # during the run
    proc.stdin.write("\n")
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0
    assert host_view() == before  # after


def test_server_death_is_reported_and_nonzero() -> None:
    r = standin("fail-later", "exec sleep 20")
    assert r.returncode == 1
    assert "device server stopped" in r.stderr and "lost the connection" in r.stderr


def test_server_that_cannot_start() -> None:
    r = standin("fail-serve", "echo never")
    assert r.returncode == 1
    assert "never" not in r.stdout
    assert "cannot open /dev/fuse" in r.stderr


def test_missing_command_is_127() -> None:
    r = subprocess.run(
        [sys.executable, STANDIN, "ok", "--", "/nonexistent/program"],
        capture_output=True, text=True, env=python_env(), timeout=60,
    )
    assert r.returncode == 127
    assert "cannot run" in r.stderr


def test_sigterm_is_forwarded_and_status_kept() -> None:
    proc = subprocess.Popen(
        [sys.executable, STANDIN, "ok", "--", "sh", "-c",
         'trap "echo got-term; exit 3" TERM; echo ready; while :; do sleep 0.05; done'],
        stdout=subprocess.PIPE, text=True, env=python_env(),
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 3
    assert "got-term" in proc.stdout.read()


def test_rootless_standin(unprivileged_user: str, userns_allowed: None) -> None:
    exe = unprivileged_python(unprivileged_user)
    if exe is None:
        pytest.fail(f"no Python {sys.version_info[:2]} runnable by {unprivileged_user}")
    r = subprocess.run(
        ["runuser", "-u", unprivileged_user, "--", "env", f"PYTHONPATH={python_env()['PYTHONPATH']}",
         exe, STANDIN, "ok", "--", "sh", "-c",
         "id -u; cat /dev/iommu; cat /sys/bus/pci/devices/0000:01:00.0/vendor;"
         " echo x > /dev/null && echo null-ok"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == subprocess.run(["id", "-u", unprivileged_user], capture_output=True,
                                      text=True).stdout.strip()
    assert lines[1:] == ["served iommu", "0x8086", "null-ok"]
    time.sleep(0)


def gone(pid: int) -> bool:
    """``pid`` no longer exists (or is a zombie some unrelated parent has yet to reap)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_processes_left_behind_are_ended_at_exit() -> None:
    # one in CMD's process group, one in a session of its own (a daemon)
    r = standin(
        "ok",
        "sleep 300 & echo $!; setsid sh -c 'echo $$; exec sleep 301' & wait_for=$!;"
        " sleep 0.3; exit 4",
    )
    assert r.returncode == 4, r.stderr
    pids = [int(x) for x in r.stdout.split()]
    assert len(pids) == 2
    assert all(gone(p) for p in pids), pids


def test_leftovers_are_still_served_until_they_end() -> None:
    # a leftover that reads a node when told to stop: the devices are still there
    r = standin(
        "ok",
        "(trap 'cat /dev/iommu; exit 0' TERM; while :; do sleep 0.05; done) & sleep 0.2; exit 0",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["served iommu"]


def test_sigterm_reaches_every_process_of_the_run() -> None:
    script = (
        "setsid sh -c 'trap \"echo grandchild-term; exit 5\" TERM; echo $$; echo ready;"
        " while :; do sleep 0.05; done' & wait"
    )
    proc = subprocess.Popen(
        [sys.executable, STANDIN, "ok", "--", "sh", "-c", script],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=python_env(),
    )
    assert proc.stdout is not None
    pid = int(proc.stdout.readline())
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)  # EOF: nothing of the run holds the pipe
    assert proc.returncode == 128 + signal.SIGTERM
    assert "grandchild-term" in out
    assert gone(pid)
