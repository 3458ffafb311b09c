"""PCI topology as the kernel's PCI core sees it (drivers/pci/).

Buses, bridges, slots and functions, each function with its config space
bytes, BARs, reset methods, iommu group and bound driver. The device-tree
loader builds a ``PciTopology``; the VFIO model reads it. Config space here is
the *device's* config space (what the hardware holds); vfio-pci's virtualized
view of it lives in ``vfio/pci/vfio_pci_config.py``.

Reset capability is derived from config space the way the PCI core derives it
(``pci_init_reset_methods``): FLR from the PCIe DevCap FLR bit, AF FLR from the
Advanced Features capability, PM from a PM capability without No_Soft_Reset,
bus from a parent bridge that is not on the root bus side... see
``PciDev.reset_methods``.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator

from attrs import define, field

# Config space offsets and capability ids (include/uapi/linux/pci_regs.h)
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_STATUS_CAP_LIST = 0x10
PCI_REVISION_ID = 0x08
# SR-IOV extended capability (pci_regs.h)
PCI_EXT_CAP_ID_SRIOV = 0x10
PCI_SRIOV_CAP = 0x04
PCI_SRIOV_CTRL = 0x08
PCI_SRIOV_CTRL_VFE = 0x0001
PCI_SRIOV_CTRL_MSE = 0x0008
PCI_SRIOV_INITIAL_VF = 0x0C
PCI_SRIOV_TOTAL_VF = 0x0E
PCI_SRIOV_NUM_VF = 0x10
PCI_SRIOV_VF_OFFSET = 0x14
PCI_SRIOV_VF_STRIDE = 0x16
PCI_SRIOV_VF_DID = 0x1A
PCI_EXT_CAP_SRIOV_SIZEOF = 0x40
PCI_CLASS_PROG = 0x09
PCI_CLASS_DEVICE = 0x0A
PCI_HEADER_TYPE = 0x0E
PCI_HEADER_TYPE_NORMAL = 0
PCI_HEADER_TYPE_BRIDGE = 1
PCI_BASE_ADDRESS_0 = 0x10
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_ROM_ADDRESS = 0x30
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D
PCI_PRIMARY_BUS = 0x18
PCI_SECONDARY_BUS = 0x19
PCI_SUBORDINATE_BUS = 0x1A

PCI_CAP_ID_PM = 0x01
PCI_CAP_ID_MSI = 0x05
PCI_CAP_ID_EXP = 0x10
PCI_CAP_ID_MSIX = 0x11
PCI_CAP_ID_AF = 0x13
PCI_EXT_CAP_ID_ACS = 0x0D

PCI_PM_CTRL = 4
PCI_PM_CTRL_NO_SOFT_RESET = 0x0008
PCI_EXP_FLAGS = 2
PCI_EXP_FLAGS_TYPE = 0x00F0
PCI_EXP_DEVCAP = 4
PCI_EXP_DEVCAP_FLR = 0x10000000
PCI_EXP_DEVCAP2 = 0x24
PCI_EXP_DEVCAP2_ATOMIC_ROUTE = 0x00000040
PCI_EXP_DEVCAP2_ATOMIC_COMP32 = 0x00000080
PCI_EXP_DEVCAP2_ATOMIC_COMP64 = 0x00000100
PCI_EXP_DEVCAP2_ATOMIC_COMP128 = 0x00000200
PCI_EXP_DEVCTL2 = 0x28
PCI_EXP_DEVCTL2_ATOMIC_REQ = 0x0040
PCI_EXP_DEVCTL2_ATOMIC_EGRESS_BLOCK = 0x0080
PCI_EXP_SLTCAP = 0x14
PCI_EXP_SLTCAP_HPC = 0x00000040
PCI_MSI_FLAGS = 2
PCI_MSI_FLAGS_QMASK = 0x000E
PCI_MSI_FLAGS_64BIT = 0x0080
PCI_MSI_FLAGS_MASKBIT = 0x0100
PCI_MSIX_FLAGS = 2
PCI_MSIX_FLAGS_QSIZE = 0x07FF
PCI_MSIX_TABLE = 4
PCI_MSIX_PBA = 8
PCI_AF_CAP = 3
PCI_AF_CAP_TP = 0x01
PCI_AF_CAP_FLR = 0x02

PCI_CFG_SPACE_SIZE = 256
PCI_CFG_SPACE_EXP_SIZE = 4096

# PCIe port types (PCI_EXP_FLAGS_TYPE >> 4)
PCI_EXP_TYPE_ENDPOINT = 0x0
PCI_EXP_TYPE_LEG_END = 0x1
PCI_EXP_TYPE_ROOT_PORT = 0x4
PCI_EXP_TYPE_UPSTREAM = 0x5
PCI_EXP_TYPE_DOWNSTREAM = 0x6
PCI_EXP_TYPE_RC_END = 0x9


class ResetMethod(enum.Enum):
    """Names as in /sys/bus/pci/devices/*/reset_method, in the kernel's order."""

    DEVICE_SPECIFIC = "device_specific"
    ACPI = "acpi"
    FLR = "flr"
    AF_FLR = "af_flr"
    PM = "pm"
    BUS = "bus"


class BarKind(enum.Enum):
    MEM32 = "mem32"
    MEM64 = "mem64"
    IO = "io"


@define
class Bar:
    """One BAR as the device implements it. ``size`` 0 = unimplemented."""

    index: int
    kind: BarKind
    size: int
    prefetchable: bool = False
    address: int = 0  # host physical address assigned by the "BIOS" (for sysfs resource)


def bdf_name(domain: int, bus: int, devfn: int) -> str:
    """``0000:01:00.1``."""
    return f"{domain:04x}:{bus:02x}:{devfn >> 3:02x}.{devfn & 7}"


@define(eq=False)
class PciSlot:
    """A physical slot (hot-plug capable downstream port or root port)."""

    bus: PciBus
    number: int  # slot device number on ``bus``
    reset_capable: bool  # pci_probe_reset_slot() == 0


@define(eq=False)
class PciDev:
    """One PCI function (struct pci_dev)."""

    bus: PciBus
    devfn: int
    config: bytearray  # 256 or 4096 bytes: the device's power-on config space
    bars: list[Bar] = field(factory=list)  # indexes 0..5 (and 6 = ROM if present)
    rom_size: int = 0
    iommu_group: int | None = None  # iommu group id, None = no iommu group
    driver: str | None = None  # "vfio-pci", a host driver name, or None (unbound)
    slot: PciSlot | None = None
    subordinate: PciBus | None = None  # the secondary bus if this is a bridge
    irq: int = 0  # legacy irq number shown in sysfs
    reset_methods_override: list[ResetMethod] | None = None
    #: SR-IOV: the PF of a VF (pci_physfn(); None for anything else)
    physfn: PciDev | None = None
    #: SR-IOV: the VFs of a PF, in VF order (those enabled: NumVFs of them)
    virtfns: list[PciDev] = field(factory=list)

    @property
    def domain(self) -> int:
        return self.bus.domain

    @property
    def name(self) -> str:
        return bdf_name(self.bus.domain, self.bus.number, self.devfn)

    @property
    def slot_no(self) -> int:
        return self.devfn >> 3

    @property
    def func(self) -> int:
        return self.devfn & 7

    # -- config space helpers ---------------------------------------------
    def cfg_read(self, off: int, size: int) -> int:
        fmt = {1: "<B", 2: "<H", 4: "<I"}[size]
        return int(struct.unpack_from(fmt, self.config, off)[0])

    @property
    def cfg_size(self) -> int:
        return len(self.config)

    @property
    def vendor(self) -> int:
        return self.cfg_read(PCI_VENDOR_ID, 2)

    @property
    def device(self) -> int:
        return self.cfg_read(PCI_DEVICE_ID, 2)

    @property
    def class_code(self) -> int:
        return self.cfg_read(0x08, 4) >> 8

    @property
    def revision(self) -> int:
        return self.cfg_read(PCI_REVISION_ID, 1)

    @property
    def header_type(self) -> int:
        return self.cfg_read(PCI_HEADER_TYPE, 1) & 0x7F

    @property
    def multifunction(self) -> bool:
        return bool(self.cfg_read(PCI_HEADER_TYPE, 1) & 0x80)

    @property
    def interrupt_pin(self) -> int:
        return self.cfg_read(PCI_INTERRUPT_PIN, 1)

    def capabilities(self) -> Iterator[tuple[int, int]]:
        """(cap id, offset) of each standard capability, in list order."""
        if not self.cfg_read(PCI_STATUS, 2) & PCI_STATUS_CAP_LIST:
            return
        pos = self.cfg_read(PCI_CAPABILITY_LIST, 1) & ~3
        seen = 0
        while pos >= 0x40 and seen < 48:
            yield self.cfg_read(pos, 1), pos
            pos = self.cfg_read(pos + 1, 1) & ~3
            seen += 1

    def find_capability(self, cap_id: int) -> int:
        """pci_find_capability(): offset or 0."""
        for cid, pos in self.capabilities():
            if cid == cap_id:
                return pos
        return 0

    def ext_capabilities(self) -> Iterator[tuple[int, int]]:
        """(ext cap id, offset) in extended config space."""
        if self.cfg_size <= PCI_CFG_SPACE_SIZE:
            return
        pos, seen = 0x100, 0
        while pos and seen < 480:
            hdr = self.cfg_read(pos, 4)
            if hdr in (0, 0xFFFFFFFF):
                return
            yield hdr & 0xFFFF, pos
            pos = (hdr >> 20) & 0xFFC
            seen += 1

    def find_ext_capability(self, cap_id: int) -> int:
        for cid, pos in self.ext_capabilities():
            if cid == cap_id:
                return pos
        return 0

    @property
    def is_virtfn(self) -> bool:
        """pdev->is_virtfn: an SR-IOV virtual function."""
        return self.physfn is not None

    @property
    def is_physfn(self) -> bool:
        """pdev->is_physfn: a function with an SR-IOV capability (pci_iov_init succeeded)."""
        return not self.is_virtfn and self.find_ext_capability(PCI_EXT_CAP_ID_SRIOV) != 0

    def sriov_read(self, reg: int) -> int:
        """A 16-bit register of the SR-IOV capability (0 if there is none)."""
        pos = self.find_ext_capability(PCI_EXT_CAP_ID_SRIOV)
        return self.cfg_read(pos + reg, 2) if pos else 0

    @property
    def sriov_total_vfs(self) -> int:
        return self.sriov_read(PCI_SRIOV_TOTAL_VF)

    @property
    def sriov_num_vfs(self) -> int:
        """pci_num_vf(): the VFs enabled (NumVFs, with VF Enable set)."""
        if not self.sriov_read(PCI_SRIOV_CTRL) & PCI_SRIOV_CTRL_VFE:
            return 0
        return self.sriov_read(PCI_SRIOV_NUM_VF)

    @property
    def is_pcie(self) -> bool:
        return self.find_capability(PCI_CAP_ID_EXP) != 0

    @property
    def pcie_type(self) -> int | None:
        pos = self.find_capability(PCI_CAP_ID_EXP)
        if not pos:
            return None
        return (self.cfg_read(pos + PCI_EXP_FLAGS, 2) & PCI_EXP_FLAGS_TYPE) >> 4

    @property
    def has_flr(self) -> bool:
        pos = self.find_capability(PCI_CAP_ID_EXP)
        return bool(pos and self.cfg_read(pos + PCI_EXP_DEVCAP, 4) & PCI_EXP_DEVCAP_FLR)

    @property
    def has_af_flr(self) -> bool:
        pos = self.find_capability(PCI_CAP_ID_AF)
        if not pos:
            return False
        cap = self.cfg_read(pos + PCI_AF_CAP, 1)
        return bool(cap & PCI_AF_CAP_TP and cap & PCI_AF_CAP_FLR)

    @property
    def has_pm_reset(self) -> bool:
        """PM capability present and No_Soft_Reset clear (pci_pm_reset probe)."""
        pos = self.find_capability(PCI_CAP_ID_PM)
        return bool(pos and not self.cfg_read(pos + PCI_PM_CTRL, 2) & PCI_PM_CTRL_NO_SOFT_RESET)

    @property
    def parent_bridge(self) -> PciDev | None:
        return self.bus.self_bridge

    def reset_methods(self) -> list[ResetMethod]:
        """Models pci_init_reset_methods(): the methods that probe OK, in order."""
        if self.reset_methods_override is not None:
            return list(self.reset_methods_override)
        out: list[ResetMethod] = []
        if self.has_flr:
            out.append(ResetMethod.FLR)
        if self.has_af_flr:
            out.append(ResetMethod.AF_FLR)
        if self.has_pm_reset:
            out.append(ResetMethod.PM)
        if self.bus.probe_reset_bus() or (self.slot is not None and self.slot.reset_capable):
            out.append(ResetMethod.BUS)
        return out


@define(eq=False)
class PciBus:
    """struct pci_bus. A root bus has no ``self_bridge``."""

    domain: int
    number: int
    self_bridge: PciDev | None = None
    parent: PciBus | None = None
    devices: list[PciDev] = field(factory=list)
    children: list[PciBus] = field(factory=list)
    slots: list[PciSlot] = field(factory=list)

    @property
    def is_root(self) -> bool:
        return self.self_bridge is None

    def probe_reset_bus(self) -> bool:
        """pci_probe_reset_bus() == 0: a bridge above can do a secondary bus reset."""
        return self.self_bridge is not None

    def walk(self) -> Iterator[PciDev]:
        """pci_walk_bus(): this bus's devices and, depth first, every subordinate bus."""
        for dev in self.devices:
            yield dev
            if dev.subordinate is not None:
                yield from dev.subordinate.walk()


@define(eq=False)
class PciTopology:
    """Every root bus of the machine (all domains)."""

    root_buses: list[PciBus] = field(factory=list)

    def buses(self) -> Iterator[PciBus]:
        def rec(b: PciBus) -> Iterator[PciBus]:
            yield b
            for dev in b.devices:
                if dev.subordinate is not None:
                    yield from rec(dev.subordinate)

        for rb in self.root_buses:
            yield from rec(rb)

    def devices(self) -> Iterator[PciDev]:
        for rb in self.root_buses:
            yield from rb.walk()

    def find(self, name: str) -> PciDev | None:
        for d in self.devices():
            if d.name == name:
                return d
        return None
