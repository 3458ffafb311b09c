"""The legacy VFIO container: /dev/vfio/vfio.

Mirrors drivers/vfio/container.c. Lives here: ``VfioContainer`` (groups, the
IOMMU driver once VFIO_SET_IOMMU chose one), its file and ioctl dispatch,
group attach/detach with DMA ownership. Not here: the type1 driver's own
ioctls (``vfio_iommu_type1.py``).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from fakedev.kernel.errors import KernelError
from fakedev.kernel.file import File
from fakedev.kernel.iommu import iommu_group_claim_dma_owner, iommu_group_release_dma_owner
from fakedev.kernel.task import Task
from fakedev.kernel.version import KernelVersion
from fakedev.uapi import consts as C
from fakedev.uapi import ioctls as IO
from fakedev.uapi.ioctls import FileKind

from .vfio_iommu_type1 import VfioIommuType1, type1_check_extension

if TYPE_CHECKING:
    from .group import VfioGroup


class VfioContainer:
    """struct vfio_container."""

    def __init__(self, version: KernelVersion) -> None:
        self.version = version
        self.group_list: list[VfioGroup] = []
        self.iommu_driver: VfioIommuType1 | None = None
        self.file_open = True

    @property
    def alive(self) -> bool:
        return self.file_open or bool(self.group_list)


class VfioContainerFile(File):
    """One open of /dev/vfio/vfio (each open is a new container)."""

    kind = FileKind.CONTAINER
    label = "vfio"

    def __init__(self, version: KernelVersion, pid: int | None) -> None:
        self.container = VfioContainer(version)
        self.pid = pid

    def ioctl(self, task: Task, cmd: int, arg: int) -> int:
        """Models vfio_fops_unl_ioctl()."""
        c = self.container
        if cmd == IO.VFIO_GET_API_VERSION:
            return C.VFIO_API_VERSION
        if cmd == IO.VFIO_CHECK_EXTENSION:
            return vfio_container_ioctl_check_extension(c, arg)
        if cmd == IO.VFIO_SET_IOMMU:
            return vfio_ioctl_set_iommu(c, task, arg)
        if c.iommu_driver is None:
            raise KernelError(errno.EINVAL, "no IOMMU driver set")
        return c.iommu_driver.ioctl(task, cmd, arg)

    def release(self) -> None:
        """Models vfio_fops_release(): the container lives on while groups use it."""
        self.container.file_open = False


def vfio_container_ioctl_check_extension(c: VfioContainer, arg: int) -> int:
    """Models vfio_container_ioctl_check_extension(): poll drivers until one is set."""
    if c.iommu_driver is not None:
        return c.iommu_driver.check_extension(arg)
    return type1_check_extension(None, arg, c.version)


def vfio_ioctl_set_iommu(c: VfioContainer, task: Task, arg: int) -> int:
    """Models vfio_ioctl_set_iommu(): type1 is the only registered driver."""
    if not c.group_list or c.iommu_driver is not None:
        raise KernelError(errno.EINVAL)
    if type1_check_extension(None, arg, c.version) <= 0:
        raise KernelError(errno.ENODEV, "no IOMMU driver for this type")
    drv = VfioIommuType1.open(arg, c.version)  # EINVAL for types it does not open
    for g in c.group_list:
        assert g.iommu_group is not None
        drv.attach_group(g.iommu_group)
    c.iommu_driver = drv
    return 0


def vfio_container_attach_group(c: VfioContainer, group: VfioGroup, task: Task) -> None:
    """Models vfio_container_attach_group(): claims DMA ownership of the whole group."""
    assert group.iommu_group is not None
    iommu_group_claim_dma_owner(group.iommu_group, group)  # EPERM / EBUSY
    if c.iommu_driver is not None:
        c.iommu_driver.attach_group(group.iommu_group)
    group.container = c
    group.container_users = 1
    c.group_list.append(group)


def vfio_group_detach_container(group: VfioGroup) -> None:
    """Models vfio_group_detach_container(): the last group unsets the IOMMU driver."""
    c = group.container
    assert c is not None and group.iommu_group is not None
    if c.iommu_driver is not None:
        c.iommu_driver.detach_group(group.iommu_group)
    iommu_group_release_dma_owner(group.iommu_group)
    group.container = None
    group.container_users = 0
    c.group_list.remove(group)
    if not c.group_list and c.iommu_driver is not None:
        c.iommu_driver.release()
        c.iommu_driver = None
