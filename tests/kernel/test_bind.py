"""Driver binding through the driver core's sysfs files (Kernel.*_store).

driver_override (driver_set_override), bind / unbind (bus.c bind_store,
unbind_store), drivers_probe (device_attach over the drivers in order),
new_id / remove_id, reset and remove; the iommu group ownership rule of
pci_dma_configure(); the unbind of a held vfio-pci device waiting for its
release (vfio_unregister_group_dev) with REQ at once and every 10 s.
"""

from __future__ import annotations

import errno as E
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fakedev.kernel.errors import KernelError
from fakedev.kernel.kernel import Blocked, Kernel
from fakedev.kernel.version import KernelVersion
from tests.kernel import topologies as T
from tests.kernel.conftest import Proc, errno_of
from tests.kernel.test_unplug import Clock, set_req

ROOT, F0, F1 = "0000:00:1c.0", "0000:01:00.0", "0000:01:00.1"
VFIO = "vfio-pci"


def make(topology: str = "host-driver-sibling", version: str = "6.12") -> tuple[Kernel, Clock]:
    clock = Clock()
    k = Kernel(T.build(topology), KernelVersion.parse(version), clock=clock)
    return k, clock


def b(text: str) -> bytes:
    return text.encode()


def paths(k: Kernel) -> set[str]:
    return {n.path for n in k.nodes()}


def drivers(k: Kernel) -> dict[str, str | None]:
    return {p.name: p.driver for p in k.topology.devices()}


def check(k: Kernel) -> None:
    assert k.check_invariants() == []


# ------------------------------------------------------------------ driver_override


def test_driver_override_store_and_show() -> None:
    k, _ = make()
    assert k.driver_override_show(F1) == "(null)\n"
    assert k.driver_override_store(F1, b"vfio-pci\n") == 9
    assert k.driver_override_show(F1) == "vfio-pci\n"
    assert k.driver_override_store(F1, b"igb\nrest") == 8  # cut at the first newline
    assert k.driver_override_show(F1) == "igb\n"
    assert k.driver_override_store(F1, b"\n") == 1  # a newline alone clears
    assert k.driver_override_show(F1) == "(null)\n"
    k.driver_override_store(F1, b"vfio-pci")
    assert k.driver_override_store(F1, b"") == 0
    assert k.driver_override_show(F1) == "(null)\n"
    k.driver_override_store(F1, b"vfio-pci")
    assert k.driver_override_store(F1, b"\0\0\0") == 3  # strlen() is 0: cleared
    assert k.driver_override_show(F1) == "(null)\n"
    assert k.driver_override_store(F1, b"x" * 4094) == 4094
    assert errno_of(lambda: k.driver_override_store(F1, b"x" * 4095)) == E.EINVAL
    assert k.driver_override_show(F1) == "x" * 4094 + "\n"  # unchanged by the failure
    assert errno_of(lambda: k.driver_override_store("0000:09:00.0", b"igb")) == E.ENODEV
    # an override changes nothing until the next probe
    assert drivers(k)[F1] == "igb"
    check(k)


# ------------------------------------------------------------------ the libvirt sequence


def test_libvirt_moves_a_host_function_to_vfio_pci_and_back() -> None:
    k, _ = make()
    assert [(d.index, d.name) for d in k.vfio_devices()] == [(0, F0)]
    k.driver_override_store(F1, b"vfio-pci")
    assert k.unbind_store("igb", b(F1 + "\n")) == len(F1) + 1
    assert drivers(k)[F1] is None
    check(k)
    assert k.drivers_probe_store(b(F1)) == len(F1)
    assert drivers(k)[F1] == VFIO
    assert [(d.index, d.name) for d in k.vfio_devices()] == [(0, F0), (1, F1)]
    assert {"vfio/devices/vfio1", "vfio/14"} <= paths(k)
    check(k)
    # both functions are now owned: the zero-length hot reset works
    p = Proc(k)
    ifd = p.open("iommu")
    d0, _ = p.cdev_bound(0, ifd)
    d1, _ = p.cdev_bound(1, ifd)
    before = len(k.reset_log)
    assert p.hot_reset(d0) == 0
    assert sorted(r.bdf for r in k.reset_log[before:]) == [F0, F1]
    p.close(d1)
    p.close(d0)
    p.close(ifd)
    # and back to igb
    assert k.unbind_store(VFIO, b(F1)) == len(F1)
    assert "vfio/devices/vfio1" not in paths(k) and "vfio/14" not in paths(k)
    k.driver_override_store(F1, b"\n")
    k.drivers_probe_store(b(F1))
    assert drivers(k)[F1] == "igb"
    assert [(d.index, d.name) for d in k.vfio_devices()] == [(0, F0)]
    check(k)


def test_drivers_probe_without_override_binds_only_the_tree_driver() -> None:
    k, _ = make()
    k.unbind_store("igb", b(F1))
    k.unbind_store(VFIO, b(F0))
    assert k.drivers_probe_store(b(F0)) == len(F0)  # vfio-pci has no id without an override
    assert drivers(k)[F0] is None
    assert k.drivers_probe_store(b(F1)) == len(F1)
    assert drivers(k)[F1] == "igb"
    assert k.drivers_probe_store(b(F1)) == len(F1)  # bound already: nothing to do
    assert errno_of(lambda: k.drivers_probe_store(b"0000:05:00.0")) == E.ENODEV
    k.driver_override_store(F0, b"igb")  # an override names any driver
    k.drivers_probe_store(b(F0))
    assert drivers(k)[F0] == "igb"
    check(k)


# ------------------------------------------------------------------ bind / unbind errnos


def test_bind_and_unbind_errnos() -> None:
    k, _ = make()
    # unbind: only from the driver that has it
    assert errno_of(lambda: k.unbind_store(VFIO, b(F1))) == E.ENODEV
    assert errno_of(lambda: k.unbind_store("igb", b"0000:07:00.0")) == E.ENODEV
    assert errno_of(lambda: k.unbind_store("e1000e", b(F1))) == E.ENOENT  # no such driver file
    # bind: the driver must match, then the device must be free
    assert errno_of(lambda: k.bind_store(VFIO, b(F1))) == E.ENODEV  # no override, no id
    k.driver_override_store(F1, b"vfio-pci")
    assert errno_of(lambda: k.bind_store("igb", b(F1))) == E.ENODEV  # the override excludes igb
    assert errno_of(lambda: k.bind_store(VFIO, b(F1))) == E.EBUSY  # matches, but igb has it
    k.unbind_store("igb", b(F1))
    assert k.bind_store(VFIO, b(F1 + "\n")) == len(F1) + 1
    assert drivers(k)[F1] == VFIO
    assert errno_of(lambda: k.bind_store(VFIO, b"0000:01:00.7")) == E.ENODEV
    check(k)


def test_vfio_pci_refuses_a_bridge() -> None:
    k, _ = make()
    assert k.unbind_store("pcieport", b(ROOT)) == len(ROOT)
    k.driver_override_store(ROOT, b"vfio-pci")
    assert errno_of(lambda: k.bind_store(VFIO, b(ROOT))) == E.EINVAL  # not a normal header
    assert drivers(k)[ROOT] is None
    assert k.drivers_probe_store(b(ROOT)) == len(ROOT)  # a failed probe: the next driver, none
    assert drivers(k)[ROOT] is None
    k.driver_override_store(ROOT, b"")
    k.drivers_probe_store(b(ROOT))
    assert drivers(k)[ROOT] == "pcieport"
    check(k)


def test_host_driver_refused_while_a_user_owns_the_group() -> None:
    k = Kernel(T._nic((13, 13), ("vfio-pci", "igb")))
    p = Proc(k)
    assert errno_of(lambda: p.cdev_bound(0, p.open("iommu"))) == E.EPERM  # igb holds the group
    k.unbind_store("igb", b(F1))
    ifd = p.open("iommu")
    d0, _ = p.cdev_bound(0, ifd)  # group 13 is user-owned now
    assert errno_of(lambda: k.bind_store("igb", b(F1))) == E.EBUSY  # iommu_device_use_default_domain
    assert errno_of(lambda: k.drivers_probe_store(b(F1))) == E.EINVAL  # the same, as drivers_probe says it
    assert drivers(k)[F1] is None
    check(k)
    k.driver_override_store(F1, b"vfio-pci")  # vfio-pci manages DMA itself: it may join
    assert k.drivers_probe_store(b(F1)) == len(F1)
    assert drivers(k)[F1] == VFIO
    check(k)
    k.unbind_store(VFIO, b(F1))
    k.driver_override_store(F1, b"\n")
    p.close(d0)
    assert k.bind_store("igb", b(F1)) == len(F1)
    check(k)


# ------------------------------------------------------------------ unbind of a held device


def test_unbind_of_an_open_device_waits_for_the_release() -> None:
    k, clock = make("dual-function-nic")
    p = Proc(k)
    ifd = p.open("iommu")
    d1, _ = p.cdev_bound(1, ifd)
    ev = set_req(p, d1)
    clock.now = 50.0
    res = k.unbind_store(VFIO, b(F1))
    assert isinstance(res, Blocked) and not res.retry and not res.pending.done
    assert ev.counter == 1  # type: ignore[attr-defined]
    check(k)
    assert k.describe()["unbinds"] == [{"bdf": F1, "waiting_for": F1, "requests": 1, "next_request": 60.0}]
    # new opens fail, the holder keeps a working device
    assert errno_of(lambda: Proc(k).open("vfio/devices/vfio1")) == E.ENODEV
    assert "vfio/devices/vfio1" in paths(k)
    # asked again every 10 s
    assert k.unplug_tick(59.0) == 60.0
    assert k.unplug_tick(60.0) == 70.0
    assert ev.counter == 2  # type: ignore[attr-defined]
    # a second unbind, a bind and a reset wait for the device lock, then run again
    again = k.unbind_store(VFIO, b(F1))
    assert isinstance(again, Blocked) and again.retry and again.pending is res.pending
    k.driver_override_store(F1, b"vfio-pci")
    assert isinstance(k.bind_store(VFIO, b(F1)), Blocked)
    assert isinstance(k.drivers_probe_store(b(F1)), Blocked)
    check(k)
    p.close(d1)
    assert res.pending.done
    assert drivers(k)[F1] is None
    assert "vfio/devices/vfio1" not in paths(k) and "vfio/14" not in paths(k)
    assert k.unplug_tick(80.0) is None
    assert ev.counter == 2  # type: ignore[attr-defined]
    assert errno_of(lambda: k.unbind_store(VFIO, b(F1))) == E.ENODEV  # the retried second unbind
    check(k)


def test_removal_of_a_device_being_unbound_waits_for_the_unbind() -> None:
    k, _ = make("dual-function-nic")
    p = Proc(k)
    d1, _ = p.cdev_bound(1, p.open("iommu"))
    ev = set_req(p, d1)
    res = k.unbind_store(VFIO, b(F1))
    assert isinstance(res, Blocked)
    k.unplug_device(F1)
    assert ev.counter == 1  # type: ignore[attr-defined]  # the removal asks nothing more
    assert k.unplug_tick(10.0) == 20.0
    assert ev.counter == 2  # type: ignore[attr-defined]  # one timer: the unbind's
    check(k)
    p.close(d1)
    assert res.pending.done
    assert F1 not in drivers(k)
    assert k.unplugs == [] and k.unbinds == []
    check(k)


def test_sysfs_remove_waits_for_the_release() -> None:
    k, _ = make("dual-function-nic")
    p = Proc(k)
    d0, _ = p.cdev_bound(0, p.open("iommu"))
    assert errno_of(lambda: k.remove_store(F0, b"yes")) == E.EINVAL
    assert k.remove_store(F0, b"0\n") == 2
    res = k.remove_store(F0, b"1\n")
    assert isinstance(res, Blocked) and not res.retry
    assert F0 in drivers(k)
    p.close(d0)
    assert res.pending.done and F0 not in drivers(k)
    check(k)
    assert k.remove_store(F1, b"1") == 1  # nobody holds it: gone at once
    assert F1 not in drivers(k)
    check(k)


# ------------------------------------------------------------------ numbering, cycles


def test_vfio_index_is_the_lowest_free() -> None:
    k, _ = make("dual-function-nic")
    k.unbind_store(VFIO, b(F0))
    k.unbind_store(VFIO, b(F1))
    for f in (F1, F0):
        k.driver_override_store(f, b"vfio-pci")
    k.drivers_probe_store(b(F1))
    assert [(d.index, d.name) for d in k.vfio_devices()] == [(0, F1)]
    k.drivers_probe_store(b(F0))
    assert sorted((d.index, d.name) for d in k.vfio_devices()) == [(0, F1), (1, F0)]
    nodes = {n.path: n.minor for n in k.nodes()}
    assert nodes["vfio/devices/vfio0"] == 0 and nodes["vfio/14"] == 0 and nodes["vfio/13"] == 1
    check(k)


@pytest.mark.parametrize("version", ["6.6", "6.12"])
def test_unbind_rebind_cycles_keep_the_invariants(version: str) -> None:
    k, _ = make("host-driver-sibling", version)
    p = Proc(k)
    ifd = p.open("iommu")
    for _ in range(3):
        k.driver_override_store(F1, b"vfio-pci")
        k.unbind_store("igb", b(F1))
        k.drivers_probe_store(b(F1))
        check(k)
        d1, _ = p.cdev_bound(1, ifd)
        res = k.unbind_store(VFIO, b(F1))
        assert isinstance(res, Blocked)
        check(k)
        p.close(d1)
        assert res.pending.done
        k.driver_override_store(F1, b"\n")
        k.drivers_probe_store(b(F1))
        assert drivers(k)[F1] == "igb"
        assert [(d.index, d.name) for d in k.vfio_devices()] == [(0, F0)]
        check(k)


# ------------------------------------------------------------------ new_id, reset


def test_new_id_and_remove_id() -> None:
    k, _ = make()
    k.unbind_store("igb", b(F1))
    assert errno_of(lambda: k.new_id_store(VFIO, b"1b36")) == E.EINVAL
    assert k.new_id_store(VFIO, b"1b36 00f1\n") == 10
    assert drivers(k)[F1] == VFIO  # driver_attach() took the unbound function
    assert errno_of(lambda: k.new_id_store(VFIO, b"1b36 00f1")) == E.EEXIST
    k.unbind_store(VFIO, b(F1))
    k.drivers_probe_store(b(F1))  # vfio-pci comes after igb, which matches first
    assert drivers(k)[F1] == "igb"
    assert k.remove_id_store(VFIO, b"1b36 f1") == 7
    assert errno_of(lambda: k.remove_id_store(VFIO, b"1b36 00f1")) == E.ENODEV
    check(k)


def test_sysfs_reset() -> None:
    k, _ = make("flr-device")
    bdf = next(d.name for d in k.vfio_devices())
    assert errno_of(lambda: k.reset_store(bdf, b"2")) == E.EINVAL
    assert k.reset_store(bdf, b"1\n", pid=42) == 2
    rec = k.reset_log[-1]
    assert (rec.bdf, rec.method, rec.cause, rec.pid) == (bdf, "flr", "sysfs", 42)
    k2, _ = make("dual-function-nic")  # no FLR, PM without soft reset, a shared bus
    assert errno_of(lambda: k2.reset_store(F0, b"1")) == E.ENOTTY


# ------------------------------------------------------------------ random sequences

BDFS = (ROOT, F0, F1)
DRIVERS = ("igb", "pcieport", VFIO)
OPS = st.one_of(
    st.tuples(st.just("override"), st.sampled_from(BDFS), st.sampled_from(["vfio-pci", "igb", "\n", ""])),
    st.tuples(st.just("unbind"), st.sampled_from(DRIVERS), st.sampled_from(BDFS)),
    st.tuples(st.just("bind"), st.sampled_from(DRIVERS), st.sampled_from(BDFS)),
    st.tuples(st.just("probe"), st.just(""), st.sampled_from(BDFS)),
    st.tuples(st.just("open"), st.just(""), st.sampled_from(["0", "1"])),
    st.tuples(st.just("close"), st.just(""), st.sampled_from(["0", "1", "2"])),
    st.tuples(st.just("unplug"), st.just(""), st.sampled_from(BDFS)),
    st.tuples(st.just("tick"), st.just(""), st.just("")),
)


@pytest.mark.parametrize("tree", ["host-driver-sibling", "shared-group", "igb-in-the-group"])
@settings(max_examples=40, deadline=None, derandomize=True)
@given(ops=st.lists(OPS, max_size=30))
def test_random_bind_sequences_keep_the_invariants(tree: str, ops: list[tuple[str, str, str]]) -> None:
    """Any sequence of overrides, unbinds, binds, probes, opens, closes and
    removals: the invariants hold after each call, a failed store changes
    nothing, and once every file is closed nothing waits."""
    if tree == "igb-in-the-group":
        clock = Clock()
        k = Kernel(T._nic((13, 13), ("vfio-pci", "igb")), clock=clock)
    else:
        k, clock = make(tree)
    p = Proc(k)
    ifd = p.open("iommu")
    held: list[int] = []
    for op, a, bdf in ops:
        before = json.dumps(k.describe(), sort_keys=True, default=str)
        try:
            if op == "override":
                k.driver_override_store(bdf, b(a))
            elif op == "unbind":
                k.unbind_store(a, b(bdf))
            elif op == "bind":
                k.bind_store(a, b(bdf))
            elif op == "probe":
                k.drivers_probe_store(b(bdf))
            elif op == "open":
                held.append(p.cdev_bound(int(bdf), ifd)[0])
            elif op == "close":
                if int(bdf) < len(held):
                    p.close(held.pop(int(bdf)))
            elif op == "unplug":
                k.unplug_device(bdf)
            else:
                clock.now += 10.0
                k.unplug_tick()
        except KernelError:
            if op not in ("open", "unplug"):  # (an open's partial work is undone by its own paths)
                assert json.dumps(k.describe(), sort_keys=True, default=str) == before, op
        check(k)
    for fd in sorted(p.p.fds):  # held ones, and opens whose bind failed
        if fd != ifd:
            p.close(fd)
    assert k.unbinds == [] and k.unplugs == []
    check(k)
