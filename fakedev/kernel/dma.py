"""Device DMA: what a device's memory transactions reach, and the IOMMU fault log.

Lives here: ``DmaMemory`` (the protocol the host implements to touch the
memory behind a mapping: a process's user memory, or a file for
IOMMU_IOAS_MAP_FILE), ``dma_translate`` (the IOMMU's translation for one
device: its group's current domain, an iommufd HWPT's IOAS or a legacy type1
container), ``Dma`` (one machine's DMA path: translate, check the direction
against the mapping's protection, touch memory, record faults) and
``DmaPort`` (what a device behaviour holds to do DMA as its device and raise
its interrupt).

What must not: no I/O. Memory is reached only through ``DmaMemory``; without
one every DMA faults with reason ``no-memory``.

A DMA is all or nothing: the whole range is translated and checked before a
byte is read or written, so a faulting transfer changes no memory (a real
IOMMU aborts only the faulting transactions; the model records the first
faulting IOVA as the fault address, as a fault record would).
"""

from __future__ import annotations

import errno
from collections import Counter, deque
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from attrs import frozen

from fakedev.kernel.errors import KernelError
from fakedev.kernel.iommu import BLOCKING_DOMAIN, DEFAULT_DOMAIN
from fakedev.kernel.iommufd.hw_pagetable import HwPagetable
from fakedev.kernel.iommufd.io_pagetable import IOMMU_READ, IOMMU_WRITE, ULONG_MAX, DmaPiece

if TYPE_CHECKING:
    from fakedev.kernel.vfio.pci.vfio_pci_core import VfioPciDevice

__all__ = [
    "DMA_FAULT_REASONS",
    "Dma",
    "DmaFault",
    "DmaMaster",
    "DmaMemory",
    "DmaPiece",
    "DmaPort",
    "dma_translate",
]

#: fault reasons, as recorded and as shown by ``describe()``
DMA_FAULT_REASONS = (
    "blocked",  # the group's domain maps nothing for this device (unattached, blocking, DMA-API default)
    "unmapped",  # a byte of the range has no mapping
    "permission",  # the mapping does not allow this direction (a write to a read-only mapping)
    "memory",  # the memory behind the mapping could not be reached (process gone, file too short)
    "no-memory",  # nothing gives the model access to memory (no DmaMemory installed)
    "bus-master",  # the device's Bus Master Enable is off (devices that check it)
)

#: how many fault records are kept (counts are kept for all)
FAULT_LOG_SIZE = 256
#: the largest single DMA the model performs
DMA_MAX = 64 << 20


class DmaMemory(Protocol):
    """The memory behind a mapping, as the host reaches it.

    ``piece.file`` None: user memory of process ``piece.pid`` at virtual
    address ``piece.addr``. Otherwise ``piece.file`` is the file of an
    IOMMU_IOAS_MAP_FILE mapping and ``piece.addr`` an offset in it. Both calls
    move exactly ``piece.length`` bytes or raise ``KernelError(EFAULT)``.
    """

    def read(self, piece: DmaPiece) -> bytes:
        """The bytes behind ``piece``."""

    def write(self, piece: DmaPiece, data: bytes) -> None:
        """Store ``data`` (``piece.length`` bytes) behind ``piece``."""


@frozen
class DmaFault:
    """One IOMMU fault record."""

    bdf: str
    iova: int
    length: int
    write: bool
    reason: str
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"bdf": self.bdf, "iova": self.iova, "length": self.length,
                "write": self.write, "reason": self.reason, "detail": self.detail}


class DmaError(KernelError):
    """A DMA fault, as a KernelError carrying its record."""

    def __init__(self, err: int, fault: DmaFault) -> None:
        super().__init__(err, f"DMA {'write' if fault.write else 'read'} by {fault.bdf} at "
                              f"{fault.iova:#x}: {fault.reason}{': ' + fault.detail if fault.detail else ''}")
        self.fault = fault


def _type1_of(dev: VfioPciDevice) -> Any:
    """The type1 driver translating for ``dev``'s group, if its group is in a container with one."""
    ig = dev.iommu_group
    if ig is None:
        return None
    owner = ig.owner
    container = getattr(owner, "container", None)
    if owner is dev.group and container is not None and container.iommu_driver is not None:
        drv = container.iommu_driver
        if ig in drv.groups:
            return drv
    return None


def dma_translate(dev: VfioPciDevice, iova: int, length: int) -> list[DmaPiece]:
    """What a DMA by ``dev`` at [iova, iova+length) reaches, through its group's domain.

    The group's current domain decides: an iommufd HWPT translates through its
    IOAS (iommufd_device_dma_translate's rule, applied to the whole group as
    the hardware does); a group in a legacy container translates through the
    type1 mappings; the blocking and the DMA-API default domains map nothing
    for a user. ENODEV for blocked, ENOENT for an unmapped byte. The caller
    checks ``DmaPiece.prot`` for the direction.
    """
    if not length:
        raise KernelError(errno.EINVAL, "zero-length DMA")
    if iova < 0 or iova + length - 1 > ULONG_MAX:
        raise KernelError(errno.ENOENT, "IOVA range wraps")
    ig = dev.iommu_group
    if ig is None:
        raise KernelError(errno.ENODEV, "device has no iommu group")
    dom = ig.domain
    if isinstance(dom, HwPagetable):
        return dom.ioas.iopt.translate(iova, length)
    drv = _type1_of(dev)
    if drv is not None:
        pieces: list[DmaPiece] = drv.translate(iova, length)
        return pieces
    if dom is BLOCKING_DOMAIN:
        raise KernelError(errno.ENODEV, "DMA blocked (the group's owner attached no domain)")
    if dom is DEFAULT_DOMAIN:
        raise KernelError(errno.ENODEV, "no user domain (the group is in its DMA-API default domain)")
    raise KernelError(errno.ENODEV, f"DMA blocked (domain {dom!r})")


def _first_unmapped(dev: VfioPciDevice, iova: int, length: int) -> int:
    """The lowest IOVA of [iova, iova+length) that does not translate (binary search on the prefix)."""
    lo, hi = 0, length  # prefix of lo bytes translates; of hi bytes does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            dma_translate(dev, iova, mid)
            lo = mid
        except KernelError:
            hi = mid
    return iova + lo


class Dma:
    """One machine's device DMA path: translation, direction checks, memory, fault log."""

    def __init__(self, memory: DmaMemory | None = None) -> None:
        self.memory = memory
        self.faults: deque[DmaFault] = deque(maxlen=FAULT_LOG_SIZE)
        self.fault_counts: Counter[str] = Counter()
        self.reads = 0
        self.writes = 0
        self.bytes_read = 0
        self.bytes_written = 0

    # -- the path -------------------------------------------------------------------
    def _fault(self, dev: VfioPciDevice, iova: int, length: int, write: bool, reason: str,
               err: int, detail: str = "") -> DmaError:
        f = DmaFault(dev.name, iova, length, write, reason, detail)
        self.faults.append(f)
        self.fault_counts[reason] += 1
        return DmaError(err, f)

    def fault(self, dev: VfioPciDevice, iova: int, length: int, write: bool, reason: str,
              detail: str = "") -> DmaError:
        """Record a fault a device detected itself (e.g. ``bus-master``); returns the error to raise."""
        return self._fault(dev, iova, length, write, reason, errno.EIO, detail)

    def _pieces(self, dev: VfioPciDevice, iova: int, length: int, write: bool) -> list[DmaPiece]:
        if length <= 0 or length > DMA_MAX:
            raise KernelError(errno.EINVAL, f"DMA length {length} not in [1, {DMA_MAX}]")
        try:
            pieces = dma_translate(dev, iova, length)
        except KernelError as e:
            if e.errno == errno.ENOENT:
                at = _first_unmapped(dev, iova, length)
                raise self._fault(dev, at, length - (at - iova), write, "unmapped", errno.EFAULT,
                                  e.why) from None
            raise self._fault(dev, iova, length, write, "blocked", errno.EFAULT, e.why) from None
        need = IOMMU_WRITE if write else IOMMU_READ
        for p in pieces:
            if not p.prot & need:
                raise self._fault(dev, p.iova, p.length, write, "permission", errno.EFAULT,
                                  "mapping is read-only" if write else "mapping is write-only")
        if self.memory is None:
            raise self._fault(dev, iova, length, write, "no-memory", errno.EFAULT,
                              "no host memory access installed")
        return pieces

    def read(self, dev: VfioPciDevice, iova: int, length: int) -> bytes:
        """``dev`` reads ``length`` bytes of memory at ``iova`` (DMA from memory to the device)."""
        pieces = self._pieces(dev, iova, length, False)
        assert self.memory is not None
        out = bytearray()
        for p in pieces:
            try:
                data = self.memory.read(p)
            except KernelError as e:
                raise self._fault(dev, p.iova, p.length, False, "memory", errno.EFAULT, e.why) from None
            if len(data) != p.length:
                raise self._fault(dev, p.iova, p.length, False, "memory", errno.EFAULT, "short read")
            out += data
        self.reads += 1
        self.bytes_read += length
        return bytes(out)

    def write(self, dev: VfioPciDevice, iova: int, data: bytes) -> None:
        """``dev`` writes ``data`` to memory at ``iova`` (DMA from the device to memory).

        Every piece is translated and checked first; a host failure part-way
        (the memory went away) may leave earlier pieces written.
        """
        pieces = self._pieces(dev, iova, len(data), True)
        assert self.memory is not None
        off = 0
        for p in pieces:
            try:
                self.memory.write(p, data[off:off + p.length])
            except KernelError as e:
                raise self._fault(dev, p.iova, p.length, True, "memory", errno.EFAULT, e.why) from None
            off += p.length
        self.writes += 1
        self.bytes_written += len(data)

    # -- showing ----------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {
            "memory": self.memory is not None,
            "reads": self.reads,
            "writes": self.writes,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "faults": sum(self.fault_counts.values()),
            "fault_counts": dict(sorted(self.fault_counts.items())),
            "recent_faults": [f.as_dict() for f in list(self.faults)[-8:]],
        }


class DmaPort:
    """What a device behaviour holds to act as its device: DMA, Bus Master Enable, interrupts."""

    def __init__(self, dma: Dma, dev: VfioPciDevice) -> None:
        self.dma = dma
        self.dev = dev

    @property
    def bdf(self) -> str:
        return self.dev.name

    @property
    def bus_master(self) -> bool:
        """PCI_COMMAND_MASTER in the (virtual) command register."""
        from fakedev.kernel.vfio.pci.vfio_pci_config import PCI_COMMAND_MASTER

        return bool(self.dev.config.command & PCI_COMMAND_MASTER)

    def read(self, iova: int, length: int) -> bytes:
        return self.dma.read(self.dev, iova, length)

    def write(self, iova: int, data: bytes) -> None:
        self.dma.write(self.dev, iova, data)

    def fault(self, iova: int, length: int, write: bool, reason: str, detail: str = "") -> DmaError:
        return self.dma.fault(self.dev, iova, length, write, reason, detail)

    def interrupt(self) -> bool:
        """Signal the device's interrupt: MSI-X or MSI vector 0 when that is enabled, else INTx.

        True when an eventfd was signalled.
        """
        from fakedev.kernel.vfio.pci.vfio_pci_intrs import INTX, MSI, MSIX

        kind = self.dev.irqs.irq_type
        if kind in (MSI, MSIX):
            return self.dev.raise_irq(kind, 0)
        return self.dev.raise_irq(INTX, 0)


@runtime_checkable
class DmaMaster(Protocol):
    """A BAR behaviour that does DMA: the kernel hands it its device's port at probe."""

    def connect(self, port: DmaPort) -> None: ...
