"""The hot-reset series: SPEC 4.9 worked examples (a)-(f) on both INFO versions,
and the ordering rules of VFIO_DEVICE_PCI_HOT_RESET / GET_PCI_HOT_RESET_INFO."""

from __future__ import annotations

import errno as E

import pytest

from fakedev.uapi import consts as C
from tests.kernel.conftest import VERSIONS, Rig, errno_of

NOT_OWNED = C.VFIO_PCI_DEVID_NOT_OWNED
DEV_ID = C.VFIO_PCI_HOT_RESET_FLAG_DEV_ID
OWNED = C.VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED
F0, F1 = "0000:01:00.0", "0000:01:00.1"


def resets(r: Rig, since: int = 0) -> list[tuple[str, str, str]]:
    return [(x.bdf, x.method, x.cause) for x in r.k.reset_log[since:]]


@pytest.mark.parametrize("ver", VERSIONS)
def test_example_a_one_bound_other_unowned(ver: str) -> None:
    r = Rig("dual-function-nic", ver)
    p = r["p"]
    a = p.open("iommu")
    d0, devid = p.cdev_bound(0, a)
    assert devid == 1
    err, hdr, ents = p.hot_reset_info(d0, argsz=28)
    assert err == 0
    assert hdr == {"argsz": 28, "flags": DEV_ID, "count": 2}
    assert ents == [(1, 0, 1, 0x00), (NOT_OWNED, 0, 1, 0x01)]
    before = len(r.k.reset_log)
    assert errno_of(lambda: p.hot_reset(d0)) == E.EINVAL
    assert errno_of(lambda: p.hot_reset(d0, count=1, argsz=16)) == E.EINVAL
    assert len(r.k.reset_log) == before
    r.check()


@pytest.mark.parametrize("ver", VERSIONS)
def test_example_b_both_bound_resets_both(ver: str) -> None:
    r = Rig("dual-function-nic", ver)
    p = r["p"]
    a = p.open("iommu")
    d0, id0 = p.cdev_bound(0, a)
    _, id1 = p.cdev_bound(1, a)
    assert (id0, id1) == (1, 2)
    err, hdr, ents = p.hot_reset_info(d0)
    assert err == 0 and hdr["flags"] == DEV_ID | OWNED and hdr["count"] == 2
    assert ents == [(1, 0, 1, 0), (2, 0, 1, 1)]
    mark = len(r.k.reset_log)
    assert p.hot_reset(d0) == 0
    assert resets(r, mark) == [(F0, "bus", "VFIO_DEVICE_PCI_HOT_RESET"), (F1, "bus", "VFIO_DEVICE_PCI_HOT_RESET")]
    rec = r.k.reset_log[-1]
    assert rec.pid == p.p.pid and rec.reset_count == 1
    r.check()


@pytest.mark.parametrize("ver", VERSIONS)
def test_example_b_devid_after_ioas_and_hwpt(ver: str) -> None:
    r = Rig("dual-function-nic", ver)
    p = r["p"]
    a = p.open("iommu")
    d0, _ = p.cdev_bound(0, a)
    ioas = p.ioas_alloc(a)
    assert ioas == 2
    assert p.attach(d0, ioas) == 3  # auto HWPT
    _, id1 = p.cdev_bound(1, a)
    assert id1 == 4
    r.check()


@pytest.mark.parametrize("ver", VERSIONS)
def test_example_c_shared_group_unopened_sibling_is_owned(ver: str) -> None:
    r = Rig("shared-group", ver)
    p = r["p"]
    a = p.open("iommu")
    d0, _ = p.cdev_bound(0, a)
    err, hdr, ents = p.hot_reset_info(d0)
    assert err == 0
    assert hdr["flags"] == DEV_ID | OWNED
    assert ents == [(1, 0, 1, 0), (C.VFIO_PCI_DEVID_OWNED, 0, 1, 1)]
    mark = len(r.k.reset_log)
    assert p.hot_reset(d0) == 0
    assert [x[0] for x in resets(r, mark)] == [F0, F1]  # the unopened sibling too
    q = r["q"]
    b = q.open("iommu")
    d1 = q.open("vfio/devices/vfio1")
    assert errno_of(lambda: q.bind(d1, b)) == E.EPERM
    r.check()


@pytest.mark.parametrize("ver", VERSIONS)
def test_example_d_group_path(ver: str) -> None:
    r = Rig("dual-function-nic", ver)
    p = r["p"]
    g13, c = p.group_setup(13)
    g14, _ = p.group_setup(14, container=c)
    dev = p.get_device_fd(g13, F0)
    err, hdr, ents = p.hot_reset_info(dev)
    assert err == 0 and hdr["flags"] == 0 and hdr["count"] == 2
    assert ents == [(13, 0, 1, 0), (14, 0, 1, 1)]
    mark = len(r.k.reset_log)
    assert errno_of(lambda: p.hot_reset(dev, [g13])) == E.EINVAL
    assert errno_of(lambda: p.hot_reset(dev, [g13, g14, g14])) == E.EINVAL
    assert errno_of(lambda: p.hot_reset(dev, [], count=0)) == E.EINVAL
    assert errno_of(lambda: p.hot_reset(dev, [g13, c])) == E.EINVAL
    assert errno_of(lambda: p.hot_reset(dev, [g13, 9999])) == E.EBADF
    assert resets(r, mark) == []
    assert p.hot_reset(dev, [g13, g14]) == 0
    assert [x[0] for x in resets(r, mark)] == [F0, F1]
    # group open blocks BIND of the cdev
    a = p.open("iommu")
    cd = p.open("vfio/devices/vfio0")
    assert errno_of(lambda: p.bind(cd, a)) == E.EBUSY
    r.check()


@pytest.mark.parametrize("ver", VERSIONS)
def test_example_d_cdev_bound_blocks_group_open(ver: str) -> None:
    r = Rig("dual-function-nic", ver)
    p = r["p"]
    a = p.open("iommu")
    p.cdev_bound(0, a)
    assert errno_of(lambda: p.open("vfio/13")) == E.EBUSY
    assert p.open("vfio/14") > 0  # the other group is free
    r.check()


@pytest.mark.parametrize("ver", VERSIONS)
def test_example_e_host_driver_sibling(ver: str) -> None:
    r = Rig("host-driver-sibling", ver)
    assert [d.name for d in r.k.vfio_devices()] == [F0]
    assert r.k.describe()["dev_sets"] == [{"key": "bus 0000:01", "devices": [F0]}]
    p = r["p"]
    a = p.open("iommu")
    d0, _ = p.cdev_bound(0, a)
    err, hdr, ents = p.hot_reset_info(d0)
    assert err == 0 and hdr["flags"] == DEV_ID
    assert ents == [(1, 0, 1, 0), (NOT_OWNED, 0, 1, 1)]
    assert errno_of(lambda: p.hot_reset(d0)) == E.EINVAL
    # group path
    q = Rig("host-driver-sibling", ver)["q"]
    g13, _ = q.group_setup(13)
    dev = q.get_device_fd(g13, F0)
    err, hdr, ents = q.hot_reset_info(dev)
    assert err == 0 and ents == [(13, 0, 1, 0), (14, 0, 1, 1)]
    assert errno_of(lambda: q.hot_reset(dev, [g13])) == E.EINVAL


@pytest.mark.parametrize("local", [False, True])
def test_example_f_enospc(local: bool) -> None:
    r = Rig("dual-function-nic", "6.12" if local else "6.6")
    p = r["p"]
    a = p.open("iommu")
    d0, _ = p.cdev_bound(0, a)
    err, hdr, ents = p.hot_reset_info(d0, argsz=12)
    assert err == E.ENOSPC
    assert hdr["count"] == 2
    assert hdr["flags"] == (0 if local else DEV_ID | OWNED)
    assert ents == []
    # room for one entry: 6.6 writes it (and evaluates it), 6.10+ writes nothing
    err, hdr, ents = p.hot_reset_info(d0, argsz=20)
    assert err == E.ENOSPC and hdr["count"] == 2
    if local:
        assert hdr["flags"] == 0 and ents == []
    else:
        assert hdr["flags"] == DEV_ID | OWNED and ents == [(1, 0, 1, 0)]


def test_example_f_group_path_enospc() -> None:
    for ver, flags in (("6.6", 0), ("6.12", 0)):
        r = Rig("dual-function-nic", ver)
        p = r["p"]
        g13, _ = p.group_setup(13)
        dev = p.get_device_fd(g13, F0)
        err, hdr, _ = p.hot_reset_info(dev, argsz=12)
        assert (err, hdr["count"], hdr["flags"]) == (E.ENOSPC, 2, flags)


@pytest.mark.parametrize("ver", VERSIONS)
def test_info_header_rules(ver: str) -> None:
    r = Rig("root-bus", ver)
    p = r["p"]
    a = p.open("iommu")
    d0, _ = p.cdev_bound(0, a)
    err, _, _ = p.hot_reset_info(d0, argsz=11)
    assert err == E.EINVAL
    err, _, _ = p.hot_reset_info(d0)
    assert err == E.ENODEV
    # HOT_RESET: flags/count checks before the ENODEV probe
    assert errno_of(lambda: p.hot_reset(d0, flags=1)) == E.EINVAL
    assert errno_of(lambda: p.hot_reset(d0, count=1, argsz=16)) == E.EINVAL
    assert errno_of(lambda: p.hot_reset(d0)) == E.ENODEV


@pytest.mark.parametrize("ver", VERSIONS)
def test_hotplug_slot_dev_set_and_slot_reset(ver: str) -> None:
    r = Rig("hotplug-slot", ver)
    assert r.k.describe()["dev_sets"] == [{"key": "slot 0000:05:00", "devices": ["0000:05:00.0", "0000:05:00.1"]}]
    p = r["p"]
    a = p.open("iommu")
    d0, _ = p.cdev_bound(0, a)
    p.cdev_bound(1, a)
    mark = len(r.k.reset_log)
    assert p.hot_reset(d0) == 0
    assert resets(r, mark) == [("0000:05:00.0", "slot", "VFIO_DEVICE_PCI_HOT_RESET"),
                               ("0000:05:00.1", "slot", "VFIO_DEVICE_PCI_HOT_RESET")]


@pytest.mark.parametrize("ver", VERSIONS)
def test_flr_device_alone_on_bus(ver: str) -> None:
    r = Rig("flr-device", ver)
    p = r["p"]
    a = p.open("iommu")
    d0, _ = p.cdev_bound(0, a)
    assert resets(r) == [("0000:02:00.0", "flr", "open")]
    err, hdr, ents = p.hot_reset_info(d0)
    assert (err, hdr["flags"], ents) == (0, DEV_ID | OWNED, [(1, 0, 2, 0)])
    assert p.hot_reset(d0) == 0
    assert resets(r)[-1] == ("0000:02:00.0", "bus", "VFIO_DEVICE_PCI_HOT_RESET")


@pytest.mark.parametrize(("ver", "want"), [("6.6", E.EINVAL), ("6.12", E.EBUSY)])
def test_memory_lock_vs_ownership_order_by_version(ver: str, want: int) -> None:
    """6.6-6.9 check every member's ownership before any memory_lock; 6.10+ interleave."""
    r = Rig("dual-function-nic", ver)
    p = r["p"]
    a = p.open("iommu")
    d0, _ = p.cdev_bound(0, a)
    r.k.hooks.memory_lock_contended.add(F0)
    assert errno_of(lambda: p.hot_reset(d0)) == want


@pytest.mark.parametrize("ver", VERSIONS)
def test_memory_lock_contended_and_reset_errno(ver: str) -> None:
    r = Rig("dual-function-nic", ver)
    p = r["p"]
    a = p.open("iommu")
    d0, _ = p.cdev_bound(0, a)
    p.cdev_bound(1, a)
    mark = len(r.k.reset_log)
    r.k.hooks.memory_lock_contended.add(F1)
    assert errno_of(lambda: p.hot_reset(d0)) == E.EBUSY
    r.k.hooks.memory_lock_contended.clear()
    r.k.hooks.reset_errno[F1] = E.EIO
    assert errno_of(lambda: p.hot_reset(d0)) == E.EIO
    assert resets(r, mark) == []
    r.k.hooks.reset_errno.clear()
    assert p.hot_reset(d0) == 0
    assert len(resets(r, mark)) == 2


@pytest.mark.parametrize(("ver", "want"), [("6.6", E.ENOMEM), ("6.12", E.EINVAL)])
def test_array_count_int_vs_u32(ver: str, want: int) -> None:
    r = Rig("dual-function-nic", ver)
    p = r["p"]
    g13, _ = p.group_setup(13)
    dev = p.get_device_fd(g13, F0)
    assert errno_of(lambda: p.hot_reset(dev, [], count=0x80000000, argsz=12)) == want
    assert errno_of(lambda: p.hot_reset(dev, [], count=3, argsz=12)) == E.EINVAL


@pytest.mark.parametrize("ver", VERSIONS)
def test_group_fds_beyond_argsz_are_read(ver: str) -> None:
    """argsz is not checked against count: the fds after the header are read anyway."""
    r = Rig("dual-function-nic", ver)
    p = r["p"]
    g13, c = p.group_setup(13)
    g14, _ = p.group_setup(14, container=c)
    dev = p.get_device_fd(g13, F0)
    assert p.hot_reset(dev, [g13, g14], argsz=12) == 0


@pytest.mark.parametrize("ver", VERSIONS)
def test_reset_clears_device_state_keeps_saved_config_and_eventfds(ver: str) -> None:
    r = Rig("dual-function-nic", ver)
    p = r["p"]
    a = p.open("iommu")
    d0, _ = p.cdev_bound(0, a)
    p.cdev_bound(1, a)
    bar0 = 0
    p.write(d0, bar0 + 0x10, b"\x11\x22\x33\x44")
    assert p.read(d0, 0x10, 4) == b"\x11\x22\x33\x44"
    cfg = C.VFIO_PCI_INDEX_TO_OFFSET(7)
    p.write(d0, cfg + 0x10, (0xF1000000).to_bytes(4, "little"))
    p.write(d0, cfg + 0x3C, b"\x0b")
    efd, ev = p.p.eventfd()
    import struct

    from fakedev.uapi import ioctls as IO
    from fakedev.uapi import structs as S
    irq = S.VFIO_IRQ_SET.pack(argsz=24, flags=C.VFIO_IRQ_SET_DATA_EVENTFD | C.VFIO_IRQ_SET_ACTION_TRIGGER,
                              index=0, start=0, count=1) + struct.pack("<i", efd)
    p.ioctl(d0, IO.VFIO_DEVICE_SET_IRQS, p.buf(irq))
    assert p.hot_reset(d0) == 0
    assert p.read(d0, 0x10, 4) == bytes(4)  # BAR contents lost
    assert int.from_bytes(p.read(d0, cfg + 0x10, 4), "little") == 0xF1000000  # BAR restored
    assert p.read(d0, cfg + 0x3C, 1) == b"\x0b"
    assert r.k.raise_irq(F0, 0) is True and ev.counter == 1  # eventfd kept
    assert r.k.reset_count(F0) == 1 and r.k.reset_count(F1) == 1


@pytest.mark.parametrize("ver", VERSIONS)
def test_close_of_last_device_does_silent_bus_reset(ver: str) -> None:
    r = Rig("dual-function-nic", ver)
    p = r["p"]
    a = p.open("iommu")
    d0, _ = p.cdev_bound(0, a)
    d1, _ = p.cdev_bound(1, a)
    mark = len(r.k.reset_log)
    p.close(d0)
    assert resets(r, mark) == []  # 01:00.1 still open
    p.close(d1)
    assert resets(r, mark) == [(F0, "bus", "close"), (F1, "bus", "close")]
    assert r.k.reset_log[-1].pid == p.p.pid
    r.check()


@pytest.mark.parametrize("ver", VERSIONS)
def test_group_mode_info_eperm_for_function_without_iommu_group(ver: str) -> None:
    from fakedev.kernel.kernel import Kernel
    from fakedev.kernel.version import KernelVersion
    from tests.kernel import topologies as T
    from tests.kernel.conftest import Proc

    topo = T.host_driver_sibling()
    sib = topo.find(F1)
    assert sib is not None
    sib.iommu_group = None
    k = Kernel(topo, KernelVersion.parse(ver))
    p = Proc(k)
    g, _ = p.group_setup(13)
    dev = p.get_device_fd(g, F0)
    err, hdr, ents = p.hot_reset_info(dev)
    assert err == E.EPERM
    assert hdr["flags"] == 0x5A5A  # header not written
    # 6.6-6.9 copy inside the walk: the entry before the failing one was written
    assert ents == ([(13, 0, 1, 0)] if ver == "6.6" else [])
    q = Proc(k)
    a = q.open("iommu")
    # the cdev path reports a NOT_OWNED entry instead
    p.close(dev)
    p.close(g)
    d0, _ = q.cdev_bound(0, a)
    err, hdr, ents = q.hot_reset_info(d0)
    assert err == 0 and ents[1][0] == NOT_OWNED


@pytest.mark.parametrize("ver", VERSIONS)
def test_unbound_cdev_caller_cannot_reset(ver: str) -> None:
    r = Rig("dual-function-nic", ver)
    p = r["p"]
    d0 = p.open("vfio/devices/vfio0")
    err, _, _ = p.hot_reset_info(d0)
    assert err == E.EINVAL
    assert errno_of(lambda: p.hot_reset(d0)) == E.EINVAL


@pytest.mark.parametrize("ver", VERSIONS)
def test_other_ctx_device_is_not_owned(ver: str) -> None:
    r = Rig("dual-function-nic", ver)
    p, q = r["p"], r["q"]
    a = p.open("iommu")
    d0, _ = p.cdev_bound(0, a)
    b = q.open("iommu")
    q.cdev_bound(1, b)
    _, hdr, ents = p.hot_reset_info(d0)
    assert hdr["flags"] == DEV_ID and ents[1][0] == NOT_OWNED
    assert errno_of(lambda: p.hot_reset(d0)) == E.EINVAL


@pytest.mark.parametrize("ver", VERSIONS)
def test_rebinding_the_sibling_changes_the_dev_set(ver: str) -> None:
    r = Rig("dual-function-nic", ver)
    p = r["p"]
    a = p.open("iommu")
    d0, _ = p.cdev_bound(0, a)
    d1, _ = p.cdev_bound(1, a)
    efd, ev = p.p.eventfd()
    import struct

    from fakedev.uapi import ioctls as IO
    from fakedev.uapi import structs as S
    req = S.VFIO_IRQ_SET.pack(argsz=24, flags=C.VFIO_IRQ_SET_DATA_EVENTFD | C.VFIO_IRQ_SET_ACTION_TRIGGER,
                              index=4, start=0, count=1) + struct.pack("<i", efd)
    p.ioctl(d1, IO.VFIO_DEVICE_SET_IRQS, p.buf(req))
    assert errno_of(lambda: r.k.unbind_driver(F1)) == E.EBUSY
    assert ev.counter == 1  # the user was asked to release the device
    p.close(d1)
    r.k.unbind_driver(F1)
    assert [d.name for d in r.k.vfio_devices()] == [F0]
    assert "vfio/14" not in {n.path for n in r.k.nodes()}
    assert r.k.describe()["dev_sets"] == [{"key": "bus 0000:01", "devices": [F0]}]
    r.k.bind_driver(F1, "igb")  # now example (e)
    _, hdr, ents = p.hot_reset_info(d0)
    assert hdr["flags"] == DEV_ID and ents[1][0] == NOT_OWNED
    assert errno_of(lambda: p.hot_reset(d0)) == E.EINVAL
    r.k.unbind_driver(F1)
    r.k.bind_driver(F1, "vfio-pci")
    assert [(d.index, d.name) for d in r.k.vfio_devices()] == [(0, F0), (1, F1)]
    assert {n.path: n.minor for n in r.k.nodes()}["vfio/14"] == 1
    p.cdev_bound(1, a)
    assert p.hot_reset(d0) == 0
    r.check()


def test_host_driver_bind_refused_while_group_user_owned() -> None:
    from fakedev.kernel.kernel import Kernel
    from tests.kernel import topologies as T
    from tests.kernel.conftest import Proc

    topo = T.shared_group()
    k = Kernel(topo)
    p = Proc(k)
    a = p.open("iommu")
    p.cdev_bound(0, a)
    k.unbind_driver(F1)
    assert errno_of(lambda: k.bind_driver(F1, "igb")) == E.EBUSY
    k.bind_driver(F1, "pci-stub")  # driver_managed_dma
    assert k.check_invariants() == []
    assert errno_of(lambda: k.bind_driver(F1, "vfio-pci")) == E.ENODEV  # already bound
