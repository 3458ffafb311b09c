"""The serving process is SIGKILLed with clients attached, some inside a call
and some idle: every client gets ECONNABORTED or ENOTCONN promptly, and a new
server at the same mount point starts cleanly (the stale mount is cleared) and
serves a full bind/attach/hot-reset."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from fakedev.fuse import mount as M
from tests.robustness import harness as H

pytestmark = pytest.mark.needs_root

TREE = str(H.FIXTURES / "dual-function-nic.toml")

#: Opens a device and /dev/iommu, binds, says "held", waits for a line, then
#: calls again on the held fds and opens anew; prints the errnos.
HOLDER = r"""
import errno, fcntl, os, struct, sys
mnt = sys.argv[1]
dev = os.open(mnt + "/vfio/devices/vfio0", os.O_RDWR)
ifd = os.open(mnt + "/iommu", os.O_RDWR)
b = bytearray(struct.pack("<IIII", 16, 0, ifd, 0))
fcntl.ioctl(dev, 0x3b76, b)
print("held", struct.unpack("<IIII", b)[3], flush=True)
sys.stdin.readline()
def err(f):
    try:
        f()
        return 0
    except OSError as e:
        return e.errno
a = bytearray(struct.pack("<III", 12, 0, 0))
print("ioctl", err(lambda: fcntl.ioctl(ifd, 0x3b81, a)), flush=True)
print("open", err(lambda: os.open(mnt + "/iommu", os.O_RDWR)), flush=True)
"""


async def start_daemon(mnt: Path) -> trio.Process:
    """``fakedev mount`` in its own process; returns once its own mount answers.

    (A stat of the old, dead mount may still succeed from the attribute cache, so
    readiness is a state file that can be read: a dead connection cannot answer.)
    """
    p = await trio.lowlevel.open_process(
        [sys.executable, "-m", "fakedev.cli.main", "mount", "--tree", TREE, str(mnt)],
        env=H.env(), stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with trio.fail_after(30):
            while True:
                if p.poll() is not None:
                    raise AssertionError(f"fakedev mount exited with {p.returncode}")
                if M.mounts_at(str(mnt), "fuse.fakedev"):
                    try:
                        with open(mnt / ".fakedev" / "state.json") as f:
                            if f.read(1):
                                return p
                    except OSError:
                        pass
                await trio.sleep(0.05)
    except BaseException:
        await stop(p)
        raise


async def stop(p: trio.Process | None, sig: int = signal.SIGKILL) -> None:
    if p is not None and p.returncode is None:
        p.send_signal(sig)
        with trio.move_on_after(20):
            await p.wait()
        if p.returncode is None:
            p.kill()
            await p.wait()


async def test_daemon_killed_with_clients_attached(mnt: Path, fuzz_client: str, kclient: str) -> None:
    daemon = await start_daemon(mnt)
    holder = None
    try:
        holder = await trio.lowlevel.open_process([sys.executable, "-c", HOLDER, str(mnt)],
                                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert holder.stdout is not None and holder.stdin is not None
        with trio.fail_after(20):
            held = await H.readline(holder.stdout)
        assert held.startswith(b"held"), held
        busy: list[dict[str, object]] = []

        async def busy_client(seed: int) -> None:
            busy.append(await H.run_client(fuzz_client, mnt, "race", seed, 4000, timeout=30))

        async with trio.open_nursery() as n:
            for s in (1, 2):
                n.start_soon(busy_client, s)
            await trio.sleep(0.5)
            daemon.send_signal(signal.SIGSTOP)  # the busy clients are now inside calls
            await trio.sleep(0.3)
            daemon.send_signal(signal.SIGKILL)
            await daemon.wait()
            # (the busy clients finish by their own deadline: every call fails at once)
        assert len(busy) == 2
        for r in busy:
            hist = r["errno"]
            assert isinstance(hist, dict)
            assert errno.ECONNABORTED in hist, hist  # the call in flight when the daemon died
            assert errno.ENOTCONN in hist, hist  # every call after it
        with trio.fail_after(10):  # no hang for an idle client either
            await holder.stdin.send_all(b"go\n")
            lines = [await H.readline(holder.stdout), await H.readline(holder.stdout)]
            await holder.wait()
        assert lines == [f"ioctl {errno.ENOTCONN}\n".encode(), f"open {errno.ENOTCONN}\n".encode()]
        assert len(M.mounts_at(str(mnt), "fuse.fakedev")) == 1  # the stale mount

        daemon = await start_daemon(mnt)  # clears the stale mount
        assert len(M.mounts_at(str(mnt), "fuse.fakedev")) == 1
        out = await H.fresh_client_works(kclient, mnt)
        assert out[-1] == "reset 0", out
        await stop(daemon, signal.SIGINT)
        assert daemon.returncode == 0
        assert not M.mounts_at(str(mnt))
    finally:
        await stop(daemon)
        await stop(holder)


async def test_daemon_killed_idle_then_restarted_twice(mnt: Path, kclient: str) -> None:
    for _ in range(2):
        daemon = await start_daemon(mnt)
        try:
            out = await H.fresh_client_works(kclient, mnt)
            assert out[-1] == "reset 0", out
            daemon.send_signal(signal.SIGKILL)
            await daemon.wait()
            with trio.fail_after(10):
                r = await trio.run_process([kclient, str(mnt), "cdev"], capture_stdout=True,
                                           capture_stderr=True, check=False)
            assert r.returncode == 2 and b"Transport endpoint is not connected" in r.stderr
        finally:
            await stop(daemon)
    assert os.path.isdir(mnt)


async def test_mount_command_exits_when_its_connection_is_aborted(mnt: Path) -> None:
    """A `fakedev mount` whose FUSE connection is gone (aborted through fusectl,
    as `fakedev`'s own stale-mount clearing does) serves nothing any more: it
    must exit, not linger waiting for a signal."""
    daemon = await start_daemon(mnt)
    try:
        (m,) = M.mounts_at(str(mnt), "fuse.fakedev")
        assert M.abort(m.connection)
        with trio.move_on_after(15):
            await daemon.wait()
        assert daemon.returncode is not None, "fakedev mount still running after its connection ended"
        assert not M.mounts_at(str(mnt))
    finally:
        await stop(daemon)


async def test_run_reports_a_dead_server() -> None:
    """`fakedev run` serves in its own process; when its FUSE connection dies
    under the running program (aborted through fusectl, what a crashed server
    thread looks like from the kernel), it says so and exits non-zero promptly,
    without waiting for the program (which it terminates)."""
    p = await trio.lowlevel.open_process(
        [sys.executable, "-m", "fakedev.cli.main", "run", "--tree", TREE, "--", "sh", "-c",
         'echo "$FAKEDEV_PID $FAKEDEV_MOUNT"; exec sleep 30'],
        env=H.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stderr is not None
        with trio.fail_after(30):
            pid, mount = (await H.readline(p.stdout)).decode().split()
        conns = [m.connection for m in M.mounts(f"/proc/{pid}/mountinfo")
                 if m.mountpoint == mount and m.fstype == "fuse.fakedev"]
        assert len(conns) == 1
        assert M.abort(conns[0])
        with trio.fail_after(15):
            await p.wait()
            rest = b""
            while chunk := await p.stdout.receive_some():
                rest += chunk
            err = b""
            while chunk := await p.stderr.receive_some():
                err += chunk
        assert p.returncode != 0
        assert rest == b""
        assert b"server stopped" in err, err
    finally:
        await stop(p)
