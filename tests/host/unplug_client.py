"""A VFIO client for the unplug tests: holds a device through the served cdev.

    python unplug_client.py MOUNT vfioN

Opens MOUNT/iommu and MOUNT/vfio/devices/vfioN, binds, registers an eventfd
as the REQ trigger (VFIO_DEVICE_SET_IRQS, index VFIO_PCI_REQ_IRQ_INDEX) and
prints ``ready``. Then, for each line read on stdin: ``wait`` blocks until the
eventfd fires and prints ``req N`` (the eventfd count read), ``info`` prints
``info REGIONS IRQS`` from VFIO_DEVICE_GET_INFO on the held fd, ``close``
closes both fds and prints ``closed``; end of input exits.
"""

from __future__ import annotations

import fcntl
import os
import select
import struct
import sys

from fakedev.uapi import consts as C
from fakedev.uapi import ioctls as IO


def main() -> None:
    mnt, name = sys.argv[1], sys.argv[2]
    ifd = os.open(f"{mnt}/iommu", os.O_RDWR)
    dfd = os.open(f"{mnt}/vfio/devices/{name}", os.O_RDWR)
    bind = bytearray(struct.pack("<IIiI", 16, 0, ifd, 0))
    fcntl.ioctl(dfd, IO.VFIO_DEVICE_BIND_IOMMUFD, bind)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    flags = C.VFIO_IRQ_SET_DATA_EVENTFD | C.VFIO_IRQ_SET_ACTION_TRIGGER
    irq = bytearray(struct.pack("<IIIIIi", 24, flags, C.VFIO_PCI_REQ_IRQ_INDEX, 0, 1, efd))
    fcntl.ioctl(dfd, IO.VFIO_DEVICE_SET_IRQS, irq)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "wait":
            select.select([efd], [], [], 60)
            print(f"req {os.eventfd_read(efd)}", flush=True)
        elif cmd == "info":
            info = bytearray(struct.pack("<IIII", 16, 0, 0, 0))
            fcntl.ioctl(dfd, IO.VFIO_DEVICE_GET_INFO, info)
            _, _, regions, irqs = struct.unpack("<IIII", info)
            print(f"info {regions} {irqs}", flush=True)
        elif cmd == "close":
            os.close(dfd)
            os.close(ifd)
            print("closed", flush=True)


if __name__ == "__main__":
    main()
