"""``python -m fakedev.tree FILE...``: check device trees and print what they hold.

For each file: either the TreeError (exit status 1) or one line per function
with its kind of header, driver, iommu group, reset methods and, for vfio-pci
functions, the vfioN it becomes. No kernel model is built.
"""

from __future__ import annotations

import sys

from fakedev.kernel.pci import PciDev
from fakedev.tree.errors import TreeError
from fakedev.tree.loader import default_tree_path, load_tree


def _reset_domain(dev: PciDev) -> str:
    if dev.bus.is_root:
        return "none (root bus)"
    if dev.slot is not None and dev.slot.reset_capable:
        return "slot"
    return f"bus {dev.bus.domain:04x}:{dev.bus.number:02x}"


def describe(path: str) -> list[str]:
    tree = load_tree(path)
    out = [f"{tree.source}: kernel {tree.version}, {len(tree.faults)} fault entries"]
    n = 0
    for dev in tree.topology.devices():
        vfio = ""
        if dev.driver == "vfio-pci" and dev.iommu_group is not None:
            vfio = f" vfio{n}"
            n += 1
        methods = " ".join(m.value for m in dev.reset_methods()) or "-"
        kind = "bridge" if dev.header_type == 1 else "function"
        out.append(
            f"  {dev.name} {dev.vendor:04x}:{dev.device:04x} {kind:<8} "
            f"driver={dev.driver or '-'} group={dev.iommu_group if dev.iommu_group is not None else '-'} "
            f"reset=[{methods}] hot-reset={_reset_domain(dev)}{vfio}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    paths = args or [str(default_tree_path())]
    status = 0
    for p in paths:
        try:
            print("\n".join(describe(p)))
        except TreeError as e:
            print(e, file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
