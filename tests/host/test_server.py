"""The FUSE server against real processes: a fake kernel served at a temporary
mount, driven by a small C client (tests/fuse/client.c) in subprocesses.

Everything that touches the mount from this process runs in a thread: the
server's loop runs on this thread and a stat from it would wait for itself.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from fakedev.fuse import mount as M
from fakedev.host.server import Server
from fakedev.host.trace import Tracer

FUSE_TESTS = Path(__file__).resolve().parents[1] / "fuse"
sys.path.insert(0, str(FUSE_TESTS))
from fakekernel import FakeDevice, FakeIommu, FakeKernel  # noqa: E402

pytestmark = pytest.mark.needs_root


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("bin") / "client"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(FUSE_TESTS / "client.c"), "-lpthread"],
                   check=True)
    return str(out)


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    m = tmp_path / "mnt"
    m.mkdir()
    yield m
    M.clear_stale(str(m))  # safety net: nothing may stay mounted
    assert not M.mounts_at(str(m))


class Served:
    def __init__(self, k: FakeKernel, srv: Server, mnt: Path, trace_dir: Path) -> None:
        self.k = k
        self.srv = srv
        self.mnt = mnt
        self.trace_dir = trace_dir

    async def settle(self) -> None:
        """Wait until every open has been released."""
        with trio.fail_after(10):
            while self.srv.open_files:
                await trio.sleep(0.01)
        assert len(self.k.released) == len(self.k.opened)


@pytest.fixture
async def served(mnt: Path, tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Served]:
    k = FakeKernel()
    tracer = Tracer(str(tmp_path / "trace.jsonl"), str(tmp_path / "trace.txt"))
    srv = await nursery.start(Server(k, tracer=tracer).serve, str(mnt))
    yield Served(k, srv, mnt, tmp_path)


async def run(client: str, mnt: Path, *args: str) -> list[str]:
    with trio.fail_after(60):
        r = await trio.run_process([client, str(mnt), *args], capture_stdout=True, capture_stderr=True)
    return r.stdout.decode().splitlines()


async def in_thread(fn, *args):  # type: ignore[no-untyped-def]
    return await trio.to_thread.run_sync(fn, *args)


async def test_tree_modes_and_control_files(served: Served) -> None:
    m = served.mnt
    st_dev = await in_thread(os.stat, m / "vfio/devices/vfio0")
    assert stat.S_ISREG(st_dev.st_mode) and stat.S_IMODE(st_dev.st_mode) == 0o600
    st_io = await in_thread(os.stat, m / "iommu")
    assert stat.S_ISREG(st_io.st_mode) and stat.S_IMODE(st_io.st_mode) == 0o666
    st_dir = await in_thread(os.stat, m / "vfio")
    assert stat.S_ISDIR(st_dir.st_mode) and stat.S_IMODE(st_dir.st_mode) == 0o755
    assert sorted(await in_thread(os.listdir, m)) == [".fakedev", "iommu", "vfio"]
    assert sorted(await in_thread(os.listdir, m / "vfio")) == ["devices", "vfio"]
    with pytest.raises(FileNotFoundError):
        await in_thread(os.stat, m / "vfio/nope")
    state = json.loads(await in_thread((m / ".fakedev/state.json").read_text))
    assert state == {"opened": 0, "released": 0, "binds": []}
    assert (await in_thread((m / ".fakedev/trace").read_text)) == "off\n"
    await in_thread((m / ".fakedev/trace").write_text, "on\n")
    assert served.srv.tracer.enabled
    with pytest.raises(OSError) as ei:
        await in_thread((m / ".fakedev/trace").write_text, "maybe\n")
    assert ei.value.errno == errno.EINVAL
    assert served.srv.tracer.enabled


async def test_bind_to_second_of_two_iommufd_opens(served: Served, client: str) -> None:
    out = await run(client, served.mnt, "bind2")
    # opens: device (#0), iommu ctx 1, iommu ctx 2; bound to the second, then the first
    assert out == ["bind 0 devid 1002", "bind 0 devid 1001"]
    assert served.k.binds == [("vfio0#0", 2), ("vfio0#0", 1)]
    dev, i1, i2 = served.k.opened
    assert isinstance(dev, FakeDevice) and isinstance(i1, FakeIommu) and isinstance(i2, FakeIommu)
    assert dev.bound is i1
    await served.settle()
    assert sorted(served.k.released) == ["iommu1", "iommu2", "vfio0#0"]


async def test_errors_are_the_kernels(served: Served, client: str) -> None:
    out = await run(client, served.mnt, "errors")
    assert out == [
        f"null {errno.EFAULT}",
        f"straddle {errno.EFAULT}",
        "ok 0 9 5",
        f"einval {errno.EINVAL}",
        f"badfd {errno.EBADF}",
        f"pipe {errno.EBADF}",
        f"notiommu {errno.EBADF}",
        f"boom {errno.EIO}",  # an unexpected exception in the model
        f"unknown {errno.ENOTTY}",
        "after 0",  # and serving goes on
    ]
    assert served.srv.unexpected_errors == 1
    await served.settle()


async def test_unexpected_fd_lookup_is_retried_in_a_worker(served: Served, client: str) -> None:
    import threading

    assert await run(client, served.mnt, "retry") == ["iommu 1", "dev 2", "pipe 0"]
    # our own opens were identified from a worker; the pipe needed none (answered on the loop)
    assert threading.get_ident() in served.k.feature_threads and len(served.k.feature_threads) >= 2
    await served.settle()


async def test_poll_and_wakeup(served: Served, client: str) -> None:
    proc = await trio.lowlevel.open_process([client, str(served.mnt), "poll"], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        with trio.fail_after(20):
            first = b""
            while not first.endswith(b"\n"):
                first += await proc.stdout.receive_some(1)
            assert first == b"poll 1 1\n"
            served.k.readable = False
            await proc.stdin.send_all(b"go\n")
            while not served.srv._pollers:  # the second poll() is parked, waiting for a wakeup
                await trio.sleep(0.01)

            def ready() -> None:
                served.k.readable = True

            await served.srv.locked(ready)
            rest = b""
            while chunk := await proc.stdout.receive_some():
                rest += chunk
            assert rest == b"poll 1 1\n"
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    await served.settle()


async def test_cancelled_mid_call(mnt: Path, client: str) -> None:
    k = FakeKernel()
    k.reset_delay = 0.5
    async with trio.open_nursery() as n:
        srv = await n.start(Server(k).serve, str(mnt))
        proc = await trio.lowlevel.open_process([client, str(mnt), "slow"], stdout=subprocess.PIPE)
        with trio.fail_after(20):
            while k.resets_started == 0:
                await trio.sleep(0.01)
            n.cancel_scope.cancel()
    assert not M.mounts_at(str(mnt))
    with trio.fail_after(20):
        await proc.wait()
    assert proc.stdout is not None
    raw = b""
    while chunk := await proc.stdout.receive_some():
        raw += chunk
    out = raw.decode().split()
    assert out[:2] == ["open", "slow"] and int(out[2]) in (0, errno.ECONNABORTED, errno.ENOTCONN)
    assert out[3] == "next" and int(out[4]) in (errno.ECONNABORTED, errno.ENOTCONN)
    assert k.resets_done == 1 and k.released == ["vfio0#0"] and srv.open_files == 0


async def test_eventfd_is_signalled(served: Served, client: str) -> None:
    assert await run(client, served.mnt, "eventfd") == ["irqs 0 1 6"]
    await served.settle()


async def test_region_read_write_at_exact_offsets(served: Served, client: str) -> None:
    out = await run(client, served.mnt, "rw")
    assert out == ["read 4 153a8086", "write 4 deadbeef", f"badregion {errno.EINVAL}"]
    await served.settle()


async def test_two_processes_several_threads(served: Served, client: str) -> None:
    results: list[list[str]] = []

    async def one() -> None:
        results.append(await run(client, served.mnt, "threads", "4", "100"))

    async with trio.open_nursery() as n:
        n.start_soon(one)
        n.start_soon(one)
    assert results == [["fails 0"], ["fails 0"]]
    assert served.k.calls == 2 * 4 * 100 * 2
    assert len(served.k.binds) == 2 * 4 * 100
    pids = {pid for pid, _ in served.k.open_pids}
    assert len(pids) == 2
    await served.settle()
    assert len(served.k.opened) == 4


PY_CLIENT = r"""
import ctypes, os, struct, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
mnt = sys.argv[1]
dev = os.open(mnt + "/vfio/devices/vfio0", os.O_RDWR)
iommus = [os.open(mnt + "/iommu", os.O_RDWR) for _ in range(3)]
errors = []
seen = {}
def work(n):
    for i in range(50):
        info = ctypes.create_string_buffer(struct.pack("<I", 24), 24)
        if libc.ioctl(dev, 0x3B6B, info) != 0 or struct.unpack_from("<4I", info.raw)[2:] != (9, 5):
            errors.append(("info", ctypes.get_errno()))
        io = iommus[(n + i) % 3]
        b = ctypes.create_string_buffer(struct.pack("<IIiI", 16, 0, io, 0), 16)
        if libc.ioctl(dev, 0x3B76, b) != 0:
            errors.append(("bind", ctypes.get_errno()))
        else:
            devid = struct.unpack_from("<I", b.raw, 12)[0]
            if seen.setdefault(io, devid) != devid:
                errors.append(("devid", io, devid, seen[io]))
ts = [threading.Thread(target=work, args=(n,)) for n in range(3)]
for t in ts: t.start()
for t in ts: t.join()
if len(set(seen.values())) != 3:
    errors.append(("not distinct", seen))
print("errors", errors)
"""


async def test_python_ctypes_clients_in_threads(served: Served) -> None:
    """Each bind must find the very iommufd open its fd names, from any thread of any process."""
    outs: list[str] = []

    async def one() -> None:
        with trio.fail_after(60):
            r = await trio.run_process([sys.executable, "-c", PY_CLIENT, str(served.mnt)], capture_stdout=True)
        outs.append(r.stdout.decode().strip())

    async with trio.open_nursery() as n:
        n.start_soon(one)
        n.start_soon(one)
    assert outs == ["errors []", "errors []"]
    await served.settle()
    assert len(served.k.binds) == 2 * 3 * 50


async def test_caller_killed_mid_call(served: Served, client: str) -> None:
    k = served.k
    k.reset_delay = 1.5
    proc = await trio.lowlevel.open_process([client, str(served.mnt), "slow"], stdout=subprocess.PIPE)
    try:
        with trio.fail_after(10):
            while k.resets_started == 0:
                await trio.sleep(0.01)
            # the loop still answers requests that need no model call meanwhile
            st = await in_thread(os.stat, served.mnt / "iommu")
            assert stat.S_ISREG(st.st_mode)
            assert k.resets_done == 0
            proc.kill()
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    await served.settle()
    assert k.resets_done == 1
    assert k.released == ["vfio0#0"]


async def test_handled_signal_mid_call(served: Served, client: str) -> None:
    k = served.k
    k.reset_delay = 0.5
    proc = await trio.lowlevel.open_process([client, str(served.mnt), "slowsig"], stdout=subprocess.PIPE)
    try:
        with trio.fail_after(20):
            while k.resets_started == 0:
                await trio.sleep(0.01)
            proc.send_signal(signal.SIGUSR1)  # the server gets an INTERRUPT and answers ENOSYS
            assert proc.stdout is not None
            raw = b""
            while chunk := await proc.stdout.receive_some():
                raw += chunk
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert raw.decode().splitlines() == ["open", "slow 0 signals 1"]  # the call completed normally
    assert k.resets_done == 1
    await served.settle()


async def test_trace_lines(served: Served, client: str) -> None:
    await in_thread((served.mnt / ".fakedev/trace").write_text, "on")
    await run(client, served.mnt, "errors")
    await run(client, served.mnt, "rw")
    await in_thread((served.mnt / ".fakedev/trace").write_text, "off")
    await served.settle()
    text = (served.trace_dir / "trace.txt").read_text().splitlines()
    recs = [json.loads(line) for line in (served.trace_dir / "trace.jsonl").read_text().splitlines()]
    assert len(recs) == len(text)
    opened = [r["open"] for r in recs if r["op"] == "open"]
    assert len(opened) == 2 and opened[0] != opened[1]
    first, second = (f"open#{n}" for n in opened)
    assert any(line.endswith(f"VFIO_DEVICE_GET_INFO(fd=3 {first} vfio0#0, {{argsz=24, flags=0, num_regions=0, "
                             "num_irqs=0, cap_offset=0, pad=0}) = 0 => {argsz=24, flags=0x2, num_regions=9, "
                             "num_irqs=5, cap_offset=0, pad=0}") for line in text), text
    # a field past the caller's argsz is not read: shown absent
    assert any(line.endswith(f"VFIO_DEVICE_GET_INFO(fd=3 {first} vfio0#0, {{argsz=4, flags=<absent>, "
                             "num_regions=<absent>, num_irqs=<absent>, cap_offset=<absent>, pad=<absent>})"
                             " = -1 EINVAL") for line in text), text
    assert any(f"VFIO_DEVICE_BIND_IOMMUFD(fd=3 {first} vfio0#0, {{argsz=16, flags=0, iommufd=999" in line
               and line.endswith("token_uuid_ptr=<absent>}) = -1 EBADF") for line in text), text
    assert any(line.endswith(f"pread(fd=3 {second} vfio0#1, 4, 0x70000000000) = 4") for line in text), text
    assert any(line.endswith(f"release({first} vfio0#0) = 0") for line in text), text
    assert any(line.endswith(f"VFIO_DEVICE_RESET(fd=3 {first} vfio0#0) = -1 EIO") for line in text), text
    efault = [r for r in recs if r["errno"] == "EFAULT"]
    assert efault and efault[0]["name"] == "VFIO_DEVICE_GET_INFO" and efault[0]["request"] == "EFAULT"
