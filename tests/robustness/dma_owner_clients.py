"""Client processes of test_dma_owner.py (run with the test's Python).

usage: dma_owner_clients.py mapper MOUNT   map one page of this process for the DMA
                                           engine (vfio2), fork a holder of the
                                           fds (for 60 s), print "PID ADDR HOLDER", exit
       dma_owner_clients.py victim ADDR    map one zeroed page at ADDR, print
                                           "ready"; on each input line print the
                                           page's first 8 bytes as hex
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
import sys
import time

IOMMU_IOAS_ALLOC = 0x3B81
IOMMU_IOAS_MAP = 0x3B85
VFIO_DEVICE_BIND_IOMMUFD = 0x3B76
VFIO_DEVICE_ATTACH_IOMMUFD_PT = 0x3B77
IOVA = 0x100000
#: where both processes map their page (far from where libraries and heaps go)
ADDR = 0x6E0000000000


def mapper(mnt: str) -> None:
    i = os.open(f"{mnt}/iommu", os.O_RDWR)
    d = os.open(f"{mnt}/vfio/devices/vfio2", os.O_RDWR)
    a = bytearray(struct.pack("III", 12, 0, 0))
    fcntl.ioctl(i, IOMMU_IOAS_ALLOC, a)
    ioas = struct.unpack("III", a)[2]
    fcntl.ioctl(d, VFIO_DEVICE_BIND_IOMMUFD, bytearray(struct.pack("IIiI", 16, 0, i, 0)))
    fcntl.ioctl(d, VFIO_DEVICE_ATTACH_IOMMUFD_PT, bytearray(struct.pack("III", 12, 0, ioas)))
    addr = map_page(ADDR)
    if addr is None:
        sys.exit(f"cannot map a page at {ADDR:#x}")
    fcntl.ioctl(i, IOMMU_IOAS_MAP, bytearray(struct.pack("IIIIQQQ", 40, 1 | 2 | 4, ioas, 0, addr, mmap.PAGESIZE, IOVA)))
    holder = os.fork()
    if holder == 0:  # the holder: keeps the iommufd (and the mapping) after the mapper is gone
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        time.sleep(60)
        os._exit(0)
    print(os.getpid(), addr, holder, flush=True)
    os._exit(0)


def map_page(addr: int) -> int | None:
    """A zeroed private page at exactly ``addr`` (MAP_FIXED_NOREPLACE), or None."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    map_fixed_noreplace = 0x100000
    p = libc.mmap(addr, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_WRITE,
                  mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | map_fixed_noreplace, -1, 0)
    return addr if p == addr else None


def victim(addr: int) -> None:
    if map_page(addr) is None:
        print("busy", flush=True)
        return
    print("ready", flush=True)
    for _ in sys.stdin:
        print(ctypes.string_at(addr, 8).hex(), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "mapper":
        mapper(sys.argv[2])
    else:
        victim(int(sys.argv[2]))
