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
