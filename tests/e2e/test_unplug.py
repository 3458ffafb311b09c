"""Unplug under ``fakedev run`` (a ``--fault unplug=...`` rule firing after the
program's SET_IRQS, or the program writing ``unplug BDF`` to the control
file): the program holding vfio0 gets the REQ eventfd,
keeps a working fd, closes it, and the node and sysfs entries are gone from
its /dev and /sys."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from tests.cli.conftest import unprivileged_python
from tests.e2e.conftest import FIXTURES, fakedev_run

pytestmark = pytest.mark.needs_root

F0 = "0000:01:00.0"

SCRIPT = textwrap.dedent(f"""
    import errno, fcntl, os, select, shutil, struct, subprocess, time, json
    from fakedev.uapi import consts as C
    from fakedev.uapi import ioctls as IO

    def out(*a):
        print(*a, flush=True)

    out("before", *sorted(os.listdir("/dev/vfio/devices")))
    ifd = os.open("/dev/iommu", os.O_RDWR)
    dfd = os.open("/dev/vfio/devices/vfio0", os.O_RDWR)
    fcntl.ioctl(dfd, IO.VFIO_DEVICE_BIND_IOMMUFD, bytearray(struct.pack("<IIiI", 16, 0, ifd, 0)))
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    flags = C.VFIO_IRQ_SET_DATA_EVENTFD | C.VFIO_IRQ_SET_ACTION_TRIGGER
    fcntl.ioctl(dfd, IO.VFIO_DEVICE_SET_IRQS,
                bytearray(struct.pack("<IIIIIi", 24, flags, C.VFIO_PCI_REQ_IRQ_INDEX, 0, 1, efd)))
    if os.environ.get("UNPLUG_BY") == "control":
        with open(os.environ["FAKEDEV_MOUNT"] + "/.fakedev/control", "w") as ctl:
            ctl.write("unplug {F0}")
    # else the unplug comes from the fault rule, right after that SET_IRQS returned
    select.select([efd], [], [], 30)
    out("req", os.eventfd_read(efd))
    try:
        os.open("/dev/vfio/devices/vfio0", os.O_RDWR)
        out("reopen 0")
    except OSError as e:
        out("reopen", errno.errorcode[e.errno])
    info = bytearray(struct.pack("<IIII", 16, 0, 0, 0))
    fcntl.ioctl(dfd, IO.VFIO_DEVICE_GET_INFO, info)
    out("info", struct.unpack("<IIII", info)[2])
    os.close(dfd)
    os.close(ifd)
    deadline = time.monotonic() + 20
    while "vfio0" in os.listdir("/dev/vfio/devices") and time.monotonic() < deadline:
        time.sleep(0.05)
    out("after", *sorted(os.listdir("/dev/vfio/devices")))
    for p in ("/dev/vfio/devices/vfio0", "/dev/vfio/13"):
        try:
            os.stat(p)
            out("stat", p, "ok")
        except OSError as e:
            out("stat", p, errno.errorcode[e.errno])
    for p in ("/sys/bus/pci/devices/{F0}", "/sys/kernel/iommu_groups/13", "/sys/class/vfio-dev/vfio0",
              "/sys/bus/pci/devices/0000:01:00.1"):
        out("sysfs", p, os.path.lexists(p))
    state = json.load(open(os.environ["FAKEDEV_MOUNT"] + "/.fakedev/state.json"))
    out("model", [d["bdf"] for d in state["devices"]], state["unplugs"])
    if shutil.which("lspci"):
        out("lspci", "01:00.0" in subprocess.run(["lspci"], capture_output=True, text=True).stdout)
""")


def check_output(stdout: str, stderr: str) -> None:
    lines = stdout.splitlines()
    assert lines[:5] == [
        "before vfio0 vfio1",
        "req 1",
        "reopen ENODEV",
        "info 9",
        "after vfio1",
    ], stdout + stderr
    assert "stat /dev/vfio/devices/vfio0 ENOENT" in lines
    assert "stat /dev/vfio/13 ENOENT" in lines
    assert f"sysfs /sys/bus/pci/devices/{F0} False" in lines
    assert "sysfs /sys/kernel/iommu_groups/13 False" in lines
    assert "sysfs /sys/class/vfio-dev/vfio0 False" in lines
    assert "sysfs /sys/bus/pci/devices/0000:01:00.1 True" in lines
    assert "model ['0000:01:00.1'] []" in lines
    if any(ln.startswith("lspci") for ln in lines):
        assert "lspci False" in lines


@pytest.mark.parametrize("by", ["fault", "control"])
def test_unplug_while_open_under_run(by: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNPLUG_BY", by)
    extra = ["--fault", f"unplug={F0},after=VFIO_DEVICE_SET_IRQS"] if by == "fault" else []
    r = fakedev_run("dual-function-nic", [sys.executable, "-c", SCRIPT], extra=extra)
    assert r.returncode == 0, r.stderr
    check_output(r.stdout, r.stderr)


def test_unplug_rootless(unprivileged_user: str, user_pythonpath: str, userns_allowed: None,
                         dev_fuse_usable_by_all: None) -> None:
    """The same as a normal user (user namespace, shadowed /dev, sysfs in the staging tmpfs)."""
    exe = unprivileged_python(unprivileged_user)
    if exe is None:
        pytest.fail(f"no Python {sys.version_info[:2]} runnable by {unprivileged_user}")
    shared = Path(tempfile.mkdtemp(prefix="fakedev-e2e-"))
    shared.chmod(0o755)
    tree = shared / "tree.toml"
    shutil.copy(FIXTURES / "dual-function-nic.toml", tree)
    tree.chmod(0o644)
    try:
        r = subprocess.run(
            ["runuser", "-u", unprivileged_user, "--", "env", f"PYTHONPATH={user_pythonpath}", "UNPLUG_BY=control",
             exe, "-m", "fakedev.cli.main", "run", "--tree", str(tree), "--", exe, "-c", SCRIPT],
            capture_output=True, text=True, timeout=120, cwd="/",
        )
    finally:
        shutil.rmtree(shared)
    assert r.returncode == 0, r.stdout + r.stderr
    check_output(r.stdout, r.stderr)
