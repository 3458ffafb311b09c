"""What a program sees under ``fakedev run``, and what the host does not:
lspci reads the tree from the real /sys paths; the host's /dev, /sys and
mount table are the same during and after a run; rootless mode."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.cli.conftest import relevant_mounts, unprivileged_python
from tests.e2e.conftest import FIXTURES, fakedev_cmd, fakedev_env, fakedev_run

pytestmark = pytest.mark.needs_root


def host_view() -> tuple[list[str], list[str], list[str], list[str], bool]:
    return (
        relevant_mounts(),
        sorted(os.listdir("/dev")),
        sorted(os.listdir("/sys/bus/pci/devices")),
        sorted(os.listdir("/sys/kernel/iommu_groups")),
        os.path.exists("/dev/vfio"),
    )


@pytest.fixture(scope="module")
def lspci() -> str:
    path = shutil.which("lspci")
    if path is None:
        pytest.fail("lspci is missing (scripts/setup installs pciutils)")
    return path


def test_lspci_tree(lspci: str) -> None:
    r = fakedev_run("dual-function-nic", [lspci, "-tv"])
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "1c.0" in out and "[01]" in out
    assert out.count("82576") == 2 or out.count("10c9") == 2, out
    # Only the tree's devices: nothing of the host's PCI bus.
    assert len([line for line in out.splitlines() if line.strip()]) <= 4, out


def test_lspci_verbose_function(lspci: str) -> None:
    r = fakedev_run("dual-function-nic", [lspci, "-vvv", "-s", "01:00.1"])
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("01:00.1 "), out
    assert "Ethernet controller" in out
    assert "Kernel driver in use: vfio-pci" in out
    assert "IOMMU group: 14" in out
    assert "MSI-X" in out


def test_host_unchanged_during_and_after_a_run() -> None:
    before = host_view()
    proc = subprocess.Popen(
        fakedev_cmd("run", "--tree", str(FIXTURES / "dual-function-nic.toml"), "--",
                    "sh", "-c", "ls /dev/vfio/devices; echo ready; read x"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=fakedev_env(),
    )
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline() == "vfio0\n"
    assert proc.stdout.readline() == "vfio1\n"
    assert proc.stdout.readline() == "ready\n"
    assert host_view() == before
    proc.stdin.write("\n")
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0
    assert host_view() == before


def test_show_from_outside_and_inside() -> None:
    r = fakedev_run("dual-function-nic", [sys.executable, "-m", "fakedev.cli.main", "show"])
    assert r.returncode == 0, r.stderr
    assert "state from" in r.stdout
    r = subprocess.run(
        fakedev_cmd("show", "--tree", str(FIXTURES / "dual-function-nic.toml")),
        capture_output=True, text=True, env=fakedev_env(),
    )
    assert r.returncode == 0, r.stderr
    assert "0000:01:00.1" in r.stdout and "vfio1" in r.stdout and "group 14" in r.stdout


def test_run_as_unprivileged_user(
    hotreset: str,
    unprivileged_user: str,
    user_pythonpath: str,
    userns_allowed: None,
    dev_fuse_usable_by_all: None,
) -> None:
    exe = unprivileged_python(unprivileged_user)
    if exe is None:
        pytest.fail(f"no Python {sys.version_info[:2]} runnable by {unprivileged_user}")
    # The session's build dir is private to root: give the user its own copy.
    shared = Path(tempfile.mkdtemp(prefix="fakedev-e2e-"))
    shared.chmod(0o755)
    client = shared / "hotreset"
    shutil.copy(hotreset, client)
    client.chmod(0o755)
    tree = shared / "tree.toml"
    shutil.copy(FIXTURES / "dual-function-nic.toml", tree)
    tree.chmod(0o644)
    try:
        r = subprocess.run(
            ["runuser", "-u", unprivileged_user, "--", "env",
             f"PYTHONPATH={user_pythonpath}", exe, "-m", "fakedev.cli.main", "run",
             "--tree", str(tree), "--",
             "sh", "-c", f"id -u; '{client}' 0000:01:00.0 0000:01:00.1"],
            capture_output=True, text=True, timeout=120, cwd="/",
        )
    finally:
        shutil.rmtree(shared)
    assert r.returncode == 0, r.stdout + r.stderr
    uid = subprocess.run(["id", "-u", unprivileged_user], capture_output=True, text=True)
    assert r.stdout.splitlines()[0] == uid.stdout.strip()
    assert "info: flags=0x3 count=2" in r.stdout
    assert "reset: 0" in r.stdout


def test_missing_command_and_bad_tree() -> None:
    r = subprocess.run(fakedev_cmd("run", "--"), capture_output=True, text=True,
                       env=fakedev_env())
    assert r.returncode != 0 and "missing command" in r.stderr
    r = subprocess.run(fakedev_cmd("show", "--tree", "/nonexistent.toml"),
                       capture_output=True, text=True, env=fakedev_env())
    assert r.returncode == 1 and "fakedev:" in r.stderr


def test_mount_serves_in_the_foreground_and_unmounts_on_sigterm(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen(
        fakedev_cmd("mount", "--tree", str(FIXTURES / "dual-function-nic.toml"), str(mnt)),
        stderr=subprocess.PIPE, text=True, env=fakedev_env(),
    )
    assert proc.stderr is not None
    try:
        assert "serving at" in proc.stderr.readline()
        assert sorted(os.listdir(mnt / "vfio" / "devices")) == ["vfio0", "vfio1"]
        show = subprocess.run(fakedev_cmd("show", "--mount", str(mnt)), capture_output=True,
                              text=True, env=fakedev_env())
        assert show.returncode == 0 and "0000:01:00.1" in show.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert not os.path.ismount(mnt)


def test_show_pid_from_outside_tells_who_holds_what(hotreset: str) -> None:
    proc = subprocess.Popen(
        fakedev_cmd("run", "--tree", str(FIXTURES / "dual-function-nic.toml"), "--",
                    hotreset, "--no-reset", "--hold", "0000:01:00.0"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=fakedev_env(),
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        while (line := proc.stdout.readline()) != "ready\n":
            assert line, "the client ended before it was ready"
        holder = next(
            p for p in os.listdir("/proc")
            if p.isdigit() and Path(f"/proc/{p}/cmdline").read_bytes().startswith(
                hotreset.encode())
        )
        r = subprocess.run(fakedev_cmd("show", "--pid", holder), capture_output=True,
                           text=True, env=fakedev_env())
        assert r.returncode == 0, r.stderr
        assert f"vfio0 0000:01:00.0: open (cdev) by pid {holder}, bound to iommufd1" in r.stdout
        assert "vfio1 0000:01:00.1: free" in r.stdout
        assert "group 13: DMA owned by iommufd1" in r.stdout
    finally:
        proc.stdin.write("\n")
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
