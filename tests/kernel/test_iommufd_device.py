"""iommufd devices: bind/attach/replace/detach, HWPTs, GET_HW_INFO, lifetime."""

from __future__ import annotations

import errno

import pytest
from test_iommufd_main import RW, V66, V67, Env, kerr

from fakedev.kernel.iommu import BLOCKING_DOMAIN, DEFAULT_DOMAIN, IommuGroup, build_iommu_groups
from fakedev.kernel.iommufd import (
    IommufdDevice,
    iommufd_check_invariants,
    iommufd_ctx_has_group,
    iommufd_device_attach,
    iommufd_device_bind,
    iommufd_device_detach,
    iommufd_device_replace,
    iommufd_device_unbind,
)
from fakedev.kernel.pci import PciBus, PciDev, PciTopology
from fakedev.kernel.version import NEWEST, KernelVersion
from fakedev.uapi import consts as C
from fakedev.uapi import structs as S

U64 = (1 << 64) - 1
FIXED = C.IOMMU_IOAS_MAP_FIXED_IOVA
FULL_AFTER_ATTACH = [(0, 0xFEDFFFFF), (0xFEF00000, (1 << 48) - 1)]


class Machine(Env):
    """/dev/iommu plus groups: 1 = two vfio-pci functions, 2 = one, 3 = vfio-pci + e1000e, 4 = one."""

    def __init__(self, version: KernelVersion = V66) -> None:
        super().__init__(version)
        bus = PciBus(0, 0)
        spec = [(0x08, 1, "vfio-pci"), (0x09, 1, "vfio-pci"), (0x10, 2, "vfio-pci"), (0x18, 3, "vfio-pci"),
                (0x19, 3, "e1000e"), (0x20, 4, "vfio-pci"), (0x28, None, "vfio-pci")]
        for devfn, grp, drv in spec:
            bus.devices.append(PciDev(bus, devfn, bytearray(256), iommu_group=grp, driver=drv))
        self.topo = PciTopology([bus])
        self.groups = build_iommu_groups(self.topo)
        self.devs = bus.devices

    def bind(self, i: int, env: Env | None = None) -> IommufdDevice:
        d = self.devs[i]
        grp = self.groups.get(d.iommu_group) if d.iommu_group is not None else None
        return iommufd_device_bind((env or self).ctx, d, grp)

    def g(self, gid: int) -> IommuGroup:
        return self.groups[gid]

    def ranges(self, ioas: int) -> list[tuple[int, int]]:
        return self.ctx.get_ioas(ioas).iopt.iova_ranges()

    def check(self) -> None:
        assert iommufd_check_invariants(self.ctx) == []


# -- bind / unbind -------------------------------------------------------------------------
def test_bind_allocates_devid_from_shared_table() -> None:
    m = Machine()
    assert m.ioas() == 1
    idev = m.bind(0)
    assert idev.obj_id == 2 and idev.ictx is m.ctx and idev.dev is m.devs[0] and idev.group is m.g(1)
    assert idev.attached_hwpt_id is None
    assert m.ctx.refs == 2
    assert m.g(1).owner is m.ctx and m.g(1).domain is BLOCKING_DOMAIN
    assert m.ioas() == 3
    m.check()


def test_bind_errors() -> None:
    m = Machine()
    other = Env()
    assert kerr(m.bind, 6) == errno.ENODEV  # no iommu group
    assert kerr(m.bind, 3) == errno.EPERM  # e1000e in the same group
    m.bind(0)
    assert kerr(m.bind, 1, other) == errno.EPERM  # group owned by another context
    m.bind(1)  # same context: fine
    assert m.g(1).owner_cnt == 2
    m.g(4).domain = object()
    assert kerr(m.bind, 5) == errno.EBUSY
    assert m.ctx.objects.keys() == {1, 2} and other.ctx.objects == {}
    m.check()


def test_destroy_device_is_ebusy_and_unbind_frees_id() -> None:
    m = Machine()
    idev = m.bind(2)
    assert m.call("IOMMU_DESTROY", id=idev.obj_id)[0] == errno.EBUSY
    iommufd_device_unbind(idev)
    assert m.ctx.objects == {} and m.ctx.refs == 1
    assert m.g(2).owner is None and m.g(2).domain is DEFAULT_DOMAIN
    assert m.ioas() == 1


def test_has_group() -> None:
    m = Machine()
    assert not iommufd_ctx_has_group(m.ctx, m.g(1))
    idev = m.bind(1)
    assert iommufd_ctx_has_group(m.ctx, m.g(1))
    assert not iommufd_ctx_has_group(m.ctx, m.g(2))
    assert not iommufd_ctx_has_group(None, m.g(1))
    assert not iommufd_ctx_has_group(m.ctx, None)
    iommufd_device_unbind(idev)
    assert not iommufd_ctx_has_group(m.ctx, m.g(1))


# -- lifetime -----------------------------------------------------------------------------------
def test_closing_iommufd_with_bound_device_keeps_context() -> None:
    m = Machine()
    ioas = m.ioas()
    idev = m.bind(2)
    hwpt = iommufd_device_attach(idev, ioas)
    manual = m.ok("IOMMU_HWPT_ALLOC", dev_id=idev.obj_id, pt_id=ioas)["out_hwpt_id"]
    m.file.release()
    assert not m.ctx.dead and set(m.ctx.objects) == {ioas, idev.obj_id, hwpt, manual}
    m.check()
    iommufd_device_detach(idev)
    assert hwpt not in m.ctx.objects
    iommufd_device_unbind(idev)
    assert m.ctx.dead and m.ctx.objects == {}
    assert m.g(2).owner is None and m.g(2).domain is DEFAULT_DOMAIN


def test_unbind_while_attached_detaches_first() -> None:
    m = Machine()
    ioas = m.ioas()
    idev = m.bind(2)
    iommufd_device_attach(idev, ioas)
    m.file.release()
    iommufd_device_unbind(idev)
    assert m.ctx.dead and m.g(2).user_owner_cnt == 0


def test_bind_to_dead_context_fails() -> None:
    m = Machine()
    m.file.release()
    assert kerr(m.bind, 2) == errno.EBADFD
    assert m.g(2).owner is None


# -- attach ------------------------------------------------------------------------------
def test_attach_ioas_creates_then_reuses_auto_hwpt() -> None:
    m = Machine()
    ioas = m.ioas()
    a, b, c = m.bind(0), m.bind(1), m.bind(2)
    assert iommufd_device_attach(a, ioas) == 5
    assert a.attached_hwpt_id == 5 and m.g(1).domain is a.hwpt
    assert iommufd_device_attach(b, ioas) == 5
    assert iommufd_device_attach(c, ioas) == 5  # compatible: same auto domain
    assert m.ctx.objects[5].users == 4
    assert m.ranges(ioas) == FULL_AFTER_ATTACH
    assert m.ctx.get_ioas(ioas).iopt.iova_alignment == 4096
    m.check()
    for d in (a, b, c):
        iommufd_device_detach(d)
    assert 5 not in m.ctx.objects
    assert m.ranges(ioas) == [(0, U64)] and m.ctx.get_ioas(ioas).iopt.iova_alignment == 1
    assert m.g(1).domain is BLOCKING_DOMAIN
    assert m.ioas() == 5  # the auto HWPT's ID is free again
    m.check()


def test_attach_errors() -> None:
    m = Machine()
    ioas = m.ioas()
    a, b = m.bind(0), m.bind(1)
    assert kerr(iommufd_device_attach, a, 77) == errno.ENOENT
    assert kerr(iommufd_device_attach, a, b.obj_id) == errno.EINVAL
    manual = m.ok("IOMMU_HWPT_ALLOC", dev_id=a.obj_id, pt_id=ioas)["out_hwpt_id"]
    assert iommufd_device_attach(a, manual) == manual
    assert kerr(iommufd_device_attach, a, manual) == errno.EINVAL  # already attached
    # b is in a's group, which sits on the manual HWPT: a new auto HWPT is refused
    before = set(m.ctx.objects)
    assert kerr(iommufd_device_attach, b, ioas) == errno.EINVAL
    assert set(m.ctx.objects) == before
    assert iommufd_device_attach(b, manual) == manual
    assert m.call("IOMMU_DESTROY", id=manual)[0] == errno.EBUSY
    assert m.call("IOMMU_DESTROY", id=ioas)[0] == errno.EBUSY
    m.check()


def test_attach_msi_window_clash_is_eaddrinuse() -> None:
    m = Machine()
    ioas = m.ioas()
    buf = m.proc.alloc(0x1000)
    m.ok("IOMMU_IOAS_MAP", flags=RW | FIXED, ioas_id=ioas, user_va=buf, length=0x1000, iova=0xFEE00000)
    idev = m.bind(2)
    before = set(m.ctx.objects)
    assert kerr(iommufd_device_attach, idev, ioas) == errno.EADDRINUSE
    assert set(m.ctx.objects) == before and idev.hwpt is None
    assert m.ctx.get_ioas(ioas).iopt.reserved == []
    m.check()


def test_attach_refused_when_mapping_outside_aperture() -> None:
    m = Machine()
    ioas = m.ioas()
    buf = m.proc.alloc(0x1000)
    m.ok("IOMMU_IOAS_MAP", flags=RW | FIXED, ioas_id=ioas, user_va=buf, length=0x1000, iova=1 << 50)
    idev = m.bind(2)
    assert kerr(iommufd_device_attach, idev, ioas) == errno.EADDRINUSE
    assert m.ioas() == 3  # the aborted HWPT left no ID behind


def test_map_into_msi_window_after_attach_is_einval() -> None:
    m = Machine()
    ioas = m.ioas()
    iommufd_device_attach(m.bind(2), ioas)
    buf = m.proc.alloc(0x1000)
    err, _ = m.call("IOMMU_IOAS_MAP", flags=RW | FIXED, ioas_id=ioas, user_va=buf, length=0x1000,
                    iova=0xFEE00000)
    assert err == errno.EINVAL
    err, _ = m.call("IOMMU_IOAS_MAP", flags=RW | FIXED, ioas_id=ioas, user_va=buf, length=0x1000, iova=0x800)
    assert err == errno.EINVAL  # alignment is 4096 now


# -- replace / detach ---------------------------------------------------------------------
def test_replace_moves_group_and_frees_old_auto_hwpt() -> None:
    m = Machine()
    io1, io2 = m.ioas(), m.ioas()
    a, b = m.bind(0), m.bind(1)
    h1 = iommufd_device_attach(a, io1)
    assert iommufd_device_attach(b, io1) == h1
    assert iommufd_device_replace(a, h1) == h1  # same HWPT: no-op
    h2 = iommufd_device_replace(a, io2)
    assert h1 not in m.ctx.objects and h2 in m.ctx.objects
    assert a.hwpt is b.hwpt and b.attached_hwpt_id == h2  # the whole group moved
    assert m.ranges(io1) == [(0, U64)] and m.ranges(io2) == FULL_AFTER_ATTACH
    assert m.g(1).domain is a.hwpt
    m.check()


def test_replace_to_manual_keeps_manual_after_detach() -> None:
    m = Machine()
    ioas = m.ioas()
    d = m.bind(2)
    auto = iommufd_device_attach(d, ioas)
    manual = m.ok("IOMMU_HWPT_ALLOC", dev_id=d.obj_id, pt_id=ioas)["out_hwpt_id"]
    assert iommufd_device_replace(d, manual) == manual
    assert auto not in m.ctx.objects
    iommufd_device_detach(d)
    assert manual in m.ctx.objects
    assert m.call("IOMMU_DESTROY", id=manual)[0] == 0
    assert m.call("IOMMU_DESTROY", id=ioas)[0] == 0
    m.check()


def test_replace_unattached_is_einval_and_detach_unattached_is_noop() -> None:
    m = Machine()
    ioas = m.ioas()
    d = m.bind(2)
    assert kerr(iommufd_device_replace, d, ioas) == errno.EINVAL
    iommufd_device_detach(d)
    assert d.hwpt is None and set(m.ctx.objects) == {ioas, d.obj_id}


def test_replace_msi_clash_changes_nothing() -> None:
    m = Machine()
    io1, io2 = m.ioas(), m.ioas()
    buf = m.proc.alloc(0x1000)
    m.ok("IOMMU_IOAS_MAP", flags=RW | FIXED, ioas_id=io2, user_va=buf, length=0x1000, iova=0xFEE00000)
    d = m.bind(2)
    h1 = iommufd_device_attach(d, io1)
    assert kerr(iommufd_device_replace, d, io2) == errno.EADDRINUSE
    assert d.attached_hwpt_id == h1 and set(m.ctx.objects) == {io1, io2, d.obj_id, h1}
    m.check()


# -- HWPT_ALLOC ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("version", "kw", "want"),
    [
        (V66, {"flags": 1}, errno.EOPNOTSUPP),
        (V66, {"__reserved": 1}, errno.EOPNOTSUPP),
        (V66, {"dev_id": 99}, errno.ENOENT),
        (V66, {"dev_id": 1}, errno.ENOENT),  # an IOAS is not a device
        (V66, {"pt_id": 99}, errno.ENOENT),
        (V66, {"pt_id": 2}, errno.ENOENT),  # a device is not an IOAS
        (V67, {"flags": 4}, errno.EOPNOTSUPP),
        (V67, {"__reserved": 1}, errno.EOPNOTSUPP),
        (V67, {"data_type": 1}, errno.EINVAL),  # type without data
        (V67, {"flags": C.IOMMU_HWPT_ALLOC_NEST_PARENT, "data_type": 1, "data_len": 8}, errno.EINVAL),
        (V67, {"dev_id": 99}, errno.ENOENT),
        (V67, {"pt_id": 99}, errno.EINVAL),  # 6.7+: unknown pt_id is EINVAL
        (V67, {"pt_id": 2}, errno.EINVAL),  # a device
        (V67, {"pt_id": 3}, errno.EINVAL),  # nesting needs data
        (V67, {"pt_id": 3, "data_type": 1, "data_len": 8}, errno.EINVAL),  # parent not NEST_PARENT
        (V67, {"data_len": 8}, errno.EINVAL),  # data without a type
        (V67, {"data_type": 1, "data_len": 8}, errno.EOPNOTSUPP),
        (V67, {"flags": C.IOMMU_HWPT_ALLOC_DIRTY_TRACKING}, errno.EOPNOTSUPP),
        (V66, {}, 0),
        (V67, {"flags": C.IOMMU_HWPT_ALLOC_NEST_PARENT}, 0),
    ],
)
def test_hwpt_alloc(version: KernelVersion, kw: dict[str, int], want: int) -> None:
    m = Machine(version)
    ioas = m.ioas()
    idev = m.bind(2)
    assert m.ok("IOMMU_HWPT_ALLOC", size=24, dev_id=idev.obj_id, pt_id=ioas)["out_hwpt_id"] == 3
    size = 24 if version == V66 else 40
    args = {"dev_id": idev.obj_id, "pt_id": ioas} | kw
    err, out = m.call("IOMMU_HWPT_ALLOC", size=size, **args)
    assert err == want
    if want == 0:
        assert out["out_hwpt_id"] == 4 and m.ranges(ioas) == [(0, (1 << 48) - 1)]
    else:
        assert set(m.ctx.objects) == {1, 2, 3}
    m.check()


# -- GET_HW_INFO ---------------------------------------------------------------------------
@pytest.mark.parametrize("data_len", [0, 8, 24, 64])
def test_hw_info_copies_min_and_zero_fills(data_len: int) -> None:
    m = Machine(NEWEST)
    idev = m.bind(2)
    buf = m.proc.alloc(b"\xaa" * 80)
    out = m.ok("IOMMU_GET_HW_INFO", dev_id=idev.obj_id, data_len=data_len, data_uptr=buf)
    assert out["data_len"] == 24 and out["out_data_type"] == C.IOMMU_HW_INFO_TYPE_INTEL_VTD
    assert out["out_capabilities"] == 0
    full = S.IOMMU_HW_INFO_VTD.pack(cap_reg=0x00D2008C40660462, ecap_reg=0xF050DA)
    got = m.proc.peek(buf, 80)
    n = min(data_len, 24)
    assert got[:n] == full[:n]
    assert got[n:data_len] == bytes(max(0, data_len - n))
    assert got[max(data_len, n):] == b"\xaa" * (80 - max(data_len, n))


def test_hw_info_errors_and_6_6_size() -> None:
    m = Machine(V66)
    idev = m.bind(2)
    assert m.call("IOMMU_GET_HW_INFO", size=32, dev_id=idev.obj_id, flags=1)[0] == errno.EOPNOTSUPP
    assert m.call("IOMMU_GET_HW_INFO", size=32, dev_id=idev.obj_id, __reserved=1)[0] == errno.EOPNOTSUPP
    assert m.call("IOMMU_GET_HW_INFO", size=32, dev_id=9)[0] == errno.ENOENT
    bad = m.proc.alloc_at_end(bytes(16))
    assert m.call("IOMMU_GET_HW_INFO", size=32, dev_id=idev.obj_id, data_len=24, data_uptr=bad)[0] == errno.EFAULT
    assert m.call("IOMMU_GET_HW_INFO", size=40, dev_id=idev.obj_id, out_capabilities=1)[0] == errno.E2BIG
    err, out = m.call("IOMMU_GET_HW_INFO", size=40, dev_id=idev.obj_id)
    assert err == 0 and out["data_len"] == 24


# -- device DMA view ------------------------------------------------------------------------
def test_device_dma_translate_follows_attachment() -> None:
    from fakedev.kernel.iommufd import iommufd_device_dma_translate

    m = Machine()
    ioas = m.ioas()
    d = m.bind(2)
    buf = m.proc.alloc(0x2000)
    m.ok("IOMMU_IOAS_MAP", flags=C.IOMMU_IOAS_MAP_READABLE | FIXED, ioas_id=ioas, user_va=buf, length=0x2000,
         iova=0x100000)
    assert kerr(iommufd_device_dma_translate, d, 0x100000, 4) == errno.ENOENT  # blocked
    iommufd_device_attach(d, ioas)
    (piece,) = iommufd_device_dma_translate(d, 0x101000, 0x10)
    assert (piece.pid, piece.addr, piece.prot) == (m.proc.pid, buf + 0x1000, 1)
    assert kerr(iommufd_device_dma_translate, d, 0x101ff0, 0x20) == errno.ENOENT
    iommufd_device_detach(d)
    assert kerr(iommufd_device_dma_translate, d, 0x100000, 4) == errno.ENOENT


def test_invariants_catch_group_domain_mismatch() -> None:
    m = Machine()
    iommufd_device_attach(m.bind(2), m.ioas())
    m.check()
    m.g(2).domain = BLOCKING_DOMAIN
    assert any("domain" in s for s in iommufd_check_invariants(m.ctx))


def test_nested_hwpt_on_nest_parent_is_eopnotsupp() -> None:
    m = Machine(V67)
    ioas = m.ioas()
    idev = m.bind(2)
    parent = m.ok("IOMMU_HWPT_ALLOC", dev_id=idev.obj_id, pt_id=ioas,
                  flags=C.IOMMU_HWPT_ALLOC_NEST_PARENT)["out_hwpt_id"]
    err, _ = m.call("IOMMU_HWPT_ALLOC", dev_id=idev.obj_id, pt_id=parent, data_type=1, data_len=8, data_uptr=0x1000)
    assert err == errno.EOPNOTSUPP
    assert set(m.ctx.objects) == {ioas, idev.obj_id, parent}
