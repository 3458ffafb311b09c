"""Config-space builder: a function's description in, its config space bytes out.

What lives here: the layout of a type 0 (endpoint) and type 1 (bridge) header,
the standard capability chain (PM, MSI, PCIe, MSI-X, AF, placed from 0x40 on,
dword aligned) and the extended capabilities (ACS) from 0x100, plus readers
for config space given as real bytes (a 256/4096-byte binary file or the hex
dump text of ``lspci -xxx``/``-xxxx``).

What must not: no file-format knowledge (the TOML lives in ``loader.py``) and
no validation messages for users; callers hand in specs that are already
checked, and a spec that cannot be laid out raises ``ValueError``.
"""

from __future__ import annotations

import re
import struct

from attrs import field, frozen

from fakedev.kernel.pci import (
    PCI_AF_CAP_FLR,
    PCI_AF_CAP_TP,
    PCI_CAP_ID_AF,
    PCI_CAP_ID_EXP,
    PCI_CAP_ID_MSI,
    PCI_CAP_ID_MSIX,
    PCI_CAP_ID_PM,
    PCI_CFG_SPACE_EXP_SIZE,
    PCI_CFG_SPACE_SIZE,
    PCI_EXP_DEVCAP_FLR,
    PCI_EXP_SLTCAP_HPC,
    PCI_EXP_TYPE_DOWNSTREAM,
    PCI_EXP_TYPE_RC_END,
    PCI_EXP_TYPE_ROOT_PORT,
    PCI_EXT_CAP_ID_ACS,
    PCI_EXT_CAP_ID_SRIOV,
    PCI_EXT_CAP_SRIOV_SIZEOF,
    PCI_MSI_FLAGS_64BIT,
    PCI_MSI_FLAGS_MASKBIT,
    PCI_PM_CTRL_NO_SOFT_RESET,
    PCI_SRIOV_CTRL,
    PCI_SRIOV_CTRL_MSE,
    PCI_SRIOV_CTRL_VFE,
    PCI_SRIOV_INITIAL_VF,
    PCI_SRIOV_NUM_VF,
    PCI_SRIOV_TOTAL_VF,
    PCI_SRIOV_VF_DID,
    PCI_SRIOV_VF_OFFSET,
    PCI_SRIOV_VF_STRIDE,
    PCI_STATUS_CAP_LIST,
    Bar,
    BarKind,
)

PCI_EXP_FLAGS_SLOT = 0x0100
PCI_EXP_SLTCAP_ABP = 0x01  # attention button present
PCI_EXP_SLTCAP_PSN_SHIFT = 19
PCI_EXP_SLTSTA_PDS = 0x0040  # presence detect state
PCI_ACS_SV = 0x01
PCI_ACS_TB = 0x02
PCI_ACS_RR = 0x04
PCI_ACS_CR = 0x08
PCI_ACS_UF = 0x10
PCI_ACS_ALL = PCI_ACS_SV | PCI_ACS_TB | PCI_ACS_RR | PCI_ACS_CR | PCI_ACS_UF

#: bytes each capability structure occupies
PM_CAP_LEN = 8
PCIE_CAP_LEN = 0x3C
MSIX_CAP_LEN = 12
AF_CAP_LEN = 6
ACS_EXT_LEN = 8


def msi_cap_len(addr64: bool, maskable: bool) -> int:
    """Size of the MSI capability (pci_msi_cap_size idea)."""
    n = 14 if addr64 else 10
    if maskable:
        n += 10
    return n


@frozen
class PmCap:
    no_soft_reset: bool = False


@frozen
class MsiCap:
    vectors: int = 1
    addr64: bool = True
    maskable: bool = False


@frozen
class MsixCap:
    table_size: int
    table_bar: int
    table_offset: int
    pba_bar: int
    pba_offset: int


@frozen
class PcieCap:
    port_type: int  # PCI_EXP_TYPE_*
    flr: bool = False
    link_speed: int = 3  # 1=2.5 2=5 3=8 4=16 GT/s
    link_width: int = 4
    port_number: int = 0
    slot: SlotCap | None = None
    #: DevCap2 AtomicOp bits (PCI_EXP_DEVCAP2_ATOMIC_ROUTE / _COMP32 / _COMP64 / _COMP128)
    atomic_cap: int = 0
    #: DevCtl2 AtomicOp Egress Blocking (switch ports)
    atomic_egress_blocked: bool = False


@frozen
class SlotCap:
    """A slot implemented on a root/downstream port (PCIe SltCap/SltSta)."""

    number: int  # physical slot number
    hotplug: bool = True
    occupied: bool = True


@frozen
class AfCap:
    flr: bool = True


@frozen
class SriovCap:
    """An SR-IOV extended capability (a PF): TotalVFs, NumVFs (VF Enable set
    when non-zero), the routing-id offset and stride of the VFs, their device id."""

    total_vfs: int
    num_vfs: int = 0
    vf_offset: int = 0
    vf_stride: int = 0
    vf_device: int = 0


@frozen
class BridgeBuses:
    primary: int
    secondary: int
    subordinate: int


@frozen
class Window:
    """A bridge forwarding window [base, limit] (inclusive limit)."""

    base: int
    limit: int


@frozen
class FunctionSpec:
    """Everything needed to lay out one function's config space."""

    vendor: int
    device: int
    class_code: int
    revision: int = 0
    command: int = 0
    subsystem_vendor: int = 0
    subsystem_device: int = 0
    multifunction: bool = False
    interrupt_pin: int = 1
    interrupt_line: int = 0
    bars: tuple[Bar, ...] = ()
    rom_size: int = 0
    rom_address: int = 0
    bridge: BridgeBuses | None = None
    io_window: Window | None = None
    mem_window: Window | None = None
    pref_window: Window | None = None
    pm: PmCap | None = None
    msi: MsiCap | None = None
    pcie: PcieCap | None = None
    msix: MsixCap | None = None
    af: AfCap | None = None
    acs: bool = False
    sriov: SriovCap | None = None
    cfg_size: int = field(default=PCI_CFG_SPACE_SIZE)


def _put(buf: bytearray, off: int, fmt: str, value: int) -> None:
    struct.pack_into(fmt, buf, off, value)


def _bar_register(bar: Bar) -> tuple[int, int | None]:
    """Low dword (and high dword for 64-bit) of a BAR as the device reports it."""
    if bar.kind is BarKind.IO:
        return (bar.address & 0xFFFFFFFC) | 0x1, None
    flags = 0x8 if bar.prefetchable else 0
    if bar.kind is BarKind.MEM64:
        return (bar.address & 0xFFFFFFF0) | 0x4 | flags, bar.address >> 32
    return (bar.address & 0xFFFFFFF0) | flags, None


def _lay_out_caps(spec: FunctionSpec) -> list[tuple[int, int, bytes]]:
    """(cap id, length, body after the 2-byte header) in chain order."""
    caps: list[tuple[int, int, bytes]] = []
    if spec.pm is not None:
        body = bytearray(PM_CAP_LEN - 2)
        _put(body, 0, "<H", 0x0003)  # PMC: version 3 (PCI PM 1.2)
        _put(body, 2, "<H", PCI_PM_CTRL_NO_SOFT_RESET if spec.pm.no_soft_reset else 0)
        caps.append((PCI_CAP_ID_PM, PM_CAP_LEN, bytes(body)))
    if spec.msi is not None:
        m = spec.msi
        length = msi_cap_len(m.addr64, m.maskable)
        body = bytearray(length - 2)
        flags = (m.vectors.bit_length() - 1) << 1
        if m.addr64:
            flags |= PCI_MSI_FLAGS_64BIT
        if m.maskable:
            flags |= PCI_MSI_FLAGS_MASKBIT
        _put(body, 0, "<H", flags)
        caps.append((PCI_CAP_ID_MSI, length, bytes(body)))
    if spec.pcie is not None:
        caps.append((PCI_CAP_ID_EXP, PCIE_CAP_LEN, _pcie_body(spec.pcie)))
    if spec.msix is not None:
        x = spec.msix
        body = bytearray(MSIX_CAP_LEN - 2)
        _put(body, 0, "<H", x.table_size - 1)
        _put(body, 2, "<I", x.table_offset | x.table_bar)
        _put(body, 6, "<I", x.pba_offset | x.pba_bar)
        caps.append((PCI_CAP_ID_MSIX, MSIX_CAP_LEN, bytes(body)))
    if spec.af is not None:
        body = bytearray(AF_CAP_LEN - 2)
        body[0] = AF_CAP_LEN
        body[1] = (PCI_AF_CAP_TP | PCI_AF_CAP_FLR) if spec.af.flr else 0
        caps.append((PCI_CAP_ID_AF, AF_CAP_LEN, bytes(body)))
    return caps


def _pcie_body(p: PcieCap) -> bytes:
    """PCIe capability v2 (everything after id/next)."""
    body = bytearray(PCIE_CAP_LEN - 2)
    flags = 0x2 | (p.port_type << 4)
    if p.slot is not None:
        flags |= PCI_EXP_FLAGS_SLOT
    _put(body, 0x02 - 2, "<H", flags)
    devcap = 0x1  # max payload 256
    if p.flr:
        devcap |= PCI_EXP_DEVCAP_FLR
    _put(body, 0x04 - 2, "<I", devcap)
    _put(body, 0x08 - 2, "<H", 0x2810)  # MRRS 512, MPS 128, ext tag, relaxed ordering
    if p.port_type != PCI_EXP_TYPE_RC_END:
        _put(body, 0x0C - 2, "<I", (p.port_number << 24) | (p.link_width << 4) | p.link_speed)
        _put(body, 0x12 - 2, "<H", (p.link_width << 4) | p.link_speed)
        _put(body, 0x2C - 2, "<I", ((1 << p.link_speed) - 1) << 1)  # LinkCap2 speeds
        _put(body, 0x30 - 2, "<H", p.link_speed)  # LinkCtl2 target speed
    if p.slot is not None:
        sltcap = p.slot.number << PCI_EXP_SLTCAP_PSN_SHIFT
        if p.slot.hotplug:
            sltcap |= PCI_EXP_SLTCAP_HPC | PCI_EXP_SLTCAP_ABP
        _put(body, 0x14 - 2, "<I", sltcap)
        _put(body, 0x18 - 2, "<H", 0x01C0)  # SltCtl: attention indicator off, power indicator on
        _put(body, 0x1A - 2, "<H", PCI_EXP_SLTSTA_PDS if p.slot.occupied else 0)
    _put(body, 0x24 - 2, "<I", 0x10 | p.atomic_cap)  # DevCap2: completion timeout disable supported
    if p.atomic_egress_blocked:
        _put(body, 0x28 - 2, "<H", 0x0080)  # DevCtl2: AtomicOp Egress Blocking
    return bytes(body)


def build_config(spec: FunctionSpec) -> bytearray:
    """The function's power-on config space (``cfg_size`` bytes)."""
    if spec.cfg_size not in (PCI_CFG_SPACE_SIZE, PCI_CFG_SPACE_EXP_SIZE):
        raise ValueError(f"config space size must be 256 or 4096, not {spec.cfg_size}")
    buf = bytearray(spec.cfg_size)
    _put(buf, 0x00, "<H", spec.vendor)
    _put(buf, 0x02, "<H", spec.device)
    _put(buf, 0x04, "<H", spec.command)
    _put(buf, 0x08, "<I", (spec.class_code << 8) | spec.revision)
    header = 1 if spec.bridge is not None else 0
    buf[0x0E] = header | (0x80 if spec.multifunction else 0)
    nbars = 2 if header == 1 else 6
    for bar in spec.bars:
        if bar.size == 0 or bar.index >= nbars:
            continue
        lo, hi = _bar_register(bar)
        _put(buf, 0x10 + 4 * bar.index, "<I", lo)
        if hi is not None:
            _put(buf, 0x14 + 4 * bar.index, "<I", hi)
    rom_reg = 0x38 if header == 1 else 0x30
    if spec.rom_size:
        _put(buf, rom_reg, "<I", spec.rom_address & 0xFFFFF800)
    if header == 0:
        _put(buf, 0x2C, "<H", spec.subsystem_vendor)
        _put(buf, 0x2E, "<H", spec.subsystem_device)
    else:
        assert spec.bridge is not None
        buf[0x18] = spec.bridge.primary
        buf[0x19] = spec.bridge.secondary
        buf[0x1A] = spec.bridge.subordinate
        _bridge_windows(buf, spec)
    buf[0x3C] = spec.interrupt_line & 0xFF
    buf[0x3D] = spec.interrupt_pin

    caps = _lay_out_caps(spec)
    if caps:
        _put(buf, 0x06, "<H", PCI_STATUS_CAP_LIST)
        pos = 0x40
        prev_next = 0x34
        for cap_id, length, body in caps:
            if pos + length > PCI_CFG_SPACE_SIZE:
                raise ValueError("capabilities do not fit in 256 bytes of config space")
            buf[prev_next] = pos
            buf[pos] = cap_id
            buf[pos + 2 : pos + length] = body
            prev_next = pos + 1
            pos = (pos + length + 3) & ~3
    if spec.acs:
        if spec.cfg_size != PCI_CFG_SPACE_EXP_SIZE:
            raise ValueError("ACS is an extended capability: it needs 4096 bytes of config space")
        _put(buf, 0x100, "<I", PCI_EXT_CAP_ID_ACS | (1 << 16))
        cap = PCI_ACS_ALL
        if spec.pcie is not None and spec.pcie.port_type not in (
            PCI_EXP_TYPE_ROOT_PORT,
            PCI_EXP_TYPE_DOWNSTREAM,
        ):
            cap = PCI_ACS_SV | PCI_ACS_RR | PCI_ACS_CR | PCI_ACS_UF
        _put(buf, 0x104, "<H", cap)
        _put(buf, 0x106, "<H", cap)
    if spec.sriov is not None:
        if spec.cfg_size != PCI_CFG_SPACE_EXP_SIZE:
            raise ValueError("SR-IOV is an extended capability: it needs 4096 bytes of config space")
        pos = 0x140 if spec.acs else 0x100
        if spec.acs:
            _put(buf, 0x100, "<I", PCI_EXT_CAP_ID_ACS | (1 << 16) | (pos << 20))
        _sriov_cap(buf, pos, spec.sriov)
    return buf


def _sriov_cap(buf: bytearray, pos: int, sr: SriovCap) -> None:
    """The SR-IOV capability (PCIe base spec 9.3.3) at ``pos``, last in the chain."""
    _put(buf, pos, "<I", PCI_EXT_CAP_ID_SRIOV | (1 << 16))
    ctrl = (PCI_SRIOV_CTRL_VFE | PCI_SRIOV_CTRL_MSE) if sr.num_vfs else 0
    _put(buf, pos + PCI_SRIOV_CTRL, "<H", ctrl)
    _put(buf, pos + PCI_SRIOV_INITIAL_VF, "<H", sr.total_vfs)
    _put(buf, pos + PCI_SRIOV_TOTAL_VF, "<H", sr.total_vfs)
    _put(buf, pos + PCI_SRIOV_NUM_VF, "<H", sr.num_vfs)
    _put(buf, pos + PCI_SRIOV_VF_OFFSET, "<H", sr.vf_offset)
    _put(buf, pos + PCI_SRIOV_VF_STRIDE, "<H", sr.vf_stride)
    _put(buf, pos + PCI_SRIOV_VF_DID, "<H", sr.vf_device)
    _put(buf, pos + 0x1C, "<I", 0x553)  # Supported Page Sizes: 4K 8K 64K 256K 1M 4M
    _put(buf, pos + 0x20, "<I", 0x1)  # System Page Size: 4K
    assert PCI_SRIOV_VF_DID + 2 <= PCI_EXT_CAP_SRIOV_SIZEOF


def _bridge_windows(buf: bytearray, spec: FunctionSpec) -> None:
    """I/O, memory and prefetchable windows of a type 1 header (closed = base > limit)."""
    io = spec.io_window
    if io is not None:
        buf[0x1C] = ((io.base >> 8) & 0xF0) | 0x1
        buf[0x1D] = ((io.limit >> 8) & 0xF0) | 0x1
        _put(buf, 0x30, "<H", io.base >> 16)
        _put(buf, 0x32, "<H", io.limit >> 16)
    else:
        buf[0x1C] = 0xF1
        buf[0x1D] = 0x01
    mem = spec.mem_window
    if mem is not None:
        _put(buf, 0x20, "<H", (mem.base >> 16) & 0xFFF0)
        _put(buf, 0x22, "<H", (mem.limit >> 16) & 0xFFF0)
    else:
        _put(buf, 0x20, "<H", 0xFFF0)
        _put(buf, 0x22, "<H", 0x0000)
    pref = spec.pref_window
    if pref is not None:
        _put(buf, 0x24, "<H", ((pref.base >> 16) & 0xFFF0) | 0x1)
        _put(buf, 0x26, "<H", ((pref.limit >> 16) & 0xFFF0) | 0x1)
        _put(buf, 0x28, "<I", pref.base >> 32)
        _put(buf, 0x2C, "<I", pref.limit >> 32)
    else:
        _put(buf, 0x24, "<H", 0xFFF1)
        _put(buf, 0x26, "<H", 0x0001)


# -- config space given as real bytes --------------------------------------

_DUMP_LINE = re.compile(r"^([0-9a-fA-F]{2,3}):((?:\s+[0-9a-fA-F]{2}){1,16})\s*$")
_DUMP_HEAD = re.compile(r"^((?:[0-9a-fA-F]{4,8}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7])\s")


class DumpError(ValueError):
    """A config dump that cannot be read; ``line`` is 1-based within the dump (0 = whole)."""

    def __init__(self, message: str, line: int = 0) -> None:
        super().__init__(message)
        self.line = line


def parse_lspci_dump(text: str, bdf: str | None = None) -> bytearray:
    """Config bytes from ``lspci -xxx`` (256) or ``lspci -xxxx`` (4096) output.

    The text may hold several devices (each opened by its ``bus:dev.fn`` line);
    ``bdf`` (``0000:01:00.0`` or ``01:00.0``) picks one, else there must be one.
    """
    blocks: list[tuple[str | None, int, dict[int, bytes]]] = []
    cur: dict[int, bytes] | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not line.strip():
            continue
        head = _DUMP_HEAD.match(line)
        if head:
            cur = {}
            blocks.append((head.group(1).lower(), lineno, cur))
            continue
        m = _DUMP_LINE.match(line.strip())
        if not m:
            if cur is None or not line[:1].isspace():
                raise DumpError(f"not an lspci -xxx line: {line.strip()[:40]!r}", lineno)
            continue  # indented -v decoding lines
        if cur is None:
            cur = {}
            blocks.append((None, lineno, cur))
        off = int(m.group(1), 16)
        data = bytes(int(x, 16) for x in m.group(2).split())
        if off % 16 or len(data) != 16:
            raise DumpError(
                f"dump line at offset {off:#x} must hold 16 bytes at a 16-byte offset", lineno
            )
        if off in cur:
            raise DumpError(f"offset {off:#x} appears twice", lineno)
        cur[off] = data
    if not blocks:
        raise DumpError("no hex dump lines found (expected 'lspci -xxx' output)")
    if bdf is not None and len(blocks) > 1:
        want = bdf.lower()
        short = want[5:] if len(want) == 12 else want
        chosen = [b for b in blocks if b[0] in (want, short)]
        if len(chosen) != 1:
            raise DumpError(f"the dump holds {len(blocks)} devices and none is {bdf}")
        blocks = chosen
    elif len(blocks) > 1:
        raise DumpError(f"the dump holds {len(blocks)} devices; say which with the bdf")
    _, first_line, lines = blocks[0]
    size = PCI_CFG_SPACE_EXP_SIZE if max(lines) >= PCI_CFG_SPACE_SIZE else PCI_CFG_SPACE_SIZE
    missing = [o for o in range(0, size, 16) if o not in lines]
    if missing:
        raise DumpError(
            f"dump is incomplete: offset {missing[0]:#x} missing (need all of 0x00-{size - 16:#x};"
            " use lspci -xxx for 256 bytes or -xxxx for 4096)",
            first_line,
        )
    return bytearray(b"".join(lines[o] for o in range(0, size, 16)))


def parse_config_bytes(data: bytes, bdf: str | None = None) -> bytearray:
    """A config file's content: raw 256/4096 bytes, or lspci hex dump text."""
    if len(data) in (PCI_CFG_SPACE_SIZE, PCI_CFG_SPACE_EXP_SIZE):
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            return bytearray(data)
        if not _looks_like_dump(text):
            return bytearray(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DumpError(
            f"{len(data)} bytes of binary: a raw config space must be exactly 256 or 4096 bytes"
        ) from e
    return parse_lspci_dump(text, bdf)


def _looks_like_dump(text: str) -> bool:
    return any(_DUMP_LINE.match(line.strip()) for line in text.splitlines()[:4])


def bars_from_config(config: bytes | bytearray) -> list[Bar]:
    """BAR kinds and addresses read from the registers; size guessed from alignment.

    A dump holds no BAR sizes; an assigned BAR is aligned to its size, so the
    lowest set address bit is an upper bound used when the tree gives none.
    """
    header = config[0x0E] & 0x7F
    n = 2 if header == 1 else 6
    out: list[Bar] = []
    i = 0
    while i < n:
        lo = struct.unpack_from("<I", config, 0x10 + 4 * i)[0]
        if lo == 0:
            i += 1
            continue
        if lo & 1:
            addr = lo & 0xFFFFFFFC
            out.append(Bar(i, BarKind.IO, _align_size(addr, 4), address=addr))
            i += 1
            continue
        pref = bool(lo & 0x8)
        if (lo >> 1) & 3 == 2 and i + 1 < n:
            hi = struct.unpack_from("<I", config, 0x14 + 4 * i)[0]
            addr = (hi << 32) | (lo & 0xFFFFFFF0)
            out.append(Bar(i, BarKind.MEM64, _align_size(addr, 16), pref, addr))
            i += 2
            continue
        addr = lo & 0xFFFFFFF0
        out.append(Bar(i, BarKind.MEM32, _align_size(addr, 16), pref, addr))
        i += 1
    return out


def _align_size(addr: int, minimum: int) -> int:
    if addr == 0:
        return 0
    low = addr & -addr
    return max(minimum, min(low, 1 << 30))
