"""Malformed trees are refused whole with a TreeError naming file, line and field.

Each case is a tree text in which the offending line carries the marker
``#<`` ; the error must name that line, the field and say what is wrong.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fakedev.tree import TreeError, load_tree

GOOD = """\
[[function]]
bdf = "0000:00:1c.0"
kind = "root-port"
vendor = 0x8086
device = 0xa110
secondary_bus = 1
iommu_group = 12
capabilities.acs = true

[[function]]
bdf = "0000:01:00.0"
vendor = 0x1b36
device = 0x00ff
class = 0x020000
iommu_group = 13
bars = [
    { index = 0, type = "mem32", size = 0x1000 },
    { index = 2, type = "mem64", size = 0x4000 },
]
[function.capabilities]
pm = { no_soft_reset = true }
msi = { vectors = 1 }
pcie = {}
msix = { table_size = 4, table_bar = 2 }
"""

# (case id, replacement of GOOD's text: (old, new), field text, problem text)
CASES: list[tuple[str, tuple[str, str], str, str]] = [
    (
        "bar-size-not-pow2",
        ("size = 0x4000 }", "size = 0x3000 } #<"),
        "bars[1].size",
        "power of two",
    ),
    (
        "bar-index-range",
        ('{ index = 2, type = "mem64"', '{ index = 6, type = "mem64"'),
        "index",
        "0..5",
    ),
    (
        "bar-64-overlap",
        ('{ index = 2, type = "mem64"', '{ index = 0, type = "mem64"'),
        "index",
        "overlaps",
    ),
    ("bar-type", ('type = "mem32"', 'type = "mem16"'), "type", "mem32"),
    (
        "io-bar-too-big",
        ('type = "mem32", size = 0x1000', 'type = "io", size = 0x1000'),
        "size",
        "I/O BAR",
    ),
    (
        "msi-vectors",
        ("msi = { vectors = 1 }", "msi = { vectors = 3 } #<"),
        "msi.vectors",
        "1, 2, 4",
    ),
    ("msix-table-too-big", ("table_size = 4,", "table_size = 2048,"), "msix", "does not fit"),
    ("msix-io-bar", ("table_bar = 2 }", "table_bar = 1 }"), "msix.table_bar", "not a memory BAR"),
    ("unknown-field", ("class = 0x020000", "clas = 0x020000 #<"), "clas", "unknown field"),
    (
        "unknown-cap",
        ("pm = { no_soft_reset = true }", "pmx = { no_soft_reset = true } #<"),
        "pmx",
        "unknown field",
    ),
    ("vendor-type", ("vendor = 0x1b36", 'vendor = "redhat" #<'), "vendor", "integer"),
    ("vendor-none", ("vendor = 0x1b36", "vendor = 0xffff #<"), "vendor", "not a vendor"),
    ("bad-bdf", ('bdf = "0000:01:00.0"', 'bdf = "0000:01:00.9" #<'), "bdf", "function address"),
    (
        "duplicate-bdf",
        ('bdf = "0000:01:00.0"', 'bdf = "0000:00:1c.0" #<'),
        "bdf",
        "already defined",
    ),
    (
        "orphan-bus",
        ('bdf = "0000:01:00.0"', 'bdf = "0000:02:00.0" #<'),
        "bdf",
        "neither a root bus",
    ),
    ("bridge-without-bus", ("secondary_bus = 1\n", ""), "function[0]", "secondary_bus"),
    (
        "endpoint-secondary",
        ("class = 0x020000", "class = 0x020000\nsecondary_bus = 3 #<"),
        "secondary_bus",
        "only bridges",
    ),
    ("unknown-kind", ('kind = "root-port"', 'kind = "root-complex" #<'), "kind", "unknown kind"),
    ("group-string", ("iommu_group = 13", 'iommu_group = "13" #<'), "iommu_group", "group number"),
    (
        "reset-method",
        ("iommu_group = 13", 'iommu_group = 13\nreset_methods = ["flr", "warm"] #<'),
        "reset_methods",
        "warm",
    ),
    (
        "driver-name",
        ("iommu_group = 13", 'iommu_group = 13\ndriver = "vfio pci" #<'),
        "driver",
        "driver name",
    ),
    (
        "vfio-on-bridge",
        ("iommu_group = 12", 'iommu_group = 12\ndriver = "vfio-pci" #<'),
        "driver",
        "bridges",
    ),
    (
        "acs-small-config",
        ("iommu_group = 12", "iommu_group = 12\nconfig_size = 256"),
        "acs",
        "4096",
    ),
    (
        "slot-on-endpoint",
        ("iommu_group = 13", "iommu_group = 13\nslot = { number = 1 } #<"),
        "slot",
        "root-port or downstream-port",
    ),
    (
        "slot-reset-no-hotplug",
        (
            "iommu_group = 12",
            "iommu_group = 12\nslot = { number = 1, hotplug = false, reset = true } #<",
        ),
        "slot.reset",
        "hot-plug",
    ),
    (
        "function-without-0",
        ('bdf = "0000:01:00.0"', 'bdf = "0000:01:00.1" #<'),
        "bdf",
        "function 0",
    ),
    (
        "device-behind-port",
        ('bdf = "0000:01:00.0"', 'bdf = "0000:01:03.0" #<'),
        "bdf",
        "only device 00",
    ),
    (
        "kernel-version",
        (
            '[[function]]\nbdf = "0000:00:1c.0"',
            'kernel = "5.10" #<\n[[function]]\nbdf = "0000:00:1c.0"',
        ),
        "kernel",
        "older",
    ),
    (
        "rom-size",
        ("iommu_group = 13", "iommu_group = 13\nrom_size = 0x100 #<"),
        "rom_size",
        "power of two",
    ),
    (
        "pin",
        ("iommu_group = 13", 'iommu_group = 13\ninterrupt_pin = "E" #<'),
        "interrupt_pin",
        '"A".."D"',
    ),
    (
        "fault-device",
        (
            '[[function]]\nbdf = "0000:00:1c.0"',
            '[[fault]]\nkind = "memory-lock-busy"\ndevice = "0000:09:00.0" #<\n\n[[function]]\nbdf = "0000:00:1c.0"',
        ),
        "device",
        "no function",
    ),
    (
        "fault-kind",
        (
            '[[function]]\nbdf = "0000:00:1c.0"',
            '[[fault]]\nkind = "explode" #<\ndevice = "0000:01:00.0"\n\n[[function]]\nbdf = "0000:00:1c.0"',
        ),
        "kind",
        "must be one of",
    ),
    (
        "fault-errno",
        (
            '[[function]]\nbdf = "0000:00:1c.0"',
            '[[fault]]\nkind = "reset-fails"\ndevice = "0000:01:00.0"\nerrno = "EWHATEVER" #<\n\n'
            '[[function]]\nbdf = "0000:00:1c.0"',
        ),
        "errno",
        "errno name",
    ),
    (
        "secondary-is-own-bus",
        ("secondary_bus = 1", "secondary_bus = 0 #<"),
        "secondary_bus",
        "out of range",
    ),
]


@pytest.mark.parametrize(("case", "edit", "field", "problem"), CASES, ids=[c[0] for c in CASES])
def test_malformed_tree(
    tmp_path: Path, case: str, edit: tuple[str, str], field: str, problem: str
) -> None:
    old, new = edit
    assert old in GOOD, case
    text = GOOD.replace(old, new, 1)
    p = tmp_path / f"{case}.toml"
    p.write_text(text)
    with pytest.raises(TreeError) as ei:
        load_tree(p)
    err = ei.value
    msg = str(err)
    assert str(p) in msg
    assert field in err.field, (err.field, msg)
    assert problem in err.problem, msg
    assert f":{err.line}:" in msg and err.line > 0
    lines = text.splitlines()
    marked = [i + 1 for i, ln in enumerate(lines) if "#<" in ln]
    if marked:
        assert err.line == marked[0], msg
    else:
        assert 1 <= err.line <= len(lines)


def test_good_base_tree_loads(tmp_path: Path) -> None:
    p = tmp_path / "good.toml"
    p.write_text(GOOD)
    t = load_tree(p)
    assert [d.name for d in t.topology.devices()] == ["0000:00:1c.0", "0000:01:00.0"]


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    p = tmp_path / "syntax.toml"
    p.write_text(GOOD.replace("device = 0x00ff", "device = = 0x00ff"))
    with pytest.raises(TreeError) as ei:
        load_tree(p)
    assert ei.value.line == GOOD.splitlines().index("device = 0x00ff") + 1
    assert "TOML" in str(ei.value)


def test_missing_file() -> None:
    with pytest.raises(TreeError) as ei:
        load_tree("/nonexistent/tree.toml")
    assert "/nonexistent/tree.toml" in str(ei.value)


def test_error_line_in_array_of_tables_picks_the_right_function(tmp_path: Path) -> None:
    # the same key in two [[function]] blocks: the error names the second one's line
    text = GOOD + '\n[[function]]\nbdf = "0000:01:00.1"\nvendor = 0x1b36\ndevice = 0x10000\n'
    p = tmp_path / "second.toml"
    p.write_text(text)
    with pytest.raises(TreeError) as ei:
        load_tree(p)
    assert ei.value.line == len(text.splitlines())
    assert "function[2] (0000:01:00.1).device" == ei.value.field


def test_no_functions(tmp_path: Path) -> None:
    p = tmp_path / "empty.toml"
    p.write_text('kernel = "6.6"\n')
    with pytest.raises(TreeError, match="no \\[\\[function\\]\\]"):
        load_tree(p)
