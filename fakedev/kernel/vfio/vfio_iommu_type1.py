"""The legacy type1 IOMMU driver behind a container.

Mirrors drivers/vfio/vfio_iommu_type1.c: CHECK_EXTENSION, open (VFIO_SET_IOMMU),
group attach, VFIO_IOMMU_GET_INFO with its capability chain, MAP_DMA and
UNMAP_DMA (v2 semantics for TYPE1v2). Mappings record the mapping process and
its vaddr range (pinning is modelled as a mapped-pages check, EFAULT);
``translate`` resolves an IOVA range for device DMA (``fakedev.kernel.dma``).
Not here: dirty tracking (VFIO_IOMMU_DIRTY_PAGES answers ENOTTY).
"""

from __future__ import annotations

import errno

from attrs import define, field

from fakedev.kernel.errors import KernelError
from fakedev.kernel.iommu import IommuGroup
from fakedev.kernel.iommufd.io_pagetable import DmaPiece
from fakedev.kernel.task import Task
from fakedev.kernel.version import KernelVersion
from fakedev.uapi import consts as C
from fakedev.uapi import ioctls as IO
from fakedev.uapi import structs as S

#: what an Intel VT-d domain offers: 4K | 2M | 1G
TYPE1_PGSIZE_BITMAP = 0x1000 | 0x200000 | 0x40000000
#: domain aperture (48-bit address width) minus the x86 MSI window
TYPE1_IOVA_RANGES: tuple[tuple[int, int], ...] = ((0, 0xFEDFFFFF), (0xFEF00000, (1 << 48) - 1))
DMA_ENTRY_LIMIT = 65535
DIRTY_BITMAP_SIZE_MAX = 0x10000000


def type1_check_extension(iommu: VfioIommuType1 | None, arg: int, version: KernelVersion) -> int:
    """Models vfio_iommu_type1_check_extension()."""
    if arg in (C.VFIO_TYPE1_IOMMU, C.VFIO_TYPE1v2_IOMMU, C.VFIO_UNMAP_ALL):
        return 1
    if arg == C.VFIO_TYPE1_NESTING_IOMMU:
        return 1 if version.type1_has_nesting else 0
    if arg == C.VFIO_UPDATE_VADDR:
        return 1 if iommu is not None else 0
    if arg == C.VFIO_DMA_CC_IOMMU:
        return 1 if iommu is not None and iommu.groups else 0
    return 0


@define
class VfioDma:
    iova: int
    size: int
    vaddr: int
    prot: int
    vaddr_invalid: bool = False
    pid: int = 0  # the process whose memory backs the mapping (dma->task)
    task: Task | None = field(default=None, eq=False, repr=False)  # the caller that made it (DmaPiece.owner)


class VfioIommuType1:
    """struct vfio_iommu."""

    def __init__(self, v2: bool, nesting: bool, version: KernelVersion) -> None:
        self.v2 = v2
        self.nesting = nesting
        self.version = version
        self.groups: list[IommuGroup] = []
        self.dmas: dict[int, VfioDma] = {}
        self.dma_avail = DMA_ENTRY_LIMIT
        self.pgsize_bitmap = TYPE1_PGSIZE_BITMAP

    @classmethod
    def open(cls, arg: int, version: KernelVersion) -> VfioIommuType1:
        """Models vfio_iommu_type1_open()."""
        if arg == C.VFIO_TYPE1_IOMMU:
            return cls(False, False, version)
        if arg == C.VFIO_TYPE1v2_IOMMU:
            return cls(True, False, version)
        if arg == C.VFIO_TYPE1_NESTING_IOMMU and version.type1_has_nesting:
            return cls(True, True, version)
        raise KernelError(errno.EINVAL, f"type1 does not open type {arg}")

    def attach_group(self, group: IommuGroup) -> None:
        """Models vfio_iommu_type1_attach_group()."""
        self.groups.append(group)

    def detach_group(self, group: IommuGroup) -> None:
        """Models vfio_iommu_type1_detach_group(): the last group drops every mapping."""
        if group in self.groups:
            self.groups.remove(group)
        if not self.groups:
            self.dmas.clear()
            self.dma_avail = DMA_ENTRY_LIMIT

    def release(self) -> None:
        self.dmas.clear()

    def check_extension(self, arg: int) -> int:
        return type1_check_extension(self, arg, self.version)

    @property
    def iova_ranges(self) -> tuple[tuple[int, int], ...]:
        return TYPE1_IOVA_RANGES if self.groups else ()

    # -- ioctls -------------------------------------------------------------
    def ioctl(self, task: Task, cmd: int, arg: int) -> int:
        """Models vfio_iommu_type1_ioctl()."""
        if cmd == IO.VFIO_CHECK_EXTENSION:
            return self.check_extension(arg)
        if cmd == IO.VFIO_IOMMU_GET_INFO:
            return self.get_info(task, arg)
        if cmd == IO.VFIO_IOMMU_MAP_DMA:
            return self.map_dma(task, arg)
        if cmd == IO.VFIO_IOMMU_UNMAP_DMA:
            return self.unmap_dma(task, arg)
        raise KernelError(errno.ENOTTY)

    def _build_caps(self) -> list[tuple[int, bytes]]:
        caps: list[tuple[int, bytes]] = []
        mig = S.VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION.pack(
            id=C.VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION, version=1, flags=0,
            pgsize_bitmap=self.pgsize_bitmap, max_dirty_bitmap_size=DIRTY_BITMAP_SIZE_MAX)
        caps.append((0, mig))
        avail = S.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL.pack(
            id=C.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, version=1, avail=self.dma_avail)
        caps.append((0, avail))
        if self.iova_ranges:
            body = S.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE.pack(
                id=C.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, version=1, nr_iovas=len(self.iova_ranges))
            for lo, hi in self.iova_ranges:
                body += S.VFIO_IOVA_RANGE.pack(start=lo, end=hi)
            caps.append((0, body))
        return caps

    def get_info(self, task: Task, arg: int) -> int:
        """Models vfio_iommu_type1_get_info()."""
        lay = S.VFIO_IOMMU_TYPE1_INFO
        minsz = lay.offsetofend("iova_pgsizes")
        info = lay.unpack(task.read(arg, minsz), partial=True)
        if info["argsz"] < minsz:
            raise KernelError(errno.EINVAL)
        copysz = min(info["argsz"], lay.size)
        info["flags"] = C.VFIO_IOMMU_INFO_PGSIZES
        info["iova_pgsizes"] = self.pgsize_bitmap
        info["cap_offset"] = 0
        info["pad"] = 0
        chain = build_cap_chain([b for _, b in self._build_caps()], lay.size)
        if chain:
            info["flags"] |= C.VFIO_IOMMU_INFO_CAPS
            if info["argsz"] < lay.size + len(chain):
                info["argsz"] = lay.size + len(chain)
            else:
                task.write(arg + lay.size, chain)
                info["cap_offset"] = lay.size
        task.write(arg, lay.pack(info)[:copysz])
        return 0

    def _find_dma(self, start: int, size: int) -> VfioDma | None:
        end = start + size
        for d in self.dmas.values():
            if d.iova < end and start < d.iova + d.size:
                return d
        return None

    def map_dma(self, task: Task, arg: int) -> int:
        """Models vfio_iommu_type1_map_dma() / vfio_dma_do_map()."""
        lay = S.VFIO_IOMMU_TYPE1_DMA_MAP
        minsz = lay.offsetofend("size")
        m = lay.unpack(task.read(arg, minsz))
        mask = C.VFIO_DMA_MAP_FLAG_READ | C.VFIO_DMA_MAP_FLAG_WRITE | C.VFIO_DMA_MAP_FLAG_VADDR
        if m["argsz"] < minsz or m["flags"] & ~mask:
            raise KernelError(errno.EINVAL)
        set_vaddr = bool(m["flags"] & C.VFIO_DMA_MAP_FLAG_VADDR)
        prot = m["flags"] & (C.VFIO_DMA_MAP_FLAG_READ | C.VFIO_DMA_MAP_FLAG_WRITE)
        if bool(prot) == set_vaddr:
            raise KernelError(errno.EINVAL)
        iova, size, vaddr = m["iova"], m["size"], m["vaddr"]
        pgsize = self.pgsize_bitmap & -self.pgsize_bitmap
        if not size or (size | iova | vaddr) & (pgsize - 1):
            raise KernelError(errno.EINVAL)
        if iova + size - 1 > C.U64_MAX or vaddr + size - 1 > C.U64_MAX:
            raise KernelError(errno.EINVAL)
        dma = self._find_dma(iova, size)
        if set_vaddr:
            if dma is None:
                raise KernelError(errno.ENOENT)
            if not dma.vaddr_invalid or dma.iova != iova or dma.size != size:
                raise KernelError(errno.EINVAL)
            dma.vaddr = vaddr
            dma.vaddr_invalid = False
            dma.pid = task.pid  # vfio_change_dma_owner(): the new vaddr is the caller's
            dma.task = task
            return 0
        if dma is not None:
            raise KernelError(errno.EEXIST)
        if not self.dma_avail:
            raise KernelError(errno.ENOSPC)
        last = iova + size - 1
        if not any(lo <= iova and last <= hi for lo, hi in self.iova_ranges):
            raise KernelError(errno.EINVAL, "outside the valid IOVA ranges")
        task.pin_pages(vaddr, size, bool(prot & C.VFIO_DMA_MAP_FLAG_WRITE))
        self.dmas[iova] = VfioDma(iova, size, vaddr, prot, pid=task.pid, task=task)
        self.dma_avail -= 1
        return 0

    def translate(self, iova: int, length: int) -> list[DmaPiece]:
        """What a device DMA at [iova, iova+length) reaches through this container's domain.

        The type1 counterpart of ``IoPagetable.translate``: ENOENT unless
        contiguous mappings cover every byte. A mapping whose vaddr was
        invalidated (VFIO_DMA_UNMAP_FLAG_VADDR) still reaches the pages pinned
        at map time, as in the kernel: its last vaddr.
        """
        if not length:
            raise KernelError(errno.EINVAL, "zero length")
        last = iova + length - 1
        out: list[DmaPiece] = []
        cur = iova
        for d in sorted(self.dmas.values(), key=lambda d: d.iova):
            dlast = d.iova + d.size - 1
            if dlast < cur:
                continue
            if d.iova > cur:
                break
            end = min(dlast, last)
            out.append(DmaPiece(cur, end - cur + 1, d.prot, d.pid, d.vaddr + (cur - d.iova), None, d.task))
            cur = end + 1
            if cur > last:
                return out
        raise KernelError(errno.ENOENT, "range not completely mapped")

    def unmap_dma(self, task: Task, arg: int) -> int:
        """Models vfio_iommu_type1_unmap_dma() / vfio_dma_do_unmap()."""
        lay = S.VFIO_IOMMU_TYPE1_DMA_UNMAP
        minsz = lay.offsetofend("size")
        u = lay.unpack(task.read(arg, minsz))
        mask = C.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP | C.VFIO_DMA_UNMAP_FLAG_ALL | C.VFIO_DMA_UNMAP_FLAG_VADDR
        flags = u["flags"]
        if u["argsz"] < minsz or flags & ~mask:
            raise KernelError(errno.EINVAL)
        if flags & C.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP and flags & (
                C.VFIO_DMA_UNMAP_FLAG_ALL | C.VFIO_DMA_UNMAP_FLAG_VADDR):
            raise KernelError(errno.EINVAL)
        if flags & C.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP:
            raise KernelError(errno.EINVAL, "dirty tracking not started")
        iova, size = u["iova"], u["size"]
        pgsize = self.pgsize_bitmap & -self.pgsize_bitmap
        unmap_all = bool(flags & C.VFIO_DMA_UNMAP_FLAG_ALL)
        if iova & (pgsize - 1):
            raise KernelError(errno.EINVAL)
        if unmap_all:
            if iova or size:
                raise KernelError(errno.EINVAL)
            iova_end = C.U64_MAX
        else:
            if not size or size & (pgsize - 1):
                raise KernelError(errno.EINVAL)
            if iova + size - 1 > C.U64_MAX:
                raise KernelError(errno.EINVAL)
            iova_end = iova + size - 1
        if self.v2 and not unmap_all:
            d = self._find_dma(iova, 1)
            if d is not None and d.iova != iova:
                raise KernelError(errno.EINVAL, "unmap bisects a mapping")
            d = self._find_dma(iova_end, 1)
            if d is not None and d.iova + d.size != iova + size:
                raise KernelError(errno.EINVAL, "unmap bisects a mapping")
        hit = [d for d in self.dmas.values() if d.iova <= iova_end and iova <= d.iova + d.size - 1]
        unmapped = 0
        if flags & C.VFIO_DMA_UNMAP_FLAG_VADDR:
            for d in hit:
                if d.vaddr_invalid:
                    raise KernelError(errno.EINVAL)
            for d in hit:
                d.vaddr_invalid = True
                unmapped += d.size
        else:
            for d in hit:
                del self.dmas[d.iova]
                self.dma_avail += 1
                unmapped += d.size
        u["size"] = unmapped
        task.write(arg, lay.pack(u)[:minsz])
        return 0


def build_cap_chain(caps: list[bytes], base: int) -> bytes:
    """Models vfio_info_cap_add() + vfio_info_cap_shift(): ``next`` offsets from the user buffer.

    Each cap is placed 8-byte aligned; ``base`` is where the chain starts in
    the user's buffer (sizeof the fixed struct).
    """
    out = bytearray()
    offsets: list[int] = []
    for cap in caps:
        while len(out) % 8:
            out.append(0)
        offsets.append(len(out))
        out += cap
    for i, off in enumerate(offsets):
        nxt = base + offsets[i + 1] if i + 1 < len(offsets) else 0
        out[off + 4: off + 8] = nxt.to_bytes(4, "little")
    return bytes(out)
