"""The FUSE wire protocol, sans-I/O: parse requests, build replies.

What lives here: opcodes, the fixed little-endian structs of
``include/uapi/linux/fuse.h`` as precompiled ``struct.Struct`` objects,
``parse(buf)`` turning one read of ``/dev/fuse`` into a typed request object,
and ``reply_*`` functions turning an answer into the bytes to write back.
INIT negotiation (protocol 7.38, the full 64-byte ``fuse_init_out``).

What must not: no file descriptors, no trio, no knowledge of VFIO or of the
files being served.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

KERNEL_VERSION: Final = 7
KERNEL_MINOR_VERSION: Final = 38


class Op(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52


# INIT flags (fuse_init_in.flags | flags2 << 32)
FUSE_ASYNC_READ: Final = 1 << 0
FUSE_BIG_WRITES: Final = 1 << 5
FUSE_DONT_MASK: Final = 1 << 6
FUSE_HAS_IOCTL_DIR: Final = 1 << 11
FUSE_DO_READDIRPLUS: Final = 1 << 13
FUSE_PARALLEL_DIROPS: Final = 1 << 18
FUSE_ABORT_ERROR: Final = 1 << 21
FUSE_MAX_PAGES: Final = 1 << 22
FUSE_INIT_EXT: Final = 1 << 30
FUSE_DIRECT_IO_ALLOW_MMAP: Final = 1 << 36

# fuse_open_out.open_flags
FOPEN_DIRECT_IO: Final = 1 << 0
FOPEN_KEEP_CACHE: Final = 1 << 1
FOPEN_NONSEEKABLE: Final = 1 << 2
FOPEN_CACHE_DIR: Final = 1 << 3
FOPEN_NOFLUSH: Final = 1 << 5

# fuse_ioctl_in.flags
FUSE_IOCTL_COMPAT: Final = 1 << 0
FUSE_IOCTL_UNRESTRICTED: Final = 1 << 1
FUSE_IOCTL_DIR: Final = 1 << 4

# fuse_poll_in.flags
FUSE_POLL_SCHEDULE_NOTIFY: Final = 1 << 0

# notifications (fuse_out_header.error with unique 0)
FUSE_NOTIFY_POLL: Final = 1
FUSE_NOTIFY_INVAL_INODE: Final = 2
FUSE_NOTIFY_INVAL_ENTRY: Final = 3

# fuse_interrupt: the unique of the interrupt request itself has this bit
FUSE_INT_REQ_BIT: Final = 1 << 0

FUSE_MIN_READ_BUFFER: Final = 8192

# --- structs ---------------------------------------------------------------
IN_HEADER: Final = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen pad
OUT_HEADER: Final = struct.Struct("<IiQ")  # len error unique
INIT_IN: Final = struct.Struct("<IIIII")  # major minor max_readahead flags flags2 (unused follows)
INIT_IN_OLD: Final = struct.Struct("<IIII")
INIT_OUT: Final = struct.Struct("<IIIIHHIIHHII24x")  # 64 bytes
ATTR: Final = struct.Struct("<QQQQQQIIIIIIIIII")  # 88 bytes
ENTRY_OUT_HEAD: Final = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid nsecs
ATTR_OUT_HEAD: Final = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy
GETATTR_IN: Final = struct.Struct("<IIQ")
OPEN_IN: Final = struct.Struct("<II")
OPEN_OUT: Final = struct.Struct("<QIi")
RELEASE_IN: Final = struct.Struct("<QIIQ")
FLUSH_IN: Final = struct.Struct("<QIIQ")
READ_IN: Final = struct.Struct("<QQIIQII")  # 40
WRITE_IN: Final = struct.Struct("<QQIIQII")  # 40
WRITE_OUT: Final = struct.Struct("<II")
IOCTL_IN: Final = struct.Struct("<QIIQII")  # fh flags cmd arg in_size out_size
IOCTL_OUT: Final = struct.Struct("<iIII")  # result flags in_iovs out_iovs
POLL_IN: Final = struct.Struct("<QQII")  # fh kh flags events
POLL_OUT: Final = struct.Struct("<II")
INTERRUPT_IN: Final = struct.Struct("<Q")
FORGET_IN: Final = struct.Struct("<Q")
BATCH_FORGET_IN: Final = struct.Struct("<II")
FORGET_ONE: Final = struct.Struct("<QQ")
ACCESS_IN: Final = struct.Struct("<II")
SETATTR_IN: Final = struct.Struct("<IIQQQQQQIIIIIIII")  # 88
KSTATFS: Final = struct.Struct("<QQQQQIIII24x")  # 80
DIRENT_HEAD: Final = struct.Struct("<QQII")  # ino off namelen type
NOTIFY_POLL_WAKEUP: Final = struct.Struct("<Q")
NOTIFY_INVAL_INODE: Final = struct.Struct("<Qqq")  # ino off len
NOTIFY_INVAL_ENTRY: Final = struct.Struct("<QII")  # parent namelen flags (then the name, NUL)

S_IFDIR: Final = 0o040000
S_IFREG: Final = 0o100000
DT_DIR: Final = 4
DT_REG: Final = 8


class ProtocolError(Exception):
    """A request that does not parse."""


# --- requests --------------------------------------------------------------
class Request:
    """Any request: the header fields. Subclasses add their body."""

    __slots__ = ("gid", "nodeid", "opcode", "pid", "uid", "unique")
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int  # the calling thread's id (0 for RELEASE and other async requests)

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={getattr(self, k)!r}" for k in _all_slots(type(self)))
        return f"{type(self).__name__}({body})"


def _all_slots(cls: type) -> list[str]:
    out: list[str] = []
    for c in reversed(cls.__mro__):
        out.extend(getattr(c, "__slots__", ()))
    return out


class UnknownRequest(Request):
    __slots__ = ("body",)
    body: bytes


class InitRequest(Request):
    __slots__ = ("flags", "major", "max_readahead", "minor")
    major: int
    minor: int
    max_readahead: int
    flags: int  # flags | flags2 << 32


class LookupRequest(Request):
    __slots__ = ("name",)
    name: str


class ForgetRequest(Request):
    __slots__ = ("nlookup",)
    nlookup: int


class BatchForgetRequest(Request):
    __slots__ = ("forgets",)
    forgets: list[tuple[int, int]]  # (nodeid, nlookup)


class GetattrRequest(Request):
    __slots__ = ("fh", "getattr_flags")
    getattr_flags: int
    fh: int


class SetattrRequest(Request):
    __slots__ = ("fh", "size", "valid")
    valid: int
    fh: int
    size: int


class StatxRequest(Request):
    __slots__ = ()


class OpenRequest(Request):
    __slots__ = ("flags",)
    flags: int


class OpendirRequest(OpenRequest):
    __slots__ = ()


class ReadRequest(Request):
    __slots__ = ("fh", "offset", "size")
    fh: int
    offset: int
    size: int


class ReaddirRequest(ReadRequest):
    __slots__ = ()


class ReaddirplusRequest(ReadRequest):
    __slots__ = ()


class WriteRequest(Request):
    __slots__ = ("data", "fh", "offset")
    fh: int
    offset: int
    data: bytes


class IoctlRequest(Request):
    __slots__ = ("arg", "cmd", "fh", "flags", "in_size", "out_size")
    fh: int
    flags: int
    cmd: int
    arg: int
    in_size: int
    out_size: int


class PollRequest(Request):
    __slots__ = ("events", "fh", "kh", "poll_flags")
    fh: int
    kh: int
    poll_flags: int
    events: int


class FlushRequest(Request):
    __slots__ = ("fh",)
    fh: int


class ReleaseRequest(Request):
    __slots__ = ("fh", "flags")
    fh: int
    flags: int


class ReleasedirRequest(ReleaseRequest):
    __slots__ = ()


class InterruptRequest(Request):
    __slots__ = ("target",)
    target: int  # unique of the interrupted request


class AccessRequest(Request):
    __slots__ = ("mask",)
    mask: int


class StatfsRequest(Request):
    __slots__ = ()


class DestroyRequest(Request):
    __slots__ = ()


def _body_init(r: InitRequest, b: memoryview) -> None:
    if len(b) >= INIT_IN.size:
        r.major, r.minor, r.max_readahead, fl, fl2 = INIT_IN.unpack_from(b)
    else:
        r.major, r.minor, r.max_readahead, fl = INIT_IN_OLD.unpack_from(b)
        fl2 = 0
    r.flags = fl | (fl2 << 32) if fl & FUSE_INIT_EXT else fl


def _cstr(b: memoryview) -> str:
    raw = bytes(b)
    nul = raw.find(b"\0")
    return (raw if nul < 0 else raw[:nul]).decode("utf-8", "surrogateescape")


def _body_lookup(r: LookupRequest, b: memoryview) -> None:
    r.name = _cstr(b)


def _body_forget(r: ForgetRequest, b: memoryview) -> None:
    (r.nlookup,) = FORGET_IN.unpack_from(b)


def _body_batch_forget(r: BatchForgetRequest, b: memoryview) -> None:
    count, _ = BATCH_FORGET_IN.unpack_from(b)
    r.forgets = [FORGET_ONE.unpack_from(b, 8 + 16 * i) for i in range(count)]


def _body_getattr(r: GetattrRequest, b: memoryview) -> None:
    if len(b) >= GETATTR_IN.size:
        r.getattr_flags, _, r.fh = GETATTR_IN.unpack_from(b)
    else:
        r.getattr_flags, r.fh = 0, 0


def _body_setattr(r: SetattrRequest, b: memoryview) -> None:
    v = SETATTR_IN.unpack_from(b)
    r.valid, r.fh, r.size = v[0], v[2], v[3]


def _body_open(r: OpenRequest, b: memoryview) -> None:
    r.flags = OPEN_IN.unpack_from(b)[0]


def _body_read(r: ReadRequest, b: memoryview) -> None:
    r.fh, r.offset, r.size = READ_IN.unpack_from(b)[:3]


def _body_write(r: WriteRequest, b: memoryview) -> None:
    fh, off, size = WRITE_IN.unpack_from(b)[:3]
    r.fh, r.offset = fh, off
    r.data = bytes(b[WRITE_IN.size:WRITE_IN.size + size])


def _body_ioctl(r: IoctlRequest, b: memoryview) -> None:
    r.fh, r.flags, r.cmd, r.arg, r.in_size, r.out_size = IOCTL_IN.unpack_from(b)


def _body_poll(r: PollRequest, b: memoryview) -> None:
    r.fh, r.kh, r.poll_flags, r.events = POLL_IN.unpack_from(b)


def _body_flush(r: FlushRequest, b: memoryview) -> None:
    r.fh = FLUSH_IN.unpack_from(b)[0]


def _body_release(r: ReleaseRequest, b: memoryview) -> None:
    r.fh, r.flags = RELEASE_IN.unpack_from(b)[:2]


def _body_interrupt(r: InterruptRequest, b: memoryview) -> None:
    (r.target,) = INTERRUPT_IN.unpack_from(b)


def _body_access(r: AccessRequest, b: memoryview) -> None:
    r.mask = ACCESS_IN.unpack_from(b)[0]


def _body_none(r: Request, b: memoryview) -> None:
    pass


def _body_unknown(r: UnknownRequest, b: memoryview) -> None:
    r.body = bytes(b)


_PARSERS: Final[dict[int, tuple[type[Request], object]]] = {
    Op.INIT: (InitRequest, _body_init),
    Op.LOOKUP: (LookupRequest, _body_lookup),
    Op.FORGET: (ForgetRequest, _body_forget),
    Op.BATCH_FORGET: (BatchForgetRequest, _body_batch_forget),
    Op.GETATTR: (GetattrRequest, _body_getattr),
    Op.SETATTR: (SetattrRequest, _body_setattr),
    Op.STATX: (StatxRequest, _body_none),
    Op.OPEN: (OpenRequest, _body_open),
    Op.OPENDIR: (OpendirRequest, _body_open),
    Op.READ: (ReadRequest, _body_read),
    Op.READDIR: (ReaddirRequest, _body_read),
    Op.READDIRPLUS: (ReaddirplusRequest, _body_read),
    Op.WRITE: (WriteRequest, _body_write),
    Op.IOCTL: (IoctlRequest, _body_ioctl),
    Op.POLL: (PollRequest, _body_poll),
    Op.FLUSH: (FlushRequest, _body_flush),
    Op.RELEASE: (ReleaseRequest, _body_release),
    Op.RELEASEDIR: (ReleasedirRequest, _body_release),
    Op.INTERRUPT: (InterruptRequest, _body_interrupt),
    Op.ACCESS: (AccessRequest, _body_access),
    Op.STATFS: (StatfsRequest, _body_none),
    Op.DESTROY: (DestroyRequest, _body_none),
}


def parse(buf: bytes | bytearray | memoryview) -> Request:
    """Decode one request as read from /dev/fuse (exactly one read's bytes)."""
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    if len(mv) < IN_HEADER.size:
        raise ProtocolError(f"short request: {len(mv)} bytes")
    length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = IN_HEADER.unpack_from(mv)
    if length > len(mv) or length < IN_HEADER.size:
        raise ProtocolError(f"bad length {length} for a {len(mv)}-byte read")
    cls, body = _PARSERS.get(opcode, (UnknownRequest, _body_unknown))
    r = cls.__new__(cls)
    r.opcode, r.unique, r.nodeid, r.uid, r.gid, r.pid = opcode, unique, nodeid, uid, gid, pid
    try:
        body(r, mv[IN_HEADER.size:length - extlen * 8])  # type: ignore[operator]
    except struct.error as e:
        raise ProtocolError(f"opcode {opcode}: {e}") from None
    return r


# --- replies ---------------------------------------------------------------
_OH_SIZE: Final = OUT_HEADER.size
_IOCTL_REPLY: Final = struct.Struct("<IiQiIII")
_IOCTL_REPLY_LEN: Final = _IOCTL_REPLY.size
_OPEN_REPLY: Final = struct.Struct("<IiQQIi")
_WRITE_REPLY: Final = struct.Struct("<IiQII")
_POLL_REPLY: Final = struct.Struct("<IiQII")
_EMPTY_REPLY: Final = struct.Struct("<IiQ")
_ERR_PACK: Final = OUT_HEADER.pack


def reply_error(unique: int, err: int) -> bytes:
    """A header-only error reply; ``err`` is a positive errno (1..511)."""
    if not 0 < err < 512:
        err = 5  # EIO
    return _ERR_PACK(_OH_SIZE, -err, unique)


def reply_empty(unique: int) -> bytes:
    return _EMPTY_REPLY.pack(_OH_SIZE, 0, unique)


def reply_data(unique: int, data: bytes) -> bytes:
    return OUT_HEADER.pack(_OH_SIZE + len(data), 0, unique) + data


def reply_ioctl(unique: int, result: int) -> bytes:
    return _IOCTL_REPLY.pack(_IOCTL_REPLY_LEN, 0, unique, result, 0, 0, 0)


def reply_open(unique: int, fh: int, open_flags: int) -> bytes:
    return _OPEN_REPLY.pack(_OPEN_REPLY.size, 0, unique, fh, open_flags, 0)


def reply_write(unique: int, size: int) -> bytes:
    return _WRITE_REPLY.pack(_WRITE_REPLY.size, 0, unique, size, 0)


def reply_poll(unique: int, revents: int) -> bytes:
    return _POLL_REPLY.pack(_POLL_REPLY.size, 0, unique, revents, 0)


def pack_attr(ino: int, mode: int, *, size: int = 0, nlink: int = 1, uid: int = 0, gid: int = 0,
              rdev: int = 0, time: int = 0) -> bytes:
    """``struct fuse_attr`` (88 bytes)."""
    return ATTR.pack(ino, size, (size + 511) // 512, time, time, time, 0, 0, 0, mode, nlink, uid, gid,
                     rdev, 4096, 0)


def reply_entry(unique: int, nodeid: int, attr: bytes, *, entry_valid: float = 1.0,
                attr_valid: float = 1.0) -> bytes:
    ev, evn = _split(entry_valid)
    av, avn = _split(attr_valid)
    body = ENTRY_OUT_HEAD.pack(nodeid, 0, ev, av, evn, avn) + attr
    return reply_data(unique, body)


def reply_attr(unique: int, attr: bytes, *, attr_valid: float = 1.0) -> bytes:
    av, avn = _split(attr_valid)
    return reply_data(unique, ATTR_OUT_HEAD.pack(av, avn, 0) + attr)


def _split(t: float) -> tuple[int, int]:
    s = int(t)
    return s, int((t - s) * 1e9)


def reply_statfs(unique: int, *, files: int = 0) -> bytes:
    return reply_data(unique, KSTATFS.pack(0, 0, 0, files, 0, 4096, 255, 4096, 0))


def pack_dirent(ino: int, off: int, name: str, dtype: int) -> bytes:
    """One ``struct fuse_dirent``, padded to 8 bytes; ``off`` is the cookie of the next entry."""
    raw = name.encode("utf-8", "surrogateescape")
    ent = DIRENT_HEAD.pack(ino, off, len(raw), dtype) + raw
    return ent + b"\0" * (-len(ent) % 8)


def notify_poll_wakeup(kh: int) -> bytes:
    """The unsolicited FUSE_NOTIFY_POLL message waking pollers of ``kh``."""
    return OUT_HEADER.pack(_OH_SIZE + 8, FUSE_NOTIFY_POLL, 0) + NOTIFY_POLL_WAKEUP.pack(kh)


def notify_inval_inode(ino: int, off: int = 0, length: int = 0) -> bytes:
    """FUSE_NOTIFY_INVAL_INODE: drop the cached attributes (and pages from
    ``off``, ``length`` bytes; 0 = to the end) of inode ``ino``."""
    body = NOTIFY_INVAL_INODE.pack(ino, off, length)
    return OUT_HEADER.pack(_OH_SIZE + len(body), FUSE_NOTIFY_INVAL_INODE, 0) + body


def notify_inval_entry(parent: int, name: str) -> bytes:
    """FUSE_NOTIFY_INVAL_ENTRY: drop the cached dentry ``name`` of directory
    ``parent``; the next lookup of the path asks the server again."""
    raw = name.encode("utf-8", "surrogateescape")
    body = NOTIFY_INVAL_ENTRY.pack(parent, len(raw), 0) + raw + b"\0"
    return OUT_HEADER.pack(_OH_SIZE + len(body), FUSE_NOTIFY_INVAL_ENTRY, 0) + body


DEFAULT_INIT_FLAGS: Final = (FUSE_BIG_WRITES | FUSE_MAX_PAGES | FUSE_PARALLEL_DIROPS | FUSE_INIT_EXT
                             | FUSE_DONT_MASK)
MAX_WRITE: Final = 128 * 1024
MAX_PAGES: Final = MAX_WRITE // 4096
READ_BUFFER_SIZE: Final = MAX_WRITE + 4096  # header + write_in + data fits


def reply_init(req: InitRequest, *, want: int = DEFAULT_INIT_FLAGS, max_write: int = MAX_WRITE,
               max_background: int = 64) -> tuple[bytes, int]:
    """Negotiate: our reply and the flags both sides agreed on.

    A kernel speaking a newer major gets our major alone so it re-sends INIT;
    an older major is refused with EPROTO.
    """
    if req.major > KERNEL_VERSION:
        body = INIT_OUT.pack(KERNEL_VERSION, KERNEL_MINOR_VERSION, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        return reply_data(req.unique, body), 0
    if req.major < KERNEL_VERSION:
        return reply_error(req.unique, 71), 0  # EPROTO
    agreed = req.flags & want
    minor = min(req.minor, KERNEL_MINOR_VERSION)
    body = INIT_OUT.pack(
        KERNEL_VERSION, minor, req.max_readahead, agreed & 0xFFFFFFFF,
        max_background, max_background * 3 // 4, max_write, 1, max_write // 4096, 0,
        (agreed >> 32) & 0xFFFFFFFF, 0,
    )
    return reply_data(req.unique, body), agreed
