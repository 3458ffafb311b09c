"""The iommufd context, its object table and ioctl dispatch (iommufd/main.c).

Lives here: ``IommufdCtx`` (one per open of /dev/iommu; refcounted), the
object table (IDs 1..INT_MAX, lowest free first, one namespace for every
kind), ``IommufdFile``, the ioctl core (``iommufd_fops_ioctl``: size header,
E2BIG, respond), IOMMU_DESTROY and IOMMU_OPTION's RLIMIT_MODE. The per-op
handlers live beside the kernel functions they model (``ioas.py``,
``hw_pagetable.py``, ``device.py``, ``vfio_compat.py``).
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Callable
from typing import TYPE_CHECKING

from attrs import define, frozen

from fakedev.kernel.errors import ENOIOCTLCMD, KernelError
from fakedev.kernel.file import File
from fakedev.kernel.task import Task
from fakedev.kernel.uaccess import copy_struct_from_user
from fakedev.kernel.version import NEWEST, KernelVersion
from fakedev.uapi import consts as C
from fakedev.uapi import ioctls as I
from fakedev.uapi import structs as S
from fakedev.uapi.ioctls import FileKind
from fakedev.uapi.layout import Layout

if TYPE_CHECKING:
    from fakedev.kernel.iommufd.device import IommufdDevice, IommufdGroup
    from fakedev.kernel.iommufd.hw_pagetable import HwPagetable
    from fakedev.kernel.iommufd.ioas import Ioas

INT_MAX = 0x7FFFFFFF
CAP_SYS_RESOURCE = 24


class ObjType(enum.Enum):
    """enum iommufd_object_type (the kinds this model has)."""

    DEVICE = "device"
    HWPT_PAGING = "hwpt_paging"
    IOAS = "ioas"


class IommufdObject:
    """struct iommufd_object: ``obj_id`` in the table, ``users`` refcount.

    ``users`` starts at 1 (the table's own reference); IOMMU_DESTROY and
    teardown only destroy an object whose users is exactly 1.
    """

    type: ObjType

    def __init__(self, ictx: IommufdCtx) -> None:
        self.ictx = ictx
        self.obj_id = 0  # 0 until allocated
        self.users = 1

    def destroy(self) -> None:
        """iommufd_object_ops[type].destroy: undo what the object holds."""


class IommufdCtx:
    """struct iommufd_ctx."""

    def __init__(self, version: KernelVersion = NEWEST, *, account_mm: bool = False) -> None:
        self.version = version
        self.refs = 1  # the file's reference
        self.objects: dict[int, IommufdObject] = {}
        self.vfio_ioas: Ioas | None = None
        self.igroups: dict[int, IommufdGroup] = {}  # iommu group id -> record
        self.account_mm = account_mm  # IOPT_PAGES_ACCOUNT_MM (else _USER)
        self.no_iommu_mode = False
        self.dead = False

    def __repr__(self) -> str:
        return f"<IommufdCtx refs={self.refs} objects={sorted(self.objects)}>"

    # -- lifetime --------------------------------------------------------------
    def get(self) -> IommufdCtx:
        """Models iommufd_ctx_get(): one more reference."""
        if self.dead:
            raise KernelError(errno.EBADFD, "iommufd context already released")
        self.refs += 1
        return self

    def put(self) -> None:
        """Models iommufd_ctx_put(); the last reference destroys everything."""
        if self.refs <= 0:
            raise AssertionError("iommufd context put below zero")
        self.refs -= 1
        if self.refs == 0:
            self._release()

    def _release(self) -> None:
        """Models iommufd_fops_release(): destroy objects leaf-first."""
        from fakedev.kernel.iommufd.device import IommufdDevice, iommufd_device_unbind

        for obj in list(self.objects.values()):  # defensive: nothing should be bound
            if isinstance(obj, IommufdDevice):
                self.refs += 1  # the device's reference, dropped by unbind
                iommufd_device_unbind(obj)
                self.refs -= 1
        while self.objects:
            destroyed = 0
            for obj in list(self.objects.values()):
                if obj.users != 1:
                    continue
                obj.users = 0
                del self.objects[obj.obj_id]
                obj.destroy()
                destroyed += 1
            if not destroyed:
                break  # a refcount bug; check_invariants reports it
        self.vfio_ioas = None
        self.dead = True

    # -- object table ------------------------------------------------------------
    def obj_alloc(self, obj: IommufdObject) -> int:
        """Models iommufd_object_alloc()+finalize: the lowest free ID in 1..INT_MAX."""
        oid = 1
        while oid in self.objects:
            oid += 1
        if oid > INT_MAX:
            raise KernelError(errno.ENOSPC, "iommufd object IDs exhausted")
        obj.obj_id = oid
        self.objects[oid] = obj
        return oid

    def obj_abort(self, obj: IommufdObject) -> None:
        """Models iommufd_object_abort(): the ID is free again, nothing destroyed."""
        if self.objects.get(obj.obj_id) is obj:
            del self.objects[obj.obj_id]
        obj.obj_id = 0

    def obj_remove(self, obj: IommufdObject) -> None:
        """Remove and destroy ``obj`` (whose users the caller has dropped)."""
        del self.objects[obj.obj_id]
        obj.users = 0
        if self.vfio_ioas is obj:
            self.vfio_ioas = None
        obj.destroy()

    def get_object(self, obj_id: int, kind: ObjType | None = None) -> IommufdObject:
        """Models iommufd_get_object(): ENOENT for an unknown ID or the wrong kind."""
        obj = self.objects.get(obj_id)
        if obj is None or (kind is not None and obj.type is not kind):
            raise KernelError(errno.ENOENT, f"no iommufd object {obj_id}" + (f" of type {kind.value}" if kind else ""))
        return obj

    def get_ioas(self, obj_id: int) -> Ioas:
        """Models iommufd_get_ioas()."""
        from fakedev.kernel.iommufd.ioas import Ioas

        obj = self.get_object(obj_id, ObjType.IOAS)
        assert isinstance(obj, Ioas)
        return obj

    def get_device(self, obj_id: int) -> IommufdDevice:
        """Models iommufd_get_device()."""
        from fakedev.kernel.iommufd.device import IommufdDevice

        obj = self.get_object(obj_id, ObjType.DEVICE)
        assert isinstance(obj, IommufdDevice)
        return obj

    def get_hwpt(self, obj_id: int) -> HwPagetable:
        from fakedev.kernel.iommufd.hw_pagetable import HwPagetable

        obj = self.get_object(obj_id, ObjType.HWPT_PAGING)
        assert isinstance(obj, HwPagetable)
        return obj

    def describe(self) -> dict[str, object]:
        """Plain-data snapshot (for `fakedev show`)."""
        from fakedev.kernel.iommufd.device import IommufdDevice
        from fakedev.kernel.iommufd.hw_pagetable import HwPagetable
        from fakedev.kernel.iommufd.ioas import Ioas

        objs: list[dict[str, object]] = []
        for oid, obj in sorted(self.objects.items()):
            d: dict[str, object] = {"id": oid, "type": obj.type.value, "users": obj.users}
            if isinstance(obj, Ioas):
                d["mappings"] = [(a.iova, a.length, a.prot) for a in obj.iopt.areas]
                d["iova_ranges"] = obj.iopt.iova_ranges()
                d["iova_alignment"] = obj.iopt.iova_alignment
            elif isinstance(obj, HwPagetable):
                d["ioas"] = obj.ioas.obj_id
                d["auto"] = obj.auto_domain
                d["devices"] = [i.obj_id for i in obj.devices]
            elif isinstance(obj, IommufdDevice):
                d["pci"] = obj.dev.name
                d["group"] = obj.group.id
                d["hwpt"] = obj.attached_hwpt_id
            objs.append(d)
        return {
            "refs": self.refs,
            "objects": objs,
            "vfio_ioas": self.vfio_ioas.obj_id if self.vfio_ioas else None,
            "account_mode": "mm" if self.account_mm else "user",
        }


# -- the file ---------------------------------------------------------------------
class IommufdFile(File):
    """An open of /dev/iommu (iommufd_fops)."""

    kind = FileKind.IOMMUFD
    label = "iommu"

    def __init__(self, ctx: IommufdCtx) -> None:
        self.ctx = ctx
        self.released = False

    def ioctl(self, task: Task, cmd: int, arg: int) -> int:
        return iommufd_fops_ioctl(self.ctx, task, cmd, arg)

    def release(self) -> None:
        """Models iommufd_fops_release(): drops the file's reference."""
        if not self.released:
            self.released = True
            self.ctx.put()


def iommufd_fops_open(version: KernelVersion = NEWEST, *, vfio_container: bool = False) -> IommufdFile:
    """Models iommufd_fops_open(): a new context.

    ``vfio_container`` is set when iommufd serves /dev/vfio/vfio: pages are then
    accounted to the mm (RLIMIT_MODE reads 1).
    """
    return IommufdFile(IommufdCtx(version, account_mm=vfio_container))


def iommufd_ctx_from_file(f: object) -> IommufdCtx:
    """Models iommufd_ctx_from_file(): EBADFD unless ``f`` is /dev/iommu; takes a ref."""
    if not isinstance(f, IommufdFile) or f.released:
        raise KernelError(errno.EBADFD, "not an iommufd file")
    return f.ctx.get()


# -- ioctl core ---------------------------------------------------------------------
@define
class Ucmd:
    """struct iommufd_ucmd: the call being served."""

    ictx: IommufdCtx
    task: Task
    ubuffer: int
    user_size: int
    layout: Layout
    ksize: int
    cmd: dict[str, int]

    def respond(self) -> None:
        """Models iommufd_ucmd_respond(): min(user_size, ksize) bytes of the struct."""
        data = self.layout.pack(self.cmd)[: self.ksize]
        self.task.write(self.ubuffer, data[: min(self.user_size, self.ksize)])


Handler = Callable[[Ucmd], int]


@frozen
class IoctlOp:
    """One row of iommufd_ioctl_ops."""

    cmd: int
    layout: Layout
    last: str  # the field whose end is min_size
    handler: Handler
    available: Callable[[KernelVersion], bool]
    ksize_6_6: int | None = None  # sizeof(struct) before 6.7, where it grew

    def min_size(self) -> int:
        return self.layout.offsetofend(self.last)

    def ksize(self, kver: KernelVersion) -> int:
        if self.ksize_6_6 is not None and not kver.has_dirty_tracking:
            return self.ksize_6_6
        return self.layout.size


def _always(_: KernelVersion) -> bool:
    return True


_OPS: dict[int, IoctlOp] | None = None


def _ops() -> dict[int, IoctlOp]:
    """The op table, keyed by nr (built on first use: the handlers import this module)."""
    global _OPS
    if _OPS is None:
        from fakedev.kernel.iommufd import device, hw_pagetable, ioas, vfio_compat

        rows = [
            IoctlOp(I.IOMMU_DESTROY, S.IOMMU_DESTROY, "id", iommufd_destroy, _always),
            IoctlOp(I.IOMMU_IOAS_ALLOC, S.IOMMU_IOAS_ALLOC, "out_ioas_id", ioas.iommufd_ioas_alloc_ioctl, _always),
            IoctlOp(I.IOMMU_IOAS_ALLOW_IOVAS, S.IOMMU_IOAS_ALLOW_IOVAS, "allowed_iovas",
                    ioas.iommufd_ioas_allow_iovas, _always),
            IoctlOp(I.IOMMU_IOAS_COPY, S.IOMMU_IOAS_COPY, "src_iova", ioas.iommufd_ioas_copy, _always),
            IoctlOp(I.IOMMU_IOAS_IOVA_RANGES, S.IOMMU_IOAS_IOVA_RANGES, "out_iova_alignment",
                    ioas.iommufd_ioas_iova_ranges, _always),
            IoctlOp(I.IOMMU_IOAS_MAP, S.IOMMU_IOAS_MAP, "iova", ioas.iommufd_ioas_map, _always),
            IoctlOp(I.IOMMU_IOAS_UNMAP, S.IOMMU_IOAS_UNMAP, "length", ioas.iommufd_ioas_unmap, _always),
            IoctlOp(I.IOMMU_OPTION, S.IOMMU_OPTION, "val64", iommufd_option, _always),
            IoctlOp(I.IOMMU_VFIO_IOAS, S.IOMMU_VFIO_IOAS, "__reserved", vfio_compat.iommufd_vfio_ioas, _always),
            IoctlOp(I.IOMMU_HWPT_ALLOC, S.IOMMU_HWPT_ALLOC, "__reserved", hw_pagetable.iommufd_hwpt_alloc,
                    _always, S.IOMMU_HWPT_ALLOC_SIZE_6_6),
            IoctlOp(I.IOMMU_GET_HW_INFO, S.IOMMU_HW_INFO, "__reserved", device.iommufd_get_hw_info, _always,
                    S.IOMMU_HW_INFO_SIZE_6_6),
            IoctlOp(I.IOMMU_IOAS_MAP_FILE, S.IOMMU_IOAS_MAP_FILE, "iova", ioas.iommufd_ioas_map_file,
                    lambda v: v.has_map_file),
            IoctlOp(I.IOMMU_IOAS_CHANGE_PROCESS, S.IOMMU_IOAS_CHANGE_PROCESS, "__reserved",
                    ioas.iommufd_ioas_change_process, lambda v: v.has_change_process),
        ]
        _OPS = {r.cmd & 0xFF: r for r in rows}
    return _OPS


def _last_nr(kver: KernelVersion) -> int:
    """The last nr of the kernel's op table (what is past it goes to VFIO compat)."""
    if kver.has_change_process:
        return 0x92
    if kver.has_map_file:
        return 0x91  # IOMMU_VDEVICE_ALLOC
    if kver.at_least(6, 11):
        return 0x8E  # IOMMU_FAULT_QUEUE_ALLOC
    if kver.at_least(6, 8):
        return 0x8D  # IOMMU_HWPT_INVALIDATE
    if kver.has_dirty_tracking:
        return 0x8C
    return 0x8A


def iommufd_fops_ioctl(ictx: IommufdCtx, task: Task, cmd: int, arg: int) -> int:
    """Models iommufd_fops_ioctl()."""
    nr = cmd & 0xFF
    if nr < I.IOMMUFD_CMD_BASE or nr > _last_nr(ictx.version):
        from fakedev.kernel.iommufd.vfio_compat import iommufd_vfio_ioctl

        return iommufd_vfio_ioctl(ictx, task, cmd, arg)
    user_size = int.from_bytes(task.read(arg, 4), "little")
    op = _ops().get(nr)
    if op is None or not op.available(ictx.version):
        raise KernelError(ENOIOCTLCMD, f"iommufd op {nr:#x} not modelled")
    if op.cmd != cmd:
        raise KernelError(ENOIOCTLCMD, f"cmd {cmd:#x} does not match {op.cmd:#x}")
    if user_size < op.min_size():
        raise KernelError(errno.EINVAL, f"size {user_size} below {op.min_size()}")
    ksize = op.ksize(ictx.version)
    raw = copy_struct_from_user(task, ksize, arg, user_size)
    fields = op.layout.unpack(raw, partial=True)
    ucmd = Ucmd(ictx, task, arg, user_size, op.layout, ksize, fields)
    return op.handler(ucmd)


# -- handlers that live in main.c ----------------------------------------------------
def iommufd_destroy(ucmd: Ucmd) -> int:
    """Models iommufd_destroy() / iommufd_object_remove()."""
    ictx = ucmd.ictx
    obj = ictx.get_object(ucmd.cmd["id"])
    if obj.users != 1:
        raise KernelError(errno.EBUSY, f"object {obj.obj_id} is still in use")
    ictx.obj_remove(obj)
    return 0


def iommufd_option_rlimit_mode(ucmd: Ucmd) -> None:
    """Models iommufd_option_rlimit_mode()."""
    cmd, ictx = ucmd.cmd, ucmd.ictx
    if cmd["object_id"]:
        raise KernelError(errno.EOPNOTSUPP, "RLIMIT_MODE takes no object")
    if cmd["op"] == C.IOMMU_OPTION_OP_GET:
        cmd["val64"] = 1 if ictx.account_mm else 0
        return
    if cmd["op"] == C.IOMMU_OPTION_OP_SET:
        if not ucmd.task.capable(CAP_SYS_RESOURCE):
            raise KernelError(errno.EPERM, "RLIMIT_MODE SET needs CAP_SYS_RESOURCE")
        if ictx.objects:
            raise KernelError(errno.EBUSY, "context is not empty")
        if cmd["val64"] not in (0, 1):
            raise KernelError(errno.EINVAL, "val64 must be 0 or 1")
        ictx.account_mm = cmd["val64"] == 1
        return
    raise KernelError(errno.EOPNOTSUPP, "unknown op")


def iommufd_option(ucmd: Ucmd) -> int:
    """Models iommufd_option(): val64 alone is copied back on success."""
    from fakedev.kernel.iommufd.ioas import iommufd_ioas_option

    cmd = ucmd.cmd
    if cmd["__reserved"]:
        raise KernelError(errno.EOPNOTSUPP, "__reserved set")
    if cmd["option_id"] == C.IOMMU_OPTION_RLIMIT_MODE:
        iommufd_option_rlimit_mode(ucmd)
    elif cmd["option_id"] == C.IOMMU_OPTION_HUGE_PAGES:
        iommufd_ioas_option(ucmd)
    else:
        raise KernelError(errno.EOPNOTSUPP, "unknown option")
    off = S.IOMMU_OPTION.field("val64").offset
    ucmd.task.write(ucmd.ubuffer + off, cmd["val64"].to_bytes(8, "little"))
    return 0


def iommufd_check_invariants(ctx: IommufdCtx) -> list[str]:
    """[] when the context's object table and refcounts are consistent."""
    from fakedev.kernel.iommufd.device import IommufdDevice
    from fakedev.kernel.iommufd.hw_pagetable import HwPagetable
    from fakedev.kernel.iommufd.ioas import Ioas

    out: list[str] = []
    if ctx.dead:
        if ctx.objects:
            out.append(f"released iommufd context still holds objects {sorted(ctx.objects)}")
        return out
    ndev = 0
    seen: set[int] = set()
    for oid, obj in ctx.objects.items():
        if not 1 <= oid <= INT_MAX:
            out.append(f"object id {oid} outside 1..INT_MAX")
        if obj.obj_id != oid:
            out.append(f"object keyed {oid} says id {obj.obj_id}")
        if id(obj) in seen:
            out.append(f"object {oid} appears twice in the table")
        seen.add(id(obj))
        if obj.ictx is not ctx:
            out.append(f"object {oid} belongs to another context")
        if isinstance(obj, Ioas):
            want = 1 + len(obj.hwpts)
            out += obj.iopt.check_invariants(f"ioas {oid}")
        elif isinstance(obj, HwPagetable):
            want = 1 + len(obj.devices)
            if ctx.objects.get(obj.ioas.obj_id) is not obj.ioas:
                out.append(f"hwpt {oid} points at a destroyed ioas")
            if obj not in obj.ioas.hwpts:
                out.append(f"hwpt {oid} missing from its ioas's list")
            if obj.auto_domain and not obj.devices:
                out.append(f"auto hwpt {oid} has no device attached")
        elif isinstance(obj, IommufdDevice):
            ndev += 1
            want = 2 + (1 if obj.hwpt is not None else 0)
            if obj.hwpt is not None and (ctx.objects.get(obj.hwpt.obj_id) is not obj.hwpt
                                         or obj not in obj.hwpt.devices):
                out.append(f"device {oid} attached to a hwpt that does not list it")
            if not obj.group.user_owned or obj.group.owner is not ctx:
                out.append(f"device {oid}: iommu group {obj.group.id} not owned by this context")
        else:
            want = obj.users
        if obj.users != want:
            out.append(f"object {oid} ({obj.type.value}) has users {obj.users}, expected {want}")
    for gid, ig in ctx.igroups.items():
        if ig.group.id != gid or ig.bound <= 0:
            out.append(f"iommufd group record {gid} is stale")
        if (ig.hwpt is None) != (not ig.devices):
            out.append(f"iommu group {gid}: hwpt {ig.hwpt!r} with attached devices {ig.devices}")
        if ig.hwpt is not None and ig.group.domain is not ig.hwpt:
            out.append(f"iommu group {gid}: attached to hwpt {ig.hwpt.obj_id} but domain is {ig.group.domain!r}")
    if ctx.vfio_ioas is not None and ctx.objects.get(ctx.vfio_ioas.obj_id) is not ctx.vfio_ioas:
        out.append("compat ioas is not in the object table")
    if ctx.refs < ndev:
        out.append(f"context refs {ctx.refs} below its {ndev} bound devices")
    return out
