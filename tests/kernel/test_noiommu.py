"""VFIO no-IOMMU mode (enable_unsafe_noiommu_mode): groups, container, iommufd compat, hot reset.

Each call goes through ``Call``: the model's invariants are checked after it,
and a failed call must leave ``Kernel.describe()`` unchanged.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from fakedev.kernel.errors import KernelError
from fakedev.kernel.file import File
from fakedev.kernel.iommufd import iommufd_vfio_compat_ioas_create
from fakedev.kernel.kernel import Kernel
from fakedev.kernel.testing import FakeProcess
from fakedev.kernel.version import KernelVersion
from fakedev.tree.loader import load_tree
from fakedev.uapi import consts as C
from fakedev.uapi import ioctls as I
from fakedev.uapi import structs as S

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "noiommu.toml"
BDF = "0000:03:00.0"
RAWIO = 17
NO_CAPS: frozenset[int] = frozenset()

MIXED = """
[[function]]
bdf = "0000:00:02.0"
vendor = 0x1b36
device = 0x00ff
class = 0xff0000
driver = "vfio-pci"
iommu_group = 5

[[function]]
bdf = "0000:00:03.0"
vendor = 0x1b36
device = 0x00ff
class = 0xff0000
driver = "vfio-pci"
iommu_group = "none"
"""


class World:
    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.proc = FakeProcess()
        self.task = self.proc.task()

    def call(self, f: File, cmd: int, arg: int) -> int:
        """One ioctl: invariants after it; a failure changes nothing."""
        before = self.k.describe()
        try:
            rc = f.ioctl(self.task, cmd, arg)
        except KernelError as e:
            assert self.k.describe() == before, f"failed ioctl {cmd:#x} changed the model"
            rc = -e.errno
        assert self.k.check_invariants() == []
        return rc

    def open(self, path: str) -> File | int:
        before = self.k.describe()
        try:
            f = self.k.open(path, self.task)
        except KernelError as e:
            assert self.k.describe() == before
            return -e.errno
        assert self.k.check_invariants() == []
        return f

    def fd(self, f: File) -> int:
        return self.proc.install(f)

    def int_arg(self, v: int) -> int:
        return self.proc.alloc(v.to_bytes(4, "little", signed=True))

    def drop_caps(self) -> None:
        self.proc.caps = NO_CAPS


def world(version: str | None = None) -> World:
    t = load_tree(FIXTURE)
    k = Kernel(t.topology, version=KernelVersion.parse(version) if version else t.version, noiommu=t.noiommu)
    return World(k)


def mixed_world(tmp_path: Path) -> World:
    p = tmp_path / "mixed.toml"
    p.write_text(MIXED)
    return World(Kernel(load_tree(p).topology, noiommu=True))


def opened(w: World, path: str) -> File:
    f = w.open(path)
    assert isinstance(f, File), f
    return f


def container_with_group(w: World, set_iommu: bool = True) -> tuple[File, File]:
    c = opened(w, "vfio/vfio")
    g = opened(w, "vfio/noiommu-0")
    assert w.call(g, I.VFIO_GROUP_SET_CONTAINER, w.int_arg(w.fd(c))) == 0
    if set_iommu:
        assert w.call(c, I.VFIO_SET_IOMMU, C.VFIO_NOIOMMU_IOMMU) == 0
    return c, g


def get_device_fd(w: World, g: File) -> int:
    return w.call(g, I.VFIO_GROUP_GET_DEVICE_FD, w.proc.alloc(BDF.encode() + b"\0"))


def device_info(w: World, df: Any) -> int:
    lay = S.VFIO_DEVICE_INFO
    return w.call(df, I.VFIO_DEVICE_GET_INFO, w.proc.alloc(lay.pack(argsz=lay.size)))


# --------------------------------------------------------------------------
# Groups and nodes
# --------------------------------------------------------------------------


def test_noiommu_group_node_and_no_cdev() -> None:
    w = world()
    k = w.k
    assert [n.path for n in k.nodes()] == ["vfio/vfio", "vfio/noiommu-0", "iommu"]
    (dev,) = k.vfio_devices()
    assert dev.index == 0 and dev.group.noiommu and dev.group.name == "noiommu-0"
    assert dev.pdev.iommu_group == 0
    assert k.iommu_groups[0].name == "vfio-noiommu" and k.iommu_groups[0].devices == [dev.pdev]
    assert k.vfio.tainted
    assert w.open("vfio/0") == -errno.ENOENT
    assert w.open("vfio/devices/vfio0") == -errno.ENOENT
    d = k.describe()
    assert d["noiommu_mode"] and d["tainted"] and d["groups"][0]["name"] == "noiommu-0"


def test_without_noiommu_mode_vfio_pci_does_not_probe() -> None:
    t = load_tree(FIXTURE)
    k = Kernel(t.topology, noiommu=False)
    assert [n.path for n in k.nodes()] == ["vfio/vfio", "iommu"]
    assert k.vfio_devices() == [] and not k.vfio.tainted


def test_noiommu_group_takes_the_lowest_free_group_id(tmp_path: Path) -> None:
    w = mixed_world(tmp_path)
    names = sorted(n.path for n in w.k.nodes())
    # the real group's device has its cdev (vfio0), the noiommu one (vfio1) has none
    assert names == ["iommu", "vfio/5", "vfio/devices/vfio0", "vfio/noiommu-0", "vfio/vfio"]
    assert w.k.topology.find("0000:00:03.0").iommu_group == 0  # type: ignore[union-attr]


def test_group_open_needs_cap_sys_rawio() -> None:
    w = world()
    w.drop_caps()
    assert w.open("vfio/noiommu-0") == -errno.EPERM
    w.proc.caps = frozenset({RAWIO})
    g = opened(w, "vfio/noiommu-0")
    assert w.open("vfio/noiommu-0") == -errno.EBUSY
    g.release()
    assert w.k.check_invariants() == []


def test_group_status_viable_without_owner() -> None:
    w = world()
    g = opened(w, "vfio/noiommu-0")
    lay = S.VFIO_GROUP_STATUS
    arg = w.proc.alloc(lay.pack(argsz=8))
    assert w.call(g, I.VFIO_GROUP_GET_STATUS, arg) == 0
    assert lay.unpack(w.proc.peek(arg, 8))["flags"] == C.VFIO_GROUP_FLAGS_VIABLE
    c = opened(w, "vfio/vfio")
    assert w.call(g, I.VFIO_GROUP_SET_CONTAINER, w.int_arg(w.fd(c))) == 0
    assert w.call(g, I.VFIO_GROUP_GET_STATUS, arg) == 0
    assert lay.unpack(w.proc.peek(arg, 8))["flags"] == C.VFIO_GROUP_FLAGS_VIABLE | C.VFIO_GROUP_FLAGS_CONTAINER_SET
    # no DMA ownership is claimed for a noiommu group
    assert w.k.iommu_groups[0].owner_cnt == 0


# --------------------------------------------------------------------------
# Container and the noiommu driver
# --------------------------------------------------------------------------


@pytest.mark.parametrize(("ext", "want"), [
    (C.VFIO_NOIOMMU_IOMMU, 1), (C.VFIO_TYPE1_IOMMU, 1), (C.VFIO_TYPE1v2_IOMMU, 1), (1234, 0),
])
def test_check_extension_empty_container(ext: int, want: int) -> None:
    w = world()
    c = opened(w, "vfio/vfio")
    assert w.call(c, I.VFIO_CHECK_EXTENSION, ext) == want


def test_check_extension_noiommu_needs_the_module_parameter() -> None:
    t = load_tree(FIXTURE)
    w = World(Kernel(t.topology, noiommu=False))
    c = opened(w, "vfio/vfio")
    assert w.call(c, I.VFIO_CHECK_EXTENSION, C.VFIO_NOIOMMU_IOMMU) == 0
    assert w.call(c, I.VFIO_CHECK_EXTENSION, C.VFIO_TYPE1v2_IOMMU) == 1


@pytest.mark.parametrize("set_iommu", [False, True])
def test_check_extension_noiommu_container(set_iommu: bool) -> None:
    w = world()
    c, _ = container_with_group(w, set_iommu)
    assert w.call(c, I.VFIO_CHECK_EXTENSION, C.VFIO_NOIOMMU_IOMMU) == 1
    for ext in (C.VFIO_TYPE1_IOMMU, C.VFIO_TYPE1v2_IOMMU, C.VFIO_UNMAP_ALL, C.VFIO_DMA_CC_IOMMU):
        assert w.call(c, I.VFIO_CHECK_EXTENSION, ext) == 0


def test_set_iommu_type1_on_noiommu_container_is_enodev() -> None:
    w = world()
    c, _ = container_with_group(w, set_iommu=False)
    assert w.call(c, I.VFIO_SET_IOMMU, C.VFIO_TYPE1v2_IOMMU) == -errno.ENODEV
    assert w.call(c, I.VFIO_SET_IOMMU, C.VFIO_TYPE1_IOMMU) == -errno.ENODEV
    assert w.call(c, I.VFIO_SET_IOMMU, C.VFIO_NOIOMMU_IOMMU) == 0
    assert w.call(c, I.VFIO_SET_IOMMU, C.VFIO_NOIOMMU_IOMMU) == -errno.EINVAL  # already set


def test_set_iommu_noiommu_needs_cap_sys_rawio() -> None:
    w = world()
    c, _ = container_with_group(w, set_iommu=False)
    w.drop_caps()
    assert w.call(c, I.VFIO_SET_IOMMU, C.VFIO_NOIOMMU_IOMMU) == -errno.EPERM


def test_set_iommu_noiommu_without_groups_is_einval() -> None:
    w = world()
    c = opened(w, "vfio/vfio")
    assert w.call(c, I.VFIO_SET_IOMMU, C.VFIO_NOIOMMU_IOMMU) == -errno.EINVAL


def test_noiommu_container_refuses_dma_ioctls() -> None:
    w = world()
    c, _ = container_with_group(w, set_iommu=False)
    m = w.proc.alloc(S.VFIO_IOMMU_TYPE1_DMA_MAP.pack(argsz=32, flags=3, vaddr=w.proc.alloc(4096), iova=0, size=4096))
    assert w.call(c, I.VFIO_IOMMU_MAP_DMA, m) == -errno.EINVAL  # no driver yet
    assert w.call(c, I.VFIO_SET_IOMMU, C.VFIO_NOIOMMU_IOMMU) == 0
    u = w.proc.alloc(S.VFIO_IOMMU_TYPE1_DMA_UNMAP.pack(argsz=24, flags=0, iova=0, size=4096))
    info = w.proc.alloc(S.VFIO_IOMMU_TYPE1_INFO.pack(argsz=S.VFIO_IOMMU_TYPE1_INFO.size))
    assert w.call(c, I.VFIO_IOMMU_MAP_DMA, m) == -errno.ENOTTY
    assert w.call(c, I.VFIO_IOMMU_UNMAP_DMA, u) == -errno.ENOTTY
    assert w.call(c, I.VFIO_IOMMU_GET_INFO, info) == -errno.ENOTTY


def test_set_container_needs_cap_sys_rawio() -> None:
    w = world()
    g = opened(w, "vfio/noiommu-0")
    c = opened(w, "vfio/vfio")
    w.drop_caps()
    assert w.call(g, I.VFIO_GROUP_SET_CONTAINER, w.int_arg(w.fd(c))) == -errno.EPERM


def test_real_and_noiommu_groups_do_not_mix(tmp_path: Path) -> None:
    w = mixed_world(tmp_path)
    real = opened(w, "vfio/5")
    fake = opened(w, "vfio/noiommu-0")
    c1 = opened(w, "vfio/vfio")
    assert w.call(real, I.VFIO_GROUP_SET_CONTAINER, w.int_arg(w.fd(c1))) == 0
    assert w.call(fake, I.VFIO_GROUP_SET_CONTAINER, w.int_arg(w.fd(c1))) == -errno.EPERM
    assert w.call(c1, I.VFIO_CHECK_EXTENSION, C.VFIO_NOIOMMU_IOMMU) == 0
    assert w.call(c1, I.VFIO_SET_IOMMU, C.VFIO_NOIOMMU_IOMMU) == -errno.ENODEV
    c2 = opened(w, "vfio/vfio")
    assert w.call(fake, I.VFIO_GROUP_SET_CONTAINER, w.int_arg(w.fd(c2))) == 0
    assert w.call(real, I.VFIO_GROUP_UNSET_CONTAINER, 0) == 0
    assert w.call(real, I.VFIO_GROUP_SET_CONTAINER, w.int_arg(w.fd(c2))) == -errno.EPERM


def test_unset_container_resets_the_container_kind() -> None:
    w = world()
    c, g = container_with_group(w)
    assert w.call(g, I.VFIO_GROUP_UNSET_CONTAINER, 0) == 0
    assert w.call(c, I.VFIO_CHECK_EXTENSION, C.VFIO_TYPE1v2_IOMMU) == 1
    assert w.call(c, I.VFIO_IOMMU_MAP_DMA, 0) == -errno.EINVAL  # the driver went with the last group


# --------------------------------------------------------------------------
# GET_DEVICE_FD
# --------------------------------------------------------------------------


def test_get_device_fd_through_the_noiommu_container() -> None:
    w = world()
    _, g = container_with_group(w)
    fd = get_device_fd(w, g)
    assert fd >= 0
    df = w.proc.fds[fd]
    assert device_info(w, df) == 0
    (dev,) = w.k.vfio_devices()
    assert dev.open_count == 1 and dev.iommufd_device is None
    assert w.k.iommu_groups[0].owner_cnt == 0
    assert w.call(g, I.VFIO_GROUP_UNSET_CONTAINER, 0) == -errno.EBUSY
    w.proc.close(fd)
    assert dev.open_count == 0 and w.k.check_invariants() == []


def test_get_device_fd_needs_a_driver_set() -> None:
    w = world()
    _, g = container_with_group(w, set_iommu=False)
    assert get_device_fd(w, g) == -errno.EINVAL


def test_get_device_fd_needs_cap_sys_rawio() -> None:
    w = world()
    _, g = container_with_group(w)
    w.drop_caps()
    assert get_device_fd(w, g) == -errno.EPERM


# --------------------------------------------------------------------------
# iommufd as the container
# --------------------------------------------------------------------------


def iommufd_group(w: World) -> tuple[File, File]:
    i = opened(w, "iommu")
    g = opened(w, "vfio/noiommu-0")
    assert w.call(g, I.VFIO_GROUP_SET_CONTAINER, w.int_arg(w.fd(i))) == 0
    return i, g


def test_iommufd_set_container_sets_no_iommu_mode() -> None:
    w = world()
    i, _ = iommufd_group(w)
    ctx = i.ctx  # type: ignore[attr-defined]
    assert ctx.no_iommu_mode and ctx.vfio_ioas is None
    assert w.call(i, I.VFIO_SET_IOMMU, C.VFIO_NOIOMMU_IOMMU) == 0
    assert w.call(i, I.VFIO_SET_IOMMU, C.VFIO_TYPE1v2_IOMMU) == -errno.EINVAL


def test_iommufd_set_container_with_a_compat_ioas_is_einval() -> None:
    w = world()
    i = opened(w, "iommu")
    iommufd_vfio_compat_ioas_create(i.ctx)  # type: ignore[attr-defined]
    g = opened(w, "vfio/noiommu-0")
    assert w.call(g, I.VFIO_GROUP_SET_CONTAINER, w.int_arg(w.fd(i))) == -errno.EINVAL


@pytest.mark.parametrize("version", ["6.17", "6.18"])
def test_iommufd_get_device_fd_opens_the_device(version: str) -> None:
    w = world(version)
    _, g = iommufd_group(w)
    fd = get_device_fd(w, g)
    assert fd >= 0
    assert device_info(w, w.proc.fds[fd]) == 0
    (dev,) = w.k.vfio_devices()
    assert dev.open_count == 1 and dev.iommufd_device is None and not dev.iommufd_attached
    w.proc.close(fd)
    assert dev.open_count == 0 and w.k.check_invariants() == []


@pytest.mark.parametrize("version", ["6.6", "6.16"])
def test_iommufd_get_device_fd_before_617_gives_an_unopened_fd(version: str) -> None:
    w = world(version)
    _, g = iommufd_group(w)
    fd = get_device_fd(w, g)
    assert fd >= 0
    (dev,) = w.k.vfio_devices()
    assert dev.open_count == 0
    assert device_info(w, w.proc.fds[fd]) == -errno.EINVAL
    w.proc.close(fd)
    assert dev.open_count == 0 and w.k.check_invariants() == []


@pytest.mark.parametrize("version", ["6.6", "6.18"])
def test_iommufd_get_device_fd_refusals(version: str) -> None:
    w = world(version)
    i, g = iommufd_group(w)
    w.drop_caps()
    assert get_device_fd(w, g) == -errno.EPERM
    w.proc.caps = frozenset({RAWIO})
    iommufd_vfio_compat_ioas_create(i.ctx)  # type: ignore[attr-defined]
    assert get_device_fd(w, g) == -errno.EPERM  # translation was asked for


# --------------------------------------------------------------------------
# Hot reset
# --------------------------------------------------------------------------


def hot_reset_info(w: World, df: Any) -> tuple[int, dict[str, int], list[dict[str, int]]]:
    lay, ent = S.VFIO_PCI_HOT_RESET_INFO, S.VFIO_PCI_DEPENDENT_DEVICE
    size = lay.size + 4 * ent.size
    arg = w.proc.alloc(lay.pack(argsz=size) + bytes(size - lay.size))
    rc = w.call(df, I.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, arg)
    hdr = lay.unpack(w.proc.peek(arg, lay.size))
    raw = w.proc.peek(arg + lay.size, 4 * ent.size)
    ents = [ent.unpack(raw[i * ent.size:(i + 1) * ent.size]) for i in range(min(hdr["count"], 4))]
    return rc, hdr, ents


def test_hot_reset_info_and_reset_with_the_noiommu_group_fd() -> None:
    w = world()
    _, g = container_with_group(w)
    df = w.proc.fds[get_device_fd(w, g)]
    rc, hdr, ents = hot_reset_info(w, df)
    assert rc == 0 and hdr["flags"] == 0 and hdr["count"] == 1
    assert ents[0] == {"devid": 0, "segment": 0, "bus": 3, "devfn": 0}  # group_id 0 (noiommu-0)
    lay = S.VFIO_PCI_HOT_RESET
    gfd = w.fd(g)
    arg = w.proc.alloc(lay.pack(argsz=lay.size + 4, count=1) + gfd.to_bytes(4, "little"))
    n = len(w.k.reset_log)
    assert w.call(df, I.VFIO_DEVICE_PCI_HOT_RESET, arg) == 0
    assert [(r.bdf, r.cause) for r in w.k.reset_log[n:]] == [(BDF, "VFIO_DEVICE_PCI_HOT_RESET")]
    # the group path cannot use the zero-length array
    arg0 = w.proc.alloc(lay.pack(argsz=lay.size, count=0))
    assert w.call(df, I.VFIO_DEVICE_PCI_HOT_RESET, arg0) == -errno.EINVAL


# --------------------------------------------------------------------------
# Unbind and rebind
# --------------------------------------------------------------------------


def test_unbind_removes_the_noiommu_group_and_rebind_makes_a_new_one() -> None:
    w = world()
    k = w.k
    assert k.unbind_store("vfio-pci", BDF.encode()) == len(BDF)
    assert [n.path for n in k.nodes()] == ["vfio/vfio", "iommu"]
    assert k.iommu_groups == {} and k.topology.find(BDF).iommu_group is None  # type: ignore[union-attr]
    assert k.check_invariants() == []
    assert k.driver_override_store(BDF, b"vfio-pci") == len("vfio-pci")
    assert k.bind_store("vfio-pci", BDF.encode()) == len(BDF)
    assert [n.path for n in k.nodes()] == ["vfio/vfio", "vfio/noiommu-0", "iommu"]
    assert k.iommu_groups[0].name == "vfio-noiommu" and k.check_invariants() == []


SIBLING = """
noiommu = true

[[function]]
bdf = "0000:00:1c.0"
kind = "root-port"
vendor = 0x8086
device = 0x9d10
secondary_bus = 0x04
driver = "pcieport"

[[function]]
bdf = "0000:04:00.0"
vendor = 0x8086
device = 0x10c9
class = 0x020000
driver = "vfio-pci"

[[function]]
bdf = "0000:04:00.1"
vendor = 0x8086
device = 0x10c9
class = 0x020000
driver = "igb"
"""


def test_hot_reset_info_with_a_groupless_host_driver_sibling_is_eperm(tmp_path: Path) -> None:
    p = tmp_path / "sib.toml"
    p.write_text(SIBLING)
    t = load_tree(p)
    w = World(t.make_kernel())
    assert w.k.topology.find("0000:04:00.1").iommu_group is None  # type: ignore[union-attr]
    c = opened(w, "vfio/vfio")
    g = opened(w, "vfio/noiommu-0")
    assert w.call(g, I.VFIO_GROUP_SET_CONTAINER, w.int_arg(w.fd(c))) == 0
    assert w.call(c, I.VFIO_SET_IOMMU, C.VFIO_NOIOMMU_IOMMU) == 0
    fd = w.call(g, I.VFIO_GROUP_GET_DEVICE_FD, w.proc.alloc(b"0000:04:00.0\0"))
    assert fd >= 0
    rc, _, _ = hot_reset_info(w, w.proc.fds[fd])
    assert rc == -errno.EPERM  # vfio_pci_fill_devs: a function without a group cannot be reset


def test_group_status_with_an_iommufd_and_unset() -> None:
    w = world()
    _, g = iommufd_group(w)
    lay = S.VFIO_GROUP_STATUS
    arg = w.proc.alloc(lay.pack(argsz=8))
    assert w.call(g, I.VFIO_GROUP_GET_STATUS, arg) == 0
    assert lay.unpack(w.proc.peek(arg, 8))["flags"] == C.VFIO_GROUP_FLAGS_VIABLE | C.VFIO_GROUP_FLAGS_CONTAINER_SET
    assert w.call(g, I.VFIO_GROUP_UNSET_CONTAINER, 0) == 0
    assert w.call(g, I.VFIO_GROUP_UNSET_CONTAINER, 0) == -errno.EINVAL


def test_two_device_fds_and_closing_the_group_first() -> None:
    w = world()
    c, g = container_with_group(w)
    fd1, fd2 = get_device_fd(w, g), get_device_fd(w, g)
    assert fd1 >= 0 and fd2 >= 0
    (dev,) = w.k.vfio_devices()
    assert dev.open_count == 2 and dev.group.container_users == 2  # one use for the first open
    g.release()  # the device fds keep the group file
    assert w.k.check_invariants() == [] and dev.group.container is not None
    w.proc.close(fd1)
    w.proc.close(fd2)
    assert dev.open_count == 0 and dev.group.container is None and dev.group.opened_file is None
    assert w.k.check_invariants() == []
    assert w.call(c, I.VFIO_CHECK_EXTENSION, C.VFIO_TYPE1v2_IOMMU) == 1  # the container is empty again


def test_unplug_of_an_unused_noiommu_device() -> None:
    w = world()
    w.k.unplug_device(BDF)
    assert [n.path for n in w.k.nodes()] == ["vfio/vfio", "iommu"]
    assert w.k.iommu_groups == {} and w.k.vfio_devices() == []
    assert w.k.check_invariants() == []


def test_unplug_while_open_keeps_the_group_until_release() -> None:
    w = world()
    _, g = container_with_group(w)
    fd = get_device_fd(w, g)
    w.k.unplug_device(BDF)
    assert "vfio/noiommu-0" in [n.path for n in w.k.nodes()]
    w.proc.close(fd)
    g.release()
    w.k.unplug_tick()
    assert [n.path for n in w.k.nodes()] == ["vfio/vfio", "iommu"]
    assert w.k.iommu_groups == {} and w.k.check_invariants() == []
