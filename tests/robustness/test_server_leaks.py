"""What the server keeps for a removed node goes once the kernel forgets the inode."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import trio

from tests.robustness import harness as H

pytestmark = pytest.mark.needs_root


async def test_removed_nodes_go_at_forget(mnt: Path) -> None:
    async with H.served(mnt, H.DMA_NIC) as (_k, srv):
        def touch() -> None:
            fd = os.open(mnt / "vfio" / "devices" / "vfio0", os.O_RDWR)
            os.close(fd)
            os.stat(mnt / "vfio" / "13")

        await trio.to_thread.run_sync(touch)
        await srv.locked(functools.partial(srv.unplug, "0000:01:00.0"))
        assert srv._gone  # vfio0 and group 13: kept while the kernel may still ask for their attributes
        gone = list(srv._gone)
        with trio.move_on_after(10):
            while srv._gone:
                await trio.sleep(0.02)
        assert srv._gone == {}  # FORGET dropped them: nothing kept per removed node
        assert all(srv.devnode_for_ino(ino) is None for ino in gone)
        assert not await trio.to_thread.run_sync(os.path.exists, mnt / "vfio" / "devices" / "vfio0")
