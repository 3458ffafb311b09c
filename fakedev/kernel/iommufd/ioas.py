"""IOAS objects and their ioctls (drivers/iommu/iommufd/ioas.c).

Lives here: ``Ioas`` (an object owning an ``IoPagetable`` and the list of
HWPTs built on it) and the handlers for IOAS_ALLOC, ALLOW_IOVAS,
IOVA_RANGES, MAP, MAP_FILE, COPY, UNMAP, OPTION(HUGE_PAGES) and
CHANGE_PROCESS. Interval bookkeeping is in ``io_pagetable.py``.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from fakedev.kernel.errors import KernelError
from fakedev.kernel.file import File
from fakedev.kernel.iommufd.io_pagetable import (
    IOMMU_READ,
    IOMMU_WRITE,
    ULONG_MAX,
    DmaPiece,
    IoPagetable,
    Pages,
)
from fakedev.kernel.iommufd.main import IommufdCtx, IommufdObject, ObjType, Ucmd
from fakedev.kernel.task import ForeignKind, Task
from fakedev.uapi import consts as C
from fakedev.uapi import structs as S

if TYPE_CHECKING:
    from fakedev.kernel.iommufd.hw_pagetable import HwPagetable

MAP_FLAGS = C.IOMMU_IOAS_MAP_FIXED_IOVA | C.IOMMU_IOAS_MAP_WRITEABLE | C.IOMMU_IOAS_MAP_READABLE


class Ioas(IommufdObject):
    """struct iommufd_ioas."""

    type = ObjType.IOAS

    def __init__(self, ictx: IommufdCtx) -> None:
        super().__init__(ictx)
        self.iopt = IoPagetable()
        self.hwpts: list[HwPagetable] = []

    def __repr__(self) -> str:
        return f"<Ioas {self.obj_id}>"

    def destroy(self) -> None:
        """Models iommufd_ioas_destroy(): every mapping goes."""
        self.iopt.unmap_all()


def iommufd_ioas_alloc(ictx: IommufdCtx) -> Ioas:
    """Models iommufd_ioas_alloc(): a new, finalized IOAS."""
    ioas = Ioas(ictx)
    ictx.obj_alloc(ioas)
    return ioas


def iommufd_ioas_alloc_ioctl(ucmd: Ucmd) -> int:
    """Models iommufd_ioas_alloc_ioctl()."""
    if ucmd.cmd["flags"]:
        raise KernelError(errno.EOPNOTSUPP, "flags must be 0")
    ioas = iommufd_ioas_alloc(ucmd.ictx)
    ucmd.cmd["out_ioas_id"] = ioas.obj_id
    try:
        ucmd.respond()
    except KernelError:
        ucmd.ictx.obj_abort(ioas)
        raise
    return 0


def iommufd_ioas_iova_ranges(ucmd: Ucmd) -> int:
    """Models iommufd_ioas_iova_ranges(): EMSGSIZE after responding when too small."""
    cmd = ucmd.cmd
    if cmd["__reserved"]:
        raise KernelError(errno.EOPNOTSUPP, "__reserved set")
    ioas = ucmd.ictx.get_ioas(cmd["ioas_id"])
    max_iovas = cmd["num_iovas"]
    ranges = ioas.iopt.iova_ranges()
    for i, (start, last) in enumerate(ranges[:max_iovas]):
        ucmd.task.write(cmd["allowed_iovas"] + i * S.IOMMU_IOVA_RANGE.size,
                        S.IOMMU_IOVA_RANGE.pack(start=start, last=last))
    cmd["num_iovas"] = len(ranges)
    cmd["out_iova_alignment"] = ioas.iopt.iova_alignment
    ucmd.respond()
    if len(ranges) > max_iovas:
        raise KernelError(errno.EMSGSIZE, f"{len(ranges)} ranges, room for {max_iovas}")
    return 0


def iommufd_ioas_allow_iovas(ucmd: Ucmd) -> int:
    """Models iommufd_ioas_allow_iovas(): replaces the allowed list atomically."""
    cmd = ucmd.cmd
    if cmd["__reserved"]:
        raise KernelError(errno.EOPNOTSUPP, "__reserved set")
    ioas = ucmd.ictx.get_ioas(cmd["ioas_id"])
    ranges: list[tuple[int, int]] = []
    for i in range(cmd["num_iovas"]):
        raw = ucmd.task.read(cmd["allowed_iovas"] + i * S.IOMMU_IOVA_RANGE.size, S.IOMMU_IOVA_RANGE.size)
        r = S.IOMMU_IOVA_RANGE.unpack(raw)
        if r["start"] >= r["last"]:
            raise KernelError(errno.EINVAL, "range start >= last")
        if any(s <= r["last"] and r["start"] <= la for s, la in ranges):
            raise KernelError(errno.EINVAL, "allowed ranges overlap")
        ranges.append((r["start"], r["last"]))
    ioas.iopt.set_allow_iova(ranges)
    return 0


def conv_iommu_prot(flags: int) -> int:
    """Models conv_iommu_prot()."""
    prot = 0
    if flags & C.IOMMU_IOAS_MAP_WRITEABLE:
        prot |= IOMMU_WRITE
    if flags & C.IOMMU_IOAS_MAP_READABLE:
        prot |= IOMMU_READ
    return prot


def iopt_map_user_pages(ioas: Ioas, task: Task, iova: int | None, uptr: int, length: int, prot: int) -> int:
    """Models iopt_map_user_pages() (iopt_alloc_pages checks, then iopt_map_pages).

    With a domain attached the pages are pinned as they are mapped, so an
    unmapped (or, for a writeable map, read-only) user range gives EFAULT;
    without one pinning waits for the first attach (iopt_fill_domain).
    """
    if not length:
        raise KernelError(errno.EINVAL, "zero length")
    if uptr + length - 1 > ULONG_MAX:
        raise KernelError(errno.EOVERFLOW, "user_va + length wraps")
    pages = Pages(length, bool(prot & IOMMU_WRITE), pid=task.pid, uptr=uptr, task=task)
    return ioas.iopt.map_pages([(pages, 0, length)], iova, prot, pin=True)


def _map_checks(ucmd: Ucmd) -> tuple[Ioas, int, int | None]:
    """The checks IOAS_MAP and IOAS_MAP_FILE share, in the kernel's order."""
    cmd = ucmd.cmd
    if cmd["flags"] & ~MAP_FLAGS or cmd.get("__reserved", 0):
        raise KernelError(errno.EOPNOTSUPP, "unknown flags or __reserved set")
    if cmd["iova"] >= ULONG_MAX or cmd["length"] >= ULONG_MAX:
        raise KernelError(errno.EOVERFLOW, "iova or length >= ULONG_MAX")
    prot = conv_iommu_prot(cmd["flags"])
    if not prot:
        raise KernelError(errno.EINVAL, "neither READABLE nor WRITEABLE")
    ioas = ucmd.ictx.get_ioas(cmd["ioas_id"])
    iova = cmd["iova"] if cmd["flags"] & C.IOMMU_IOAS_MAP_FIXED_IOVA else None
    return ioas, prot, iova


def _respond_mapped(ucmd: Ucmd, iova: int) -> None:
    """Report the IOVA; a fault here leaves the mapping in place, as in the kernel."""
    ucmd.cmd["iova"] = iova
    ucmd.respond()


def iommufd_ioas_map(ucmd: Ucmd) -> int:
    """Models iommufd_ioas_map()."""
    ioas, prot, iova = _map_checks(ucmd)
    cmd = ucmd.cmd
    got = iopt_map_user_pages(ioas, ucmd.task, iova, cmd["user_va"], cmd["length"], prot)
    _respond_mapped(ucmd, got)
    return 0


def iommufd_ioas_map_file(ucmd: Ucmd) -> int:
    """Models iommufd_ioas_map_file(): the fd must be a memfd-like foreign file."""
    ioas, prot, iova = _map_checks(ucmd)
    cmd = ucmd.cmd
    fd = cmd["fd"]
    if fd < 0:
        raise KernelError(errno.EBADF, "negative fd")
    f = ucmd.task.fget(fd)
    if isinstance(f, File) or f.kind is not ForeignKind.OTHER:
        if not isinstance(f, File):
            f.close()
        raise KernelError(errno.EINVAL, "fd is not a file that can be pinned")
    length, start = cmd["length"], cmd["start"]
    try:
        if not length:
            raise KernelError(errno.EINVAL, "zero length")
        if start + length - 1 > ULONG_MAX:
            raise KernelError(errno.EOVERFLOW, "start + length wraps")
        pages = Pages(length, bool(prot & IOMMU_WRITE), pid=ucmd.task.pid, file=f, start=start)
        got = ioas.iopt.map_pages([(pages, 0, length)], iova, prot)
    except KernelError:
        f.close()
        raise
    _respond_mapped(ucmd, got)
    return 0


def iommufd_ioas_copy(ucmd: Ucmd) -> int:
    """Models iommufd_ioas_copy(): share the source's pages at a new IOVA."""
    cmd, ictx = ucmd.cmd, ucmd.ictx
    if cmd["flags"] & ~MAP_FLAGS:
        raise KernelError(errno.EOPNOTSUPP, "unknown flags")
    if cmd["length"] >= ULONG_MAX or cmd["src_iova"] >= ULONG_MAX or cmd["dst_iova"] >= ULONG_MAX:
        raise KernelError(errno.EOVERFLOW, "length or iova >= ULONG_MAX")
    prot = conv_iommu_prot(cmd["flags"])
    if not prot:
        raise KernelError(errno.EINVAL, "neither READABLE nor WRITEABLE")
    src = ictx.get_ioas(cmd["src_ioas_id"])
    elems = src.iopt.get_pages(cmd["src_iova"], cmd["length"])
    dst = ictx.get_ioas(cmd["dst_ioas_id"])
    iova = cmd["dst_iova"] if cmd["flags"] & C.IOMMU_IOAS_MAP_FIXED_IOVA else None
    got = dst.iopt.map_pages([(p, off, n) for p, off, n, _ in elems], iova, prot)
    cmd["dst_iova"] = got
    ucmd.respond()  # a fault leaves the copy mapped, as in the kernel
    return 0


def iommufd_ioas_unmap(ucmd: Ucmd) -> int:
    """Models iommufd_ioas_unmap(): ``length`` := bytes unmapped."""
    cmd = ucmd.cmd
    ioas = ucmd.ictx.get_ioas(cmd["ioas_id"])
    if cmd["iova"] == 0 and cmd["length"] == (1 << 64) - 1:
        unmapped = ioas.iopt.unmap_all()
    else:
        if cmd["iova"] >= ULONG_MAX or cmd["length"] >= ULONG_MAX:
            raise KernelError(errno.EOVERFLOW, "iova or length >= ULONG_MAX")
        unmapped = ioas.iopt.unmap_iova(cmd["iova"], cmd["length"])
    cmd["length"] = unmapped
    ucmd.respond()
    return 0


def iommufd_ioas_option(ucmd: Ucmd) -> None:
    """Models iommufd_ioas_option() (IOMMU_OPTION_HUGE_PAGES)."""
    cmd = ucmd.cmd
    ioas = ucmd.ictx.get_ioas(cmd["object_id"])
    if cmd["op"] == C.IOMMU_OPTION_OP_GET:
        cmd["val64"] = 0 if ioas.iopt.disable_large_pages else 1
        return
    if cmd["op"] == C.IOMMU_OPTION_OP_SET:
        if cmd["val64"] not in (0, 1):
            raise KernelError(errno.EINVAL, "val64 must be 0 or 1")
        ioas.iopt.set_large_pages(cmd["val64"] == 1)
        return
    raise KernelError(errno.EOPNOTSUPP, "unknown op")


def iommufd_ioas_change_process(ucmd: Ucmd) -> int:
    """Models iommufd_ioas_change_process(): file-backed pages move to the caller."""
    if ucmd.cmd["__reserved"]:
        raise KernelError(errno.EOPNOTSUPP, "__reserved set")
    for obj in ucmd.ictx.objects.values():
        if isinstance(obj, Ioas):
            obj.iopt.change_process(ucmd.task.pid)
    return 0


def iommufd_translate(ictx: IommufdCtx, ioas_id: int, iova: int, length: int) -> list[DmaPiece]:
    """What backs [iova, iova+length) of IOAS ``ioas_id`` (for DMA emulation)."""
    return ictx.get_ioas(ioas_id).iopt.translate(iova, length)
