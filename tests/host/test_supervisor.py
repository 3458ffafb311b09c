"""The seccomp supervisor against real processes (tools/supervisor_probe.c)."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from fakedev.host import supervisor as sv
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

ROOT = Path(__file__).resolve().parents[2]
PROBE_SRC = ROOT / "tools" / "supervisor_probe.c"
NAME = b"0000:01:00.0"


@pytest.fixture(scope="module")
def probes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    gcc = shutil.which("gcc")
    assert gcc, "gcc is needed to build the probe"
    out = tmp_path_factory.mktemp("probe")
    built = {}
    for kind, extra in (("dynamic", []), ("static", ["-static"])):
        exe = out / f"probe-{kind}"
        subprocess.run(
            [gcc, "-O1", "-Wall", "-pthread", *extra, "-o", str(exe), str(PROBE_SRC)], check=True
        )
        built[kind] = exe
    return built


@pytest.fixture
def probe(probes: dict[str, Path]) -> Path:
    return probes["dynamic"]


class Recorder:
    """A handler made of two plain functions, recording what it was asked."""

    def __init__(
        self,
        on_ioctl: Callable[[Call, int, int, int], Decision | Awaitable[Decision]] | None = None,
        on_stat: Callable[[Call, StatTarget], Decision | Awaitable[Decision]] | None = None,
    ) -> None:
        self.ioctls: list[tuple[Call, int, int, int]] = []
        self.stats: list[tuple[Call, StatTarget]] = []
        self._ioctl = on_ioctl
        self._stat = on_stat

    def on_ioctl(self, call: Call, fd: int, cmd: int, arg: int) -> Decision | Awaitable[Decision]:
        self.ioctls.append((call, fd, cmd, arg))
        return self._ioctl(call, fd, cmd, arg) if self._ioctl else Continue()

    def on_stat(self, call: Call, target: StatTarget) -> Decision | Awaitable[Decision]:
        self.stats.append((call, target))
        return self._stat(call, target) if self._stat else Continue()


def parse(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, *rest = line.split()
        out[key] = rest
    return out


async def run(
    cmd: list[str], handler: Any, config: FilterConfig | None = None, tmp: Path | None = None
) -> tuple[int, dict[str, list[str]], int]:
    """Run ``cmd`` supervised; (exit status, parsed stdout, child pid)."""
    out_path = (tmp or Path("/tmp")) / f"out-{os.getpid()}-{id(cmd)}"
    with open(out_path, "w+") as out, trio.fail_after(30):
        sup = Supervisor(handler, config)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.run)
            proc = await sup.start_process(cmd, stdout=out)
            status = await proc.wait()
            nursery.cancel_scope.cancel()
        out.seek(0)
        text = out.read()
    os.unlink(out_path)
    return status, parse(text), proc.pid


# --- the BPF program, run by a tiny interpreter ------------------------------------------


def bpf_run(prog: list[tuple[int, int, int, int]], nr: int, arch: int, args: list[int]) -> int:
    data = (nr, arch, *args)
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        if code == 0x20:
            if k == 0:
                acc = data[0]
            elif k == 4:
                acc = data[1]
            else:
                i, hi = divmod(k - 16, 8)
                assert hi == 0
                acc = args[i] & 0xFFFFFFFF
            pc += 1
        elif code == 0x15:
            pc += 1 + (jt if acc == k else jf)
        elif code == 0x35:
            pc += 1 + (jt if acc >= k else jf)
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")


X86 = sv.AUDIT_ARCH_X86_64
NOTIFY, ALLOW = sv.SECCOMP_RET_USER_NOTIF, sv.SECCOMP_RET_ALLOW


@pytest.mark.parametrize(
    ("stat_mode", "nr", "arch", "args", "expected"),
    [
        (False, sv.NR_IOCTL, X86, [3, 0x3B6A, 0], NOTIFY),
        (False, sv.NR_IOCTL, X86, [3, (1 << 32) | 0x3B6A, 0], NOTIFY),  # kernel reads 32 bits
        (False, sv.NR_IOCTL, X86, [3, 0x3B6B, 0], ALLOW),
        (False, sv.NR_IOCTL, X86, [0x3B6A, 0x5401, 0], ALLOW),
        (False, sv.NR_FSTAT, X86, [3, 0, 0], ALLOW),
        (True, sv.NR_FSTAT, X86, [3, 0, 0], NOTIFY),
        (True, sv.NR_STATX, X86, [3, 0, 0], NOTIFY),
        (True, sv.NR_NEWFSTATAT, X86, [3, 0, 0], NOTIFY),
        (True, sv.NR_STAT, X86, [3, 0, 0], NOTIFY),
        (True, sv.NR_LSTAT, X86, [3, 0, 0], NOTIFY),
        (True, 0, X86, [3, 0, 0], ALLOW),  # read
        (True, sv.NR_IOCTL, 0x40000003, [3, 0x3B6A, 0], ALLOW),  # i386
        (True, sv.X32_SYSCALL_BIT | sv.NR_IOCTL, X86, [3, 0x3B6A, 0], ALLOW),  # x32
    ],
)
def test_filter_traps_only_ours(
    stat_mode: bool, nr: int, arch: int, args: list[int], expected: int
) -> None:
    prog = sv.build_filter(FilterConfig(stat=stat_mode))
    assert bpf_run(prog, nr, arch, args + [0] * (6 - len(args))) == expected


def test_filter_with_no_ioctls_traps_only_stat() -> None:
    prog = sv.build_filter(FilterConfig(ioctl_cmds=(), stat=True))
    assert bpf_run(prog, sv.NR_IOCTL, X86, [3, 0x3B6A, 0, 0, 0, 0]) == ALLOW
    assert bpf_run(prog, sv.NR_STATX, X86, [0] * 6) == NOTIFY


# --- GET_DEVICE_FD returns a new fd ------------------------------------------------------


def installing_handler(device: Path, pids: list[int]) -> Recorder:
    async def on_ioctl(call: Call, fd: int, cmd: int, arg: int) -> Decision:
        pids.append(call.pid)
        if call.read_cstring(arg) != NAME:
            return Error(errno.EINVAL)
        local = await trio.to_thread.run_sync(os.open, device, os.O_RDWR)
        return InstallFd(local)

    return Recorder(on_ioctl)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
async def test_get_device_fd_installs_a_new_fd(
    probes: dict[str, Path], kind: str, tmp_path: Path
) -> None:
    group, device = tmp_path / "13", tmp_path / "device"
    group.write_bytes(b"")
    device.write_bytes(b"")
    pids: list[int] = []
    handler = installing_handler(device, pids)

    status, out, pid = await run(
        [str(probes[kind]), "getfd", NAME.decode(), str(group)], handler, tmp=tmp_path
    )

    assert status == 0
    newfd, err = map(int, out["getfd"])
    assert err == 0 and newfd >= 0 and newfd != int(out["groupfd"][0])
    assert out["cloexec"] == ["1"]
    assert out["read"] == ["4", "ping"]
    assert device.read_bytes() == b"ping"  # written through the installed fd
    [(call, fd, cmd, _arg)] = handler.ioctls
    assert (call.syscall, fd, cmd) == ("ioctl", int(out["groupfd"][0]), 0x3B6A)
    assert call.tid == pid and pids == [pid]


async def test_install_without_cloexec(probe: Path, tmp_path: Path) -> None:
    group, device = tmp_path / "13", tmp_path / "device"
    group.write_bytes(b"")
    device.write_bytes(b"")

    async def on_ioctl(call: Call, fd: int, cmd: int, arg: int) -> Decision:
        return InstallFd(await trio.to_thread.run_sync(os.open, device, os.O_RDWR), cloexec=False)

    status, out, _ = await run(
        [str(probe), "getfd", NAME.decode(), str(group)], Recorder(on_ioctl), tmp=tmp_path
    )
    assert status == 0 and out["cloexec"] == ["0"] and out["read"] == ["4", "ping"]


async def test_untrapped_and_foreign_calls_run_as_made(probe: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    handler = Recorder()  # Continue for everything

    status, out, _ = await run([str(probe), "other", str(plain)], handler, tmp=tmp_path)

    assert status == 0
    assert out["fionread"] == ["0", "3"]
    assert out["other-vfio"] == ["-1", str(errno.ENOTTY)]
    assert out["not-ours"] == ["-1", str(errno.ENOTTY)]  # the real kernel's answer
    assert [cmd for _c, _fd, cmd, _a in handler.ioctls] == [0x3B6A]
    assert handler.stats == []  # stat mode off: the loader's fstat calls are not seen


def broken_sync(call: Call, fd: int, cmd: int, arg: int) -> Decision:
    raise RuntimeError("model bug")


async def broken_async(call: Call, fd: int, cmd: int, arg: int) -> Decision:
    await trio.lowlevel.checkpoint()
    raise RuntimeError("model bug")


@pytest.mark.parametrize("broken", [broken_sync, broken_async])
async def test_handler_exception_answers_eio(
    probe: Path, tmp_path: Path, broken: Callable[..., Any]
) -> None:
    group = tmp_path / "13"
    group.write_bytes(b"")

    status, out, _ = await run(
        [str(probe), "getfd", NAME.decode(), str(group)], Recorder(broken), tmp=tmp_path
    )
    assert status == 0
    assert out["getfd"] == ["-1", str(errno.EIO)]


async def test_stat_handler_exception_answers_eio(
    probe: Path, nodes: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    chosen, _other, _link = nodes

    def broken(call: Call, target: StatTarget) -> Decision:
        if (
            target.path is None
            and target.fd is not None
            and os.path.basename(os.readlink(f"/proc/{call.tid}/fd/{target.fd}")) == "vfio0"
        ):
            raise RuntimeError("model bug")
        return Continue()

    _status, out, _ = await run(
        [str(probe), "stat", str(chosen)],
        Recorder(on_stat=broken),
        FilterConfig(stat=True),
        tmp_path,
    )
    assert out["fstat"] == ["err", str(errno.EIO)]
    assert out["stat"][1] == "100644"


async def test_threads_are_served_concurrently(probe: Path, tmp_path: Path) -> None:
    group, device = tmp_path / "13", tmp_path / "device"
    group.write_bytes(b"")
    device.write_bytes(b"")
    n = 4
    arrived: list[int] = []
    all_in = trio.Event()

    async def on_ioctl(call: Call, fd: int, cmd: int, arg: int) -> Decision:
        arrived.append(call.tid)
        if len(arrived) == n:
            all_in.set()
        await all_in.wait()  # only returns if the n calls are in flight together
        return InstallFd(await trio.to_thread.run_sync(os.open, device, os.O_RDWR))

    status, out, pid = await run(
        [str(probe), "threads", NAME.decode(), str(group), str(n)], Recorder(on_ioctl), tmp=tmp_path
    )
    assert status == 0
    fds = {int(out[f"thread{i}"][0]) for i in range(n)}
    assert len(fds) == n and min(fds) > 2
    assert len(set(arrived)) == n and pid not in arrived  # the threads, not the main one


async def test_interrupted_call_is_restarted_and_the_stale_fd_dropped(
    probe: Path, tmp_path: Path
) -> None:
    group, device = tmp_path / "13", tmp_path / "device"
    group.write_bytes(b"")
    device.write_bytes(b"")
    calls: list[Call] = []
    first_in, second_in, release_first = trio.Event(), trio.Event(), trio.Event()
    stale_valid: list[bool] = []

    async def on_ioctl(call: Call, fd: int, cmd: int, arg: int) -> Decision:
        calls.append(call)
        if len(calls) == 1:
            first_in.set()
            await release_first.wait()
            stale_valid.append(call.is_valid())
        else:
            second_in.set()
        return InstallFd(await trio.to_thread.run_sync(os.open, device, os.O_RDWR))

    out_path = tmp_path / "out"
    with open(out_path, "w") as out, trio.fail_after(30):
        sup = Supervisor(Recorder(on_ioctl))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.run)
            proc = await sup.start_process(
                [str(probe), "signal", NAME.decode(), str(group)], stdout=out
            )
            await first_in.wait()
            proc.send_signal(signal.SIGUSR1)  # SA_RESTART: the ioctl is restarted
            await second_in.wait()
            release_first.set()
            status = await proc.wait()
            nursery.cancel_scope.cancel()
    res = parse(out_path.read_text())
    assert status == 0
    assert res["signals"] == ["1"]
    assert res["getfd"][1] == "0" and res["read"] == ["4", "ping"]
    assert stale_valid == [False]
    assert len(calls) == 2 and calls[0].id != calls[1].id
    assert sup.answered == 1  # the stale ADDFD found no waiting call; its fd was dropped
    assert device.read_bytes() == b"ping"


@pytest.mark.parametrize(
    "bad", [None, Error(0), Error(5000), CharDevice(1, 1), sv.Return(1 << 70), InstallFd(1 << 30)]
)
async def test_invalid_decisions_answer_eio(probe: Path, tmp_path: Path, bad: Any) -> None:
    group = tmp_path / "13"
    group.write_bytes(b"")
    _status, out, _ = await run(
        [str(probe), "getfd", NAME.decode(), str(group)], Recorder(lambda *a: bad), tmp=tmp_path
    )
    expected = errno.EBADF if isinstance(bad, InstallFd) else errno.EIO  # ADDFD's own errno
    assert out["getfd"] == ["-1", str(expected)]


async def test_error_and_return_decisions(probe: Path, tmp_path: Path) -> None:
    group = tmp_path / "13"
    group.write_bytes(b"")
    for decision, expected in (
        (Error(errno.EBUSY), ["-1", str(errno.EBUSY)]),
        (sv.Return(7), ["7", "0"]),
    ):

        def decide(call: Call, fd: int, cmd: int, arg: int, d: Decision = decision) -> Decision:
            return d

        _status, out, _ = await run(
            [str(probe), "getfd", NAME.decode(), str(group)], Recorder(decide), tmp=tmp_path
        )
        assert out["getfd"] == expected


async def test_filter_is_inherited_by_children(probe: Path, tmp_path: Path) -> None:
    group, device = tmp_path / "13", tmp_path / "device"
    group.write_bytes(b"")
    device.write_bytes(b"")
    pids: list[int] = []
    handler = installing_handler(device, pids)

    status, out, pid = await run(
        [str(probe), "fork-getfd", NAME.decode(), str(group)], handler, tmp=tmp_path
    )

    assert status == 0 and out["child-status"] == ["0"]
    assert out["getfd"][1] == "0" and out["read"] == ["4", "ping"]
    [(call, *_)] = handler.ioctls
    assert call.tid != pid and pids == [call.tid]  # the forked child, not the probe


# --- the supervisor going away -------------------------------------------------------------


async def test_pending_call_fails_when_supervisor_stops(probe: Path, tmp_path: Path) -> None:
    group = tmp_path / "13"
    group.write_bytes(b"")
    called = trio.Event()

    async def stuck(call: Call, fd: int, cmd: int, arg: int) -> Decision:
        called.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    out_path = tmp_path / "out"
    with open(out_path, "w") as out, trio.fail_after(30):
        sup = Supervisor(Recorder(stuck))

        async def serve(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
            with trio.CancelScope() as scope:
                task_status.started(scope)
                await sup.run()

        async with trio.open_nursery() as nursery:
            sup_scope = await nursery.start(serve)
            proc = await sup.start_process([str(probe), "pending", str(group)], stdout=out)
            await called.wait()
            sup_scope.cancel()
            # the child is stuck in its ioctl until the listener closes
            status = await proc.wait()
            nursery.cancel_scope.cancel()

    res = parse(out_path.read_text())
    assert status == 0
    assert res["getfd"] == ["-1", str(errno.ENOSYS)]  # pending call failed, no hang
    assert res["after"][0] == "mode"  # untrapped calls still work
    assert res["again"] == ["-1", str(errno.ENOSYS)]  # later trapped calls fail at once
    assert res["alive"] == ["1"]


async def test_run_returns_when_the_tree_has_exited(probe: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    inheritable: list[bool] = []

    def on_ioctl(call: Call, fd: int, cmd: int, arg: int) -> Decision:
        # while a call waits, run() cannot end and the listener is open
        assert sup.listener is not None
        inheritable.append(os.get_inheritable(sup.listener))
        return Continue()

    sup = Supervisor(Recorder(on_ioctl))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.run)
            proc = await sup.start_process(
                [str(probe), "other", str(plain)], stdout=subprocess.DEVNULL
            )
            await proc.wait()
        # run() ended by itself: every holder of the filter is gone
    assert sup.answered == 1
    assert inheritable == [False]  # no other child of ours may keep the listener open


async def test_exec_failure_stops_run(tmp_path: Path) -> None:
    sup = Supervisor(Recorder())
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.run)
            with pytest.raises(FileNotFoundError):
                await sup.start_process([str(tmp_path / "missing")])
    assert sup.answered == 0


async def test_run_supervised_returns_the_exit_status(probe: Path) -> None:
    assert (
        await sv.run_supervised(
            [str(probe), "nonsense"],
            Recorder(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        == 2
    )


# --- stat mode ---------------------------------------------------------------------------

STAT_KEYS = [
    "stat",
    "lstat",
    "fstat",
    "newfstatat",
    "newfstatat-empty",
    "newfstatat-dirfd",
    "statx",
    "statx-empty",
    "libc-fstat",
    "libc-stat",
    "relative",
    "link-stat",
]


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    d = tmp_path / "devices"
    d.mkdir()
    chosen, other = d / "vfio0", d / "plain"
    chosen.write_bytes(b"some bytes")
    other.write_bytes(b"12345")
    chosen.chmod(0o644)
    link = tmp_path / "link"
    link.symlink_to(chosen)
    yield chosen, other, link


def chardev_for(chosen: Path, major: int, minor: int, perm: int | None = None) -> Recorder:
    ident = chosen.stat()

    def on_stat(call: Call, target: StatTarget) -> Decision:
        if target.same_file(ident):
            return CharDevice(major, minor, perm)
        return Continue()

    return Recorder(on_stat=on_stat)


async def test_stat_mode_reports_a_char_device(
    probe: Path, nodes: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    chosen, _other, link = nodes
    handler = chardev_for(chosen, 511, 7, perm=0o600)

    status, out, _ = await run(
        [str(probe), "stat", str(chosen), str(link)], handler, FilterConfig(stat=True), tmp_path
    )

    assert status == 0
    for key in STAT_KEYS:
        assert out[key] == ["mode", "20600", "rdev", "511:7", "size", "0"], key
    assert out["link-lstat"][1] == "120777"  # the symlink itself is not ours
    assert out["efault"] == ["err", str(errno.EFAULT)]
    seen = {call.syscall for call, _t in handler.stats}
    assert seen == {"stat", "lstat", "fstat", "newfstatat", "statx"}


async def test_stat_mode_keeps_permissions_and_big_numbers(
    probe: Path, nodes: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    chosen, _other, _link = nodes
    handler = chardev_for(chosen, 4095, 1 << 19)  # needs the split dev_t encoding

    _status, out, _ = await run(
        [str(probe), "stat", str(chosen)], handler, FilterConfig(stat=True), tmp_path
    )
    for key in ("fstat", "statx", "libc-stat"):
        assert out[key][:4] == ["mode", "20644", "rdev", f"4095:{1 << 19}"], key


async def test_stat_mode_leaves_other_files_alone(
    probe: Path, nodes: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    chosen, other, _link = nodes
    handler = chardev_for(chosen, 511, 7)

    _status, out, _ = await run(
        [str(probe), "stat", str(other)], handler, FilterConfig(stat=True), tmp_path
    )

    for key in STAT_KEYS[:-1]:
        assert out[key] == ["mode", "100644", "rdev", "0:0", "size", "5"], key
    assert out["efault"] == ["err", str(errno.EFAULT)]
    targets = {t.path for _c, t in handler.stats if t.path is not None}
    assert str(other).encode() in targets and b"plain" in targets


async def test_stat_mode_off_does_not_trap_stat(
    probe: Path, nodes: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    chosen, _other, _link = nodes
    handler = chardev_for(chosen, 511, 7)
    _status, out, _ = await run([str(probe), "stat", str(chosen)], handler, tmp=tmp_path)
    assert out["fstat"][1] == "100644"
    assert handler.stats == []


def test_patch_stat_layout() -> None:
    raw = bytes(range(144))
    st = sv.patch_stat(raw, stat.S_IFCHR | 0o600, os.makedev(1, 2))
    assert int.from_bytes(st[24:28], "little") == stat.S_IFCHR | 0o600
    assert int.from_bytes(st[40:48], "little") == os.makedev(1, 2)
    assert st[:24] == raw[:24] and st[72:] == raw[72:]  # dev, ino, nlink, times kept


# --- the whole trick, without FUSE -----------------------------------------------------------

QEMU_LIKE = r"""
import ctypes, os, stat, sys
libc = ctypes.CDLL(None, use_errno=True)
root, bdf = sys.argv[1], sys.argv[2]
# legacy path: the group's GET_DEVICE_FD returns a new fd
group = os.open(root + "/dev/vfio/13", os.O_RDWR)
fd = libc.ioctl(group, 0x3b6a, bdf.encode())
print("legacy", fd, ctypes.get_errno())
os.write(fd, b"config")
# iommufd path: QEMU's open_cdev
dev = open(root + "/sys/bus/pci/devices/" + bdf + "/vfio-dev/vfio0/dev").read().strip()
maj, mino = map(int, dev.split(":"))
cdev = os.open(root + "/dev/vfio/devices/vfio0", os.O_RDWR)
st = os.fstat(cdev)
print("cdev", int(stat.S_ISCHR(st.st_mode)), int(st.st_rdev == os.makedev(maj, mino)))
print("unknown", libc.ioctl(group, 0x3b6a, b"0000:99:00.0"), ctypes.get_errno())
print("badptr", libc.ioctl(group, 0x3b6a, ctypes.c_void_p(8)), ctypes.get_errno())
"""


class FakeVfio:
    """A FUSE-less stand-in for the model: regular files play the nodes."""

    def __init__(self, root: Path) -> None:
        self.group = root / "dev/vfio/13"
        self.cdev = root / "dev/vfio/devices/vfio0"
        self.group_devices = {NAME: self.cdev}
        sysdev = root / f"sys/bus/pci/devices/{NAME.decode()}/vfio-dev/vfio0"
        for p in (self.group, self.cdev, sysdev / "dev"):
            p.parent.mkdir(parents=True, exist_ok=True)
        self.group.write_bytes(b"")
        self.cdev.write_bytes(b"")
        (sysdev / "dev").write_text("511:0\n")

    async def on_ioctl(self, call: Call, fd: int, cmd: int, arg: int) -> Decision:
        # Which file is the caller's fd? Compare identities, never names.
        st = await trio.to_thread.run_sync(os.stat, f"/proc/{call.tid}/fd/{fd}")
        if not os.path.samestat(st, self.group.stat()):
            return Continue()
        try:
            name = call.read_cstring(arg)
        except OSError as e:
            return Error(e.errno or errno.EFAULT)
        if not call.is_valid():
            return Error(errno.EINTR)
        path = self.group_devices.get(name)
        if path is None:
            return Error(errno.ENODEV)
        return InstallFd(await trio.to_thread.run_sync(os.open, path, os.O_RDWR))

    def on_stat(self, call: Call, target: StatTarget) -> Decision:
        if target.same_file(self.cdev.stat()):
            return CharDevice(511, 0)
        return Continue()


async def test_whole_trick_without_fuse(tmp_path: Path) -> None:
    fake = FakeVfio(tmp_path)
    status, out, _ = await run(
        [sys.executable, "-S", "-c", QEMU_LIKE, str(tmp_path), NAME.decode()],
        fake,
        FilterConfig(stat=True),
        tmp_path,
    )
    assert status == 0
    assert int(out["legacy"][0]) > 2 and out["legacy"][1] == "0"
    assert fake.cdev.read_bytes() == b"config"
    assert out["cdev"] == ["1", "1"]
    assert out["unknown"] == ["-1", str(errno.ENODEV)]
    assert out["badptr"] == ["-1", str(errno.EFAULT)]


@pytest.mark.parametrize("no_new_privs", [True, False])
async def test_no_new_privs_is_set_unless_asked_not_to(tmp_path: Path, no_new_privs: bool) -> None:
    if not no_new_privs and os.geteuid() != 0:
        pytest.skip("a filter without no_new_privs needs CAP_SYS_ADMIN")
    out_path = tmp_path / "status"
    with open(out_path, "w") as out:
        status = await sv.run_supervised(
            ["cat", "/proc/self/status"],
            Recorder(),
            FilterConfig(no_new_privs=no_new_privs),
            stdout=out,
        )
    assert status == 0
    fields = dict(
        line.split(":\t", 1) for line in out_path.read_text().splitlines() if ":\t" in line
    )
    assert fields["NoNewPrivs"].strip() == ("1" if no_new_privs else "0")
    assert fields["Seccomp"].strip() == "2"  # filter mode


NESTED = """
import errno, sys
from fakedev.host.supervisor import FilterConfig, install_filter
try:
    install_filter(FilterConfig(no_new_privs=True, ioctl_cmds=(0x1234,)))
except OSError as e:
    print("listener", e.errno)
import ctypes
from fakedev.host import supervisor as sv
prog = sv._PreparedFilter(FilterConfig())
plain = sv._syscall(
    ctypes.c_long(sv.NR_SECCOMP), ctypes.c_long(sv.SECCOMP_SET_MODE_FILTER), ctypes.c_long(0),
    ctypes.byref(prog._prog),
)
print("plain", plain)
"""


async def test_a_second_listener_in_the_tree_is_refused(tmp_path: Path) -> None:
    out_path = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(out_path, "w") as out:
        status = await sv.run_supervised(
            [sys.executable, "-c", NESTED], Recorder(), stdout=out, env=env
        )
    assert status == 0
    res = parse(out_path.read_text())
    assert res["listener"] == [str(errno.EBUSY)]
    assert res["plain"] == ["0"]
