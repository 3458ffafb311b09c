"""The private environment of ``fakedev run``: a mount namespace (plus a user
namespace when not root) in which the fake ``/dev`` nodes and sysfs subtrees
sit at the real paths, while the host's ``/dev``, ``/sys`` and mount table
never change.

What lives here: raw ``unshare``/``mount`` calls (ctypes), the check that
unprivileged user namespaces are allowed, and the placement of served files and
generated directories over real paths. What must not: anything about VFIO, the
FUSE protocol or trio. Everything is synchronous; callers that touch the FUSE
mount from the thread that serves it must call ``place_*`` from a worker thread
(path lookups on the mount are FUSE requests, answered by that same loop).

Order matters: ``unshare(CLONE_NEWNS)`` fails with EINVAL once the process has
a second thread (threads share one ``fs_struct``), so ``enter_private_namespace``
must run at process start, before trio or any thread pool exists.

Placement strategies:

* ``/dev`` as root: an overlay (lower = the real ``/dev``, upper and work on
  our tmpfs), the real ``/dev`` submounts (pts, shm, mqueue, hugepages...)
  re-bound into it, then moved onto ``/dev``. Real nodes keep working.
* ``/dev`` in a user namespace: overlay over devtmpfs is refused there, and a
  filesystem mounted in a user namespace is ``nodev``; so a tmpfs "shadow"
  directory instead, in which every real entry is re-created: directories and
  files are bind mounts of the originals (binds keep the original superblock,
  so ``/dev/null`` still opens), symlinks are copied.
* sysfs: the generated subtrees are bind-mounted over the real paths. When a
  real parent lacks the entry (e.g. ``/sys/class/vfio-dev`` on a machine with
  no VFIO), the parent is shadowed the same way and the entry added.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]


class NamespaceError(RuntimeError):
    """The private environment could not be set up; the message says why."""


def _oserror(what: str, path: str | os.PathLike[str] | None = None) -> OSError:
    err = ctypes.get_errno()
    msg = f"{what}: {os.strerror(err)}"
    return OSError(err, msg, None if path is None else os.fspath(path))


def mount(
    source: str | os.PathLike[str] | None,
    target: str | os.PathLike[str],
    fstype: str | None = None,
    flags: int = 0,
    data: str | None = None,
) -> None:
    """mount(2); raises OSError with the errno."""
    src = None if source is None else os.fsencode(source)
    ret = _libc.mount(
        src,
        os.fsencode(target),
        None if fstype is None else fstype.encode(),
        flags,
        None if data is None else data.encode(),
    )
    if ret != 0:
        raise _oserror(f"mount {source} on {target}", target)


def umount(target: str | os.PathLike[str], flags: int = 0) -> None:
    """umount2(2); raises OSError with the errno."""
    if _libc.umount2(os.fsencode(target), flags) != 0:
        raise _oserror(f"umount {target}", target)


def thread_count() -> int:
    """Number of threads of this process (entries of /proc/self/task)."""
    return len(os.listdir("/proc/self/task"))


def userns_restriction() -> str | None:
    """Why an unprivileged user namespace cannot be created, or None if it can."""
    checks = (
        ("/proc/sys/kernel/unprivileged_userns_clone", "0"),
        ("/proc/sys/user/max_user_namespaces", "0"),
        ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1"),
    )
    for path, forbidden in checks:
        try:
            value = Path(path).read_text().strip()
        except OSError:
            continue
        if value == forbidden:
            return f"unprivileged user namespaces are disabled ({path} = {value})"
    return None


@dataclass
class Namespace:
    """What ``enter_private_namespace`` did."""

    rootless: bool
    uid: int
    gid: int


def enter_private_namespace(*, rootless: bool | None = None) -> Namespace:
    """Unshare a mount namespace (and a user namespace when not root), then
    make every mount recursively private so nothing propagates to the host.

    Must run before any thread exists. In rootless mode the caller's uid and
    gid map to themselves, so files it creates keep its ownership and the
    programs it starts run unprivileged; the process gains capabilities only
    inside the new user namespace.
    """
    if thread_count() != 1:
        raise NamespaceError(
            "unshare(CLONE_NEWNS) needs a single-threaded process; "
            f"this one has {thread_count()} threads (enter the namespace before trio starts)"
        )
    uid, gid = os.getuid(), os.getgid()
    if rootless is None:
        rootless = os.geteuid() != 0
    flags = CLONE_NEWNS | (CLONE_NEWUSER if rootless else 0)
    if _libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        reason = userns_restriction() if rootless else None
        if reason is None:
            reason = os.strerror(err)
            if rootless and err in (errno.EPERM, errno.ENOSPC, errno.EUSERS):
                reason += " (are unprivileged user namespaces allowed?)"
        raise NamespaceError(f"cannot create a private namespace: {reason}")
    if rootless:
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1\n")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1\n")
    try:
        mount(None, "/", None, MS_REC | MS_PRIVATE)
    except OSError as exc:
        raise NamespaceError(f"cannot make mounts private: {exc}") from exc
    return Namespace(rootless=rootless, uid=uid, gid=gid)


# ---------------------------------------------------------------- mountinfo


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    parent_id: int
    mountpoint: str
    fstype: str
    source: str


def _unescape(field_: str) -> str:
    out, i = [], 0
    while i < len(field_):
        if field_[i] == "\\" and i + 3 < len(field_) and field_[i + 1 : i + 4].isdigit():
            out.append(chr(int(field_[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field_[i])
            i += 1
    return "".join(out)


def read_mountinfo(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    """Parse mountinfo into entries (mount point unescaped)."""
    entries = []
    for line in Path(path).read_text().splitlines():
        left, _, right = line.partition(" - ")
        parts = left.split()
        rparts = right.split()
        entries.append(
            MountEntry(
                mount_id=int(parts[0]),
                parent_id=int(parts[1]),
                mountpoint=_unescape(parts[4]),
                fstype=rparts[0] if rparts else "",
                source=_unescape(rparts[1]) if len(rparts) > 1 else "",
            )
        )
    return entries


def top_submounts(root: str, entries: Iterable[MountEntry] | None = None) -> list[str]:
    """Mount points strictly below ``root`` that are not below another one
    (binding these with MS_REC carries everything under them)."""
    if entries is None:
        entries = read_mountinfo()
    prefix = root.rstrip("/") + "/"
    points = sorted({e.mountpoint for e in entries if e.mountpoint.startswith(prefix)})
    top: list[str] = []
    for p in points:
        if not any(p.startswith(t.rstrip("/") + "/") for t in top):
            top.append(p)
    return top


# ---------------------------------------------------------------- placement


@dataclass
class Staging:
    """A private tmpfs holding the FUSE mount point, overlay layers and the
    generated sysfs. Only visible inside the private namespace."""

    root: Path
    mounted: bool = False
    shadows: list[Path] = field(default_factory=list)
    created: set[Path] = field(default_factory=set)

    @property
    def fuse_dir(self) -> Path:
        return self.root / "fuse"

    @property
    def sys_dir(self) -> Path:
        return self.root / "sys"


def make_staging(root: Path) -> Staging:
    """Mount a tmpfs on ``root`` (an existing empty directory) and lay out
    the directories placement uses."""
    mount("fakedev", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    st = Staging(root=root, mounted=True)
    for sub in ("fuse", "sys", "dev-upper", "dev-work", "dev", "stash"):
        (root / sub).mkdir()
    return st


def _make_mountpoint_like(src: Path, dst: Path) -> bool:
    """Create at ``dst`` an empty entry of the same kind as ``src`` (dir or
    file) or a copy of it (symlink). Returns True when ``dst`` needs a bind."""
    st = os.lstat(src)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
        return False
    if stat.S_ISDIR(st.st_mode):
        dst.mkdir()
    else:
        dst.touch()
    return True


def shadow_directory(staging: Staging, target: Path) -> None:
    """Replace directory ``target`` by a writable tmpfs that shows the same
    entries (bind mounts of the originals, copied symlinks), so new entries can
    be added without touching the real directory."""
    index = len(staging.shadows)
    stash = staging.root / "stash" / str(index)
    stash.mkdir()
    # Keep a handle on the original contents (with their submounts).
    mount(target, stash, None, MS_BIND | MS_REC)
    mount("fakedev", target, "tmpfs", MS_NOSUID, "mode=0755")
    for name in sorted(os.listdir(stash)):
        src, dst = stash / name, target / name
        try:
            if _make_mountpoint_like(src, dst):
                mount(src, dst, None, MS_BIND | MS_REC)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EACCES, errno.EPERM):
                continue  # vanished or unreadable entry: leave it out
            raise
    staging.shadows.append(target)


def _ours(staging: Staging, directory: Path) -> bool:
    """True if entries may be created in ``directory`` without touching a
    real filesystem: it is a shadow tmpfs or a directory we made in one."""
    return directory in staging.shadows or directory in staging.created


def ensure_directory(staging: Staging, target: Path) -> None:
    """Make ``target`` exist as a directory, shadowing parents where needed.
    Never creates anything on a real filesystem."""
    if target.is_dir():
        return
    ensure_directory(staging, target.parent)
    if not _ours(staging, target.parent):
        shadow_directory(staging, target.parent)
    target.mkdir()
    staging.created.add(target)


def ensure_file(staging: Staging, target: Path) -> None:
    """Make ``target`` exist as a regular file (a bind-mount point)."""
    if target.exists():
        return
    ensure_directory(staging, target.parent)
    if not _ours(staging, target.parent):
        shadow_directory(staging, target.parent)
    target.touch()


def bind(source: Path, target: Path, *, recursive: bool = False) -> None:
    """Bind-mount ``source`` over ``target`` (which must exist)."""
    mount(source, target, None, MS_BIND | (MS_REC if recursive else 0))


def place_dev(
    staging: Staging,
    nodes: Sequence[tuple[str, Path]],
    *,
    dev: Path = Path("/dev"),
    use_overlay: bool = True,
) -> str:
    """Put each ``(relpath, served_file)`` at ``dev/relpath``, the served file
    bind-mounted over an empty regular file, without changing the real ``dev``.

    Returns the strategy used ("overlay" or "shadow").
    """
    merged = staging.root / "dev"
    strategy = "shadow"
    if use_overlay:
        try:
            mount(
                "fakedev-dev",
                merged,
                "overlay",
                0,
                f"lowerdir={dev},upperdir={staging.root / 'dev-upper'},"
                f"workdir={staging.root / 'dev-work'}",
            )
            strategy = "overlay"
        except OSError:
            strategy = "shadow"
    if strategy == "overlay":
        for sub in top_submounts(str(dev)):
            rel = os.path.relpath(sub, dev)
            dst = merged / rel
            try:
                if not dst.exists() and not dst.is_symlink():
                    _make_mountpoint_like(Path(sub), dst)
                bind(Path(sub), dst, recursive=True)
            except OSError:
                continue  # an entry we cannot re-bind stays as the lower shows it
        for rel, served in nodes:
            target = merged / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
            bind(served, target)
        mount(merged, dev, None, MS_MOVE)
        return strategy
    # Shadow: a tmpfs on dev with the real entries re-bound, plus ours.
    shadow_directory(staging, dev)
    for rel, served in nodes:
        target = dev / rel
        ensure_file(staging, target)
        bind(served, target)
    return strategy


# Generated sysfs paths (relative to /sys) that replace the real ones wholesale.
SYSFS_REPLACE = (
    "bus/pci",
    "kernel/iommu_groups",
    "class/vfio-dev",
    "class/vfio",
    "class/iommu",
    "devices/virtual/vfio",
    "devices/virtual/vfio-dev",
    "module/vfio",
    "module/vfio_pci",
    "module/iommufd",
    "module/vfio_iommu_type1",
)


def sysfs_places(generated: Path) -> list[str]:
    """The relative paths of ``generated`` to bind over ``/sys``: the fixed
    list plus every PCI host bridge directory ``devices/pci*``."""
    rels = [r for r in SYSFS_REPLACE if (generated / r).is_dir()]
    devices = generated / "devices"
    if devices.is_dir():
        rels += sorted(
            f"devices/{d.name}" for d in devices.iterdir() if d.name.startswith("pci")
        )
    return rels


# Generated sysfs directories whose entries are added to the real ones (the
# host's other misc devices stay visible).
SYSFS_MERGE = ("class/misc", "devices/virtual/misc")


def place_entry(staging: Staging, source: Path, target: Path) -> None:
    """Put ``source`` (a symlink: copied; a directory or file: bound) at
    ``target``, shadowing the parent when it is a real directory."""
    ensure_directory(staging, target.parent)
    if not _ours(staging, target.parent):
        shadow_directory(staging, target.parent)
    if source.is_symlink():
        if target.is_symlink():
            target.unlink()
        elif target.exists():
            return  # a real entry of the same name is kept
        os.symlink(os.readlink(source), target)
        return
    if not target.exists():
        if source.is_dir():
            target.mkdir()
            staging.created.add(target)
        else:
            target.touch()
    bind(source, target, recursive=True)


def place_sysfs(staging: Staging, generated: Path, *, sys: Path = Path("/sys")) -> list[str]:
    """Bind the generated subtrees over the real ``sys`` paths (and add the
    entries of the merged directories); returns what was placed."""
    placed = sysfs_places(generated)
    for rel in placed:
        target = sys / rel
        ensure_directory(staging, target)
        bind(generated / rel, target, recursive=True)
    for rel in SYSFS_MERGE:
        if not (generated / rel).is_dir():
            continue
        for child in sorted((generated / rel).iterdir()):
            place_entry(staging, child, sys / rel / child.name)
            placed.append(f"{rel}/{child.name}")
    return placed
