"""A FUSE session on trio: read requests from /dev/fuse, hand them out, write replies.

What lives here: the read loop (nonblocking reads parked on
``trio.lowlevel.wait_readable``), INIT negotiation, the rules every FUSE
server must keep (never answer FORGET/BATCH_FORGET, answer INTERRUPT with
ENOSYS so the kernel stops sending them, ignore replies to vanished requests,
stop on ENODEV) and the ``Handler`` protocol the served file system
implements.

A handler answers a request in one of three ways: reply bytes now (the fast
path, run inline on the loop), ``None`` (no reply), or an ``async`` callable
that the session runs as its own task in the session's nursery and whose
result is the reply. Every request gets its own task when it needs one; the
inline path exists because spawning a task per request costs more than most
requests.

What must not: no knowledge of the files served.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from fakedev.fuse import protocol as P

log = logging.getLogger("fakedev.fuse")

Deferred = Callable[[], Awaitable[bytes | None]]


class Handler(Protocol):
    def init(self, req: P.InitRequest, agreed_flags: int) -> None:
        """INIT was answered; ``agreed_flags`` is what both sides support."""

    def handle(self, req: P.Request) -> bytes | Deferred | None:
        """Answer ``req`` (see the module docstring)."""


class Session:
    """One FUSE connection over the /dev/fuse descriptor ``fd`` (nonblocking)."""

    def __init__(self, fd: int, handler: Handler, *, init_flags: int = P.DEFAULT_INIT_FLAGS,
                 on_stop: Callable[[], None] | None = None) -> None:
        self.fd = fd
        self.on_stop = on_stop
        self.handler = handler
        self.init_flags = init_flags
        self.initialized = trio.Event()
        self.closed = False
        self.requests = 0
        self._buf = bytearray(P.READ_BUFFER_SIZE)
        self._nursery: trio.Nursery | None = None

    # -- writing -------------------------------------------------------------
    def send(self, data: bytes) -> None:
        """Write one reply or notification; a vanished request is not an error."""
        try:
            os.write(self.fd, data)
        except OSError as e:
            if e.errno == errno.ENOENT:  # the request was interrupted/aborted meanwhile
                return
            if e.errno in (errno.ENODEV, errno.EBADF):
                self.closed = True
                return
            log.error("reply rejected by the kernel (%s): %r", errno.errorcode.get(e.errno or 0), data[:64])

    def notify_poll(self, kh: int) -> None:
        """Wake pollers registered under ``kh`` (FUSE_NOTIFY_POLL)."""
        self.send(P.notify_poll_wakeup(kh))

    # -- reading -------------------------------------------------------------
    async def run(self) -> None:
        """Serve until the connection goes away (ENODEV) or the caller cancels."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await self._loop()
            finally:
                # Before waiting for the request tasks: a worker blocked on a call
                # into our own mount must be released (on_stop aborts the connection).
                self.closed = True
                if self.on_stop is not None:
                    self.on_stop()
                nursery.cancel_scope.cancel()

    async def _loop(self) -> None:
        fd = self.fd
        buf = self._buf
        mv = memoryview(buf)
        bufs = [buf]
        readv = os.readv
        parse = P.parse
        handle = self.handler.handle
        send = self.send
        streak = 0
        while not self.closed:
            try:
                n = readv(fd, bufs)
            except BlockingIOError:
                streak = 0
                await trio.lowlevel.wait_readable(fd)
                continue
            except OSError as e:
                if e.errno == errno.ENODEV:
                    return
                if e.errno in (errno.EINTR, errno.ENOENT, errno.EAGAIN):
                    continue
                raise
            if n == 0:  # the other end is gone (only seen on test transports)
                return
            try:
                req = parse(mv[:n])
            except P.ProtocolError as e:
                log.error("unparsable request: %s", e)
                continue
            self.requests += 1
            op = req.opcode
            if op == P.Op.FORGET or op == P.Op.BATCH_FORGET:
                handle(req)
                continue
            if op == P.Op.INTERRUPT:
                send(P.reply_error(req.unique, errno.ENOSYS))
                continue
            if op == P.Op.INIT:
                assert isinstance(req, P.InitRequest)
                reply, agreed = P.reply_init(req, want=self.init_flags)
                send(reply)
                if agreed or req.major == P.KERNEL_VERSION:
                    self.handler.init(req, agreed)
                    self.initialized.set()
                continue
            try:
                out = handle(req)
            except Exception:
                log.exception("handler failed on %r", req)
                out = P.reply_error(req.unique, errno.EIO)
            if out is None:
                pass
            elif isinstance(out, bytes):
                send(out)
            else:
                assert self._nursery is not None
                self._nursery.start_soon(self._deferred, req, out)
            streak += 1
            if streak >= 32:  # let spawned tasks run under sustained load
                streak = 0
                await trio.lowlevel.checkpoint()

    async def _deferred(self, req: P.Request, fn: Deferred) -> None:
        try:
            out = await fn()
        except Exception:
            log.exception("handler failed on %r", req)
            out = P.reply_error(req.unique, errno.EIO)
        if out is not None:
            self.send(out)
