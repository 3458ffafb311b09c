"""Mounting and unmounting a FUSE file system with plain syscalls (ctypes).

What lives here: opening /dev/fuse, ``mount(2)`` of ``fuse.<name>``,
``umount2(MNT_DETACH)``, reading /proc/self/mountinfo, aborting a connection
through fusectl (/sys/fs/fuse/connections/N/abort) and clearing a stale mount
left at a path by a server that died.

What must not: no knowledge of what is served.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re

from attrs import frozen

MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2
FUSECTL = "/sys/fs/fuse/connections"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _oserror(what: str, path: str) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}", path)


def open_dev_fuse() -> int:
    """A new, nonblocking /dev/fuse descriptor."""
    return os.open("/dev/fuse", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)


def mount(mountpoint: str, fd: int, *, name: str = "fakedev", allow_other: bool = True,
          default_permissions: bool = True) -> None:
    """Mount the FUSE connection ``fd`` at ``mountpoint`` as ``fuse.<name>``."""
    opts = f"fd={fd},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()}"
    if allow_other:
        opts += ",allow_other"
    if default_permissions:
        opts += ",default_permissions"
    rc = _libc.mount(name.encode(), os.fsencode(mountpoint), f"fuse.{name}".encode(),
                     MS_NOSUID | MS_NODEV, opts.encode())
    if rc != 0:
        raise _oserror("mount", mountpoint)


def umount(mountpoint: str, *, detach: bool = True) -> None:
    rc = _libc.umount2(os.fsencode(mountpoint), MNT_DETACH if detach else 0)
    if rc != 0:
        raise _oserror("umount2", mountpoint)


@frozen
class MountInfo:
    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str
    mountpoint: str
    fstype: str
    source: str

    @property
    def connection(self) -> int:
        """The fusectl connection number (the kernel's dev_t of the superblock)."""
        return (self.major << 20) | self.minor


_ESC = re.compile(r"\\([0-7]{3})")


def _unescape(s: str) -> str:
    return _ESC.sub(lambda m: chr(int(m.group(1), 8)), s)


def mounts(mountinfo: str = "/proc/self/mountinfo") -> list[MountInfo]:
    out = []
    with open(mountinfo) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            a = left.split()
            b = right.split()
            major, minor = a[2].split(":")
            out.append(MountInfo(int(a[0]), int(a[1]), int(major), int(minor), _unescape(a[3]),
                                 _unescape(a[4]), b[0], _unescape(b[1]) if len(b) > 1 else ""))
    return out


def resolve(mountpoint: str) -> str:
    """The canonical path of ``mountpoint`` without touching it (it may be a hung mount)."""
    parent, leaf = os.path.split(os.path.abspath(mountpoint))
    return os.path.join(os.path.realpath(parent), leaf)


def mounts_at(mountpoint: str, fstype: str | None = None) -> list[MountInfo]:
    """Mounts at ``mountpoint`` (oldest first), optionally of one fstype."""
    path = resolve(mountpoint)
    return [m for m in mounts() if m.mountpoint == path and (fstype is None or m.fstype == fstype)]


def ensure_fusectl() -> bool:
    """Mount fusectl at its usual place if nothing is mounted there; False if impossible."""
    if any(m.fstype == "fusectl" for m in mounts()):
        return True
    rc: int = _libc.mount(b"fusectl", FUSECTL.encode(), b"fusectl", 0, None)
    return rc == 0


def abort(connection: int) -> bool:
    """Abort a FUSE connection through fusectl; False if it is gone (or fusectl is missing)."""
    if not ensure_fusectl():
        return False
    try:
        with open(f"{FUSECTL}/{connection}/abort", "w") as f:
            f.write("1")
        return True
    except FileNotFoundError:
        return False


def clear_stale(mountpoint: str, name: str = "fakedev") -> int:
    """Abort and lazily unmount every ``fuse.<name>`` mount at ``mountpoint``.

    A server that died leaves its mount behind (callers see ENOTCONN); this
    detaches it without touching the path first (a stat would hang on a hung
    server). Returns how many mounts were removed.
    """
    n = 0
    for m in reversed(mounts_at(mountpoint, f"fuse.{name}")):
        abort(m.connection)
        try:
            umount(mountpoint, detach=True)
            n += 1
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOENT):
                raise
    return n
