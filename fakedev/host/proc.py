"""The calling thread of a real process, as a model ``Task``.

What lives here: ``ProcessTask`` (user memory through process_vm_readv /
process_vm_writev, fds through pidfd_open + pidfd_getfd, capabilities from
/proc), ``HostForeignFile`` (our copy of a caller's fd that is not one of our
opens: an eventfd, a pipe), the private identity ioctl that tells which of our
opens a copied fd is, and ``HostContext``, the little the glue tells tasks
about the mount.

How "which open is it" works: the copy of the caller's fd is on our own
mount (same st_dev, read with statx(AT_STATX_DONT_SYNC) so no request is sent);
an ioctl with ``IDENTITY_IOCTL`` on the copy reaches our own FUSE loop with the
``fh`` of that open, and the loop answers it inline with the fh (only for our
own threads). That ioctl blocks until the loop answers, so it may only be
issued from a worker thread: on the loop thread the task raises
``NeedsWorker`` instead and the glue retries the call in a worker.

What must not: no knowledge of VFIO; no FUSE protocol.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from fakedev.kernel.errors import KernelError
from fakedev.kernel.task import ForeignKind

if TYPE_CHECKING:
    from fakedev.kernel.file import File

#: _IO(0xE7, 0x01): a type byte neither VFIO/iommufd (';') nor the VFS uses.
IDENTITY_IOCTL = (0xE7 << 8) | 0x01

SYS_PIDFD_OPEN = 434
SYS_PIDFD_GETFD = 438
AT_EMPTY_PATH = 0x1000
AT_STATX_DONT_SYNC = 0x4000

_libc = ctypes.CDLL(None, use_errno=True)


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


# The copy calls are the fast path: no errno bookkeeping (a short count is all we
# need) and no argtypes conversion (every argument is a small int or a byref).
_libc_fast = ctypes.CDLL(None, use_errno=False)
_pvr = _libc_fast.process_vm_readv
_pvr.restype = ctypes.c_ssize_t
_pvw = _libc_fast.process_vm_writev
_pvw.restype = ctypes.c_ssize_t
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_ioctl.restype = ctypes.c_int
_statx = _libc.statx
_statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_char_p]
_statx.restype = ctypes.c_int
_addressof = ctypes.addressof


class NeedsWorker(BaseException):
    """fget found one of our own opens while running on the FUSE loop thread.

    A BaseException so that no ``except Exception`` in the model swallows it: the
    glue catches it and runs the call again in a worker thread.
    """


def fd_dev(fd: int) -> tuple[int, int]:
    """(major, minor) of the file system holding ``fd``, without asking its server."""
    buf = ctypes.create_string_buffer(256)
    if _statx(fd, b"", AT_EMPTY_PATH | AT_STATX_DONT_SYNC, 0, buf) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    major = int.from_bytes(buf.raw[136:140], "little")
    minor = int.from_bytes(buf.raw[140:144], "little")
    return major, minor


class _Scratch(threading.local):
    """Per-thread copy buffer and iovecs, so small copies allocate nothing but the result."""

    SIZE = 4096

    def __init__(self) -> None:
        self.buf = bytearray(self.SIZE)
        self.mv = memoryview(self.buf)
        self.cbuf = (ctypes.c_char * self.SIZE).from_buffer(self.buf)
        self.base = _addressof(self.cbuf)
        self.local = _Iovec(self.base, 0)
        self.remote = _Iovec(0, 0)
        self.lref = ctypes.byref(self.local)
        self.rref = ctypes.byref(self.remote)


_scratch = _Scratch()


def read_memory(tid: int, addr: int, size: int) -> bytes:
    """copy_from_user from thread ``tid``: all ``size`` bytes or EFAULT."""
    if size <= 0:
        return b""
    if size > _Scratch.SIZE:
        buf = ctypes.create_string_buffer(size)
        n = _pvr(tid, ctypes.byref(_Iovec(_addressof(buf), size)), 1, ctypes.byref(_Iovec(addr, size)), 1, 0)
        if n != size:
            raise KernelError(errno.EFAULT)
        return buf.raw
    sc = _scratch
    sc.local.iov_len = size
    r = sc.remote
    r.iov_base = addr
    r.iov_len = size
    if _pvr(tid, sc.lref, 1, sc.rref, 1, 0) != size:
        raise KernelError(errno.EFAULT)
    return bytes(sc.mv[:size])


def write_memory(tid: int, addr: int, data: bytes) -> None:
    """copy_to_user into thread ``tid``; a partial write (prefix) is EFAULT."""
    size = len(data)
    if size == 0:
        return
    if size > _Scratch.SIZE:
        buf = ctypes.create_string_buffer(data, size)
        n = _pvw(tid, ctypes.byref(_Iovec(_addressof(buf), size)), 1, ctypes.byref(_Iovec(addr, size)), 1, 0)
        if n != size:
            raise KernelError(errno.EFAULT)
        return
    sc = _scratch
    sc.buf[:size] = data
    sc.local.iov_len = size
    r = sc.remote
    r.iov_base = addr
    r.iov_len = size
    if _pvw(tid, sc.lref, 1, sc.rref, 1, 0) != size:
        raise KernelError(errno.EFAULT)


def tgid_of(tid: int) -> int:
    """The process (thread group) of thread ``tid``; ESRCH if it is gone."""
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    raise KernelError(errno.ESRCH)


def start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot, /proc/PID/stat field 22);
    None if there is no such process. With the pid, it names one process: a pid
    is reused only by a process started later."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    try:
        return int(stat.rsplit(b")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def cap_eff(tid: int) -> int:
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"CapEff:"):
                    return int(line.split()[1], 16)
    except FileNotFoundError:
        pass
    return 0


class HostForeignFile:
    """Our copy of a caller's fd that fakedev does not serve; closing drops it."""

    __slots__ = ("_fd", "kind")

    def __init__(self, fd: int, kind: ForeignKind) -> None:
        self._fd = fd
        self.kind = kind

    @property
    def fd(self) -> int:
        return self._fd

    def signal(self, count: int = 1) -> None:
        """eventfd_signal(): add ``count`` to the counter by writing it."""
        if self.kind is not ForeignKind.EVENTFD or self._fd < 0:
            raise KernelError(errno.EINVAL)
        try:
            os.write(self._fd, count.to_bytes(8, "little"))
        except BlockingIOError:
            pass  # counter saturated, as eventfd_signal would stall; drop

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __del__(self) -> None:  # a leaked reference must not leak the fd
        if getattr(self, "_fd", -1) >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"HostForeignFile(fd={self._fd}, kind={self.kind.value})"


class HostContext:
    """What a ProcessTask needs to know about the mount it serves."""

    def __init__(self, file_for_fh: Callable[[int], File | None]) -> None:
        self.file_for_fh = file_for_fh
        self.mount_dev: tuple[int, int] | None = None


PIDFD_THREAD = os.O_EXCL  # Linux 6.9+: a pidfd for any thread, not only a leader
_pidfd_thread_ok = True


def _pidfd_open(tid: int, tgid: Callable[[], int]) -> int:
    """A pidfd for the caller: by thread id where the kernel allows, else by its tgid."""
    global _pidfd_thread_ok
    if _pidfd_thread_ok:
        pidfd = _syscall(SYS_PIDFD_OPEN, ctypes.c_int(tid), ctypes.c_uint(PIDFD_THREAD))
        if pidfd >= 0:
            return int(pidfd)
        if ctypes.get_errno() != errno.EINVAL:
            raise KernelError(errno.EBADF, f"pidfd_open({tid}): {os.strerror(ctypes.get_errno())}")
        _pidfd_thread_ok = False
    pid = tgid()
    pidfd = _syscall(SYS_PIDFD_OPEN, ctypes.c_int(pid), ctypes.c_uint(0))
    if pidfd < 0:
        raise KernelError(errno.EBADF, f"pidfd_open({pid}): {os.strerror(ctypes.get_errno())}")
    return int(pidfd)


def pidfd_getfd(tid: int, fd: int, tgid: Callable[[], int]) -> int:
    pidfd = _pidfd_open(tid, tgid)
    try:
        copy = _syscall(SYS_PIDFD_GETFD, ctypes.c_int(pidfd), ctypes.c_int(fd), ctypes.c_uint(0))
        if copy < 0:
            raise KernelError(errno.EBADF, f"pidfd_getfd({fd}): {os.strerror(ctypes.get_errno())}")
        return int(copy)
    finally:
        os.close(pidfd)


def identify(fd: int) -> int:
    """Issue the identity ioctl on ``fd`` (one of our opens): its fh, or -errno."""
    rc = _ioctl(fd, IDENTITY_IOCTL, 0)
    return rc if rc >= 0 else -ctypes.get_errno()


def check_mapped(pid: int, addr: int, length: int, write: bool) -> None:
    """KernelError(EFAULT) unless [addr, addr+length) lies in mappings of ``pid``
    that are readable (and writable if ``write``), without gaps."""
    end = addr + max(length, 1)
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            maps = f.read()
    except OSError:
        raise KernelError(errno.EFAULT, "process gone") from None
    pos = addr
    for line in maps.splitlines():
        rng, perms = line.split(b" ", 2)[:2]
        lo_s, hi_s = rng.split(b"-")
        lo, hi = int(lo_s, 16), int(hi_s, 16)
        if hi <= pos:
            continue
        if lo > pos:
            break
        if perms[0:1] != b"r" or (write and perms[1:2] != b"w"):
            break
        pos = hi
        if pos >= end:
            return
    raise KernelError(errno.EFAULT, f"[{addr:#x}, {end:#x}) not mapped as needed")


class ProcessTask:
    """A thread of a real process making a call through FUSE.

    ``tid`` is the request header's pid field (the calling thread). ``on_loop``
    is True while the call runs on the FUSE loop thread (fget of one of our
    own opens then raises NeedsWorker).
    """

    __slots__ = ("_pid", "_start", "ctx", "on_loop", "tid")

    def __init__(self, tid: int, ctx: HostContext, on_loop: bool = True) -> None:
        self.tid = tid
        self.ctx = ctx
        self.on_loop = on_loop
        self._pid = 0
        self._start: int | None = None

    @property
    def pid(self) -> int:
        if not self._pid:
            self._pid = tgid_of(self.tid)
            self._start = start_time(self._pid)  # while the caller waits in its call: it is this process
        return self._pid

    def same_process(self) -> bool:
        """Is ``pid`` still the process that made this call? False once it has
        exited, even if a new process got the same pid (device DMA into the
        memory of a mapping's process checks this first)."""
        return bool(self._pid) and self._start is not None and start_time(self._pid) == self._start

    def read(self, addr: int, size: int) -> bytes:
        return read_memory(self.tid, addr, size)

    def write(self, addr: int, data: bytes) -> None:
        write_memory(self.tid, addr, data)

    def pin_pages(self, addr: int, length: int, write: bool) -> None:
        """pin_user_pages(): the range must be covered by the process's mappings
        (writable ones if ``write``), judged from /proc/<pid>/maps."""
        check_mapped(self.pid, addr, length, write)

    def fget(self, fd: int) -> File | HostForeignFile:
        """fdget(): our model File for one of our opens, else a HostForeignFile."""
        if fd < 0:
            raise KernelError(errno.EBADF)
        def tgid() -> int:
            try:
                return self.pid
            except KernelError:
                raise KernelError(errno.EBADF) from None

        copy = pidfd_getfd(self.tid, fd, tgid)
        try:
            ours = self.ctx.mount_dev is not None and fd_dev(copy) == self.ctx.mount_dev
            if ours:
                if self.on_loop:
                    raise NeedsWorker()
                fh = identify(copy)
                f = self.ctx.file_for_fh(fh) if fh >= 0 else None
                if f is not None:
                    os.close(copy)
                    copy = -1
                    return f
                return HostForeignFile(copy, ForeignKind.OTHER)
            try:
                link = os.readlink(f"/proc/self/fd/{copy}")
            except OSError:
                link = ""
            kind = ForeignKind.EVENTFD if link == "anon_inode:[eventfd]" else ForeignKind.OTHER
            return HostForeignFile(copy, kind)
        except BaseException:
            if copy >= 0:
                os.close(copy)
            raise

    def capable(self, cap: int) -> bool:
        return bool(cap_eff(self.tid) >> cap & 1)

    def fd_install(self, file: File) -> int:
        """Not possible from a FUSE server (no way to create fds in the caller)."""
        raise KernelError(errno.ENOTTY, "fd_install needs the supervisor")

    def __repr__(self) -> str:
        return f"ProcessTask(tid={self.tid})"
