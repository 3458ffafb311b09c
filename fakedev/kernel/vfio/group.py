"""VFIO groups: /dev/vfio/<group id> and the group-derived device fds.

Mirrors drivers/vfio/group.c (6.6+, with the cdev blocking rules). Lives here:
``VfioGroup`` (struct vfio_group), ``VfioGroupFile`` (its single open file),
GET_STATUS / SET_CONTAINER / UNSET_CONTAINER / GET_DEVICE_FD, and the group
side of device open/close. Not here: the container and its IOMMU driver
(``container.py``), the device file itself (``vfio_main.py``).

File references: a device opened through a container-backed group holds a
reference on the group file (``vfio_group_use_container`` does ``get_file``),
so the group's release only runs after those devices are closed even if the
user closed the group fd first. ``VfioGroupFile.refs`` models that.

No-IOMMU groups (``VfioGroup.noiommu``, the kernel's VFIO_NO_IOMMU type):
made by ``vfio_noiommu_group_alloc`` when vfio's enable_unsafe_noiommu_mode is
set and the device has no iommu group; named "noiommu-<id>" (the node
/dev/vfio/noiommu-<id>); every open, container attach and device open needs
CAP_SYS_RAWIO; no DMA ownership is claimed for them.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from fakedev.kernel.errors import KernelError
from fakedev.kernel.file import File
from fakedev.kernel.iommu import (
    IommuGroup,
    iommu_group_dma_owner_claimed,
)
from fakedev.kernel.iommufd.vfio_compat import CAP_SYS_RAWIO
from fakedev.kernel.task import Task
from fakedev.uapi import consts as C
from fakedev.uapi import ioctls as IO
from fakedev.uapi import structs as S
from fakedev.uapi.ioctls import FileKind

from .vfio_main import VfioDevice, VfioDeviceFile, read_user_string, vfio_df_close, vfio_df_open

if TYPE_CHECKING:
    from .container import VfioContainer


class VfioGroup:
    """struct vfio_group: one per iommu group holding at least one VFIO device."""

    def __init__(self, iommu_group: IommuGroup, minor: int, *, noiommu: bool = False) -> None:
        self.id = iommu_group.id
        #: group->type == VFIO_NO_IOMMU
        self.noiommu = noiommu
        self.iommu_group: IommuGroup | None = iommu_group
        self.minor = minor  # IDA index: the node's minor number
        self.devices: list[VfioDevice] = []
        self.opened_file: VfioGroupFile | None = None
        self.container: VfioContainer | None = None
        self.iommufd: Any = None  # IommufdCtx (holds a reference)
        self.container_users = 0
        self.cdev_device_open_cnt = 0

    def __repr__(self) -> str:
        return f"<VfioGroup {self.id}>"

    @property
    def name(self) -> str:
        """dev_name of the group device (vfio_create_group): the node is /dev/vfio/<name>."""
        return f"noiommu-{self.id}" if self.noiommu else str(self.id)

    def has_iommu(self) -> bool:
        """Models vfio_group_has_iommu()."""
        return self.container is not None or self.iommufd is not None


class VfioGroupFile(File):
    """The (single) open of /dev/vfio/<id>."""

    kind = FileKind.GROUP

    def __init__(self, group: VfioGroup, pid: int | None) -> None:
        self.group = group
        self.label = group.name
        self.pid = pid
        self.refs = 1  # the user's fds; +1 per device opened through the container
        self.user_closed = False

    def __repr__(self) -> str:
        return f"<VfioGroupFile {self.group.id}>"

    def get(self) -> None:
        self.refs += 1

    def put(self) -> None:
        self.refs -= 1
        if self.refs == 0:
            vfio_group_fops_release(self)

    def release(self) -> None:
        if self.user_closed:
            return
        self.user_closed = True
        self.put()

    def ioctl(self, task: Task, cmd: int, arg: int) -> int:
        """Models vfio_group_fops_unl_ioctl()."""
        if self.user_closed:
            raise KernelError(errno.EBADF)
        handler = _GROUP_IOCTLS.get(cmd)
        if handler is None:
            raise KernelError(errno.ENOTTY)
        return handler(self.group, task, arg)


def vfio_group_fops_open(group: VfioGroup, task: Task) -> VfioGroupFile:
    """Models vfio_group_fops_open()."""
    if not group.devices:
        raise KernelError(errno.ENODEV)
    if group.noiommu and not task.capable(CAP_SYS_RAWIO):
        raise KernelError(errno.EPERM, "a noiommu group needs CAP_SYS_RAWIO")
    if group.cdev_device_open_cnt:
        raise KernelError(errno.EBUSY, f"a device of group {group.id} is bound through its cdev")
    if group.opened_file is not None:
        raise KernelError(errno.EBUSY, f"group {group.id} is already open")
    f = VfioGroupFile(group, task.pid)
    group.opened_file = f
    return f


def vfio_group_fops_release(f: VfioGroupFile) -> None:
    """Models vfio_group_fops_release(): runs when the last file reference goes."""
    from .container import vfio_group_detach_container

    group = f.group
    if group.container is not None:
        vfio_group_detach_container(group)
    if group.iommufd is not None:
        group.iommufd.put()
        group.iommufd = None
    if group.opened_file is f:
        group.opened_file = None


# --------------------------------------------------------------------------
# ioctls
# --------------------------------------------------------------------------


def vfio_group_ioctl_get_status(group: VfioGroup, task: Task, arg: int) -> int:
    """Models vfio_group_ioctl_get_status()."""
    lay = S.VFIO_GROUP_STATUS
    minsz = lay.offsetofend("flags")
    st = lay.unpack(task.read(arg, minsz))
    if st["argsz"] < minsz:
        raise KernelError(errno.EINVAL)
    if group.iommu_group is None:
        raise KernelError(errno.ENODEV)
    flags = 0
    if group.has_iommu():
        flags = C.VFIO_GROUP_FLAGS_CONTAINER_SET | C.VFIO_GROUP_FLAGS_VIABLE
    elif not iommu_group_dma_owner_claimed(group.iommu_group):
        flags = C.VFIO_GROUP_FLAGS_VIABLE
    task.write(arg, lay.pack(argsz=st["argsz"], flags=flags))
    return 0


def vfio_group_ioctl_set_container(group: VfioGroup, task: Task, arg: int) -> int:
    """Models vfio_group_ioctl_set_container(): a container fd or an iommufd fd."""
    from fakedev.kernel.vfio import iommufd as viommufd

    from .container import VfioContainerFile, vfio_container_attach_group

    fd = int.from_bytes(task.read(arg, 4), "little", signed=True)
    f = task.fget(fd)  # EBADF
    try:
        if group.has_iommu():
            raise KernelError(errno.EINVAL, "group already has a container")
        if group.iommu_group is None:
            raise KernelError(errno.ENODEV)
        if isinstance(f, VfioContainerFile):
            vfio_container_attach_group(f.container, group, task)
            return 0
        ictx = viommufd.ctx_from_file(f)
        if ictx is None:
            raise KernelError(errno.EBADFD, "not a container or iommufd")
        try:
            if group.noiommu:
                viommufd.compat_set_no_iommu(ictx)
            else:
                viommufd.compat_ioas_create(ictx)
        except KernelError:
            ictx.put()
            raise
        group.iommufd = ictx
        return 0
    finally:
        if not isinstance(f, File):
            f.close()


def vfio_group_ioctl_unset_container(group: VfioGroup, task: Task, arg: int) -> int:
    """Models vfio_group_ioctl_unset_container()."""
    from .container import vfio_group_detach_container

    if not group.has_iommu():
        raise KernelError(errno.EINVAL)
    if group.container is not None:
        if group.container_users != 1:
            raise KernelError(errno.EBUSY, "devices of the group are still open")
        vfio_group_detach_container(group)
    if group.iommufd is not None:
        group.iommufd.put()
        group.iommufd = None
    return 0


def vfio_device_get_from_name(group: VfioGroup, buf: str) -> VfioDevice:
    """Models vfio_device_get_from_name(): ops->match over the group's devices.

    A matching device being unregistered is skipped (its registration
    reference cannot be taken), so the search goes on and ends in ENODEV.
    """
    from .vfio_main import vfio_device_try_get_registration

    for dev in group.devices:
        if dev.match(buf) > 0 and vfio_device_try_get_registration(dev):
            return dev
    raise KernelError(errno.ENODEV, f"no device {buf!r} in group {group.id}")


def vfio_group_ioctl_get_device_fd(group: VfioGroup, task: Task, arg: int) -> int:
    """Models vfio_group_ioctl_get_device_fd(): returns a new fd in the caller."""
    buf = read_user_string(task, arg, C.PAGE_SIZE)
    device = vfio_device_get_from_name(group, buf)
    df = vfio_device_open_file(device, task)
    try:
        return task.fd_install(df)
    except KernelError:
        df.release()
        raise


def vfio_device_open_file(device: VfioDevice, task: Task) -> VfioDeviceFile:
    """Models vfio_device_open_file() + vfio_df_group_open()."""
    from fakedev.kernel.vfio import iommufd as viommufd

    group = device.group
    if not group.has_iommu():
        raise KernelError(errno.EINVAL, "group has no container or iommufd")
    df = VfioDeviceFile(device, group, task.pid)
    df.iommufd = group.iommufd
    if df.iommufd is not None and group.noiommu and device.open_count == 0:
        # no translation may have been asked for: no compat IOAS in the context
        if not task.capable(CAP_SYS_RAWIO) or viommufd.vfio_iommufd_device_has_compat_ioas(device, df.iommufd):
            raise KernelError(errno.EPERM, "noiommu device: CAP_SYS_RAWIO and no compat IOAS needed")
        if not device.vfio.version.noiommu_iommufd_open_fixed:
            # before 6.17 the open stops here with success: the fd is made, never opened
            df.iommufd = None
            return df
    vfio_df_open(df, task)
    if df.iommufd is not None and device.open_count == 1 and not group.noiommu:
        try:
            viommufd.vfio_iommufd_compat_attach_ioas(device, df.iommufd)
        except KernelError:
            vfio_df_close(df, task)
            raise
    df.access_granted = True
    return df


def vfio_df_group_close(df: VfioDeviceFile) -> None:
    """Models vfio_df_group_close()."""
    vfio_df_close(df, None)
    df.iommufd = None


def vfio_device_group_use_iommu(device: VfioDevice, task: Task | None = None) -> None:
    """Models vfio_device_group_use_iommu() / vfio_group_use_container()."""
    group = device.group
    if group.container is None:
        raise KernelError(errno.EINVAL)
    if group.container.iommu_driver is None:
        raise KernelError(errno.EINVAL, "VFIO_SET_IOMMU not done")
    if group.noiommu and (task is None or not task.capable(CAP_SYS_RAWIO)):
        raise KernelError(errno.EPERM, "a noiommu device needs CAP_SYS_RAWIO")
    assert group.opened_file is not None
    group.opened_file.get()
    group.container_users += 1


def vfio_device_group_unuse_iommu(device: VfioDevice) -> None:
    """Models vfio_device_group_unuse_iommu() / vfio_group_unuse_container()."""
    group = device.group
    group.container_users -= 1
    f = group.opened_file
    if f is not None:
        f.put()


def vfio_device_block_group(device: VfioDevice) -> None:
    """Models vfio_device_block_group(): EBUSY while the group file is open."""
    group = device.group
    if group.opened_file is not None:
        raise KernelError(errno.EBUSY, f"group {group.id} is open")
    group.cdev_device_open_cnt += 1


def vfio_device_unblock_group(device: VfioDevice) -> None:
    """Models vfio_device_unblock_group()."""
    device.group.cdev_device_open_cnt -= 1


def vfio_file_has_dev(f: object, device: VfioDevice) -> bool:
    """Models vfio_file_has_dev(): ``f`` is the group file of ``device``'s group."""
    return isinstance(f, VfioGroupFile) and f.group is device.group


_GROUP_IOCTLS = {
    IO.VFIO_GROUP_GET_STATUS: vfio_group_ioctl_get_status,
    IO.VFIO_GROUP_SET_CONTAINER: vfio_group_ioctl_set_container,
    IO.VFIO_GROUP_UNSET_CONTAINER: vfio_group_ioctl_unset_container,
    IO.VFIO_GROUP_GET_DEVICE_FD: vfio_group_ioctl_get_device_fd,
}
