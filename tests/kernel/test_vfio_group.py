"""Legacy path: /dev/vfio/vfio containers, /dev/vfio/<group>, GET_DEVICE_FD (SPEC 3.1, 3.2, 4.3, 4.4)."""

from __future__ import annotations

import errno as E
import struct

import pytest

from fakedev.kernel.kernel import Kernel
from fakedev.kernel.version import KernelVersion
from fakedev.uapi import consts as C
from fakedev.uapi import ioctls as IO
from fakedev.uapi import structs as S
from tests.kernel import topologies as T
from tests.kernel.conftest import VERSIONS, Proc, Rig, errno_of

F0, F1 = "0000:01:00.0", "0000:01:00.1"


def status(p: Proc, g: int) -> int:
    a = p.buf(S.VFIO_GROUP_STATUS.pack(argsz=8))
    p.ioctl(g, IO.VFIO_GROUP_GET_STATUS, a)
    return S.VFIO_GROUP_STATUS.unpack(p.p.peek(a, 8))["flags"]


def set_container(p: Proc, g: int, fd: int) -> int:
    return p.ioctl(g, IO.VFIO_GROUP_SET_CONTAINER, p.buf(struct.pack("<i", fd)))


def shared_group_with_host_driver() -> Kernel:
    topo = T.shared_group()
    dev = topo.find(F1)
    assert dev is not None
    dev.driver = "igb"
    return Kernel(topo, KernelVersion.parse("6.12"))


def test_nodes_and_numbers() -> None:
    r = Rig("dual-function-nic")
    nodes = {n.path: n for n in r.k.nodes()}
    assert (nodes["vfio/vfio"].major, nodes["vfio/vfio"].minor, nodes["vfio/vfio"].mode) == (10, 196, 0o666)
    assert nodes["vfio/13"].minor == 0 and nodes["vfio/14"].minor == 1
    assert nodes["vfio/13"].major == nodes["vfio/14"].major != 10
    assert (nodes["vfio/devices/vfio1"].minor, nodes["vfio/devices/vfio1"].mode) == (1, 0o600)
    assert nodes["iommu"].mode == 0o660 and nodes["iommu"].major == 10
    assert [(d.index, d.name, d.pdev.iommu_group) for d in r.k.vfio_devices()] == [(0, F0, 13), (1, F1, 14)]
    assert errno_of(lambda: r["p"].open("vfio/12")) == E.ENOENT  # the root port's group has no VFIO device
    assert errno_of(lambda: r["p"].open("vfio/devices/vfio7")) == E.ENOENT


@pytest.mark.parametrize("ver", VERSIONS)
def test_group_open_exclusive_and_status(ver: str) -> None:
    r = Rig("dual-function-nic", ver)
    p, q = r["p"], r["q"]
    g = p.open("vfio/13")
    assert errno_of(lambda: q.open("vfio/13")) == E.EBUSY
    assert status(p, g) == C.VFIO_GROUP_FLAGS_VIABLE
    a = p.buf(S.VFIO_GROUP_STATUS.pack(argsz=7))
    assert errno_of(lambda: p.ioctl(g, IO.VFIO_GROUP_GET_STATUS, a)) == E.EINVAL
    assert errno_of(lambda: p.ioctl(g, IO.VFIO_GROUP_GET_STATUS, 0x10)) == E.EFAULT
    assert errno_of(lambda: p.ioctl(g, IO.VFIO_DEVICE_GET_INFO, a)) == E.ENOTTY
    c = p.open("vfio/vfio")
    assert set_container(p, g, c) == 0
    assert status(p, g) == C.VFIO_GROUP_FLAGS_VIABLE | C.VFIO_GROUP_FLAGS_CONTAINER_SET
    p.close(g)
    g2 = q.open("vfio/13")  # the release detached the container
    assert status(q, g2) == C.VFIO_GROUP_FLAGS_VIABLE
    r.check()


def test_host_driver_in_group_not_viable_and_eperm() -> None:
    k = shared_group_with_host_driver()
    p = Proc(k)
    g = p.open("vfio/13")
    assert status(p, g) == 0
    c = p.open("vfio/vfio")
    assert errno_of(lambda: set_container(p, g, c)) == E.EPERM
    a = p.open("iommu")
    d0 = p.open("vfio/devices/vfio0")
    p.close(g)
    assert errno_of(lambda: p.bind(d0, a)) == E.EPERM
    assert k.check_invariants() == []


@pytest.mark.parametrize("ver", VERSIONS)
def test_set_container_errnos(ver: str) -> None:
    r = Rig("dual-function-nic", ver)
    p = r["p"]
    g = p.open("vfio/13")
    assert errno_of(lambda: set_container(p, g, 999)) == E.EBADF
    assert errno_of(lambda: p.ioctl(g, IO.VFIO_GROUP_SET_CONTAINER, 0x10)) == E.EFAULT
    pipe = p.p.pipe()
    assert errno_of(lambda: set_container(p, g, pipe)) == E.EBADFD
    d = p.open("vfio/devices/vfio1")
    assert errno_of(lambda: set_container(p, g, d)) == E.EBADFD
    c = p.open("vfio/vfio")
    set_container(p, g, c)
    c2 = p.open("vfio/vfio")
    assert errno_of(lambda: set_container(p, g, c2)) == E.EINVAL
    assert errno_of(lambda: p.ioctl(g, IO.VFIO_GROUP_UNSET_CONTAINER, 0)) == 0
    assert errno_of(lambda: p.ioctl(g, IO.VFIO_GROUP_UNSET_CONTAINER, 0)) == E.EINVAL
    r.check()


@pytest.mark.parametrize("ver", VERSIONS)
def test_get_device_fd_rules(ver: str) -> None:
    r = Rig("dual-function-nic", ver)
    p = r["p"]
    g = p.open("vfio/13")
    assert errno_of(lambda: p.get_device_fd(g, F0)) == E.EINVAL  # no container
    c = p.open("vfio/vfio")
    set_container(p, g, c)
    assert errno_of(lambda: p.get_device_fd(g, F0)) == E.EINVAL  # SET_IOMMU not done
    assert errno_of(lambda: p.get_device_fd(g, F1)) == E.ENODEV  # another group's device
    assert errno_of(lambda: p.get_device_fd(g, F0 + "x")) == E.ENODEV
    assert errno_of(lambda: p.get_device_fd(g, F0 + " bogus")) == E.EINVAL
    tok = " vf_token=" + "12345678-1234-1234-1234-123456789abc"
    assert errno_of(lambda: p.get_device_fd(g, F0 + tok)) == E.EINVAL
    assert errno_of(lambda: p.ioctl(g, IO.VFIO_GROUP_GET_DEVICE_FD, 0x10)) == E.EFAULT
    long_name = p.buf(b"a" * 5000 + b"\0")
    assert errno_of(lambda: p.ioctl(g, IO.VFIO_GROUP_GET_DEVICE_FD, long_name)) == E.EINVAL
    p.ioctl(c, IO.VFIO_SET_IOMMU, C.VFIO_TYPE1v2_IOMMU)
    d1 = p.get_device_fd(g, F0)
    d2 = p.get_device_fd(g, F0)
    assert d1 != d2 and p.p.fds[d1] is not p.p.fds[d2]
    dev = r.k.device(F0)
    assert dev.open_count == 2 and dev.group.container_users == 2  # one use per opened device
    # UNSET_CONTAINER refused while devices are open
    assert errno_of(lambda: p.ioctl(g, IO.VFIO_GROUP_UNSET_CONTAINER, 0)) == E.EBUSY
    # BIND on a group-derived fd, cdev-only ioctls on it
    a = p.open("iommu")
    assert errno_of(lambda: p.bind(d1, a)) == E.EINVAL
    assert errno_of(lambda: p.attach(d1, 1)) == E.ENOTTY
    r.check()
    p.close(d1)
    p.close(d2)
    assert dev.open_count == 0 and dev.group.container_users == 1
    assert p.ioctl(g, IO.VFIO_GROUP_UNSET_CONTAINER, 0) == 0
    r.check()


@pytest.mark.parametrize("ver", VERSIONS)
def test_device_fd_keeps_group_file_alive(ver: str) -> None:
    r = Rig("dual-function-nic", ver)
    p, q = r["p"], r["q"]
    g, _ = p.group_setup(13)
    d = p.get_device_fd(g, F0)
    p.close(g)
    assert errno_of(lambda: q.open("vfio/13")) == E.EBUSY
    assert r.k.iommu_groups[13].owner is not None
    # BIND of the cdev is still blocked: the group file is open (held by the device fd)
    a = q.open("iommu")
    cd = q.open("vfio/devices/vfio0")
    assert errno_of(lambda: q.bind(cd, a)) == E.EBUSY
    p.close(d)
    assert r.k.iommu_groups[13].owner is None
    assert q.bind(cd, a) == 1
    r.check()


def test_fd_install_failure_releases_device() -> None:
    r = Rig("dual-function-nic")
    p = r["p"]
    g, _ = p.group_setup(13)

    def refuse(file: object) -> int:
        from fakedev.kernel.errors import KernelError
        raise KernelError(E.ENOTTY)

    p.t.fd_install = refuse  # type: ignore[method-assign]
    assert errno_of(lambda: p.get_device_fd(g, F0)) == E.ENOTTY
    assert r.k.device(F0).open_count == 0
    r.check()


@pytest.mark.parametrize("ver", VERSIONS)
def test_group_with_iommufd(ver: str) -> None:
    r = Rig("shared-group", ver)
    p, q = r["p"], r["q"]
    g = p.open("vfio/13")
    a = p.open("iommu")
    assert set_container(p, g, a) == 0
    assert status(p, g) == C.VFIO_GROUP_FLAGS_VIABLE | C.VFIO_GROUP_FLAGS_CONTAINER_SET
    d = p.get_device_fd(g, F0)
    dev = r.k.device(F0)
    assert dev.iommufd_device is not None and dev.iommufd_attached
    assert r.k.iommu_groups[13].owner is dev.iommufd_ictx
    # hot reset info from a group-opened device: group ids, no DEV_ID flag
    err, hdr, ents = p.hot_reset_info(d)
    assert err == 0 and hdr["flags"] == 0 and [e[0] for e in ents] == [13, 13]
    # another context cannot take the other function of the group
    b = q.open("iommu")
    cd = q.open("vfio/devices/vfio1")
    assert errno_of(lambda: q.bind(cd, b)) == E.EBUSY  # group file open
    r.check()
    p.close(d)
    assert dev.iommufd_device is None and r.k.iommu_groups[13].owner is None
    assert p.ioctl(g, IO.VFIO_GROUP_UNSET_CONTAINER, 0) == 0
    r.check()


# -- the container ----------------------------------------------------------------


@pytest.mark.parametrize("ver", VERSIONS)
def test_container_basics(ver: str) -> None:
    r = Rig("dual-function-nic", ver)
    p = r["p"]
    c = p.open("vfio/vfio")
    assert p.ioctl(c, IO.VFIO_GET_API_VERSION, 0) == 0
    ext = {e: p.ioctl(c, IO.VFIO_CHECK_EXTENSION, e) for e in range(1, 12)}
    nesting = 1  # type1 nesting is offered before 6.13
    assert ext == {1: 1, 2: 0, 3: 1, 4: 0, 5: 0, 6: nesting, 7: 0, 8: 0, 9: 1, 10: 0, 11: 0}
    assert errno_of(lambda: p.ioctl(c, IO.VFIO_SET_IOMMU, C.VFIO_TYPE1v2_IOMMU)) == E.EINVAL  # no group
    assert errno_of(lambda: p.ioctl(c, IO.VFIO_IOMMU_GET_INFO, p.buf(24))) == E.EINVAL  # no driver
    g = p.open("vfio/13")
    set_container(p, g, c)
    assert errno_of(lambda: p.ioctl(c, IO.VFIO_SET_IOMMU, C.VFIO_UNMAP_ALL)) == E.EINVAL
    assert errno_of(lambda: p.ioctl(c, IO.VFIO_SET_IOMMU, C.VFIO_UPDATE_VADDR)) == E.ENODEV
    assert errno_of(lambda: p.ioctl(c, IO.VFIO_SET_IOMMU, 77)) == E.ENODEV
    assert p.ioctl(c, IO.VFIO_SET_IOMMU, C.VFIO_TYPE1v2_IOMMU) == 0
    assert errno_of(lambda: p.ioctl(c, IO.VFIO_SET_IOMMU, C.VFIO_TYPE1v2_IOMMU)) == E.EINVAL
    assert p.ioctl(c, IO.VFIO_CHECK_EXTENSION, C.VFIO_UPDATE_VADDR) == 1
    assert p.ioctl(c, IO.VFIO_CHECK_EXTENSION, C.VFIO_DMA_CC_IOMMU) == 1
    assert errno_of(lambda: p.ioctl(c, IO.VFIO_DEVICE_GET_INFO + 0x10, 0)) == E.ENOTTY
    r.check()


def test_nesting_gone_in_613() -> None:
    r = Rig("dual-function-nic", "6.13")
    p = r["p"]
    c = p.open("vfio/vfio")
    assert p.ioctl(c, IO.VFIO_CHECK_EXTENSION, C.VFIO_TYPE1_NESTING_IOMMU) == 0


def test_type1_get_info_caps() -> None:
    r = Rig("dual-function-nic")
    p = r["p"]
    _, c = p.group_setup(13)
    lay = S.VFIO_IOMMU_TYPE1_INFO
    a = p.buf(lay.pack(argsz=16)[:16] + b"\xa5" * 200)
    assert p.ioctl(c, IO.VFIO_IOMMU_GET_INFO, a) == 0
    info = lay.unpack(p.p.peek(a, 24))
    assert info["flags"] == C.VFIO_IOMMU_INFO_PGSIZES | C.VFIO_IOMMU_INFO_CAPS
    assert info["iova_pgsizes"] & 0x1000
    need = info["argsz"]
    assert need > 24 and p.p.peek(a + 16, 4) == b"\xa5" * 4  # copy-back of 16 bytes only
    b = p.buf(lay.pack(argsz=need) + bytes(need - 24))
    p.ioctl(c, IO.VFIO_IOMMU_GET_INFO, b)
    info = lay.unpack(p.p.peek(b, 24))
    assert info["cap_offset"] == 24
    ids, off = [], 24
    while off:
        hdr = S.VFIO_INFO_CAP_HEADER.unpack(p.p.peek(b + off, 8))
        ids.append(hdr["id"])
        if hdr["id"] == C.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
            cap = S.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE.unpack(p.p.peek(b + off, 16))
            assert cap["nr_iovas"] == 2
            first = S.VFIO_IOVA_RANGE.unpack(p.p.peek(b + off + 16, 16))
            assert first == {"start": 0, "end": 0xFEDFFFFF}
        off = hdr["next"]
    assert ids == [C.VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION, C.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL,
                   C.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE]
    assert errno_of(lambda: p.ioctl(c, IO.VFIO_IOMMU_GET_INFO, p.buf(lay.pack(argsz=15)))) == E.EINVAL


def _map(p: Proc, c: int, iova: int, size: int, vaddr: int, flags: int = 3) -> int:
    a = p.buf(S.VFIO_IOMMU_TYPE1_DMA_MAP.pack(argsz=32, flags=flags, vaddr=vaddr, iova=iova, size=size))
    return p.ioctl(c, IO.VFIO_IOMMU_MAP_DMA, a)


def _unmap(p: Proc, c: int, iova: int, size: int, flags: int = 0) -> int:
    a = p.buf(S.VFIO_IOMMU_TYPE1_DMA_UNMAP.pack(argsz=24, flags=flags, iova=iova, size=size))
    p.ioctl(c, IO.VFIO_IOMMU_UNMAP_DMA, a)
    return S.VFIO_IOMMU_TYPE1_DMA_UNMAP.unpack(p.p.peek(a, 24))["size"]


def test_type1_map_unmap_v2() -> None:
    r = Rig("dual-function-nic")
    p = r["p"]
    _, c = p.group_setup(13)
    mem = p.p.mmap(0x10000)
    assert _map(p, c, 0x100000, 0x4000, mem) == 0
    assert errno_of(lambda: _map(p, c, 0x102000, 0x4000, mem)) == E.EEXIST
    assert errno_of(lambda: _map(p, c, 0x200000, 0x1000, mem, flags=0)) == E.EINVAL
    assert errno_of(lambda: _map(p, c, 0x200000, 0x1000, mem, flags=8)) == E.EINVAL
    assert errno_of(lambda: _map(p, c, 0x200001, 0x1000, mem)) == E.EINVAL
    assert errno_of(lambda: _map(p, c, 0x200000, 0, mem)) == E.EINVAL
    assert errno_of(lambda: _map(p, c, 0xFEE00000, 0x1000, mem)) == E.EINVAL  # MSI window
    assert errno_of(lambda: _map(p, c, 0x300000, 0x1000, 0x7000_0000_0000)) == E.EFAULT
    assert errno_of(lambda: _unmap(p, c, 0x101000, 0x1000)) == E.EINVAL  # bisects
    assert _unmap(p, c, 0x800000, 0x1000) == 0  # nothing mapped: success, size 0
    assert errno_of(lambda: _unmap(p, c, 0, 0x1000, flags=C.VFIO_DMA_UNMAP_FLAG_ALL)) == E.EINVAL
    assert _unmap(p, c, 0x100000, 0x4000) == 0x4000
    _map(p, c, 0x100000, 0x1000, mem)
    _map(p, c, 0x400000, 0x1000, mem)
    assert _unmap(p, c, 0, 0, flags=C.VFIO_DMA_UNMAP_FLAG_ALL) == 0x2000
