"""Runs a RunSession with a stand-in server (plain files on a tmpfs instead of
FUSE), so the namespace, placement, signal and exit-status machinery of
``fakedev run`` can be tested on its own. Usage: standin_run.py MODE -- CMD...
MODE: ok | fail-serve | fail-later.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import attrs

from fakedev.host import namespace

NODES = ("vfio/vfio", "vfio/13", "vfio/devices/vfio0", "iommu")


@attrs.define
class Node:
    path: str


class StandinKernel:
    def nodes(self) -> list[Node]:
        return [Node(p) for p in NODES]


class StandinServer:
    def __init__(self, mode: str) -> None:
        self.mode = mode

    async def serve(self, mountpoint: Path, *, task_status: Any) -> None:
        import trio

        if self.mode == "fail-serve":
            raise RuntimeError("cannot open /dev/fuse")
        namespace.mount("standin", mountpoint, "tmpfs", 0, "mode=0755")
        for p in NODES:
            f = mountpoint / p
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(f"served {p}\n")
        task_status.started()
        if self.mode == "fail-later":
            await trio.sleep(0.5)
            raise RuntimeError("lost the connection")
        await trio.sleep_forever()


def generate(root: Path, tree: Any, kernel: Any) -> None:
    root = root / "sys"
    dev = root / "devices/pci0000:00/0000:00:1c.0/0000:01:00.0"
    (dev / "vfio-dev/vfio0").mkdir(parents=True)
    (dev / "vendor").write_text("0x8086\n")
    (root / "bus/pci/devices").mkdir(parents=True)
    os.symlink("../../../devices/pci0000:00/0000:00:1c.0/0000:01:00.0",
               root / "bus/pci/devices/0000:01:00.0")
    (root / "kernel/iommu_groups/13/devices").mkdir(parents=True)
    (root / "class/vfio-dev").mkdir(parents=True)
    os.symlink("../../devices/pci0000:00/0000:00:1c.0/0000:01:00.0/vfio-dev/vfio0",
               root / "class/vfio-dev/vfio0")


def main() -> int:
    mode = sys.argv[1]
    cmd = sys.argv[3:] if sys.argv[2] == "--" else sys.argv[2:]
    ns = namespace.enter_private_namespace()
    import trio

    from fakedev.cli.session import RunSession

    session = RunSession(
        tree=None,
        kernel=StandinKernel(),
        server=StandinServer(mode),
        cmd=cmd,
        rootless=ns.rootless,
        staging_root=Path(tempfile.mkdtemp(prefix="fakedev-")),
        generate=generate,
    )
    return trio.run(session.run)


if __name__ == "__main__":
    sys.exit(main())
