"""QEMU accepts the config spaces of every fixture and picks the reset each
one's capabilities call for.

The fixtures cover what QEMU parses: PM with No_Soft_Reset (dual-function-nic,
hotplug-slot) and without it (root-bus, dma-engine), PCIe with FLR
(flr-device, dma-engine) and without (dual-function-nic, hotplug-slot), MSI
everywhere and MSI-X on all but root-bus. QEMU realizes every vfio-pci
function of the tree, and QMP ``system_reset`` makes it choose: FLR through
``VFIO_DEVICE_RESET`` when it has FLR, a hot reset of the slot or bus when no
FLR and no PM reset, and the PM reset when the hot reset cannot be done (a
function on the root bus). Debian's 7.2 on the legacy path, and an upstream
QEMU (``FAKEDEV_QEMU``) on the iommufd path by fd passing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.e2e.qemu import Run, run_qemu
from tests.e2e.test_qemu_iommufd import UPSTREAM_QEMU_REASON

pytestmark = [pytest.mark.needs_root]

DEBIAN_QEMU = shutil.which("qemu-system-x86_64")
UPSTREAM_QEMU = os.environ.get("FAKEDEV_QEMU", "")

#: tree -> (vfio-pci functions, the reset QEMU does for each at system_reset)
CASES = {
    "flr-device": (["0000:02:00.0"], {"0000:02:00.0": ("VFIO_DEVICE_RESET", "flr")}),
    "dma-engine": (["0000:03:00.0"], {"0000:03:00.0": ("VFIO_DEVICE_RESET", "flr")}),
    "root-bus": (["0000:00:02.0"], {"0000:00:02.0": ("VFIO_DEVICE_RESET", "pm")}),
    "hotplug-slot": (
        ["0000:05:00.0", "0000:05:00.1"],
        {"0000:05:00.0": ("VFIO_DEVICE_PCI_HOT_RESET", "slot"),
         "0000:05:00.1": ("VFIO_DEVICE_PCI_HOT_RESET", "slot")},
    ),
}
#: tree -> what QEMU's capability parsing must find (its trace events)
PARSED = {
    "flr-device": {"vfio_msi_setup", "vfio_msix_early_setup", "vfio_check_pcie_flr"},
    "dma-engine": {"vfio_msi_setup", "vfio_msix_early_setup", "vfio_check_pcie_flr",
                   "vfio_check_pm_reset"},
    "root-bus": {"vfio_msi_setup", "vfio_check_pm_reset"},
    "hotplug-slot": {"vfio_msi_setup", "vfio_msix_early_setup"},
}
EVENTS = sorted(set().union(*PARSED.values()))


@pytest.fixture(params=["debian-legacy", "upstream-iommufd"])
def variant(request: pytest.FixtureRequest) -> tuple[str, str]:
    if request.param == "debian-legacy":
        if DEBIAN_QEMU is None:
            pytest.fail("qemu-system-x86_64 is not installed (scripts/setup installs qemu-system-x86)")
        return DEBIAN_QEMU, "legacy"
    if not UPSTREAM_QEMU:
        pytest.skip(UPSTREAM_QEMU_REASON)
    return UPSTREAM_QEMU, "fd"


def resets_during_system_reset(run: Run) -> dict[str, list[tuple[str, str]]]:
    before = len(run.out["before"]["reset_log"])
    out: dict[str, list[tuple[str, str]]] = {}
    for r in run.out["after"]["reset_log"][before:]:
        out.setdefault(r["bdf"], []).append((r["cause"], r["method"]))
    return out


@pytest.mark.parametrize("tree", sorted(CASES))
def test_realized_and_reset_as_the_capabilities_say(
    tmp_path: Path, variant: tuple[str, str], tree: str
) -> None:
    qemu, mode = variant
    bdfs, expect = CASES[tree]
    run = run_qemu(tmp_path, tree, bdfs, mode, qemu=qemu, trace_events=EVENTS)
    realized = [d for d in run.pci_devices() if d[2].startswith("hostdev")]
    assert len(realized) == len(bdfs), run
    # once per realized function (fd-passed devices are named VFIO_FD<n>, not by BDF)
    lines = run.qemu_stderr.splitlines()
    seen = {e: sum(1 for line in lines if line.startswith(e + " ")) for e in EVENTS}
    assert seen == {e: len(bdfs) if e in PARSED[tree] else 0 for e in EVENTS}, (seen, run)
    got = resets_during_system_reset(run)
    assert got == {bdf: [want] for bdf, want in expect.items()}, (got, run)
