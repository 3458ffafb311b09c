"""``File``: one open of a node (struct file), and the node table.

The model's answer to ``open(2)`` is a File. Everything a process then does
with its fd arrives here: ``ioctl``, ``read``/``write`` at an offset (regions
live at ``index << 40``), ``poll`` and, after the last close of every fd that
shares it, ``release``. Each method either returns or raises
``KernelError(errno)``; a failed call changes nothing.
"""

from __future__ import annotations

import errno

from attrs import frozen

from fakedev.kernel.errors import KernelError
from fakedev.kernel.task import Task
from fakedev.uapi.ioctls import FileKind

POLLIN = 0x001
POLLOUT = 0x004


class File:
    """Base of every model file. Subclasses override what they support."""

    kind: FileKind
    #: short label for traces and `fakedev show`: "vfio0", "13", "iommu", "vfio"
    label: str = "?"

    def ioctl(self, task: Task, cmd: int, arg: int) -> int:
        raise KernelError(errno.ENOTTY)

    def read(self, task: Task, offset: int, size: int) -> bytes:
        raise KernelError(errno.EINVAL)

    def write(self, task: Task, offset: int, data: bytes) -> int:
        raise KernelError(errno.EINVAL)

    def poll(self) -> int:
        return POLLIN | POLLOUT

    def release(self) -> None:
        """The last reference to this open is gone (fops->release)."""


@frozen
class DevNode:
    """A node under /dev that the model serves.

    ``path`` is relative to /dev ("vfio/vfio", "vfio/13", "vfio/devices/vfio0",
    "iommu"); ``major``/``minor`` are what the real node would have (st_rdev,
    sysfs ``dev``); ``mode`` is the permission bits.
    """

    path: str
    major: int
    minor: int
    mode: int
    uid: int = 0
    gid: int = 0
