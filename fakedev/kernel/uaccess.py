"""User-copy helpers the model shares (include/linux/uaccess.h)."""

from __future__ import annotations

import errno

from fakedev.kernel.errors import KernelError
from fakedev.kernel.task import Task

_CHUNK = 1 << 16


def check_zeroed_user(task: Task, addr: int, size: int) -> bool:
    """Models check_zeroed_user(): are the ``size`` bytes at ``addr`` all zero?

    Walks the range a chunk at a time, so a huge size costs bounded memory and
    faults (EFAULT) at the first unmapped byte, as the kernel does.
    """
    off, end = addr, addr + size
    while off < end:
        n = min(end - off, _CHUNK)
        if any(task.read(off, n)):
            return False
        off += n
    return True


def copy_struct_from_user(task: Task, ksize: int, addr: int, usize: int) -> bytes:
    """Models copy_struct_from_user(): ``ksize`` bytes of a user struct of ``usize``.

    A longer user struct must have a zero tail (E2BIG otherwise); a shorter one
    is zero-filled.
    """
    if usize > ksize and not check_zeroed_user(task, addr + ksize, usize - ksize):
        raise KernelError(errno.E2BIG, "non-zero bytes past the kernel's struct")
    data = task.read(addr, min(usize, ksize))
    return data + bytes(ksize - len(data))
