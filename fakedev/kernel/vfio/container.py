"""The legacy VFIO container: /dev/vfio/vfio.

Mirrors drivers/vfio/container.c. Lives here: ``VfioContainer`` (groups, the
IOMMU driver once VFIO_SET_IOMMU chose one), its file and ioctl dispatch,
group attach/detach with DMA ownership, and the no-IOMMU driver
(``VfioNoiommuDriver``, vfio_noiommu_ops: VFIO_NOIOMMU_IOMMU for containers of
noiommu groups, which may not mix with real groups). Not here: the type1
driver's own ioctls (``vfio_iommu_type1.py``).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from fakedev.kernel.errors import KernelError
from fakedev.kernel.file import File
from fakedev.kernel.iommu import (
    IommuGroup,
    iommu_group_claim_dma_owner,
    iommu_group_release_dma_owner,
)
from fakedev.kernel.iommufd.vfio_compat import CAP_SYS_RAWIO
from fakedev.kernel.task import Task
from fakedev.kernel.version import KernelVersion
from fakedev.uapi import consts as C
from fakedev.uapi import ioctls as IO
from fakedev.uapi.ioctls import FileKind

from .vfio_iommu_type1 import VfioIommuType1, type1_check_extension

if TYPE_CHECKING:
    from .group import VfioGroup


class VfioNoiommuDriver:
    """vfio_noiommu_ops: the "IOMMU driver" of noiommu containers; it maps nothing."""

    name = "vfio-noiommu"

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled  # vfio's enable_unsafe_noiommu_mode

    @staticmethod
    def open(arg: int, task: Task) -> VfioNoiommuDriver:
        """Models vfio_noiommu_open(): only VFIO_NOIOMMU_IOMMU, only with CAP_SYS_RAWIO."""
        if arg != C.VFIO_NOIOMMU_IOMMU:
            raise KernelError(errno.EINVAL)
        if not task.capable(CAP_SYS_RAWIO):
            raise KernelError(errno.EPERM, "VFIO_NOIOMMU_IOMMU needs CAP_SYS_RAWIO")
        return VfioNoiommuDriver(True)

    def check_extension(self, arg: int) -> int:
        """Models vfio_noiommu_ioctl(VFIO_CHECK_EXTENSION)."""
        return 1 if self.enabled and arg == C.VFIO_NOIOMMU_IOMMU else 0

    def ioctl(self, task: Task, cmd: int, arg: int) -> int:
        """Models vfio_noiommu_ioctl(): nothing but CHECK_EXTENSION (MAP_DMA, GET_INFO: ENOTTY)."""
        raise KernelError(errno.ENOTTY, "the noiommu driver has no ioctls")

    def attach_group(self, group: IommuGroup) -> None:
        """Models vfio_noiommu_attach_group()."""

    def detach_group(self, group: IommuGroup) -> None:
        """Models vfio_noiommu_detach_group()."""

    def release(self) -> None:
        """Models vfio_noiommu_release()."""


class VfioContainer:
    """struct vfio_container."""

    def __init__(self, version: KernelVersion, noiommu_mode: bool = False) -> None:
        self.version = version
        self.group_list: list[VfioGroup] = []
        self.iommu_driver: VfioIommuType1 | VfioNoiommuDriver | None = None
        self.file_open = True
        #: container->noiommu: its groups are noiommu ones
        self.noiommu = False
        #: vfio's enable_unsafe_noiommu_mode (what the noiommu driver's CHECK_EXTENSION answers)
        self.noiommu_mode = noiommu_mode

    @property
    def alive(self) -> bool:
        return self.file_open or bool(self.group_list)


class VfioContainerFile(File):
    """One open of /dev/vfio/vfio (each open is a new container)."""

    kind = FileKind.CONTAINER
    label = "vfio"

    def __init__(self, version: KernelVersion, pid: int | None, noiommu_mode: bool = False) -> None:
        self.container = VfioContainer(version, noiommu_mode)
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


def vfio_iommu_driver_allowed(c: VfioContainer, noiommu_driver: bool) -> bool:
    """Models vfio_iommu_driver_allowed(): noiommu containers use only the noiommu driver."""
    return c.noiommu == noiommu_driver


def vfio_container_ioctl_check_extension(c: VfioContainer, arg: int) -> int:
    """Models vfio_container_ioctl_check_extension(): poll drivers until one is set.

    The registered drivers, in list order: type1 (registered last, so first),
    then vfio-noiommu; with groups attached only the allowed kind is asked.
    """
    if c.iommu_driver is not None:
        return c.iommu_driver.check_extension(arg)
    ret = 0
    for noiommu_driver in (False, True):
        if c.group_list and not vfio_iommu_driver_allowed(c, noiommu_driver):
            continue
        if noiommu_driver:
            ret = VfioNoiommuDriver(c.noiommu_mode).check_extension(arg)
        else:
            ret = type1_check_extension(None, arg, c.version)
        if ret > 0:
            break
    return ret


def vfio_ioctl_set_iommu(c: VfioContainer, task: Task, arg: int) -> int:
    """Models vfio_ioctl_set_iommu(): the first allowed driver that claims ``arg`` and opens."""
    if not c.group_list or c.iommu_driver is not None:
        raise KernelError(errno.EINVAL)
    err = errno.ENODEV
    for noiommu_driver in (False, True):
        if not vfio_iommu_driver_allowed(c, noiommu_driver):
            continue
        drv: VfioIommuType1 | VfioNoiommuDriver
        try:
            if noiommu_driver:
                if VfioNoiommuDriver(c.noiommu_mode).check_extension(arg) <= 0:
                    continue
                drv = VfioNoiommuDriver.open(arg, task)  # EPERM without CAP_SYS_RAWIO
                drv.enabled = c.noiommu_mode
            else:
                if type1_check_extension(None, arg, c.version) <= 0:
                    continue
                drv = VfioIommuType1.open(arg, c.version)  # EINVAL for types it does not open
        except KernelError as e:
            err = e.errno
            continue
        for g in c.group_list:
            assert g.iommu_group is not None
            drv.attach_group(g.iommu_group)
        c.iommu_driver = drv
        return 0
    raise KernelError(err, "no IOMMU driver took this type")


def vfio_container_attach_group(c: VfioContainer, group: VfioGroup, task: Task) -> None:
    """Models vfio_container_attach_group(): claims DMA ownership of the whole group
    (not for a noiommu group, which needs CAP_SYS_RAWIO and may not mix with real groups)."""
    assert group.iommu_group is not None
    if group.noiommu and not task.capable(CAP_SYS_RAWIO):
        raise KernelError(errno.EPERM, "a noiommu group needs CAP_SYS_RAWIO")
    if c.group_list and c.noiommu != group.noiommu:
        raise KernelError(errno.EPERM, "noiommu and real groups cannot share a container")
    if not group.noiommu:
        iommu_group_claim_dma_owner(group.iommu_group, group)  # EPERM / EBUSY
    if c.iommu_driver is not None:
        c.iommu_driver.attach_group(group.iommu_group)
    group.container = c
    group.container_users = 1
    c.noiommu = group.noiommu
    c.group_list.append(group)


def vfio_group_detach_container(group: VfioGroup) -> None:
    """Models vfio_group_detach_container(): the last group unsets the IOMMU driver."""
    c = group.container
    assert c is not None and group.iommu_group is not None
    if c.iommu_driver is not None:
        c.iommu_driver.detach_group(group.iommu_group)
    if not group.noiommu:
        iommu_group_release_dma_owner(group.iommu_group)
    group.container = None
    group.container_users = 0
    c.group_list.remove(group)
    if not c.group_list and c.iommu_driver is not None:
        c.iommu_driver.release()
        c.iommu_driver = None
