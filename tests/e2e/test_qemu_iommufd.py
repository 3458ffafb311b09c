"""Unmodified upstream QEMU (9 or later: the cdev + iommufd path) realizes fake
vfio-pci devices and hot-resets them on QMP ``system_reset`` with the
zero-length group-fd array.

These run when ``FAKEDEV_QEMU`` names such a qemu-system-x86_64 (``scripts/
build-qemu`` builds one from Debian's source package; ``scripts/test`` sets
the variable when it finds that build). Two ways in, as users run QEMU:

- ``host=BDF,iommufd=X`` inside ``fakedev run --stat-mode``: QEMU finds the
  cdev through sysfs and checks that it is a character device with the
  sysfs ``dev`` number; the supervisor answers the stat family for fakedev's
  nodes.
- fd passing (``-object iommufd,id=X,fd=N -device vfio-pci,id=D,fd=M``),
  as libvirt does: a plain ``fakedev run`` with no supervisor at all.

The QMP driver and the run harness are in tests/e2e/qemu.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import qemu as harness
from tests.e2e.qemu import Run, device

QEMU = os.environ.get("FAKEDEV_QEMU", "")


UPSTREAM_QEMU_REASON = "FAKEDEV_QEMU does not name an upstream QEMU (scripts/build-qemu builds one)"

pytestmark = [pytest.mark.needs_root, pytest.mark.skipif(not QEMU, reason=UPSTREAM_QEMU_REASON)]

F0, F1 = "0000:01:00.0", "0000:01:00.1"
NIC = (0x8086, 0x10C9)  # the card of dual-function-nic.toml and shared-group.toml

def run_qemu(tmp_path: Path, tree: str, bdfs: list[str], mode: str, **kw: Any) -> Run:
    """``tests.e2e.qemu.run_qemu`` with the upstream QEMU."""
    return harness.run_qemu(tmp_path, tree, bdfs, mode, qemu=QEMU, **kw)


def assert_realized_through_iommufd(run: Run, bdfs: list[str]) -> None:
    devices = run.pci_devices()
    for i, _ in enumerate(bdfs):
        assert (*NIC, f"hostdev{i}") in devices, run
    st = run.out["before"]
    ctxs = {device(st, bdf)["iommufd"] for bdf in bdfs}
    for bdf in bdfs:
        dev = device(st, bdf)
        assert dev["cdev_opened"] and dev["open_count"] == 1, dev
    assert len(ctxs) == 1 and None not in ctxs, ctxs  # one iommufd, all bound to it
    # The iommufd path, not the group path: no group ioctl reached fakedev.
    assert not [r for r in run.trace if r.get("op") == "ioctl" and r["name"].startswith("VFIO_GROUP")]
    for name in ("VFIO_DEVICE_BIND_IOMMUFD", "IOMMU_IOAS_ALLOC", "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
                 "VFIO_DEVICE_GET_INFO", "VFIO_DEVICE_GET_REGION_INFO"):
        calls = run.calls(name)
        assert calls and all(c["errno"] is None for c in calls), (name, calls)
    maps = run.calls("IOMMU_IOAS_MAP") + run.calls("IOMMU_IOAS_MAP_FILE")
    assert maps and all(c["errno"] is None for c in maps), maps  # guest RAM


def assert_zero_length_resets(run: Run, owned: int) -> None:
    """Every PCI_HOT_RESET QEMU sent was the zero-length form and succeeded."""
    resets = run.calls("VFIO_DEVICE_PCI_HOT_RESET")
    assert resets, run
    for c in resets:
        assert c["errno"] is None and c["result"] == 0, c
        assert c["request"]["count"] == 0 and c["request"]["argsz"] == 12, c
    infos = [c for c in run.calls("VFIO_DEVICE_GET_PCI_HOT_RESET_INFO") if c["errno"] is None]
    assert infos, run
    flags = infos[-1]["result_struct"]["flags"]
    assert flags & 0x1 and flags & 0x2, infos[-1]  # DEV_ID and DEV_ID_OWNED
    results = run.qemu_lines("vfio_pci_hot_reset_result")
    assert results and all(line.endswith("hot reset: Success") for line in results), run
    assert len(run.qemu_lines("iommufd_cdev_pci_hot_reset_dep_devices")) >= owned, run


@pytest.mark.parametrize("mode", ["host", "fd"])
def test_both_functions_system_reset_is_one_zero_length_hot_reset(
    tmp_path: Path, mode: str
) -> None:
    run = run_qemu(tmp_path, "dual-function-nic", [F0, F1], mode)
    assert_realized_through_iommufd(run, [F0, F1])
    assert_zero_length_resets(run, owned=2)
    # QEMU's multi-device pass: one reset for the card, recorded on both functions.
    assert any(line.endswith(") multi") for line in run.qemu_stderr.splitlines()), run
    assert run.hot_resets_during_system_reset() == [F0, F1], run
    log = [r["bdf"] for r in run.out["after"]["reset_log"] if r["cause"] == "VFIO_DEVICE_PCI_HOT_RESET"]
    assert sorted(log) == [F0, F0, F1, F1], log  # startup reset and system_reset


@pytest.mark.parametrize("mode", ["host", "fd"])
def test_one_function_of_a_shared_group_is_reset_alone_with_zero_length(
    tmp_path: Path, mode: str
) -> None:
    # shared-group: QEMU binds only 01:00.0, but owning group 13 owns 01:00.1
    # too, so INFO says DEV_ID_OWNED and 01:00.1 is reset with it, unopened.
    run = run_qemu(tmp_path, "shared-group", [F0], mode)
    assert_realized_through_iommufd(run, [F0])
    assert_zero_length_resets(run, owned=1)
    assert any(line.endswith(") one") for line in run.qemu_stderr.splitlines()), run
    assert run.hot_resets_during_system_reset() == [F0, F1], run
    assert device(run.out["after"], F1)["open_count"] == 0


@pytest.mark.parametrize("mode", ["host", "fd"])
def test_sibling_held_by_another_process_blocks_the_reset(
    tmp_path: Path, hotreset: str, mode: str
) -> None:
    holder = [hotreset, "--no-info", "--no-reset", "--hold", F1]
    run = run_qemu(tmp_path, "dual-function-nic", [F0], mode, holder=holder)
    assert_realized_through_iommufd(run, [F0])
    assert device(run.out["before"], F1)["cdev_opened"]
    infos = [c for c in run.calls("VFIO_DEVICE_GET_PCI_HOT_RESET_INFO") if c["errno"] is None]
    assert infos and all(not c["result_struct"]["flags"] & 0x2 for c in infos), infos
    assert any("which is not owned" in line for line in run.qemu_stderr.splitlines()), run
    assert not run.calls("VFIO_DEVICE_PCI_HOT_RESET")
    assert run.hot_resets_during_system_reset() == []


def xp_bytes(text: str) -> bytes:
    """The bytes of HMP ``xp /Nxb`` output ("0000000000200000: 0x66 0x61 ...")."""
    out = bytearray()
    for line in text.splitlines():
        _, _, values = line.partition(":")
        out.extend(int(v, 16) for v in values.split())
    return bytes(out)


@pytest.mark.parametrize("mode", ["host", "fd"])
def test_device_dma_reaches_guest_ram_through_qemus_mappings(tmp_path: Path, mode: str) -> None:
    """The device writes guest RAM through the IOAS mappings QEMU made; QEMU
    sees the bytes at that guest-physical address (IOVA = GPA without a
    vIOMMU), and an IOVA QEMU never mapped faults."""
    payload = b"fakedev DMA to guest RAM"
    plan = {"bdf": F0, "gpa": 0x200000, "hex": payload.hex(), "unmapped": 0xF0000000}
    run = run_qemu(tmp_path, "dual-function-nic", [F0, F1], mode, dma=plan)
    res = run.out["dma"]
    assert xp_bytes(res["xp_before"]) != payload, res
    assert res["write"].startswith(f"wrote {len(payload)} bytes"), res
    assert xp_bytes(res["xp_after"]) == payload, res
    assert bytes.fromhex(res["read"].strip()) == payload, res
    assert res["write_unmapped"] in ("EFAULT", "ENOENT", "EIO"), res
    dma = run.out["after"]["dma"]
    assert dma["writes"] >= 1 and dma["reads"] >= 1 and dma["faults"] == 1, dma
    assert [(f["bdf"], f["iova"]) for f in dma["recent_faults"]] == [(F0, plan["unmapped"])], dma
