"""VFIO container calls on /dev/iommu, IOMMU_VFIO_IOAS and the compat IOAS."""

from __future__ import annotations

import errno

import pytest
from test_iommufd_device import Machine
from test_iommufd_main import Env, kerr

from fakedev.kernel.errors import KernelError
from fakedev.kernel.iommufd import (
    iommufd_device_attach,
    iommufd_translate,
    iommufd_vfio_compat_ioas_create,
    iommufd_vfio_compat_ioas_get_id,
    iommufd_vfio_compat_set_no_iommu,
)
from fakedev.uapi import consts as C
from fakedev.uapi import ioctls as I
from fakedev.uapi import structs as S

MAP = S.VFIO_IOMMU_TYPE1_DMA_MAP
UNMAP = S.VFIO_IOMMU_TYPE1_DMA_UNMAP
INFO = S.VFIO_IOMMU_TYPE1_INFO
RWF = C.VFIO_DMA_MAP_FLAG_READ | C.VFIO_DMA_MAP_FLAG_WRITE


def compat_env() -> Env:
    env = Env()
    iommufd_vfio_compat_ioas_create(env.ctx)
    return env


def vcall(env: Env, cmd: int, arg: int) -> int:
    try:
        return env.file.ioctl(env.task, cmd, arg)
    except KernelError as e:
        return -e.errno


def map_dma(env: Env, iova: int, size: int, flags: int = RWF, argsz: int = 32) -> int:
    vaddr = env.proc.alloc(size)
    return vcall(env, I.VFIO_IOMMU_MAP_DMA, env.proc.alloc(MAP.pack(argsz=argsz, flags=flags, vaddr=vaddr,
                                                                     iova=iova, size=size)))


def unmap_dma(env: Env, iova: int, size: int, flags: int = 0, argsz: int = 24) -> tuple[int, int]:
    addr = env.proc.alloc(UNMAP.pack(argsz=argsz, flags=flags, iova=iova, size=size))
    rc = vcall(env, I.VFIO_IOMMU_UNMAP_DMA, addr)
    return rc, UNMAP.unpack(env.proc.peek(addr, 24))["size"]


@pytest.mark.parametrize(
    ("ext", "want"),
    [
        (C.VFIO_TYPE1_IOMMU, 1), (C.VFIO_TYPE1v2_IOMMU, 1), (C.VFIO_UNMAP_ALL, 1),
        (C.VFIO_TYPE1_NESTING_IOMMU, 0), (C.VFIO_UPDATE_VADDR, 0), (C.VFIO_NOIOMMU_IOMMU, 1),
        (C.VFIO_SPAPR_TCE_IOMMU, 0), (1234, 0),
    ],
)
def test_check_extension(ext: int, want: int) -> None:
    assert vcall(Env(), I.VFIO_CHECK_EXTENSION, ext) == want


def test_dma_cc_needs_compat_ioas() -> None:
    assert vcall(Env(), I.VFIO_CHECK_EXTENSION, C.VFIO_DMA_CC_IOMMU) == -errno.ENODEV
    assert vcall(compat_env(), I.VFIO_CHECK_EXTENSION, C.VFIO_DMA_CC_IOMMU) == 1


def test_set_iommu() -> None:
    assert vcall(Env(), I.VFIO_SET_IOMMU, C.VFIO_TYPE1v2_IOMMU) == -errno.ENODEV
    env = compat_env()
    assert vcall(env, I.VFIO_SET_IOMMU, C.VFIO_SPAPR_TCE_IOMMU) == -errno.EINVAL
    assert vcall(env, I.VFIO_SET_IOMMU, C.VFIO_TYPE1v2_IOMMU) == 0
    assert env.ctx.get_ioas(1).iopt.iova_alignment == 1
    assert vcall(env, I.VFIO_SET_IOMMU, C.VFIO_TYPE1_IOMMU) == 0
    assert env.ctx.get_ioas(1).iopt.disable_large_pages
    assert env.ctx.get_ioas(1).iopt.iova_alignment == 4096


def test_other_container_calls_are_enotty() -> None:
    env = compat_env()
    for cmd in (0x3B75, 0x3B73, 0x3B74):  # DIRTY_PAGES, ENABLE, DISABLE
        assert vcall(env, cmd, 0) == -errno.ENOTTY


def test_map_dma() -> None:
    assert map_dma(Env(), 0x10000, 0x1000) == -errno.ENODEV
    env = compat_env()
    assert map_dma(env, 0x10000, 0x1000, flags=RWF | C.VFIO_DMA_MAP_FLAG_VADDR) == -errno.EINVAL
    assert map_dma(env, 0x10000, 0x1000, argsz=31) == -errno.EINVAL
    assert vcall(env, I.VFIO_IOMMU_MAP_DMA, env.proc.alloc_at_end(bytes(16))) == -errno.EFAULT
    assert map_dma(env, 0x10000, 0) == -errno.EINVAL
    assert map_dma(env, 0x10000, 0x2000) == 0
    assert map_dma(env, 0x11000, 0x1000) == -errno.EEXIST
    piece = iommufd_translate(env.ctx, 1, 0x10000, 0x2000)[0]
    assert piece.pid == env.proc.pid and piece.length == 0x2000


def test_unmap_dma() -> None:
    env = compat_env()
    assert map_dma(env, 0x10000, 0x2000) == 0
    assert map_dma(env, 0x20000, 0x1000) == 0
    assert unmap_dma(env, 0, 0, flags=4)[0] == -errno.EINVAL
    assert unmap_dma(env, 0, 0, argsz=23)[0] == -errno.EINVAL
    assert unmap_dma(env, 0x10000, 0, flags=C.VFIO_DMA_UNMAP_FLAG_ALL)[0] == -errno.EINVAL
    assert unmap_dma(env, 0x10000, 0x1000) == (-errno.ENOENT, 0x1000)  # v2: no cutting, size untouched
    assert unmap_dma(env, 0x20000, 0x1000) == (0, 0x1000)
    assert unmap_dma(env, 0, 0, flags=C.VFIO_DMA_UNMAP_FLAG_ALL) == (0, 0x2000)
    assert unmap_dma(env, 0, 0, flags=C.VFIO_DMA_UNMAP_FLAG_ALL) == (0, 0)


def test_type1_v1_unmap_cuts_areas() -> None:
    env = compat_env()
    assert vcall(env, I.VFIO_SET_IOMMU, C.VFIO_TYPE1_IOMMU) == 0
    assert map_dma(env, 0x10000, 0x4000) == 0
    assert unmap_dma(env, 0x11000, 0x1000) == (0, 0x1000)
    iopt = env.ctx.get_ioas(1).iopt
    assert [(a.iova, a.length) for a in iopt.areas] == [(0x10000, 0x1000), (0x12000, 0x2000)]
    assert iommufd_translate(env.ctx, 1, 0x12000, 1)[0].addr == iopt.areas[0].pages.uptr + 0x2000


def read_info(env: Env, argsz: int) -> tuple[int, dict[str, int], bytes]:
    addr = env.proc.alloc(max(argsz, 24) + 64)
    env.proc.poke(addr, INFO.pack(argsz=argsz))
    rc = vcall(env, I.VFIO_IOMMU_GET_INFO, addr)
    return rc, INFO.unpack(env.proc.peek(addr, 24)), env.proc.peek(addr, max(argsz, 24) + 64)


def test_get_info_errors() -> None:
    assert read_info(Env(), 24)[0] == -errno.ENODEV
    assert read_info(compat_env(), 15)[0] == -errno.EINVAL
    assert vcall(compat_env(), I.VFIO_IOMMU_GET_INFO, compat_env().proc.alloc_at_end(bytes(8))) == -errno.EFAULT


def test_get_info_small_buffer_reports_size() -> None:
    env = compat_env()
    rc, info, _ = read_info(env, 24)
    assert rc == 0
    assert info["flags"] == C.VFIO_IOMMU_INFO_PGSIZES | C.VFIO_IOMMU_INFO_CAPS
    assert info["argsz"] == 24 + 16 + 32 and info["cap_offset"] == 0
    assert info["iova_pgsizes"] == 0xFFFFFFFFFFFFF000


def test_get_info_caps_after_attach() -> None:
    m = Machine()
    iommufd_vfio_compat_ioas_create(m.ctx)
    iommufd_device_attach(m.bind(2), iommufd_vfio_compat_ioas_get_id(m.ctx))
    rc, info, raw = read_info(m, 256)
    assert rc == 0 and info["argsz"] == 24 + 16 + 48 and info["cap_offset"] == 24
    assert info["iova_pgsizes"] == 0x40201000
    avail = S.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL.unpack(raw[24:36])
    assert avail == {"id": C.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, "version": 1, "next": 40, "avail": 0xFFFFFFFF}
    cap = S.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE.unpack(raw[40:56])
    assert cap["id"] == C.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE and cap["version"] == 1
    assert cap["nr_iovas"] == 2 and cap["next"] == 0
    r = [S.VFIO_IOVA_RANGE.unpack(raw[56 + 16 * i: 72 + 16 * i]) for i in range(2)]
    assert [(x["start"], x["end"]) for x in r] == [(0, 0xFEDFFFFF), (0xFEF00000, (1 << 48) - 1)]


def test_get_info_partial_buffer_gets_first_cap_only() -> None:
    env = compat_env()
    rc, info, raw = read_info(env, 40)
    assert rc == 0 and info["argsz"] == 24 + 16 + 32 and info["cap_offset"] == 0
    assert S.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL.unpack(raw[24:36])["next"] == 40
    assert raw[40:72] == bytes(32)  # the IOVA cap did not fit


def test_noiommu_set_iommu() -> None:
    env = Env()
    assert vcall(env, I.VFIO_SET_IOMMU, C.VFIO_NOIOMMU_IOMMU) == -errno.EINVAL
    iommufd_vfio_compat_set_no_iommu(env.ctx)
    assert vcall(env, I.VFIO_SET_IOMMU, C.VFIO_TYPE1v2_IOMMU) == -errno.EINVAL
    assert vcall(env, I.VFIO_SET_IOMMU, C.VFIO_NOIOMMU_IOMMU) == 0
    env.proc.caps = frozenset()
    assert vcall(env, I.VFIO_SET_IOMMU, C.VFIO_NOIOMMU_IOMMU) == -errno.EPERM


def test_vfio_ioas_ops() -> None:
    env = Env()
    assert env.call("IOMMU_VFIO_IOAS", op=0, __reserved=1)[0] == errno.EOPNOTSUPP
    assert env.call("IOMMU_VFIO_IOAS", op=C.IOMMU_VFIO_IOAS_GET)[0] == errno.ENODEV
    assert env.call("IOMMU_VFIO_IOAS", op=C.IOMMU_VFIO_IOAS_SET, ioas_id=3)[0] == errno.ENOENT
    assert env.call("IOMMU_VFIO_IOAS", op=7)[0] == errno.EOPNOTSUPP
    ioas = env.ioas()
    assert env.call("IOMMU_VFIO_IOAS", op=C.IOMMU_VFIO_IOAS_SET, ioas_id=ioas)[0] == 0
    assert env.ok("IOMMU_VFIO_IOAS", op=C.IOMMU_VFIO_IOAS_GET)["ioas_id"] == ioas
    assert iommufd_vfio_compat_ioas_get_id(env.ctx) == ioas
    assert env.call("IOMMU_VFIO_IOAS", op=C.IOMMU_VFIO_IOAS_CLEAR)[0] == 0
    assert env.call("IOMMU_VFIO_IOAS", op=C.IOMMU_VFIO_IOAS_CLEAR)[0] == 0
    assert env.call("IOMMU_VFIO_IOAS", op=C.IOMMU_VFIO_IOAS_GET)[0] == errno.ENODEV
    assert ioas in env.ctx.objects


def test_compat_ioas_create_get_and_no_iommu() -> None:
    env = Env()
    assert kerr(iommufd_vfio_compat_ioas_get_id, env.ctx) == errno.ENODEV
    iommufd_vfio_compat_set_no_iommu(env.ctx)
    assert env.ctx.no_iommu_mode
    iommufd_vfio_compat_ioas_create(env.ctx)
    iommufd_vfio_compat_ioas_create(env.ctx)
    assert iommufd_vfio_compat_ioas_get_id(env.ctx) == 1 and list(env.ctx.objects) == [1]
    assert kerr(iommufd_vfio_compat_set_no_iommu, env.ctx) == errno.EINVAL
