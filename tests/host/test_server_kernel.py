"""The real kernel model served through FUSE to C clients in subprocesses."""

from __future__ import annotations

import errno
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from fakedev.fuse import mount as M
from fakedev.host.server import Server
from fakedev.kernel.kernel import Kernel

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "kernel"))
import topologies  # noqa: E402

pytestmark = pytest.mark.needs_root


@pytest.fixture(scope="module")
def kclient(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("bin") / "kclient"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(TESTS / "fuse" / "kclient.c")], check=True)
    return str(out)


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    m = tmp_path / "mnt"
    m.mkdir()
    yield m
    M.clear_stale(str(m))
    assert not M.mounts_at(str(m))


@pytest.fixture
async def served(mnt: Path, nursery: trio.Nursery) -> AsyncIterator[tuple[Kernel, Server]]:
    k = Kernel(topologies.build("dual-function-nic"))
    srv = await nursery.start(Server(k).serve, str(mnt))
    yield k, srv


async def run(kclient: str, mnt: Path, mode: str) -> list[str]:
    with trio.fail_after(60):
        r = await trio.run_process([kclient, str(mnt), mode], capture_stdout=True)
    return r.stdout.decode().splitlines()


async def settled(k: Kernel, srv: Server) -> None:
    with trio.fail_after(10):
        while srv.open_files:
            await trio.sleep(0.01)
    async with srv.lock:
        assert k.check_invariants() == []
        d = k.describe()
    assert all(dev["open_count"] == 0 and dev["iommufd"] is None for dev in d["devices"])
    assert not any(g["open"] for g in d["groups"])
    assert srv.unexpected_errors == 0


async def test_cdev_hot_reset_with_empty_group_array(served: tuple[Kernel, Server], mnt: Path,
                                                     kclient: str) -> None:
    k, srv = served
    before = len(k.reset_log)
    out = await run(kclient, mnt, "cdev")
    assert out == [
        "ioas 0",
        "bind vfio0 0 devid 2", "attach vfio0 0",
        "bind vfio1 0 devid 4", "attach vfio1 0",  # both bound to the second /dev/iommu open
        "info 0 regions 9 irqs 5",
        "config 4 00f01b36",
        f"probe {errno.ENOSPC} count 2",
        "reset 0",
    ]
    assert len(k.reset_log) > before
    await settled(k, srv)


async def test_cdev_split_contexts_cannot_reset(served: tuple[Kernel, Server], mnt: Path, kclient: str) -> None:
    k, srv = served
    out = await run(kclient, mnt, "split")
    assert out[-1] != "reset 0" and out[-1].startswith("reset ")
    assert "bind vfio1 0 devid 2" in out  # first device of the other context
    await settled(k, srv)


async def test_legacy_group_and_container(served: tuple[Kernel, Server], mnt: Path, kclient: str) -> None:
    k, srv = served
    out = await run(kclient, mnt, "legacy")
    assert out == [
        "status 0 flags 1",  # VIABLE
        "set_container 0",  # the container fd resolved through the identity ioctl
        f"set_container_badfd {errno.EBADF}",
        "set_iommu 0",
        "status 0 flags 3",  # VIABLE | CONTAINER_SET
        f"get_device_fd {errno.ENOTTY}",  # needs fd_install: not possible through FUSE alone
    ]
    await settled(k, srv)
