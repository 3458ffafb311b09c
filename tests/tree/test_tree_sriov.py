"""SR-IOV in a tree: ``capabilities.sriov`` on a PF, ``physfn`` on its VFs,
the top-level ``enable_sriov``; errors name file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from fakedev.kernel.pci import (
    PCI_EXT_CAP_ID_SRIOV,
    PCI_SRIOV_CTRL,
    PCI_SRIOV_VF_DID,
    PCI_SRIOV_VF_OFFSET,
    PCI_SRIOV_VF_STRIDE,
)
from fakedev.tree import TreeError, load_tree
from fakedev.tree.loader import FIXTURES

PF = """
[[function]]
bdf = "0000:00:1c.0"
kind = "root-port"
vendor = 0x8086
device = 0xa110
secondary_bus = 0x01
driver = "pcieport"

[[function]]
bdf = "0000:01:00.0"
vendor = 0x8086
device = 0x10fb
class = 0x020000
driver = "ixgbe"
capabilities.pcie = { flr = true }
capabilities.sriov = { total_vfs = 4, num_vfs = 2 }
"""


def vf(bdf: str, physfn: str = "0000:01:00.0", extra: str = "") -> str:
    return f"""
[[function]]
bdf = "{bdf}"
physfn = "{physfn}"
vendor = 0x8086
device = 0x10ed
class = 0x020000
capabilities.pcie = {{ flr = true }}
{extra}"""


TWO_VFS = PF + vf("0000:01:10.0") + vf("0000:01:10.2")


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "t.toml"
    p.write_text(text)
    return p


def error(tmp_path: Path, text: str) -> TreeError:
    p = write(tmp_path, text)
    with pytest.raises(TreeError) as ei:
        load_tree(p)
    assert str(p) in str(ei.value)
    return ei.value


def line_of(text: str, needle: str, nth: int = 1) -> int:
    lines = text.splitlines()
    hits = [i + 1 for i, ln in enumerate(lines) if needle in ln]
    return hits[nth - 1]


def test_fixture_loads_with_a_comment() -> None:
    path = FIXTURES / "sriov-nic.toml"
    text = path.read_text()
    assert text.startswith("# ") and "Hot reset" in text.split("[[function]]")[0]
    tree = load_tree(path)
    assert tree.enable_sriov
    pf = tree.topology.find("0000:01:00.0")
    assert pf is not None and pf.is_physfn and not pf.is_virtfn
    assert pf.sriov_total_vfs == 8 and pf.sriov_num_vfs == 2
    assert [v.name for v in pf.virtfns] == ["0000:01:10.0", "0000:01:10.2"]
    assert all(v.physfn is pf and v.is_virtfn and not v.is_physfn for v in pf.virtfns)
    assert [v.iommu_group for v in pf.virtfns] == [22, 23] and pf.iommu_group == 21
    k = tree.make_kernel()
    assert k.vfio.enable_sriov
    assert [d.pdev.name for d in k.vfio_devices()] == ["0000:01:00.0", "0000:01:10.0", "0000:01:10.2"]
    assert k.check_invariants() == []


def test_sriov_capability_bytes(tmp_path: Path) -> None:
    tree = load_tree(write(tmp_path, TWO_VFS))
    pf = tree.topology.find("0000:01:00.0")
    assert pf is not None
    pos = pf.find_ext_capability(PCI_EXT_CAP_ID_SRIOV)
    assert pos == 0x100
    assert pf.cfg_read(pos + PCI_SRIOV_CTRL, 2) & 0x1  # VF Enable
    assert pf.cfg_read(pos + PCI_SRIOV_VF_OFFSET, 2) == 0x80  # 01:10.0 - 01:00.0
    assert pf.cfg_read(pos + PCI_SRIOV_VF_STRIDE, 2) == 2
    assert pf.cfg_read(pos + PCI_SRIOV_VF_DID, 2) == 0x10ED
    assert not tree.enable_sriov
    vf0 = tree.topology.find("0000:01:10.0")
    assert vf0 is not None and vf0.interrupt_pin == 0  # VFs have no INTx pin


def test_sriov_after_acs_is_chained(tmp_path: Path) -> None:
    text = TWO_VFS.replace("capabilities.sriov", "capabilities.acs = true\ncapabilities.sriov")
    pf = load_tree(write(tmp_path, text)).topology.find("0000:01:00.0")
    assert pf is not None
    assert [cid for cid, _ in pf.ext_capabilities()] == [0x0D, PCI_EXT_CAP_ID_SRIOV]
    assert pf.sriov_num_vfs == 2


def test_no_vfs_enabled(tmp_path: Path) -> None:
    text = PF.replace("num_vfs = 2", "num_vfs = 0")
    pf = load_tree(write(tmp_path, text)).topology.find("0000:01:00.0")
    assert pf is not None and pf.is_physfn and pf.sriov_num_vfs == 0 and pf.virtfns == []


def test_enable_sriov_defaults_to_false() -> None:
    tree = load_tree(FIXTURES / "dual-function-nic.toml")
    assert not tree.enable_sriov and not tree.make_kernel().vfio.enable_sriov


@pytest.mark.parametrize(("text", "needle", "field", "message"), [
    (PF + vf("0000:01:10.0"), "num_vfs", "capabilities.sriov.num_vfs", "1 function(s) name"),
    (TWO_VFS.replace("num_vfs = 2", "num_vfs = 5"), "num_vfs", "capabilities.sriov.num_vfs",
     "more than total_vfs"),
    (PF + vf("0000:01:10.0") + vf("0000:01:10.2", physfn="0000:01:00.1"), 'physfn = "0000:01:00.1"', "physfn",
     "no function 0000:01:00.1"),
    (PF + vf("0000:01:10.0") + vf("0000:01:10.2", physfn="0000:00:1c.0"), 'physfn = "0000:00:1c.0"', "physfn",
     "no SR-IOV capability"),
    (PF + vf("0000:01:10.0") + vf("0000:01:10.2", physfn="01:10.0"), 'physfn = "01:10.0"', "physfn",
     "is itself a VF"),
    (PF + vf("0000:01:10.0") + vf("0000:01:10.2", physfn="nope"), 'physfn = "nope"', "physfn",
     "not a function address"),
    (PF + vf("0000:01:10.0") + vf("0000:01:10.2", extra='interrupt_pin = "A"'), 'interrupt_pin', "interrupt_pin",
     "no INTx"),
    (PF + vf("0000:01:10.0") + vf("0000:01:10.2", extra="capabilities.sriov = { total_vfs = 1 }"),
     "total_vfs = 1", "capabilities.sriov", "no SR-IOV capability of its own"),
    (PF.replace("capabilities.sriov = { total_vfs = 4, num_vfs = 2 }",
                "capabilities.sriov = { total_vfs = 4, vfs = 2 }"), "vfs = 2", "capabilities.sriov.vfs", "unknown field"),
    (PF.replace('driver = "ixgbe"', 'driver = "vfio-pci"') + vf("0000:01:10.0") + vf("0000:01:10.2"),
     'driver = "vfio-pci"', "driver", "enable_sriov = true"),
    ("enable_sriov = 1\n" + TWO_VFS, "enable_sriov", "enable_sriov", "true or false"),
])
def test_errors(tmp_path: Path, text: str, needle: str, field: str, message: str) -> None:
    e = error(tmp_path, text)
    assert e.line == line_of(text, needle), str(e)
    assert e.field.endswith(field), str(e)
    assert message in str(e)


def test_vfs_evenly_spaced(tmp_path: Path) -> None:
    text = PF.replace("num_vfs = 2", "num_vfs = 3") + vf("0000:01:10.0") + vf("0000:01:10.2") + vf("0000:01:10.3")
    e = error(tmp_path, text)
    assert e.line == line_of(text, 'bdf = "0000:01:10.3"') and e.field.endswith("bdf")
    assert "evenly spaced" in str(e)


def test_vf_before_its_pf(tmp_path: Path) -> None:
    text = PF.replace("0000:01:00.0", "0000:01:00.4").replace("num_vfs = 2", "num_vfs = 1") + vf(
        "0000:01:00.1", physfn="0000:01:00.4"
    )
    e = error(tmp_path, text)
    assert e.line == line_of(text, 'bdf = "0000:01:00.1"') and "after its PF" in str(e)


def test_sriov_needs_a_pcie_endpoint(tmp_path: Path) -> None:
    text = PF.replace('capabilities.sriov = { total_vfs = 4, num_vfs = 2 }', "") + """
[[function]]
bdf = "0000:00:02.0"
kind = "pci-endpoint"
vendor = 0x8086
device = 0x1234
capabilities.sriov = { total_vfs = 1 }
"""
    e = error(tmp_path, text)
    assert e.field.endswith("capabilities.sriov") and "PCIe endpoint" in str(e)
    port = PF.replace('driver = "pcieport"', 'driver = "pcieport"\ncapabilities.sriov = { total_vfs = 1 }')
    e = error(tmp_path, port.replace("capabilities.sriov = { total_vfs = 4, num_vfs = 2 }", ""))
    assert e.field.endswith("capabilities.sriov") and "PCIe endpoint" in str(e)
