"""The "dma-engine" device behaviour: a tiny copy/fill engine in BAR0.

Lives here: ``DmaEngine``, a ``BarBehaviour`` whose BAR0 holds the registers
below; every other BAR is RAM (``RamBars``). A command runs synchronously
when the COMMAND register is written (the doorbell), through the device's
``DmaPort`` (``fakedev.kernel.dma``): the IOMMU translation of its group, the
mapping's protection, the host's memory. On completion or fault the engine
sets STATUS and raises its interrupt (MSI-X or MSI vector 0 when enabled,
else INTx). What must not: no I/O, no knowledge of VFIO ioctls.

Register map (BAR0, little-endian; 8-byte registers may be accessed as two
4-byte halves, low half first or not):

| offset | name | access | meaning |
|---|---|---|---|
| 0x00 | ID | RO u32 | 0x45414d44 ("DMAE") |
| 0x04 | VERSION | RO u32 | 1 |
| 0x08 | SRC | RW u64 | source IOVA (COPY) |
| 0x10 | DST | RW u64 | destination IOVA (COPY, FILL) |
| 0x18 | LEN | RW u32 | bytes to move (1 .. 16 MiB) |
| 0x1C | PATTERN | RW u32 | FILL: this u32, little-endian, repeated (the last copy cut short) |
| 0x20 | COMMAND | WO u32 | doorbell: 1 = COPY, 2 = FILL; reads 0 |
| 0x24 | STATUS | RW1C u32 | bit 0 DONE, bit 1 FAULT, bit 2 ERROR (bad command or length); write 1 to clear |
| 0x28 | FAULT_IOVA | RO u64 | the faulting IOVA of the last fault |
| 0x30 | FAULT_REASON | RO u32 | 0 none, 1 blocked, 2 unmapped, 3 permission, 4 memory, 5 no-memory, 6 bus-master |
| 0x34 | COMPLETED | RO u32 | commands completed without fault (wraps) |

A command needs Bus Master Enable in the command register (else FAULT with
reason bus-master, nothing moved). COPY reads the whole source before writing
the destination. Each command sets DONE (and FAULT or ERROR when it failed)
and then signals the interrupt; STATUS keeps earlier bits until cleared.
A function reset zeroes every register.
"""

from __future__ import annotations

import errno

from fakedev.kernel.dma import DmaError, DmaPort
from fakedev.kernel.errors import KernelError
from fakedev.kernel.pci import PciDev

from .vfio_pci_rdwr import RamBars

REGS_SIZE = 0x40
ENGINE_ID = 0x45414D44  # "DMAE"
ENGINE_VERSION = 1

REG_ID = 0x00
REG_VERSION = 0x04
REG_SRC = 0x08
REG_DST = 0x10
REG_LEN = 0x18
REG_PATTERN = 0x1C
REG_COMMAND = 0x20
REG_STATUS = 0x24
REG_FAULT_IOVA = 0x28
REG_FAULT_REASON = 0x30
REG_COMPLETED = 0x34

CMD_COPY = 1
CMD_FILL = 2

STATUS_DONE = 1 << 0
STATUS_FAULT = 1 << 1
STATUS_ERROR = 1 << 2

LEN_MAX = 16 << 20

FAULT_CODES = {"blocked": 1, "unmapped": 2, "permission": 3, "memory": 4, "no-memory": 5, "bus-master": 6}

#: bytes the driver may write (the rest are read-only or special)
_RW = set(range(REG_SRC, REG_COMMAND))


class DmaEngine:
    """BAR0 holds the registers (offsets from 0x40 on read 0 and ignore writes); other BARs are RAM."""

    def __init__(self, pdev: PciDev) -> None:
        self.pdev = pdev
        self.ram = RamBars(pdev)
        self.regs = bytearray(REGS_SIZE)
        self.port: DmaPort | None = None
        self.reset()

    # -- DmaMaster --------------------------------------------------------------------
    def connect(self, port: DmaPort) -> None:
        self.port = port

    # -- register helpers -------------------------------------------------------------
    def _get(self, off: int, size: int) -> int:
        return int.from_bytes(self.regs[off:off + size], "little")

    def _set(self, off: int, size: int, value: int) -> None:
        self.regs[off:off + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def reg(self, off: int) -> int:
        """The value of the register at ``off`` (u64 for SRC/DST/FAULT_IOVA, else u32)."""
        return self._get(off, 8 if off in (REG_SRC, REG_DST, REG_FAULT_IOVA) else 4)

    # -- BarBehaviour -----------------------------------------------------------------
    def read(self, bar: int, off: int, size: int) -> bytes:
        if bar != 0:
            return self.ram.read(bar, off, size)
        if off >= REGS_SIZE:
            return bytes(size)
        out = bytearray(self.regs[off:off + size])
        out += bytes(size - len(out))
        return bytes(out)

    def write(self, bar: int, off: int, data: bytes) -> None:
        if bar != 0:
            self.ram.write(bar, off, data)
            return
        doorbell = False
        clear = 0
        for i, b in enumerate(data):
            o = off + i
            if o in _RW:
                self.regs[o] = b
            elif REG_STATUS <= o < REG_STATUS + 4:
                clear |= b << (8 * (o - REG_STATUS))
            elif REG_COMMAND <= o < REG_COMMAND + 4:
                doorbell = True
        if clear:
            self._set(REG_STATUS, 4, self._get(REG_STATUS, 4) & ~clear)
        if doorbell:
            # the command is whatever the write put in the COMMAND bytes (others read as 0)
            cmd = 0
            for i, b in enumerate(data):
                o = off + i
                if REG_COMMAND <= o < REG_COMMAND + 4:
                    cmd |= b << (8 * (o - REG_COMMAND))
            self.run(cmd)

    def reset(self) -> None:
        self.ram.reset()
        self.regs[:] = bytes(REGS_SIZE)
        self._set(REG_ID, 4, ENGINE_ID)
        self._set(REG_VERSION, 4, ENGINE_VERSION)

    # -- the engine ---------------------------------------------------------------------
    def run(self, cmd: int) -> None:
        """Execute ``cmd`` now; set STATUS; signal the interrupt."""
        status = STATUS_DONE
        try:
            self._execute(cmd)
            self._set(REG_COMPLETED, 4, self._get(REG_COMPLETED, 4) + 1)
        except DmaError as e:
            status |= STATUS_FAULT
            self._set(REG_FAULT_IOVA, 8, e.fault.iova)
            self._set(REG_FAULT_REASON, 4, FAULT_CODES.get(e.fault.reason, 0xFF))
        except KernelError:
            status |= STATUS_ERROR
        self._set(REG_STATUS, 4, self._get(REG_STATUS, 4) | status)
        if self.port is not None:
            self.port.interrupt()

    def _execute(self, cmd: int) -> None:
        length = self._get(REG_LEN, 4)
        src, dst = self._get(REG_SRC, 8), self._get(REG_DST, 8)
        if cmd not in (CMD_COPY, CMD_FILL) or not 0 < length <= LEN_MAX or self.port is None:
            raise KernelError(errno.EINVAL, f"bad command {cmd} or length {length}")
        port = self.port
        if not port.bus_master:
            raise port.fault(src if cmd == CMD_COPY else dst, length, cmd == CMD_FILL, "bus-master",
                             "Bus Master Enable is off")
        if cmd == CMD_COPY:
            data = port.read(src, length)
        else:
            pat = self.regs[REG_PATTERN:REG_PATTERN + 4]
            data = (bytes(pat) * (length // 4 + 1))[:length]
        port.write(dst, data)
