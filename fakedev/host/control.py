"""Commands written to the control file ``.fakedev/control`` of a served mount.

What lives here: a registry of control commands and the parser of one
command line. A write of ``NAME ARGS...`` (one command per write, words split
on white space) runs the handler registered for NAME with the model lock
held; the string it returns is what a later read of the control file gives
(the reply of the last command). A bad command fails the write with EINVAL
(``ControlError``), a ``KernelError`` raised by a handler with its errno.

Built in: ``fault SPEC`` (arm a fault, the vocabulary of ``fakedev run
--fault``), ``unplug BDF`` (``Server.unplug``), ``clear`` (disarm every
fault), ``faults`` (the armed faults and the injections, as JSON), ``help``.
Another module adds a command with one call::

    from fakedev.host.control import register_command
    register_command("dma-read", lambda server, args: "...")

What must not: FUSE wire details (the server's write handler calls
``run_command``) or kernel behaviour (handlers call the model or the server).
"""

from __future__ import annotations

import errno
import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from fakedev.kernel.errors import KernelError
from fakedev.kernel.fault_inject import FaultSpecError, canonical_bdf, parse_spec

if TYPE_CHECKING:
    from fakedev.host.server import Server

#: name of the control file inside the server's control area (``.fakedev/``)
CONTROL_NAME = "control"
#: the longest command accepted in one write
MAX_COMMAND = 4096

Handler = Callable[["Server", list[str]], str]

_COMMANDS: dict[str, Handler] = {}


class ControlError(Exception):
    """A command that cannot be run as written: the write fails with EINVAL."""

    errno = errno.EINVAL


def register_command(name: str, handler: Handler) -> None:
    """Make ``NAME ARGS...`` written to the control file call ``handler(server, ARGS)``.

    The handler runs with the model lock held; it returns the reply text (what
    the next read of the control file gives) or raises ``ControlError`` (EINVAL)
    or ``KernelError``. Registering a name again replaces its handler.
    """
    if not name or any(c.isspace() for c in name):
        raise ValueError(f"bad control command name {name!r}")
    _COMMANDS[name] = handler


def commands() -> list[str]:
    """The registered command names, sorted."""
    return sorted(_COMMANDS)


def parse_command(text: bytes | str) -> tuple[str, list[str]]:
    """``(name, args)`` of one written command; ControlError if it is not one."""
    if isinstance(text, bytes):
        if len(text) > MAX_COMMAND:
            raise ControlError(f"command longer than {MAX_COMMAND} bytes")
        try:
            text = text.decode()
        except UnicodeDecodeError as e:
            raise ControlError("command is not UTF-8") from e
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if len(lines) != 1:
        raise ControlError("write exactly one command" if lines else "empty command")
    words = lines[0].split()
    name, args = words[0], words[1:]
    if name not in _COMMANDS:
        raise ControlError(f"unknown command {name!r} (known: {', '.join(commands())})")
    return name, args


def run_command(server: Server, text: bytes | str) -> str:
    """Parse and run one command against ``server`` (model lock held by the caller)."""
    name, args = parse_command(text)
    return _COMMANDS[name](server, args)


# ------------------------------------------------------------------ built-ins


def _cmd_fault(server: Server, args: list[str]) -> str:
    if len(args) != 1:
        raise ControlError("usage: fault SPEC (e.g. fault call=VFIO_DEVICE_RESET,nth=1,errno=EIO)")
    try:
        spec = parse_spec(args[0])
        server.faults.add(spec)
    except FaultSpecError as e:
        raise ControlError(str(e)) from e
    return f"armed {spec.text()}\n"


def _cmd_unplug(server: Server, args: list[str]) -> str:
    if len(args) != 1:
        raise ControlError("usage: unplug BDF")
    unplug = getattr(server, "unplug", None)
    if unplug is None:
        raise KernelError(errno.ENOSYS, "this server cannot unplug devices")
    bdf = canonical_bdf(args[0])
    if bdf is None:
        raise ControlError(f"{args[0]!r} is not a function address like 0000:01:00.0")
    unplug(bdf)
    return f"unplugged {bdf}\n"


def _cmd_clear(server: Server, args: list[str]) -> str:
    if args:
        raise ControlError("usage: clear")
    server.faults.clear()
    return "cleared\n"


def _cmd_faults(server: Server, args: list[str]) -> str:
    if args:
        raise ControlError("usage: faults")
    return json.dumps(server.faults.describe(), indent=1, sort_keys=True) + "\n"


def _cmd_help(server: Server, args: list[str]) -> str:
    return "commands: " + " ".join(commands()) + "\n"


register_command("fault", _cmd_fault)
register_command("unplug", _cmd_unplug)
register_command("clear", _cmd_clear)
register_command("faults", _cmd_faults)
register_command("help", _cmd_help)
