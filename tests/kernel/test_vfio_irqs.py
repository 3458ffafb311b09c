"""VFIO_DEVICE_SET_IRQS: validation, INTx / MSI / MSI-X / ERR / REQ, eventfd lifetime (SPEC 3.8)."""

from __future__ import annotations

import errno as E
import struct

from fakedev.uapi import consts as C
from fakedev.uapi import ioctls as IO
from fakedev.uapi import structs as S
from tests.kernel.conftest import Proc, Rig, errno_of

NONE, BOOL, EFD = C.VFIO_IRQ_SET_DATA_NONE, C.VFIO_IRQ_SET_DATA_BOOL, C.VFIO_IRQ_SET_DATA_EVENTFD
MASK, UNMASK, TRIG = C.VFIO_IRQ_SET_ACTION_MASK, C.VFIO_IRQ_SET_ACTION_UNMASK, C.VFIO_IRQ_SET_ACTION_TRIGGER
DEV = "0000:02:00.0"


def setup() -> tuple[Rig, Proc, int]:
    r = Rig("flr-device")
    p = r["p"]
    a = p.open("iommu")
    d, _ = p.cdev_bound(0, a)
    return r, p, d


def set_irqs(p: Proc, d: int, flags: int, index: int, start: int, count: int, data: bytes = b"",
             argsz: int | None = None) -> int:
    hdr = S.VFIO_IRQ_SET.pack(argsz=argsz if argsz is not None else 20 + len(data), flags=flags,
                              index=index, start=start, count=count)
    return p.ioctl(d, IO.VFIO_DEVICE_SET_IRQS, p.buf(hdr + data))


def fds(*n: int) -> bytes:
    return b"".join(struct.pack("<i", x) for x in n)


def test_validate_and_prepare() -> None:
    _, p, d = setup()
    assert errno_of(lambda: set_irqs(p, d, EFD | TRIG, 0, 0, 1, fds(-1), argsz=19)) == E.EINVAL
    assert errno_of(lambda: set_irqs(p, d, EFD | TRIG, 5, 0, 1, fds(-1))) == E.EINVAL
    assert errno_of(lambda: set_irqs(p, d, EFD | TRIG | (1 << 6), 0, 0, 1, fds(-1))) == E.EINVAL
    assert errno_of(lambda: set_irqs(p, d, NONE | TRIG, 1, 2, 0xFFFFFFFE)) == E.EINVAL
    assert errno_of(lambda: set_irqs(p, d, EFD | TRIG, 0, 1, 1, fds(-1))) == E.EINVAL  # start >= 1
    assert errno_of(lambda: set_irqs(p, d, EFD | TRIG, 1, 2, 3, fds(-1, -1, -1))) == E.EINVAL  # > 4 vectors
    assert errno_of(lambda: set_irqs(p, d, EFD | BOOL | TRIG, 0, 0, 1, fds(-1))) == E.EINVAL
    assert errno_of(lambda: set_irqs(p, d, TRIG, 0, 0, 1)) == E.EINVAL
    assert errno_of(lambda: set_irqs(p, d, EFD | TRIG, 1, 0, 2, fds(-1), argsz=24)) == E.EINVAL  # short payload
    assert errno_of(lambda: set_irqs(p, d, EFD | MASK, 1, 0, 1, fds(-1))) == E.ENOTTY
    assert errno_of(lambda: set_irqs(p, d, NONE | MASK, 3, 0, 1)) == E.ENOTTY
    assert errno_of(lambda: set_irqs(p, d, NONE | MASK | UNMASK, 0, 0, 1)) == E.ENOTTY
    assert errno_of(lambda: p.ioctl(d, IO.VFIO_DEVICE_SET_IRQS, 0x10)) == E.EFAULT


def test_intx_trigger_mask_unmask() -> None:
    r, p, d = setup()
    efd, ev = p.p.eventfd()
    assert errno_of(lambda: set_irqs(p, d, NONE | MASK, 0, 0, 1)) == E.EINVAL  # INTx not enabled
    assert set_irqs(p, d, EFD | TRIG, 0, 0, 1, fds(efd)) == 0
    assert ev.refs == 2
    assert r.k.raise_irq(DEV, 0) and ev.counter == 1
    assert not r.k.raise_irq(DEV, 0) and ev.counter == 1  # automasked
    set_irqs(p, d, NONE | UNMASK, 0, 0, 1)
    assert ev.counter == 2  # the pending interrupt is delivered on unmask
    set_irqs(p, d, NONE | UNMASK, 0, 0, 1)
    set_irqs(p, d, BOOL | MASK, 0, 0, 1, b"\x01")
    assert not r.k.raise_irq(DEV, 0)
    set_irqs(p, d, BOOL | UNMASK, 0, 0, 1, b"\x01")
    assert ev.counter == 3  # the pending one, on unmask
    set_irqs(p, d, NONE | TRIG, 0, 0, 1)  # loopback signals even while (auto)masked
    assert ev.counter == 4
    # MSI while INTx is on: EINVAL
    assert errno_of(lambda: set_irqs(p, d, EFD | TRIG, 1, 0, 1, fds(efd))) == E.EINVAL
    set_irqs(p, d, NONE | TRIG, 0, 0, 0)  # disable
    assert ev.refs == 1
    assert r.k.device(DEV).irqs.irq_type == -1


def test_eventfd_errors_change_nothing() -> None:
    r, p, d = setup()
    pipe = p.p.pipe()
    assert errno_of(lambda: set_irqs(p, d, EFD | TRIG, 0, 0, 1, fds(pipe))) == E.EINVAL
    assert p.p.fds[pipe].refs == 1  # type: ignore[union-attr]
    assert errno_of(lambda: set_irqs(p, d, EFD | TRIG, 0, 0, 1, fds(77))) == E.EBADF
    assert errno_of(lambda: set_irqs(p, d, EFD | TRIG, 0, 0, 1, fds(d))) == E.EINVAL  # a model file
    e1, ev1 = p.p.eventfd()
    assert errno_of(lambda: set_irqs(p, d, EFD | TRIG, 2, 0, 2, fds(e1, pipe))) == E.EINVAL
    assert ev1.refs == 1
    assert r.k.device(DEV).irqs.irq_type == -1


def test_msix_vectors_and_teardown_on_close() -> None:
    r, p, d = setup()
    e0, ev0 = p.p.eventfd()
    e1, ev1 = p.p.eventfd()
    assert set_irqs(p, d, EFD | TRIG, 2, 0, 2, fds(e0, e1)) == 0
    assert r.k.raise_irq(DEV, 2, 1) and ev1.counter == 1
    assert not r.k.raise_irq(DEV, 2, 3)
    e3, ev3 = p.p.eventfd()
    set_irqs(p, d, EFD | TRIG, 2, 3, 1, fds(e3))  # dynamic MSI-X: add a vector later
    assert r.k.raise_irq(DEV, 2, 3) and ev3.counter == 1
    set_irqs(p, d, EFD | TRIG, 2, 0, 1, fds(-1))  # drop vector 0
    assert ev0.refs == 1 and not r.k.raise_irq(DEV, 2, 0)
    set_irqs(p, d, BOOL | TRIG, 2, 0, 2, b"\x01\x01")
    assert ev1.counter == 2
    # ERR / REQ
    e4, ev4 = p.p.eventfd()
    set_irqs(p, d, EFD | TRIG, 3, 0, 1, fds(e4))
    set_irqs(p, d, NONE | TRIG, 3, 0, 1)
    assert ev4.counter == 1
    assert errno_of(lambda: set_irqs(p, d, BOOL | TRIG, 4, 0, 0)) == E.EINVAL
    assert errno_of(lambda: set_irqs(p, d, NONE | TRIG, 4, 0, 1)) == E.EINVAL  # no trigger set
    assert r.k.describe()["devices"][0]["irqs"]["eventfds"] == 3
    p.close(d)
    assert (ev0.refs, ev1.refs, ev3.refs, ev4.refs) == (1, 1, 1, 1)


def test_msi_block_limits() -> None:
    _, p, d = setup()
    e0, ev0 = p.p.eventfd()
    set_irqs(p, d, EFD | TRIG, 1, 0, 2, fds(e0, -1))  # enables 2 vectors
    assert errno_of(lambda: set_irqs(p, d, EFD | TRIG, 1, 2, 1, fds(e0))) == E.EINVAL
    set_irqs(p, d, NONE | TRIG, 1, 0, 0)
    assert ev0.refs == 1


def test_intx_absent_on_pinless_device() -> None:
    r = Rig("flr-device")
    dev = r.topo.find(DEV)
    assert dev is not None
    dev.config[0x3D] = 0
    from fakedev.kernel.kernel import Kernel

    k = Kernel(r.topo)
    p = Proc(k)
    a = p.open("iommu")
    d, _ = p.cdev_bound(0, a)
    assert errno_of(lambda: set_irqs(p, d, EFD | TRIG, 0, 0, 1, fds(-1))) == E.EINVAL
