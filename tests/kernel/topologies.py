"""The fixture topologies of the kernel-model tests, built in code.

``build(name)`` returns a fresh ``PciTopology`` for one of ``NAMES``:

- ``dual-function-nic``: root port 00:1c.0 -> bus 01 with 01:00.0 and 01:00.1
  (network class, multifunction, no FLR, PM with No_Soft_Reset), iommu groups
  13 and 14, both bound to vfio-pci. One dev_set keyed by bus 01.
- ``shared-group``: the same card without ACS: both functions in group 13.
- ``host-driver-sibling``: as dual-function-nic but 01:00.1 is bound to "igb".
- ``flr-device``: root port 00:1d.0 -> bus 02 with 02:00.0 (PCIe FLR), group 20.
- ``root-bus``: 00:02.0 on the root bus, group 1 (its own dev_set, no hot reset).
- ``hotplug-slot``: downstream port 00:1e.0 with a reset-capable hot-plug slot
  -> bus 05 with 05:00.0 / 05:00.1, groups 30 / 31. dev_set keyed by the slot.

``ConfigBuilder`` writes a plausible config space (header, BARs, capability
chain) so the model derives reset methods and IRQ counts the way the kernel does.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from fakedev.kernel import pci as P
from fakedev.kernel.pci import Bar, BarKind, PciBus, PciDev, PciSlot, PciTopology


class ConfigBuilder:
    """Assemble a type-0 or type-1 config space with a capability list."""

    def __init__(self, vendor: int, device: int, class_code: int, *, size: int = 4096,
                 header_type: int = 0, multifunction: bool = False, revision: int = 1,
                 interrupt_pin: int = 1) -> None:
        self.cfg = bytearray(size)
        self.w16(P.PCI_VENDOR_ID, vendor)
        self.w16(P.PCI_DEVICE_ID, device)
        self.w32(0x08, (class_code << 8) | revision)
        self.cfg[P.PCI_HEADER_TYPE] = header_type | (0x80 if multifunction else 0)
        self.cfg[P.PCI_INTERRUPT_PIN] = interrupt_pin
        self.cfg[P.PCI_INTERRUPT_LINE] = 0xFF if interrupt_pin else 0
        self.next_cap = 0x40
        self.last_cap_next: int | None = None

    def w8(self, off: int, v: int) -> None:
        self.cfg[off] = v & 0xFF

    def w16(self, off: int, v: int) -> None:
        struct.pack_into("<H", self.cfg, off, v & 0xFFFF)

    def w32(self, off: int, v: int) -> None:
        struct.pack_into("<I", self.cfg, off, v & 0xFFFFFFFF)

    def bar(self, b: Bar) -> None:
        off = P.PCI_BASE_ADDRESS_0 + 4 * b.index
        if b.kind is BarKind.IO:
            self.w32(off, (b.address & ~3) | 1)
            return
        flags = (0x4 if b.kind is BarKind.MEM64 else 0) | (0x8 if b.prefetchable else 0)
        self.w32(off, (b.address & 0xFFFFFFF0) | flags)
        if b.kind is BarKind.MEM64:
            self.w32(off + 4, b.address >> 32)

    def _cap(self, cap_id: int, length: int) -> int:
        pos = self.next_cap
        self.cfg[pos] = cap_id
        self.cfg[pos + 1] = 0
        if self.last_cap_next is None:
            self.cfg[P.PCI_CAPABILITY_LIST] = pos
            self.w16(P.PCI_STATUS, 0x10)
        else:
            self.cfg[self.last_cap_next] = pos
        self.last_cap_next = pos + 1
        self.next_cap = (pos + length + 3) & ~3
        return pos

    def pm(self, no_soft_reset: bool) -> int:
        pos = self._cap(P.PCI_CAP_ID_PM, 8)
        self.w16(pos + 2, 0x0003)  # version 3
        self.w16(pos + P.PCI_PM_CTRL, P.PCI_PM_CTRL_NO_SOFT_RESET if no_soft_reset else 0)
        return pos

    def msi(self, vectors_log2: int = 0, is64: bool = True, maskbit: bool = False) -> int:
        length = 10 + (4 if is64 else 0) + (10 if maskbit else 0)
        pos = self._cap(P.PCI_CAP_ID_MSI, length)
        flags = (vectors_log2 << 1) | (P.PCI_MSI_FLAGS_64BIT if is64 else 0)
        flags |= P.PCI_MSI_FLAGS_MASKBIT if maskbit else 0
        self.w16(pos + P.PCI_MSI_FLAGS, flags)
        return pos

    def msix(self, table_size: int, bar: int, table_off: int, pba_off: int) -> int:
        pos = self._cap(P.PCI_CAP_ID_MSIX, 12)
        self.w16(pos + P.PCI_MSIX_FLAGS, (table_size - 1) & P.PCI_MSIX_FLAGS_QSIZE)
        self.w32(pos + P.PCI_MSIX_TABLE, table_off | bar)
        self.w32(pos + P.PCI_MSIX_PBA, pba_off | bar)
        return pos

    def pcie(self, port_type: int, flr: bool = False, slot: int | None = None) -> int:
        pos = self._cap(P.PCI_CAP_ID_EXP, 0x3C)
        flags = 0x2 | (port_type << 4) | (0x100 if slot is not None else 0)
        self.w16(pos + P.PCI_EXP_FLAGS, flags)
        self.w32(pos + P.PCI_EXP_DEVCAP, 0x8000 | (P.PCI_EXP_DEVCAP_FLR if flr else 0) | 0x2)
        if slot is not None:
            self.w32(pos + P.PCI_EXP_SLTCAP, P.PCI_EXP_SLTCAP_HPC | 0x20 | (slot << 19))
        return pos

    def bridge_buses(self, primary: int, secondary: int, subordinate: int) -> None:
        self.cfg[P.PCI_PRIMARY_BUS] = primary
        self.cfg[P.PCI_SECONDARY_BUS] = secondary
        self.cfg[P.PCI_SUBORDINATE_BUS] = subordinate


def _add(bus: PciBus, dev: PciDev) -> PciDev:
    bus.devices.append(dev)
    return dev


def _bridge(topo_bus: PciBus, devfn: int, secondary: int, group: int, port_type: int,
            device_id: int, slot_reset: bool | None = None) -> tuple[PciDev, PciBus]:
    cb = ConfigBuilder(0x8086, device_id, 0x060400, header_type=1, interrupt_pin=1)
    cb.bridge_buses(topo_bus.number, secondary, secondary)
    cb.pm(no_soft_reset=True)
    cb.msi()
    cb.pcie(port_type, slot=(devfn >> 3) if slot_reset is not None else None)
    br = _add(topo_bus, PciDev(bus=topo_bus, devfn=devfn, config=cb.cfg, iommu_group=group,
                               driver="pcieport"))
    sub = PciBus(domain=topo_bus.domain, number=secondary, self_bridge=br, parent=topo_bus)
    br.subordinate = sub
    topo_bus.children.append(sub)
    return br, sub


def _nic_function(bus: PciBus, fn: int, group: int, driver: str | None) -> PciDev:
    """One function of a two-port NIC: no FLR, PM with No_Soft_Reset, MSI + MSI-X."""
    cb = ConfigBuilder(0x1B36, 0x00F0 + fn, 0x020000, multifunction=True, interrupt_pin=1 + fn)
    base = 0xF0000000 + (0x100000 * fn)
    bars = [
        Bar(0, BarKind.MEM32, 0x20000, address=base),
        Bar(2, BarKind.IO, 0x20, address=0xE000 + 0x20 * fn),
        Bar(3, BarKind.MEM32, 0x4000, address=base + 0x80000),
    ]
    for b in bars:
        cb.bar(b)
    cb.pm(no_soft_reset=True)
    cb.msi(vectors_log2=0)
    cb.msix(table_size=10, bar=3, table_off=0x0, pba_off=0x2000)
    cb.pcie(P.PCI_EXP_TYPE_ENDPOINT, flr=False)
    return _add(bus, PciDev(bus=bus, devfn=fn, config=cb.cfg, bars=bars, iommu_group=group,
                            driver=driver, irq=16 + fn))


def _nic(groups: tuple[int, int], drivers: tuple[str | None, str | None]) -> PciTopology:
    root = PciBus(domain=0, number=0)
    _, bus1 = _bridge(root, (0x1C << 3), 1, 12, P.PCI_EXP_TYPE_ROOT_PORT, 0xA110)
    _nic_function(bus1, 0, groups[0], drivers[0])
    _nic_function(bus1, 1, groups[1], drivers[1])
    return PciTopology(root_buses=[root])


def dual_function_nic() -> PciTopology:
    return _nic((13, 14), ("vfio-pci", "vfio-pci"))


def shared_group() -> PciTopology:
    return _nic((13, 13), ("vfio-pci", "vfio-pci"))


def host_driver_sibling() -> PciTopology:
    return _nic((13, 14), ("vfio-pci", "igb"))


def flr_device() -> PciTopology:
    root = PciBus(domain=0, number=0)
    _, bus2 = _bridge(root, (0x1D << 3), 2, 11, P.PCI_EXP_TYPE_ROOT_PORT, 0xA118)
    cb = ConfigBuilder(0x1B36, 0x00FF, 0xFF0000, interrupt_pin=1)
    bars = [Bar(0, BarKind.MEM64, 0x100000, prefetchable=True, address=0x4000000000),
            Bar(4, BarKind.MEM32, 0x1000, address=0xF7000000)]
    for b in bars:
        cb.bar(b)
    cb.pm(no_soft_reset=False)
    cb.msi(vectors_log2=2, maskbit=True)
    cb.msix(table_size=4, bar=4, table_off=0x0, pba_off=0x800)
    cb.pcie(P.PCI_EXP_TYPE_ENDPOINT, flr=True)
    _add(bus2, PciDev(bus=bus2, devfn=0, config=cb.cfg, bars=bars, rom_size=0x10000,
                      iommu_group=20, driver="vfio-pci", irq=19))
    return PciTopology(root_buses=[root])


def root_bus() -> PciTopology:
    root = PciBus(domain=0, number=0)
    cb = ConfigBuilder(0x1B36, 0x00FE, 0xFF0000, size=256, interrupt_pin=1)
    bars = [Bar(0, BarKind.MEM32, 0x1000, address=0xFE000000)]
    for b in bars:
        cb.bar(b)
    cb.pm(no_soft_reset=False)
    cb.msi()
    _add(root, PciDev(bus=root, devfn=(0x02 << 3), config=cb.cfg, bars=bars, iommu_group=1,
                      driver="vfio-pci", irq=11))
    return PciTopology(root_buses=[root])


def hotplug_slot() -> PciTopology:
    root = PciBus(domain=0, number=0)
    _, bus5 = _bridge(root, (0x1E << 3), 5, 10, P.PCI_EXP_TYPE_DOWNSTREAM, 0xA120, slot_reset=True)
    slot = PciSlot(bus=bus5, number=0, reset_capable=True)
    bus5.slots.append(slot)
    for fn, grp in ((0, 30), (1, 31)):
        cb = ConfigBuilder(0x1B36, 0x00E0 + fn, 0xFF0000, multifunction=True, interrupt_pin=1)
        bars = [Bar(0, BarKind.MEM32, 0x2000, address=0xF8000000 + 0x10000 * fn)]
        for b in bars:
            cb.bar(b)
        cb.pm(no_soft_reset=True)
        cb.msi()
        cb.pcie(P.PCI_EXP_TYPE_ENDPOINT, flr=False)
        _add(bus5, PciDev(bus=bus5, devfn=fn, config=cb.cfg, bars=bars, iommu_group=grp,
                          driver="vfio-pci", slot=slot, irq=20 + fn))
    return PciTopology(root_buses=[root])


TOPOLOGIES: dict[str, Callable[[], PciTopology]] = {
    "dual-function-nic": dual_function_nic,
    "shared-group": shared_group,
    "host-driver-sibling": host_driver_sibling,
    "flr-device": flr_device,
    "root-bus": root_bus,
    "hotplug-slot": hotplug_slot,
}
NAMES = tuple(TOPOLOGIES)


def build(name: str) -> PciTopology:
    """A fresh topology for fixture ``name`` (one of ``NAMES``)."""
    return TOPOLOGIES[name]()
