"""The server process dies: callers get an error instead of hanging, and the
next server clears the stale mount and serves at the same place."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from fakedev.fuse import mount as M
from fakedev.host.server import Server

FUSE_TESTS = Path(__file__).resolve().parents[1] / "fuse"
sys.path.insert(0, str(FUSE_TESTS))
from fakekernel import FakeKernel  # noqa: E402

pytestmark = pytest.mark.needs_root
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("bin") / "client"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(FUSE_TESTS / "client.c"), "-lpthread"],
                   check=True)
    return str(out)


async def readline(stream: trio.abc.ReceiveStream) -> bytes:
    out = b""
    while not out.endswith(b"\n"):
        chunk = await stream.receive_some(1)
        if not chunk:
            break
        out += chunk
    return out


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    m = tmp_path / "mnt"
    m.mkdir()
    yield m
    M.clear_stale(str(m))
    assert not M.mounts_at(str(m))


async def test_daemon_killed_then_restarted(mnt: Path, client: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    daemon = await trio.lowlevel.open_process(
        [sys.executable, str(FUSE_TESTS / "fakekernel.py"), str(mnt), "30"],
        stdout=subprocess.PIPE, env=env)
    caller = None
    try:
        with trio.fail_after(20):
            assert daemon.stdout is not None
            assert (await readline(daemon.stdout)) == b"ready\n"
            caller = await trio.lowlevel.open_process([client, str(mnt), "slow"], stdout=subprocess.PIPE)
            assert caller.stdout is not None
            assert (await readline(caller.stdout)) == b"open\n"
            await trio.sleep(0.3)  # the caller is now inside the 30-second call
            daemon.kill()
            await daemon.wait()
            out = b""
            while chunk := await caller.stdout.receive_some():
                out += chunk
            await caller.wait()
    finally:
        for p in (daemon, caller):
            if p is not None and p.returncode is None:
                p.kill()
                await p.wait()
    lines = out.decode().split()
    # in-flight call: aborted; the call after it: not connected
    assert lines[0] == "slow" and int(lines[1]) in (errno.ECONNABORTED, errno.ENOTCONN)
    assert lines[2] == "next" and int(lines[3]) in (errno.ENOTCONN, errno.ECONNABORTED)
    assert caller.returncode == 0
    assert len(M.mounts_at(str(mnt), "fuse.fakedev")) == 1  # the stale mount

    k = FakeKernel()
    async with trio.open_nursery() as n:
        srv = await n.start(Server(k).serve, str(mnt))
        assert len(M.mounts_at(str(mnt), "fuse.fakedev")) == 1
        with trio.fail_after(20):
            r = await trio.run_process([client, str(mnt), "rw"], capture_stdout=True)
            assert r.stdout.decode().splitlines()[0] == "read 4 153a8086"
            while srv.open_files:
                await trio.sleep(0.01)
        n.cancel_scope.cancel()
    assert k.released == ["vfio0#0"]
    assert not M.mounts_at(str(mnt))


async def test_hung_daemon_is_aborted_by_the_next_start(mnt: Path, client: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    daemon = await trio.lowlevel.open_process(
        [sys.executable, str(FUSE_TESTS / "fakekernel.py"), str(mnt)], stdout=subprocess.PIPE, env=env)
    try:
        with trio.fail_after(20):
            assert daemon.stdout is not None
            assert (await readline(daemon.stdout)) == b"ready\n"
            daemon.send_signal(signal.SIGSTOP)  # hung: the mount is alive but nobody answers
            k = FakeKernel()
            async with trio.open_nursery() as n:
                await n.start(Server(k).serve, str(mnt))
                assert len(M.mounts_at(str(mnt), "fuse.fakedev")) == 1
                r = await trio.run_process([client, str(mnt), "rw"], capture_stdout=True)
                assert r.stdout.decode().splitlines()[0] == "read 4 153a8086"
                n.cancel_scope.cancel()
            daemon.send_signal(signal.SIGCONT)
            await daemon.wait()  # its connection was aborted: its loop saw ENODEV and it ended
    finally:
        if daemon.returncode is None:
            daemon.kill()
            await daemon.wait()
    assert daemon.returncode == 0
    assert not M.mounts_at(str(mnt))
