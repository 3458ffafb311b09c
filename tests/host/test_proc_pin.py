"""pin_user_pages for real processes: judged from /proc/<pid>/maps."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

import pytest

from fakedev.host.proc import check_mapped
from fakedev.kernel.errors import KernelError

PAGE = mmap.PAGESIZE


def _addr(m: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def test_mapped_range_pins() -> None:
    m = mmap.mmap(-1, 4 * PAGE)
    try:
        a = _addr(m)
        check_mapped(os.getpid(), a, 4 * PAGE, write=True)
        check_mapped(os.getpid(), a + 10, 100, write=False)
    finally:
        m.close()


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


PROT_READ, PROT_WRITE, MAP_PRIVATE_ANON = 1, 2, 0x22


def test_hole_faults() -> None:
    libc = _libc()
    base = libc.mmap(None, 3 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE_ANON, -1, 0)
    assert base
    try:
        assert libc.munmap(base + PAGE, PAGE) == 0  # punch a hole in the middle
        check_mapped(os.getpid(), base, PAGE, write=True)
        with pytest.raises(KernelError) as e:
            check_mapped(os.getpid(), base, 3 * PAGE, write=False)
        assert e.value.errno == errno.EFAULT
    finally:
        libc.munmap(base, 3 * PAGE)


def test_read_only_mapping_cannot_be_pinned_for_write() -> None:
    libc = _libc()
    addr = libc.mmap(None, PAGE, PROT_READ, MAP_PRIVATE_ANON, -1, 0)
    assert addr
    try:
        check_mapped(os.getpid(), addr, PAGE, write=False)
        with pytest.raises(KernelError) as e:
            check_mapped(os.getpid(), addr, PAGE, write=True)
        assert e.value.errno == errno.EFAULT
    finally:
        libc.munmap(addr, PAGE)


def test_dead_process_faults() -> None:
    with pytest.raises(KernelError) as e:
        check_mapped(2**22 + 12345, 0x1000, PAGE, write=False)
    assert e.value.errno == errno.EFAULT
