"""``behaviour = "..."`` of a [[function]]: what its BARs do, checked with
file:line:field errors; "dma-engine" gives the function the DMA engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from fakedev.kernel.vfio.pci.dma_engine import DmaEngine
from fakedev.kernel.vfio.pci.vfio_pci_rdwr import RamBars
from fakedev.tree import TreeError, load_tree

TREE = """\
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
iommu_group = 13
behaviour = "dma-engine"
bars = [
    { index = 0, type = "mem32", size = 0x1000 },
    { index = 2, type = "mem64", size = 0x4000 },
]
[function.capabilities]
msi = { vectors = 1 }
pcie = {}
msix = { table_size = 4, table_bar = 2 }
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "t.toml"
    p.write_text(text)
    return p


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_dma_engine_behaviour_is_built(tmp_path: Path) -> None:
    tree = load_tree(write(tmp_path, TREE))
    assert tree.behaviours == (("0000:01:00.0", "dma-engine"),)
    k = tree.make_kernel()
    dev = k.device("0000:01:00.0")
    assert isinstance(dev.behaviour, DmaEngine)
    assert dev.behaviour.port is not None and dev.behaviour.port.dev is dev


def test_ram_is_the_default_and_can_be_named(tmp_path: Path) -> None:
    text = TREE.replace('behaviour = "dma-engine"', 'behaviour = "ram"')
    tree = load_tree(write(tmp_path, text))
    assert tree.behaviours == ()
    assert isinstance(tree.make_kernel().device("0000:01:00.0").behaviour, RamBars)


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ('behaviour = "dma-engine"', 'behaviour = "dma-engin"', "unknown behaviour 'dma-engin' (one of: dma-engine, ram)"),
        ('behaviour = "dma-engine"', "behaviour = 1", "must be a string"),
        ('behaviour = "dma-engine"', 'behaviour = "dma-engine"\ndriver = "igb"', "bound to vfio-pci"),
        ('{ index = 0, type = "mem32", size = 0x1000 }', '{ index = 0, type = "io", size = 0x20 }',
         "memory BAR0"),
        ('{ index = 0, type = "mem32", size = 0x1000 }', '{ index = 1, type = "mem32", size = 0x1000 }',
         "memory BAR0"),
        ("table_bar = 2 }", "table_bar = 0 }", "overlap the MSI-X table"),
    ],
    ids=["unknown", "type", "driver", "io-bar0", "no-bar0", "msix-overlap"],
)
def test_bad_behaviour_names_the_line_and_field(tmp_path: Path, old: str, new: str, problem: str) -> None:
    text = TREE.replace(old, new)
    assert text != TREE
    with pytest.raises(TreeError) as e:
        load_tree(write(tmp_path, text))
    err = e.value
    assert problem in err.problem
    assert err.field.endswith(".behaviour") and "0000:01:00.0" in err.field
    assert err.line == line_of(text, "behaviour =")


def test_behaviour_with_config_file_functions_is_allowed() -> None:
    from fakedev.tree.loader import FILE_KEYS

    assert "behaviour" in FILE_KEYS
