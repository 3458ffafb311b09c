"""`fakedev show` text for every fixture tree, and the holders summary."""

from __future__ import annotations

from pathlib import Path

import pytest

from fakedev.cli.render import render_kernel, render_state
from fakedev.tree import load_tree

FIXTURES = sorted((Path(__file__).resolve().parents[2] / "fixtures").glob("*.toml"))


@pytest.mark.parametrize("tree", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_every_fixture_renders(tree: Path) -> None:
    kernel = load_tree(tree).make_kernel()
    text = render_kernel(kernel)
    for vdev in kernel.vfio_devices():
        assert f"vfio{vdev.index}: {vdev.pdev.name}" in text
    assert "iommu groups:" in text


def test_dual_function_nic_tree() -> None:
    text = render_kernel(load_tree(FIXTURES[0].parent / "dual-function-nic.toml").make_kernel())
    assert text.splitlines()[:5] == [
        "bus 0000:00 (no bus reset)",
        "  0000:00:1c.0 [8086:a110] class 060400 group 12 driver pcieport",
        "    bus 0000:01 (bus reset)",
        "      0000:01:00.0 [8086:10c9] class 020000 group 13 driver vfio-pci vfio0",
        "      0000:01:00.1 [8086:10c9] class 020000 group 14 driver vfio-pci vfio1",
    ]
    assert "dev_sets:" in text


def test_holders_summary() -> None:
    state = {
        "devices": [
            {"vfio": "vfio0", "bdf": "0000:01:00.0", "open_count": 1, "cdev_opened": True,
             "opener_pid": 42, "iommufd": "iommufd1", "devid": 2, "attached_pt": 3},
            {"vfio": "vfio1", "bdf": "0000:01:00.1", "open_count": 0},
        ],
        "groups": [{"id": 13, "open": True, "opener_pid": 7, "container": True,
                    "dma_owner": "container"}, {"id": 14}],
    }
    lines = render_state(state).splitlines()
    assert lines[:5] == [
        "holders:",
        "  vfio0 0000:01:00.0: open (cdev) by pid 42, bound to iommufd1 as devid 2,"
        " attached to pt 3",
        "  vfio1 0000:01:00.1: free",
        "  group 13: open by pid 7, in a container, DMA owned by container",
        "  group 14: free",
    ]


def test_trace_record_decodes_as_the_tracer_prints_it() -> None:
    from fakedev.cli.render import decode_trace_record

    rec = {"op": "ioctl", "pid": 9, "fd": 4, "open": 2, "node": "vfio0",
           "name": "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO", "request": {"argsz": 28, "flags": 0, "count": 0},
           "absent": [], "result_struct": {"argsz": 28, "flags": 3, "count": 2, "devices": [
               {"bdf": "0000:01:00.0", "devid": 2}, {"bdf": "0000:01:00.1", "devid": 0}]},
           "result": 0, "errno": None}
    assert decode_trace_record(rec) == (
        "[pid 9] VFIO_DEVICE_GET_PCI_HOT_RESET_INFO(fd=4 open#2 vfio0, {argsz=28, flags=0, count=0}) = 0"
        " => {argsz=28, flags=0x3 (DEV_ID|DEV_ID_OWNED), count=2, devices=[0000:01:00.0 devid=2,"
        " 0000:01:00.1 devid=VFIO_PCI_DEVID_OWNED]}")
    reset = {"op": "ioctl", "pid": 9, "fd": 4, "open": 2, "node": "vfio0", "name": "VFIO_DEVICE_PCI_HOT_RESET",
             "request": {"argsz": 20, "flags": 0, "count": 2, "group_fds": [
                 {"fd": 5, "path": "/dev/vfio/13", "ref": "group 13"}, {"fd": 6, "path": "/dev/iommu",
                                                                          "ref": "iommufd"}]},
             "absent": [], "result_struct": {"argsz": 20, "flags": 0, "count": 2}, "result": None,
             "errno": "EINVAL"}
    assert decode_trace_record(reset) == (
        "[pid 9] VFIO_DEVICE_PCI_HOT_RESET(fd=4 open#2 vfio0, {argsz=20, flags=0, count=2, group_fds=["
        "fd 5 -> /dev/vfio/13 (group 13), fd 6 -> /dev/iommu (iommufd)]}) = -1 EINVAL")


def test_trace_records_without_open_numbers_still_decode() -> None:
    from fakedev.cli.render import decode_trace_record

    assert decode_trace_record({"op": "ioctl", "pid": 1, "fd": None, "node": "13", "name": "VFIO_GROUP_SET_CONTAINER",
                                "request": 3, "result_struct": None, "result": 0, "errno": None}) == (
        "[pid 1] VFIO_GROUP_SET_CONTAINER(fd=? 13, [3]) = 0")
    assert decode_trace_record({"op": "ioctl", "pid": 1, "fd": 3, "node": "vfio0", "name": "ioctl[0x3bff]",
                                "arg": 0, "request": None, "result_struct": None, "result": None,
                                "errno": "ENOTTY"}) == "[pid 1] ioctl[0x3bff](fd=3 vfio0, 0x0) = -1 ENOTTY"
    assert decode_trace_record({"op": "write", "pid": 1, "node": "vfio0", "offset": 16, "size": 4,
                                "result": 4, "errno": None}) == "[pid 1] pwrite(vfio0, 4, 0x10) = 4"


def test_removals_and_dma_summary() -> None:
    state = {
        "devices": [
            {"vfio": "vfio0", "bdf": "0000:01:00.0", "open_count": 1, "cdev_opened": True,
             "opener_pid": 42, "unplug_requests": 2},
        ],
        "dma": {"reads": 1, "writes": 2, "bytes_read": 8, "bytes_written": 24, "faults": 1,
                "recent_faults": [{"bdf": "0000:01:00.0", "iova": 4096, "reason": "unmapped"}]},
        "unplugs": [{"bdf": "0000:01:00.0", "state": "waiting", "waiting_for": "0000:01:00.0"}],
    }
    lines = render_state(state).splitlines()
    assert lines[:6] == [
        "holders:",
        "  vfio0 0000:01:00.0: open (cdev) by pid 42, being removed (REQ signalled 2 times)",
        "dma: 1 reads (8 bytes), 2 writes (24 bytes), 1 faults",
        "  fault: bdf=0000:01:00.0, iova=4096, reason=unmapped",
        "removals:",
        "  0000:01:00.0: waiting, waiting for 0000:01:00.0 to be released",
    ]
    quiet = render_state({"dma": {"reads": 0, "writes": 0, "faults": 0}, "unplugs": []})
    assert not any(line.startswith(("dma: ", "removals:")) for line in quiet.splitlines())


def test_pending_unbinds_and_overrides_summary() -> None:
    state = {
        "unbinds": [{"bdf": "0000:01:00.1", "waiting_for": "0000:01:00.1", "requests": 3}],
        "driver_override": {"0000:01:00.1": "vfio-pci"},
    }
    lines = render_state(state).splitlines()
    assert lines[:4] == [
        "unbinds waiting for a release:",
        "  0000:01:00.1: REQ signalled 3 times",
        "driver_override:",
        "  0000:01:00.1: vfio-pci",
    ]
    quiet = render_state({"unbinds": [], "driver_override": {}}).splitlines()
    assert "unbinds waiting for a release:" not in quiet and "driver_override:" not in quiet
