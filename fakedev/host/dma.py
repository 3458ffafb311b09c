"""Device DMA on the host: the model's ``DmaMemory`` over real processes and files,
and the ``dma-read`` / ``dma-write`` control commands.

What lives here: ``HostDmaMemory`` (user memory of the mapping's process
through process_vm_readv/writev, only while that process lives: not a later
one that got its pid; the file of an IOMMU_IOAS_MAP_FILE mapping
through pread/pwrite on the server's own copy of the caller's fd, which the
mapping holds until its last area is unmapped), ``attach_dma_memory`` (the
server installs it in the kernel it serves) and the control commands

    dma-read BDF IOVA LEN      reply: the bytes as hex, one line
    dma-write BDF IOVA HEX     reply: "wrote N bytes"

(BDF also as "vfioN"; IOVA and LEN in C notation, 0x... for hex). A DMA fault
fails the control write with EFAULT; the reply then reads "error: ...".

What must not: no translation or permission logic (``fakedev.kernel.dma``),
no FUSE details.
"""

from __future__ import annotations

import errno
import os
import re
from typing import TYPE_CHECKING, Any

from fakedev.host.control import ControlError, register_command
from fakedev.host.proc import HostForeignFile, read_memory, write_memory
from fakedev.kernel.dma import DmaPiece
from fakedev.kernel.errors import KernelError

if TYPE_CHECKING:
    from fakedev.host.server import Server

#: the most one dma-read returns (the reply is held in memory)
READ_MAX = 1 << 20

_SHORT_BDF = re.compile(r"^[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")


def _file_fd(piece: DmaPiece) -> int:
    f = piece.file
    if not isinstance(f, HostForeignFile) or f.fd < 0:
        raise KernelError(errno.EFAULT, "the mapped file is not open in the server")
    return f.fd


def read_file(fd: int, offset: int, length: int) -> bytes:
    """Exactly ``length`` bytes at ``offset`` of ``fd``, or EFAULT (past the end, I/O error)."""
    out = bytearray()
    while len(out) < length:
        try:
            chunk = os.pread(fd, length - len(out), offset + len(out))
        except OSError as e:
            raise KernelError(errno.EFAULT, f"file read: {e.strerror}") from None
        if not chunk:
            raise KernelError(errno.EFAULT, "past the end of the mapped file")
        out += chunk
    return bytes(out)


def write_file(fd: int, offset: int, data: bytes) -> None:
    """Store ``data`` at ``offset`` of ``fd``; EFAULT past the end (a DMA never grows a file)."""
    try:
        size = os.fstat(fd).st_size
    except OSError as e:
        raise KernelError(errno.EFAULT, f"file stat: {e.strerror}") from None
    if offset + len(data) > size:
        raise KernelError(errno.EFAULT, "past the end of the mapped file")
    done = 0
    while done < len(data):
        try:
            n = os.pwrite(fd, data[done:], offset + done)
        except OSError as e:
            raise KernelError(errno.EFAULT, f"file write: {e.strerror}") from None
        if n <= 0:
            raise KernelError(errno.EFAULT, "file write made no progress")
        done += n


def _check_owner(piece: DmaPiece) -> None:
    """User memory: the mapping's process must still be the one behind ``pid``.
    Once it has exited (a child that inherited the iommufd keeps the mapping),
    its pid may belong to another process: EFAULT, never that one's memory."""
    if piece.pid <= 0:
        raise KernelError(errno.EFAULT, "mapping has no process")
    same = getattr(piece.owner, "same_process", None)
    if same is not None and not same():
        raise KernelError(errno.EFAULT, f"the process that made the mapping (pid {piece.pid}) is gone")


class HostDmaMemory:
    """``fakedev.kernel.dma.DmaMemory`` for the FUSE server: real process memory and files."""

    def read(self, piece: DmaPiece) -> bytes:
        if piece.file is not None:
            return read_file(_file_fd(piece), piece.addr, piece.length)
        _check_owner(piece)
        return read_memory(piece.pid, piece.addr, piece.length)

    def write(self, piece: DmaPiece, data: bytes) -> None:
        if piece.file is not None:
            write_file(_file_fd(piece), piece.addr, data)
            return
        _check_owner(piece)
        write_memory(piece.pid, piece.addr, data)


def attach_dma_memory(kernel: Any) -> None:
    """Give ``kernel`` (a model ``Kernel``) host memory access, unless it has some already."""
    if hasattr(kernel, "dma_memory") and kernel.dma_memory is None:
        kernel.dma_memory = HostDmaMemory()


# ------------------------------------------------------------------ control commands


def device_name(text: str) -> str:
    """A canonical BDF ("03:00.0" -> "0000:03:00.0", lower case) or a "vfioN" name."""
    if _SHORT_BDF.match(text):
        text = "0000:" + text
    return text.lower()


def _int(text: str, what: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise ControlError(f"{what} {text!r} is not a number (0x... for hex)") from None
    if v < 0:
        raise ControlError(f"{what} {text!r} is negative")
    return v


def _device(server: Server, text: str) -> str:
    name = device_name(text)
    kernel = server.kernel
    try:
        kernel.device(name)  # type: ignore[attr-defined]
    except KeyError:
        raise ControlError(f"no vfio-pci device {text!r}") from None
    except AttributeError:
        raise KernelError(errno.ENOSYS, "this server's model does no DMA") from None
    return name


def cmd_dma_read(server: Server, args: list[str]) -> str:
    if len(args) != 3:
        raise ControlError("usage: dma-read BDF IOVA LEN")
    name = _device(server, args[0])
    iova, length = _int(args[1], "IOVA"), _int(args[2], "LEN")
    if not 0 < length <= READ_MAX:
        raise ControlError(f"LEN must be 1..{READ_MAX}")
    data: bytes = server.kernel.dma_read(name, iova, length)  # type: ignore[attr-defined]
    return data.hex() + "\n"


def cmd_dma_write(server: Server, args: list[str]) -> str:
    if len(args) != 3:
        raise ControlError("usage: dma-write BDF IOVA HEX")
    name = _device(server, args[0])
    iova = _int(args[1], "IOVA")
    try:
        data = bytes.fromhex(args[2])
    except ValueError:
        raise ControlError("HEX must be an even number of hex digits") from None
    if not data:
        raise ControlError("HEX is empty")
    server.kernel.dma_write(name, iova, data)  # type: ignore[attr-defined]
    return f"wrote {len(data)} bytes\n"


register_command("dma-read", cmd_dma_read)
register_command("dma-write", cmd_dma_write)
