"""How the model fails a call: it raises KernelError(errno).

The kernel's handlers return ``-EFOO``; the model raises ``KernelError(EFOO)``
instead, and whoever serves the call (the FUSE glue, a test) turns it into the
errno the caller sees. Nothing else in the model signals a failed call.
"""

from __future__ import annotations

import errno as _errno

# Kernel-internal errnos that never reach userspace under their own number.
ENOIOCTLCMD = 515  # the VFS reports it as ENOTTY


class KernelError(Exception):
    """A call failed with ``errno`` (a positive number, as userspace sees it)."""

    def __init__(self, err: int, why: str = "") -> None:
        if err == ENOIOCTLCMD:
            err = _errno.ENOTTY
        super().__init__(err, why)
        self.errno = err
        self.why = why

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno))
        return f"{name}: {self.why}" if self.why else name


def errname(err: int) -> str:
    """``errname(22) == 'EINVAL'``."""
    return _errno.errorcode.get(err, f"E{err}")
