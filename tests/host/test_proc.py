"""ProcessTask against a real child process: memory, fds, capabilities."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from fakedev.host.proc import HostContext, HostForeignFile, ProcessTask, fd_dev, tgid_of
from fakedev.kernel.errors import KernelError
from fakedev.kernel.file import File
from fakedev.kernel.task import ForeignKind

CHILD = r"""
import ctypes, os, sys, threading
buf = ctypes.create_string_buffer(b"hello fakedev", 64)
big = ctypes.create_string_buffer(bytes(range(256)) * 80)
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
pg = libc.mmap(None, 8192, 3, 0x22, -1, 0)
assert libc.mprotect(ctypes.c_void_p(pg + 4096), 4096, 0) == 0
efd = os.eventfd(0)
r, w = os.pipe()
tids = []
stop = threading.Event()
def t():
    tids.append(threading.get_native_id())
    stop.wait()
th = threading.Thread(target=t)
th.start()
while not tids:
    pass
print(ctypes.addressof(buf), pg, efd, r, tids[0], ctypes.addressof(big), flush=True)
for line in sys.stdin:
    cmd = line.split()[0]
    if cmd == "buf":
        print(buf.raw[:16].hex(), flush=True)
    elif cmd == "efd":
        print(os.eventfd_read(efd), flush=True)
    elif cmd == "big":
        print(big.raw[:20480].hex(), flush=True)
    elif cmd == "page":
        print(ctypes.string_at(pg + 4096 - 8, 8).hex(), flush=True)
stop.set()
"""


class Child:
    def __init__(self) -> None:
        self.p = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True)
        assert self.p.stdout is not None
        self.buf, self.page, self.efd, self.pipe, self.thread, self.big = map(
            int, self.p.stdout.readline().split())
        self.page_end = self.page + 4096

    def ask(self, cmd: str) -> str:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().strip()


@pytest.fixture
def child() -> Iterator[Child]:
    c = Child()
    yield c
    c.p.kill()
    c.p.wait()


def task_of(tid: int) -> ProcessTask:
    return ProcessTask(tid, HostContext(lambda fh: None), on_loop=False)


def test_read_write_memory(child: Child) -> None:
    t = task_of(child.p.pid)
    assert t.read(child.buf, 13) == b"hello fakedev"
    t.write(child.buf, b"HELLO")
    assert child.ask("buf").startswith(b"HELLO fakedev".hex())
    assert t.read(child.buf, 0) == b""


def test_large_copies(child: Child) -> None:
    t = task_of(child.p.pid)
    assert t.read(child.big, 20480) == bytes(range(256)) * 80
    t.write(child.big + 100, b"\xee" * 9000)
    assert bytes.fromhex(child.ask("big")) == bytes(range(256))[:100] + b"\xee" * 9000 + (bytes(range(256)) * 80)[9100:]
    with pytest.raises(KernelError) as ei:
        t.read(child.page, 8192)
    assert ei.value.errno == errno.EFAULT


def test_memory_faults_like_the_kernel(child: Child) -> None:
    t = task_of(child.p.pid)
    with pytest.raises(KernelError) as ei:
        t.read(8, 4)
    assert ei.value.errno == errno.EFAULT
    # a range that starts mapped and runs into a PROT_NONE page: EFAULT, not a short copy
    with pytest.raises(KernelError) as ei:
        t.read(child.page_end - 8, 16)
    assert ei.value.errno == errno.EFAULT
    assert t.read(child.page_end - 8, 8) == bytes(8)
    with pytest.raises(KernelError) as ei:
        t.write(child.page_end - 8, b"ABCDEFGHIJKLMNOP")
    assert ei.value.errno == errno.EFAULT
    assert child.ask("page") == b"ABCDEFGH".hex()  # the mapped prefix was written


def test_thread_ids_resolve_to_the_process(child: Child) -> None:
    t = task_of(child.thread)
    assert t.tid == child.thread and t.pid == child.p.pid
    assert tgid_of(child.thread) == child.p.pid
    assert t.read(child.buf, 5) == b"hello"  # memory through the thread id


def test_fget_eventfd_pipe_and_bad_fd(child: Child) -> None:
    t = task_of(child.thread)  # a non-leader thread: pidfd_open needs the tgid
    ev = t.fget(child.efd)
    assert isinstance(ev, HostForeignFile) and ev.kind is ForeignKind.EVENTFD
    ev.signal(3)
    ev.close()
    ev.close()  # idempotent
    assert child.ask("efd") == "3"
    other = t.fget(child.pipe)
    assert not isinstance(other, File) and other.kind is ForeignKind.OTHER
    with pytest.raises(KernelError) as ei:
        other.signal(1)
    assert ei.value.errno == errno.EINVAL
    other.close()
    for bad in (999, -1):
        with pytest.raises(KernelError) as ei:
            t.fget(bad)
        assert ei.value.errno == errno.EBADF


def test_fget_gone_process_is_ebadf() -> None:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    with pytest.raises(KernelError) as ei:
        task_of(p.pid).fget(0)
    assert ei.value.errno == errno.EBADF
    with pytest.raises(KernelError) as ei:
        task_of(p.pid).read(0x1000, 4)
    assert ei.value.errno == errno.EFAULT


def test_capable_and_fd_install(child: Child) -> None:
    t = task_of(child.p.pid)
    root = os.geteuid() == 0
    assert t.capable(21) is root  # CAP_SYS_ADMIN
    with pytest.raises(KernelError) as ei:
        t.fd_install(File())
    assert ei.value.errno == errno.ENOTTY


def test_fd_dev_matches_stat(tmp_path: object) -> None:
    fd = os.open("/proc/self/status", os.O_RDONLY)
    try:
        st = os.fstat(fd)
        assert fd_dev(fd) == (os.major(st.st_dev), os.minor(st.st_dev))
    finally:
        os.close(fd)
