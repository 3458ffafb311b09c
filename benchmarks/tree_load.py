"""Time loading a device tree and generating its sysfs: large.toml vs the default.

Run: python benchmarks/tree_load.py [--repeat N]
Prints one row per fixture: functions, load time, sysfs generation time,
files written (median of N runs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from fakedev.host.sysfs import generate_sysfs, vfio_index_for
from fakedev.kernel.file import DevNode
from fakedev.tree import load_tree
from fakedev.tree.loader import FIXTURES


def measure(path: Path, repeat: int, where: str | None) -> tuple[int, float, float, int]:
    loads: list[float] = []
    gens: list[float] = []
    nfuncs = nfiles = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        tree = load_tree(path)
        t1 = time.perf_counter()
        idx = vfio_index_for(tree.topology)
        nodes = [DevNode(f"vfio/devices/vfio{n}", 509, n, 0o600) for n in idx.values()]
        with tempfile.TemporaryDirectory(dir=where) as tmp:
            t2 = time.perf_counter()
            generate_sysfs(Path(tmp), tree.topology, nodes, idx)
            t3 = time.perf_counter()
            nfiles = sum(1 for _ in Path(tmp).rglob("*"))
        loads.append(t1 - t0)
        gens.append(t3 - t2)
        nfuncs = len(list(tree.topology.devices()))
    return nfuncs, statistics.median(loads), statistics.median(gens), nfiles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument(
        "--dir",
        default="/dev/shm" if os.path.isdir("/dev/shm") else None,
        help="where to generate the sysfs (default: /dev/shm, a tmpfs like the real product uses)",
    )
    args = ap.parse_args()
    print(f"sysfs generated under {args.dir or tempfile.gettempdir()}")
    print(f"{'tree':<24} {'functions':>9} {'load ms':>9} {'sysfs ms':>9} {'entries':>8}")
    for name in ("dual-function-nic", "large"):
        n, load, gen, files = measure(FIXTURES / f"{name}.toml", args.repeat, args.dir)
        print(f"{name:<24} {n:>9} {load * 1e3:>9.1f} {gen * 1e3:>9.1f} {files:>8}")


if __name__ == "__main__":
    main()
