"""Time loading a device tree, generating its sysfs and mounting it: large.toml vs the default.

Run (as root, for the mount): python benchmarks/tree_load.py [--repeat N]
Prints one row per fixture: functions, load time, sysfs generation time,
files written, building the kernel model, and mounting its nodes through
FUSE until a listing of /dev/vfio/devices answers (median of N runs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import trio

from fakedev.host.server import Server
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


def measure_mount(path: Path, repeat: int) -> tuple[float, float, int]:
    """Median seconds to build the Kernel, and to mount it and list vfio/devices."""
    builds: list[float] = []
    mounts: list[float] = []
    listed = 0

    async def once() -> None:
        nonlocal listed
        tree = load_tree(path)
        t0 = time.perf_counter()
        kernel = tree.make_kernel()
        t1 = time.perf_counter()
        with tempfile.TemporaryDirectory() as mnt:
            async with trio.open_nursery() as nursery:
                t2 = time.perf_counter()
                await nursery.start(Server(kernel).serve, mnt)
                names = await trio.to_thread.run_sync(os.listdir, f"{mnt}/vfio/devices")
                t3 = time.perf_counter()
                nursery.cancel_scope.cancel()
        listed = len(names)
        builds.append(t1 - t0)
        mounts.append(t3 - t2)

    for _ in range(repeat):
        trio.run(once)
    return statistics.median(builds), statistics.median(mounts), listed


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
    print(
        f"{'tree':<24} {'functions':>9} {'load ms':>9} {'sysfs ms':>9} {'entries':>8}"
        f" {'model ms':>9} {'mount ms':>9} {'vfioN':>6}"
    )
    for name in ("dual-function-nic", "large"):
        n, load, gen, files = measure(FIXTURES / f"{name}.toml", args.repeat, args.dir)
        build, mount, listed = measure_mount(FIXTURES / f"{name}.toml", args.repeat)
        print(
            f"{name:<24} {n:>9} {load * 1e3:>9.1f} {gen * 1e3:>9.1f} {files:>8}"
            f" {build * 1e3:>9.1f} {mount * 1e3:>9.1f} {listed:>6}"
        )


if __name__ == "__main__":
    main()
