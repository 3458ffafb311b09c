"""Every ioctl number fakedev knows, in one table.

All VFIO and iommufd calls are ``_IO(';', nr)``: no size or direction bits,
so the request number is ``0x3b00 | nr``. The same number means different
calls on different kinds of file (0x3b70 is VFIO_IOMMU_GET_INFO on a
container and VFIO_DEVICE_GET_PCI_HOT_RESET_INFO on a device), so each entry
names the file kinds it is for. The model dispatches on this table, the trace
decoder names and decodes calls from it, and the tests use it.
"""

from __future__ import annotations

import enum
from typing import Final

from attrs import frozen

from fakedev.uapi import structs as S
from fakedev.uapi.layout import Layout

VFIO_TYPE: Final = 0x3B  # ';'
IOMMUFD_TYPE: Final = VFIO_TYPE
VFIO_BASE: Final = 100
IOMMUFD_CMD_BASE: Final = 0x80


def _IO(type_: int, nr: int) -> int:
    return (type_ << 8) | nr


def _IOC_NR(cmd: int) -> int:
    return cmd & 0xFF


def _IOC_TYPE(cmd: int) -> int:
    return (cmd >> 8) & 0xFF


class FileKind(enum.Enum):
    CONTAINER = "container"  # /dev/vfio/vfio
    GROUP = "group"  # /dev/vfio/<N>
    DEVICE = "device"  # /dev/vfio/devices/vfioN or a group-opened device fd
    IOMMUFD = "iommufd"  # /dev/iommu


class Arg(enum.Enum):
    """What the ioctl's ``arg`` is."""

    NONE = "none"  # ignored
    INT = "int"  # the integer itself
    PTR_INT = "ptr_int"  # pointer to an int (a fd)
    STRING = "string"  # pointer to a NUL-terminated string
    STRUCT = "struct"  # pointer to ``layout``


@frozen
class Ioctl:
    name: str
    cmd: int
    kinds: frozenset[FileKind]
    arg: Arg
    layout: Layout | None = None
    since: tuple[int, int] = (3, 6)  # first kernel version that has it
    #: the call may look up fds of the caller (task.fget): the FUSE glue runs it off the loop
    takes_fds: bool = False

    @property
    def nr(self) -> int:
        return _IOC_NR(self.cmd)


_C, _G, _D, _I = FileKind.CONTAINER, FileKind.GROUP, FileKind.DEVICE, FileKind.IOMMUFD


def _v(nr: int) -> int:
    return _IO(VFIO_TYPE, VFIO_BASE + nr)


def _i(nr: int) -> int:
    return _IO(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + nr)


def _mk(name: str, cmd: int, kinds: set[FileKind], arg: Arg, layout: Layout | None = None,
        since: tuple[int, int] = (3, 6), takes_fds: bool = False) -> Ioctl:
    return Ioctl(name, cmd, frozenset(kinds), arg, layout, since, takes_fds)


# Container calls are also answered by /dev/iommu (the VFIO compat layer).
IOCTLS: Final[tuple[Ioctl, ...]] = (
    _mk("VFIO_GET_API_VERSION", _v(0), {_C, _I}, Arg.NONE),
    _mk("VFIO_CHECK_EXTENSION", _v(1), {_C, _I}, Arg.INT),
    _mk("VFIO_SET_IOMMU", _v(2), {_C, _I}, Arg.INT),
    _mk("VFIO_GROUP_GET_STATUS", _v(3), {_G}, Arg.STRUCT, S.VFIO_GROUP_STATUS),
    _mk("VFIO_GROUP_SET_CONTAINER", _v(4), {_G}, Arg.PTR_INT, takes_fds=True),
    _mk("VFIO_GROUP_UNSET_CONTAINER", _v(5), {_G}, Arg.NONE),
    _mk("VFIO_GROUP_GET_DEVICE_FD", _v(6), {_G}, Arg.STRING),
    _mk("VFIO_DEVICE_GET_INFO", _v(7), {_D}, Arg.STRUCT, S.VFIO_DEVICE_INFO),
    _mk("VFIO_DEVICE_GET_REGION_INFO", _v(8), {_D}, Arg.STRUCT, S.VFIO_REGION_INFO),
    _mk("VFIO_DEVICE_GET_IRQ_INFO", _v(9), {_D}, Arg.STRUCT, S.VFIO_IRQ_INFO),
    _mk("VFIO_DEVICE_SET_IRQS", _v(10), {_D}, Arg.STRUCT, S.VFIO_IRQ_SET, takes_fds=True),
    _mk("VFIO_DEVICE_RESET", _v(11), {_D}, Arg.NONE),
    _mk("VFIO_DEVICE_GET_PCI_HOT_RESET_INFO", _v(12), {_D}, Arg.STRUCT, S.VFIO_PCI_HOT_RESET_INFO, (3, 12)),
    _mk("VFIO_IOMMU_GET_INFO", _v(12), {_C, _I}, Arg.STRUCT, S.VFIO_IOMMU_TYPE1_INFO),
    _mk("VFIO_DEVICE_PCI_HOT_RESET", _v(13), {_D}, Arg.STRUCT, S.VFIO_PCI_HOT_RESET, (3, 12), takes_fds=True),
    _mk("VFIO_IOMMU_MAP_DMA", _v(13), {_C, _I}, Arg.STRUCT, S.VFIO_IOMMU_TYPE1_DMA_MAP),
    _mk("VFIO_DEVICE_QUERY_GFX_PLANE", _v(14), {_D}, Arg.STRUCT),
    _mk("VFIO_IOMMU_UNMAP_DMA", _v(14), {_C, _I}, Arg.STRUCT, S.VFIO_IOMMU_TYPE1_DMA_UNMAP),
    _mk("VFIO_DEVICE_GET_GFX_DMABUF", _v(15), {_D}, Arg.STRUCT),
    _mk("VFIO_IOMMU_ENABLE", _v(15), {_C, _I}, Arg.NONE),
    _mk("VFIO_DEVICE_IOEVENTFD", _v(16), {_D}, Arg.STRUCT),
    _mk("VFIO_IOMMU_DISABLE", _v(16), {_C, _I}, Arg.NONE),
    # takes an eventfd (LOW_POWER_ENTRY_WITH_WAKEUP)
    _mk("VFIO_DEVICE_FEATURE", _v(17), {_D}, Arg.STRUCT, S.VFIO_DEVICE_FEATURE, (5, 7), takes_fds=True),
    _mk("VFIO_IOMMU_DIRTY_PAGES", _v(17), {_C, _I}, Arg.STRUCT),
    _mk("VFIO_DEVICE_BIND_IOMMUFD", _v(18), {_D}, Arg.STRUCT, S.VFIO_DEVICE_BIND_IOMMUFD, (6, 6), takes_fds=True),
    _mk("VFIO_DEVICE_ATTACH_IOMMUFD_PT", _v(19), {_D}, Arg.STRUCT, S.VFIO_DEVICE_ATTACH_IOMMUFD_PT, (6, 6)),
    _mk("VFIO_DEVICE_DETACH_IOMMUFD_PT", _v(20), {_D}, Arg.STRUCT, S.VFIO_DEVICE_DETACH_IOMMUFD_PT, (6, 6)),
    _mk("VFIO_MIG_GET_PRECOPY_INFO", _v(21), {_D}, Arg.STRUCT, None, (6, 4)),
    _mk("IOMMU_DESTROY", _i(0x00), {_I}, Arg.STRUCT, S.IOMMU_DESTROY, (6, 2)),
    _mk("IOMMU_IOAS_ALLOC", _i(0x01), {_I}, Arg.STRUCT, S.IOMMU_IOAS_ALLOC, (6, 2)),
    _mk("IOMMU_IOAS_ALLOW_IOVAS", _i(0x02), {_I}, Arg.STRUCT, S.IOMMU_IOAS_ALLOW_IOVAS, (6, 2)),
    _mk("IOMMU_IOAS_COPY", _i(0x03), {_I}, Arg.STRUCT, S.IOMMU_IOAS_COPY, (6, 2)),
    _mk("IOMMU_IOAS_IOVA_RANGES", _i(0x04), {_I}, Arg.STRUCT, S.IOMMU_IOAS_IOVA_RANGES, (6, 2)),
    _mk("IOMMU_IOAS_MAP", _i(0x05), {_I}, Arg.STRUCT, S.IOMMU_IOAS_MAP, (6, 2)),
    _mk("IOMMU_IOAS_UNMAP", _i(0x06), {_I}, Arg.STRUCT, S.IOMMU_IOAS_UNMAP, (6, 2)),
    _mk("IOMMU_OPTION", _i(0x07), {_I}, Arg.STRUCT, S.IOMMU_OPTION, (6, 2)),
    _mk("IOMMU_VFIO_IOAS", _i(0x08), {_I}, Arg.STRUCT, S.IOMMU_VFIO_IOAS, (6, 2)),
    _mk("IOMMU_HWPT_ALLOC", _i(0x09), {_I}, Arg.STRUCT, S.IOMMU_HWPT_ALLOC, (6, 6)),
    _mk("IOMMU_GET_HW_INFO", _i(0x0A), {_I}, Arg.STRUCT, S.IOMMU_HW_INFO, (6, 6)),
    _mk("IOMMU_HWPT_SET_DIRTY_TRACKING", _i(0x0B), {_I}, Arg.STRUCT, None, (6, 7)),
    _mk("IOMMU_HWPT_GET_DIRTY_BITMAP", _i(0x0C), {_I}, Arg.STRUCT, None, (6, 7)),
    _mk("IOMMU_HWPT_INVALIDATE", _i(0x0D), {_I}, Arg.STRUCT, None, (6, 8)),
    _mk("IOMMU_IOAS_MAP_FILE", _i(0x0F), {_I}, Arg.STRUCT, S.IOMMU_IOAS_MAP_FILE, (6, 13), takes_fds=True),
    _mk("IOMMU_IOAS_CHANGE_PROCESS", _i(0x12), {_I}, Arg.STRUCT, S.IOMMU_IOAS_CHANGE_PROCESS, (6, 13)),
)

_BY_KIND: Final[dict[tuple[FileKind, int], Ioctl]] = {
    (k, io.cmd): io for io in IOCTLS for k in io.kinds
}
_BY_NAME: Final[dict[str, Ioctl]] = {io.name: io for io in IOCTLS}


def lookup(kind: FileKind, cmd: int) -> Ioctl | None:
    """The ioctl ``cmd`` means on a file of ``kind``, or None."""
    return _BY_KIND.get((kind, cmd))


def by_name(name: str) -> Ioctl:
    return _BY_NAME[name]


def cmd(name: str) -> int:
    """``cmd("VFIO_DEVICE_PCI_HOT_RESET") == 0x3b71``."""
    return _BY_NAME[name].cmd


# Module-level names, for ``from fakedev.uapi.ioctls import VFIO_DEVICE_PCI_HOT_RESET``.
VFIO_GET_API_VERSION: Final = cmd("VFIO_GET_API_VERSION")
VFIO_CHECK_EXTENSION: Final = cmd("VFIO_CHECK_EXTENSION")
VFIO_SET_IOMMU: Final = cmd("VFIO_SET_IOMMU")
VFIO_GROUP_GET_STATUS: Final = cmd("VFIO_GROUP_GET_STATUS")
VFIO_GROUP_SET_CONTAINER: Final = cmd("VFIO_GROUP_SET_CONTAINER")
VFIO_GROUP_UNSET_CONTAINER: Final = cmd("VFIO_GROUP_UNSET_CONTAINER")
VFIO_GROUP_GET_DEVICE_FD: Final = cmd("VFIO_GROUP_GET_DEVICE_FD")
VFIO_DEVICE_GET_INFO: Final = cmd("VFIO_DEVICE_GET_INFO")
VFIO_DEVICE_GET_REGION_INFO: Final = cmd("VFIO_DEVICE_GET_REGION_INFO")
VFIO_DEVICE_GET_IRQ_INFO: Final = cmd("VFIO_DEVICE_GET_IRQ_INFO")
VFIO_DEVICE_SET_IRQS: Final = cmd("VFIO_DEVICE_SET_IRQS")
VFIO_DEVICE_RESET: Final = cmd("VFIO_DEVICE_RESET")
VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: Final = cmd("VFIO_DEVICE_GET_PCI_HOT_RESET_INFO")
VFIO_DEVICE_PCI_HOT_RESET: Final = cmd("VFIO_DEVICE_PCI_HOT_RESET")
VFIO_IOMMU_GET_INFO: Final = cmd("VFIO_IOMMU_GET_INFO")
VFIO_IOMMU_MAP_DMA: Final = cmd("VFIO_IOMMU_MAP_DMA")
VFIO_IOMMU_UNMAP_DMA: Final = cmd("VFIO_IOMMU_UNMAP_DMA")
VFIO_DEVICE_FEATURE: Final = cmd("VFIO_DEVICE_FEATURE")
VFIO_DEVICE_BIND_IOMMUFD: Final = cmd("VFIO_DEVICE_BIND_IOMMUFD")
VFIO_DEVICE_ATTACH_IOMMUFD_PT: Final = cmd("VFIO_DEVICE_ATTACH_IOMMUFD_PT")
VFIO_DEVICE_DETACH_IOMMUFD_PT: Final = cmd("VFIO_DEVICE_DETACH_IOMMUFD_PT")
IOMMU_DESTROY: Final = cmd("IOMMU_DESTROY")
IOMMU_IOAS_ALLOC: Final = cmd("IOMMU_IOAS_ALLOC")
IOMMU_IOAS_ALLOW_IOVAS: Final = cmd("IOMMU_IOAS_ALLOW_IOVAS")
IOMMU_IOAS_COPY: Final = cmd("IOMMU_IOAS_COPY")
IOMMU_IOAS_IOVA_RANGES: Final = cmd("IOMMU_IOAS_IOVA_RANGES")
IOMMU_IOAS_MAP: Final = cmd("IOMMU_IOAS_MAP")
IOMMU_IOAS_UNMAP: Final = cmd("IOMMU_IOAS_UNMAP")
IOMMU_OPTION: Final = cmd("IOMMU_OPTION")
IOMMU_VFIO_IOAS: Final = cmd("IOMMU_VFIO_IOAS")
IOMMU_HWPT_ALLOC: Final = cmd("IOMMU_HWPT_ALLOC")
IOMMU_GET_HW_INFO: Final = cmd("IOMMU_GET_HW_INFO")
IOMMU_IOAS_MAP_FILE: Final = cmd("IOMMU_IOAS_MAP_FILE")
IOMMU_IOAS_CHANGE_PROCESS: Final = cmd("IOMMU_IOAS_CHANGE_PROCESS")
