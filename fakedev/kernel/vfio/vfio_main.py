"""The VFIO core: vfio_device, dev_set, device files and their ioctl dispatch.

Mirrors drivers/vfio/vfio_main.c. Lives here: ``Vfio`` (the module-global state
the kernel keeps: devices, groups, dev_sets, the reset log, fault hooks),
``VfioDevice`` (base of a bus driver's device; vfio-pci subclasses it),
``VfioDeviceSet``, ``VfioDeviceFile`` (one open of a device: cdev or
group-derived) with ``vfio_device_fops_unl_ioctl`` dispatch and the
VFIO_DEVICE_FEATURE header rules, and ``vfio_df_open``/``vfio_df_close``.
Not here: group and container files (``group.py``, ``container.py``), the
cdev BIND/ATTACH calls (``device_cdev.py``), vfio-pci itself (``pci/``).
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from attrs import define, field

from fakedev.kernel.errors import KernelError
from fakedev.kernel.file import File
from fakedev.kernel.iommu import IommuGroup
from fakedev.kernel.pci import PciDev
from fakedev.kernel.task import Task
from fakedev.kernel.version import KernelVersion
from fakedev.uapi import consts as C
from fakedev.uapi import ioctls as IO
from fakedev.uapi import structs as S
from fakedev.uapi.ioctls import FileKind

if TYPE_CHECKING:
    from fakedev.kernel.vfio.group import VfioGroup


# --------------------------------------------------------------------------
# Global state, reset records, fault hooks
# --------------------------------------------------------------------------


@define
class ResetRecord:
    """One reset the model performed on one PCI function."""

    bdf: str
    method: str  # "flr", "af_flr", "pm", "bus", "slot"
    cause: str  # "VFIO_DEVICE_PCI_HOT_RESET", "VFIO_DEVICE_RESET", "open", "close"
    pid: int | None  # the calling process (None: no task, e.g. a release)
    time: float
    reset_count: int  # resets of this function so far, this one included


@define
class KernelHooks:
    """Fault injection points.

    ``memory_lock_contended``: BDFs whose vfio-pci memory_lock cannot be taken
    (hot reset of a dev_set containing one -> EBUSY, nothing reset).
    ``device_lock_contended``: BDFs whose device lock trylock fails
    (VFIO_DEVICE_RESET and the reset at open -> EAGAIN).
    ``reset_errno``: BDF -> errno the reset of that function fails with, after
    every ownership check passed (hot reset, VFIO_DEVICE_RESET).
    """

    memory_lock_contended: set[str] = field(factory=set)
    device_lock_contended: set[str] = field(factory=set)
    reset_errno: dict[str, int] = field(factory=dict)


def _counter() -> Callable[[], float]:
    c = itertools.count(1)
    return lambda: float(next(c))


class Vfio:
    """The kernel's module-global VFIO state (``static struct vfio``, the dev_set xarray)."""

    def __init__(self, version: KernelVersion, clock: Callable[[], float] | None = None) -> None:
        self.version = version
        self.clock = clock if clock is not None else _counter()
        self.hooks = KernelHooks()
        #: the most recent resets (at least ``reset_log_keep``, at most twice
        #: that: a long-running server must not grow without bound); every
        #: reset is counted in ``reset_counts`` and ``reset_log_dropped``
        self.reset_log: list[ResetRecord] = []
        self.reset_log_keep = 10_000
        self.reset_log_dropped = 0
        self.reset_counts: dict[str, int] = {}
        self.devices: list[VfioDevice] = []
        self.groups: dict[int, VfioGroup] = {}
        self.dev_sets: list[VfioDeviceSet] = []
        self.iommu_groups: dict[int, IommuGroup] = {}
        #: vfio's enable_unsafe_noiommu_mode (vfio_noiommu): devices without an
        #: iommu group get a noiommu group at registration
        self.noiommu = False
        #: TAINT_USER set (a noiommu group was created: vfio_group_find_or_alloc)
        self.tainted = False
        #: advertise BARs as mmap-able (the kernel's answer; FUSE cannot serve the mmap)
        self.bar_mmap = False
        #: vfio-pci's enable_sriov module parameter (vfio_pci_sriov_configure: ENOENT without it)
        self.enable_sriov = False
        #: called when the last registration reference of an unregistering device
        #: goes (complete(&device->comp) waking vfio_unregister_group_dev)
        self.on_registration_released: Callable[[VfioDevice], None] | None = None

    def record_reset(self, pdev: PciDev, method: str, cause: str, pid: int | None) -> ResetRecord:
        n = self.reset_counts.get(pdev.name, 0) + 1
        self.reset_counts[pdev.name] = n
        rec = ResetRecord(pdev.name, method, cause, pid, self.clock(), n)
        self.reset_log.append(rec)
        if len(self.reset_log) > 2 * self.reset_log_keep:
            drop = len(self.reset_log) - self.reset_log_keep
            del self.reset_log[:drop]
            self.reset_log_dropped += drop
        return rec

    def device_of(self, pdev: PciDev) -> VfioDevice | None:
        for d in self.devices:
            if d.pdev is pdev:
                return d
        return None


# --------------------------------------------------------------------------
# dev_set
# --------------------------------------------------------------------------


class VfioDeviceSet:
    """struct vfio_device_set: devices sharing one reset domain, keyed by ``set_id``."""

    def __init__(self, set_id: object, label: str) -> None:
        self.set_id = set_id
        self.label = label  # "bus 0000:01", "slot 0000:05:00", "dev 0000:00:02.0"
        self.device_list: list[VfioDevice] = []


def vfio_assign_device_set(vfio: Vfio, device: VfioDevice, set_id: object, label: str) -> None:
    """Models vfio_assign_device_set(): find or create the set for ``set_id``, append."""
    for ds in vfio.dev_sets:
        if ds.set_id is set_id:
            break
    else:
        ds = VfioDeviceSet(set_id, label)
        vfio.dev_sets.append(ds)
    ds.device_list.append(device)
    device.dev_set = ds


def vfio_find_device_in_devset(dev_set: VfioDeviceSet, pdev: PciDev) -> VfioDevice | None:
    """Models vfio_find_device_in_devset()."""
    for d in dev_set.device_list:
        if d.pdev is pdev:
            return d
    return None


def vfio_device_set_open_count(dev_set: VfioDeviceSet) -> int:
    """Models vfio_device_set_open_count()."""
    return sum(d.open_count for d in dev_set.device_list)


# --------------------------------------------------------------------------
# vfio_device
# --------------------------------------------------------------------------


class VfioDevice:
    """struct vfio_device. The bus driver (vfio-pci) overrides the ops methods."""

    def __init__(self, vfio: Vfio, pdev: PciDev, index: int, group: VfioGroup) -> None:
        self.vfio = vfio
        self.pdev = pdev
        self.index = index
        self.group = group
        self.dev_set: VfioDeviceSet = VfioDeviceSet(self, "")
        self.open_count = 0
        self.cdev_opened = False
        self.iommufd_device: Any = None  # IommufdDevice while bound
        self.iommufd_ictx: Any = None  # its IommufdCtx
        self.iommufd_attached = False
        self.pt_id: int | None = None  # hwpt id while attached (for describe)
        self.opener_pid: int | None = None  # pid of the first opener (describe)
        #: the cdev files currently open on /dev/vfio/devices/vfioN
        self.cdev_files: list[VfioDeviceFile] = []
        #: vfio_unregister_group_dev() has dropped the driver's registration
        #: reference: new opens fail (vfio_device_try_get_registration)
        self.unregistering = False
        #: ops->request calls made while waiting for the device to be released
        self.request_count = 0

    @property
    def name(self) -> str:
        return self.pdev.name

    @property
    def iommu_group(self) -> IommuGroup | None:
        return self.group.iommu_group

    # -- vfio_device_ops ----------------------------------------------------
    def open_device(self, task: Task | None) -> None:
        """ops->open_device."""

    def request(self, count: int) -> None:
        """ops->request: ask the user to release the device (``count``: 0, 1, ...)."""

    def close_device(self, task: Task | None) -> None:
        """ops->close_device."""

    def ioctl(self, df: VfioDeviceFile, task: Task, cmd: int, arg: int) -> int:
        """ops->ioctl."""
        raise KernelError(errno.ENOTTY)

    def read(self, task: Task, offset: int, size: int) -> bytes:
        raise KernelError(errno.EINVAL)

    def write(self, task: Task, offset: int, data: bytes) -> int:
        raise KernelError(errno.EINVAL)

    def device_feature(self, task: Task, flags: int, arg: int, argsz: int) -> int:
        """ops->device_feature; a driver without one answers EINVAL (vfio_ioctl_device_feature)."""
        raise KernelError(errno.EINVAL)

    #: the driver has ops->match_token_uuid (vfio_df_check_token asks it even without a token)
    has_match_token = False

    def match_token(self, token: bytes | None) -> None:
        """ops->match_token_uuid (``token`` None: BIND without VFIO_DEVICE_BIND_FLAG_TOKEN).

        A driver without the op: vfio_df_check_token() refuses a token with
        EINVAL and accepts its absence."""
        if token is not None:
            raise KernelError(errno.EINVAL, "this device takes no token")

    def match(self, buf: str) -> int:
        """ops->match: 1 match, 0 no match; KernelError for a malformed token."""
        return 1 if buf == self.pdev.name else 0

    @property
    def has_mig_ops(self) -> bool:
        return False

    @property
    def has_log_ops(self) -> bool:
        return False


# --------------------------------------------------------------------------
# Device files
# --------------------------------------------------------------------------


class VfioDeviceFile(File):
    """struct vfio_device_file: an open device, from the cdev or from a group."""

    kind = FileKind.DEVICE

    def __init__(self, device: VfioDevice, group: VfioGroup | None, pid: int | None) -> None:
        self.device = device
        self.group = group  # non-None for a group-derived fd
        self.iommufd: Any = None  # IommufdCtx (cdev: holds a reference while bound)
        self.devid = 0
        self.access_granted = False
        self.released = False
        self.pid = pid
        self.label = f"vfio{device.index}" if group is None else f"{device.name}"

    def __repr__(self) -> str:
        how = "cdev" if self.group is None else "group"
        return f"<VfioDeviceFile {self.device.name} {how} access={self.access_granted}>"

    def ioctl(self, task: Task, cmd: int, arg: int) -> int:
        """Models vfio_device_fops_unl_ioctl()."""
        from fakedev.kernel.vfio import device_cdev

        if self.released:
            raise KernelError(errno.EBADF)
        if cmd == IO.VFIO_DEVICE_BIND_IOMMUFD:
            return device_cdev.vfio_df_ioctl_bind_iommufd(self, task, arg)
        if not self.access_granted:
            raise KernelError(errno.EINVAL, "device fd not bound")
        if self.group is None:
            if cmd == IO.VFIO_DEVICE_ATTACH_IOMMUFD_PT:
                return device_cdev.vfio_df_ioctl_attach_pt(self, task, arg)
            if cmd == IO.VFIO_DEVICE_DETACH_IOMMUFD_PT:
                return device_cdev.vfio_df_ioctl_detach_pt(self, task, arg)
        if cmd == IO.VFIO_DEVICE_FEATURE:
            return vfio_ioctl_device_feature(self.device, task, arg)
        return self.device.ioctl(self, task, cmd, arg)

    def read(self, task: Task, offset: int, size: int) -> bytes:
        """Models vfio_device_fops_read()."""
        if self.released:
            raise KernelError(errno.EBADF)
        if not self.access_granted:
            raise KernelError(errno.EINVAL)
        return self.device.read(task, offset, size)

    def write(self, task: Task, offset: int, data: bytes) -> int:
        """Models vfio_device_fops_write()."""
        if self.released:
            raise KernelError(errno.EBADF)
        if not self.access_granted:
            raise KernelError(errno.EINVAL)
        return self.device.write(task, offset, data)

    def release(self) -> None:
        """Models vfio_device_fops_release()."""
        from fakedev.kernel.vfio import device_cdev, group

        if self.released:
            return
        self.released = True
        if self.group is not None:
            group.vfio_df_group_close(self)
        else:
            device_cdev.vfio_df_unbind_iommufd(self)
            if self in self.device.cdev_files:
                self.device.cdev_files.remove(self)
        vfio_device_put_registration(self.device)


def vfio_device_registration_held(device: VfioDevice) -> bool:
    """True while a file holds a registration reference (group-derived opens, cdev fds)."""
    return device.open_count > 0 or bool(device.cdev_files)


def vfio_device_try_get_registration(device: VfioDevice) -> bool:
    """Models vfio_device_try_get_registration(): fails once unregistration began."""
    return not device.unregistering


def vfio_device_put_registration(device: VfioDevice) -> None:
    """Models vfio_device_put_registration(): the last put completes an unregistration."""
    if device.unregistering and not vfio_device_registration_held(device):
        hook = device.vfio.on_registration_released
        if hook is not None:
            hook(device)


def vfio_df_open(df: VfioDeviceFile, task: Task | None) -> None:
    """Models vfio_df_open(): single open on the cdev path, counted on the group path."""
    from fakedev.kernel.vfio import group as vgroup
    from fakedev.kernel.vfio import iommufd as viommufd

    device = df.device
    if device.open_count != 0 and df.group is None:
        raise KernelError(errno.EINVAL, "device already open")
    if device.open_count == 0:
        # vfio_df_device_first_open()
        if df.iommufd is not None:
            df.devid = viommufd.vfio_df_iommufd_bind(df)
        else:
            vgroup.vfio_device_group_use_iommu(device, task)
        try:
            device.open_device(task)
        except KernelError:
            if df.iommufd is not None:
                viommufd.vfio_df_iommufd_unbind(df)
            else:
                vgroup.vfio_device_group_unuse_iommu(device)
            raise
        device.opener_pid = task.pid if task is not None else None
    device.open_count += 1


def vfio_df_close(df: VfioDeviceFile, task: Task | None) -> None:
    """Models vfio_df_close() / vfio_df_device_last_close()."""
    from fakedev.kernel.vfio import group as vgroup
    from fakedev.kernel.vfio import iommufd as viommufd

    device = df.device
    if device.open_count == 0:
        return
    if device.open_count == 1:
        device.close_device(task)
        if df.iommufd is not None:
            viommufd.vfio_df_iommufd_unbind(df)
        else:
            vgroup.vfio_device_group_unuse_iommu(device)
        device.opener_pid = None
    device.open_count -= 1


# --------------------------------------------------------------------------
# VFIO_DEVICE_FEATURE
# --------------------------------------------------------------------------

_CORE_MIG_FEATURES = frozenset({C.VFIO_DEVICE_FEATURE_MIGRATION, C.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
                                C.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE})
_CORE_LOG_FEATURES = frozenset({C.VFIO_DEVICE_FEATURE_DMA_LOGGING_START, C.VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
                                C.VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT})


def vfio_ioctl_device_feature(device: VfioDevice, task: Task, arg: int) -> int:
    """Models vfio_ioctl_device_feature(): header checks, then core or driver feature."""
    lay = S.VFIO_DEVICE_FEATURE
    minsz = lay.offsetofend("flags")
    hdr = lay.unpack(task.read(arg, minsz))
    if hdr["argsz"] < minsz:
        raise KernelError(errno.EINVAL)
    flags = hdr["flags"]
    allowed = C.VFIO_DEVICE_FEATURE_MASK | C.VFIO_DEVICE_FEATURE_GET | C.VFIO_DEVICE_FEATURE_SET \
        | C.VFIO_DEVICE_FEATURE_PROBE
    if flags & ~allowed:
        raise KernelError(errno.EINVAL)
    getset = C.VFIO_DEVICE_FEATURE_GET | C.VFIO_DEVICE_FEATURE_SET
    if not flags & C.VFIO_DEVICE_FEATURE_PROBE and flags & getset == getset:
        raise KernelError(errno.EINVAL)
    feature = flags & C.VFIO_DEVICE_FEATURE_MASK
    if feature in _CORE_MIG_FEATURES:
        if not device.has_mig_ops:
            raise KernelError(errno.ENOTTY)
    elif feature in _CORE_LOG_FEATURES:
        if not device.has_log_ops:
            raise KernelError(errno.ENOTTY)
    return device.device_feature(task, flags, arg + minsz, hdr["argsz"] - minsz)


def vfio_check_feature(flags: int, argsz: int, supported_ops: int, minsz: int) -> bool:
    """Models vfio_check_feature(): False means PROBE succeeded (return 0 at once)."""
    if flags & (C.VFIO_DEVICE_FEATURE_GET | C.VFIO_DEVICE_FEATURE_SET) & ~supported_ops:
        raise KernelError(errno.EINVAL)
    if flags & C.VFIO_DEVICE_FEATURE_PROBE:
        return False
    if not flags & (C.VFIO_DEVICE_FEATURE_GET | C.VFIO_DEVICE_FEATURE_SET):
        raise KernelError(errno.EINVAL)
    if argsz < minsz:
        raise KernelError(errno.EINVAL)
    return True


# --------------------------------------------------------------------------
# Helpers shared by the ioctl handlers
# --------------------------------------------------------------------------


def copy_struct(task: Task, arg: int, layout: Any, minsz: int) -> dict[str, int]:
    """copy_from_user(&s, arg, minsz): the fields within ``minsz``, the rest 0."""
    return dict(layout.unpack(task.read(arg, minsz), partial=True))


def read_user_string(task: Task, addr: int, maxlen: int) -> str:
    """Models strndup_user(): EFAULT on a fault before the NUL, EINVAL if longer than maxlen."""
    out = bytearray()
    page = 4096
    while True:
        chunk = page - (addr % page)
        want = min(chunk, maxlen + 1 - len(out))
        if want <= 0:
            raise KernelError(errno.EINVAL, "string too long")
        data = task.read(addr, want)
        nul = data.find(b"\0")
        if nul >= 0:
            out += data[:nul]
            if len(out) + 1 > maxlen:
                raise KernelError(errno.EINVAL, "string too long")
            return out.decode("latin-1")
        out += data
        addr += want
        if len(out) >= maxlen:
            raise KernelError(errno.EINVAL, "string too long")
