"""The sans-I/O FUSE codec: request parsing, reply layouts, INIT negotiation."""

from __future__ import annotations

import errno
import struct

import pytest

from fakedev.fuse import protocol as P


def req(opcode: int, body: bytes = b"", *, unique: int = 7, nodeid: int = 1, pid: int = 4242) -> bytes:
    return P.IN_HEADER.pack(40 + len(body), opcode, unique, nodeid, 0, 0, pid, 0, 0) + body


def test_header_fields() -> None:
    r = P.parse(req(P.Op.GETATTR, struct.pack("<IIQ", 1, 0, 99), unique=11, nodeid=5, pid=77))
    assert isinstance(r, P.GetattrRequest)
    assert (r.unique, r.nodeid, r.pid, r.fh, r.getattr_flags) == (11, 5, 77, 99, 1)


def test_ioctl_request() -> None:
    body = P.IOCTL_IN.pack(3, 0, 0x3B71, 0x7FFF0000, 0, 0)
    r = P.parse(req(P.Op.IOCTL, body))
    assert isinstance(r, P.IoctlRequest)
    assert (r.fh, r.cmd, r.arg, r.in_size, r.out_size) == (3, 0x3B71, 0x7FFF0000, 0, 0)


def test_write_request_copies_payload() -> None:
    buf = bytearray(req(P.Op.WRITE, P.WRITE_IN.pack(2, 7 << 40, 4, 0, 0, 0, 0) + b"abcd"))
    r = P.parse(memoryview(buf))
    buf[-4:] = b"XXXX"  # the read buffer is reused: the request must not see it change
    assert isinstance(r, P.WriteRequest)
    assert (r.fh, r.offset, r.data) == (2, 7 << 40, b"abcd")


def test_lookup_forget_batch_interrupt_release() -> None:
    assert P.parse(req(P.Op.LOOKUP, b"vfio\0")).name == "vfio"  # type: ignore[attr-defined]
    assert P.parse(req(P.Op.FORGET, struct.pack("<Q", 3))).nlookup == 3  # type: ignore[attr-defined]
    b = P.parse(req(P.Op.BATCH_FORGET, struct.pack("<II", 2, 0) + struct.pack("<QQQQ", 5, 1, 6, 2)))
    assert isinstance(b, P.BatchForgetRequest) and b.forgets == [(5, 1), (6, 2)]
    i = P.parse(req(P.Op.INTERRUPT, struct.pack("<Q", 99)))
    assert isinstance(i, P.InterruptRequest) and i.target == 99
    rel = P.parse(req(P.Op.RELEASE, P.RELEASE_IN.pack(12, 2, 0, 0), pid=0))
    assert isinstance(rel, P.ReleaseRequest) and rel.fh == 12 and rel.pid == 0
    assert type(P.parse(req(P.Op.RELEASEDIR, P.RELEASE_IN.pack(1, 0, 0, 0)))) is P.ReleasedirRequest
    assert type(P.parse(req(P.Op.STATX, bytes(24)))) is P.StatxRequest
    u = P.parse(req(200, b"zz"))
    assert isinstance(u, P.UnknownRequest) and u.body == b"zz"


def test_bad_requests() -> None:
    with pytest.raises(P.ProtocolError):
        P.parse(b"short")
    with pytest.raises(P.ProtocolError):
        P.parse(P.IN_HEADER.pack(400, 1, 1, 1, 0, 0, 0, 0, 0))
    with pytest.raises(P.ProtocolError):
        P.parse(req(P.Op.IOCTL, b"\0" * 8))


def test_reply_layouts() -> None:
    assert P.reply_error(5, errno.ENOTTY) == struct.pack("<IiQ", 16, -errno.ENOTTY, 5)
    assert P.reply_error(5, 0)[4:8] == struct.pack("<i", -errno.EIO)  # never a 0/huge errno
    assert P.reply_error(5, 9999)[4:8] == struct.pack("<i", -errno.EIO)
    r = P.reply_ioctl(9, 42)
    assert len(r) == 32 and struct.unpack("<IiQiIII", r) == (32, 0, 9, 42, 0, 0, 0)
    o = P.reply_open(3, 17, P.FOPEN_DIRECT_IO | P.FOPEN_NOFLUSH)
    assert struct.unpack("<IiQQIi", o) == (32, 0, 3, 17, 0x21, 0)
    assert struct.unpack("<IiQII", P.reply_write(4, 8)) == (24, 0, 4, 8, 0)
    attr = P.pack_attr(2, 0o100600, uid=5)
    assert len(attr) == 88
    e = P.reply_entry(1, 2, attr)
    assert len(e) == 16 + 128 and struct.unpack_from("<Q", e, 16)[0] == 2
    assert len(P.reply_attr(1, attr)) == 16 + 104
    assert len(P.reply_statfs(1)) == 16 + 80
    d = P.pack_dirent(3, 1, "vfio0", P.DT_REG)
    assert len(d) % 8 == 0 and struct.unpack_from("<QQII", d) == (3, 1, 5, P.DT_REG)
    n = P.notify_poll_wakeup(0xABC)
    assert struct.unpack("<IiQQ", n) == (24, P.FUSE_NOTIFY_POLL, 0, 0xABC)


def init_req(major: int = 7, minor: int = 45, flags: int = 0xFFFFFFFF, flags2: int = 0x3F) -> P.InitRequest:
    body = struct.pack("<IIIII", major, minor, 65536, flags, flags2) + bytes(44)
    r = P.parse(req(P.Op.INIT, body))
    assert isinstance(r, P.InitRequest)
    return r


def test_init_negotiation() -> None:
    r = init_req()
    assert r.flags == 0xFFFFFFFF | (0x3F << 32)
    out, agreed = P.reply_init(r)
    assert len(out) == 16 + 64
    major, minor, readahead, flags, _bg, _cong, max_write, _tg, max_pages, _ma, flags2, _msd = (
        P.INIT_OUT.unpack_from(out, 16))
    assert (major, minor, readahead, max_write, max_pages) == (7, 38, 65536, P.MAX_WRITE, P.MAX_PAGES)
    assert agreed == P.DEFAULT_INIT_FLAGS and flags == agreed & 0xFFFFFFFF and flags2 == agreed >> 32
    # only what the kernel offered is agreed
    _, agreed = P.reply_init(init_req(flags=P.FUSE_BIG_WRITES))
    assert agreed == P.FUSE_BIG_WRITES
    # an older minor is echoed
    out, _ = P.reply_init(init_req(minor=31))
    assert P.INIT_OUT.unpack_from(out, 16)[1] == 31


def test_init_other_majors() -> None:
    out, agreed = P.reply_init(init_req(major=8))
    assert agreed == 0 and P.INIT_OUT.unpack_from(out, 16)[:2] == (7, 38)
    out, _ = P.reply_init(init_req(major=6))
    assert struct.unpack("<IiQ", out)[1] == -errno.EPROTO
