"""The generated sysfs: a directory tree that mirrors /sys for a PCI topology.

What lives here: ``generate_sysfs`` writes ``<root>/sys/...`` with the paths,
file formats and relative symlinks the kernel's sysfs shows for the tree's
functions (pci-sysfs.c, iommu.c, the vfio classes), so that lspci (pointed at
``<root>/sys/bus/pci``, or with the tree bind-mounted over /sys in a private
mount namespace) and VMMs find devices the way they do on a real host.
``vfio_index_for`` gives the vfioN numbering when no kernel model is at hand.

When functions go away (a hot removal), ``sysfs_view`` and ``remove_vanished``
take out what ``generate_sysfs`` wrote for them: the device directory, its
``/sys/bus/pci/devices`` and driver links, its ``class/vfio-dev`` entry and
iommu group link, and the vfio / iommu group entries left without members.
When a function changes driver, ``update_sysfs`` also writes what appeared:
its ``driver`` link and ``bus/pci/drivers/<drv>/<BDF>``, ``uevent``,
``vfio-dev/vfioN`` with ``class/vfio-dev/vfioN``, a new vfio group's entries.

The writable attribute files (``driver_override``, ``bind``, ``unbind``,
``drivers_probe``, ``new_id``, ``remove_id``, ``reset``, ``remove``) are
listed by ``writable_attributes``: the FUSE server serves each at
``.fakedev/sysfs/<path>`` of its mount, and ``fakedev run`` bind-mounts those
over the snapshot's files, so a write reaches the model.

What must not: no mounting (the namespace code bind-mounts ``<root>/sys/...``
over the real paths, so changes made here show through), no kernel state: the
files are a snapshot of the model, written by host code when it changes.
Symlinks are relative and never point outside ``<root>/sys``, so the tree is
correct both where it is written and bind-mounted at /sys.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from attrs import define, field

from fakedev.kernel.file import DevNode
from fakedev.kernel.pci import (
    PCI_CAP_ID_EXP,
    PCI_EXP_TYPE_RC_END,
    PCI_SRIOV_VF_DID,
    PCI_SRIOV_VF_OFFSET,
    PCI_SRIOV_VF_STRIDE,
    BarKind,
    PciDev,
    PciTopology,
)

VFIO_PCI = "vfio-pci"

# include/linux/ioport.h resource flags
IORESOURCE_IO = 0x00000100
IORESOURCE_MEM = 0x00000200
IORESOURCE_PREFETCH = 0x00002000
IORESOURCE_READONLY = 0x00004000
IORESOURCE_SIZEALIGN = 0x00040000
IORESOURCE_MEM_64 = 0x00100000

#: lines in ``resource``: PCI_BRIDGE_RESOURCES (6 BARs, ROM, 6 IOV) for a type 0
#: function, PCI_NUM_RESOURCES (plus 4 bridge windows) for a bridge
RESOURCE_LINES_TYPE0 = 13
RESOURCE_LINES_BRIDGE = 17

_LINK_SPEEDS = {
    1: "2.5 GT/s PCIe",
    2: "5.0 GT/s PCIe",
    3: "8.0 GT/s PCIe",
    4: "16.0 GT/s PCIe",
    5: "32.0 GT/s PCIe",
}


#: /sys/module/<module>/parameters/<name> files VFIO users read (SPEC 5.4), at their defaults
MODULE_PARAMETERS = {
    "vfio/parameters/enable_unsafe_noiommu_mode": "N\n",
    "vfio_iommu_type1/parameters/allow_unsafe_interrupts": "N\n",
    "vfio_iommu_type1/parameters/dma_entry_limit": "65535\n",
    "iommufd/parameters/allow_unsafe_interrupts": "N\n",
    "vfio_pci/parameters/disable_idle_d3": "N\n",
    "vfio_pci/parameters/disable_vga": "N\n",
    "vfio_pci/parameters/disable_denylist": "N\n",
    "vfio_pci/parameters/enable_sriov": "N\n",
    "vfio_pci/parameters/nointxmask": "N\n",
}


def vfio_index_for(topology: PciTopology) -> dict[str, int]:
    """vfioN of each vfio-pci function: probe (topology walk) order, from 0.

    A function without an iommu group gets no vfio device (vfio_pci_probe
    fails without a group unless noiommu mode is on; then the kernel model
    gives it a group at probe: use the kernel's own indexes).
    """
    out: dict[str, int] = {}
    for dev in topology.devices():
        if dev.driver == VFIO_PCI and dev.iommu_group is not None:
            out[dev.name] = len(out)
    return out


def device_path(dev: PciDev) -> str:
    """``devices/pci0000:00/0000:00:1c.0/0000:01:00.0`` (relative to /sys)."""
    parts = [dev.name]
    bridge = dev.bus.self_bridge
    bus = dev.bus
    while bridge is not None:
        parts.append(bridge.name)
        bus = bridge.bus
        bridge = bus.self_bridge
    parts.append(f"pci{bus.domain:04x}:{bus.number:02x}")
    parts.append("devices")
    return "/".join(reversed(parts))


def rel_link(from_dir: str, target: str) -> str:
    """Relative symlink text for a link in ``from_dir`` (both relative to /sys)."""
    depth = len(from_dir.split("/")) if from_dir else 0
    return "../" * depth + target


def resource_lines(dev: PciDev) -> list[str]:
    """The ``resource`` file: "start end flags" per resource (resource_show())."""
    rows: list[tuple[int, int, int]] = []
    bars = {b.index: b for b in dev.bars}
    nbars = 2 if dev.header_type == 1 else 6
    for i in range(6):
        b = bars.get(i)
        if b is None or b.size == 0 or i >= nbars:
            rows.append((0, 0, 0))
            continue
        if b.kind is BarKind.IO:
            flags = IORESOURCE_IO | IORESOURCE_SIZEALIGN | 0x1
        else:
            flags = IORESOURCE_MEM | IORESOURCE_SIZEALIGN
            if b.kind is BarKind.MEM64:
                flags |= IORESOURCE_MEM_64 | 0x4
            if b.prefetchable:
                flags |= IORESOURCE_PREFETCH | 0x8
        rows.append((b.address, b.address + b.size - 1, flags))
    if dev.rom_size:
        reg = 0x38 if dev.header_type == 1 else 0x30
        addr = dev.cfg_read(reg, 4) & 0xFFFFF800
        flags = IORESOURCE_MEM | IORESOURCE_PREFETCH | IORESOURCE_READONLY | IORESOURCE_SIZEALIGN
        rows.append((addr, addr + dev.rom_size - 1, flags))
    else:
        rows.append((0, 0, 0))
    rows.extend([(0, 0, 0)] * 6)  # SR-IOV BARs
    if dev.header_type == 1:
        rows.extend(_bridge_windows(dev))
    return [f"0x{s:016x} 0x{e:016x} 0x{f:016x}" for s, e, f in rows]


def _bridge_windows(dev: PciDev) -> list[tuple[int, int, int]]:
    c = dev.cfg_read
    out: list[tuple[int, int, int]] = []
    io_base = ((c(0x1C, 1) & 0xF0) << 8) | (c(0x30, 2) << 16)
    io_limit = ((c(0x1D, 1) & 0xF0) << 8) | (c(0x32, 2) << 16) | 0xFFF
    out.append((io_base, io_limit, IORESOURCE_IO) if io_base <= io_limit else (0, 0, 0))
    mem_base = (c(0x20, 2) & 0xFFF0) << 16
    mem_limit = ((c(0x22, 2) & 0xFFF0) << 16) | 0xFFFFF
    out.append((mem_base, mem_limit, IORESOURCE_MEM) if mem_base <= mem_limit else (0, 0, 0))
    pbase = ((c(0x24, 2) & 0xFFF0) << 16) | (c(0x28, 4) << 32)
    plimit = ((c(0x26, 2) & 0xFFF0) << 16) | (c(0x2C, 4) << 32) | 0xFFFFF
    flags = IORESOURCE_MEM | IORESOURCE_PREFETCH | IORESOURCE_MEM_64
    out.append((pbase, plimit, flags) if pbase <= plimit else (0, 0, 0))
    out.append((0, 0, 0))
    return out


def modalias(dev: PciDev) -> str:
    """``pci:v%08Xd%08Xsv%08Xsd%08Xbc%02Xsc%02Xi%02X`` (pci_uevent / modalias_show)."""
    sv, sd = _subsys(dev)
    cc = dev.class_code
    return (
        f"pci:v{dev.vendor:08X}d{dev.device:08X}sv{sv:08X}sd{sd:08X}"
        f"bc{cc >> 16:02X}sc{(cc >> 8) & 0xFF:02X}i{cc & 0xFF:02X}"
    )


def _subsys(dev: PciDev) -> tuple[int, int]:
    if dev.header_type == 0:
        return dev.cfg_read(0x2C, 2), dev.cfg_read(0x2E, 2)
    return 0, 0


def _node_by_path(nodes: Sequence[DevNode]) -> dict[str, DevNode]:
    return {n.path: n for n in nodes}


class _Writer:
    """Creates entries under ``<root>/sys``; remembers directories it made."""

    def __init__(self, root: Path) -> None:
        self.sys = os.path.join(os.fspath(root), "sys")
        self.made: set[str] = set()
        mask = os.umask(0)
        os.umask(mask)
        self.umask = mask

    def dir(self, rel: str) -> str:
        p = os.path.join(self.sys, rel)
        if p not in self.made:
            os.makedirs(p, exist_ok=True)
            self.made.add(p)
        return p

    def file(self, rel: str, content: str | bytes, mode: int = 0o444) -> None:
        parent, _, _ = rel.rpartition("/")
        self.dir(parent)
        p = os.path.join(self.sys, rel)
        data = content.encode() if isinstance(content, str) else content
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        except PermissionError:  # a read-only file from an earlier generation
            os.unlink(p)
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            os.write(fd, data)
            if mode & self.umask:
                os.fchmod(fd, mode)
        finally:
            os.close(fd)

    def link(self, rel: str, target_rel_to_sys: str) -> None:
        """Symlink at ``rel`` pointing (relatively) at ``target`` (both under /sys)."""
        parent, _, _ = rel.rpartition("/")
        self.dir(parent)
        p = os.path.join(self.sys, rel)
        text = rel_link(parent, target_rel_to_sys)
        try:
            os.symlink(text, p)
        except FileExistsError:
            os.unlink(p)
            os.symlink(text, p)


def generate_sysfs(
    root: Path,
    topology: PciTopology,
    nodes: Sequence[DevNode],
    vfio_index: Mapping[str, int],
    *,
    noiommu: bool = False,
    enable_sriov: bool = False,
) -> None:
    """Write ``root/sys`` for ``topology`` (see module doc).

    ``nodes`` gives the major:minor of the vfio-dev, vfio group and misc
    entries (a node not listed gets no ``dev`` file); ``vfio_index`` maps
    BDF -> N of vfioN. ``root`` may hold an earlier generation for the same
    tree (entries are overwritten); entries the new tree lacks are not removed.
    ``noiommu``: vfio's enable_unsafe_noiommu_mode (the module parameter's value).
    """
    w = _Writer(Path(root))
    by_path = _node_by_path(nodes)
    for d in ("bus/pci/devices", "bus/pci/drivers", "bus/pci/slots", "kernel/iommu_groups",
              "class/vfio", "class/vfio-dev", "class/misc", "devices/virtual/vfio"):  # fmt: skip
        w.dir(d)
    w.file("bus/pci/drivers_autoprobe", "1\n", 0o644)
    w.file("bus/pci/rescan", "", 0o200)
    w.file("bus/pci/drivers_probe", "", 0o200)
    w.file("bus/pci/uevent", "", 0o200)
    for rel, value in MODULE_PARAMETERS.items():
        if rel == "vfio/parameters/enable_unsafe_noiommu_mode" and noiommu:
            value = "Y\n"
        if rel == "vfio_pci/parameters/enable_sriov" and enable_sriov:
            value = "Y\n"
        w.file(f"module/{rel}", value, 0o644)
    groups: dict[int, list[PciDev]] = {}
    drivers: set[str] = set()
    for rb in topology.root_buses:
        host = f"devices/pci{rb.domain:04x}:{rb.number:02x}"
        w.dir(host)
        w.file(f"{host}/uevent", "", 0o644)
    for dev in topology.devices():
        _write_function(w, dev, by_path, vfio_index)
        if dev.iommu_group is not None:
            groups.setdefault(dev.iommu_group, []).append(dev)
        if dev.driver is not None:
            drivers.add(dev.driver)
    for name in sorted(drivers | {VFIO_PCI}):
        ddir = f"bus/pci/drivers/{name}"
        w.dir(ddir)
        for f in ("bind", "unbind", "new_id", "remove_id"):
            w.file(f"{ddir}/{f}", "", 0o200)
        w.file(f"{ddir}/uevent", "", 0o200)
    for dev in topology.devices():
        if dev.driver is not None:
            w.link(f"bus/pci/drivers/{dev.driver}/{dev.name}", device_path(dev))
    for gid, members in sorted(groups.items()):
        _write_iommu_group(w, gid, members, by_path)
    for path, name in (("vfio/vfio", "vfio"), ("iommu", "iommu")):
        node = by_path.get(path)
        if node is None:
            continue
        mdir = f"devices/virtual/misc/{name}"
        w.file(f"{mdir}/dev", f"{node.major}:{node.minor}\n")
        w.file(f"{mdir}/uevent", f"MAJOR={node.major}\nMINOR={node.minor}\nDEVNAME={path}\n", 0o644)
        w.link(f"{mdir}/subsystem", "class/misc")
        w.link(f"class/misc/{name}", mdir)
    _write_slots(w, topology)


def _vfio_group_node(by_path: Mapping[str, DevNode], gid: int) -> tuple[str, DevNode] | None:
    """The vfio group node of iommu group ``gid``: ``vfio/<gid>`` or, for a
    noiommu group, ``vfio/noiommu-<gid>``; (its name, the node) or None."""
    for name in (str(gid), f"noiommu-{gid}"):
        node = by_path.get(f"vfio/{name}")
        if node is not None:
            return name, node
    return None


def _write_iommu_group(w: _Writer, gid: int, members: Sequence[PciDev], by_path: Mapping[str, DevNode]) -> None:
    """``kernel/iommu_groups/<gid>`` and its vfio group. A noiommu group (made by
    vfio_noiommu_group_alloc) is named "vfio-noiommu", has no default domain
    (type "unknown") and no reserved regions (no IOMMU driver reports any)."""
    gdir = f"kernel/iommu_groups/{gid}"
    w.dir(f"{gdir}/devices")
    for dev in members:
        w.link(f"{gdir}/devices/{dev.name}", device_path(dev))
    vg = _vfio_group_node(by_path, gid)
    if vg is not None and vg[0].startswith("noiommu-"):
        w.file(f"{gdir}/name", "vfio-noiommu\n")
        w.file(f"{gdir}/reserved_regions", "")
        w.file(f"{gdir}/type", "unknown\n", 0o644)
    else:
        w.file(f"{gdir}/reserved_regions", "0x00000000fee00000 0x00000000feefffff msi\n")
        w.file(f"{gdir}/type", "DMA\n", 0o644)
    if vg is not None:
        _write_vfio_group(w, vg[0], vg[1])


def _write_vfio_group(w: _Writer, name: str, node: DevNode) -> None:
    """The vfio group's class device (``devices/virtual/vfio/<name>``, ``class/vfio/<name>``)."""
    vdir = f"devices/virtual/vfio/{name}"
    w.file(f"{vdir}/dev", f"{node.major}:{node.minor}\n")
    w.file(f"{vdir}/uevent", f"MAJOR={node.major}\nMINOR={node.minor}\nDEVNAME=vfio/{name}\n", 0o644)
    w.link(f"{vdir}/subsystem", "class/vfio")
    w.link(f"class/vfio/{name}", vdir)


def _uevent(dev: PciDev, driver: str | None) -> str:
    sv, sd = _subsys(dev)
    out = f"DRIVER={driver}\n" if driver is not None else ""
    return out + (
        f"PCI_CLASS={dev.class_code:X}\nPCI_ID={dev.vendor:04X}:{dev.device:04X}\n"
        f"PCI_SUBSYS_ID={sv:04X}:{sd:04X}\nPCI_SLOT_NAME={dev.name}\nMODALIAS={modalias(dev)}\n"
    )


def _write_vfio_dev(w: _Writer, dev: PciDev, index: int, by_path: Mapping[str, DevNode]) -> None:
    """``<dev>/vfio-dev/vfio<index>`` (the vfio_device's class glue) and its ``class/vfio-dev`` link."""
    d = device_path(dev)
    node = by_path.get(f"vfio/devices/vfio{index}")
    vdir = f"{d}/vfio-dev/vfio{index}"
    w.dir(vdir)
    if node is not None:
        w.file(f"{vdir}/dev", f"{node.major}:{node.minor}\n")
        w.file(
            f"{vdir}/uevent",
            f"MAJOR={node.major}\nMINOR={node.minor}\nDEVNAME=vfio/devices/vfio{index}\n",
            0o644,
        )
    w.link(f"{vdir}/subsystem", "class/vfio-dev")
    w.link(f"{vdir}/device", d)
    w.dir(f"{vdir}/power")
    w.link(f"class/vfio-dev/vfio{index}", vdir)


def _write_function(
    w: _Writer, dev: PciDev, by_path: Mapping[str, DevNode], vfio_index: Mapping[str, int]
) -> None:
    d = device_path(dev)
    w.dir(d)
    sv, sd = _subsys(dev)
    cc = dev.class_code
    text = {
        "vendor": f"0x{dev.vendor:04x}\n",
        "device": f"0x{dev.device:04x}\n",
        "subsystem_vendor": f"0x{sv:04x}\n",
        "subsystem_device": f"0x{sd:04x}\n",
        "class": f"0x{cc:06x}\n",
        "revision": f"0x{dev.revision:02x}\n",
        "irq": f"{dev.irq}\n",
        "numa_node": "-1\n",
        "local_cpus": "1\n",
        "local_cpulist": "0\n",
        "enable": "1\n" if dev.driver not in (None, VFIO_PCI) else "0\n",
        "modalias": modalias(dev) + "\n",
        "resource": "\n".join(resource_lines(dev)) + "\n",
        "msi_bus": "1\n",
        "broken_parity_status": "0\n",
        "d3cold_allowed": "1\n",
        "power_state": "D0\n",
        "ari_enabled": "0\n",
        "dma_mask_bits": "64\n",
        "consistent_dma_mask_bits": "64\n",
        "driver_override": "(null)\n",
    }
    for name, content in text.items():
        mode = (
            0o644
            if name
            in ("numa_node", "enable", "broken_parity_status", "d3cold_allowed", "driver_override")
            else 0o444
        )
        w.file(f"{d}/{name}", content, mode)
    w.file(f"{d}/uevent", _uevent(dev, dev.driver), 0o644)
    w.file(f"{d}/config", bytes(dev.config), 0o644)
    for name in ("remove", "rescan", "reset"):
        if name == "reset" and not dev.reset_methods():
            continue
        w.file(f"{d}/{name}", "", 0o200)
    methods = dev.reset_methods()
    if methods:
        w.file(f"{d}/reset_method", " ".join(m.value for m in methods) + "\n", 0o644)
    w.dir(f"{d}/power")
    w.file(f"{d}/power/control", "on\n", 0o644)
    w.file(f"{d}/power/runtime_status", "active\n")
    w.link(f"{d}/subsystem", "bus/pci")
    w.link(f"bus/pci/devices/{dev.name}", d)
    if dev.driver is not None:
        w.link(f"{d}/driver", f"bus/pci/drivers/{dev.driver}")
    if dev.iommu_group is not None:
        w.link(f"{d}/iommu_group", f"kernel/iommu_groups/{dev.iommu_group}")
    if dev.is_physfn:
        # drivers/pci/iov.c: the sriov_* attributes and a virtfnN link per enabled VF
        for name, value in (
            ("sriov_totalvfs", dev.sriov_total_vfs), ("sriov_numvfs", dev.sriov_num_vfs),
            ("sriov_offset", dev.sriov_read(PCI_SRIOV_VF_OFFSET)),
            ("sriov_stride", dev.sriov_read(PCI_SRIOV_VF_STRIDE)),
        ):  # fmt: skip
            w.file(f"{d}/{name}", f"{value}\n")
        w.file(f"{d}/sriov_vf_device", f"{dev.sriov_read(PCI_SRIOV_VF_DID):x}\n")
        for i, vf in enumerate(dev.virtfns):
            w.link(f"{d}/virtfn{i}", device_path(vf))
    if dev.physfn is not None:
        w.link(f"{d}/physfn", device_path(dev.physfn))
    pos = dev.find_capability(PCI_CAP_ID_EXP)
    if pos and dev.pcie_type != PCI_EXP_TYPE_RC_END:
        lnkcap = dev.cfg_read(pos + 0x0C, 4)
        lnksta = dev.cfg_read(pos + 0x12, 2)
        w.file(f"{d}/max_link_speed", _LINK_SPEEDS.get(lnkcap & 0xF, "Unknown") + "\n")
        w.file(f"{d}/max_link_width", f"{(lnkcap >> 4) & 0x3F}\n")
        w.file(f"{d}/current_link_speed", _LINK_SPEEDS.get(lnksta & 0xF, "Unknown") + "\n")
        w.file(f"{d}/current_link_width", f"{(lnksta >> 4) & 0x3F}\n")
    if dev.subordinate is not None:
        w.file(f"{d}/secondary_bus_number", f"{dev.subordinate.number}\n")
        w.file(f"{d}/subordinate_bus_number", f"{dev.cfg_read(0x1A, 1)}\n")
        pdir = f"{d}/pci_bus/{dev.domain:04x}:{dev.subordinate.number:02x}"
        w.dir(pdir)
        w.file(f"{pdir}/cpuaffinity", "1\n")
    index = vfio_index.get(dev.name)
    if index is not None and dev.driver == VFIO_PCI:
        _write_vfio_dev(w, dev, index, by_path)


def _write_slots(w: _Writer, topology: PciTopology) -> None:
    """``/sys/bus/pci/slots/<psn>/address`` for each hot-plug slot (pciehp names)."""
    for bus in topology.buses():
        for slot in bus.slots:
            bridge = bus.self_bridge
            if bridge is None:
                continue
            pos = bridge.find_capability(PCI_CAP_ID_EXP)
            psn = (bridge.cfg_read(pos + 0x14, 4) >> 19) if pos else slot.number
            sdir = f"bus/pci/slots/{psn}"
            w.file(f"{sdir}/address", f"{bus.domain:04x}:{bus.number:02x}:{slot.number:02x}\n")
            w.file(f"{sdir}/power", "1\n", 0o644)


# ------------------------------------------------------------------ removal


@define(eq=False)
class SysfsFunction:
    """What the sysfs of one function depends on, as last written."""

    dev: PciDev
    driver: str | None
    iommu_group: int | None
    vfio_index: int | None


@define(eq=False)
class SysfsView:
    """The entries a generated sysfs has: functions by BDF, vfio and iommu group ids."""

    functions: dict[str, SysfsFunction] = field(factory=dict)
    vfio_groups: set[int] = field(factory=set)
    iommu_groups: set[int] = field(factory=set)


def sysfs_view(topology: PciTopology, nodes: Sequence[DevNode], vfio_index: Mapping[str, int]) -> SysfsView:
    """The view ``generate_sysfs(root, topology, nodes, vfio_index)`` writes."""
    view = SysfsView()
    for dev in topology.devices():
        index = vfio_index.get(dev.name) if dev.driver == VFIO_PCI else None
        view.functions[dev.name] = SysfsFunction(dev, dev.driver, dev.iommu_group, index)
        if dev.iommu_group is not None:
            view.iommu_groups.add(dev.iommu_group)
    for n in nodes:
        gid = n.path.removeprefix("vfio/").removeprefix("noiommu-")
        if n.path.startswith("vfio/") and gid.isdigit():
            view.vfio_groups.add(int(gid))
    return view


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_function(root: Path, fn: SysfsFunction) -> None:
    """Take out the sysfs of one removed function (device_del() of the pci_dev
    and of its vfio-dev child): its directory, its links from the bus, the
    driver, the iommu group and class/vfio-dev. A bridge's directory holds
    those of the functions below it, which go with it."""
    sysdir = os.path.join(os.fspath(root), "sys")
    dev = fn.dev
    shutil.rmtree(os.path.join(sysdir, device_path(dev)), ignore_errors=True)
    _unlink(os.path.join(sysdir, "bus/pci/devices", dev.name))
    if fn.driver is not None:
        _unlink(os.path.join(sysdir, "bus/pci/drivers", fn.driver, dev.name))
    if fn.iommu_group is not None:
        _unlink(os.path.join(sysdir, "kernel/iommu_groups", str(fn.iommu_group), "devices", dev.name))
    if fn.vfio_index is not None:
        _unlink(os.path.join(sysdir, "class/vfio-dev", f"vfio{fn.vfio_index}"))


def remove_vfio_group(root: Path, gid: int) -> None:
    """Take out the entries of the vfio group ``gid`` (its class device; ``noiommu-<gid>`` too)."""
    sysdir = os.path.join(os.fspath(root), "sys")
    for name in (str(gid), f"noiommu-{gid}"):
        _unlink(os.path.join(sysdir, "class/vfio", name))
        shutil.rmtree(os.path.join(sysdir, "devices/virtual/vfio", name), ignore_errors=True)


def remove_iommu_group(root: Path, gid: int) -> None:
    """Take out /sys/kernel/iommu_groups/``gid`` (its last device is gone)."""
    shutil.rmtree(os.path.join(os.fspath(root), "sys", "kernel/iommu_groups", str(gid)), ignore_errors=True)


def remove_vanished(root: Path, before: SysfsView, after: SysfsView) -> list[str]:
    """Remove from ``root/sys`` what ``before`` had and ``after`` lacks: removed
    functions, and a function's vfio-dev entry when it left vfio-pci; vfio and
    iommu groups that went. Returns what was taken out, for logs and tests."""
    out: list[str] = []
    sysdir = os.path.join(os.fspath(root), "sys")
    for bdf, fn in before.functions.items():
        now = after.functions.get(bdf)
        if now is None:
            remove_function(root, fn)
            out.append(bdf)
            continue
        if fn.vfio_index is not None and now.vfio_index != fn.vfio_index:
            shutil.rmtree(os.path.join(sysdir, device_path(fn.dev), "vfio-dev"), ignore_errors=True)
            _unlink(os.path.join(sysdir, "class/vfio-dev", f"vfio{fn.vfio_index}"))
            out.append(f"vfio{fn.vfio_index}")
        if fn.iommu_group is not None and now.iommu_group != fn.iommu_group:
            # a noiommu group leaves with vfio-pci (iommu_group_remove_device)
            _unlink(os.path.join(sysdir, device_path(fn.dev), "iommu_group"))
            _unlink(os.path.join(sysdir, "kernel/iommu_groups", str(fn.iommu_group), "devices", bdf))
            out.append(f"{bdf} iommu group {fn.iommu_group}")
        if now.driver != fn.driver and fn.driver is not None:
            _unlink(os.path.join(sysdir, "bus/pci/drivers", fn.driver, bdf))
            _unlink(os.path.join(sysdir, device_path(fn.dev), "driver"))
            out.append(f"{bdf} driver {fn.driver}")
    for gid in sorted(before.vfio_groups - after.vfio_groups):
        remove_vfio_group(root, gid)
        out.append(f"vfio group {gid}")
    for gid in sorted(before.iommu_groups - after.iommu_groups):
        remove_iommu_group(root, gid)
        out.append(f"iommu group {gid}")
    return out


def update_sysfs(root: Path, before: SysfsView, after: SysfsView, nodes: Sequence[DevNode]) -> list[str]:
    """Bring ``root/sys`` from ``before`` to ``after``: ``remove_vanished``, then
    write what appeared (device_bind_driver()'s links, the uevent's DRIVER,
    vfio-dev entries of a function now bound to vfio-pci, new vfio groups).
    ``nodes``: the model's nodes now (their major:minor). Returns what changed."""
    out = remove_vanished(root, before, after)
    w = _Writer(Path(root))
    by_path = _node_by_path(nodes)
    for bdf, fn in after.functions.items():
        old = before.functions.get(bdf)
        if old is None:
            continue  # functions do not appear (no rescan)
        d = device_path(fn.dev)
        if old.driver != fn.driver:
            w.file(f"{d}/uevent", _uevent(fn.dev, fn.driver), 0o644)
            w.file(f"{d}/enable", "1\n" if fn.driver not in (None, VFIO_PCI) else "0\n", 0o644)
            if fn.driver is not None:
                w.link(f"{d}/driver", f"bus/pci/drivers/{fn.driver}")
                w.link(f"bus/pci/drivers/{fn.driver}/{bdf}", d)
                out.append(f"{bdf} driver {fn.driver}")
        if fn.vfio_index is not None and fn.vfio_index != old.vfio_index:
            _write_vfio_dev(w, fn.dev, fn.vfio_index, by_path)
            out.append(f"vfio{fn.vfio_index}")
    for bdf, fn in after.functions.items():
        old = before.functions.get(bdf)
        if old is not None and fn.iommu_group is not None and old.iommu_group != fn.iommu_group:
            w.link(f"{device_path(fn.dev)}/iommu_group", f"kernel/iommu_groups/{fn.iommu_group}")
    for gid in sorted(after.iommu_groups - before.iommu_groups):
        members = [f.dev for f in after.functions.values() if f.iommu_group == gid]
        _write_iommu_group(w, gid, members, by_path)
        out.append(f"iommu group {gid}")
    for gid in sorted(after.vfio_groups - before.vfio_groups):
        vg = _vfio_group_node(by_path, gid)
        if vg is not None:
            _write_vfio_group(w, vg[0], vg[1])
            out.append(f"vfio group {vg[0]}")
    return out


# ------------------------------------------------------------------ writable attributes


@define(frozen=True)
class SysAttr:
    """One writable sysfs attribute: ``kind`` (the store it reaches), ``arg``
    (the function's BDF or the driver's name; "" for the bus), its path
    relative to /sys (the real location, not through a symlink), the path
    the FUSE server serves it at (relative to its mount) and its mode."""

    kind: str
    arg: str
    sys_rel: str
    fuse_rel: str
    mode: int


#: where the FUSE server serves the attributes, relative to its mount
SYSFS_ATTR_DIR = ".fakedev/sysfs"
DRIVER_ATTRS = ("bind", "unbind", "new_id", "remove_id")


def writable_attributes(topology: PciTopology, drivers: Sequence[str]) -> list[SysAttr]:
    """The attribute files a device manager writes: per function
    ``driver_override`` (0644), ``reset`` (0200, only with a reset method, as
    generated) and ``remove`` (0200); per driver ``bind``, ``unbind``,
    ``new_id``, ``remove_id`` (0200); the bus's ``drivers_probe`` (0200)."""
    out = [SysAttr("drivers_probe", "", "bus/pci/drivers_probe",
                   f"{SYSFS_ATTR_DIR}/bus/pci/drivers_probe", 0o200)]
    for name in drivers:
        for attr in DRIVER_ATTRS:
            rel = f"bus/pci/drivers/{name}/{attr}"
            out.append(SysAttr(attr, name, rel, f"{SYSFS_ATTR_DIR}/{rel}", 0o200))
    for dev in topology.devices():
        d = device_path(dev)
        attrs = [("driver_override", 0o644), ("remove", 0o200)]
        if dev.reset_methods():
            attrs.append(("reset", 0o200))
        for attr, mode in attrs:
            out.append(SysAttr(attr, dev.name, f"{d}/{attr}",
                               f"{SYSFS_ATTR_DIR}/bus/pci/devices/{dev.name}/{attr}", mode))
    return out
