"""``noiommu = true``: a machine without an IOMMU, vfio in no-IOMMU mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from fakedev.tree import TreeError, load_tree
from fakedev.tree.loader import FIXTURES

FN = """
[[function]]
bdf = "0000:00:02.0"
vendor = 0x1b36
device = 0x00ff
class = 0xff0000
driver = "vfio-pci"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "t.toml"
    p.write_text(text)
    return p


def test_fixture_loads_with_a_comment() -> None:
    path = FIXTURES / "noiommu.toml"
    text = path.read_text()
    assert text.startswith("# ") and "Hot reset" in text.split("[[function]]")[0]
    tree = load_tree(path)
    assert tree.noiommu
    assert all(d.iommu_group is None for d in tree.topology.devices())
    k = tree.make_kernel()
    assert [n.path for n in k.nodes()] == ["vfio/vfio", "vfio/noiommu-0", "iommu"]
    assert k.check_invariants() == []


def test_default_is_off(tmp_path: Path) -> None:
    tree = load_tree(write(tmp_path, FN))
    assert not tree.noiommu
    assert tree.topology.find("0000:00:02.0").iommu_group == 0  # type: ignore[union-attr]
    assert [n.path for n in tree.make_kernel().nodes()] == ["vfio/vfio", "vfio/0", "vfio/devices/vfio0", "iommu"]


def test_noiommu_groups_only_where_there_is_none(tmp_path: Path) -> None:
    tree = load_tree(write(tmp_path, "noiommu = true\n" + FN + FN.replace("02.0", "03.0")))
    k = tree.make_kernel()
    assert sorted(g.name for g in k.vfio.groups.values()) == ["noiommu-0", "noiommu-1"]


def test_noiommu_must_be_a_bool(tmp_path: Path) -> None:
    p = write(tmp_path, 'description = "x"\nnoiommu = "yes"\n' + FN)
    with pytest.raises(TreeError) as ei:
        load_tree(p)
    assert ei.value.line == 2 and ei.value.field == "noiommu"
    assert "true or false" in str(ei.value) and str(p) in str(ei.value)


def test_noiommu_refuses_iommu_groups(tmp_path: Path) -> None:
    p = write(tmp_path, "noiommu = true\n" + FN + "iommu_group = 4\n")
    with pytest.raises(TreeError) as ei:
        load_tree(p)
    assert ei.value.line == 9 and "iommu_group" in ei.value.field
    assert "no IOMMU" in str(ei.value)


def test_noiommu_with_iommu_group_none_is_fine(tmp_path: Path) -> None:
    tree = load_tree(write(tmp_path, "noiommu = true\n" + FN + 'iommu_group = "none"\n'))
    assert tree.noiommu
