"""Config-space bytes: the builder's layout, and config given as real bytes."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fakedev.kernel.pci import (
    PCI_CAP_ID_AF,
    PCI_CAP_ID_EXP,
    PCI_CAP_ID_MSI,
    PCI_CAP_ID_MSIX,
    PCI_CAP_ID_PM,
    PCI_EXT_CAP_ID_ACS,
    Bar,
    BarKind,
    PciBus,
    PciDev,
)
from fakedev.tree import TreeError, load_tree
from fakedev.tree.config import (
    AfCap,
    BridgeBuses,
    DumpError,
    FunctionSpec,
    MsiCap,
    MsixCap,
    PcieCap,
    PmCap,
    Window,
    bars_from_config,
    build_config,
    msi_cap_len,
    parse_config_bytes,
    parse_lspci_dump,
)
from fakedev.tree.loader import FIXTURES


def as_dev(cfg: bytes | bytearray) -> PciDev:
    return PciDev(bus=PciBus(0, 1), devfn=0, config=bytearray(cfg))


def u16(b: bytes | bytearray, off: int) -> int:
    return int(struct.unpack_from("<H", b, off)[0])


def u32(b: bytes | bytearray, off: int) -> int:
    return int(struct.unpack_from("<I", b, off)[0])


def nic_spec(**kw: object) -> FunctionSpec:
    base: dict[str, object] = dict(
        vendor=0x8086, device=0x10C9, class_code=0x020000, revision=1,
        subsystem_vendor=0x8086, subsystem_device=0xA03C, multifunction=True,
        interrupt_pin=1, interrupt_line=16,
        bars=(Bar(0, BarKind.MEM32, 0x20000, address=0xC0000000),
              Bar(2, BarKind.MEM64, 0x4000, True, address=0x40_0000_0000),
              Bar(4, BarKind.IO, 0x20, address=0x2000)),
        rom_size=0x10000, rom_address=0xC0100000,
        pm=PmCap(no_soft_reset=True), msi=MsiCap(8, True, True),
        pcie=PcieCap(0, flr=True), msix=MsixCap(10, 2, 0, 2, 0x2000), af=AfCap(True),
        acs=True, cfg_size=4096,
    )  # fmt: skip
    base.update(kw)
    return FunctionSpec(**base)  # type: ignore[arg-type]


def test_type0_header() -> None:
    cfg = build_config(nic_spec())
    assert len(cfg) == 4096
    assert u16(cfg, 0) == 0x8086 and u16(cfg, 2) == 0x10C9
    assert cfg[0x08] == 1 and cfg[0x09:0x0C] == bytes([0x00, 0x00, 0x02])
    assert cfg[0x0E] == 0x80  # type 0, multifunction
    assert u16(cfg, 0x06) & 0x10  # capability list
    assert u32(cfg, 0x10) == 0xC0000000
    assert u32(cfg, 0x18) == 0x0000000C and u32(cfg, 0x1C) == 0x40  # 64-bit prefetchable
    assert u32(cfg, 0x20) == 0x2001  # I/O
    assert u16(cfg, 0x2C) == 0x8086 and u16(cfg, 0x2E) == 0xA03C
    assert u32(cfg, 0x30) == 0xC0100000
    assert cfg[0x3C] == 16 and cfg[0x3D] == 1


def test_capability_chain() -> None:
    d = as_dev(build_config(nic_spec()))
    ids = [cid for cid, _ in d.capabilities()]
    assert ids == [PCI_CAP_ID_PM, PCI_CAP_ID_MSI, PCI_CAP_ID_EXP, PCI_CAP_ID_MSIX, PCI_CAP_ID_AF]
    offs = [pos for _, pos in d.capabilities()]
    assert offs[0] == 0x40 and all(o % 4 == 0 and o >= 0x40 for o in offs)
    assert d.has_flr and d.has_af_flr and not d.has_pm_reset
    msi = d.find_capability(PCI_CAP_ID_MSI)
    flags = d.cfg_read(msi + 2, 2)
    assert (flags >> 1) & 7 == 3 and flags & 0x80 and flags & 0x100
    x = d.find_capability(PCI_CAP_ID_MSIX)
    assert d.cfg_read(x + 2, 2) == 9
    assert d.cfg_read(x + 4, 4) == 2 and d.cfg_read(x + 8, 4) == 0x2002
    assert d.pcie_type == 0
    assert list(d.ext_capabilities()) == [(PCI_EXT_CAP_ID_ACS, 0x100)]


def test_no_caps_means_no_cap_list() -> None:
    spec = FunctionSpec(vendor=0x1B36, device=0xFF, class_code=0xFF0000)
    cfg = build_config(spec)
    assert len(cfg) == 256 and u16(cfg, 6) == 0 and cfg[0x34] == 0
    assert list(as_dev(cfg).capabilities()) == []


def test_type1_header_and_windows() -> None:
    spec = FunctionSpec(
        vendor=0x8086, device=0xA110, class_code=0x060400,
        bridge=BridgeBuses(0, 1, 3), mem_window=Window(0xC0000000, 0xC01FFFFF),
        pref_window=Window(0x40_0000_0000, 0x40_000F_FFFF), io_window=None,
        pcie=PcieCap(4), cfg_size=4096,
    )  # fmt: skip
    cfg = build_config(spec)
    assert cfg[0x0E] == 1
    assert (cfg[0x18], cfg[0x19], cfg[0x1A]) == (0, 1, 3)
    assert u16(cfg, 0x20) == 0xC000 and u16(cfg, 0x22) == 0xC010
    assert u16(cfg, 0x24) & 0xF == 1 and u32(cfg, 0x28) == 0x40 and u32(cfg, 0x2C) == 0x40
    assert cfg[0x1C] > cfg[0x1D]  # closed I/O window
    assert as_dev(cfg).pcie_type == 4


def test_acs_needs_extended_space() -> None:
    with pytest.raises(ValueError, match="4096"):
        build_config(nic_spec(cfg_size=256))


@settings(max_examples=60, deadline=None)
@given(
    pm=st.none() | st.builds(PmCap, st.booleans()),
    msi=st.none()
    | st.builds(MsiCap, st.sampled_from([1, 2, 4, 8, 16, 32]), st.booleans(), st.booleans()),
    pcie=st.none() | st.builds(PcieCap, st.sampled_from([0, 1, 9]), st.booleans()),
    msix=st.none() | st.just(MsixCap(4, 0, 0, 0, 0x40)),
    af=st.none() | st.builds(AfCap, st.booleans()),
)
def test_any_cap_combination_is_a_valid_chain(
    pm: PmCap | None,
    msi: MsiCap | None,
    pcie: PcieCap | None,
    msix: MsixCap | None,
    af: AfCap | None,
) -> None:
    spec = FunctionSpec(
        vendor=0x1B36, device=0xFF, class_code=0xFF0000,
        bars=(Bar(0, BarKind.MEM32, 0x1000, address=0xC0000000),),
        pm=pm, msi=msi, pcie=pcie, msix=msix, af=af,
        cfg_size=4096 if pcie else 256,
    )  # fmt: skip
    d = as_dev(build_config(spec))
    expected = [
        cid
        for cid, present in (
            (PCI_CAP_ID_PM, pm),
            (PCI_CAP_ID_MSI, msi),
            (PCI_CAP_ID_EXP, pcie),
            (PCI_CAP_ID_MSIX, msix),
            (PCI_CAP_ID_AF, af),
        )
        if present is not None
    ]
    caps = list(d.capabilities())
    assert [c for c, _ in caps] == expected
    lens = {PCI_CAP_ID_PM: 8, PCI_CAP_ID_EXP: 0x3C, PCI_CAP_ID_MSIX: 12, PCI_CAP_ID_AF: 6}
    if msi is not None:
        lens[PCI_CAP_ID_MSI] = msi_cap_len(msi.addr64, msi.maskable)
    end = 0x40
    for cid, pos in caps:
        assert pos % 4 == 0 and pos >= end  # aligned, non-overlapping, in order
        end = pos + lens[cid]
    assert end <= 256
    assert d.has_flr == bool(pcie and pcie.flr)
    assert d.has_af_flr == bool(af and af.flr)
    assert d.has_pm_reset == bool(pm and not pm.no_soft_reset)


# -- config as real bytes ----------------------------------------------------


def dump_text(
    cfg: bytes, head: str = "01:00.0 Ethernet controller: Intel Corporation 82576"
) -> str:
    lines = [head]
    for off in range(0, len(cfg), 16):
        lines.append(f"{off:02x}: " + " ".join(f"{b:02x}" for b in cfg[off : off + 16]))
    return "\n".join(lines) + "\n"


def test_parse_lspci_dump_256_and_4096() -> None:
    cfg = build_config(nic_spec())
    assert parse_lspci_dump(dump_text(cfg)) == cfg
    assert parse_lspci_dump(dump_text(cfg[:256])) == cfg[:256]


def test_parse_lspci_dump_picks_the_device() -> None:
    a = build_config(nic_spec())
    b = build_config(nic_spec(device=0x1234))
    text = dump_text(a, "01:00.0 x") + "\n" + dump_text(b, "01:00.1 y")
    assert parse_lspci_dump(text, "0000:01:00.1") == b
    with pytest.raises(DumpError, match="holds 2 devices"):
        parse_lspci_dump(text)


def test_parse_lspci_dump_incomplete() -> None:
    cfg = build_config(nic_spec())
    text = dump_text(cfg[:256]).replace("\n80:", "\nzz:")
    with pytest.raises(DumpError):
        parse_lspci_dump(text)
    lines = dump_text(cfg[:256]).splitlines()
    del lines[5]
    with pytest.raises(DumpError, match="missing"):
        parse_lspci_dump("\n".join(lines))


def test_parse_config_bytes_binary_and_text() -> None:
    cfg = bytes(build_config(nic_spec()))
    assert parse_config_bytes(cfg) == cfg
    assert parse_config_bytes(cfg[:256]) == cfg[:256]
    assert parse_config_bytes(dump_text(cfg).encode()) == cfg
    with pytest.raises(DumpError, match="256 or 4096"):
        parse_config_bytes(b"\xff" * 300)


def test_bars_from_config() -> None:
    cfg = build_config(nic_spec())
    bars = bars_from_config(cfg)
    assert [(b.index, b.kind, b.prefetchable, b.address) for b in bars] == [
        (0, BarKind.MEM32, False, 0xC0000000),
        (2, BarKind.MEM64, True, 0x40_0000_0000),
        (4, BarKind.IO, False, 0x2000),
    ]


def _file_tree(tmp_path: Path, config_line: str, extra: str = "") -> Path:
    rp = (FIXTURES / "dual-function-nic.toml").read_text().split("[[function]]")[1]
    text = (
        "[[function]]"
        + rp
        + "[[function]]\n"
        + 'bdf = "0000:01:00.0"\n'
        + config_line
        + "\n"
        + extra
    )
    p = tmp_path / "tree.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("form", ["binary", "dump"])
def test_tree_with_config_file(tmp_path: Path, form: str) -> None:
    ref = load_tree(FIXTURES / "dual-function-nic.toml").topology.find("0000:01:00.0")
    assert ref is not None
    if form == "binary":
        (tmp_path / "cfg.bin").write_bytes(bytes(ref.config))
        name = "cfg.bin"
    else:
        (tmp_path / "cfg.txt").write_text(dump_text(bytes(ref.config)))
        name = "cfg.txt"
    extra = 'iommu_group = 13\nbars = [{ index = 0, type = "mem32", size = 0x20000 }, { index = 2, type = "mem64", size = 0x4000 }]\n'
    t = load_tree(_file_tree(tmp_path, f'config_file = "{name}"', extra))
    d = t.topology.find("0000:01:00.0")
    assert d is not None
    assert d.config == ref.config
    assert d.driver == "vfio-pci" and d.iommu_group == 13
    assert [(b.index, b.size, b.address) for b in d.bars] == [
        (b.index, b.size, b.address) for b in ref.bars
    ]
    assert [r.value for r in d.reset_methods()] == ["bus"]


def test_config_file_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_text("00: 86 80\n")
    p = _file_tree(tmp_path, 'config_file = "bad.txt"  # here')
    with pytest.raises(TreeError) as ei:
        load_tree(p)
    assert "config_file" in ei.value.field and "bad.txt" in ei.value.problem
    assert p.read_text().splitlines()[ei.value.line - 1].startswith("config_file")
    p = _file_tree(tmp_path, 'config_file = "absent.bin"\nvendor = 0x1b36')
    with pytest.raises(TreeError, match="unknown field 'vendor'"):
        load_tree(p)
    p = _file_tree(tmp_path, 'config_file = "absent.bin"')
    with pytest.raises(TreeError, match="cannot read"):
        load_tree(p)


def test_config_file_with_a_capability_past_the_end(tmp_path: Path) -> None:
    cfg = bytearray(build_config(nic_spec()))
    cfg[0x34] = 0xFC  # chain starts with a capability that cannot fit
    cfg[0xFC] = 0x10
    (tmp_path / "cut.bin").write_bytes(bytes(cfg))
    extra = 'iommu_group = 13\nbars = [{ index = 0, type = "mem32", size = 0x20000 }]\n'
    with pytest.raises(TreeError, match="runs past"):
        load_tree(_file_tree(tmp_path, 'config_file = "cut.bin"', extra))


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=256, max_size=256), status=st.booleans(), ptr=st.integers(0, 255))
def test_any_config_bytes_load_or_are_refused(data: bytes, status: bool, ptr: int) -> None:
    import tempfile

    from fakedev.host.sysfs import resource_lines

    cfg = bytearray(data)
    cfg[0:2] = b"\x36\x1b"
    cfg[0x0E] &= 0x81  # header type 0 or 1
    cfg[0x06] = 0x10 if status else 0
    cfg[0x34] = ptr
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "c.bin").write_bytes(bytes(cfg))
        head = 'root_buses = ["0000:00"]\n[[function]]\nbdf = "0000:00:02.0"\n'
        sec = "secondary_bus = 5\n" if cfg[0x0E] & 0x7F == 1 else ""
        (t / "tree.toml").write_text(head + 'config_file = "c.bin"\n' + sec)
        try:
            tree = load_tree(t / "tree.toml")
        except TreeError:
            return
    for d in tree.topology.devices():
        d.reset_methods()
        assert len(resource_lines(d)) in (13, 17)
