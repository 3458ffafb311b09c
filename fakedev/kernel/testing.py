"""In-memory stand-ins for the calling task, for tests and tools.

``FakeProcess`` is an address space (mapped page ranges) plus an fd table;
``FakeTask`` is a thread of it making calls. Unmapped memory faults exactly
like the kernel's user copies: a range that starts mapped and runs into an
unmapped page raises EFAULT (and a write leaves the mapped prefix written).
"""

from __future__ import annotations

import errno
import itertools

from fakedev.kernel.errors import KernelError
from fakedev.kernel.file import File
from fakedev.kernel.task import ForeignFile, ForeignKind

PAGE = 4096


class FakeEventfd:
    """An eventfd: counts signals; ``closed`` once every reference is dropped."""

    kind = ForeignKind.EVENTFD

    def __init__(self) -> None:
        self.counter = 0
        self.refs = 1  # the owning fd table's

    def signal(self, count: int = 1) -> None:
        self.counter += count

    def close(self) -> None:
        self.refs -= 1

    def get(self) -> FakeEventfd:
        self.refs += 1
        return self


class FakeOther:
    """Some file that is not ours (a pipe, a socket)."""

    kind = ForeignKind.OTHER

    def __init__(self) -> None:
        self.refs = 1

    def signal(self, count: int = 1) -> None:
        raise KernelError(errno.EINVAL)

    def close(self) -> None:
        self.refs -= 1

    def get(self) -> FakeOther:
        self.refs += 1
        return self


_pids = itertools.count(1000)


class FakeProcess:
    """An address space and an fd table."""

    def __init__(self, caps: frozenset[int] = frozenset({17, 21, 24})) -> None:
        self.pid = next(_pids)
        self.pages: dict[int, bytearray] = {}
        self.fds: dict[int, File | FakeEventfd | FakeOther] = {}
        self.caps = caps
        self._brk = 0x10000
        self.file_refs: dict[int, int] = {}  # id(File) -> fds referring to it

    # -- memory -----------------------------------------------------------
    def mmap(self, size: int, addr: int | None = None) -> int:
        """Map zeroed pages covering ``size`` bytes; returns the address."""
        npages = max(1, (size + PAGE - 1) // PAGE)
        if addr is None:
            addr = self._brk
            self._brk += (npages + 1) * PAGE  # leave a guard page
        for i in range(npages):
            self.pages.setdefault(addr // PAGE + i, bytearray(PAGE))
        return addr

    def munmap(self, addr: int, size: int) -> None:
        for i in range(max(1, (size + PAGE - 1) // PAGE)):
            self.pages.pop(addr // PAGE + i, None)

    def alloc(self, data: bytes | int) -> int:
        """Map a fresh buffer holding ``data`` (or that many zero bytes)."""
        size = data if isinstance(data, int) else len(data)
        addr = self.mmap(size)
        if not isinstance(data, int):
            self.poke(addr, data)
        return addr

    def alloc_at_end(self, data: bytes) -> int:
        """Place ``data`` so that it ends exactly at the end of a mapped page."""
        npages = max(1, (len(data) + PAGE - 1) // PAGE)
        base = self.mmap(npages * PAGE)
        addr = base + npages * PAGE - len(data)
        self.poke(addr, data)
        return addr

    def _page(self, addr: int) -> bytearray:
        pg = self.pages.get(addr // PAGE)
        if pg is None:
            raise KernelError(errno.EFAULT, f"unmapped address {addr:#x}")
        return pg

    def peek(self, addr: int, size: int) -> bytes:
        out = bytearray()
        while size > 0:
            if addr < 0 or addr >= 1 << 64:
                raise KernelError(errno.EFAULT)
            pg = self._page(addr)
            off = addr % PAGE
            n = min(size, PAGE - off)
            out += pg[off : off + n]
            addr += n
            size -= n
        return bytes(out)

    def poke(self, addr: int, data: bytes) -> None:
        i = 0
        while i < len(data):
            if addr < 0 or addr >= 1 << 64:
                raise KernelError(errno.EFAULT)
            pg = self._page(addr)
            off = addr % PAGE
            n = min(len(data) - i, PAGE - off)
            pg[off : off + n] = data[i : i + n]
            addr += n
            i += n

    # -- fds ----------------------------------------------------------------
    def _lowest_free(self) -> int:
        fd = 3
        while fd in self.fds:
            fd += 1
        return fd

    def install(self, f: File | FakeEventfd | FakeOther) -> int:
        fd = self._lowest_free()
        self.fds[fd] = f
        if isinstance(f, File):
            self.file_refs[id(f)] = self.file_refs.get(id(f), 0) + 1
        return fd

    def eventfd(self) -> tuple[int, FakeEventfd]:
        ev = FakeEventfd()
        return self.install(ev), ev

    def pipe(self) -> int:
        return self.install(FakeOther())

    def close(self, fd: int) -> None:
        """close(2): the last fd of a model File releases it."""
        f = self.fds.pop(fd)
        if isinstance(f, File):
            n = self.file_refs[id(f)] - 1
            if n:
                self.file_refs[id(f)] = n
            else:
                del self.file_refs[id(f)]
                f.release()
        else:
            f.close()

    def exit(self) -> None:
        for fd in sorted(self.fds):
            self.close(fd)

    def task(self, tid: int | None = None) -> FakeTask:
        return FakeTask(self, tid if tid is not None else self.pid)


class FakeTask:
    """A thread of a FakeProcess: implements fakedev.kernel.task.Task."""

    def __init__(self, proc: FakeProcess, tid: int) -> None:
        self.proc = proc
        self._tid = tid

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def tid(self) -> int:
        return self._tid

    def read(self, addr: int, size: int) -> bytes:
        return self.proc.peek(addr, size)

    def write(self, addr: int, data: bytes) -> None:
        self.proc.poke(addr, data)

    def pin_pages(self, addr: int, length: int, write: bool) -> None:
        if addr < 0 or addr + length > 1 << 64:
            raise KernelError(errno.EFAULT)
        for page in range(addr // PAGE, (addr + max(length, 1) - 1) // PAGE + 1):
            if page not in self.proc.pages:
                raise KernelError(errno.EFAULT, f"unmapped page {page * PAGE:#x}")

    def fget(self, fd: int) -> File | ForeignFile:
        f = self.proc.fds.get(fd)
        if f is None:
            raise KernelError(errno.EBADF)
        if isinstance(f, File):
            return f
        return f.get()

    def capable(self, cap: int) -> bool:
        return cap in self.proc.caps

    def fd_install(self, file: File) -> int:
        return self.proc.install(file)
