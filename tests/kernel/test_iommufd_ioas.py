"""IOAS ioctls and the io_pagetable interval bookkeeping."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_iommufd_main import RW, V66, Env, kerr

from fakedev.kernel.iommufd import iommufd_check_invariants, iommufd_translate
from fakedev.kernel.iommufd.io_pagetable import IoPagetable, Pages
from fakedev.kernel.version import NEWEST
from fakedev.uapi import consts as C
from fakedev.uapi import structs as S

FIXED = C.IOMMU_IOAS_MAP_FIXED_IOVA
R = C.IOMMU_IOAS_MAP_READABLE
U64 = (1 << 64) - 1
MSI = (0xFEE00000, 0xFEEFFFFF)


def ranges(env: Env, ioas: int, cap: int) -> tuple[int, dict[str, int], list[tuple[int, int]]]:
    addr = env.proc.alloc(max(16, cap * 16))
    err, out = env.call("IOMMU_IOAS_IOVA_RANGES", ioas_id=ioas, num_iovas=cap, allowed_iovas=addr)
    got = [S.IOMMU_IOVA_RANGE.unpack(env.proc.peek(addr + 16 * i, 16)) for i in range(cap)]
    return err, out, [(r["start"], r["last"]) for r in got]


def allow(env: Env, ioas: int, rs: list[tuple[int, int]]) -> int:
    data = b"".join(S.IOMMU_IOVA_RANGE.pack(start=s, last=la) for s, la in rs)
    addr = env.proc.alloc(data or 16)
    return env.call("IOMMU_IOAS_ALLOW_IOVAS", ioas_id=ioas, num_iovas=len(rs), allowed_iovas=addr)[0]


def mapf(env: Env, ioas: int, length: int, iova: int | None = None, flags: int = RW,
         user_va: int | None = None) -> tuple[int, int]:
    if user_va is None:
        user_va = env.proc.alloc(max(length, 1))
    if iova is not None:
        flags |= FIXED
    err, out = env.call("IOMMU_IOAS_MAP", flags=flags, ioas_id=ioas, user_va=user_va, length=length,
                        iova=iova or 0)
    return err, out["iova"]


def unmap(env: Env, ioas: int, iova: int, length: int) -> tuple[int, int]:
    err, out = env.call("IOMMU_IOAS_UNMAP", ioas_id=ioas, iova=iova, length=length)
    return err, out["length"]


def areas(env: Env, ioas: int) -> list[tuple[int, int]]:
    return [(a.iova, a.length) for a in env.ctx.get_ioas(ioas).iopt.areas]


# -- IOVA_RANGES ------------------------------------------------------------------------
def test_fresh_ioas_has_one_full_range() -> None:
    env = Env()
    ioas = env.ioas()
    err, out, got = ranges(env, ioas, 4)
    assert err == 0 and out["num_iovas"] == 1 and got[0] == (0, U64)
    assert out["out_iova_alignment"] == 1


def test_iova_ranges_errors() -> None:
    env = Env()
    ioas = env.ioas()
    assert env.call("IOMMU_IOAS_IOVA_RANGES", ioas_id=ioas, __reserved=1)[0] == errno.EOPNOTSUPP
    assert env.call("IOMMU_IOAS_IOVA_RANGES", ioas_id=ioas + 1)[0] == errno.ENOENT
    bad = env.proc.alloc_at_end(bytes(8))
    assert env.call("IOMMU_IOAS_IOVA_RANGES", ioas_id=ioas, num_iovas=1, allowed_iovas=bad)[0] == errno.EFAULT


@pytest.mark.parametrize(("cap", "err", "written"), [(0, errno.EMSGSIZE, 0), (1, errno.EMSGSIZE, 1),
                                                     (2, 0, 2), (5, 0, 2)])
def test_iova_ranges_emsgsize_protocol(cap: int, err: int, written: int) -> None:
    env = Env()
    ioas = env.ioas()
    env.ctx.get_ioas(ioas).iopt.reserve(MSI[0], MSI[1], owner="msi")
    got_err, out, got = ranges(env, ioas, cap)
    assert got_err == err
    assert out["num_iovas"] == 2  # the total, also on EMSGSIZE
    want = [(0, MSI[0] - 1), (MSI[1] + 1, U64)]
    assert got[:written] == want[:written]
    assert all(r == (0, 0) for r in got[written:])


# -- ALLOW_IOVAS ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rs", "want"),
    [
        ([(0x1000, 0x1000)], errno.EINVAL),
        ([(0x2000, 0x1000)], errno.EINVAL),
        ([(0x1000, 0x5000), (0x5000, 0x9000)], errno.EINVAL),
        ([(0x1000, 0x5000), (0x0, 0x1000)], errno.EINVAL),
        ([(0xFED00000, 0xFEE00000)], errno.EADDRINUSE),
        ([(0x1000, 0x5fff), (0x6000, 0x9fff)], 0),
        ([], 0),
    ],
)
def test_allow_iovas(rs: list[tuple[int, int]], want: int) -> None:
    env = Env()
    ioas = env.ioas()
    env.ctx.get_ioas(ioas).iopt.reserve(MSI[0], MSI[1], owner="msi")
    assert allow(env, ioas, [(0x100000, 0x1FFFFF)]) == 0
    assert allow(env, ioas, rs) == want
    kept = env.ctx.get_ioas(ioas).iopt.allowed
    assert kept == (sorted(rs) if want == 0 else [(0x100000, 0x1FFFFF)])


def test_allow_iovas_header_errors() -> None:
    env = Env()
    ioas = env.ioas()
    assert env.call("IOMMU_IOAS_ALLOW_IOVAS", ioas_id=ioas, __reserved=1)[0] == errno.EOPNOTSUPP
    assert env.call("IOMMU_IOAS_ALLOW_IOVAS", ioas_id=9)[0] == errno.ENOENT
    bad = env.proc.alloc_at_end(S.IOMMU_IOVA_RANGE.pack(start=0x1000, last=0x1FFF))
    assert env.call("IOMMU_IOAS_ALLOW_IOVAS", ioas_id=ioas, num_iovas=2, allowed_iovas=bad)[0] == errno.EFAULT


def test_auto_iova_stays_in_allowed_ranges() -> None:
    env = Env()
    ioas = env.ioas()
    assert allow(env, ioas, [(0x40000000, 0x40003FFF)]) == 0
    assert mapf(env, ioas, 0x2000) == (0, 0x40000000)
    assert mapf(env, ioas, 0x2000) == (0, 0x40002000)
    assert mapf(env, ioas, 0x1000)[0] == errno.ENOSPC
    # fixed IOVAs ignore the allowed list
    assert mapf(env, ioas, 0x1000, iova=0x9000)[0] == 0


# -- MAP ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "want"),
    [
        ({"flags": RW | 8}, errno.EOPNOTSUPP),
        ({"flags": RW, "__reserved": 1}, errno.EOPNOTSUPP),
        ({"flags": RW, "iova": U64}, errno.EOVERFLOW),
        ({"flags": RW, "length": U64}, errno.EOVERFLOW),
        ({"flags": FIXED}, errno.EINVAL),
        ({"flags": RW, "ioas_id": 99}, errno.ENOENT),
        ({"flags": RW, "length": 0}, errno.EINVAL),
        ({"flags": RW | FIXED, "iova": U64 - 0xFFF, "length": 0x2000}, errno.EOVERFLOW),
        ({"flags": RW | FIXED, "iova": 0xFEE01000}, errno.EINVAL),  # reserved
        ({"flags": RW | FIXED, "iova": 0x10000}, errno.EEXIST),
        ({"flags": RW | FIXED, "iova": 0x10800, "length": 0x100}, errno.EEXIST),
        ({"flags": RW | FIXED, "iova": 0xF000, "length": 0x1001}, errno.EEXIST),
        ({"flags": RW, "length": U64 // 2}, errno.EOVERFLOW),
        ({"flags": RW, "user_va": U64 - 0xFFF, "length": 0x2000}, errno.EOVERFLOW),
    ],
)
def test_map_errors_change_nothing(kw: dict[str, int], want: int) -> None:
    env = Env()
    ioas = env.ioas()
    env.ctx.get_ioas(ioas).iopt.reserve(MSI[0], MSI[1], owner="msi")
    assert mapf(env, ioas, 0x1000, iova=0x10000)[0] == 0
    args = {"ioas_id": ioas, "user_va": 0x100000, "length": 0x1000} | kw
    assert env.call("IOMMU_IOAS_MAP", **args)[0] == want
    assert areas(env, ioas) == [(0x10000, 0x1000)]


def test_map_alignment_after_large_pages_disabled() -> None:
    env = Env()
    ioas = env.ioas()
    env.ok("IOMMU_OPTION", option_id=1, op=0, object_id=ioas, val64=0)
    assert mapf(env, ioas, 0x1000, iova=0x10800)[0] == errno.EINVAL  # iova unaligned
    assert mapf(env, ioas, 0x800, iova=0x10000)[0] == errno.EINVAL  # length unaligned
    assert mapf(env, ioas, 0x800)[0] == errno.EINVAL
    assert mapf(env, ioas, 0x1000, user_va=0x10800)[0] == errno.EINVAL  # user_va less aligned
    assert mapf(env, ioas, 0x1000, iova=0x10000)[0] == 0


def test_auto_iova_rules() -> None:
    env = Env()
    ioas = env.ioas()
    # never IOVA 0; lowest hole first; adjacent areas
    assert mapf(env, ioas, 0x1000, user_va=0x7000) == (0, 0x1000)
    assert mapf(env, ioas, 0x1000, user_va=0x7000) == (0, 0x2000)
    # alignment min(roundup_pow2(len), alignment of user_va)
    assert mapf(env, ioas, 0x4000, user_va=0x100000) == (0, 0x4000)
    assert mapf(env, ioas, 0x3000, user_va=0x200000) == (0, 0x8000)
    # a page offset in user_va is kept in the IOVA
    assert mapf(env, ioas, 0x10, user_va=0x5123) == (0, 0x3123)
    assert iommufd_check_invariants(env.ctx) == []


def test_auto_iova_enospc_when_full() -> None:
    env = Env()
    ioas = env.ioas()
    assert allow(env, ioas, [(0x1000, 0x2FFF)]) == 0
    assert mapf(env, ioas, 0x1000, iova=0x1000)[0] == 0
    assert mapf(env, ioas, 0x2000)[0] == errno.ENOSPC
    assert mapf(env, ioas, 0x1000) == (0, 0x2000)
    assert mapf(env, ioas, 0x1000)[0] == errno.ENOSPC


def test_adjacent_fixed_maps_and_top_of_space() -> None:
    env = Env()
    ioas = env.ioas()
    assert mapf(env, ioas, 0x1000, iova=0)[0] == 0
    assert mapf(env, ioas, 0x1000, iova=0x1000)[0] == 0
    assert mapf(env, ioas, 0x1000, iova=U64 - 0x1000)[0] == 0  # ends at ULONG_MAX - 1 + 1
    assert areas(env, ioas)[-1] == (U64 - 0x1000, 0x1000)


# -- UNMAP ---------------------------------------------------------------------------------
def setup_three(env: Env) -> int:
    ioas = env.ioas()
    for iova in (0x10000, 0x11000, 0x20000):
        assert mapf(env, ioas, 0x1000, iova=iova)[0] == 0
    return ioas


@pytest.mark.parametrize(
    ("iova", "length", "want", "unmapped", "left"),
    [
        (0x10000, 0x1000, 0, 0x1000, [0x11000, 0x20000]),
        (0x10000, 0x2000, 0, 0x2000, [0x20000]),
        (0x0, 0x100000, 0, 0x3000, []),
        (0x30000, 0x1000, errno.ENOENT, None, [0x10000, 0x11000, 0x20000]),
        (0x10000, 0x800, errno.ENOENT, None, [0x10000, 0x11000, 0x20000]),
        # the first area goes, then the partly covered one stops the walk
        (0x10000, 0x1800, errno.ENOENT, None, [0x11000, 0x20000]),
        (0x10000, 0, errno.EINVAL, None, [0x10000, 0x11000, 0x20000]),
        (U64, 1, errno.EOVERFLOW, None, [0x10000, 0x11000, 0x20000]),
        (0x10000, U64, errno.EOVERFLOW, None, [0x10000, 0x11000, 0x20000]),
        (U64 - 0xFFF, 0x2000, errno.EOVERFLOW, None, [0x10000, 0x11000, 0x20000]),
    ],
)
def test_unmap(iova: int, length: int, want: int, unmapped: int | None, left: list[int]) -> None:
    env = Env()
    ioas = setup_three(env)
    err, out = unmap(env, ioas, iova, length)
    assert err == want
    if unmapped is not None:
        assert out == unmapped
    assert [a for a, _ in areas(env, ioas)] == left


def test_unmap_all() -> None:
    env = Env()
    ioas = env.ioas()
    assert unmap(env, ioas, 0, U64) == (0, 0)
    env2 = Env()
    ioas2 = setup_three(env2)
    assert unmap(env2, ioas2, 0, U64) == (0, 0x3000)
    assert areas(env2, ioas2) == []
    assert env.call("IOMMU_IOAS_UNMAP", ioas_id=5, iova=0, length=U64)[0] == errno.ENOENT


# -- COPY -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "want"),
    [
        ({"flags": RW | 16}, errno.EOPNOTSUPP),
        ({"flags": RW, "length": U64}, errno.EOVERFLOW),
        ({"flags": RW, "src_iova": U64}, errno.EOVERFLOW),
        ({"flags": RW, "dst_iova": U64}, errno.EOVERFLOW),
        ({"flags": FIXED}, errno.EINVAL),
        ({"flags": RW, "src_ioas_id": 9}, errno.ENOENT),
        ({"flags": RW, "length": 0}, errno.EINVAL),
        ({"flags": RW, "src_iova": 0x10000, "length": 0x3000}, errno.ENOENT),  # hole at 0x12000
        ({"flags": RW, "dst_ioas_id": 9}, errno.ENOENT),
        ({"flags": RW | FIXED, "dst_iova": 0x10000}, errno.EEXIST),
        ({"flags": RW | FIXED, "dst_ioas_id": 1, "dst_iova": 0x11000}, errno.EEXIST),
        ({"flags": RW, "src_iova": 0x20000, "length": 0x1000}, errno.EPERM),  # read-only source
    ],
)
def test_copy_errors(kw: dict[str, int], want: int) -> None:
    env = Env()
    src = env.ioas()
    dst = env.ioas()
    assert mapf(env, src, 0x2000, iova=0x10000)[0] == 0
    assert mapf(env, src, 0x1000, iova=0x20000, flags=R)[0] == 0
    assert mapf(env, dst, 0x1000, iova=0x10000)[0] == 0
    args = {"src_ioas_id": src, "dst_ioas_id": dst, "src_iova": 0x10000, "length": 0x2000} | kw
    assert env.call("IOMMU_IOAS_COPY", **args)[0] == want
    assert areas(env, dst) == [(0x10000, 0x1000)]
    assert len(areas(env, src)) == 2


def test_copy_shares_backing_and_spans_areas() -> None:
    env = Env()
    src, dst = env.ioas(), env.ioas()
    va1, va2 = env.proc.alloc(0x1000), env.proc.alloc(0x1000)
    assert mapf(env, src, 0x1000, iova=0x10000, user_va=va1)[0] == 0
    assert mapf(env, src, 0x1000, iova=0x11000, user_va=va2)[0] == 0
    out = env.ok("IOMMU_IOAS_COPY", flags=R | FIXED, src_ioas_id=src, dst_ioas_id=dst,
                 src_iova=0x10800, dst_iova=0x40000, length=0x1000)
    assert out["dst_iova"] == 0x40000
    pieces = iommufd_translate(env.ctx, dst, 0x40000, 0x1000)
    assert [(p.iova, p.length, p.addr, p.pid) for p in pieces] == [
        (0x40000, 0x800, va1 + 0x800, env.proc.pid), (0x40800, 0x800, va2, env.proc.pid)]
    # the source can go; the copy keeps its pages
    assert unmap(env, src, 0, U64) == (0, 0x2000)
    assert iommufd_translate(env.ctx, dst, 0x40000, 0x1000)[0].addr == va1 + 0x800
    # auto dst iova
    out = env.ok("IOMMU_IOAS_COPY", flags=R, src_ioas_id=dst, dst_ioas_id=dst, src_iova=0x40000, length=0x1000)
    assert out["dst_iova"] not in (0, 0x40000)
    assert iommufd_check_invariants(env.ctx) == []


def test_translate_gap_is_enoent() -> None:
    env = Env()
    ioas = setup_three(env)
    assert len(iommufd_translate(env.ctx, ioas, 0x10000, 0x2000)) == 2
    assert kerr(iommufd_translate, env.ctx, ioas, 0x11000, 0x2000) == errno.ENOENT
    assert kerr(iommufd_translate, env.ctx, 99, 0, 1) == errno.ENOENT


# -- MAP_FILE and CHANGE_PROCESS (newer kernels) ---------------------------------------------
def map_file(env: Env, ioas: int, fd: int, **kw: int) -> int:
    args = {"flags": RW, "ioas_id": ioas, "fd": fd, "start": 0x2000, "length": 0x1000} | kw
    return env.call("IOMMU_IOAS_MAP_FILE", **args)[0]


def test_map_file_keeps_file_until_last_area_goes() -> None:
    env = Env(NEWEST)
    ioas = env.ioas()
    fd = env.proc.pipe()
    memfd = env.proc.fds[fd]
    assert map_file(env, ioas, fd, flags=RW | FIXED, iova=0x100000) == 0
    piece = iommufd_translate(env.ctx, ioas, 0x100800, 0x10)[0]
    assert piece.file is memfd and piece.addr == 0x2800
    assert memfd.refs == 2  # type: ignore[union-attr]
    env.ok("IOMMU_IOAS_COPY", flags=R | FIXED, src_ioas_id=ioas, dst_ioas_id=ioas, src_iova=0x100000,
           dst_iova=0x200000, length=0x1000)
    env.proc.close(fd)
    assert unmap(env, ioas, 0x100000, 0x1000) == (0, 0x1000)
    assert memfd.refs == 1  # type: ignore[union-attr]
    assert unmap(env, ioas, 0x200000, 0x1000) == (0, 0x1000)
    assert memfd.refs == 0  # type: ignore[union-attr]


def test_map_file_errors() -> None:
    env = Env(NEWEST)
    ioas = env.ioas()
    efd, ev = env.proc.eventfd()
    pfd = env.proc.pipe()
    ifd = env.proc.install(env.file)
    assert map_file(env, ioas, 77) == errno.EBADF
    assert map_file(env, ioas, efd) == errno.EINVAL
    assert ev.refs == 1
    assert map_file(env, ioas, ifd) == errno.EINVAL
    assert map_file(env, ioas, pfd, flags=FIXED) == errno.EINVAL
    assert map_file(env, ioas, pfd, flags=RW | 8) == errno.EOPNOTSUPP
    assert map_file(env, ioas, pfd, ioas_id=9) == errno.ENOENT
    assert map_file(env, ioas, pfd, length=0) == errno.EINVAL
    assert map_file(env, ioas, pfd, start=U64 - 0xFFF, length=0x2000) == errno.EOVERFLOW
    assert env.proc.fds[pfd].refs == 1  # type: ignore[union-attr]
    assert areas(env, ioas) == []
    assert Env(V66).call("IOMMU_IOAS_MAP_FILE", fd=pfd)[0] == errno.ENOTTY


def test_change_process_moves_file_pages() -> None:
    env = Env(NEWEST)
    ioas = env.ioas()
    assert map_file(env, ioas, env.proc.pipe(), flags=RW | FIXED, iova=0x100000) == 0
    assert mapf(env, ioas, 0x1000, iova=0x200000)[0] == 0
    other = type(env.proc)()
    addr = other.alloc(S.IOMMU_IOAS_CHANGE_PROCESS.pack(size=8))
    assert env.file.ioctl(other.task(), 0x3B92, addr) == 0
    assert iommufd_translate(env.ctx, ioas, 0x100000, 1)[0].pid == other.pid
    assert iommufd_translate(env.ctx, ioas, 0x200000, 1)[0].pid == env.proc.pid


# -- io_pagetable directly ------------------------------------------------------------------
def test_reserve_conflicts_and_domain_aperture() -> None:
    iopt = IoPagetable()
    pages = Pages(0x1000, True, pid=1, uptr=0x1000)
    iopt.map_pages([(pages, 0, 0x1000)], 1 << 50, 3)
    assert kerr(iopt.add_domain, "d", (0, (1 << 48) - 1)) == errno.EADDRINUSE
    assert iopt.reserved == [] and iopt.iova_alignment == 1
    iopt.unmap_all()
    iopt.set_allow_iova([(0xFEE00000, 0xFEE0FFFF)])
    assert kerr(iopt.reserve, 0xFEE00000, 0xFEEFFFFF, "msi") == errno.EADDRINUSE
    iopt.set_allow_iova([])
    iopt.add_domain("d", (0, (1 << 48) - 1))
    assert iopt.iova_ranges() == [(0, (1 << 48) - 1)] and iopt.iova_alignment == 4096
    iopt.remove_domain("d")
    assert iopt.iova_ranges() == [(0, U64)] and iopt.iova_alignment == 1


def test_add_domain_refuses_unaligned_mappings() -> None:
    iopt = IoPagetable()
    iopt.map_pages([(Pages(0x800, True, pid=1, uptr=0x1000), 0, 0x800)], 0x10000, 3)
    assert kerr(iopt.add_domain, "d", (0, U64)) == errno.EADDRINUSE
    assert iopt.domains == []


def test_cut_splits_areas() -> None:
    iopt = IoPagetable()
    pages = Pages(0x4000, True, pid=1, uptr=0x100000)
    iopt.map_pages([(pages, 0, 0x4000)], 0x10000, 3)
    assert kerr(iopt.cut, [0x107FF]) == errno.EINVAL
    iopt.cut([0x10FFF, 0x12FFF])
    assert [(a.iova, a.length, a.pages_offset) for a in iopt.areas] == [
        (0x10000, 0x1000, 0), (0x11000, 0x2000, 0x1000), (0x13000, 0x1000, 0x3000)]
    assert pages.users == 3
    assert iopt.unmap_iova(0x11000, 0x2000) == 0x2000
    assert iopt.check_invariants("t") == []


def test_fixed_map_needs_page_offset_aligned_to_ioas_alignment() -> None:
    env = Env()
    ioas = env.ioas()
    env.ok("IOMMU_OPTION", option_id=1, op=0, object_id=ioas, val64=0)  # alignment 4096
    assert mapf(env, ioas, 0x1000, iova=0x10000, user_va=0x20010)[0] == errno.EINVAL
    assert mapf(env, ioas, 0x1000, iova=0x10000, user_va=0x20000)[0] == 0


def test_eperm_comes_after_iova_checks() -> None:
    env = Env()
    src = env.ioas()
    assert mapf(env, src, 0x1000, iova=0x10000, flags=R)[0] == 0
    args = {"src_ioas_id": src, "dst_ioas_id": src, "src_iova": 0x10000, "length": 0x1000}
    assert env.call("IOMMU_IOAS_COPY", flags=RW | FIXED, dst_iova=0x10000, **args)[0] == errno.EEXIST
    assert env.call("IOMMU_IOAS_COPY", flags=RW | FIXED, dst_iova=0x20000, **args)[0] == errno.EPERM
    assert env.call("IOMMU_IOAS_COPY", flags=R | FIXED, dst_iova=0x20000, **args)[0] == 0


def test_v66_is_default_env_version() -> None:
    assert Env().ctx.version == V66


# -- property: random map/unmap sequences against a plain reference -----------------------
OPS = st.lists(
    st.tuples(st.sampled_from(["map", "auto", "unmap"]), st.integers(0, 31), st.integers(1, 6)),
    max_size=40,
)

@settings(max_examples=60, deadline=None)
@given(OPS)
def test_io_pagetable_matches_reference(ops: list[tuple[str, int, int]]) -> None:
    pg = 0x1000
    iopt = IoPagetable()
    iopt.reserve(20 * pg, 21 * pg - 1, "r")
    ref: list[tuple[int, int]] = []  # (first page, npages), the kernel's areas
    for op, page, n in ops:
        if op == "map":
            s, e = page, page + n - 1
            clash_r = s <= 20 <= e
            clash_a = any(a <= e and s <= a + k - 1 for a, k in ref)
            try:
                iopt.map_pages([(Pages(n * pg, True, pid=1, uptr=0x100000), 0, n * pg)], page * pg, 3)
                assert not clash_r and not clash_a
                ref.append((page, n))
            except Exception as exc:
                assert getattr(exc, "errno", None) == (errno.EINVAL if clash_r else errno.EEXIST)
        elif op == "auto":
            try:
                iova = iopt.map_pages([(Pages(n * pg, True, pid=1, uptr=0x100000), 0, n * pg)], None, 3)
            except Exception as exc:
                assert getattr(exc, "errno", None) == errno.ENOSPC
                continue
            first = iova // pg
            assert iova % pg == 0 and iova >= pg
            assert not (first <= 20 <= first + n - 1)
            assert not any(a <= first + n - 1 and first <= a + k - 1 for a, k in ref)
            ref.append((first, n))
        else:
            s, e = page, page + n - 1
            hit = sorted(a for a in ref if a[0] <= e and s <= a[0] + a[1] - 1)
            want_removed = []
            want_err = 0 if hit else errno.ENOENT
            for a in hit:
                if a[0] < s or a[0] + a[1] - 1 > e:
                    want_err = errno.ENOENT
                    break
                want_removed.append(a)
            try:
                got = iopt.unmap_iova(s * pg, n * pg)
                assert want_err == 0 and got == sum(k for _, k in want_removed) * pg
            except Exception as exc:
                assert getattr(exc, "errno", None) == want_err
            for a in want_removed:
                ref.remove(a)
        assert sorted((a.iova // pg, a.length // pg) for a in iopt.areas) == sorted(ref)
        assert iopt.check_invariants("prop") == []
