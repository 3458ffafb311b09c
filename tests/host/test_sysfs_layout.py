"""The generated sysfs: paths, file formats and relative links as the kernel makes them."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from fakedev.host.sysfs import (
    RESOURCE_LINES_BRIDGE,
    RESOURCE_LINES_TYPE0,
    device_path,
    generate_sysfs,
    modalias,
    rel_link,
    vfio_index_for,
)
from fakedev.kernel.file import DevNode
from fakedev.kernel.pci import PciTopology
from fakedev.tree import load_tree
from fakedev.tree.loader import FIXTURES

VFIO_DEV_MAJOR = 509
VFIO_GROUP_MAJOR = 510


def nodes_for(topology: PciTopology) -> list[DevNode]:
    out = [DevNode("vfio/vfio", 10, 196, 0o666), DevNode("iommu", 10, 124, 0o660)]
    groups = sorted(
        {
            d.iommu_group
            for d in topology.devices()
            if d.driver == "vfio-pci" and d.iommu_group is not None
        }
    )
    out += [DevNode(f"vfio/{g}", VFIO_GROUP_MAJOR, i, 0o600) for i, g in enumerate(groups)]
    for name, n in vfio_index_for(topology).items():
        del name
        out.append(DevNode(f"vfio/devices/vfio{n}", VFIO_DEV_MAJOR, n, 0o600))
    return out


def make(tmp_path: Path, fixture: str) -> tuple[Path, PciTopology]:
    t = load_tree(FIXTURES / f"{fixture}.toml")
    generate_sysfs(tmp_path, t.topology, nodes_for(t.topology), vfio_index_for(t.topology))
    return tmp_path / "sys", t.topology


@pytest.fixture
def nic(tmp_path: Path) -> tuple[Path, PciTopology]:
    return make(tmp_path, "dual-function-nic")


def test_device_dirs_nest_under_bridges(nic: tuple[Path, PciTopology]) -> None:
    sys, _ = nic
    assert (sys / "devices/pci0000:00/0000:00:1c.0").is_dir()
    real = sys / "devices/pci0000:00/0000:00:1c.0/0000:01:00.1"
    assert real.is_dir() and not real.is_symlink()
    link = sys / "bus/pci/devices/0000:01:00.1"
    assert os.readlink(link) == "../../../devices/pci0000:00/0000:00:1c.0/0000:01:00.1"
    assert link.resolve() == real.resolve()
    assert (
        os.readlink(sys / "bus/pci/devices/0000:00:1c.0")
        == "../../../devices/pci0000:00/0000:00:1c.0"
    )


def test_identity_files(nic: tuple[Path, PciTopology]) -> None:
    sys, topo = nic
    d = sys / "bus/pci/devices/0000:01:00.1"
    assert (d / "vendor").read_text() == "0x8086\n"
    assert (d / "device").read_text() == "0x10c9\n"
    assert (d / "subsystem_vendor").read_text() == "0x8086\n"
    assert (d / "subsystem_device").read_text() == "0xa03c\n"
    assert (d / "class").read_text() == "0x020000\n"
    assert (d / "revision").read_text() == "0x01\n"
    assert (d / "irq").read_text().strip().isdigit()
    assert (d / "modalias").read_text() == "pci:v00008086d000010C9sv00008086sd0000A03Cbc02sc00i00\n"
    uevent = (d / "uevent").read_text()
    assert "DRIVER=vfio-pci\n" in uevent and "PCI_SLOT_NAME=0000:01:00.1\n" in uevent
    assert "PCI_ID=8086:10C9\n" in uevent and "PCI_CLASS=20000\n" in uevent
    pdev = topo.find("0000:01:00.1")
    assert pdev is not None
    assert (d / "config").read_bytes() == bytes(pdev.config)
    assert len((d / "config").read_bytes()) == 4096


def test_resource_file(nic: tuple[Path, PciTopology]) -> None:
    sys, topo = nic
    lines = (sys / "bus/pci/devices/0000:01:00.0/resource").read_text().splitlines()
    assert len(lines) == RESOURCE_LINES_TYPE0 == 13
    pdev = topo.find("0000:01:00.0")
    assert pdev is not None
    bars = {b.index: b for b in pdev.bars}
    for i, line in enumerate(lines):
        start, end, flags = (int(x, 16) for x in line.split())
        assert all(len(x) == 18 for x in line.split())
        if i in bars:
            assert (start, end) == (bars[i].address, bars[i].address + bars[i].size - 1)
            assert flags & 0x200  # IORESOURCE_MEM
        else:
            assert (start, end, flags) == (0, 0, 0)
    assert int(lines[2].split()[2], 16) & 0x100000  # IORESOURCE_MEM_64
    assert int(lines[2].split()[2], 16) & 0xF == 0x4  # BAR flag bits as pciutils reads them
    bridge = (sys / "bus/pci/devices/0000:00:1c.0/resource").read_text().splitlines()
    assert len(bridge) == RESOURCE_LINES_BRIDGE == 17
    mem_window = bridge[14].split()
    assert int(mem_window[0], 16) <= bars[0].address <= int(mem_window[1], 16)


def test_driver_links(nic: tuple[Path, PciTopology]) -> None:
    sys, _ = nic
    d = sys / "devices/pci0000:00/0000:00:1c.0/0000:01:00.0"
    assert os.readlink(d / "driver") == "../../../../bus/pci/drivers/vfio-pci"
    assert (d / "driver").resolve() == (sys / "bus/pci/drivers/vfio-pci").resolve()
    rp = sys / "devices/pci0000:00/0000:00:1c.0"
    assert os.readlink(rp / "driver") == "../../../bus/pci/drivers/pcieport"
    back = sys / "bus/pci/drivers/vfio-pci/0000:01:00.0"
    assert os.readlink(back) == "../../../../devices/pci0000:00/0000:00:1c.0/0000:01:00.0"
    assert back.resolve() == d.resolve()
    assert sorted(
        p.name for p in (sys / "bus/pci/drivers/vfio-pci").iterdir() if p.is_symlink()
    ) == [
        "0000:01:00.0",
        "0000:01:00.1",
    ]
    assert (sys / "bus/pci/drivers/vfio-pci/bind").exists()
    assert os.readlink(d / "subsystem") == "../../../../bus/pci"


def test_iommu_group_links(nic: tuple[Path, PciTopology]) -> None:
    sys, _ = nic
    d = sys / "devices/pci0000:00/0000:00:1c.0/0000:01:00.1"
    assert os.readlink(d / "iommu_group") == "../../../../kernel/iommu_groups/14"
    assert os.path.basename(os.readlink(sys / "bus/pci/devices/0000:01:00.1/iommu_group")) == "14"
    g = sys / "kernel/iommu_groups/14"
    assert (d / "iommu_group").resolve() == g.resolve()
    link = g / "devices/0000:01:00.1"
    assert os.readlink(link) == "../../../../devices/pci0000:00/0000:00:1c.0/0000:01:00.1"
    assert link.resolve() == d.resolve()
    assert [p.name for p in (sys / "kernel/iommu_groups/13/devices").iterdir()] == ["0000:01:00.0"]
    assert (g / "type").read_text() == "DMA\n"
    for line in (g / "reserved_regions").read_text().splitlines():
        start, end, kind = line.split()
        assert len(start) == len(end) == 18 and kind


def test_root_bus_link_depth(tmp_path: Path) -> None:
    sys, _ = make(tmp_path, "root-bus")
    d = sys / "devices/pci0000:00/0000:00:02.0"
    assert os.readlink(d / "iommu_group") == "../../../kernel/iommu_groups/1"
    assert os.readlink(d / "driver") == "../../../bus/pci/drivers/vfio-pci"
    assert (d / "reset_method").read_text() == "pm\n"


def test_vfio_dev_and_class_links(nic: tuple[Path, PciTopology]) -> None:
    sys, _ = nic
    d = sys / "bus/pci/devices/0000:01:00.1"
    entries = [p.name for p in (d / "vfio-dev").iterdir()]
    assert entries == ["vfio1"]
    assert (d / "vfio-dev/vfio1/dev").read_text() == f"{VFIO_DEV_MAJOR}:1\n"
    assert "DEVNAME=vfio/devices/vfio1\n" in (d / "vfio-dev/vfio1/uevent").read_text()
    cls = sys / "class/vfio-dev/vfio1"
    assert os.readlink(cls) == "../../devices/pci0000:00/0000:00:1c.0/0000:01:00.1/vfio-dev/vfio1"
    assert cls.resolve() == (d / "vfio-dev/vfio1").resolve()
    assert os.readlink(d / "vfio-dev/vfio1/subsystem").endswith("class/vfio-dev")
    assert (d / "vfio-dev/vfio1/subsystem").resolve() == (sys / "class/vfio-dev").resolve()
    assert (d / "vfio-dev/vfio1/device").resolve() == d.resolve()
    assert (sys / "class/vfio/14/dev").read_text() == f"{VFIO_GROUP_MAJOR}:1\n"
    assert (sys / "class/vfio/13/dev").read_text() == f"{VFIO_GROUP_MAJOR}:0\n"
    assert (sys / "class/misc/vfio/dev").read_text() == "10:196\n"
    assert (sys / "class/misc/iommu/dev").read_text() == "10:124\n"
    # the root port is no vfio device
    assert not (sys / "bus/pci/devices/0000:00:1c.0/vfio-dev").exists()


def test_reset_method(nic: tuple[Path, PciTopology], tmp_path: Path) -> None:
    sys, _ = nic
    assert (sys / "bus/pci/devices/0000:01:00.0/reset_method").read_text() == "bus\n"
    flr, _ = make(tmp_path / "flr", "flr-device")
    assert (flr / "bus/pci/devices/0000:02:00.0/reset_method").read_text() == "flr bus\n"
    text = (
        (FIXTURES / "root-bus.toml")
        .read_text()
        .replace("iommu_group = 1\n", "iommu_group = 1\nreset_methods = []\n")
    )
    p = tmp_path / "nr.toml"
    p.write_text(text)
    t = load_tree(p)
    generate_sysfs(tmp_path / "nr", t.topology, [], vfio_index_for(t.topology))
    d = tmp_path / "nr/sys/bus/pci/devices/0000:00:02.0"
    assert d.is_dir() and not (d / "reset_method").exists() and not (d / "reset").exists()


def test_host_driver_sibling_has_one_vfio_dev(tmp_path: Path) -> None:
    sys, _ = make(tmp_path, "host-driver-sibling")
    assert [p.name for p in (sys / "class/vfio-dev").iterdir()] == ["vfio0"]
    assert os.readlink(sys / "bus/pci/devices/0000:01:00.1/driver").endswith("/drivers/igb")
    assert (sys / "bus/pci/drivers/igb/0000:01:00.1").resolve().name == "0000:01:00.1"
    assert not (sys / "bus/pci/devices/0000:01:00.1/vfio-dev").exists()
    assert (sys / "bus/pci/devices/0000:01:00.1/enable").read_text() == "1\n"


def test_slots_and_link_attributes(tmp_path: Path) -> None:
    sys, _ = make(tmp_path, "hotplug-slot")
    assert (sys / "bus/pci/slots/5/address").read_text() == "0000:05:00\n"
    d = sys / "bus/pci/devices/0000:05:00.0"
    assert (d / "current_link_speed").read_text().endswith("GT/s PCIe\n")
    assert (d / "max_link_width").read_text().strip().isdigit()
    port = sys / "bus/pci/devices/0000:00:1e.0"
    assert (port / "secondary_bus_number").read_text() == "5\n"
    assert (port / "subordinate_bus_number").read_text() == "5\n"


def test_deep_topology_links_resolve(tmp_path: Path) -> None:
    # a tmpfs when there is one: thousands of small files are slow on some disks
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=shm) as tmp:
        check_deep_topology(Path(tmp))


def check_deep_topology(tmp_path: Path) -> None:
    sys, topo = make(tmp_path, "large")
    for dev in topo.devices():
        link = sys / "bus/pci/devices" / dev.name
        real = sys / device_path(dev)
        assert link.resolve() == real.resolve()
        if dev.iommu_group is not None:
            depth = device_path(dev).count("/") + 1
            assert (
                os.readlink(real / "iommu_group")
                == "../" * depth + f"kernel/iommu_groups/{dev.iommu_group}"
            )
            assert (real / "iommu_group").resolve() == (
                sys / f"kernel/iommu_groups/{dev.iommu_group}"
            ).resolve()
    assert len(list((sys / "class/vfio-dev").iterdir())) == len(vfio_index_for(topo))


def test_regenerating_over_an_existing_tree(nic: tuple[Path, PciTopology]) -> None:
    sys, topo = nic
    generate_sysfs(sys.parent, topo, nodes_for(topo), vfio_index_for(topo))
    assert os.readlink(sys / "bus/pci/devices/0000:01:00.0").startswith("../../../devices/")


def test_helpers() -> None:
    assert rel_link("devices/pci0000:00/0000:00:1c.0", "bus/pci") == "../../../bus/pci"
    t = load_tree(FIXTURES / "dual-function-nic.toml")
    d = t.topology.find("0000:01:00.0")
    assert d is not None
    assert device_path(d) == "devices/pci0000:00/0000:00:1c.0/0000:01:00.0"
    assert modalias(d).startswith("pci:v00008086d000010C9")


def test_module_parameters(nic: tuple[Path, PciTopology]) -> None:
    sys, _ = nic
    assert (sys / "module/vfio/parameters/enable_unsafe_noiommu_mode").read_text() == "N\n"
    assert (sys / "module/vfio_iommu_type1/parameters/dma_entry_limit").read_text() == "65535\n"
    assert (sys / "module/iommufd/parameters/allow_unsafe_interrupts").read_text() == "N\n"


def test_function_without_group_gets_no_vfio_device(tmp_path: Path) -> None:
    text = (FIXTURES / "dual-function-nic.toml").read_text()
    text = text.replace("iommu_group = 13", 'iommu_group = "none"')
    p = tmp_path / "nogroup.toml"
    p.write_text(text)
    t = load_tree(p)
    assert vfio_index_for(t.topology) == {"0000:01:00.1": 0}
    generate_sysfs(tmp_path, t.topology, [], vfio_index_for(t.topology))
    d = tmp_path / "sys/bus/pci/devices/0000:01:00.0"
    assert not (d / "iommu_group").exists() and not (d / "vfio-dev").exists()


@pytest.mark.parametrize(
    "fixture", ["dual-function-nic", "shared-group", "host-driver-sibling", "hotplug-slot"]
)
def test_sysfs_from_the_kernel_model(tmp_path: Path, fixture: str) -> None:
    pytest.importorskip("fakedev.kernel.kernel")
    t = load_tree(FIXTURES / f"{fixture}.toml")
    k = t.make_kernel()
    index = {v.pdev.name: v.index for v in k.vfio_devices()}
    assert index == vfio_index_for(t.topology)
    nodes = k.nodes()
    generate_sysfs(tmp_path, t.topology, nodes, index)
    sys = tmp_path / "sys"
    by_path = {n.path: n for n in nodes}
    for name, n in index.items():
        node = by_path[f"vfio/devices/vfio{n}"]
        dev_file = sys / "bus/pci/devices" / name / "vfio-dev" / f"vfio{n}" / "dev"
        assert dev_file.read_text() == f"{node.major}:{node.minor}\n"
    for path, node in by_path.items():
        rest = path.removeprefix("vfio/")
        if rest.isdigit():
            assert (sys / "class/vfio" / rest / "dev").read_text() == f"{node.major}:{node.minor}\n"


MULTI = """
root_buses = ["0000:00", "0000:80", "0001:00"]

[[function]]
bdf = "0000:80:01.0"
kind = "root-port"
vendor = 0x8086
device = 0xa110
secondary_bus = 0x81
capabilities.acs = true

[[function]]
bdf = "0000:81:00.0"
vendor = 0x1b36
device = 0x00ff
capabilities.pcie = {}
capabilities.acs = true

[[function]]
bdf = "0001:00:02.0"
kind = "integrated-endpoint"
vendor = 0x1b36
device = 0x00ff
"""


def test_several_host_bridges_and_domains(tmp_path: Path) -> None:
    p = tmp_path / "multi.toml"
    p.write_text(MULTI)
    t = load_tree(p)
    assert [(b.domain, b.number) for b in t.topology.root_buses] == [(0, 0), (0, 0x80), (1, 0)]
    assert vfio_index_for(t.topology) == {"0000:81:00.0": 0, "0001:00:02.0": 1}
    groups = [d.iommu_group for d in t.topology.devices()]
    assert len(set(groups)) == 3  # derived: ACS isolates everything
    generate_sysfs(tmp_path, t.topology, [], vfio_index_for(t.topology))
    sys = tmp_path / "sys"
    assert os.readlink(sys / "bus/pci/devices/0000:81:00.0") == (
        "../../../devices/pci0000:80/0000:80:01.0/0000:81:00.0"
    )
    assert (
        os.readlink(sys / "bus/pci/devices/0001:00:02.0")
        == "../../../devices/pci0001:00/0001:00:02.0"
    )
    assert (sys / "devices/pci0000:00").is_dir()
