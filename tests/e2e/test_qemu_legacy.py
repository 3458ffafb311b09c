"""Unmodified QEMU on the legacy group/container path (Debian's 7.2, and an
upstream QEMU given no iommufd object when ``FAKEDEV_QEMU`` names one) realizes
fake vfio-pci devices under ``fakedev run --supervise`` and hot-resets them on
QMP ``system_reset``.

The QMP driver and the run harness are in tests/e2e/qemu.py.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cli.conftest import unprivileged_python
from tests.e2e import qemu as harness
from tests.e2e.qemu import AsUser, Run, device

DEBIAN_QEMU = shutil.which("qemu-system-x86_64")
UPSTREAM_QEMU = os.environ.get("FAKEDEV_QEMU", "")

pytestmark = [pytest.mark.needs_root]


@pytest.fixture(params=["debian", "upstream"])
def qemu(request: pytest.FixtureRequest) -> str:
    """Each QEMU at hand: Debian's 7.2 (required), and FAKEDEV_QEMU's when set."""
    if request.param == "debian":
        if DEBIAN_QEMU is None:
            pytest.fail("qemu-system-x86_64 is not installed (scripts/setup installs qemu-system-x86)")
        return DEBIAN_QEMU
    if not UPSTREAM_QEMU:
        pytest.skip("FAKEDEV_QEMU does not name an upstream QEMU (scripts/build-qemu builds one)")
    return UPSTREAM_QEMU


NIC = (0x8086, 0x10C9)  # fixtures/dual-function-nic.toml
F0, F1 = "0000:01:00.0", "0000:01:00.1"


def run_qemu(
    qemu: str,
    tmp_path: Path,
    bdfs: list[str],
    holder: list[str] | None = None,
    stat_mode: bool = False,
    user: AsUser | None = None,
) -> Run:
    """QEMU on dual-function-nic's functions, legacy path, under --supervise."""
    return harness.run_qemu(tmp_path, "dual-function-nic", bdfs, "legacy", qemu=qemu, holder=holder,
                            stat_mode=stat_mode, user=user)


def group(state: dict[str, Any], gid: int) -> dict[str, Any]:
    return next(g for g in state["groups"] if g["id"] == gid)


def test_one_function_is_realized_through_the_group_and_cannot_be_hot_reset(
    qemu: str, tmp_path: Path,
) -> None:
    run = run_qemu(qemu, tmp_path, [F0])
    assert (*NIC, "hostdev0") in run.pci_devices(), run
    # The model sees QEMU's device fd as opened through group 13 in a container.
    st = run.out["before"]
    dev = device(st, F0)
    assert dev["open_count"] == 1 and not dev["cdev_opened"] and dev["cdev_files"] == 0, dev
    g13 = group(st, 13)
    assert g13["open"] and g13["container"] and g13["container_iommu"], g13
    # QEMU's device fd is the supervisor's install: an open of the mount's devfd node
    assert len(run.qemu_fds_on("/.fakedev/devfd")) == 1, run.out["qemu_fds"]
    assert not group(st, 14)["open"]
    # QEMU read the device through that fd: every realize-time call answered.
    for name in (
        "VFIO_GROUP_GET_STATUS",
        "VFIO_GROUP_SET_CONTAINER",
        "VFIO_SET_IOMMU",
        "VFIO_IOMMU_MAP_DMA",
        "VFIO_DEVICE_GET_INFO",
        "VFIO_DEVICE_GET_REGION_INFO",
        "VFIO_DEVICE_GET_IRQ_INFO",
        "VFIO_DEVICE_SET_IRQS",
    ):
        calls = run.calls(name)
        assert calls, f"{name} never reached fakedev\n{run}"
        assert all(c["errno"] is None for c in calls if name != "VFIO_DEVICE_GET_IRQ_INFO"), calls
    # Group 14 is not QEMU's: QEMU asks, sees the dependency, and sends no reset.
    assert run.calls("VFIO_DEVICE_GET_PCI_HOT_RESET_INFO")
    assert not run.calls("VFIO_DEVICE_PCI_HOT_RESET")
    assert any(
        f"Cannot reset device {F0}, depends on group 14 which is not owned" in line
        for line in run.qemu_stderr.splitlines()
    ), run
    assert run.hot_resets_during_system_reset() == []
    assert "vfio_pci_hot_reset_result" not in run.qemu_stderr


@pytest.mark.parametrize("stat_mode", [False, True], ids=["plain", "stat-mode"])
def test_both_functions_system_reset_is_one_multi_device_hot_reset(
    qemu: str, tmp_path: Path, stat_mode: bool
) -> None:
    run = run_qemu(qemu, tmp_path, [F0, F1], stat_mode=stat_mode)
    devices = run.pci_devices()
    assert (*NIC, "hostdev0") in devices and (*NIC, "hostdev1") in devices, run
    st = run.out["before"]
    assert device(st, F0)["open_count"] == device(st, F1)["open_count"] == 1
    assert len(run.qemu_fds_on("/.fakedev/devfd")) == 2, run.out["qemu_fds"]
    assert group(st, 13)["open"] and group(st, 14)["open"]
    # One hot reset, in QEMU's multi-device pass, with both group fds.
    assert sorted(run.hot_resets_during_system_reset()) == [F0, F1], run
    multi = [line for line in run.qemu_stderr.splitlines() if line.endswith(") multi")]
    assert multi, run
    results = run.qemu_lines("vfio_pci_hot_reset_result")
    assert results and all(line.endswith("hot reset: Success") for line in results), run
    resets = run.calls("VFIO_DEVICE_PCI_HOT_RESET")
    assert resets and all(c["errno"] is None and c["result"] == 0 for c in resets), resets
    for c in resets:  # legacy path: one group fd per dependent group
        assert c["request"]["count"] == 2 and c["request"]["argsz"] == 12 + 4 * 2, c
    # ... which are QEMU's own opens of /dev/vfio/13 and /dev/vfio/14 (the model
    # refuses a reset whose fds do not cover every group of the dev_set), shown in
    # the trace with what they are
    assert len(run.qemu_fds_on("/vfio/13")) == 1 and len(run.qemu_fds_on("/vfio/14")) == 1
    g13, g14 = run.qemu_fds_on("/vfio/13")[0], run.qemu_fds_on("/vfio/14")[0]
    for c in resets:
        assert sorted((e["fd"], e["path"], e["ref"]) for e in c["request"]["group_fds"]) == sorted(
            [(g13, "/dev/vfio/13", "group 13"), (g14, "/dev/vfio/14", "group 14")]), c
    # the device fds came from GROUP_GET_DEVICE_FD, answered by the supervisor, and
    # the reset was made on one of them
    getfd = run.calls("VFIO_GROUP_GET_DEVICE_FD")
    assert sorted((c["request"], c["fd"], c["via"]) for c in getfd if c["errno"] is None) == [
        (F0, g13, "supervisor"), (F1, g14, "supervisor")], getfd
    device_opens = {c["new_open"]: c["result"] for c in getfd if c["errno"] is None}
    assert all(device_opens.get(c["open"]) == c["fd"] for c in resets), (device_opens, resets)
    assert sorted(device_opens.values()) == run.qemu_fds_on("/.fakedev/devfd")
    infos_ok = [c for c in run.calls("VFIO_DEVICE_GET_PCI_HOT_RESET_INFO") if c["errno"] is None]
    assert all([(e["bdf"], e["group_id"]) for e in c["result_struct"]["devices"]] == [(F0, 13), (F1, 14)]
               for c in infos_ok), infos_ok
    # QEMU looked at the dependencies first: both groups, both its own.
    deps = run.qemu_lines("vfio_pci_hot_reset_dep_devices")
    assert any(f"{F0} group 13" in d for d in deps) and any(f"{F1} group 14" in d for d in deps)
    infos = run.calls("VFIO_DEVICE_GET_PCI_HOT_RESET_INFO")
    assert any(c["errno"] is None and c["result_struct"]["count"] == 2 for c in infos), infos
    # The startup reset and the system_reset each reset both functions exactly once.
    log = [
        r["bdf"] for r in run.out["after"]["reset_log"] if r["cause"] == "VFIO_DEVICE_PCI_HOT_RESET"
    ]
    assert sorted(log) == [F0, F0, F1, F1], log


@pytest.mark.parametrize("hold", ["cdev", "group"])
def test_sibling_held_by_another_process_blocks_the_reset(
    qemu: str, tmp_path: Path, hotreset: str, hold: str
) -> None:
    if hold == "cdev":
        holder = [hotreset, "--no-info", "--no-reset", "--hold", F1]
    else:
        holder = ["sh", "-c", "exec 3<>/dev/vfio/14 && echo ready && read line"]
    run = run_qemu(qemu, tmp_path, [F0], holder=holder)
    assert (*NIC, "hostdev0") in run.pci_devices(), run
    held = device(run.out["before"], F1)
    if hold == "cdev":
        assert held["cdev_opened"], held
    else:
        assert group(run.out["before"], 14)["open"]
    assert any(
        f"Cannot reset device {F0}, depends on group 14 which is not owned" in line
        for line in run.qemu_stderr.splitlines()
    ), run
    assert not run.calls("VFIO_DEVICE_PCI_HOT_RESET")
    assert run.hot_resets_during_system_reset() == []
    assert not any(r["cause"] == "VFIO_DEVICE_PCI_HOT_RESET" for r in run.out["after"]["reset_log"])


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory the unprivileged user can reach (pytest's tmp_path is root's)."""
    d = Path(tempfile.mkdtemp(prefix="fakedev-qemu-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_rootless_run_realizes_and_resets_both_functions(
    qemu: str, shared_tmp: Path,
    unprivileged_user: str,
    user_pythonpath: str,
    userns_allowed: None,
    dev_fuse_usable_by_all: None,
) -> None:
    exe = unprivileged_python(unprivileged_user)
    if exe is None:
        pytest.fail(f"no Python {sys.version_info[:2]} runnable by {unprivileged_user}")
    run = run_qemu(qemu, shared_tmp, [F0, F1], user=AsUser(unprivileged_user, exe, user_pythonpath))
    devices = run.pci_devices()
    assert (*NIC, "hostdev0") in devices and (*NIC, "hostdev1") in devices, run
    assert len(run.qemu_fds_on("/.fakedev/devfd")) == 2, run.out["qemu_fds"]
    assert sorted(run.hot_resets_during_system_reset()) == [F0, F1], run
