"""The supervisor beside the real FUSE server, in one trio run (as in ``fakedev run``).

A stub kernel stands behind ``fakedev.host.server.Server``. The handler below
is the shape of the ``fakedev run`` integration: it identifies the caller's fd
through ``ProcessTask.fget`` (worker thread: the identity ioctl is answered by
the same loop), installs an open of a node of the mount, and reports the nodes
as char devices in stat mode. Nothing here may touch the mount from the loop
thread.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from fakedev.fuse import mount as M
from fakedev.host.proc import ProcessTask
from fakedev.host.server import Server
from fakedev.host.supervisor import (
    Call,
    CharDevice,
    Continue,
    Decision,
    Error,
    FilterConfig,
    InstallFd,
    StatTarget,
    Supervisor,
)
from fakedev.kernel.errors import KernelError
from fakedev.kernel.file import DevNode, File
from fakedev.kernel.task import Task
from fakedev.uapi.ioctls import FileKind

pytestmark = pytest.mark.needs_root

ROOT = Path(__file__).resolve().parents[2]
NAME = b"0000:01:00.0"
NODES = [
    DevNode("vfio/vfio", 10, 196, 0o666),
    DevNode("vfio/13", 243, 13, 0o600),
    DevNode("vfio/devices/vfio0", 511, 0, 0o600),
]
KINDS = {
    "vfio/vfio": FileKind.CONTAINER,
    "vfio/13": FileKind.GROUP,
    "vfio/devices/vfio0": FileKind.DEVICE,
}


class StubFile(File):
    def __init__(self, path: str) -> None:
        self.kind = KINDS[path]
        self.label = path
        self.data = bytearray()
        self.released = False

    def read(self, task: Task, offset: int, size: int) -> bytes:
        return bytes(self.data[offset : offset + size])

    def write(self, task: Task, offset: int, data: bytes) -> int:
        self.data[offset : offset + len(data)] = data
        return len(data)

    def release(self) -> None:
        self.released = True


class StubKernel:
    def __init__(self) -> None:
        self.opened: list[tuple[str, StubFile]] = []

    def nodes(self) -> list[DevNode]:
        return list(NODES)

    def open(self, path: str, task: Task) -> File:
        f = StubFile(path)
        self.opened.append((path, f))
        return f

    def describe(self) -> dict[str, object]:
        return {}


class RunHandler:
    """What ``fakedev run`` plugs into the supervisor (with a stub kernel)."""

    def __init__(self, server: Server, mount: Path) -> None:
        self.server = server
        self.mount = mount
        self.by_ino: dict[int, DevNode] = {}
        self.seen_groups: list[File] = []

    def learn_nodes(self) -> None:
        """Worker thread: inode numbers of the nodes (a stat of the mount)."""
        for dn in NODES:
            self.by_ino[os.stat(self.mount / dn.path).st_ino] = dn

    async def on_ioctl(self, call: Call, fd: int, cmd: int, arg: int) -> Decision:
        task = ProcessTask(call.tid, self.server.ctx, on_loop=False)
        try:
            f = await trio.to_thread.run_sync(task.fget, fd)
        except KernelError as e:
            return Error(e.errno)
        if not isinstance(f, File):
            f.close()
            return Continue()  # not ours: the real kernel answers
        if f.kind is not FileKind.GROUP:
            return Continue()  # ours, but FUSE serves it (the model answers ENOTTY)
        self.seen_groups.append(f)
        try:
            name = call.read_cstring(arg)
        except OSError as e:
            return Error(e.errno or errno.EFAULT)
        if not call.is_valid():
            return Error(errno.EINTR)
        if name != NAME:
            return Error(errno.ENODEV)
        path = self.mount / "vfio/devices/vfio0"
        return InstallFd(await trio.to_thread.run_sync(os.open, path, os.O_RDWR))

    def on_stat(self, call: Call, target: StatTarget) -> Decision:
        mount_dev = self.server.ctx.mount_dev
        if mount_dev is None or target.st_dev != os.makedev(*mount_dev):
            return Continue()
        dn = self.by_ino.get(target.st_ino)
        return Continue() if dn is None else CharDevice(dn.major, dn.minor, dn.mode)


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc")
    assert gcc, "gcc is needed to build the probe"
    exe = tmp_path_factory.mktemp("probe") / "probe"
    src = ROOT / "tools" / "supervisor_probe.c"
    subprocess.run([gcc, "-O1", "-Wall", "-pthread", "-o", str(exe), str(src)], check=True)
    return exe


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    m = tmp_path / "mnt"
    m.mkdir()
    yield m
    M.clear_stale(str(m))
    assert not M.mounts_at(str(m))


class Served:
    def __init__(self, kernel: StubKernel, server: Server, mount: Path) -> None:
        self.kernel = kernel
        self.server = server
        self.mount = mount


@pytest.fixture
async def served(mnt: Path, nursery: trio.Nursery) -> AsyncIterator[Served]:
    k = StubKernel()
    srv = await nursery.start(Server(k).serve, str(mnt))
    yield Served(k, srv, mnt)


def parse(text: str) -> dict[str, list[str]]:
    return {key: rest for key, *rest in (line.split() for line in text.splitlines())}


async def supervised(
    served: Served, cmd: list[str], out_path: Path, stat: bool
) -> tuple[int, dict[str, list[str]], RunHandler]:
    handler = RunHandler(served.server, served.mount)
    await trio.to_thread.run_sync(handler.learn_nodes)
    with open(out_path, "w") as out, trio.fail_after(30):
        sup = Supervisor(handler, FilterConfig(stat=stat))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.run)
            proc = await sup.start_process(cmd, stdout=out)
            status = await proc.wait()
            nursery.cancel_scope.cancel()
    return status, parse(out_path.read_text()), handler


async def test_get_device_fd_installs_an_open_of_the_mount(
    served: Served, probe: Path, tmp_path: Path
) -> None:
    group = served.mount / "vfio/13"
    status, out, handler = await supervised(
        served, [str(probe), "getfd", NAME.decode(), str(group)], tmp_path / "out", stat=False
    )
    assert status == 0
    newfd, err = map(int, out["getfd"])
    assert err == 0 and newfd > int(out["groupfd"][0])
    assert out["cloexec"] == ["1"] and out["read"] == ["4", "ping"]
    paths = [p for p, _f in served.kernel.opened]
    assert paths == ["vfio/13", "vfio/devices/vfio0"]
    group_file, device_file = (f for _p, f in served.kernel.opened)
    assert handler.seen_groups == [group_file]  # identified through the FUSE identity ioctl
    assert device_file.data == b"ping"  # the child's writes reached the installed open
    with trio.fail_after(10):
        while not (group_file.released and device_file.released):
            await trio.sleep(0.01)


async def test_other_files_of_the_mount_go_through_fuse(
    served: Served, probe: Path, tmp_path: Path
) -> None:
    status, out, handler = await supervised(
        served, [str(probe), "other", str(served.mount / "vfio/vfio")], tmp_path / "out", False
    )
    assert status == 0
    assert out["other-vfio"] == ["-1", str(errno.ENOTTY)]
    assert out["not-ours"] == ["-1", str(errno.ENOTTY)]  # CONTINUE, then FUSE, then the model
    assert handler.seen_groups == []


async def test_stat_mode_reports_the_nodes_as_char_devices(
    served: Served, probe: Path, tmp_path: Path
) -> None:
    node = served.mount / "vfio/devices/vfio0"
    status, out, _ = await supervised(
        served, [str(probe), "stat", str(node)], tmp_path / "out", stat=True
    )
    assert status == 0
    for key in (
        "stat", "fstat", "newfstatat", "newfstatat-empty", "newfstatat-dirfd", "statx",
        "statx-empty", "libc-fstat", "libc-stat", "relative", "proc-self",
    ):  # fmt: skip
        assert out[key] == ["mode", "20600", "rdev", "511:0", "size", "0"], key
    # a directory of the mount is not a node
    status, out, _ = await supervised(
        served, [str(probe), "stat", str(served.mount / "vfio/devices")], tmp_path / "o2", True
    )
    assert out["stat"][1] == "40755"
