"""vfio-pci's virtualized config space (region 7): what QEMU reads and writes."""

from __future__ import annotations

import errno as E
import struct

from fakedev.kernel import pci as P
from tests.kernel.conftest import Proc, Rig, errno_of

CFG = 7 << 40
DEV = "0000:02:00.0"


def setup(topology: str = "flr-device") -> tuple[Rig, Proc, int]:
    r = Rig(topology)
    p = r["p"]
    a = p.open("iommu")
    d, _ = p.cdev_bound(0, a)
    return r, p, d


def rd32(p: Proc, d: int, off: int) -> int:
    return int(struct.unpack("<I", p.read(d, CFG + off, 4))[0])


def wr32(p: Proc, d: int, off: int, v: int) -> None:
    p.write(d, CFG + off, struct.pack("<I", v))


def test_whole_config_read_and_bounds() -> None:
    r, p, d = setup()
    data = p.read(d, CFG, 4096)
    assert len(data) == 4096
    pdev = r.topo.find(DEV)
    assert pdev is not None
    assert data[:4] == bytes(pdev.config[:4])  # vendor/device pass through
    assert data[P.PCI_CAPABILITY_LIST] == pdev.config[P.PCI_CAPABILITY_LIST]
    assert errno_of(lambda: p.read(d, CFG + 4096, 1)) == E.EFAULT
    assert errno_of(lambda: p.read(d, CFG + 4094, 4)) == E.EFAULT
    assert p.read(d, CFG + 1, 3) == data[1:4]  # unaligned pieces
    _, q, e = setup("root-bus")
    assert len(q.read(e, CFG, 256)) == 256
    assert errno_of(lambda: q.read(e, CFG + 256, 4)) == E.EFAULT


def test_bar_sizing() -> None:
    _, p, d = setup()
    # BAR0: 1 MiB 64-bit prefetchable at 0x40_0000_0000
    assert rd32(p, d, 0x10) == 0x0000000C and rd32(p, d, 0x14) == 0x40
    wr32(p, d, 0x10, 0xFFFFFFFF)
    wr32(p, d, 0x14, 0xFFFFFFFF)
    assert rd32(p, d, 0x10) == 0xFFF0000C  # ~(1M-1) | 64-bit | prefetch
    assert rd32(p, d, 0x14) == 0xFFFFFFFF
    wr32(p, d, 0x10, 0xFE000000)
    assert rd32(p, d, 0x10) == 0xFE00000C
    # BAR4: 4 KiB 32-bit
    wr32(p, d, 0x20, 0xFFFFFFFF)
    assert rd32(p, d, 0x20) == 0xFFFFF000
    # unimplemented BAR reads 0 whatever is written
    wr32(p, d, 0x1C, 0xFFFFFFFF)
    assert rd32(p, d, 0x1C) == 0


def test_io_bar_sizing() -> None:
    _, p, d = setup("dual-function-nic")
    wr32(p, d, 0x18, 0xFFFFFFFF)  # BAR2: 32-byte I/O
    assert rd32(p, d, 0x18) == 0xFFFFFFE1


def test_rom_sizing() -> None:
    _, p, d = setup()
    wr32(p, d, 0x30, 0xFFFFF800)
    assert rd32(p, d, 0x30) == 0xFFFF0000  # 64K ROM, enable bit clear
    wr32(p, d, 0x30, 0xFFFFF801)
    assert rd32(p, d, 0x30) == 0xFFFF0001
    _, q, e = setup("dual-function-nic")  # no ROM
    wr32(q, e, 0x30, 0xFFFFF800)
    assert rd32(q, e, 0x30) == 0


def test_command_status_and_readonly_fields() -> None:
    _, p, d = setup()
    p.write(d, CFG + 4, b"\xff\xff")
    assert int.from_bytes(p.read(d, CFG + 4, 2), "little") == 0x0547
    p.write(d, CFG + 0, b"\0\0\0\0")  # vendor/device are read-only
    assert p.read(d, CFG, 2) != b"\0\0"
    p.write(d, CFG + 0x3D, b"\x04")  # interrupt pin read-only
    assert p.read(d, CFG + 0x3D, 1) == b"\x01"
    p.write(d, CFG + 0x3C, b"\x0a")
    assert p.read(d, CFG + 0x3C, 1) == b"\x0a"
    status = int.from_bytes(p.read(d, CFG + 6, 2), "little")
    p.write(d, CFG + 6, b"\xff\xff")  # write-1-to-clear leaves CAP_LIST
    assert int.from_bytes(p.read(d, CFG + 6, 2), "little") == status & ~0xF900


def test_msi_and_msix_fields_writable() -> None:
    r, p, d = setup()
    pdev = r.topo.find(DEV)
    assert pdev is not None
    msi = pdev.find_capability(P.PCI_CAP_ID_MSI)
    flags = int.from_bytes(p.read(d, CFG + msi + 2, 2), "little")
    p.write(d, CFG + msi + 2, (flags | 0x1 | 0x20).to_bytes(2, "little"))
    assert int.from_bytes(p.read(d, CFG + msi + 2, 2), "little") == flags | 0x21
    wr32(p, d, msi + 4, 0xFEE00000)
    assert rd32(p, d, msi + 4) == 0xFEE00000
    msix = pdev.find_capability(P.PCI_CAP_ID_MSIX)
    ctl = int.from_bytes(p.read(d, CFG + msix + 2, 2), "little")
    p.write(d, CFG + msix + 2, (0xC000 | 0x7FF).to_bytes(2, "little"))
    assert int.from_bytes(p.read(d, CFG + msix + 2, 2), "little") == (ctl & 0x7FF) | 0xC000  # size read-only


def test_flr_through_devctl_and_reset_restores_saved_state() -> None:
    r, p, d = setup()
    pdev = r.topo.find(DEV)
    assert pdev is not None
    exp = pdev.find_capability(P.PCI_CAP_ID_EXP)
    pm = pdev.find_capability(P.PCI_CAP_ID_PM)
    wr32(p, d, 0x10, 0xFE000000)
    p.write(d, 0x40, b"\x99")  # BAR0 content
    p.write(d, CFG + pm + 4, b"\x03\x00")  # D3hot
    assert p.read(d, CFG + pm + 4, 1) == b"\x03"
    n = len(r.k.reset_log)
    p.write(d, CFG + exp + 8, (0x8000).to_bytes(2, "little"))  # Initiate FLR
    rec = r.k.reset_log[n]
    assert (rec.bdf, rec.method, rec.cause) == (DEV, "flr", "PCI_EXP_DEVCTL_BCR_FLR")
    assert rd32(p, d, 0x10) == 0xFE00000C  # BAR restored by pci_restore_state
    assert p.read(d, CFG + pm + 4, 1) == b"\x00"  # power state back to D0
    assert p.read(d, 0x40, 1) == b"\x00"  # device memory lost


def test_d3hot_blocks_bar_access_and_reopen_reloads_bars() -> None:
    r, p, d = setup()
    pdev = r.topo.find(DEV)
    assert pdev is not None
    pm = pdev.find_capability(P.PCI_CAP_ID_PM)
    p.write(d, CFG + pm + 4, b"\x03\x00")
    assert errno_of(lambda: p.read(d, 0, 4)) == E.EIO
    p.write(d, CFG + pm + 4, b"\x00\x00")
    assert p.read(d, 0, 4) == bytes(4)
    wr32(p, d, 0x20, 0xFFFFFFFF)
    a = p.open("iommu")
    p.close(d)
    d2, _ = p.cdev_bound(0, a)
    assert rd32(p, d2, 0x20) == 0xF7000000  # the assigned address, not the sizing pattern
