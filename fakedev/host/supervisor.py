"""Seccomp user-notification supervisor for ``fakedev run``.

What lives here: the BPF filter, its installation between fork and exec, and a
trio loop that answers the trapped system calls through a ``Handler``. No VFIO
knowledge lives here: the handler decides, this module only traps, reads and
writes the target's memory and replies.

Why seccomp user notification. FUSE serves almost everything, but two things
are out of its reach: an ioctl that must *create an fd in the caller*
(``VFIO_GROUP_GET_DEVICE_FD``), and a node that must *stat as a char device*
while being served as a regular file (QEMU's ``open_cdev`` wants ``S_ISCHR``
and ``st_rdev == MAJ:MIN``; an ``S_IFCHR`` FUSE inode would be opened through
the real char driver instead). ``SECCOMP_FILTER_FLAG_NEW_LISTENER`` gives a
listener fd on which the supervisor receives the trapped calls, can read and
write the caller's memory, answer with a value or an errno, resume the call
unchanged (``SECCOMP_USER_NOTIF_FLAG_CONTINUE``) or install one of its own
files in the caller and return the new number atomically
(``SECCOMP_IOCTL_NOTIF_ADDFD`` with ``SECCOMP_ADDFD_FLAG_SEND``, Linux 5.14+).
The alternatives were worse: LD_PRELOAD misses static binaries and raw
syscalls; ptrace costs two stops per syscall and conflicts with debuggers; CUSE
is not available.

What is trapped (everything else runs at full speed, decided in BPF):
- ``ioctl`` whose cmd (the low 32 bits of ``args[1]``, as the kernel reads it)
  is one of ``FilterConfig.ioctl_cmds`` (default: 0x3b6a only);
- with ``FilterConfig.stat`` on: ``stat``, ``lstat``, ``fstat``,
  ``newfstatat`` and ``statx``. Glibc's ``fstat`` is ``newfstatat(fd, "",
  AT_EMPTY_PATH)``, so all five must be trapped.
Only the x86_64 syscall ABI is trapped; i386 (int 0x80) and x32 calls pass.

Costs (measured on Linux 6.18, 2 cores, Python 3.11): untrapped calls pay only
the BPF run; a trapped ioctl answered inline (CONTINUE or a value) takes about
40-50 us; a stat in stat mode about 110-150 us. Handlers that return a plain
Decision are answered inline on the loop, async ones in their own task, so
several threads of the target are served concurrently. The listener is set to
SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP (6.6+: the supervisor runs on the caller's
CPU). Stat mode traps every stat of every process in the tree: use it only for
programs that need it (QEMU's ``open_cdev``).

Limits and consequences:
- It works at the syscall level: static binaries, raw ``syscall()`` and any
  libc are covered. Children inherit the filter across fork and exec.
- A filter cannot be removed. Once the listener is closed (supervisor gone),
  trapped calls fail with ENOSYS (pending ones too: they do not hang); all
  other calls keep working. In stat mode that means every stat fails, so the
  supervisor must outlive the supervised tree.
- Installing a filter needs ``no_new_privs`` (or CAP_SYS_ADMIN): with it,
  setuid/setgid binaries and file capabilities inside ``fakedev run`` do not
  raise privileges (sudo, ping with caps). ``FilterConfig.no_new_privs=False``
  skips it when the caller is privileged.
- CONTINUE re-runs the call as made, so it is only used for calls that are
  not ours; the decision about ours is taken on data read from the caller, and
  ``SECCOMP_IOCTL_NOTIF_ID_VALID`` is checked before acting on it.
- Stat resolution reproduces the caller's path walk from the supervisor
  (``/proc/<tid>/root`` with ``RESOLVE_IN_ROOT``, ``/proc/<tid>/cwd``,
  ``/proc/<tid>/fd/N``); ``/proc/self`` is rewritten to the caller's pid.
  A walk that fails is resumed with CONTINUE, so the kernel gives the real
  error. The walk never asks a FUSE server from the loop thread (which may be
  the server of that mount): it uses the dcache and cached attributes only
  (``RESOLVE_CACHED``, ``AT_STATX_DONT_SYNC``) and moves to a worker thread
  when they are not enough. Handlers must follow the same rule.
- A process tree has at most one listener: a program inside ``fakedev run``
  that installs its own user-notification filter (a container runtime, a
  sandbox) gets EBUSY. Plain filters (no listener) still stack.
- Only x86_64 is supported (syscall numbers, struct stat layout).
"""

from __future__ import annotations

import ctypes
import errno as E
import inspect
import logging
import os
import select
import socket
import stat as S
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Protocol, final

import trio
from attrs import define, field, frozen

from fakedev.uapi.ioctls import VFIO_GROUP_GET_DEVICE_FD

log = logging.getLogger(__name__)

# --- ABI facts (x86_64) --------------------------------------------------------

AUDIT_ARCH_X86_64: Final = 0xC000003E
X32_SYSCALL_BIT: Final = 0x40000000

NR_STAT: Final = 4
NR_FSTAT: Final = 5
NR_LSTAT: Final = 6
NR_IOCTL: Final = 16
NR_SECCOMP: Final = 317
NR_NEWFSTATAT: Final = 262
NR_STATX: Final = 332
NR_OPENAT2: Final = 437
NR_PIDFD_OPEN: Final = 434
NR_PIDFD_GETFD: Final = 438

STAT_SYSCALLS: Final = {
    NR_STAT: "stat",
    NR_FSTAT: "fstat",
    NR_LSTAT: "lstat",
    NR_NEWFSTATAT: "newfstatat",
    NR_STATX: "statx",
}
SYSCALL_NAMES: Final = {NR_IOCTL: "ioctl", **STAT_SYSCALLS}

PR_SET_NO_NEW_PRIVS: Final = 38
SECCOMP_SET_MODE_FILTER: Final = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER: Final = 1 << 3
SECCOMP_RET_ALLOW: Final = 0x7FFF0000
SECCOMP_RET_USER_NOTIF: Final = 0x7FC00000
SECCOMP_USER_NOTIF_FLAG_CONTINUE: Final = 1
SECCOMP_ADDFD_FLAG_SEND: Final = 1 << 1


def _iowr(nr: int, size: int, rw: int) -> int:
    return (rw << 30) | (size << 16) | (ord("!") << 8) | nr


_NOTIF = struct.Struct("<QII iIQ6Q")  # id, pid, flags, seccomp_data{nr, arch, ip, args[6]}
_RESP = struct.Struct("<QqiI")  # id, val, error, flags
_ADDFD = struct.Struct("<QIIII")  # id, flags, srcfd, newfd, newfd_flags
assert _NOTIF.size == 80 and _RESP.size == 24 and _ADDFD.size == 24

SECCOMP_IOCTL_NOTIF_RECV: Final = _iowr(0, _NOTIF.size, 3)
SECCOMP_IOCTL_NOTIF_SEND: Final = _iowr(1, _RESP.size, 3)
SECCOMP_IOCTL_NOTIF_ID_VALID: Final = _iowr(2, 8, 1)
SECCOMP_IOCTL_NOTIF_ADDFD: Final = _iowr(3, _ADDFD.size, 1)
SECCOMP_IOCTL_NOTIF_SET_FLAGS: Final = _iowr(4, 8, 1)
SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP: Final = 1

AT_FDCWD: Final = -100
AT_SYMLINK_NOFOLLOW: Final = 0x100
AT_EMPTY_PATH: Final = 0x1000
RESOLVE_IN_ROOT: Final = 0x10
RESOLVE_CACHED: Final = 0x20
AT_STATX_SYNC_TYPE: Final = 0x6000
AT_STATX_DONT_SYNC: Final = 0x4000
STATX_BASIC_STATS: Final = 0x7FF
STATX_TYPE: Final = 0x1
STATX_MODE: Final = 0x2
PATH_MAX: Final = 4096
STAT_SIZE: Final = 144
STATX_SIZE: Final = 256

# classic BPF opcodes
_LD_W_ABS: Final = 0x20
_JEQ_K: Final = 0x15
_JGE_K: Final = 0x35
_RET_K: Final = 0x06
# offsets in struct seccomp_data
_OFF_NR: Final = 0
_OFF_ARCH: Final = 4


def _off_arg_lo(i: int) -> int:
    return 16 + 8 * i  # little endian: low half first


# --- libc ------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_prctl = _libc.prctl
_prctl.restype = ctypes.c_int
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_ioctl = _libc.ioctl
_ioctl.restype = ctypes.c_int
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_vm_readv = _libc.process_vm_readv
_vm_writev = _libc.process_vm_writev
for _f in (_vm_readv, _vm_writev):
    _f.restype = ctypes.c_ssize_t
    _f.argtypes = [
        ctypes.c_int,
        ctypes.POINTER(_IoVec),
        ctypes.c_ulong,
        ctypes.POINTER(_IoVec),
        ctypes.c_ulong,
        ctypes.c_ulong,
    ]


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


# --- the filter --------------------------------------------------------------------


@frozen
class FilterConfig:
    """What the filter traps. ``ioctl_cmds`` are matched on the low 32 bits."""

    ioctl_cmds: tuple[int, ...] = (VFIO_GROUP_GET_DEVICE_FD,)
    stat: bool = False
    no_new_privs: bool = True


def build_filter(config: FilterConfig) -> list[tuple[int, int, int, int]]:
    """The BPF program as (code, jt, jf, k) tuples: allow all but what we trap."""
    # Each entry: (code, jt-label, jf-label, k); labels are names or None (next).
    prog: list[tuple[int, str | None, str | None, int]] = []
    labels: dict[str, int] = {}

    def label(name: str) -> None:
        labels[name] = len(prog)

    prog.append((_LD_W_ABS, None, None, _OFF_ARCH))
    prog.append((_JEQ_K, None, "allow", AUDIT_ARCH_X86_64))
    prog.append((_LD_W_ABS, None, None, _OFF_NR))
    prog.append((_JGE_K, "allow", None, X32_SYSCALL_BIT))
    if config.ioctl_cmds:
        prog.append((_JEQ_K, "ioctl", None, NR_IOCTL))
    if config.stat:
        for nr in sorted(STAT_SYSCALLS):
            prog.append((_JEQ_K, "notify", None, nr))
    prog.append((_RET_K, None, None, SECCOMP_RET_ALLOW))
    if config.ioctl_cmds:
        label("ioctl")
        prog.append((_LD_W_ABS, None, None, _off_arg_lo(1)))
        for cmd in config.ioctl_cmds:
            prog.append((_JEQ_K, "notify", None, cmd & 0xFFFFFFFF))
    label("allow")
    prog.append((_RET_K, None, None, SECCOMP_RET_ALLOW))
    label("notify")
    prog.append((_RET_K, None, None, SECCOMP_RET_USER_NOTIF))

    out: list[tuple[int, int, int, int]] = []
    for i, (code, jt, jf, k) in enumerate(prog):

        def rel(target: str | None, i: int = i) -> int:
            if target is None:
                return 0
            off = labels[target] - i - 1
            assert 0 <= off < 256
            return off

        out.append((code, rel(jt), rel(jf), k))
    return out


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


@final
class _PreparedFilter:
    """A filter ready to install: built before fork, installed after it."""

    def __init__(self, config: FilterConfig) -> None:
        insns = build_filter(config)
        self.config = config
        self._array = (_SockFilter * len(insns))(*(_SockFilter(*t) for t in insns))
        self._prog = _SockFprog(len(insns), self._array)

    def install(self) -> int:
        """Install in the calling (single-threaded) process; returns the listener fd."""
        if self.config.no_new_privs:
            _check(_prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
        return _check(
            _syscall(
                ctypes.c_long(NR_SECCOMP),
                ctypes.c_long(SECCOMP_SET_MODE_FILTER),
                ctypes.c_long(SECCOMP_FILTER_FLAG_NEW_LISTENER),
                ctypes.byref(self._prog),
            ),
            "seccomp(SET_MODE_FILTER)",
        )


def install_filter(config: FilterConfig) -> int:
    """Install the filter in this process (between fork and exec); returns the listener."""
    return _PreparedFilter(config).install()


# --- reading and writing the target ------------------------------------------------


def read_memory(tid: int, addr: int, size: int) -> bytes:
    """process_vm_readv of ``size`` bytes; OSError(EFAULT) if any byte is unmapped."""
    if size == 0:
        return b""
    buf = ctypes.create_string_buffer(size)
    local = _IoVec(ctypes.cast(buf, ctypes.c_void_p), size)
    remote = _IoVec(addr, size)
    n = _check(
        _vm_readv(tid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0), "process_vm_readv"
    )
    if n != size:
        raise OSError(E.EFAULT, "short read of target memory")
    return buf.raw


def write_memory(tid: int, addr: int, data: bytes) -> None:
    """process_vm_writev of ``data``; OSError(EFAULT) if any byte is unmapped."""
    if not data:
        return
    buf = ctypes.create_string_buffer(data, len(data))
    local = _IoVec(ctypes.cast(buf, ctypes.c_void_p), len(data))
    remote = _IoVec(addr, len(data))
    n = _check(
        _vm_writev(tid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0), "process_vm_writev"
    )
    if n != len(data):
        raise OSError(E.EFAULT, "short write of target memory")


def read_cstring(tid: int, addr: int, limit: int = PATH_MAX) -> bytes:
    """A NUL-terminated string at ``addr`` (without the NUL), read page by page.

    OSError(EFAULT) on an unmapped byte before the NUL, OSError(ENAMETOOLONG)
    when no NUL is found within ``limit`` bytes.
    """
    out = b""
    while len(out) < limit:
        chunk = min(4096 - (addr + len(out)) % 4096, limit - len(out))
        data = read_memory(tid, addr + len(out), chunk)
        nul = data.find(b"\0")
        if nul >= 0:
            return out + data[:nul]
        out += data
    raise OSError(E.ENAMETOOLONG, "string too long")


# --- decisions ---------------------------------------------------------------------


@frozen
class Continue:
    """Run the call as the caller made it (SECCOMP_USER_NOTIF_FLAG_CONTINUE)."""


@frozen
class Return:
    """Make the call return ``value`` (>= 0)."""

    value: int


@frozen
class Error:
    """Make the call fail with ``errno``."""

    errno: int


@frozen
class InstallFd:
    """Install ``fd`` (ours) in the caller and return the new number.

    The supervisor owns ``fd`` from then on and closes it after the install,
    whether the install worked or not (the caller may have died meanwhile).
    ``cloexec`` sets O_CLOEXEC on the caller's new fd (as the kernel's
    get_unused_fd_flags(O_CLOEXEC) in VFIO does).
    """

    fd: int
    cloexec: bool = True
    #: called after the install with the caller's new fd number, or -errno
    #: when it failed (-ENOENT: the caller was gone)
    installed: Callable[[int], None] | None = field(default=None, eq=False)


@frozen
class CharDevice:
    """Stat mode: report the file as ``S_IFCHR`` with ``st_rdev = major:minor``.

    The other fields are the real ones (of the regular file); size and blocks
    are reported as 0, as for a char device. ``perm`` replaces the permission
    bits when given.
    """

    major: int
    minor: int
    perm: int | None = None


Decision = Continue | Return | Error | InstallFd | CharDevice


# --- what the handler sees -----------------------------------------------------------


@final
class Call:
    """One trapped system call of one thread of the target."""

    def __init__(
        self,
        listener: int,
        notif_id: int,
        tid: int,
        nr: int,
        arch: int,
        ip: int,
        args: tuple[int, ...],
    ) -> None:
        self._listener = listener
        self.id = notif_id
        self.tid = tid
        self.nr = nr
        self.arch = arch
        self.instruction_pointer = ip
        self.args = args
        self._pid: int | None = None

    @property
    def syscall(self) -> str:
        return SYSCALL_NAMES.get(self.nr, str(self.nr))

    @property
    def pid(self) -> int:
        """Thread-group id of the calling thread (``Tgid:`` of /proc/<tid>/status)."""
        if self._pid is None:
            self._pid = _tgid(self.tid)
        return self._pid

    def is_valid(self) -> bool:
        """SECCOMP_IOCTL_NOTIF_ID_VALID: the thread is still waiting in this call."""
        buf = ctypes.c_uint64(self.id)
        return int(_ioctl(self._listener, SECCOMP_IOCTL_NOTIF_ID_VALID, ctypes.byref(buf))) == 0

    def read(self, addr: int, size: int) -> bytes:
        return read_memory(self.tid, addr, size)

    def read_cstring(self, addr: int, limit: int = PATH_MAX) -> bytes:
        return read_cstring(self.tid, addr, limit)

    def write(self, addr: int, data: bytes) -> None:
        return write_memory(self.tid, addr, data)

    def __repr__(self) -> str:
        return f"<Call {self.syscall} tid={self.tid} id={self.id:#x} args={self.args}>"


@frozen
class StatTarget:
    """The file a trapped stat call is about, as resolved by the supervisor.

    ``fd`` is set for fd-based calls (fstat, or AT_EMPTY_PATH with an empty
    path; None for the caller's cwd), ``path`` for path-based calls (as the
    caller passed it). ``st_*`` are the real attributes of that file (st_dev
    and st_ino identify it; st_dev is encoded as os.stat_result's).
    """

    syscall: str
    fd: int | None
    path: bytes | None
    dirfd: int
    flags: int
    st_dev: int
    st_ino: int
    st_mode: int
    st_rdev: int
    st_size: int

    def same_file(self, st: os.stat_result) -> bool:
        """Is this the file ``st`` describes (same st_dev and st_ino)?"""
        return self.st_dev == st.st_dev and self.st_ino == st.st_ino


class Handler(Protocol):
    """Decides about trapped calls. Methods may be plain or ``async``.

    They run in the supervisor's trio task; anything that may touch the FUSE
    mount served by the same trio run (an open, a stat) must go to a worker
    thread (``trio.to_thread.run_sync``). An exception answers EIO.
    """

    def on_ioctl(
        self, call: Call, fd: int, cmd: int, arg: int
    ) -> Decision | Awaitable[Decision]: ...

    def on_stat(self, call: Call, target: StatTarget) -> Decision | Awaitable[Decision]: ...


# --- stat resolution ------------------------------------------------------------------
#
# The walk is first tried on the loop thread with RESOLVE_CACHED (only dentries
# already in the dcache, never a call into a file system: a FUSE lookup would be
# answered by this very thread) and statx(AT_STATX_DONT_SYNC) (cached attributes,
# no GETATTR). When that is not possible (EAGAIN, or a /proc/self walk) the same
# is done in a worker thread without those restrictions.


class _NeedsThread(Exception):
    """The cached-only walk could not resolve the path."""


@define
class _StatRequest:
    dirfd: int
    path: bytes | None  # None: fd-based (fstat or AT_EMPTY_PATH with "")
    flags: int
    buf: int
    statx_mask: int | None  # None: struct stat


def _parse_stat_request(call: Call) -> _StatRequest:
    a = call.args
    nr = call.nr
    path: bytes | None
    if nr == NR_FSTAT:
        return _StatRequest(_s32(a[0]), None, AT_EMPTY_PATH, a[1], None)
    if nr in (NR_STAT, NR_LSTAT):
        path = call.read_cstring(a[0])
        flags = AT_SYMLINK_NOFOLLOW if nr == NR_LSTAT else 0
        return _StatRequest(AT_FDCWD, path, flags, a[1], None)
    if nr == NR_NEWFSTATAT:
        flags = _s32(a[3])
        path = _read_at_path(call, a[1], flags)
        return _StatRequest(_s32(a[0]), path, flags, a[2], None)
    if nr == NR_STATX:
        flags = _s32(a[2])
        path = _read_at_path(call, a[1], flags)
        return _StatRequest(_s32(a[0]), path, flags, a[4], a[3] & 0xFFFFFFFF)
    raise AssertionError(f"not a stat call: {nr}")


def _read_at_path(call: Call, addr: int, flags: int) -> bytes | None:
    if addr == 0 and flags & AT_EMPTY_PATH:
        return None
    path = call.read_cstring(addr)
    if path == b"" and flags & AT_EMPTY_PATH:
        return None
    return path


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _openat2(dirfd: int, path: bytes, flags: int, resolve: int) -> int:
    how = _OpenHow(flags, 0, resolve)
    return _check(
        _syscall(
            ctypes.c_long(NR_OPENAT2),
            ctypes.c_long(dirfd),
            ctypes.c_char_p(path),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        ),
        "openat2",
    )


def _tgid(tid: int) -> int:
    with open(f"/proc/{tid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"Tgid:"):
                return int(line.split()[1])
    raise OSError(E.ESRCH, "no Tgid")  # pragma: no cover - the kernel always has it


def _proc_self_rewrite(path: bytes, tid: int) -> bytes:
    for prefix in (b"/proc/self", b"/proc/thread-self"):
        if path == prefix or path.startswith(prefix + b"/"):
            who = _tgid(tid) if prefix == b"/proc/self" else tid
            return b"/proc/%d" % who + path[len(prefix) :]
    return path


def _open_target(tid: int, req: _StatRequest, cached: bool) -> int:
    """An O_PATH fd for the file the caller's stat names, walked as the caller would."""
    base = f"/proc/{tid}/cwd" if req.dirfd == AT_FDCWD else f"/proc/{tid}/fd/{req.dirfd}"
    if req.path is None:  # a magic link of /proc: no lookup on the file's own fs
        return os.open(base, os.O_PATH | os.O_CLOEXEC)
    oflags = os.O_PATH | os.O_CLOEXEC
    if req.flags & AT_SYMLINK_NOFOLLOW:
        oflags |= os.O_NOFOLLOW
    resolve = RESOLVE_CACHED if cached else 0
    if req.path.startswith(b"/"):
        path = _proc_self_rewrite(req.path, tid)
        if path is not req.path and cached:
            raise _NeedsThread()
        root = os.open(f"/proc/{tid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                return _openat2(root, path, oflags, RESOLVE_IN_ROOT | resolve)
            except OSError as e:
                if e.errno not in (E.EXDEV, E.ELOOP) or cached:
                    raise
                # magic links (/proc/N/fd/M) are refused under RESOLVE_IN_ROOT
                return os.open(b"." + path, oflags, dir_fd=root)
        finally:
            os.close(root)
    dfd = os.open(base, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return _openat2(dfd, req.path, oflags, resolve)
    finally:
        os.close(dfd)


def _statx(fd: int, mask: int, sync: int) -> bytes:
    buf = ctypes.create_string_buffer(STATX_SIZE)
    _check(
        _syscall(
            ctypes.c_long(NR_STATX),
            ctypes.c_long(fd),
            ctypes.c_char_p(b""),
            ctypes.c_long(sync | AT_EMPTY_PATH),
            ctypes.c_uint(mask),
            buf,
        ),
        "statx",
    )
    return buf.raw


def _resolve(tid: int, req: _StatRequest, cached: bool) -> bytes:
    """The struct statx of the target file (the caller's mask, at least the basics)."""
    try:
        fd = _open_target(tid, req, cached)
    except OSError as e:
        if cached and e.errno in (E.EAGAIN, E.ECHILD, E.EXDEV, E.ELOOP):
            raise _NeedsThread() from e
        raise
    try:
        mask = STATX_BASIC_STATS | (req.statx_mask or 0)
        sync = AT_STATX_DONT_SYNC if cached else req.flags & AT_STATX_SYNC_TYPE
        return _statx(fd, mask, sync)
    finally:
        os.close(fd)


_STATX_HEAD = struct.Struct("<IIQIIIHxxQQQQ")  # mask..attributes_mask
_STATX_TS = struct.Struct("<qI4x")
_STAT = struct.Struct("<QQQIIIxxxxQqqqqQqQqQ24x")


def statx_to_stat(raw: bytes) -> bytes:
    """struct statx -> struct stat (x86_64), as cp_new_stat() fills it."""
    (_mask, blksize, _attrs, nlink, uid, gid, mode, ino, size, blocks, _amask) = (
        _STATX_HEAD.unpack_from(raw, 0)
    )
    atime, atime_ns = _STATX_TS.unpack_from(raw, 64)
    ctime, ctime_ns = _STATX_TS.unpack_from(raw, 96)
    mtime, mtime_ns = _STATX_TS.unpack_from(raw, 112)
    rmaj, rmin, dmaj, dmin = struct.unpack_from("<IIII", raw, 128)
    return _STAT.pack(
        os.makedev(dmaj, dmin),
        ino,
        nlink,
        mode,
        uid,
        gid,
        os.makedev(rmaj, rmin),
        size,
        blksize,
        blocks,
        atime,
        atime_ns,
        mtime,
        mtime_ns,
        ctime,
        ctime_ns,
    )


def patch_stat(raw: bytes, mode: int, rdev: int) -> bytes:
    """A struct stat (x86_64) with st_mode, st_rdev replaced; size and blocks 0."""
    b = bytearray(raw)
    struct.pack_into("<I", b, 24, mode)
    struct.pack_into("<Q", b, 40, rdev)
    struct.pack_into("<q", b, 48, 0)
    struct.pack_into("<q", b, 64, 0)
    return bytes(b)


def patch_statx(raw: bytes, mode: int, major: int, minor: int) -> bytes:
    """A struct statx with stx_mode, stx_rdev_* replaced; size and blocks 0."""
    b = bytearray(raw)
    (mask,) = struct.unpack_from("<I", b, 0)
    struct.pack_into("<I", b, 0, mask | STATX_TYPE | STATX_MODE)
    struct.pack_into("<H", b, 28, mode & 0xFFFF)
    struct.pack_into("<Q", b, 40, 0)
    struct.pack_into("<Q", b, 48, 0)
    struct.pack_into("<II", b, 128, major, minor)
    return bytes(b)


def _stat_target(call: Call, req: _StatRequest, raw: bytes) -> StatTarget:
    _m, _b, _a, _n, _u, _g, mode, ino, size, _bl, _am = _STATX_HEAD.unpack_from(raw, 0)
    rmaj, rmin, dmaj, dmin = struct.unpack_from("<IIII", raw, 128)
    return StatTarget(
        syscall=call.syscall,
        fd=req.dirfd if req.path is None and req.dirfd != AT_FDCWD else None,
        path=req.path,
        dirfd=req.dirfd,
        flags=req.flags,
        st_dev=os.makedev(dmaj, dmin),
        st_ino=ino,
        st_mode=mode,
        st_rdev=os.makedev(rmaj, rmin),
        st_size=size,
    )


# --- the supervisor ---------------------------------------------------------------------


@final
class Supervisor:
    """Traps the calls of a process tree and answers them through ``handler``.

    Usage (one supervisor per supervised tree)::

        sup = Supervisor(handler, FilterConfig(stat=True))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.run)
            proc = await sup.start_process(["qemu-system-x86_64", ...])
            await proc.wait()
            nursery.cancel_scope.cancel()

    ``run`` waits for the listener from the child, then serves until every
    process holding the filter is gone, or until cancelled; it closes the
    listener on the way out, which fails the calls still pending with ENOSYS.
    ``start_process`` may also be replaced by any fork/exec that calls
    ``preexec`` in the child (e.g. ``subprocess.Popen(preexec_fn=sup.preexec)``
    followed by ``sup.child_started()``).
    """

    def __init__(self, handler: Handler, config: FilterConfig | None = None) -> None:
        self.handler = handler
        self.config = config if config is not None else FilterConfig()
        self._filter = _PreparedFilter(self.config)
        self._parent_sock, self._child_sock = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC
        )
        self.listener: int | None = None
        self.sync_wake_up = True
        self.answered = 0
        self._closed = False
        self._ready = trio.Event()

    # child side ---------------------------------------------------------------
    def preexec(self) -> None:
        """Run in the child between fork and exec: install, send the listener back."""
        fd = self._filter.install()
        socket.send_fds(self._child_sock, [b"L"], [fd])
        os.close(fd)

    def child_started(self) -> None:
        """Parent side, after the fork (successful or not): drop the child's end."""
        self._child_sock.close()

    async def start_process(self, command: Sequence[str], **options: Any) -> trio.Process:
        """trio.lowlevel.open_process with the filter installed in the child."""
        theirs: Callable[[], object] | None = options.pop("preexec_fn", None)

        def preexec() -> None:
            if theirs is not None:
                theirs()
            self.preexec()

        try:
            return await trio.lowlevel.open_process(command, preexec_fn=preexec, **options)
        finally:
            self.child_started()

    # parent side ---------------------------------------------------------------
    async def wait_ready(self) -> None:
        """Wait until the listener has arrived (``run`` is serving)."""
        await self._ready.wait()

    async def _receive_listener(self) -> int | None:
        while True:
            await trio.lowlevel.wait_readable(self._parent_sock)
            try:
                # socket.recv_fds drops its flags argument: MSG_CMSG_CLOEXEC by hand, so
                # that no other child of ours can keep the listener (and the calls) alive
                _msg, anc, _flags, _addr = self._parent_sock.recvmsg(
                    16, socket.CMSG_SPACE(4), socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                continue
            self._parent_sock.close()
            fds = [
                int.from_bytes(data[:4], "little")
                for level, kind, data in anc
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS and len(data) >= 4
            ]
            return fds[0] if fds else None

    async def run(self) -> None:
        """Serve trapped calls until the supervised tree is gone or cancelled."""
        self._parent_sock.setblocking(False)
        try:
            listener = await self._receive_listener()
            if listener is None:
                log.debug("child exited before installing the filter")
                return
            self.listener = listener
            if self.sync_wake_up:
                # Linux 6.6+: wake us on the caller's CPU (a ping-pong, not a
                # broadcast); the flags go by value. Older kernels: EINVAL, ignored.
                _ioctl(listener, SECCOMP_IOCTL_NOTIF_SET_FLAGS, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP)
            self._ready.set()
            async with trio.open_nursery() as nursery:
                poller = select.poll()
                poller.register(listener, select.POLLIN)
                while True:
                    await trio.lowlevel.wait_readable(listener)
                    events = dict(poller.poll(0)).get(listener, 0)
                    if events & select.POLLIN:
                        call = self._recv(listener)
                        if call is not None:
                            self._dispatch(call, nursery)
                    elif events & (select.POLLHUP | select.POLLERR):
                        log.debug("every supervised process has exited")
                        break
        finally:
            self.close()

    def close(self) -> None:
        """Close the listener: pending and future trapped calls get ENOSYS."""
        if self._closed:
            return
        self._closed = True
        if self.listener is not None:
            os.close(self.listener)
        self._parent_sock.close()
        self._child_sock.close()
        self._ready.set()

    def _recv(self, listener: int) -> Call | None:
        buf = ctypes.create_string_buffer(_NOTIF.size)  # must be zeroed
        if _ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, buf) < 0:
            err = ctypes.get_errno()
            if err in (E.ENOENT, E.EINTR):  # caller gone meanwhile
                return None
            raise OSError(err, f"SECCOMP_IOCTL_NOTIF_RECV: {os.strerror(err)}")
        nid, tid, _flags, nr, arch, ip, *args = _NOTIF.unpack(buf.raw)
        return Call(listener, nid, tid, nr, arch, ip, tuple(args))

    def _dispatch(self, call: Call, nursery: trio.Nursery) -> None:
        """Answer inline when everything is at hand; else finish in a task."""
        try:
            pending = self._decide(call)
        except Exception:
            log.exception("handler failed on %r; answering EIO", call)
            pending = Error(E.EIO)
        if inspect.isawaitable(pending):
            nursery.start_soon(self._finish, call, pending)
        else:
            self._reply(call, pending)

    async def _finish(self, call: Call, pending: Awaitable[Decision]) -> None:
        try:
            decision = await pending
        except Exception:
            log.exception("handler failed on %r; answering EIO", call)
            decision = Error(E.EIO)
        self._reply(call, decision)

    def _decide(self, call: Call) -> Decision | Awaitable[Decision]:
        if call.nr == NR_IOCTL:
            fd, cmd, arg = _s32(call.args[0]), call.args[1] & 0xFFFFFFFF, call.args[2]
            return self.handler.on_ioctl(call, fd, cmd, arg)
        if call.nr in STAT_SYSCALLS:
            return self._decide_stat(call)
        return Continue()  # pragma: no cover - the filter traps nothing else

    def _decide_stat(self, call: Call) -> Decision | Awaitable[Decision]:
        try:
            req = _parse_stat_request(call)
        except OSError:
            return Continue()  # the kernel will give the real EFAULT/ENAMETOOLONG
        if not call.is_valid():
            return Continue()
        try:
            raw = _resolve(call.tid, req, cached=True)
        except _NeedsThread:
            return self._decide_stat_slow(call, req)
        except OSError:
            return Continue()  # the kernel will give the real error
        return self._stat_decision(call, req, raw)

    async def _decide_stat_slow(self, call: Call, req: _StatRequest) -> Decision:
        try:
            raw = await trio.to_thread.run_sync(_resolve, call.tid, req, False)
        except OSError:
            return Continue()
        return await _await(self._stat_decision(call, req, raw))

    def _stat_decision(
        self, call: Call, req: _StatRequest, raw: bytes
    ) -> Decision | Awaitable[Decision]:
        decision = self.handler.on_stat(call, _stat_target(call, req, raw))
        if inspect.isawaitable(decision):

            async def later(d: Awaitable[Decision]) -> Decision:
                return self._stat_reply(call, req, raw, await d)

            return later(decision)
        return self._stat_reply(call, req, raw, decision)

    def _stat_reply(
        self, call: Call, req: _StatRequest, raw: bytes, decision: Decision
    ) -> Decision:
        """Turn CharDevice into the struct written at the caller's buffer."""
        if not isinstance(decision, CharDevice):
            return decision
        (mode,) = struct.unpack_from("<H", raw, 28)
        perm = S.S_IMODE(mode) if decision.perm is None else decision.perm
        mode = S.S_IFCHR | perm
        if req.statx_mask is None:
            data = patch_stat(statx_to_stat(raw), mode, os.makedev(decision.major, decision.minor))
        else:
            data = patch_statx(raw, mode, decision.major, decision.minor)
        if not call.is_valid():
            return Continue()
        try:
            call.write(req.buf, data)
        except OSError as e:
            return Error(e.errno or E.EFAULT)
        return Return(0)

    def _reply(self, call: Call, decision: Decision) -> None:
        """Answer ``call``; whatever goes wrong, the caller gets an answer (EIO)."""
        try:
            self._reply_as(call, decision)
        except Exception:
            log.exception("cannot answer %r with %r; answering EIO", call, decision)
            self._send(call, (call.id, 0, -E.EIO, 0))

    def _reply_as(self, call: Call, decision: Decision) -> None:
        if isinstance(decision, InstallFd):
            addfd = ctypes.create_string_buffer(
                _ADDFD.pack(
                    call.id,
                    SECCOMP_ADDFD_FLAG_SEND,
                    decision.fd,
                    0,
                    os.O_CLOEXEC if decision.cloexec else 0,
                ),
                _ADDFD.size,
            )
            ret = _ioctl(call._listener, SECCOMP_IOCTL_NOTIF_ADDFD, addfd)
            err = ctypes.get_errno()
            try:
                os.close(decision.fd)
            except OSError:
                log.error("InstallFd(%d) for %r: not an open fd of ours", decision.fd, call)
            if decision.installed is not None:
                try:
                    decision.installed(ret if ret >= 0 else -err)
                except Exception:
                    log.exception("InstallFd callback for %r", call)
            if ret >= 0:
                self.answered += 1
                return
            if err == E.ENOENT:
                log.debug("%r gone before ADDFD", call)
                return
            log.error("ADDFD for %r failed: %s; answering the errno", call, os.strerror(err))
            decision = Error(err)
        if isinstance(decision, Continue):
            resp = (call.id, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE)
        elif isinstance(decision, Return):
            resp = (call.id, decision.value, 0, 0)
        elif isinstance(decision, Error) and 0 < decision.errno < 4096:
            resp = (call.id, 0, -decision.errno, 0)
        else:  # CharDevice outside stat mode, a bad errno, not a Decision at all
            raise TypeError(f"not a valid answer to {call.syscall}: {decision!r}")
        self._send(call, resp)

    def _send(self, call: Call, resp: tuple[int, int, int, int]) -> None:
        buf = ctypes.create_string_buffer(_RESP.pack(*resp), _RESP.size)
        if _ioctl(call._listener, SECCOMP_IOCTL_NOTIF_SEND, buf) < 0:
            err = ctypes.get_errno()
            if err != E.ENOENT:
                log.error("NOTIF_SEND for %r failed: %s", call, os.strerror(err))
            return
        self.answered += 1


async def _await(result: Decision | Awaitable[Decision]) -> Decision:
    if inspect.isawaitable(result):
        return await result
    return result


async def run_supervised(
    command: Sequence[str], handler: Handler, config: FilterConfig | None = None, **options: Any
) -> int:
    """Run ``command`` under a supervisor; returns its exit status once it has exited.

    The supervisor stops when the command exits (its leftover children then get
    ENOSYS for trapped calls).
    """
    sup = Supervisor(handler, config)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sup.run)
        proc = await sup.start_process(command, **options)
        status = await proc.wait()
        nursery.cancel_scope.cancel()
    return status
