"""Device DMA into user memory reaches the process that made the mapping, and
no other: once that process is gone (its mapping kept alive by a child that
inherited the iommufd), a DMA faults, even when a new process got the same pid
and has memory at the same address."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from fakedev.kernel.errors import KernelError
from tests.robustness import harness as H

pytestmark = pytest.mark.needs_root

CLIENTS = str(Path(__file__).resolve().parent / "dma_owner_clients.py")
NS_LAST_PID = "/proc/sys/kernel/ns_last_pid"


def spawn_victim_at(pid: int, addr: int, tries: int = 200) -> subprocess.Popen[str] | None:
    """A victim process whose pid is ``pid`` (ns_last_pid; other processes may
    take it first, so a few tries), with a zeroed page at ``addr``."""
    for _ in range(tries):
        with open(NS_LAST_PID, "w") as f:
            f.write(str(pid - 1))
        p = subprocess.Popen([sys.executable, CLIENTS, "victim", str(addr)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        if p.pid == pid:
            return p
        p.kill()
        p.wait()
    return None


async def test_dma_after_the_mapper_is_gone(mnt: Path) -> None:
    async with H.served(mnt, H.DMA_NIC) as (k, srv):
        r = await trio.run_process([sys.executable, CLIENTS, "mapper", str(mnt)], capture_stdout=True, check=True)
        pid, addr, holder = map(int, r.stdout.decode().split())
        try:
            await trio.sleep(0.1)
            assert not os.path.exists(f"/proc/{pid}")
            # the mapping outlives its process: the holder keeps the iommufd and the binding
            assert [d["iommufd"] for d in k.describe()["devices"] if d["vfio"] == "vfio2"] != [None]
            with pytest.raises(KernelError):
                await srv.locked(lambda: k.dma_write("vfio2", 0x100000, b"\xc0\xff\xee"))
            victim = await trio.to_thread.run_sync(spawn_victim_at, pid, addr)
            if victim is None:
                pytest.fail(f"pid {pid} could not be taken again")
            try:
                assert victim.stdout is not None and victim.stdin is not None
                assert await trio.to_thread.run_sync(victim.stdout.readline) == "ready\n"
                with pytest.raises(KernelError):
                    await srv.locked(lambda: k.dma_write("vfio2", 0x100000, b"\xc0\xff\xee"))
                victim.stdin.write("\n")
                victim.stdin.flush()
                assert await trio.to_thread.run_sync(victim.stdout.readline) == "00" * 8 + "\n"
            finally:
                victim.kill()
                victim.wait()
        finally:
            os.kill(holder, signal.SIGKILL)
        inv, lk = await H.settle(k, srv)
        assert (inv, lk) == ([], [])
