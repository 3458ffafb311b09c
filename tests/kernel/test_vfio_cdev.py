"""The device cdev: BIND / ATTACH / DETACH errnos and order, lifecycle (SPEC 3.3-3.6, 4.2, 4.4)."""

from __future__ import annotations

import errno as E

import pytest

from fakedev.uapi import consts as C
from fakedev.uapi import ioctls as IO
from fakedev.uapi import structs as S
from tests.kernel.conftest import VERSIONS, Rig, errno_of

F0, F1 = "0000:01:00.0", "0000:01:00.1"
BIND = S.VFIO_DEVICE_BIND_IOMMUFD


@pytest.mark.parametrize("ver", VERSIONS)
def test_unbound_fd_refuses_everything_but_bind(ver: str) -> None:
    r = Rig("dual-function-nic", ver)
    p = r["p"]
    d = p.open("vfio/devices/vfio0")
    a = p.buf(64)
    for cmd in (IO.VFIO_DEVICE_GET_INFO, IO.VFIO_DEVICE_RESET, IO.VFIO_DEVICE_ATTACH_IOMMUFD_PT,
                IO.VFIO_DEVICE_FEATURE, 0x3B99):
        assert errno_of(lambda cmd=cmd: p.ioctl(d, cmd, a)) == E.EINVAL
    assert errno_of(lambda: p.read(d, 7 << 40, 4)) == E.EINVAL
    assert errno_of(lambda: p.write(d, 0, b"x")) == E.EINVAL
    p.close(d)  # never bound: nothing happens
    assert r.k.device(F0).open_count == 0
    r.check()


@pytest.mark.parametrize("ver", VERSIONS)
def test_bind_header_checks(ver: str) -> None:
    r = Rig("dual-function-nic", ver)
    p = r["p"]
    ifd = p.open("iommu")
    d = p.open("vfio/devices/vfio0")

    def bind(**kw: int) -> int:
        vals = {"argsz": 16, "flags": 0, "iommufd": ifd} | kw
        return errno_of(lambda: p.ioctl(d, IO.VFIO_DEVICE_BIND_IOMMUFD, p.buf(BIND.pack(vals)[:16])))

    assert bind(argsz=15) == E.EINVAL
    assert bind(flags=1) == E.EINVAL  # no token flag before 6.16
    assert bind(flags=2) == E.EINVAL
    assert bind(iommufd=-1) == E.EINVAL
    assert bind(iommufd=77) == E.EBADF
    pipe = p.p.pipe()
    assert bind(iommufd=pipe) == E.EBADFD
    assert bind(iommufd=d) == E.EBADFD
    assert errno_of(lambda: p.ioctl(d, IO.VFIO_DEVICE_BIND_IOMMUFD, 0x10)) == E.EFAULT
    # a 16-byte struct ending at the end of a page is enough (6.6 layout)
    arg = p.p.alloc_at_end(BIND.pack(argsz=16, iommufd=ifd)[:16])
    assert p.ioctl(d, IO.VFIO_DEVICE_BIND_IOMMUFD, arg) == 0
    assert BIND.unpack(p.p.peek(arg, 16), partial=True)["out_devid"] == 1
    assert bind() == E.EINVAL  # this fd is already bound
    assert r.k.device(F0).group.cdev_device_open_cnt == 1
    assert p.p.fds[pipe].refs == 1  # type: ignore[union-attr]  # the fget reference was dropped
    r.check()


def test_bind_token_era_header_rules() -> None:
    """Kernels with the BIND token: copy_struct_from_user of 24 bytes, token checked after block_group."""
    r = Rig("dual-function-nic", "6.18")
    p = r["p"]
    ifd = p.open("iommu")
    d = p.open("vfio/devices/vfio0")
    T = C.VFIO_DEVICE_BIND_FLAG_TOKEN

    def bind(data: bytes) -> int:
        return errno_of(lambda: p.ioctl(d, IO.VFIO_DEVICE_BIND_IOMMUFD, p.buf(data)))

    # flag with a 16-byte struct: the pointer reads as 0 -> EFAULT
    assert bind(BIND.pack(argsz=16, flags=T, iommufd=ifd)[:16]) == E.EFAULT
    uuid = p.buf(16)
    assert bind(BIND.pack(argsz=24, flags=T, iommufd=ifd, token_uuid_ptr=uuid)) == E.EINVAL  # not SR-IOV
    assert bind(BIND.pack(argsz=24, flags=T, iommufd=ifd, token_uuid_ptr=8)) == E.EFAULT
    assert bind(BIND.pack(argsz=32, iommufd=ifd) + b"\0" * 7 + b"\1") == E.E2BIG
    assert bind(BIND.pack(argsz=24, flags=2, iommufd=ifd)) == E.EINVAL
    assert bind(BIND.pack(argsz=15, iommufd=ifd)) == E.EINVAL
    g = p.open("vfio/13")
    assert bind(BIND.pack(argsz=24, flags=T, iommufd=ifd, token_uuid_ptr=8)) == E.EBUSY  # block_group first
    p.close(g)
    assert bind(BIND.pack(argsz=32, iommufd=ifd) + bytes(8)) == 0
    assert r.k.device(F0).iommufd_device.obj_id == 1
    r.check()


def test_bind_qemu_24_byte_struct_on_6_6() -> None:
    """6.6 copies only the first 16 bytes: QEMU's 24-byte struct without the flag binds."""
    r = Rig("dual-function-nic", "6.6")
    p = r["p"]
    ifd = p.open("iommu")
    d = p.open("vfio/devices/vfio0")
    assert p.bind(d, ifd, argsz=24) == 1
    r.check()


@pytest.mark.parametrize("ver", VERSIONS)
def test_bind_order_group_open_before_already_bound(ver: str) -> None:
    """vfio_device_block_group() (EBUSY) runs before the access_granted check (EINVAL)."""
    r = Rig("dual-function-nic", ver)
    p = r["p"]
    ifd = p.open("iommu")
    d, _ = p.cdev_bound(0, ifd)
    # the group cannot be opened while bound; so check with a second cdev fd instead
    d2 = p.open("vfio/devices/vfio0")
    assert errno_of(lambda: p.bind(d2, ifd)) == E.EINVAL  # device already open
    assert errno_of(lambda: p.bind(d2, 99)) == E.EBADF  # fd lookup precedes the open check
    r.check()
    p.close(d)
    assert p.bind(d2, ifd) == 1
    r.check()


@pytest.mark.parametrize("ver", VERSIONS)
def test_bind_while_group_open_is_ebusy_even_with_bad_iommufd(ver: str) -> None:
    r = Rig("dual-function-nic", ver)
    p = r["p"]
    g = p.open("vfio/13")
    d = p.open("vfio/devices/vfio0")  # opening the cdev is allowed
    assert errno_of(lambda: p.bind(d, 99)) == E.EBUSY
    p.close(g)
    assert errno_of(lambda: p.bind(d, 99)) == E.EBADF
    r.check()


@pytest.mark.parametrize("ver", VERSIONS)
def test_same_group_two_contexts_eperm_same_context_ok(ver: str) -> None:
    r = Rig("shared-group", ver)
    p, q = r["p"], r["q"]
    a = p.open("iommu")
    p.cdev_bound(0, a)
    b = q.open("iommu")
    d1 = q.open("vfio/devices/vfio1")
    assert errno_of(lambda: q.bind(d1, b)) == E.EPERM
    assert r.k.device(F1).group.cdev_device_open_cnt == 1  # unblocked again after the failure
    # another process binding to the same context (fd passed) is fine
    a_in_q = q.p.install(p.p.fds[a])  # type: ignore[arg-type]
    assert q.bind(d1, a_in_q) == 2
    assert r.k.iommu_groups[13].user_owner_cnt == 2
    r.check()


@pytest.mark.parametrize("ver", VERSIONS)
def test_closing_iommufd_keeps_binding(ver: str) -> None:
    r = Rig("dual-function-nic", ver)
    p = r["p"]
    a = p.open("iommu")
    d, _ = p.cdev_bound(0, a)
    ctx = r.k.device(F0).iommufd_ictx
    p.close(a)
    assert not ctx.dead
    err, hdr, _ = p.hot_reset_info(d)
    assert err == 0 and hdr["flags"] & C.VFIO_PCI_HOT_RESET_FLAG_DEV_ID
    r.check()
    p.close(d)
    assert ctx.dead
    assert r.k.iommu_groups[13].owner is None
    r.check()


@pytest.mark.parametrize("ver", VERSIONS)
def test_attach_detach(ver: str) -> None:
    r = Rig("dual-function-nic", ver)
    p = r["p"]
    a = p.open("iommu")
    d, _ = p.cdev_bound(0, a)
    assert errno_of(lambda: p.attach(d, 1, argsz=11)) == E.EINVAL
    assert errno_of(lambda: p.attach(d, 1, flags=1)) == E.EINVAL
    assert errno_of(lambda: p.attach(d, 99)) == E.ENOENT
    assert errno_of(lambda: p.attach(d, 1)) == E.EINVAL  # a device object is neither IOAS nor HWPT
    ioas = p.ioas_alloc(a)
    hwpt = p.attach(d, ioas)
    assert hwpt == ioas + 1
    dev = r.k.device(F0)
    assert dev.iommufd_attached and dev.pt_id == hwpt
    assert p.attach(d, ioas) == hwpt  # re-attach = replace, same auto hwpt
    ioas2 = p.ioas_alloc(a)
    hwpt2 = p.attach(d, ioas2)
    assert hwpt2 not in (hwpt, ioas2)
    assert errno_of(lambda: p.detach(d, argsz=7)) == E.EINVAL
    assert errno_of(lambda: p.detach(d, flags=1)) == E.EINVAL
    p.detach(d)
    assert not dev.iommufd_attached
    p.detach(d)  # detaching again is fine
    r.check()
    p.attach(d, ioas)
    p.close(d)  # unbind detaches
    assert dev.iommufd_device is None
    r.check()


@pytest.mark.parametrize("ver", VERSIONS)
def test_close_unbinds_and_unblocks_group(ver: str) -> None:
    r = Rig("dual-function-nic", ver)
    p = r["p"]
    a = p.open("iommu")
    d, _ = p.cdev_bound(0, a)
    dev = r.k.device(F0)
    assert dev.cdev_opened and dev.open_count == 1 and dev.opener_pid == p.p.pid
    assert errno_of(lambda: p.open("vfio/13")) == E.EBUSY
    p.close(d)
    assert not dev.cdev_opened and dev.open_count == 0
    assert dev.group.cdev_device_open_cnt == 0
    g = p.open("vfio/13")
    assert g > 0
    # devid is reused after unbind
    p.close(g)
    assert p.cdev_bound(0, a)[1] == 1
    r.check()


def test_describe_names_holders() -> None:
    r = Rig("dual-function-nic")
    p = r["p"]
    a = p.open("iommu")
    p.cdev_bound(1, a)
    g = p.open("vfio/13")
    snap = r.k.describe()
    dev1 = next(d for d in snap["devices"] if d["bdf"] == F1)
    assert dev1["iommufd"] == "iommufd1" and dev1["devid"] == 1 and dev1["vfio"] == "vfio1"
    assert dev1["opener_pid"] == p.p.pid
    g13 = next(x for x in snap["groups"] if x["id"] == 13)
    g14 = next(x for x in snap["groups"] if x["id"] == 14)
    assert g13["open"] and g13["opener_pid"] == p.p.pid and not g14["open"]
    assert g14["dma_owner"] == "iommufd1" and g14["cdev_device_open_cnt"] == 1
    assert snap["drivers"][F1] == "vfio-pci"
    assert "iommufd1" in snap["iommufd"]
    assert g > 0
