"""vfio-pci's virtualized config space (region 7).

A model of drivers/vfio/pci/vfio_pci_config.c, reduced to what a VMM sees:

- accesses are chopped into aligned 1/2/4-byte pieces (``vfio_config_do_rw``);
  out-of-range offsets give EFAULT;
- BARs and the ROM BAR are virtualized: a write stores the value, a read gives
  it back masked by the BAR size plus the type bits, so sizing (write
  0xffffffff / 0xfffff800, read back) works;
- command: the decode/master/parity/SERR/INTx-disable bits are writable;
  status: the error bits are write-1-to-clear; interrupt line writable;
- capabilities pass through with per-field write masks for the fields a VMM
  writes: PM control (power state, PME), MSI (enable, MME, address, data,
  mask), MSI-X control (enable, function mask), PCIe device/link control
  (writing Initiate FLR resets the function) and status;
- everything else reads through and ignores writes.

The bytes here are also the device's state for the model: a reset restores
the power-on bytes except what ``pci_save_state``/``pci_restore_state``
carry across a reset (header dwords incl. BARs, command and interrupt line,
MSI/MSI-X and PCIe control).
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable

from fakedev.kernel import pci as P
from fakedev.kernel.errors import KernelError
from fakedev.kernel.pci import BarKind, PciDev

PCI_COMMAND_IO = 0x1
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_COMMAND_INTX_DISABLE = 0x400
_COMMAND_WMASK = 0x0547
_STATUS_W1C = 0xF900
PCI_ROM_ADDRESS_ENABLE = 0x1
PCI_ROM_ADDRESS_MASK = 0xFFFFF800
PCI_EXP_DEVCTL = 8
PCI_EXP_DEVCTL_BCR_FLR = 0x8000
PCI_EXP_DEVSTA = 10
PCI_EXP_LNKCTL = 16
PCI_MSI_FLAGS_ENABLE = 0x0001
PCI_MSIX_FLAGS_ENABLE = 0x8000
PCI_MSIX_FLAGS_MASKALL = 0x4000


class VfioPciConfig:
    """vdev->vconfig and the permission bits that govern it."""

    def __init__(self, pdev: PciDev, on_flr: Callable[[], None] | None = None) -> None:
        self.pdev = pdev
        self.size = pdev.cfg_size
        self.power_on = bytes(pdev.config)
        self.vconfig = bytearray(pdev.config)
        self.wmask = bytearray(self.size)
        self.w1c = bytearray(self.size)
        self.keep = bytearray(self.size)  # bytes pci_restore_state() brings back after a reset
        self.on_flr = on_flr
        self.bar_sizes = [0] * 6
        self.bar_kinds: list[BarKind | None] = [None] * 6
        self.bar_pref = [False] * 6
        for b in pdev.bars:
            if 0 <= b.index < 6:
                self.bar_sizes[b.index] = b.size
                self.bar_kinds[b.index] = b.kind
                self.bar_pref[b.index] = b.prefetchable
        self.rom_size = pdev.rom_size
        self.pcie_pos = pdev.find_capability(P.PCI_CAP_ID_EXP)
        self.msi_pos = pdev.find_capability(P.PCI_CAP_ID_MSI)
        self.msix_pos = pdev.find_capability(P.PCI_CAP_ID_MSIX)
        self.pm_pos = pdev.find_capability(P.PCI_CAP_ID_PM)
        self._init_perms()

    # -- permission tables --------------------------------------------------
    def _mask(self, table: bytearray, off: int, size: int, value: int) -> None:
        table[off:off + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def _init_perms(self) -> None:
        self._mask(self.wmask, P.PCI_COMMAND, 2, _COMMAND_WMASK)
        self._mask(self.w1c, P.PCI_STATUS, 2, _STATUS_W1C)
        self._mask(self.wmask, 0x0C, 2, 0xFFFF)  # cache line size, latency timer
        self._mask(self.wmask, P.PCI_INTERRUPT_LINE, 1, 0xFF)
        for off in (P.PCI_COMMAND, 0x0C, P.PCI_INTERRUPT_LINE):
            self._mask(self.keep, off, 2 if off != P.PCI_INTERRUPT_LINE else 1, 0xFFFF)
        self._mask(self.keep, P.PCI_BASE_ADDRESS_0, 24, (1 << 192) - 1)
        self._mask(self.keep, P.PCI_ROM_ADDRESS, 4, 0xFFFFFFFF)
        if self.pm_pos:
            self._mask(self.wmask, self.pm_pos + P.PCI_PM_CTRL, 2, 0x0103)
            self._mask(self.w1c, self.pm_pos + P.PCI_PM_CTRL, 2, 0x8000)
        if self.msi_pos:
            pos = self.msi_pos
            flags = self.pdev.cfg_read(pos + P.PCI_MSI_FLAGS, 2)
            is64 = bool(flags & P.PCI_MSI_FLAGS_64BIT)
            self._mask(self.wmask, pos + P.PCI_MSI_FLAGS, 2, 0x0071)
            length = 4 + 4 + (4 if is64 else 0) + 2
            self._mask(self.wmask, pos + 4, length - 4, (1 << (8 * (length - 4))) - 1)
            if flags & P.PCI_MSI_FLAGS_MASKBIT:
                mask_off = pos + (0x10 if is64 else 0x0C)
                self._mask(self.wmask, mask_off, 4, 0xFFFFFFFF)
                length = mask_off + 4 - pos
            self._mask(self.keep, pos + 2, length - 2, (1 << (8 * (length - 2))) - 1)
        if self.msix_pos:
            self._mask(self.wmask, self.msix_pos + P.PCI_MSIX_FLAGS, 2, 0xC000)
            self._mask(self.keep, self.msix_pos + P.PCI_MSIX_FLAGS, 2, 0xC000)
        if self.pcie_pos:
            pos = self.pcie_pos
            self._mask(self.wmask, pos + PCI_EXP_DEVCTL, 2, 0x7FFF)
            self._mask(self.w1c, pos + PCI_EXP_DEVSTA, 2, 0x000F)
            self._mask(self.wmask, pos + PCI_EXP_LNKCTL, 2, 0x0FFB)
            self._mask(self.keep, pos + PCI_EXP_DEVCTL, 2, 0xFFFF)
            self._mask(self.keep, pos + PCI_EXP_LNKCTL, 2, 0xFFFF)

    # -- virtual BAR registers ----------------------------------------------
    def _bar_read(self, idx: int) -> int:
        """vfio_bar_fixup() for one dword of the BAR block."""
        raw = struct.unpack_from("<I", self.vconfig, P.PCI_BASE_ADDRESS_0 + 4 * idx)[0]
        size, kind = self.bar_sizes[idx], self.bar_kinds[idx]
        if kind is None or not size:
            # maybe the upper half of a 64-bit BAR
            if idx > 0 and self.bar_kinds[idx - 1] is BarKind.MEM64 and self.bar_sizes[idx - 1]:
                mask = (~(self.bar_sizes[idx - 1] - 1) >> 32) & 0xFFFFFFFF
                return int(raw & mask)
            return 0
        if kind is BarKind.IO:
            return int((raw & ~(size - 1) & 0xFFFFFFFC) | 0x1)
        flags = (0x4 if kind is BarKind.MEM64 else 0) | (0x8 if self.bar_pref[idx] else 0)
        return int((raw & ~(size - 1) & 0xFFFFFFF0) | flags)

    def _rom_read(self) -> int:
        raw = struct.unpack_from("<I", self.vconfig, P.PCI_ROM_ADDRESS)[0]
        if not self.rom_size:
            return 0
        return int(raw & (~(self.rom_size - 1) & PCI_ROM_ADDRESS_MASK | PCI_ROM_ADDRESS_ENABLE))

    def _read_dword_virtual(self, dword_off: int) -> int:
        if P.PCI_BASE_ADDRESS_0 <= dword_off < P.PCI_BASE_ADDRESS_0 + 24 and self.pdev.header_type == 0:
            return self._bar_read((dword_off - P.PCI_BASE_ADDRESS_0) // 4)
        if dword_off == P.PCI_ROM_ADDRESS and self.pdev.header_type == 0:
            return self._rom_read()
        return int(struct.unpack_from("<I", self.vconfig, dword_off)[0])

    # -- access ---------------------------------------------------------------
    def read(self, pos: int, count: int) -> bytes:
        """Models vfio_pci_config_rw() for a read."""
        self._check(pos, count)
        out = bytearray()
        while count:
            n = self._chunk(pos, count)
            base = pos & ~3
            dword = self._read_dword_virtual(base).to_bytes(4, "little")
            out += dword[pos - base: pos - base + n]
            pos += n
            count -= n
        return bytes(out)

    def write(self, pos: int, data: bytes) -> int:
        """Models vfio_pci_config_rw() for a write; returns bytes written."""
        self._check(pos, len(data))
        i = 0
        while i < len(data):
            n = self._chunk(pos, len(data) - i)
            self._write_piece(pos, data[i:i + n])
            pos += n
            i += n
        return len(data)

    def _check(self, pos: int, count: int) -> None:
        if pos < 0 or pos >= self.size or pos + count > self.size:
            raise KernelError(errno.EFAULT, "config access outside config space")

    @staticmethod
    def _chunk(pos: int, count: int) -> int:
        if count >= 4 and not pos % 4:
            return 4
        if count >= 2 and not pos % 2:
            return 2
        return 1

    def _write_piece(self, pos: int, data: bytes) -> None:
        hdr0 = self.pdev.header_type == 0
        if hdr0 and (P.PCI_BASE_ADDRESS_0 <= pos < P.PCI_BASE_ADDRESS_0 + 24 or P.PCI_ROM_ADDRESS <= pos < 0x34):
            # BARs and ROM: store as written; reads apply the size mask
            self.vconfig[pos:pos + len(data)] = data
            return
        flr = False
        if self.pcie_pos and pos <= self.pcie_pos + PCI_EXP_DEVCTL + 1 < pos + len(data):
            hi = data[self.pcie_pos + PCI_EXP_DEVCTL + 1 - pos]
            flr = bool(hi & (PCI_EXP_DEVCTL_BCR_FLR >> 8)) and self.pdev.has_flr
        for k, b in enumerate(data):
            off = pos + k
            wm, wc = self.wmask[off], self.w1c[off]
            cur = self.vconfig[off]
            new = (cur & ~wm) | (b & wm)
            new &= ~(b & wc) & 0xFF
            self.vconfig[off] = new
        if flr and self.on_flr is not None:
            self.on_flr()

    # -- helpers for the rest of vfio-pci -------------------------------------
    def read16(self, off: int) -> int:
        return int(struct.unpack_from("<H", self.vconfig, off)[0])

    def write16(self, off: int, v: int) -> None:
        struct.pack_into("<H", self.vconfig, off, v & 0xFFFF)

    @property
    def command(self) -> int:
        return self.read16(P.PCI_COMMAND)

    @property
    def power_state(self) -> int:
        """PCI_PM_CTRL_STATE_MASK of the PM capability (0 = D0, 3 = D3hot); D0 without one."""
        if not self.pm_pos:
            return 0
        return self.read16(self.pm_pos + P.PCI_PM_CTRL) & 0x3

    def memory_enabled(self) -> bool:
        """Models __vfio_pci_memory_enabled(): memory decode on and not in D3hot."""
        return self.power_state < 3 and bool(self.command & PCI_COMMAND_MEMORY)

    def reload_bars(self) -> None:
        """vfio_config_init() at open: the BAR/ROM registers show the assigned addresses again."""
        self.vconfig[P.PCI_BASE_ADDRESS_0:P.PCI_BASE_ADDRESS_0 + 24] = \
            self.power_on[P.PCI_BASE_ADDRESS_0:P.PCI_BASE_ADDRESS_0 + 24]
        self.vconfig[P.PCI_ROM_ADDRESS:P.PCI_ROM_ADDRESS + 4] = self.power_on[P.PCI_ROM_ADDRESS:P.PCI_ROM_ADDRESS + 4]

    def enable_decode(self) -> None:
        """pci_enable_device(): turn on decode for the BAR kinds present."""
        cmd = self.command
        for k, s in zip(self.bar_kinds, self.bar_sizes, strict=True):
            if k is not None and s:
                cmd |= PCI_COMMAND_IO if k is BarKind.IO else PCI_COMMAND_MEMORY
        self.write16(P.PCI_COMMAND, cmd)

    def reset(self) -> None:
        """A function/bus reset, then pci_restore_state(): power-on bytes except the saved state."""
        for off in range(self.size):
            if not self.keep[off]:
                self.vconfig[off] = self.power_on[off]
            else:
                k = self.keep[off]
                self.vconfig[off] = (self.vconfig[off] & k) | (self.power_on[off] & ~k & 0xFF)

    def snapshot(self) -> bytes:
        return bytes(self.vconfig)
