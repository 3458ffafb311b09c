"""Hot removal of a PCI function while it is open (Kernel.unplug_device).

vfio_unregister_group_dev(): REQ signalled at once (count 0) and again after
every 10 s wait; new opens by name and of the cdev fail with ENODEV; the
holders keep a working device; the removal completes at the last close:
device, group, dev_set, nodes and the PCI function all go.
"""

from __future__ import annotations

import errno as E
import struct

from fakedev.kernel.kernel import Kernel
from fakedev.kernel.version import KernelVersion
from fakedev.uapi import consts as C
from fakedev.uapi import ioctls as IO
from fakedev.uapi import structs as S
from tests.kernel import topologies as T
from tests.kernel.conftest import Proc, errno_of

F0, F1 = "0000:01:00.0", "0000:01:00.1"
REQ = C.VFIO_PCI_REQ_IRQ_INDEX


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Rig:
    def __init__(self, topology: str = "dual-function-nic", version: str = "6.12") -> None:
        self.clock = Clock()
        self.k = Kernel(T.build(topology), KernelVersion.parse(version), clock=self.clock)
        self.procs: dict[str, Proc] = {}

    def __getitem__(self, name: str) -> Proc:
        if name not in self.procs:
            self.procs[name] = Proc(self.k)
        return self.procs[name]

    def check(self) -> None:
        assert self.k.check_invariants() == []

    def paths(self) -> set[str]:
        return {n.path for n in self.k.nodes()}

    def bdfs(self) -> set[str]:
        return {p.name for p in self.k.topology.devices()}


def set_req(p: Proc, d: int) -> object:
    efd, ev = p.p.eventfd()
    hdr = S.VFIO_IRQ_SET.pack(argsz=24, flags=C.VFIO_IRQ_SET_DATA_EVENTFD | C.VFIO_IRQ_SET_ACTION_TRIGGER,
                              index=REQ, start=0, count=1)
    p.ioctl(d, IO.VFIO_DEVICE_SET_IRQS, p.buf(hdr + struct.pack("<i", efd)))
    return ev


def get_info(p: Proc, d: int) -> dict[str, int]:
    a = p.buf(S.VFIO_DEVICE_INFO.pack(argsz=S.VFIO_DEVICE_INFO.size))
    p.ioctl(d, IO.VFIO_DEVICE_GET_INFO, a)
    return dict(S.VFIO_DEVICE_INFO.unpack(p.p.peek(a, S.VFIO_DEVICE_INFO.size)))


def cdev_holder(r: Rig, index: int = 0, name: str = "a") -> tuple[Proc, int, int]:
    p = r[name]
    ifd = p.open("iommu")
    d, _ = p.cdev_bound(index, ifd)
    return p, ifd, d


def test_req_signalled_at_unplug_and_every_10s() -> None:
    r = Rig()
    p, _, d = cdev_holder(r)
    ev = set_req(p, d)
    r.clock.now = 100.0
    r.k.unplug_device(F0)
    r.check()
    assert ev.counter == 1  # type: ignore[attr-defined]
    assert r.k.device(F0).request_count == 1
    assert r.k.unplug_tick(109.9) == 110.0
    assert ev.counter == 1  # type: ignore[attr-defined]
    assert r.k.unplug_tick(110.0) == 120.0
    assert ev.counter == 2  # type: ignore[attr-defined]
    r.clock.now = 120.0
    assert r.k.unplug_tick() == 130.0
    assert ev.counter == 3  # type: ignore[attr-defined]
    desc = r.k.describe()
    assert desc["unplugs"] == [{"bdf": F0, "state": "waiting", "to_stop": [F0], "waiting_for": F0,
                                "requests": 3, "next_request": 130.0}]
    assert [d["unplug_requests"] for d in desc["devices"] if d["bdf"] == F0] == [3]
    r.check()
    p.close(d)
    assert r.k.unplug_tick(200.0) is None
    assert ev.counter == 3  # type: ignore[attr-defined]
    r.check()


def test_without_req_trigger_the_removal_still_waits() -> None:
    r = Rig()
    p, _, d = cdev_holder(r)
    r.k.unplug_device(F0)
    assert r.k.device(F0).request_count == 1  # asked, nobody listening
    assert "vfio/devices/vfio0" in r.paths()
    r.k.unplug_tick(10.0)
    assert r.k.device(F0).request_count == 2
    r.check()
    p.close(d)
    assert F0 not in r.bdfs()
    r.check()


def test_new_opens_fail_holder_keeps_working() -> None:
    r = Rig()
    p, ifd, d = cdev_holder(r)
    r.k.unplug_device(F0)
    r.check()
    # the cdev node stays until the removal completes, but opens fail
    assert "vfio/devices/vfio0" in r.paths()
    q = r["b"]
    assert errno_of(lambda: q.open("vfio/devices/vfio0")) == E.ENODEV
    # the holder: ioctls, config reads, IOAS attach, hot reset INFO all work
    assert get_info(p, d)["num_irqs"] == C.VFIO_PCI_NUM_IRQS
    assert p.read(d, C.VFIO_PCI_INDEX_TO_OFFSET(C.VFIO_PCI_CONFIG_REGION_INDEX), 2) == b"\x36\x1b"
    ioas = p.ioas_alloc(ifd)
    assert p.attach(d, ioas) > 0
    err, hdr, _ = p.hot_reset_info(d)
    assert err == 0 and hdr["count"] == 2
    r.check()
    p.close(d)
    assert "vfio/devices/vfio0" not in r.paths()
    r.check()


def test_get_device_fd_by_name_enodev_while_pending() -> None:
    r = Rig()
    p = r["a"]
    g, c = p.group_setup(13)
    d = p.get_device_fd(g, F0)
    r.k.unplug_device(F0)
    r.check()
    # a second device fd by name: the device's registration cannot be taken
    assert errno_of(lambda: p.get_device_fd(g, F0)) == E.ENODEV
    assert errno_of(lambda: r["b"].open("vfio/devices/vfio0")) == E.ENODEV
    # the holder's fd works
    assert get_info(p, d)["num_regions"] == C.VFIO_PCI_NUM_REGIONS
    r.check()
    p.close(d)
    r.check()
    # removal done: group 13 had only this device, its node is gone
    assert "vfio/13" not in r.paths() and "vfio/devices/vfio0" not in r.paths()
    assert 13 not in r.k.vfio.groups
    # the group file stays open, the group has no iommu group any more
    assert errno_of(lambda: p.ioctl(g, IO.VFIO_GROUP_GET_STATUS, p.buf(struct.pack("<II", 8, 0)))) == E.ENODEV
    assert errno_of(lambda: p.get_device_fd(g, F0)) == E.ENODEV
    p.close(g)
    p.close(c)
    r.check()
    assert r.k.iommu_groups.get(13) is None


def test_removal_completes_at_last_close() -> None:
    r = Rig()
    p, ifd, d = cdev_holder(r)
    d2 = p.open("vfio/devices/vfio0")  # an unbound cdev fd holds the device too
    r.k.unplug_device(F0)
    p.close(d)
    r.check()
    assert r.k.unplugs and "vfio/devices/vfio0" in r.paths()
    p.close(d2)
    r.check()
    assert not r.k.unplugs
    assert F0 not in r.bdfs()
    assert [v.name for v in r.k.vfio_devices()] == [F1]
    assert r.paths() == {"vfio/vfio", "vfio/14", "vfio/devices/vfio1", "iommu"}
    assert [ds["devices"] for ds in r.k.describe()["dev_sets"]] == [[F1]]
    assert F0 not in r.k.describe()["drivers"]
    assert r.k.describe()["unplugs"] == []
    p.close(ifd)
    r.check()


def test_not_open_removed_at_once() -> None:
    r = Rig()
    r.k.unplug_device(F1)
    r.check()
    assert not r.k.unplugs
    assert F1 not in r.bdfs()
    assert r.paths() == {"vfio/vfio", "vfio/13", "vfio/devices/vfio0", "iommu"}
    # a new probe elsewhere would reuse vfio1: the index is free
    assert {d.index for d in r.k.vfio.devices} == {0}


def test_unknown_bdf_enodev_changes_nothing() -> None:
    r = Rig()
    before = r.k.describe()
    assert errno_of(lambda: r.k.unplug_device("0000:09:00.0")) == E.ENODEV
    assert r.k.describe() == before
    r.k.unplug_device(F1)
    assert errno_of(lambda: r.k.unplug_device(F1)) == E.ENODEV  # gone now
    r.check()


def test_unplug_twice_while_pending_is_one_removal() -> None:
    r = Rig()
    p, _, d = cdev_holder(r)
    ev = set_req(p, d)
    r.k.unplug_device(F0)
    r.k.unplug_device(F0)
    assert len(r.k.unplugs) == 1 and ev.counter == 1  # type: ignore[attr-defined]
    p.close(d)
    r.check()
    assert F0 not in r.bdfs()


def test_host_driver_device_removed_at_once() -> None:
    r = Rig("host-driver-sibling")
    r.k.unplug_device(F1)  # bound to igb
    r.check()
    assert F1 not in r.bdfs() and F1 not in r.k.describe()["drivers"]
    assert 14 not in r.k.iommu_groups


def test_sibling_hot_reset_while_pending_and_after() -> None:
    r = Rig()
    a = r["a"]
    ifd = a.open("iommu")
    d0, id0 = a.cdev_bound(0, ifd)
    d1, id1 = a.cdev_bound(1, ifd)
    ev = set_req(a, d0)
    err, hdr, ents = a.hot_reset_info(d1)
    assert err == 0 and hdr["count"] == 2 and [e[0] for e in ents] == [id0, id1]
    r.k.unplug_device(F0)
    r.check()
    # the pending device is still on the bus and in the dev_set: INFO lists it,
    # and a hot reset by the owner of both resets both
    err, hdr, ents = a.hot_reset_info(d1)
    assert err == 0 and hdr["count"] == 2 and {e[0] for e in ents} == {id0, id1}
    assert hdr["flags"] & C.VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED
    n = len(r.k.reset_log)
    a.hot_reset(d1)
    assert {rec.bdf for rec in r.k.reset_log[n:]} == {F0, F1}
    r.check()
    assert ev.counter == 1  # type: ignore[attr-defined]
    a.close(d0)
    r.check()
    # after the removal: the sibling's INFO lists only itself
    err, hdr, ents = a.hot_reset_info(d1)
    assert err == 0 and hdr["count"] == 1 and [e[0] for e in ents] == [id1]
    n = len(r.k.reset_log)
    a.hot_reset(d1)
    assert [rec.bdf for rec in r.k.reset_log[n:]] == [F1]
    r.check()


def test_sibling_hot_reset_blocked_by_pending_member_held_elsewhere() -> None:
    r = Rig()
    a, b = r["a"], r["b"]
    da, _ = a.cdev_bound(0, a.open("iommu"))
    db, _ = b.cdev_bound(1, b.open("iommu"))
    r.k.unplug_device(F0)
    # F0 is still a dev_set member, owned by another context: EPERM as before
    err, hdr, _ = b.hot_reset_info(db)
    assert err == 0 and not hdr["flags"] & C.VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED
    assert errno_of(lambda: b.hot_reset(db)) == E.EINVAL
    a.close(da)
    r.check()
    # now the set is F1 alone: the reset succeeds
    b.hot_reset(db)
    r.check()


def test_shared_group_keeps_group_until_last_device() -> None:
    r = Rig("shared-group")
    p = r["a"]
    g, c = p.group_setup(13)
    d0 = p.get_device_fd(g, F0)
    r.k.unplug_device(F0)
    assert errno_of(lambda: p.get_device_fd(g, F0)) == E.ENODEV
    d1 = p.get_device_fd(g, F1)  # the other device of the group still opens
    p.close(d0)
    r.check()
    assert "vfio/13" in r.paths() and [d.name for d in r.k.vfio.groups[13].devices] == [F1]
    assert F0 not in r.bdfs()
    p.close(d1)
    p.close(g)
    p.close(c)
    r.check()


def test_removals_are_serialized() -> None:
    r = Rig()
    a = r["a"]
    ifd = a.open("iommu")
    d0, _ = a.cdev_bound(0, ifd)
    d1, _ = a.cdev_bound(1, ifd)
    ev0, ev1 = set_req(a, d0), set_req(a, d1)
    r.k.unplug_device(F0)
    r.k.unplug_device(F1)
    r.check()
    # the second removal waits behind the first: F1 is not yet being removed
    assert (ev0.counter, ev1.counter) == (1, 0)  # type: ignore[attr-defined]
    assert [u["state"] for u in r.k.describe()["unplugs"]] == ["waiting", "queued"]
    d1b = r["b"].open("vfio/devices/vfio1")  # opens of F1 still work
    r["b"].close(d1b)
    a.close(d0)
    r.check()
    assert (ev0.counter, ev1.counter) == (1, 1)  # type: ignore[attr-defined]
    a.close(d1)
    r.check()
    assert F0 not in r.bdfs() and F1 not in r.bdfs() and not r.k.unplugs


def test_bridge_removal_takes_its_children() -> None:
    r = Rig()
    p, _, d = cdev_holder(r, index=1)
    ev = set_req(p, d)
    r.k.unplug_device("0000:00:1c.0")
    r.check()
    # children stop in reverse bus order: F1 first, held -> waits
    assert ev.counter == 1  # type: ignore[attr-defined]
    assert r.k.describe()["unplugs"][0]["to_stop"] == [F1, F0, "0000:00:1c.0"]
    assert F0 in r.bdfs()
    p.close(d)
    r.check()
    assert r.bdfs() == set()
    assert r.paths() == {"vfio/vfio", "iommu"}


def test_invariants_after_every_step_on_6_6() -> None:
    r = Rig(version="6.6")
    p, ifd, d = cdev_holder(r)
    r.check()
    r.k.unplug_device(F0)
    r.check()
    r.k.unplug_tick(10.0)
    r.check()
    p.close(d)
    r.check()
    p.close(ifd)
    r.check()
    # the sibling can be bound and reset alone
    q = r["q"]
    dq, _ = q.cdev_bound(1, q.open("iommu"))
    q.hot_reset(dq)
    r.check()


# ------------------------------------------------------------------ random sequences with unplugs

from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import rule  # noqa: E402

from fakedev.kernel.errors import KernelError  # noqa: E402
from tests.kernel.test_statemachine import PICK, PROFILE, KernelMachine  # noqa: E402


class UnplugMachine(KernelMachine):
    """The kernel state machine with unplugs and REQ timer ticks mixed in."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.k.set_unplug_clock(lambda: self.now)
        self.bdfs = [p.name for p in self.k.topology.devices()] + ["0000:7f:00.0"]
        self.unplugged: set[str] = set()

    @rule(n=PICK)
    def unplug(self, n: int) -> None:
        bdf = self.bdfs[n % len(self.bdfs)]
        present = self.k.topology.find(bdf) is not None
        before = self.k.describe()
        try:
            self.k.unplug_device(bdf)
        except KernelError as e:
            assert e.errno == E.ENODEV and not present
            assert self.k.describe() == before
            return
        assert present
        self.unplugged.add(bdf)
        assert self.k.topology.find(bdf) is None or self.k.unplugs

    @rule(dt=st.sampled_from([0.0, 4.0, 10.0, 25.0]))
    def tick(self, dt: float) -> None:
        self.now += dt
        counts = [d.request_count for d in self.k.vfio.devices]
        nxt = self.k.unplug_tick()
        assert (nxt is None) == (not self.k.unplugs)
        waiting = self.k.unplugs[0].device if self.k.unplugs else None
        for d, c in zip(self.k.vfio.devices, counts, strict=True):
            assert d.request_count in ((c, c + 1) if d is waiting else (c,))

    def teardown(self) -> None:
        super().teardown()
        assert not self.k.unplugs
        for bdf in self.unplugged:
            assert self.k.topology.find(bdf) is None, f"{bdf} still on the bus"
        assert self.k.check_invariants() == []


def _unplug_machine(topology: str, version: str) -> type[UnplugMachine]:
    return type(f"Unplug_{topology.replace('-', '_')}_{version.replace('.', '_')}", (UnplugMachine,),
                {"TOPOLOGY": topology, "VERSION": version})


TestUnplugDualNic66 = PROFILE(_unplug_machine("dual-function-nic", "6.6")).TestCase
TestUnplugSharedGroup612 = PROFILE(_unplug_machine("shared-group", "6.12")).TestCase
