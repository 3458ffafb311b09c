"""The VFIO container interface on iommufd (drivers/iommu/iommufd/vfio_compat.c).

Lives here: the compat IOAS (``ictx.vfio_ioas``) and the calls the VFIO
group path makes on it, IOMMU_VFIO_IOAS, and ``iommufd_vfio_ioctl``: the
type1 container ioctls answered on /dev/iommu (every nr below 0x80 or past
the op table lands here).
"""

from __future__ import annotations

import errno

from fakedev.kernel.errors import ENOIOCTLCMD, KernelError
from fakedev.kernel.iommufd.hw_pagetable import DOMAIN_PGSIZE
from fakedev.kernel.iommufd.io_pagetable import IOMMU_READ, IOMMU_WRITE, PAGE_SIZE
from fakedev.kernel.iommufd.ioas import Ioas, iommufd_ioas_alloc, iopt_map_user_pages
from fakedev.kernel.iommufd.main import IommufdCtx, Ucmd
from fakedev.kernel.task import Task
from fakedev.uapi import consts as C
from fakedev.uapi import ioctls as I
from fakedev.uapi import structs as S

#: the modelled kernel is built with CONFIG_VFIO_NOIOMMU=y (as distributions are)
CONFIG_VFIO_NOIOMMU = True
CAP_SYS_RAWIO = 17

#: page sizes of the modelled VT-d domain (4K, 2M, 1G)
DOMAIN_PGSIZE_BITMAP = 0x40201000
PAGE_MASK = ~(PAGE_SIZE - 1) & ((1 << 64) - 1)
assert DOMAIN_PGSIZE == PAGE_SIZE


def get_compat_ioas(ictx: IommufdCtx) -> Ioas:
    """Models get_compat_ioas(): ENODEV until a group set the compat IOAS."""
    if ictx.vfio_ioas is None:
        raise KernelError(errno.ENODEV, "no compat IOAS (no group attached)")
    return ictx.vfio_ioas


def iommufd_vfio_compat_ioas_get_id(ictx: IommufdCtx) -> int:
    """Models iommufd_vfio_compat_ioas_get_id(): the compat IOAS's ID or ENODEV."""
    return get_compat_ioas(ictx).obj_id


def iommufd_vfio_compat_set_no_iommu(ictx: IommufdCtx) -> None:
    """Models iommufd_vfio_compat_set_no_iommu(): EINVAL once a compat IOAS exists."""
    if ictx.vfio_ioas is not None:
        raise KernelError(errno.EINVAL, "compat IOAS already exists")
    ictx.no_iommu_mode = True


def iommufd_vfio_compat_ioas_create(ictx: IommufdCtx) -> None:
    """Models iommufd_vfio_compat_ioas_create(): make the compat IOAS unless there is one."""
    if ictx.vfio_ioas is not None:
        return
    ictx.vfio_ioas = iommufd_ioas_alloc(ictx)


def iommufd_vfio_ioas(ucmd: Ucmd) -> int:
    """Models iommufd_vfio_ioas() (IOMMU_VFIO_IOAS)."""
    cmd, ictx = ucmd.cmd, ucmd.ictx
    if cmd["__reserved"]:
        raise KernelError(errno.EOPNOTSUPP, "__reserved set")
    op = cmd["op"]
    if op == C.IOMMU_VFIO_IOAS_GET:
        cmd["ioas_id"] = get_compat_ioas(ictx).obj_id
        ucmd.respond()
        return 0
    if op == C.IOMMU_VFIO_IOAS_SET:
        ictx.vfio_ioas = ictx.get_ioas(cmd["ioas_id"])
        return 0
    if op == C.IOMMU_VFIO_IOAS_CLEAR:
        ictx.vfio_ioas = None
        return 0
    raise KernelError(errno.EOPNOTSUPP, "unknown op")


def iommufd_vfio_cc_iommu(ictx: IommufdCtx) -> int:
    """Models iommufd_vfio_cc_iommu(): every domain enforces coherency here."""
    get_compat_ioas(ictx)
    return 1


def iommufd_vfio_check_extension(ictx: IommufdCtx, type_: int) -> int:
    """Models iommufd_vfio_check_extension()."""
    if type_ in (C.VFIO_TYPE1_IOMMU, C.VFIO_TYPE1v2_IOMMU, C.VFIO_UNMAP_ALL):
        return 1
    if type_ == C.VFIO_NOIOMMU_IOMMU:
        return 1 if CONFIG_VFIO_NOIOMMU else 0
    if type_ == C.VFIO_DMA_CC_IOMMU:
        return iommufd_vfio_cc_iommu(ictx)
    return 0


def iommufd_vfio_set_iommu(ictx: IommufdCtx, task: Task, type_: int) -> int:
    """Models iommufd_vfio_set_iommu(): TYPE1 turns off huge pages; NOIOMMU in no-iommu mode."""
    if CONFIG_VFIO_NOIOMMU and type_ == C.VFIO_NOIOMMU_IOMMU and ictx.no_iommu_mode:
        if not task.capable(CAP_SYS_RAWIO):
            raise KernelError(errno.EPERM, "no-iommu needs CAP_SYS_RAWIO")
        return 0
    if type_ not in (C.VFIO_TYPE1_IOMMU, C.VFIO_TYPE1v2_IOMMU) or ictx.no_iommu_mode:
        raise KernelError(errno.EINVAL, f"iommu type {type_} not supported")
    ioas = get_compat_ioas(ictx)
    if type_ == C.VFIO_TYPE1_IOMMU:
        ioas.iopt.set_large_pages(False)
    return 0


def iommufd_get_pagesizes(ioas: Ioas) -> int:
    """Models iommufd_get_pagesizes()."""
    if ioas.iopt.disable_large_pages:
        return PAGE_SIZE
    bitmap = (1 << 64) - 1
    for _ in ioas.iopt.domains:
        bitmap &= DOMAIN_PGSIZE_BITMAP
    if bitmap & ~PAGE_MASK:
        bitmap = (bitmap & PAGE_MASK) | PAGE_SIZE
    return max(bitmap, ioas.iopt.iova_alignment)


def iommufd_vfio_iommu_get_info(ictx: IommufdCtx, task: Task, arg: int) -> int:
    """Models iommufd_vfio_iommu_get_info(): DMA_AVAIL then IOVA_RANGE caps, 8-aligned."""
    L = S.VFIO_IOMMU_TYPE1_INFO
    minsz = L.offsetofend("iova_pgsizes")
    info = L.unpack(task.read(arg, minsz), partial=True)
    argsz = info["argsz"]
    if argsz < minsz:
        raise KernelError(errno.EINVAL, "argsz too small")
    minsz = min(argsz, L.size)
    ioas = get_compat_ioas(ictx)
    info["flags"] = C.VFIO_IOMMU_INFO_PGSIZES
    info["iova_pgsizes"] = iommufd_get_pagesizes(ioas)
    info["cap_offset"] = 0
    ranges = ioas.iopt.iova_ranges()

    def fill_iova(cur: int, avail: int) -> int:
        hdr = S.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE
        rl = S.VFIO_IOVA_RANGE
        for i, (s, last) in enumerate(ranges):
            if avail >= hdr.size + rl.size * (i + 1):
                task.write(cur + hdr.size + i * rl.size, rl.pack(start=s, end=last))
        size = hdr.size + rl.size * len(ranges)
        if avail >= size:
            task.write(cur, hdr.pack(id=C.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, version=1, nr_iovas=len(ranges)))
        return size

    def fill_dma_avail(cur: int, avail: int) -> int:
        cap = S.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL
        if avail >= cap.size:
            task.write(cur, cap.pack(id=C.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, version=1, avail=0xFFFFFFFF))
        return cap.size

    total = L.size
    last_cap: int | None = None
    for fill in (fill_dma_avail, fill_iova):
        if argsz > total:
            size = fill(arg + total, argsz - total)
        else:
            size = fill(0, 0)
        size = (size + 7) // 8 * 8
        if last_cap is not None and argsz >= total:
            task.write(last_cap + 4, total.to_bytes(4, "little"))
        last_cap = arg + total
        total += size
    if argsz >= total:
        info["cap_offset"] = L.size
    info["argsz"] = total
    info["flags"] |= C.VFIO_IOMMU_INFO_CAPS
    task.write(arg, L.pack(info)[:minsz])
    return 0


def iommufd_vfio_map_dma(ictx: IommufdCtx, task: Task, arg: int) -> int:
    """Models iommufd_vfio_map_dma(): always a fixed IOVA in the compat IOAS."""
    L = S.VFIO_IOMMU_TYPE1_DMA_MAP
    minsz = L.offsetofend("size")
    m = L.unpack(task.read(arg, minsz))
    if m["argsz"] < minsz or m["flags"] & ~(C.VFIO_DMA_MAP_FLAG_READ | C.VFIO_DMA_MAP_FLAG_WRITE):
        raise KernelError(errno.EINVAL, "argsz too small or unsupported flags")
    prot = (IOMMU_READ if m["flags"] & C.VFIO_DMA_MAP_FLAG_READ else 0) | (
        IOMMU_WRITE if m["flags"] & C.VFIO_DMA_MAP_FLAG_WRITE else 0
    )
    ioas = get_compat_ioas(ictx)
    iopt_map_user_pages(ioas, task, m["iova"], m["vaddr"], m["size"], prot)
    return 0


def iommufd_vfio_unmap_dma(ictx: IommufdCtx, task: Task, arg: int) -> int:
    """Models iommufd_vfio_unmap_dma(): ``size`` := bytes unmapped."""
    L = S.VFIO_IOMMU_TYPE1_DMA_UNMAP
    minsz = L.offsetofend("size")
    u = L.unpack(task.read(arg, minsz))
    if u["argsz"] < minsz or u["flags"] & ~C.VFIO_DMA_UNMAP_FLAG_ALL:
        raise KernelError(errno.EINVAL, "argsz too small or unsupported flags")
    ioas = get_compat_ioas(ictx)
    if u["flags"] & C.VFIO_DMA_UNMAP_FLAG_ALL:
        if u["iova"] or u["size"]:
            raise KernelError(errno.EINVAL, "UNMAP_ALL needs iova and size 0")
        unmapped = ioas.iopt.unmap_all()
    else:
        if ioas.iopt.disable_large_pages:
            cuts = [u["iova"] + u["size"] - 1]
            if u["iova"]:
                cuts.append(u["iova"] - 1)
            ioas.iopt.cut([c & ((1 << 64) - 1) for c in cuts])
        unmapped = ioas.iopt.unmap_iova(u["iova"], u["size"])
    u["size"] = unmapped
    task.write(arg, L.pack(u)[:minsz])
    return 0


def iommufd_vfio_ioctl(ictx: IommufdCtx, task: Task, cmd: int, arg: int) -> int:
    """Models iommufd_vfio_ioctl(): the container calls; anything else ENOTTY."""
    if cmd == I.VFIO_GET_API_VERSION:
        return C.VFIO_API_VERSION
    if cmd == I.VFIO_SET_IOMMU:
        return iommufd_vfio_set_iommu(ictx, task, arg)
    if cmd == I.VFIO_CHECK_EXTENSION:
        return iommufd_vfio_check_extension(ictx, arg)
    if cmd == I.VFIO_IOMMU_GET_INFO:
        return iommufd_vfio_iommu_get_info(ictx, task, arg)
    if cmd == I.VFIO_IOMMU_MAP_DMA:
        return iommufd_vfio_map_dma(ictx, task, arg)
    if cmd == I.VFIO_IOMMU_UNMAP_DMA:
        return iommufd_vfio_unmap_dma(ictx, task, arg)
    raise KernelError(ENOIOCTLCMD, f"cmd {cmd:#x} is not an iommufd or VFIO container call")
