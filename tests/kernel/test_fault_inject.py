"""The fault plan (fakedev.kernel.fault_inject): which call fails, and that it changes nothing."""

from __future__ import annotations

import errno
import json

import pytest

from fakedev.kernel.errors import KernelError
from fakedev.kernel.fault_inject import (
    FaultPlan,
    FaultSpec,
    FaultSpecError,
    InjectedError,
    make_spec,
    parse_spec,
)
from fakedev.kernel.file import File
from fakedev.kernel.kernel import Kernel
from fakedev.kernel.testing import FakeProcess
from fakedev.tree import load_tree
from fakedev.tree.loader import FIXTURES
from fakedev.uapi import ioctls as I
from fakedev.uapi import structs as S

A, B = "0000:01:00.0", "0000:01:00.1"


def _kernel() -> Kernel:
    return load_tree(FIXTURES / "dual-function-nic.toml").make_kernel()


class Client:
    """One process using the model through ``kernel.faults``, as the server does."""

    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.p = FakeProcess()
        self.t = self.p.task()

    def open(self, path: str) -> int:
        return self.p.install(self.k.faults.open(self.k.open, path, self.t))

    def file(self, fd: int) -> File:
        f = self.p.fds[fd]
        assert isinstance(f, File)
        return f

    def ioctl(self, fd: int, cmd: int, data: bytes = b"") -> int:
        """0/result or -errno."""
        arg = self.p.alloc(data) if data else 0
        try:
            return self.k.faults.ioctl(self.file(fd), self.t, cmd, arg)
        except KernelError as e:
            return -e.errno

    def get_info(self, fd: int) -> int:
        return self.ioctl(fd, I.VFIO_DEVICE_GET_INFO, S.VFIO_DEVICE_INFO.pack(argsz=S.VFIO_DEVICE_INFO.size))

    def bind(self, fd: int, ictx: int) -> int:
        return self.ioctl(fd, I.VFIO_DEVICE_BIND_IOMMUFD, S.VFIO_DEVICE_BIND_IOMMUFD.pack(argsz=16, iommufd=ictx))

    def hot_reset(self, fd: int) -> int:
        return self.ioctl(fd, I.VFIO_DEVICE_PCI_HOT_RESET, S.VFIO_PCI_HOT_RESET.pack(argsz=12))

    def bound_pair(self) -> tuple[int, int, int]:
        ictx = self.open("iommu")
        d0, d1 = self.open("vfio/devices/vfio0"), self.open("vfio/devices/vfio1")
        assert self.bind(d0, ictx) == 0 and self.bind(d1, ictx) == 0
        return ictx, d0, d1


def test_unarmed_plan_is_not_armed_and_counts_nothing() -> None:
    k = _kernel()
    assert k.faults.armed is False
    c = Client(k)
    _ictx, d0, _d1 = c.bound_pair()
    assert c.get_info(d0) == 0
    assert k.faults.injected == []
    assert k.describe()["faults"]["injected_total"] == 0


def test_nth_call_fails_once_then_calls_succeed() -> None:
    k = _kernel()
    k.faults.add(parse_spec("call=VFIO_DEVICE_GET_INFO,nth=2,errno=EBUSY"))
    assert k.faults.armed
    c = Client(k)
    _ictx, d0, d1 = c.bound_pair()
    assert [c.get_info(d0), c.get_info(d1), c.get_info(d0), c.get_info(d1)] == [0, -errno.EBUSY, 0, 0]
    (inj,) = k.faults.injected
    assert (inj.op, inj.devices, inj.errno, inj.label) == ("VFIO_DEVICE_GET_INFO", (B,), errno.EBUSY, "vfio1")
    assert inj.pid == c.p.pid


def test_count_and_every_call_from_nth() -> None:
    k = _kernel()
    k.faults.add(parse_spec("call=VFIO_DEVICE_GET_INFO,nth=2,count=2,errno=EIO"))
    c = Client(k)
    _ictx, d0, _d1 = c.bound_pair()
    assert [c.get_info(d0) for _ in range(5)] == [0, -errno.EIO, -errno.EIO, 0, 0]
    k.faults.clear()
    k.faults.add(parse_spec("call=VFIO_DEVICE_GET_INFO,nth=3,count=all,errno=ENXIO"))
    assert [c.get_info(d0) for _ in range(5)] == [0, 0, -errno.ENXIO, -errno.ENXIO, -errno.ENXIO]


def test_device_filter_counts_only_calls_on_that_function() -> None:
    k = _kernel()
    k.faults.add(parse_spec("call=VFIO_DEVICE_GET_INFO,nth=1,device=01:00.1,errno=EPERM"))
    c = Client(k)
    _ictx, d0, d1 = c.bound_pair()
    assert [c.get_info(d0), c.get_info(d0), c.get_info(d1), c.get_info(d1)] == [0, 0, -errno.EPERM, 0]


def test_device_filter_matches_the_open_of_its_node_and_its_group() -> None:
    k = _kernel()
    group = next(g for g in k.vfio.groups.values() if any(d.name == B for d in g.devices))
    k.faults.add(parse_spec(f"call=open,nth=1,count=all,device={B},errno=ENODEV"))
    c = Client(k)
    c.open("iommu")
    c.open("vfio/vfio")
    c.open("vfio/devices/vfio0")
    with pytest.raises(InjectedError) as exc:
        c.open("vfio/devices/vfio1")
    assert exc.value.errno == errno.ENODEV
    with pytest.raises(InjectedError):
        c.open(f"vfio/{group.id}")
    assert [i.label for i in k.faults.injected] == ["vfio/devices/vfio1", f"vfio/{group.id}"]


def test_star_counts_every_call_and_log_calls_records_them() -> None:
    k = _kernel()
    k.faults.log_calls = True
    c = Client(k)
    _ictx, d0, _d1 = c.bound_pair()
    c.get_info(d0)
    ops = [r.op for r in k.faults.calls]
    assert ops == ["open", "open", "open", "VFIO_DEVICE_BIND_IOMMUFD", "VFIO_DEVICE_BIND_IOMMUFD",
                   "VFIO_DEVICE_GET_INFO"]
    assert [r.devices for r in k.faults.calls][1:3] == [(A,), (B,)]
    # the 4th call of anything is the first BIND: fail it
    k2 = _kernel()
    k2.faults.add(parse_spec("call=*,nth=4,errno=ENOMEM"))
    c2 = Client(k2)
    ictx = c2.open("iommu")
    d0 = c2.open("vfio/devices/vfio0")
    d1 = c2.open("vfio/devices/vfio1")
    assert c2.bind(d0, ictx) == -errno.ENOMEM
    assert c2.bind(d1, ictx) == 0


def test_an_injected_failure_changes_nothing() -> None:
    k = _kernel()
    c = Client(k)
    ictx, d0, d1 = c.bound_pair()
    k.faults.add(parse_spec("call=VFIO_DEVICE_PCI_HOT_RESET,nth=1,errno=EBUSY"))
    resets = list(k.reset_log)
    before = k.describe()
    assert c.hot_reset(d0) == -errno.EBUSY
    after = k.describe()
    for state in (before, after):
        state.pop("faults")
    assert after == before
    assert k.reset_log == resets
    assert k.check_invariants() == []
    assert c.hot_reset(d0) == 0  # the rule was for the first call only
    assert len(k.reset_log) > len(resets)
    del ictx, d1


def test_unplug_trigger_queues_the_device_after_the_nth_call() -> None:
    k = _kernel()
    k.faults.add(parse_spec("unplug=01:00.1,after=VFIO_DEVICE_GET_INFO,nth=2"))
    c = Client(k)
    _ictx, d0, _d1 = c.bound_pair()
    assert c.get_info(d0) == 0
    assert k.faults.take_unplugs() == []
    assert c.get_info(d0) == 0
    assert k.faults.take_unplugs() == [B]
    assert c.get_info(d0) == 0
    assert k.faults.take_unplugs() == []


def test_hook_kinds_set_the_kernel_hooks_and_clear_unsets_them() -> None:
    k = _kernel()
    k.faults.add(parse_spec(f"memory-lock-busy={B}"))
    k.faults.add(parse_spec(f"reset-fails={A},errno=ENOTTY"))
    assert k.hooks.memory_lock_contended == {B}
    assert k.hooks.reset_errno == {A: errno.ENOTTY}
    c = Client(k)
    _ictx, d0, _d1 = c.bound_pair()
    assert c.hot_reset(d0) == -errno.EBUSY
    k.faults.add(parse_spec(f"device-lock-busy={A}"))
    assert k.hooks.device_lock_contended == {A}
    assert k.describe()["faults"]["hooks"] == [f"memory-lock-busy={B}", f"reset-fails={A},errno=ENOTTY",
                                               f"device-lock-busy={A}"]
    k.faults.clear()
    assert not k.hooks.memory_lock_contended and not k.hooks.reset_errno and not k.hooks.device_lock_contended
    assert not k.faults.armed
    assert c.hot_reset(d0) == 0


def test_a_device_not_in_the_model_is_refused() -> None:
    k = _kernel()
    with pytest.raises(FaultSpecError) as exc:
        k.faults.add(parse_spec("call=open,device=0000:07:00.0"))
    assert exc.value.field == "device"


def test_describe_shows_rules_and_injections_as_json() -> None:
    k = _kernel()
    k.faults.add(parse_spec("call=VFIO_DEVICE_GET_INFO,nth=1,errno=EBUSY"))
    c = Client(k)
    _ictx, d0, _d1 = c.bound_pair()
    c.get_info(d0)
    d = json.loads(json.dumps(k.describe()["faults"]))
    assert d["rules"][0]["fired"] == 1 and d["rules"][0]["seen"] == 1
    assert d["injected"][0]["op"] == "VFIO_DEVICE_GET_INFO"
    assert d["injected"][0]["errno"] == "EBUSY"
    assert d["injected"][0]["devices"] == [A]


@pytest.mark.parametrize("text", [
    "call=VFIO_DEVICE_PCI_HOT_RESET,nth=1,errno=EBUSY",
    "call=*,nth=7,count=all,errno=ENOMEM",
    "call=open,nth=2,count=3,device=0000:01:00.1,errno=ENODEV",
    "unplug=0000:01:00.1,after=VFIO_DEVICE_GET_INFO,nth=2",
    "memory-lock-busy=0000:01:00.1",
    "reset-fails=0000:01:00.0,errno=EIO",
    "device-lock-busy=0000:01:00.0",
])
def test_spec_text_round_trips(text: str) -> None:
    spec = parse_spec(text)
    assert spec.text() == text
    assert parse_spec(spec.text()) == spec


@pytest.mark.parametrize(("kind", "fields", "field"), [
    ("call-fails", {"call": "VFIO_NOPE"}, "call"),
    ("call-fails", {}, "call"),
    ("call-fails", {"call": "open", "nth": 0}, "nth"),
    ("call-fails", {"call": "open", "nth": "1"}, "nth"),
    ("call-fails", {"call": "open", "count": 0}, "count"),
    ("call-fails", {"call": "open", "errno": "EWHAT"}, "errno"),
    ("call-fails", {"call": "open", "errno": 5}, "errno"),
    ("call-fails", {"call": "open", "device": "01:00"}, "device"),
    ("call-fails", {"call": "open", "after": "open"}, "after"),
    ("unplug", {"device": "01:00.0"}, "after"),
    ("unplug", {"after": "open"}, "device"),
    ("memory-lock-busy", {}, "device"),
    ("memory-lock-busy", {"device": "01:00.0", "errno": "EIO"}, "errno"),
    ("explode", {}, "kind"),
])
def test_make_spec_names_the_bad_field(kind: str, fields: dict[str, object], field: str) -> None:
    with pytest.raises(FaultSpecError) as exc:
        make_spec(kind, fields)
    assert exc.value.field == field


def test_plan_without_a_model_takes_call_rules_only() -> None:
    plan = FaultPlan()
    plan.add(FaultSpec("call-fails", call="read", nth=1))
    with pytest.raises(InjectedError):
        plan.before("read", (), "x", None)
    plan.before("read", (), "x", None)
    with pytest.raises(FaultSpecError):
        plan.add(parse_spec("memory-lock-busy=01:00.0"))
