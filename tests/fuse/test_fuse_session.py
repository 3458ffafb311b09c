"""The session loop over a SEQPACKET socket pair standing in for /dev/fuse."""

from __future__ import annotations

import errno
import socket
import struct

import trio

from fakedev.fuse import protocol as P
from fakedev.fuse.session import Deferred, Session


def req(opcode: int, body: bytes = b"", *, unique: int = 7) -> bytes:
    return P.IN_HEADER.pack(40 + len(body), opcode, unique, 1, 0, 0, 123, 0, 0) + body


class Recorder:
    def __init__(self) -> None:
        self.seen: list[P.Request] = []
        self.inited = 0
        self.gate = trio.Event()

    def init(self, req: P.InitRequest, agreed_flags: int) -> None:
        self.inited += 1

    def handle(self, req: P.Request) -> bytes | Deferred | None:
        self.seen.append(req)
        if isinstance(req, P.ForgetRequest | P.BatchForgetRequest):
            return None
        if isinstance(req, P.IoctlRequest) and req.cmd == 1:
            async def later() -> bytes:
                await self.gate.wait()
                return P.reply_ioctl(req.unique, 1)
            return later
        if isinstance(req, P.IoctlRequest) and req.cmd == 2:
            raise RuntimeError("handler bug")
        return P.reply_ioctl(req.unique, 2)


async def test_session_rules() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    h = Recorder()
    s = Session(a.fileno(), h)
    peer = trio.socket.from_stdlib_socket(b)

    async def replies(n: int) -> list[bytes]:
        with trio.fail_after(5):
            return [await peer.recv(4096) for _ in range(n)]

    async with trio.open_nursery() as n:
        n.start_soon(s.run)
        await peer.send(req(P.Op.INIT, struct.pack("<IIIII", 7, 45, 0, 0, 0) + bytes(44), unique=1))
        (init,) = await replies(1)
        assert len(init) == 80 and s.initialized.is_set() and h.inited == 1
        await peer.send(req(P.Op.FORGET, struct.pack("<Q", 1), unique=2))
        await peer.send(req(P.Op.INTERRUPT, struct.pack("<Q", 2), unique=3))
        await peer.send(req(P.Op.IOCTL, P.IOCTL_IN.pack(0, 0, 1, 0, 0, 0), unique=4))  # deferred
        await peer.send(req(P.Op.IOCTL, P.IOCTL_IN.pack(0, 0, 0, 0, 0, 0), unique=5))  # inline
        await peer.send(req(P.Op.IOCTL, P.IOCTL_IN.pack(0, 0, 2, 0, 0, 0), unique=6))  # raises
        got = await replies(3)
        # FORGET: no reply; INTERRUPT: ENOSYS; inline answered before the deferred one
        assert struct.unpack_from("<IiQ", got[0]) == (16, -errno.ENOSYS, 3)
        assert struct.unpack_from("<IiQi", got[1])[1:] == (0, 5, 2)
        assert struct.unpack_from("<IiQ", got[2]) == (16, -errno.EIO, 6)
        h.gate.set()
        (late,) = await replies(1)
        assert struct.unpack_from("<IiQi", late)[1:] == (0, 4, 1)
        b.close()  # the other end is gone: the session ends
    assert s.closed
    assert [r.unique for r in h.seen] == [2, 4, 5, 6]
    a.close()
