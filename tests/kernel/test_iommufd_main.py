"""iommufd ioctl core, object table, DESTROY, OPTION, context lifetime."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from fakedev.kernel.errors import KernelError
from fakedev.kernel.iommufd import (
    iommufd_check_invariants,
    iommufd_ctx_from_file,
    iommufd_fops_open,
    iommufd_vfio_compat_ioas_create,
)
from fakedev.kernel.iommufd.main import IommufdFile
from fakedev.kernel.testing import FakeProcess
from fakedev.kernel.version import NEWEST, KernelVersion
from fakedev.uapi import consts as C
from fakedev.uapi import ioctls as I
from fakedev.uapi.ioctls import FileKind, by_name

V66 = KernelVersion.parse("6.6")
V67 = KernelVersion.parse("6.7")
RW = C.IOMMU_IOAS_MAP_READABLE | C.IOMMU_IOAS_MAP_WRITEABLE


class Env:
    """One process with /dev/iommu open."""

    def __init__(self, version: KernelVersion = V66, *, vfio_container: bool = False) -> None:
        self.proc = FakeProcess()
        self.task = self.proc.task()
        self.file = iommufd_fops_open(version, vfio_container=vfio_container)
        self.ctx = self.file.ctx

    def call(self, name: str, size: int | None = None, **kw: int) -> tuple[int, dict[str, int]]:
        """Issue ioctl ``name`` with a struct of ``kw``; (errno or 0, struct after)."""
        layout = by_name(name).layout
        assert layout is not None
        buf = layout.pack(size=layout.size if size is None else size, **kw)
        addr = self.proc.alloc(buf)
        try:
            self.file.ioctl(self.task, by_name(name).cmd, addr)
            err = 0
        except KernelError as e:
            err = e.errno
        return err, layout.unpack(self.proc.peek(addr, layout.size))

    def ok(self, name: str, **kw: int) -> dict[str, int]:
        err, out = self.call(name, **kw)
        assert err == 0, errno.errorcode.get(err, err)
        return out

    def ioas(self) -> int:
        return self.ok("IOMMU_IOAS_ALLOC")["out_ioas_id"]


def kerr(fn: Any, *args: Any) -> int:
    with pytest.raises(KernelError) as e:
        fn(*args)
    return e.value.errno


# -- dispatch ------------------------------------------------------------------------
def test_file_identity() -> None:
    env = Env()
    assert isinstance(env.file, IommufdFile)
    assert env.file.kind is FileKind.IOMMUFD and env.file.label == "iommu"


def test_vfio_numbers_go_to_compat_layer() -> None:
    env = Env()
    assert env.file.ioctl(env.task, I.VFIO_GET_API_VERSION, 0) == 0
    assert kerr(env.file.ioctl, env.task, I.VFIO_GROUP_GET_STATUS, 0) == errno.ENOTTY
    assert kerr(env.file.ioctl, env.task, I.VFIO_DEVICE_PCI_HOT_RESET, 0) == errno.EFAULT  # = MAP_DMA


@pytest.mark.parametrize(
    ("version", "cmd", "want"),
    [
        (V66, 0x3B8B, errno.ENOTTY),  # past the 6.6 table: compat, no memory read
        (V67, 0x3B8B, errno.EFAULT),  # in the 6.7 table: the size is read first
        (V66, 0x3BFF, errno.ENOTTY),
        (V66, I.IOMMU_IOAS_MAP_FILE, errno.ENOTTY),
        (V66, I.IOMMU_IOAS_CHANGE_PROCESS, errno.ENOTTY),
        (NEWEST, I.IOMMU_IOAS_ALLOC, errno.EFAULT),
    ],
)
def test_table_bounds_by_version(version: KernelVersion, cmd: int, want: int) -> None:
    env = Env(version)
    assert kerr(env.file.ioctl, env.task, cmd, 0) == want


@pytest.mark.parametrize("cmd", [I.IOMMU_DESTROY | (3 << 30) | (8 << 16), 0x1280, 0x3C80])
def test_cmd_mismatch_is_enotty(cmd: int) -> None:
    env = Env()
    addr = env.proc.alloc(by_name("IOMMU_DESTROY").layout.pack(size=8, id=1))  # type: ignore[union-attr]
    assert kerr(env.file.ioctl, env.task, cmd, addr) == errno.ENOTTY


@pytest.mark.parametrize(
    ("name", "min_size"),
    [
        ("IOMMU_DESTROY", 8), ("IOMMU_IOAS_ALLOC", 12), ("IOMMU_IOAS_ALLOW_IOVAS", 24),
        ("IOMMU_IOAS_COPY", 40), ("IOMMU_IOAS_IOVA_RANGES", 32), ("IOMMU_IOAS_MAP", 40),
        ("IOMMU_IOAS_UNMAP", 24), ("IOMMU_OPTION", 24), ("IOMMU_VFIO_IOAS", 12),
        ("IOMMU_HWPT_ALLOC", 24), ("IOMMU_GET_HW_INFO", 32),
    ],
)
def test_size_below_min_is_einval(name: str, min_size: int) -> None:
    env = Env()
    err, _ = env.call(name, size=min_size - 1)
    assert err == errno.EINVAL
    assert env.ctx.objects == {}


def test_e2big_for_nonzero_trailing_bytes_and_ok_for_zero() -> None:
    env = Env()
    addr = env.proc.alloc(b"\x14\x00\x00\x00" + bytes(8) + bytes(7) + b"\x01")  # size 20, byte 19 set
    assert kerr(env.file.ioctl, env.task, I.IOMMU_IOAS_ALLOC, addr) == errno.E2BIG
    assert env.ctx.objects == {}
    addr = env.proc.alloc(b"\x14\x00\x00\x00" + bytes(16))
    assert env.file.ioctl(env.task, I.IOMMU_IOAS_ALLOC, addr) == 0
    # only sizeof(struct) = 12 bytes are written back
    assert env.proc.peek(addr + 8, 12) == b"\x01\x00\x00\x00" + bytes(8)


def test_hwpt_alloc_6_6_has_24_byte_struct() -> None:
    env = Env(V66)
    err, _ = env.call("IOMMU_HWPT_ALLOC", size=40, dev_id=1, pt_id=1, data_type=1)
    assert err == errno.E2BIG  # data_type is past the 6.6 struct


def test_efault_when_struct_runs_into_unmapped_memory() -> None:
    env = Env()
    # the size word says 12 but only 8 bytes are mapped
    addr = env.proc.alloc_at_end(b"\x0c\x00\x00\x00" + bytes(4))
    assert kerr(env.file.ioctl, env.task, I.IOMMU_IOAS_ALLOC, addr) == errno.EFAULT
    # trailing bytes beyond ksize are checked for zero: unmapped -> EFAULT
    addr = env.proc.alloc_at_end(b"\x00\x10\x00\x00" + bytes(12))  # size 4096
    assert kerr(env.file.ioctl, env.task, I.IOMMU_IOAS_ALLOC, addr) == errno.EFAULT
    # size word itself unmapped
    addr = env.proc.alloc_at_end(b"\x0c\x00")
    assert kerr(env.file.ioctl, env.task, I.IOMMU_IOAS_ALLOC, addr) == errno.EFAULT
    assert env.ctx.objects == {}


def test_respond_fault_aborts_ioas_alloc() -> None:
    class ReadOnlyTask:
        def __init__(self, inner: Any) -> None:
            self.inner = inner
            self.pid = inner.pid

        def read(self, addr: int, size: int) -> bytes:
            return bytes(self.inner.read(addr, size))

        def write(self, addr: int, data: bytes) -> None:
            raise KernelError(errno.EFAULT)

    env = Env()
    addr = env.proc.alloc(by_name("IOMMU_IOAS_ALLOC").layout.pack(size=12))  # type: ignore[union-attr]
    assert kerr(env.file.ioctl, ReadOnlyTask(env.task), I.IOMMU_IOAS_ALLOC, addr) == errno.EFAULT
    assert env.ctx.objects == {}


# -- IDs and DESTROY -----------------------------------------------------------------
def test_ids_lowest_free_first_and_reused() -> None:
    env = Env()
    assert [env.ioas() for _ in range(4)] == [1, 2, 3, 4]
    env.ok("IOMMU_DESTROY", id=2)
    env.ok("IOMMU_DESTROY", id=1)
    assert env.ioas() == 1
    assert env.ioas() == 2
    assert env.ioas() == 5
    assert iommufd_check_invariants(env.ctx) == []


def test_ioas_alloc_flags_eopnotsupp() -> None:
    env = Env()
    err, out = env.call("IOMMU_IOAS_ALLOC", flags=1)
    assert err == errno.EOPNOTSUPP and out["out_ioas_id"] == 0 and not env.ctx.objects


@pytest.mark.parametrize("obj_id", [0, 1, 2, 0x7FFFFFFF, 0xFFFFFFFF])
def test_destroy_unknown_is_enoent(obj_id: int) -> None:
    env = Env()
    env.ioas()
    env.ok("IOMMU_DESTROY", id=1)
    assert env.call("IOMMU_DESTROY", id=obj_id)[0] == errno.ENOENT


def test_destroy_compat_ioas_clears_it() -> None:
    env = Env()
    iommufd_vfio_compat_ioas_create(env.ctx)
    assert env.ok("IOMMU_VFIO_IOAS", op=C.IOMMU_VFIO_IOAS_GET)["ioas_id"] == 1
    env.ok("IOMMU_DESTROY", id=1)
    assert env.call("IOMMU_VFIO_IOAS", op=C.IOMMU_VFIO_IOAS_GET)[0] == errno.ENODEV


def test_destroy_ioas_drops_its_mappings() -> None:
    env = Env()
    ioas = env.ioas()
    buf = env.proc.alloc(8192)
    env.ok("IOMMU_IOAS_MAP", flags=RW, ioas_id=ioas, user_va=buf, length=8192)
    env.ok("IOMMU_DESTROY", id=ioas)
    assert env.ctx.objects == {}


# -- OPTION --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "want"),
    [
        ({"option_id": 0, "op": 1, "__reserved": 1}, errno.EOPNOTSUPP),
        ({"option_id": 0, "op": 1, "object_id": 1}, errno.EOPNOTSUPP),
        ({"option_id": 0, "op": 2}, errno.EOPNOTSUPP),
        ({"option_id": 9, "op": 1}, errno.EOPNOTSUPP),
        ({"option_id": 0, "op": 0, "val64": 2}, errno.EINVAL),
        ({"option_id": 1, "op": 1, "object_id": 7}, errno.ENOENT),
    ],
)
def test_option_errors(kw: dict[str, int], want: int) -> None:
    env = Env()
    assert env.call("IOMMU_OPTION", **kw)[0] == want


def test_option_rlimit_mode() -> None:
    env = Env()
    assert env.ok("IOMMU_OPTION", option_id=0, op=1, val64=77)["val64"] == 0
    assert Env(vfio_container=True).ok("IOMMU_OPTION", option_id=0, op=1)["val64"] == 1
    env.ok("IOMMU_OPTION", option_id=0, op=0, val64=1)
    assert env.ok("IOMMU_OPTION", option_id=0, op=1)["val64"] == 1
    env.ioas()
    assert env.call("IOMMU_OPTION", option_id=0, op=0, val64=0)[0] == errno.EBUSY
    noncap = Env()
    noncap.proc.caps = frozenset()
    assert noncap.call("IOMMU_OPTION", option_id=0, op=0, val64=1)[0] == errno.EPERM


def test_option_huge_pages_sets_alignment() -> None:
    env = Env()
    ioas = env.ioas()
    assert env.ok("IOMMU_OPTION", option_id=1, op=1, object_id=ioas)["val64"] == 1
    assert env.call("IOMMU_OPTION", option_id=1, op=0, object_id=ioas, val64=2)[0] == errno.EINVAL
    env.ok("IOMMU_OPTION", option_id=1, op=0, object_id=ioas, val64=0)
    assert env.ok("IOMMU_OPTION", option_id=1, op=1, object_id=ioas)["val64"] == 0
    assert env.call("IOMMU_IOAS_IOVA_RANGES", ioas_id=ioas, num_iovas=0)[1]["out_iova_alignment"] == 4096
    env.ok("IOMMU_OPTION", option_id=1, op=0, object_id=ioas, val64=1)
    assert env.call("IOMMU_IOAS_IOVA_RANGES", ioas_id=ioas, num_iovas=0)[1]["out_iova_alignment"] == 1


def test_disable_huge_pages_refused_with_unaligned_mapping() -> None:
    env = Env()
    ioas = env.ioas()
    buf = env.proc.alloc(4096)
    env.ok("IOMMU_IOAS_MAP", flags=RW | C.IOMMU_IOAS_MAP_FIXED_IOVA, ioas_id=ioas, user_va=buf,
           length=100, iova=0x10000)
    assert env.call("IOMMU_OPTION", option_id=1, op=0, object_id=ioas, val64=0)[0] == errno.EADDRINUSE
    assert env.ok("IOMMU_OPTION", option_id=1, op=1, object_id=ioas)["val64"] == 1


# -- version-gated ops ---------------------------------------------------------------
def test_change_process() -> None:
    env = Env(NEWEST)
    assert env.call("IOMMU_IOAS_CHANGE_PROCESS", __reserved=1)[0] == errno.EOPNOTSUPP
    assert env.call("IOMMU_IOAS_CHANGE_PROCESS")[0] == 0


# -- lifetime ------------------------------------------------------------------------
def test_release_destroys_everything() -> None:
    env = Env()
    env.ioas()
    env.ioas()
    env.file.release()
    assert env.ctx.dead and env.ctx.objects == {}
    assert kerr(iommufd_ctx_from_file, env.file) == errno.EBADFD


def test_ctx_from_file_takes_a_reference() -> None:
    env = Env()
    ctx = iommufd_ctx_from_file(env.file)
    assert ctx is env.ctx and ctx.refs == 2
    env.ioas()
    env.file.release()
    assert not ctx.dead and 1 in ctx.objects
    ctx.put()
    assert ctx.dead and not ctx.objects


@pytest.mark.parametrize("other", [object(), None, "iommu"])
def test_ctx_from_file_rejects_other_files(other: object) -> None:
    assert kerr(iommufd_ctx_from_file, other) == errno.EBADFD


def test_invariants_catch_bad_users() -> None:
    env = Env()
    env.ioas()
    assert iommufd_check_invariants(env.ctx) == []
    env.ctx.objects[1].users = 3
    assert any("users" in s for s in iommufd_check_invariants(env.ctx))
