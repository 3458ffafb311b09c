"""``fakedev dma read|write``: make a device of a running fakedev do DMA.

What lives here: the ``dma`` subcommand (``register`` adds it to the parser,
``cmd_dma`` runs it). It writes a ``dma-read`` / ``dma-write`` command to the
control file of the running model (``$FAKEDEV_MOUNT/.fakedev/control`` inside
``fakedev run``, or found through ``--pid`` / ``--mount`` as ``fakedev show``
does) and prints the reply. The DMA goes through the device's IOMMU
translation exactly as the device's own DMA would (fakedev.kernel.dma).

    fakedev dma read 0000:03:00.0 0x100000 64         # hex dump
    fakedev dma read --raw 03:00.0 0x100000 64 > out  # raw bytes
    fakedev dma write 0000:03:00.0 0x100000 deadbeef
    fakedev dma write --file data.bin vfio0 0x100000

Exit status 0, or 1 with the model's error (e.g. "EFAULT: DMA read by
0000:03:00.0 at 0x100000: unmapped ...").

What must not: no model or server logic (the control command does the work).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path
from typing import Any

CONTROL = ".fakedev/control"
#: a control command is at most this long (fakedev.host.control.MAX_COMMAND)
MAX_COMMAND = 4096
READ_MAX = 1 << 20


class DmaCliError(Exception):
    pass


def register(sub: Any) -> None:
    """Add ``dma`` to the subcommands ``sub`` (an argparse subparsers action)."""
    p = sub.add_parser(
        "dma",
        help="make a device of a running fakedev read or write memory (DMA through its IOMMU)",
        description="DMA as the device would: through the IOAS or container mappings of "
        "whoever owns it. Runs inside `fakedev run`, or with --pid/--mount from outside.",
    )
    p.add_argument("--pid", type=int, help="a process inside a `fakedev run` (or the server itself)")
    p.add_argument("--mount", type=Path, help="a directory served by `fakedev mount`")
    ops = p.add_subparsers(dest="dma_op", required=True, metavar="read|write")
    rd = ops.add_parser("read", help="read LEN bytes at IOVA; prints hex")
    rd.add_argument("device", metavar="BDF", help='"0000:03:00.0", "03:00.0" or "vfio0"')
    rd.add_argument("iova", metavar="IOVA", help="0x... for hex")
    rd.add_argument("length", metavar="LEN")
    rd.add_argument("--raw", action="store_true", help="write the raw bytes to stdout")
    wr = ops.add_parser("write", help="write bytes (HEX or --file) at IOVA")
    wr.add_argument("device", metavar="BDF")
    wr.add_argument("iova", metavar="IOVA")
    wr.add_argument("data", metavar="HEX", nargs="?", help="the bytes, as hex digits")
    wr.add_argument("--file", type=Path, help="take the bytes from FILE instead")
    p.set_defaults(func=cmd_dma)


def control_path(args: argparse.Namespace) -> Path:
    if args.pid is not None:
        from fakedev.cli.main import state_path_for_pid

        try:
            return state_path_for_pid(args.pid).parent / "control"
        except Exception as e:  # the show helper's CliError: pid not in a run
            raise DmaCliError(str(e).replace("show:", "dma:", 1)) from e
    if args.mount is not None:
        return Path(args.mount) / CONTROL
    mount = os.environ.get("FAKEDEV_MOUNT")
    if not mount:
        raise DmaCliError("dma: not inside `fakedev run` (FAKEDEV_MOUNT unset); use --pid or --mount")
    return Path(mount) / CONTROL


def send(path: Path, command: str) -> str:
    """Write ``command`` to the control file ``path``; the reply, or DmaCliError with the model's error."""
    data = command.encode()
    if len(data) > MAX_COMMAND:
        raise DmaCliError(f"dma: command longer than {MAX_COMMAND} bytes (write less at a time)")
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as e:
        raise DmaCliError(f"dma: cannot open {path}: {e.strerror}") from e
    try:
        err: OSError | None = None
        try:
            os.write(fd, data)
        except OSError as e:
            err = e
        chunks = []
        off = 0
        while True:
            chunk = os.pread(fd, 1 << 20, off)
            if not chunk:
                break
            chunks.append(chunk)
            off += len(chunk)
        reply = b"".join(chunks).decode(errors="replace")
    finally:
        os.close(fd)
    if err is not None:
        why = reply.strip().removeprefix("error: ") or os.strerror(err.errno or errno.EIO)
        raise DmaCliError(f"dma: {why}")
    return reply


def cmd_dma(args: argparse.Namespace) -> int:
    try:
        path = control_path(args)
        if args.dma_op == "read":
            reply = send(path, f"dma-read {args.device} {args.iova} {args.length}")
            if args.raw:
                sys.stdout.buffer.write(bytes.fromhex(reply.strip()))
                sys.stdout.buffer.flush()
            else:
                print(reply.strip())
            return 0
        if (args.data is None) == (args.file is None):
            raise DmaCliError("dma write: give either HEX or --file")
        raw = args.file.read_bytes() if args.file is not None else None
        hexdata = raw.hex() if raw is not None else args.data
        step = (MAX_COMMAND - 64) // 2 * 2
        iova = int(args.iova, 0)
        total = 0
        for i in range(0, len(hexdata), step):
            part = hexdata[i:i + step]
            send(path, f"dma-write {args.device} {iova + i // 2:#x} {part}")
            total += len(part) // 2
        print(f"wrote {total} bytes")
        return 0
    except (DmaCliError, ValueError) as e:
        print(f"fakedev: {e}", file=sys.stderr)
        return 1
