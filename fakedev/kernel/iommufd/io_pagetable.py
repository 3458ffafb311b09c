"""The IOVA space of one IOAS (drivers/iommu/iommufd/io_pagetable.c).

Lives here: ``IoPagetable`` with its three interval sets — mapped *areas*,
*reserved* ranges (each with an owner: a device's MSI window, a domain's
aperture) and *allowed* ranges — plus the page sources areas point at (a
process's user memory or a file). No ioctl parsing and no object table: the
IOAS handlers in ``ioas.py`` validate the uAPI struct and call in here.

Every operation validates before it changes anything, except unmapping a
range, which (as in the kernel) leaves already-removed areas removed when it
meets an area it may not cut.

Addresses are Python ints in [0, ULONG_MAX]; ranges are ``(start, last)``
inclusive, as in the kernel's interval trees.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

from attrs import define, field, frozen

from fakedev.kernel.errors import KernelError
from fakedev.kernel.task import ForeignFile, Task

ULONG_MAX = (1 << 64) - 1
PAGE_SIZE = 4096
HPAGE_SIZE = 2 << 20
IOMMU_READ = 1
IOMMU_WRITE = 2


@define(eq=False)
class Pages:
    """struct iopt_pages: the memory behind one MAP (shared by COPY and splits).

    ``pid``/``uptr`` for user memory (IOMMU_IOAS_MAP, VFIO_IOMMU_MAP_DMA);
    ``file``/``start`` for IOMMU_IOAS_MAP_FILE. ``users`` counts the areas
    that point here; the file reference is dropped when it reaches zero.
    """

    length: int
    writable: bool
    pid: int = 0
    uptr: int = 0
    file: ForeignFile | None = None
    start: int = 0
    users: int = 0
    task: Task | None = None  # the mm pages are pinned from (user memory only)

    def pin(self, offset: int, length: int) -> None:
        """Pin [offset, offset+length) of user memory: EFAULT if not mapped."""
        if self.task is not None:
            self.task.pin_pages(self.uptr + offset, length, self.writable)

    @property
    def is_file(self) -> bool:
        return self.file is not None

    def get(self) -> None:
        self.users += 1

    def put(self) -> None:
        self.users -= 1
        if self.users == 0 and self.file is not None:
            self.file.close()
            self.file = None


@define(eq=False)
class Area:
    """struct iopt_area: [iova, iova+length) mapped to ``pages`` at ``pages_offset``."""

    iova: int
    length: int
    prot: int
    pages: Pages
    pages_offset: int = 0

    @property
    def last(self) -> int:
        return self.iova + self.length - 1


@frozen
class Reserved:
    start: int
    last: int
    owner: object


@frozen
class DmaPiece:
    """One contiguous piece of an IOVA range, resolved to its backing memory.

    User memory: ``pid`` and ``addr`` (a user virtual address in that
    process); ``owner``, the Task that made the mapping, lets the host check
    that ``pid`` is still that process (not a later one given the same pid).
    File memory: ``file`` and ``addr`` (an offset in the file).
    """

    iova: int
    length: int
    prot: int
    pid: int
    addr: int
    file: ForeignFile | None
    owner: Task | None = field(default=None, eq=False, repr=False)


def _overlaps(a0: int, a1: int, b0: int, b1: int) -> bool:
    return a0 <= b1 and b0 <= a1


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, last in sorted(ranges):
        if out and s <= out[-1][1] + 1:
            if last > out[-1][1]:
                out[-1] = (out[-1][0], last)
        else:
            out.append((s, last))
    return out


def _holes(used: list[tuple[int, int]], lo: int, hi: int) -> Iterator[tuple[int, int]]:
    """The gaps of ``used`` (merged, sorted) inside [lo, hi]."""
    cur = lo
    for s, last in used:
        if last < cur:
            continue
        if s > hi:
            break
        if s > cur:
            yield cur, s - 1
        if last >= hi:
            return
        cur = last + 1
    if cur <= hi:
        yield cur, hi


def _roundup_pow_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _ffs_pow(n: int) -> int:
    """1 << __ffs64(n) (n != 0)."""
    return n & -n


class IoPagetable:
    """struct io_pagetable."""

    def __init__(self) -> None:
        self.areas: list[Area] = []  # sorted by iova, never overlapping
        self.reserved: list[Reserved] = []
        self.allowed: list[tuple[int, int]] = []  # sorted, never overlapping
        self.domains: list[object] = []  # attached HWPTs (each an iommu_domain)
        self.domain_pgsize: dict[int, int] = {}  # id(domain) -> smallest page size
        self.iova_alignment = 1
        self.disable_large_pages = False

    # -- queries ------------------------------------------------------------
    def area_iter(self, start: int, last: int) -> Iterator[Area]:
        """iopt_area_iter_first/next: areas intersecting [start, last], in order."""
        for a in self.areas:
            if a.iova > last:
                return
            if a.last >= start:
                yield a

    def area_intersects(self, start: int, last: int) -> bool:
        return next(self.area_iter(start, last), None) is not None

    def reserved_intersects(self, start: int, last: int) -> bool:
        return any(_overlaps(r.start, r.last, start, last) for r in self.reserved)

    def allowed_intersects(self, start: int, last: int) -> bool:
        return any(_overlaps(s, la, start, last) for s, la in self.allowed)

    def reserved_spans(self) -> list[tuple[int, int]]:
        return _merge([(r.start, r.last) for r in self.reserved])

    def iova_ranges(self) -> list[tuple[int, int]]:
        """The holes of the reserved set over [0, ULONG_MAX] (IOVA_RANGES, type1 cap)."""
        return list(_holes(self.reserved_spans(), 0, ULONG_MAX))

    def mapped_bytes(self) -> int:
        return sum(a.length for a in self.areas)

    # -- IOVA checks and allocation ----------------------------------------
    def check_iova(self, iova: int, length: int) -> None:
        """Models iopt_check_iova() for a fixed IOVA."""
        if iova & (self.iova_alignment - 1):
            raise KernelError(errno.EINVAL, "iova not aligned to the IOAS alignment")
        last = iova + length - 1
        if last > ULONG_MAX:
            raise KernelError(errno.EOVERFLOW, "iova + length wraps")
        if self.reserved_intersects(iova, last):
            raise KernelError(errno.EINVAL, "range intersects a reserved IOVA range")
        if self.area_intersects(iova, last):
            raise KernelError(errno.EEXIST, "range intersects an existing mapping")

    def alloc_iova(self, uptr: int, length: int, *, has_uptr: bool = True) -> int:
        """Models iopt_alloc_iova(): the lowest hole that fits, never IOVA 0."""
        if not length or length & (self.iova_alignment - 1):
            raise KernelError(errno.EINVAL, "length zero or not aligned")
        if length >= ULONG_MAX // 2:
            raise KernelError(errno.EOVERFLOW, "length too large for automatic IOVA")
        page_offset = uptr % PAGE_SIZE
        align = _roundup_pow_of_two(length)
        if has_uptr and uptr:
            align = min(align, _ffs_pow(uptr))
        align = min(align, HPAGE_SIZE)  # ALIGN() overflow guard (THP kernels)
        if align < self.iova_alignment:
            raise KernelError(errno.EINVAL, "user address alignment below the IOAS alignment")
        lo, hi = PAGE_SIZE, ULONG_MAX - PAGE_SIZE
        if self.allowed:
            windows = [(max(s, lo), min(la, hi)) for s, la in self.allowed if la >= lo and s <= hi]
        else:
            windows = [(lo, hi)]
        used = _merge([(r.start, r.last) for r in self.reserved] + [(a.iova, a.last) for a in self.areas])
        for w0, w1 in windows:
            if w1 - w0 < length - 1:
                continue
            for h0, h1 in _holes(used, w0, w1):
                start = ((h0 + align - 1) // align * align) | page_offset
                if start > h1 or h1 - start < length - 1:
                    continue
                return start
        raise KernelError(errno.ENOSPC, "no free IOVA range fits")

    # -- map / unmap ---------------------------------------------------------
    def map_pages(
        self, elems: list[tuple[Pages, int, int]], iova: int | None, prot: int, *, pin: bool = False
    ) -> int:
        """Models iopt_map_pages(): one area per (pages, offset, length) element.

        ``iova`` None allocates (keyed on the first element's address).
        Returns the IOVA used. Validates completely before inserting. With
        ``pin`` (new user pages) and a domain attached, the pages are pinned
        after the area checks, as iopt_fill_domains_pages() does.
        """
        total = sum(n for _, _, n in elems)
        if total == 0:
            raise KernelError(errno.EINVAL, "zero length")
        if iova is None:
            first, off, _ = elems[0]
            addr = (first.start if first.is_file else first.uptr) + off
            iova = self.alloc_iova(addr, total)
        else:
            if total & (self.iova_alignment - 1):
                raise KernelError(errno.EINVAL, "length not aligned")
            self.check_iova(iova, total)
        # iopt_insert_area(): per-area checks
        for pages, off, _ in elems:
            base = pages.start if pages.is_file else pages.uptr
            if ((base + off) % PAGE_SIZE) & (self.iova_alignment - 1):
                raise KernelError(errno.EINVAL, "page offset not aligned to the IOAS alignment")
            if prot & IOMMU_WRITE and not pages.writable:
                raise KernelError(errno.EPERM, "write access to read-only pages")
        if pin and self.domains:
            for pages, off, n in elems:
                pages.pin(off, n)
        cur = iova
        for pages, off, n in elems:
            pages.get()
            self._insert(Area(cur, n, prot, pages, off))
            cur += n
        return iova

    def _insert(self, area: Area) -> None:
        i = 0
        while i < len(self.areas) and self.areas[i].iova < area.iova:
            i += 1
        self.areas.insert(i, area)

    def _remove(self, area: Area) -> None:
        self.areas.remove(area)
        area.pages.put()

    def unmap_range(self, start: int, last: int) -> int:
        """Models iopt_unmap_iova_range(): whole areas inside [start, last].

        ENOENT if nothing is mapped there or an area sticks out of the range;
        areas removed before that point stay removed (as the kernel does).
        """
        unmapped = 0
        for area in list(self.area_iter(start, last)):
            if area.iova < start or area.last > last:
                raise KernelError(errno.ENOENT, "an area is only partly inside the range")
            self._remove(area)
            unmapped += area.length
        if not unmapped:
            raise KernelError(errno.ENOENT, "nothing mapped in range")
        return unmapped

    def unmap_iova(self, iova: int, length: int) -> int:
        """Models iopt_unmap_iova()."""
        if not length:
            raise KernelError(errno.EINVAL, "zero length")
        last = iova + length - 1
        if last > ULONG_MAX:
            raise KernelError(errno.EOVERFLOW, "iova + length wraps")
        return self.unmap_range(iova, last)

    def unmap_all(self) -> int:
        """Models iopt_unmap_all(): success (0 bytes) when empty."""
        n = self.mapped_bytes()
        for area in list(self.areas):
            self._remove(area)
        return n

    def get_pages(self, iova: int, length: int) -> list[tuple[Pages, int, int, int]]:
        """Models iopt_get_pages(): (pages, offset, length, prot) covering the range.

        The range must be covered by contiguous areas, else ENOENT.
        """
        if not length:
            raise KernelError(errno.EINVAL, "zero length")
        last = iova + length - 1
        if last > ULONG_MAX:
            raise KernelError(errno.EOVERFLOW, "iova + length wraps")
        out: list[tuple[Pages, int, int, int]] = []
        cur = iova
        for area in self.area_iter(iova, last):
            if area.iova > cur:
                break
            end = min(area.last, last)
            out.append((area.pages, area.pages_offset + (cur - area.iova), end - cur + 1, area.prot))
            cur = end + 1
            if cur > last:
                return out
        raise KernelError(errno.ENOENT, "range not completely mapped")

    def cut(self, iovas: list[int]) -> None:
        """Models iopt_cut_iova(): split areas so each ``iova`` is an area's last byte."""
        for cut in iovas:
            for area in self.area_iter(cut, cut):
                if cut != area.last and ((cut + 1) % PAGE_SIZE or (cut + 1) & (self.iova_alignment - 1)):
                    raise KernelError(errno.EINVAL, "cut not page aligned")
        for cut in iovas:
            for cur in list(self.area_iter(cut, cut)):
                if cut == cur.last:
                    continue
                head = cut - cur.iova + 1
                tail = Area(cut + 1, cur.length - head, cur.prot, cur.pages, cur.pages_offset + head)
                cur.length = head
                cur.pages.get()
                self._insert(tail)

    def translate(self, iova: int, length: int) -> list[DmaPiece]:
        """Resolve an IOVA range to its backing pieces (for DMA emulation).

        ENOENT if any byte of the range is not mapped.
        """
        out: list[DmaPiece] = []
        for pages, off, n, prot in self.get_pages(iova, length):
            base = pages.start if pages.is_file else pages.uptr
            cur_iova = iova + sum(p.length for p in out)
            out.append(DmaPiece(cur_iova, n, prot, pages.pid, base + off, pages.file,
                                None if pages.is_file else pages.task))
        return out

    def change_process(self, pid: int) -> None:
        """File-backed pages are now accounted to ``pid`` (IOAS_CHANGE_PROCESS)."""
        for area in self.areas:
            if area.pages.is_file:
                area.pages.pid = pid

    # -- allowed / reserved ---------------------------------------------------
    def set_allow_iova(self, ranges: list[tuple[int, int]]) -> None:
        """Models iopt_set_allow_iova(): replace the list; EADDRINUSE on a reserved overlap."""
        for s, last in ranges:
            if self.reserved_intersects(s, last):
                raise KernelError(errno.EADDRINUSE, "allowed range intersects a reserved range")
        self.allowed = sorted(ranges)

    def check_reserve(self, start: int, last: int) -> None:
        if self.area_intersects(start, last) or self.allowed_intersects(start, last):
            raise KernelError(errno.EADDRINUSE, "reserved range intersects a mapping or allowed range")

    def reserve(self, start: int, last: int, owner: object) -> None:
        """Models iopt_reserve_iova()."""
        self.check_reserve(start, last)
        self.reserved.append(Reserved(start, last, owner))

    def remove_reserved(self, owner: object) -> None:
        """Models iopt_remove_reserved_iova(): drop every range ``owner`` reserved."""
        self.reserved = [r for r in self.reserved if r.owner is not owner]

    # -- domains and alignment ------------------------------------------------
    def _alignment_for(self, domains: list[object], pgsizes: dict[int, int]) -> int:
        new = PAGE_SIZE if self.disable_large_pages else 1
        for d in domains:
            new = max(new, pgsizes[id(d)])
        return new

    def _check_alignment(self, align: int) -> None:
        """Models iopt_check_iova_alignment()."""
        for a in self.areas:
            if a.iova & (align - 1) or a.length & (align - 1):
                raise KernelError(errno.EADDRINUSE, "existing mapping not aligned to the new alignment")

    def add_domain(self, domain: object, aperture: tuple[int, int], pgsize: int = PAGE_SIZE) -> None:
        """Models iopt_table_add_domain(): aperture outside reserved, alignment raised."""
        pgs = dict(self.domain_pgsize)
        pgs[id(domain)] = pgsize
        new_align = self._alignment_for([*self.domains, domain], pgs)
        if new_align > PAGE_SIZE:
            raise KernelError(errno.EINVAL, "domain page size above PAGE_SIZE")
        if new_align != self.iova_alignment:
            self._check_alignment(new_align)
        a0, a1 = aperture
        outside = []
        if a0 > 0:
            outside.append((0, a0 - 1))
        if a1 < ULONG_MAX:
            outside.append((a1 + 1, ULONG_MAX))
        for s, last in outside:
            self.check_reserve(s, last)
        if not self.domains:
            # iopt_fill_domain(): the first domain pins every existing area
            for area in self.areas:
                area.pages.pin(area.pages_offset, area.length)
        for s, last in outside:
            self.reserved.append(Reserved(s, last, domain))
        self.domains.append(domain)
        self.domain_pgsize = pgs
        self.iova_alignment = new_align

    def remove_domain(self, domain: object) -> None:
        """Models iopt_table_remove_domain()."""
        self.domains.remove(domain)
        self.domain_pgsize.pop(id(domain), None)
        self.remove_reserved(domain)
        self.iova_alignment = self._alignment_for(self.domains, self.domain_pgsize)

    def set_large_pages(self, enable: bool) -> None:
        """Models iopt_enable_large_pages() / iopt_disable_large_pages()."""
        if enable:
            self.disable_large_pages = False
            self.iova_alignment = self._alignment_for(self.domains, self.domain_pgsize)
            return
        if self.disable_large_pages:
            return
        if self.domains and self.areas:
            raise KernelError(errno.EINVAL, "cannot disable large pages with mappings in a domain")
        self.disable_large_pages = True
        new = self._alignment_for(self.domains, self.domain_pgsize)
        try:
            if new > self.iova_alignment:
                self._check_alignment(new)
        except KernelError:
            self.disable_large_pages = False
            raise
        self.iova_alignment = new

    def check_invariants(self, label: str) -> list[str]:
        out: list[str] = []
        prev: Area | None = None
        for a in self.areas:
            if a.length <= 0 or a.last > ULONG_MAX:
                out.append(f"{label}: bad area {a.iova:#x}+{a.length:#x}")
            if prev is not None and prev.last >= a.iova:
                out.append(f"{label}: areas {prev.iova:#x} and {a.iova:#x} overlap or are unsorted")
            if a.pages.users <= 0:
                out.append(f"{label}: area {a.iova:#x} points at pages with no users")
            prev = a
        for s, last in self.allowed:
            if self.reserved_intersects(s, last):
                out.append(f"{label}: allowed range {s:#x}-{last:#x} intersects a reserved range")
        if self.iova_alignment != self._alignment_for(self.domains, self.domain_pgsize):
            out.append(f"{label}: iova_alignment {self.iova_alignment} inconsistent")
        return out
