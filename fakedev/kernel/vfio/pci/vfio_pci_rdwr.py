"""BAR and ROM access through read/write on the device fd.

Mirrors drivers/vfio/pci/vfio_pci_rdwr.c: ``vfio_pci_bar_rw`` and
``vfio_pci_core_do_io_rw`` (accesses chopped into naturally aligned 8/4/2/1
byte pieces, the MSI-X table range of its BAR reads as 0xff and drops writes,
memory BARs give EIO while memory decode is off in the virtual command
register). What a BAR *does* is a ``BarBehaviour``: the default is
``RamBars``, a register file that remembers what was written; a device tree
can supply another behaviour object.
"""

from __future__ import annotations

import errno
from typing import Protocol

from fakedev.kernel import pci as P
from fakedev.kernel.errors import KernelError
from fakedev.kernel.pci import BarKind, PciDev

PAGE = 4096


class BarBehaviour(Protocol):
    """What a device's BARs do when read and written."""

    def read(self, bar: int, off: int, size: int) -> bytes:
        """One naturally aligned access of 1, 2, 4 or 8 bytes."""

    def write(self, bar: int, off: int, data: bytes) -> None:
        """One naturally aligned access of 1, 2, 4 or 8 bytes."""

    def reset(self) -> None:
        """The function was reset: back to power-on state."""


class RamBars:
    """Default behaviour: every BAR is RAM (zero at power-on), stored sparsely by page."""

    def __init__(self, pdev: PciDev) -> None:
        self.pages: dict[tuple[int, int], bytearray] = {}

    def read(self, bar: int, off: int, size: int) -> bytes:
        pg = self.pages.get((bar, off // PAGE))
        if pg is None:
            return bytes(size)
        o = off % PAGE
        return bytes(pg[o:o + size])

    def write(self, bar: int, off: int, data: bytes) -> None:
        pg = self.pages.setdefault((bar, off // PAGE), bytearray(PAGE))
        o = off % PAGE
        pg[o:o + len(data)] = data

    def reset(self) -> None:
        self.pages.clear()


def _piece(off: int, count: int) -> int:
    for n in (8, 4, 2):
        if count >= n and not off % n:
            return n
    return 1


def msix_table_range(pdev: PciDev) -> tuple[int, int, int] | None:
    """(bar, start, end) of the MSI-X table, as vfio-pci computes msix_bar/offset/size."""
    pos = pdev.find_capability(P.PCI_CAP_ID_MSIX)
    if not pos:
        return None
    flags = pdev.cfg_read(pos + P.PCI_MSIX_FLAGS, 2)
    table = pdev.cfg_read(pos + P.PCI_MSIX_TABLE, 4)
    nvec = (flags & P.PCI_MSIX_FLAGS_QSIZE) + 1
    bar = table & 7
    start = table & ~7
    size = (nvec * 16 + PAGE - 1) & ~(PAGE - 1)  # PAGE_ALIGN(msix_size)
    return bar, start, start + size


def bar_len(pdev: PciDev, bar: int) -> int:
    for b in pdev.bars:
        if b.index == bar:
            return b.size
    return 0


def bar_kind(pdev: PciDev, bar: int) -> BarKind | None:
    for b in pdev.bars:
        if b.index == bar:
            return b.kind
    return None


def vfio_pci_bar_read(pdev: PciDev, beh: BarBehaviour, bar: int, pos: int, count: int,
                      memory_enabled: bool) -> bytes:
    """Models vfio_pci_bar_rw() for a read."""
    end = _check(pdev, bar, pos, memory_enabled)
    count = min(count, end - pos)
    x = msix_table_range(pdev)
    out = bytearray()
    off = pos
    while off < pos + count:
        left = pos + count - off
        if x is not None and x[0] == bar and x[1] <= off < x[2]:
            n = min(left, x[2] - off)
            out += b"\xff" * n
            off += n
            continue
        n = _piece(off, left)
        if x is not None and x[0] == bar and off < x[1] < off + n:
            n = x[1] - off
            n = _piece(off, n)
        out += beh.read(bar, off, n)
        off += n
    return bytes(out)


def vfio_pci_bar_write(pdev: PciDev, beh: BarBehaviour, bar: int, pos: int, data: bytes,
                       memory_enabled: bool) -> int:
    """Models vfio_pci_bar_rw() for a write; returns bytes consumed."""
    end = _check(pdev, bar, pos, memory_enabled)
    count = min(len(data), end - pos)
    x = msix_table_range(pdev)
    off = pos
    while off < pos + count:
        left = pos + count - off
        if x is not None and x[0] == bar and x[1] <= off < x[2]:
            off += min(left, x[2] - off)
            continue
        n = _piece(off, left)
        if x is not None and x[0] == bar and off < x[1] < off + n:
            n = _piece(off, x[1] - off)
        beh.write(bar, off, data[off - pos: off - pos + n])
        off += n
    return count


def _check(pdev: PciDev, bar: int, pos: int, memory_enabled: bool) -> int:
    end = bar_len(pdev, bar)
    if not end:
        raise KernelError(errno.EINVAL, f"BAR{bar} not implemented")
    if pos >= end:
        raise KernelError(errno.EINVAL, "offset past the end of the BAR")
    if bar_kind(pdev, bar) is not BarKind.IO and not memory_enabled:
        raise KernelError(errno.EIO, "memory decode disabled")
    return end


def rom_image(pdev: PciDev) -> bytes:
    """A minimal valid option ROM (0x55AA signature) filling the ROM BAR."""
    if not pdev.rom_size:
        return b""
    img = bytearray(pdev.rom_size)
    img[0:2] = b"\x55\xaa"
    img[2] = min(255, pdev.rom_size // 512)
    return bytes(img)


def vfio_pci_rom_read(pdev: PciDev, pos: int, count: int) -> bytes:
    """ROM reads (pci_map_rom + the read path); writes are EINVAL in vfio_pci_rw()."""
    img = rom_image(pdev)
    if not img:
        raise KernelError(errno.EINVAL, "no ROM")
    if pos >= len(img):
        raise KernelError(errno.EINVAL)
    return img[pos:pos + count]
