"""A huge argsz must not make the daemon allocate it.

copy_struct_from_user() in the kernel checks that the bytes past the kernel's
struct are zero by walking user memory (check_zeroed_user): an argsz of
0xffffffff with the struct at the end of a mapping is EFAULT at the first
unmapped page, and costs nothing. Any process that can open /dev/iommu or a
device node may send it, so the daemon must answer it in bounded memory.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import trio

from tests.robustness.test_daemon_crash import start_daemon, stop

pytestmark = pytest.mark.needs_root


def hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


async def test_huge_argsz_is_efault_in_bounded_memory(mnt: Path, fuzz_client: str) -> None:
    daemon = await start_daemon(mnt)
    try:
        before = hwm_kib(daemon.pid)
        with trio.fail_after(120):
            r = await trio.run_process([fuzz_client, str(mnt), "argsz", "1", "1"], capture_stdout=True)
        assert r.stdout.decode().split() == ["ioas_alloc", str(errno.EFAULT), "bind", str(errno.EFAULT)]
        grown = hwm_kib(daemon.pid) - before
        assert grown < 256 * 1024, f"the daemon's peak memory grew by {grown // 1024} MiB"
    finally:
        await stop(daemon)
