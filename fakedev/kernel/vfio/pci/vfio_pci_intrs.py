"""vfio-pci interrupts: VFIO_DEVICE_SET_IRQS and the eventfds it keeps.

Mirrors drivers/vfio/pci/vfio_pci_intrs.c: INTx (trigger, mask, unmask,
automask on delivery), MSI / MSI-X (enable on the first eventfd block,
per-vector eventfds, loopback with DATA_NONE/BOOL, disable with count 0),
ERR and REQ single triggers. Eventfds come from ``task.fget``: anything that is
not an eventfd is EINVAL, a closed fd EBADF. A kept eventfd is closed when it
is replaced, when its index is disabled and when the device is closed. A
failed SET_IRQS changes nothing (all fds are looked up before any is used).
``raise_irq`` is the model's "the device signals vector N".
"""

from __future__ import annotations

import errno
from typing import Any

from fakedev.kernel.errors import KernelError
from fakedev.kernel.file import File
from fakedev.kernel.task import ForeignFile, ForeignKind, Task
from fakedev.uapi import consts as C

INTX, MSI, MSIX, ERR, REQ = 0, 1, 2, 3, 4
IRQ_NONE = -1


def eventfd_ctx_fdget(task: Task, fd: int) -> ForeignFile:
    """Models eventfd_ctx_fdget(): EBADF for a closed fd, EINVAL for a non-eventfd."""
    f = task.fget(fd)
    if isinstance(f, File):
        raise KernelError(errno.EINVAL, f"fd {fd} is not an eventfd")
    if f.kind is not ForeignKind.EVENTFD:
        f.close()
        raise KernelError(errno.EINVAL, f"fd {fd} is not an eventfd")
    return f


class VfioPciIrqs:
    """The interrupt state of one vfio-pci device (vdev->irq_type, ctx, err/req triggers)."""

    def __init__(self, counts: Any, is_pcie: bool) -> None:
        self.count_of = counts  # callable(index) -> vfio_pci_get_irq_count
        self.is_pcie = is_pcie
        self.irq_type = IRQ_NONE
        self.intx_trigger: ForeignFile | None = None
        self.intx_unmask: ForeignFile | None = None
        self.intx_masked = False
        self.intx_pending = False
        self.msi_nvec = 0
        self.msi_ctx: dict[int, ForeignFile] = {}
        self.err_trigger: ForeignFile | None = None
        self.req_trigger: ForeignFile | None = None

    # -- dispatch -------------------------------------------------------------
    def set_irqs(self, task: Task, flags: int, index: int, start: int, count: int, data: bytes) -> int:
        """Models vfio_pci_set_irqs_ioctl()."""
        action = flags & C.VFIO_IRQ_SET_ACTION_TYPE_MASK
        fn = None
        if index == INTX:
            fn = {C.VFIO_IRQ_SET_ACTION_MASK: self._intx_mask, C.VFIO_IRQ_SET_ACTION_UNMASK: self._intx_unmask,
                  C.VFIO_IRQ_SET_ACTION_TRIGGER: self._intx_trigger}.get(action)
        elif index in (MSI, MSIX):
            if action == C.VFIO_IRQ_SET_ACTION_TRIGGER:
                fn = self._msi_trigger
        elif index == ERR:
            if action == C.VFIO_IRQ_SET_ACTION_TRIGGER and self.is_pcie:
                fn = self._err_trigger
        elif index == REQ:
            if action == C.VFIO_IRQ_SET_ACTION_TRIGGER:
                fn = self._req_trigger
        if fn is None:
            raise KernelError(errno.ENOTTY)
        return fn(task, flags, index, start, count, data)

    # -- INTx -------------------------------------------------------------------
    def _intx_trigger(self, task: Task, flags: int, index: int, start: int, count: int, data: bytes) -> int:
        """Models vfio_pci_set_intx_trigger()."""
        if self.irq_type == INTX and not count and flags & C.VFIO_IRQ_SET_DATA_NONE:
            self.intx_disable()
            return 0
        if self.irq_type not in (INTX, IRQ_NONE) or start != 0 or count != 1:
            raise KernelError(errno.EINVAL)
        if flags & C.VFIO_IRQ_SET_DATA_EVENTFD:
            fd = int.from_bytes(data[:4], "little", signed=True)
            trigger = eventfd_ctx_fdget(task, fd) if fd >= 0 else None
            if self.irq_type == INTX:
                if self.intx_trigger is not None:
                    self.intx_trigger.close()
                self.intx_trigger = trigger
            else:
                self.irq_type = INTX
                self.intx_trigger = trigger
                self.intx_masked = False
            return 0
        if self.irq_type != INTX:
            raise KernelError(errno.EINVAL)
        if flags & C.VFIO_IRQ_SET_DATA_NONE or (flags & C.VFIO_IRQ_SET_DATA_BOOL and data[0]):
            # vfio_send_intx_eventfd(): loopback signals whatever the mask state
            if self.intx_trigger is not None:
                self.intx_trigger.signal(1)
        return 0

    def _intx_mask(self, task: Task, flags: int, index: int, start: int, count: int, data: bytes) -> int:
        """Models vfio_pci_set_intx_mask()."""
        if self.irq_type != INTX or start != 0 or count != 1:
            raise KernelError(errno.EINVAL)
        if flags & C.VFIO_IRQ_SET_DATA_EVENTFD:
            raise KernelError(errno.ENOTTY)
        if flags & C.VFIO_IRQ_SET_DATA_NONE or (flags & C.VFIO_IRQ_SET_DATA_BOOL and data[0]):
            self.intx_masked = True
        return 0

    def _intx_unmask(self, task: Task, flags: int, index: int, start: int, count: int, data: bytes) -> int:
        """Models vfio_pci_set_intx_unmask()."""
        if self.irq_type != INTX or start != 0 or count != 1:
            raise KernelError(errno.EINVAL)
        if flags & C.VFIO_IRQ_SET_DATA_EVENTFD:
            fd = int.from_bytes(data[:4], "little", signed=True)
            if fd >= 0:
                ev = eventfd_ctx_fdget(task, fd)
                if self.intx_unmask is not None:
                    self.intx_unmask.close()
                self.intx_unmask = ev
            elif self.intx_unmask is not None:
                self.intx_unmask.close()
                self.intx_unmask = None
            return 0
        if flags & C.VFIO_IRQ_SET_DATA_NONE or (flags & C.VFIO_IRQ_SET_DATA_BOOL and data[0]):
            self._unmask_intx()
        return 0

    def _send_intx(self) -> bool:
        """Models vfio_intx_handler(): signal and automask, unless masked (then pending)."""
        if self.intx_masked:
            self.intx_pending = True
            return False
        self.intx_masked = True
        if self.intx_trigger is not None:
            self.intx_trigger.signal(1)
            return True
        return False

    def _unmask_intx(self) -> None:
        self.intx_masked = False
        if self.intx_pending:
            self.intx_pending = False
            self._send_intx()

    def intx_disable(self) -> None:
        """Models vfio_intx_disable()."""
        for ev in (self.intx_trigger, self.intx_unmask):
            if ev is not None:
                ev.close()
        self.intx_trigger = self.intx_unmask = None
        self.intx_masked = self.intx_pending = False
        self.irq_type = IRQ_NONE

    # -- MSI / MSI-X ----------------------------------------------------------
    def _msi_trigger(self, task: Task, flags: int, index: int, start: int, count: int, data: bytes) -> int:
        """Models vfio_pci_set_msi_trigger()."""
        if self.irq_type == index and not count and flags & C.VFIO_IRQ_SET_DATA_NONE:
            self.msi_disable()
            return 0
        if self.irq_type not in (index, IRQ_NONE):
            raise KernelError(errno.EINVAL)
        if flags & C.VFIO_IRQ_SET_DATA_EVENTFD:
            fds = [int.from_bytes(data[4 * i: 4 * i + 4], "little", signed=True) for i in range(count)]
            enabling = self.irq_type != index
            nvec = start + count if enabling else self.msi_nvec
            if index == MSI and not enabling and start + count > nvec:
                raise KernelError(errno.EINVAL, "vector beyond the enabled MSI vectors")
            got: list[ForeignFile | None] = []
            try:
                for fd in fds:
                    got.append(eventfd_ctx_fdget(task, fd) if fd >= 0 else None)
            except KernelError:
                for ev in got:
                    if ev is not None:
                        ev.close()
                raise
            if enabling:
                self.irq_type = index
                self.msi_nvec = nvec
            for i, ev in enumerate(got):
                old = self.msi_ctx.pop(start + i, None)
                if old is not None:
                    old.close()
                if ev is not None:
                    self.msi_ctx[start + i] = ev
            return 0
        if self.irq_type != index:
            raise KernelError(errno.EINVAL)
        for i in range(start, start + count):
            ev = self.msi_ctx.get(i)
            if ev is None:
                continue
            if flags & C.VFIO_IRQ_SET_DATA_NONE or (flags & C.VFIO_IRQ_SET_DATA_BOOL and data[i - start]):
                ev.signal(1)
        return 0

    def msi_disable(self) -> None:
        """Models vfio_msi_disable()."""
        for ev in self.msi_ctx.values():
            ev.close()
        self.msi_ctx.clear()
        self.msi_nvec = 0
        self.irq_type = IRQ_NONE

    # -- ERR / REQ --------------------------------------------------------------
    def _err_trigger(self, task: Task, flags: int, index: int, start: int, count: int, data: bytes) -> int:
        if start != 0 or count > 1:
            raise KernelError(errno.EINVAL)
        self.err_trigger = self._single(task, self.err_trigger, count, flags, data)
        return 0

    def _req_trigger(self, task: Task, flags: int, index: int, start: int, count: int, data: bytes) -> int:
        if start != 0 or count > 1:
            raise KernelError(errno.EINVAL)
        self.req_trigger = self._single(task, self.req_trigger, count, flags, data)
        return 0

    @staticmethod
    def _single(task: Task, ctx: ForeignFile | None, count: int, flags: int, data: bytes) -> ForeignFile | None:
        """Models vfio_pci_set_ctx_trigger_single(); returns the new trigger."""
        if flags & C.VFIO_IRQ_SET_DATA_NONE:
            if ctx is not None:
                if count:
                    ctx.signal(1)
                    return ctx
                ctx.close()
                return None
        elif flags & C.VFIO_IRQ_SET_DATA_BOOL:
            if not count:
                raise KernelError(errno.EINVAL)
            if data[0] and ctx is not None:
                ctx.signal(1)
            return ctx
        elif flags & C.VFIO_IRQ_SET_DATA_EVENTFD:
            if not count:
                raise KernelError(errno.EINVAL)
            fd = int.from_bytes(data[:4], "little", signed=True)
            if fd == -1:
                if ctx is not None:
                    ctx.close()
                return None
            if fd >= 0:
                ev = eventfd_ctx_fdget(task, fd)
                if ctx is not None:
                    ctx.close()
                return ev
            return ctx
        raise KernelError(errno.EINVAL)

    # -- the device side ----------------------------------------------------------
    def raise_irq(self, index: int, vector: int = 0) -> bool:
        """The device asserts interrupt ``vector`` of ``index``; True if an eventfd was signalled."""
        if index == INTX:
            if self.irq_type != INTX:
                return False
            return self._send_intx()
        if index in (MSI, MSIX):
            if self.irq_type != index:
                return False
            ev = self.msi_ctx.get(vector)
            if ev is None:
                return False
            ev.signal(1)
            return True
        ev = self.err_trigger if index == ERR else self.req_trigger if index == REQ else None
        if ev is None:
            return False
        ev.signal(1)
        return True

    def teardown(self) -> None:
        """vfio_pci_core_disable(): every trigger off, every eventfd closed."""
        if self.irq_type == INTX:
            self.intx_disable()
        elif self.irq_type in (MSI, MSIX):
            self.msi_disable()
        for ev in (self.err_trigger, self.req_trigger):
            if ev is not None:
                ev.close()
        self.err_trigger = self.req_trigger = None

    def describe(self) -> dict[str, Any]:
        names = {IRQ_NONE: "none", INTX: "intx", MSI: "msi", MSIX: "msix"}
        return {
            "type": names[self.irq_type],
            "intx_masked": self.intx_masked,
            "vectors": sorted(self.msi_ctx),
            "err": self.err_trigger is not None,
            "req": self.req_trigger is not None,
            "eventfds": self.eventfd_count(),
        }

    def eventfd_count(self) -> int:
        n = len(self.msi_ctx)
        for ev in (self.intx_trigger, self.intx_unmask, self.err_trigger, self.req_trigger):
            n += ev is not None
        return n
