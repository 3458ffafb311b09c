"""The device cdev: /dev/vfio/devices/vfioN, BIND / ATTACH / DETACH, unbind at close.

Mirrors drivers/vfio/device_cdev.c (6.6; the BIND token and PASID flags of
later kernels behind ``KernelVersion.has_bind_token``).
"""

from __future__ import annotations

import errno

from fakedev.kernel.errors import KernelError
from fakedev.kernel.file import File
from fakedev.kernel.task import Task
from fakedev.kernel.uaccess import copy_struct_from_user
from fakedev.uapi import consts as C
from fakedev.uapi import structs as S

from . import group as vgroup
from . import iommufd as viommufd
from .vfio_main import (
    VfioDevice,
    VfioDeviceFile,
    vfio_device_try_get_registration,
    vfio_df_close,
    vfio_df_open,
)


def vfio_device_fops_cdev_open(device: VfioDevice, task: Task) -> VfioDeviceFile:
    """Models vfio_device_fops_cdev_open(): no access until BIND; ENODEV once the
    device is being unregistered (vfio_device_try_get_registration fails)."""
    if not vfio_device_try_get_registration(device):
        raise KernelError(errno.ENODEV, f"{device.name} is being removed")
    df = VfioDeviceFile(device, None, task.pid)
    device.cdev_files.append(df)
    return df


def vfio_df_ioctl_bind_iommufd(df: VfioDeviceFile, task: Task, arg: int) -> int:
    """Models vfio_df_ioctl_bind_iommufd(), in the kernel's order of checks."""
    device = df.device
    lay = S.VFIO_DEVICE_BIND_IOMMUFD
    minsz = lay.offsetofend("out_devid")
    with_token = device.vfio.version.has_bind_token
    if with_token:
        # get_user(argsz), then copy_struct_from_user() of the 24-byte struct
        user_size = int.from_bytes(task.read(arg, 4), "little")
        if user_size < minsz:
            raise KernelError(errno.EINVAL)
        bind = lay.unpack(copy_struct_from_user(task, lay.size, arg, user_size), partial=True)
        if bind["iommufd"] < 0 or bind["flags"] & ~C.VFIO_DEVICE_BIND_FLAG_TOKEN:
            raise KernelError(errno.EINVAL)
    else:
        bind = lay.unpack(task.read(arg, minsz), partial=True)
        if bind["argsz"] < minsz or bind["flags"] or bind["iommufd"] < 0:
            raise KernelError(errno.EINVAL)
    if df.group is not None:
        raise KernelError(errno.EINVAL, "BIND is only for cdev fds")
    vgroup.vfio_device_block_group(device)  # EBUSY while the group is open
    try:
        if df.access_granted:
            raise KernelError(errno.EINVAL, "this fd is already bound")
        if with_token:
            vfio_df_check_token(device, bind, task)
        f = task.fget(bind["iommufd"])  # EBADF
        try:
            ictx = viommufd.ctx_from_file(f)
        finally:
            if not isinstance(f, File):
                f.close()
        if ictx is None:
            raise KernelError(errno.EBADFD, "not an iommufd")
        df.iommufd = ictx
        try:
            vfio_df_open(df, task)
            try:
                task.write(arg + lay.field("out_devid").offset, df.devid.to_bytes(4, "little"))
            except KernelError:
                vfio_df_close(df, task)
                raise
        except KernelError:
            ictx.put()
            df.iommufd = None
            df.devid = 0
            raise
    except KernelError:
        vgroup.vfio_device_unblock_group(device)
        raise
    device.cdev_opened = True
    df.access_granted = True
    return 0


def vfio_df_check_token(device: VfioDevice, bind: dict[str, int], task: Task) -> None:
    """Models vfio_df_check_token() (kernels with VFIO_DEVICE_BIND_FLAG_TOKEN, 6.16+:
    86624ba3b522): a driver with match_token_uuid is asked even when no token
    is given (a VF of a vfio-pci PF then fails EACCES)."""
    if not device.has_match_token:
        device.match_token(None if not bind["flags"] & C.VFIO_DEVICE_BIND_FLAG_TOKEN else b"")
        return
    if not bind["flags"] & C.VFIO_DEVICE_BIND_FLAG_TOKEN:
        device.match_token(None)
        return
    uuid = task.read(bind["token_uuid_ptr"], 16)  # EFAULT (a short struct leaves the pointer 0)
    device.match_token(uuid)


def vfio_df_unbind_iommufd(df: VfioDeviceFile) -> None:
    """Models vfio_df_unbind_iommufd(): close at the last close of a bound cdev fd."""
    if not df.access_granted:
        return
    device = df.device
    vfio_df_close(df, None)
    if df.iommufd is not None:
        df.iommufd.put()
        df.iommufd = None
    device.cdev_opened = False
    df.access_granted = False
    vgroup.vfio_device_unblock_group(device)


def vfio_df_ioctl_attach_pt(df: VfioDeviceFile, task: Task, arg: int) -> int:
    """Models vfio_df_ioctl_attach_pt(): pt_id := the resulting hwpt id."""
    device = df.device
    lay = S.VFIO_DEVICE_ATTACH_IOMMUFD_PT
    minsz = lay.offsetofend("pt_id")
    attach = lay.unpack(task.read(arg, minsz), partial=True)
    pasid_ok = device.vfio.version.has_bind_token
    if attach["argsz"] < minsz:
        raise KernelError(errno.EINVAL)
    if attach["flags"] & ~(C.VFIO_DEVICE_ATTACH_PASID if pasid_ok else 0):
        raise KernelError(errno.EINVAL)
    if attach["flags"] & C.VFIO_DEVICE_ATTACH_PASID:
        raise KernelError(errno.EOPNOTSUPP, "no PASID support")
    pt = viommufd.vfio_iommufd_physical_attach_ioas(device, attach["pt_id"])
    try:
        task.write(arg + lay.field("pt_id").offset, pt.to_bytes(4, "little"))
    except KernelError:
        # as the kernel does (out_detach), even when the attach was a replace
        viommufd.vfio_iommufd_physical_detach_ioas(device)
        raise
    return 0


def vfio_df_ioctl_detach_pt(df: VfioDeviceFile, task: Task, arg: int) -> int:
    """Models vfio_df_ioctl_detach_pt(): detaching an unattached device succeeds."""
    device = df.device
    lay = S.VFIO_DEVICE_DETACH_IOMMUFD_PT
    minsz = lay.offsetofend("flags")
    detach = lay.unpack(task.read(arg, minsz), partial=True)
    pasid_ok = device.vfio.version.has_bind_token
    if detach["argsz"] < minsz:
        raise KernelError(errno.EINVAL)
    if detach["flags"] & ~(C.VFIO_DEVICE_DETACH_PASID if pasid_ok else 0):
        raise KernelError(errno.EINVAL)
    if detach["flags"] & C.VFIO_DEVICE_DETACH_PASID:
        raise KernelError(errno.EOPNOTSUPP, "no PASID support")
    viommufd.vfio_iommufd_physical_detach_ioas(device)
    return 0
