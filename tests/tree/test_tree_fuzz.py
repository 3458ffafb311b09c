"""Whatever value a field holds, loading gives a DeviceTree or a TreeError, never a crash."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from fakedev.tree import TreeError, load_tree

SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None

FIELDS = [
    "bdf", "kind", "vendor", "device", "subsystem_vendor", "class", "revision",
    "interrupt_pin", "irq", "bars", "rom_size", "capabilities", "config_size", "secondary_bus",
    "slot", "driver", "iommu_group", "reset_methods", "config_file",
]  # fmt: skip

scalars = st.one_of(
    st.integers(min_value=-(2**40), max_value=2**40),
    st.sampled_from([0, 1, 2, 4, 0x1000, 0xFFFF, 0x10000, 256, 4096]),
    st.booleans(),
    st.text(alphabet="abcAB01:.-x ", max_size=14),
    st.sampled_from(["vfio-pci", "none", "root-port", "mem64", "A", "0000:01:00.0", "flr"]),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.sampled_from(
                [
                    "index",
                    "type",
                    "size",
                    "pm",
                    "msi",
                    "msix",
                    "pcie",
                    "acs",
                    "af",
                    "vectors",
                    "table_size",
                    "table_bar",
                    "number",
                    "hotplug",
                    "reset",
                    "flr",
                    "no_soft_reset",
                ]
            ),
            inner,
            max_size=3,
        ),
    ),
    max_leaves=6,
)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(float(v)) if v == v else "0.0"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"


BASE = {
    "bdf": "0000:01:00.0",
    "vendor": 0x1B36,
    "device": 0xFF,
    "iommu_group": 13,
    "bars": [{"index": 0, "size": 0x1000}],
}
PORT = (
    '[[function]]\nbdf = "0000:00:1c.0"\nkind = "root-port"\nvendor = 0x8086\n'
    "device = 0xa110\nsecondary_bus = 1\n\n"
)


@settings(max_examples=100, deadline=None)
@given(edits=st.dictionaries(st.sampled_from(FIELDS), values, min_size=1, max_size=3))
def test_any_field_value_loads_or_is_refused_cleanly(edits: dict[str, Any]) -> None:
    fields = dict(BASE)
    fields.update(edits)
    text = PORT + "[[function]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in fields.items())
    with tempfile.TemporaryDirectory(dir=SHM) as tmp:
        p = Path(tmp) / "fuzz.toml"
        p.write_text(text)
        try:
            tree = load_tree(p)
        except TreeError as e:
            assert str(p) in str(e)
            assert e.problem
            return
        for d in tree.topology.devices():
            assert len(d.config) in (256, 4096)
