"""Each fixture loads and is what its opening comment says it is."""

from __future__ import annotations

from pathlib import Path

import pytest

from fakedev.host.sysfs import vfio_index_for
from fakedev.kernel.pci import (
    PCI_CAP_ID_EXP,
    PCI_CAP_ID_MSI,
    PCI_CAP_ID_MSIX,
    PCI_CAP_ID_PM,
    PCI_EXT_CAP_ID_ACS,
    BarKind,
    PciDev,
    PciTopology,
    ResetMethod,
)
from fakedev.kernel.version import NEWEST, KernelVersion
from fakedev.tree import DeviceTree, default_tree_path, load_tree
from fakedev.tree.loader import FIXTURES

FIXTURE_NAMES = [
    "dual-function-nic",
    "shared-group",
    "host-driver-sibling",
    "flr-device",
    "root-bus",
    "hotplug-slot",
    "large",
]


def load(name: str) -> DeviceTree:
    return load_tree(FIXTURES / f"{name}.toml")


def dev(tree: DeviceTree, name: str) -> PciDev:
    d = tree.topology.find(name)
    assert d is not None, name
    return d


def dev_set(topology: PciTopology, d: PciDev) -> list[str]:
    """SPEC 4.5: root bus -> the device alone; resettable slot -> slot; else bus."""

    def key(x: PciDev) -> object:
        if x.bus.is_root:
            return x
        if x.slot is not None and x.slot.reset_capable:
            return x.slot
        return x.bus

    return [x.name for x in topology.devices() if x.driver == "vfio-pci" and key(x) is key(d)]


def methods(d: PciDev) -> list[str]:
    return [m.value for m in d.reset_methods()]


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_loads_and_opens_with_a_comment(name: str) -> None:
    path = FIXTURES / f"{name}.toml"
    text = path.read_text()
    assert text.startswith("# "), "a fixture opens with a comment on what it models"
    assert "Hot reset" in text.split("[[function]]")[0]
    tree = load_tree(path)
    assert tree.source == path
    assert tree.version == NEWEST
    for d in tree.topology.devices():
        assert d.cfg_size in (256, 4096)
        assert d.vendor not in (0, 0xFFFF)


def test_default_tree_is_the_dual_function_nic() -> None:
    assert default_tree_path() == FIXTURES / "dual-function-nic.toml"
    assert default_tree_path().is_file()


def test_dual_function_nic() -> None:
    t = load("dual-function-nic")
    names = [d.name for d in t.topology.devices()]
    assert names == ["0000:00:1c.0", "0000:01:00.0", "0000:01:00.1"]
    rp = dev(t, "0000:00:1c.0")
    assert rp.subordinate is not None and rp.subordinate.number == 1
    assert rp.bus.is_root and rp.driver == "pcieport" and rp.iommu_group not in (13, 14)
    assert rp.cfg_read(0x18, 1) == 0 and rp.cfg_read(0x19, 1) == 1 and rp.cfg_read(0x1A, 1) == 1
    assert rp.subordinate.slots == []  # no hot-plug slot
    for name, group in (("0000:01:00.0", 13), ("0000:01:00.1", 14)):
        d = dev(t, name)
        assert d.driver == "vfio-pci"
        assert d.iommu_group == group
        assert d.class_code == 0x020000
        assert d.vendor == 0x8086 and d.device == 0x10C9
        assert d.multifunction
        assert d.interrupt_pin == 1
        assert d.cfg_size == 4096
        assert not d.has_flr and not d.has_af_flr and not d.has_pm_reset
        assert methods(d) == ["bus"]
        assert d.slot is None
        assert d.pcie_type == 0
        for cap in (PCI_CAP_ID_PM, PCI_CAP_ID_MSI, PCI_CAP_ID_MSIX, PCI_CAP_ID_EXP):
            assert d.find_capability(cap)
        assert d.find_ext_capability(PCI_EXT_CAP_ID_ACS) == 0x100
        kinds = {b.index: b.kind for b in d.bars}
        assert kinds == {0: BarKind.MEM32, 2: BarKind.MEM64}
        assert dev_set(t.topology, d) == ["0000:01:00.0", "0000:01:00.1"]
    assert vfio_index_for(t.topology) == {"0000:01:00.0": 0, "0000:01:00.1": 1}


def test_shared_group() -> None:
    t = load("shared-group")
    a, b = dev(t, "0000:01:00.0"), dev(t, "0000:01:00.1")
    assert a.iommu_group == b.iommu_group == 13
    assert a.find_ext_capability(PCI_EXT_CAP_ID_ACS) == 0
    assert b.find_ext_capability(PCI_EXT_CAP_ID_ACS) == 0
    assert a.driver == b.driver == "vfio-pci"
    assert methods(a) == methods(b) == ["bus"]
    assert dev_set(t.topology, a) == ["0000:01:00.0", "0000:01:00.1"]
    assert vfio_index_for(t.topology) == {"0000:01:00.0": 0, "0000:01:00.1": 1}


def test_host_driver_sibling() -> None:
    t = load("host-driver-sibling")
    a, b = dev(t, "0000:01:00.0"), dev(t, "0000:01:00.1")
    assert a.driver == "vfio-pci" and b.driver == "igb"
    assert (a.iommu_group, b.iommu_group) == (13, 14)
    assert vfio_index_for(t.topology) == {"0000:01:00.0": 0}
    assert dev_set(t.topology, a) == ["0000:01:00.0"]
    # the bus holds a device outside the dev_set: a hot reset cannot be allowed
    assert [d.name for d in a.bus.devices] == ["0000:01:00.0", "0000:01:00.1"]


def test_flr_device() -> None:
    t = load("flr-device")
    rp = dev(t, "0000:00:1d.0")
    assert rp.subordinate is not None and rp.subordinate.number == 2
    d = dev(t, "0000:02:00.0")
    assert d.has_flr and not d.multifunction
    assert methods(d) == ["flr", "bus"]
    assert d.iommu_group == 20 and d.driver == "vfio-pci"
    assert dev_set(t.topology, d) == ["0000:02:00.0"]
    assert vfio_index_for(t.topology) == {"0000:02:00.0": 0}
    assert d.rom_size == 0x10000


def test_root_bus() -> None:
    t = load("root-bus")
    d = dev(t, "0000:00:02.0")
    assert d.bus.is_root and d.parent_bridge is None and d.slot is None
    assert not d.bus.probe_reset_bus()
    assert ResetMethod.BUS not in d.reset_methods()
    assert methods(d) == ["pm"]
    assert d.pcie_type == 9  # root-complex integrated endpoint
    assert d.iommu_group == 1
    assert dev_set(t.topology, d) == ["0000:00:02.0"]
    assert vfio_index_for(t.topology) == {"0000:00:02.0": 0}


def test_hotplug_slot() -> None:
    t = load("hotplug-slot")
    port = dev(t, "0000:00:1e.0")
    assert port.pcie_type == 6  # downstream port
    assert port.subordinate is not None and port.subordinate.number == 5
    pos = port.find_capability(PCI_CAP_ID_EXP)
    sltcap = port.cfg_read(pos + 0x14, 4)
    assert sltcap & 0x40 and sltcap >> 19 == 5
    a, b = dev(t, "0000:05:00.0"), dev(t, "0000:05:00.1")
    assert a.slot is not None and a.slot is b.slot and a.slot.reset_capable
    assert (a.iommu_group, b.iommu_group) == (30, 31)
    assert dev_set(t.topology, a) == ["0000:05:00.0", "0000:05:00.1"]
    assert vfio_index_for(t.topology) == {"0000:05:00.0": 0, "0000:05:00.1": 1}
    assert methods(a) == ["bus"]


def test_large() -> None:
    t = load("large")
    idx = vfio_index_for(t.topology)
    assert len(idx) >= 256
    assert len(list(t.topology.buses())) > 64
    groups = [d.iommu_group for d in t.topology.devices()]
    assert len(set(groups)) == len(groups)  # ACS everywhere: derived groups are singletons
    slotted = [d for d in t.topology.devices() if d.slot is not None]
    assert slotted and all(d.slot is not None and d.slot.reset_capable for d in slotted)
    d = next(iter(slotted))
    assert len(dev_set(t.topology, d)) == 4


def test_large_fixture_is_what_the_generator_writes() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "gen_large", Path(__file__).resolve().parents[2] / "benchmarks" / "gen_large.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert (FIXTURES / "large.toml").read_text() == mod.generate()


def test_kernel_version_from_tree(tmp_path: Path) -> None:
    text = (FIXTURES / "flr-device.toml").read_text()
    p = tmp_path / "t.toml"
    p.write_text('kernel = "6.12"\n' + text)
    assert load_tree(p).version == KernelVersion.parse("6.12")
    p.write_text('kernel = "6.6"\n' + text)
    assert load_tree(p).version == KernelVersion(6, 6)


def test_make_kernel_builds_a_kernel_over_the_topology() -> None:
    pytest.importorskip("fakedev.kernel.kernel")
    t = load("dual-function-nic")
    k = t.make_kernel()
    assert sorted(v.index for v in k.vfio_devices()) == [0, 1]
    assert {v.pdev.name: v.index for v in k.vfio_devices()} == vfio_index_for(t.topology)


def test_documented_example_loads(tmp_path: Path) -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "device-tree.md").read_text()
    block = doc.split("## Example\n")[1].split("\n## ")[0]
    text = "\n".join(ln[4:] for ln in block.splitlines() if ln.startswith("    "))
    p = tmp_path / "example.toml"
    p.write_text(text)
    t = load_tree(p)
    d = t.topology.find("0000:01:00.0")
    assert d is not None and d.has_flr and d.iommu_group == 13
    assert [m.value for m in d.reset_methods()] == ["flr", "bus"]


def test_derived_groups_follow_acs(tmp_path: Path) -> None:
    text = (FIXTURES / "shared-group.toml").read_text().replace("iommu_group = 13\n", "")
    p = tmp_path / "derived.toml"
    p.write_text(text)
    t = load_tree(p)
    a, b = dev(t, "0000:01:00.0"), dev(t, "0000:01:00.1")
    assert a.iommu_group == b.iommu_group  # no ACS: the functions share
    assert a.iommu_group not in (None, 12)
    p.write_text((FIXTURES / "dual-function-nic.toml").read_text().replace("iommu_group = 1", "#"))
    t = load_tree(p)
    groups = [d.iommu_group for d in t.topology.devices()]
    assert len(set(groups)) == 3  # ACS on the port and both functions: one group each
    # a root port without ACS pulls everything below it into its group
    p.write_text(
        (FIXTURES / "dual-function-nic.toml")
        .read_text()
        .replace("iommu_group = 1", "#")
        .replace("capabilities.acs = true", "")
    )
    t = load_tree(p)
    assert len({d.iommu_group for d in t.topology.devices()}) == 1


def test_check_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fakedev.tree.__main__ import main

    assert main([str(FIXTURES / "hotplug-slot.toml")]) == 0
    out = capsys.readouterr().out
    assert "0000:05:00.1 1b36:00ff function driver=vfio-pci group=31" in out
    assert "hot-reset=slot vfio1" in out
    bad = tmp_path / "bad.toml"
    bad.write_text('[[function]]\nbdf = "00:02.0"\nvendor = 1\n')
    assert main([str(bad)]) == 1
    assert f"{bad}:1: function[0] (0000:00:02.0): missing required field 'device'" in (
        capsys.readouterr().err
    )


def test_hotplug_slot_without_slot_reset(tmp_path: Path) -> None:
    p = tmp_path / "noreset.toml"
    p.write_text(
        (FIXTURES / "hotplug-slot.toml")
        .read_text()
        .replace("hotplug = true, reset = true", "hotplug = true, reset = false")
    )
    t = load_tree(p)
    a = dev(t, "0000:05:00.0")
    assert a.slot is not None and not a.slot.reset_capable
    assert methods(a) == ["bus"]  # the bridge above can still reset the bus
    assert dev_set(t.topology, a) == ["0000:05:00.0", "0000:05:00.1"]  # keyed by bus 05


def test_bridge_from_config_file_gets_the_tree_bus_numbers(tmp_path: Path) -> None:
    t = load("dual-function-nic")
    rp = dev(t, "0000:00:1c.0")
    cfg = bytearray(rp.config)
    cfg[0x18], cfg[0x19], cfg[0x1A] = 0, 0x3A, 0x3A  # as dumped on another machine
    (tmp_path / "rp.bin").write_bytes(bytes(cfg))
    text = (FIXTURES / "dual-function-nic.toml").read_text()
    head, rest = text.split("[[function]]", 1)
    rest = rest.split("[[function]]", 1)[1]
    p = tmp_path / "t.toml"
    p.write_text(
        head
        + '[[function]]\nbdf = "0000:00:1c.0"\nconfig_file = "rp.bin"\nsecondary_bus = 1\n'
        + "iommu_group = 12\n\n[[function]]"
        + rest
    )
    t2 = load_tree(p)
    rp2 = dev(t2, "0000:00:1c.0")
    assert rp2.pcie_type == 4 and rp2.driver == "pcieport"
    assert (rp2.cfg_read(0x18, 1), rp2.cfg_read(0x19, 1), rp2.cfg_read(0x1A, 1)) == (0, 1, 1)
    assert [d.name for d in t2.topology.devices()] == [
        "0000:00:1c.0",
        "0000:01:00.0",
        "0000:01:00.1",
    ]
