"""BIND / ATTACH / DETACH / replace, object IDs (SPEC 1.4, 3.4-3.6, 3.10-3.20, 4.2)."""

from __future__ import annotations

import errno as E

from fakedev.uapi import consts as C
from fakedev.uapi import ioctls as IO
from fakedev.uapi import structs as S
from tests.kernel.harness import (
    BOTH,
    V66,
    V612,
    Check,
    Close,
    Exit,
    Ioctl,
    Lazy,
    Open,
    Scenario,
    V,
    World,
    allow_iovas,
    attach,
    bind,
    cdev_path,
    destroy,
    detach,
    entry,
    hot_reset_info,
    hw_info,
    hwpt_alloc,
    ioas_alloc,
    ioas_copy,
    ioas_map,
    ioas_unmap,
    iova_ranges,
    option,
    vfio_ioas,
)
from tests.kernel.scenarios.common import DUAL, F0, F1, NOT_OWNED, SHARED, cdev_bound

RW = C.IOMMU_IOAS_MAP_READABLE | C.IOMMU_IOAS_MAP_WRITEABLE
FIXED = RW | C.IOMMU_IOAS_MAP_FIXED_IOVA
U64 = C.U64_MAX

SCENARIOS: list[Scenario] = [
    Scenario("ids-first-devid-is-1", DUAL, BOTH, [*cdev_bound(devid=1)], doc="SPEC 1.4"),
    Scenario("ids-ioas-first-then-devid-2", DUAL, BOTH, [
        Open("p", "iommu", "A"), ioas_alloc("p", "A", ioas=1),
        Open("p", cdev_path(F0), "d0"), bind("p", "d0", "A", devid=2),
    ], doc="SPEC 1.4: one ID namespace for all object kinds"),
    Scenario("ids-per-context", DUAL, BOTH, [
        *cdev_bound(devid=1),
        Open("q", "iommu", "B"), Open("q", cdev_path(F1), "d1"), bind("q", "d1", "B", devid=1),
    ], doc="SPEC 1.4: one xarray per context"),
    Scenario("ids-devid-reused-after-unbind", DUAL, BOTH, [
        *cdev_bound(devid=1),
        ioas_alloc("p", "A", ioas=2),
        Close("p", "d0"),
        ioas_alloc("p", "A", ioas=1),
        Open("p", cdev_path(F0), "d0"), bind("p", "d0", "A", devid=3),
    ], doc="SPEC 1.4: lowest free first, reused"),
    Scenario("ids-ioas-reused-after-destroy", DUAL, BOTH, [
        Open("p", "iommu", "A"),
        ioas_alloc("p", "A", ioas=1), ioas_alloc("p", "A", ioas=2), ioas_alloc("p", "A", ioas=3),
        destroy("p", "A", 2),
        ioas_alloc("p", "A", ioas=2),
        destroy("p", "A", 1), destroy("p", "A", 3),
        ioas_alloc("p", "A", ioas=1), ioas_alloc("p", "A", ioas=3), ioas_alloc("p", "A", ioas=4),
    ]),
    Scenario("ids-auto-hwpt-consumes-id", DUAL, BOTH, [
        *cdev_bound(devid=1), ioas_alloc("p", "A", ioas=2),
        attach("p", "d0", 2, pt_out=3),
        ioas_alloc("p", "A", ioas=4),
    ], doc="SPEC 1.4, 3.5"),
    Scenario("ids-auto-hwpt-freed-on-detach", DUAL, BOTH, [
        *cdev_bound(devid=1), ioas_alloc("p", "A", ioas=2),
        attach("p", "d0", 2, pt_out=3),
        detach("p", "d0"),
        ioas_alloc("p", "A", ioas=3),
    ], doc="SPEC 3.6: the auto HWPT with no device left is destroyed, its ID freed"),
    Scenario("ids-auto-hwpt-freed-on-unbind", DUAL, BOTH, [
        *cdev_bound(devid=1), ioas_alloc("p", "A", ioas=2),
        attach("p", "d0", 2, pt_out=3),
        Close("p", "d0"),
        ioas_alloc("p", "A", ioas=1),
        ioas_alloc("p", "A", ioas=3),
        destroy("p", "A", 2),
    ], doc="SPEC 4.2 close: detach, unbind, IDs freed"),
    Scenario("attach-again-same-ioas-same-hwpt", DUAL, BOTH, [
        *cdev_bound(devid=1), ioas_alloc("p", "A", ioas=2),
        attach("p", "d0", 2, pt_out=3),
        attach("p", "d0", 2, pt_out=3),
        ioas_alloc("p", "A", ioas=4),
    ], doc="SPEC 3.5: replace with the same hwpt is a no-op"),
    Scenario("attach-replace-other-ioas", DUAL, BOTH, [
        *cdev_bound(devid=1), ioas_alloc("p", "A", ioas=2), ioas_alloc("p", "A", ioas=3),
        attach("p", "d0", 2, pt_out=4),
        attach("p", "d0", 3, pt_out=5),
        destroy("p", "A", 2),
        ioas_alloc("p", "A", ioas=2),
        ioas_alloc("p", "A", ioas=4),
        destroy("p", "A", 3, err=E.EBUSY),
    ], doc="SPEC 3.5: a second ATTACH replaces; the old auto HWPT goes"),
    Scenario("attach-two-devices-share-auto-hwpt", DUAL, BOTH, [
        *cdev_bound(devid=1), ioas_alloc("p", "A", ioas=2),
        attach("p", "d0", 2, pt_out=3),
        Open("p", cdev_path(F1), "d1"), bind("p", "d1", "A", devid=4),
        attach("p", "d1", 2, pt_out=3),
        detach("p", "d0"),
        destroy("p", "A", 3, err=E.EBUSY),
        detach("p", "d1"),
        destroy("p", "A", 3, err=E.ENOENT),
        destroy("p", "A", 2),
    ], doc="SPEC 3.5: try each existing auto HWPT of the IOAS first"),
    Scenario("attach-shared-group-two-devices", SHARED, BOTH, [
        *cdev_bound(devid=1), ioas_alloc("p", "A", ioas=2),
        attach("p", "d0", 2, pt_out=3),
        Open("p", cdev_path(F1), "d1"), bind("p", "d1", "A", devid=4),
        attach("p", "d1", 2, pt_out=3),
    ]),
    Scenario("attach-unknown-id-enoent", DUAL, BOTH, [
        *cdev_bound(devid=1),
        attach("p", "d0", 9999, err=E.ENOENT),
        attach("p", "d0", 0, err=E.ENOENT),
        attach("p", "d0", 0x80000000, err=E.ENOENT),
    ], doc="SPEC 3.5"),
    Scenario("attach-device-id-einval", DUAL, BOTH, [
        *cdev_bound(devid=1),
        attach("p", "d0", 1, err=E.EINVAL),
    ], doc="SPEC 3.5: object neither IOAS nor HWPT"),
    Scenario("attach-id-of-other-context-enoent", DUAL, BOTH, [
        *cdev_bound(devid=1),
        Open("p", "iommu", "B"), ioas_alloc("p", "B", ioas=1), ioas_alloc("p", "B", ioas=2),
        attach("p", "d0", 2, err=E.ENOENT),
    ], doc="IDs are looked up in the device's own context"),
    Scenario("attach-manual-hwpt", DUAL, BOTH, [
        *cdev_bound(devid=1), ioas_alloc("p", "A", ioas=2),
        hwpt_alloc("p", "A", 1, 2, save="hwpt", out={"out_hwpt_id": 3}),
        attach("p", "d0", 3, pt_out=3),
        destroy("p", "A", 3, err=E.EBUSY),
        destroy("p", "A", 2, err=E.EBUSY),
        detach("p", "d0"),
        destroy("p", "A", 3),
        destroy("p", "A", 2),
    ], doc="SPEC 3.19, 3.10"),
    Scenario("attach-ioas-does-not-pick-manual-hwpt", DUAL, BOTH, [
        *cdev_bound(devid=1), ioas_alloc("p", "A", ioas=2),
        hwpt_alloc("p", "A", 1, 2, out={"out_hwpt_id": 3}),
        attach("p", "d0", 2, pt_out=4),
    ], doc="SPEC 3.19: a manual HWPT is never auto-selected"),
    Scenario("hwpt-alloc-bad-ids", DUAL, BOTH, [
        *cdev_bound(devid=1), ioas_alloc("p", "A", ioas=2),
        hwpt_alloc("p", "A", 9, 2, err=E.ENOENT),
        hwpt_alloc("p", "A", 2, 2, err=E.ENOENT),
    ], doc="SPEC 3.19"),
    Scenario("hwpt-alloc-pt-is-device-6.6", DUAL, V66, [
        *cdev_bound(devid=1), ioas_alloc("p", "A", ioas=2),
        hwpt_alloc("p", "A", 1, 1, err=E.ENOENT),
        hwpt_alloc("p", "A", 1, 9, err=E.ENOENT),
    ], doc="SPEC 3.19 (6.6): pt_id must be an IOAS (iommufd_get_ioas -> ENOENT)"),
    Scenario("hwpt-alloc-pt-is-device-6.12", DUAL, V612, [
        *cdev_bound(devid=1), ioas_alloc("p", "A", ioas=2),
        hwpt_alloc("p", "A", 1, 1, err=E.EINVAL),
        hwpt_alloc("p", "A", 1, 9, err=E.EINVAL),
    ], doc="6.7+: pt_id looked up as any object (missing -> EINVAL); neither IOAS nor HWPT -> EINVAL"),
    Scenario("detach-unattached-ok", DUAL, BOTH, [
        *cdev_bound(devid=1),
        detach("p", "d0"),
        detach("p", "d0"),
    ], doc="SPEC 3.6: silent success"),
    Scenario("detach-then-reattach", DUAL, BOTH, [
        *cdev_bound(devid=1), ioas_alloc("p", "A", ioas=2),
        attach("p", "d0", 2, pt_out=3), detach("p", "d0"), attach("p", "d0", 2, pt_out=3),
    ]),
    Scenario("destroy-device-id-ebusy", DUAL, BOTH, [
        *cdev_bound(devid=1),
        destroy("p", "A", 1, err=E.EBUSY),
        hot_reset_info("p", "d0", argsz=28, entries=[entry(1, F0), entry(NOT_OWNED, F1)]),
    ], doc="SPEC 3.10: devices can never be destroyed this way"),
    Scenario("destroy-unknown-enoent", DUAL, BOTH, [
        Open("p", "iommu", "A"),
        destroy("p", "A", 1, err=E.ENOENT), destroy("p", "A", 0, err=E.ENOENT),
        destroy("p", "A", 0xFFFFFFFF, err=E.ENOENT),
    ], doc="SPEC 3.10"),
    Scenario("destroy-ioas-with-attached-device-ebusy", DUAL, BOTH, [
        *cdev_bound(devid=1), ioas_alloc("p", "A", ioas=2), attach("p", "d0", 2, pt_out=3),
        destroy("p", "A", 2, err=E.EBUSY),
        destroy("p", "A", 3, err=E.EBUSY),
    ], doc="SPEC 3.10"),
    Scenario("iommufd-close-keeps-context-alive", DUAL, BOTH, [
        *cdev_bound(devid=1), ioas_alloc("p", "A", ioas=2),
        Close("p", "A"),
        attach("p", "d0", 2, pt_out=3),
        hot_reset_info("p", "d0", argsz=28, count=2, out_flags=1, entries=[entry(1, F0), entry(NOT_OWNED, F1)]),
        detach("p", "d0"),
        attach("p", "d0", 2, pt_out=3),
        Close("p", "d0"),
    ], doc="SPEC 4.2: the context dies with the last bound device fd"),
    Scenario("iommufd-close-shared-group-owner-stays", SHARED, BOTH, [
        *cdev_bound(devid=1),
        Close("p", "A"),
        Open("q", "iommu", "B"), Open("q", cdev_path(F1), "d1"),
        bind("q", "d1", "B", err=E.EPERM),
        Open("q", "vfio/vfio", "c"),
        Close("p", "d0"),
        bind("q", "d1", "B", devid=1),
    ], doc="SPEC 4.2: ownership held by the bound device, not the iommufd fd"),
    Scenario("process-exit-releases-everything", SHARED, BOTH, [
        *cdev_bound(devid=1), ioas_alloc("p", "A", ioas=2), attach("p", "d0", 2, pt_out=3),
        Open("p", cdev_path(F1), "d1"), bind("p", "d1", "A", devid=4),
        Exit("p"),
        Open("q", "iommu", "B"), Open("q", cdev_path(F1), "d1"), bind("q", "d1", "B", devid=1),
    ]),
    Scenario("ioas-map-unmap", DUAL, BOTH, [
        Open("p", "iommu", "A"), ioas_alloc("p", "A", ioas=1),
        ioas_map("p", "A", 1, iova=0x100000, length=0x2000),
        ioas_map("p", "A", 1, iova=0x101000, length=0x1000, err=E.EEXIST),
        ioas_unmap("p", "A", 1, iova=0x100000, length=0x2000, out={"length": 0x2000}),
        ioas_unmap("p", "A", 1, iova=0x100000, length=0x2000, err=E.ENOENT),
    ], doc="SPEC 3.14, 3.16"),
    Scenario("ioas-unmap-all", DUAL, BOTH, [
        Open("p", "iommu", "A"), ioas_alloc("p", "A", ioas=1),
        ioas_unmap("p", "A", 1, iova=0, length=U64, out={"length": 0}),
        ioas_map("p", "A", 1, iova=0x100000, length=0x1000),
        ioas_map("p", "A", 1, iova=0x200000, length=0x3000),
        ioas_unmap("p", "A", 1, iova=0, length=U64, out={"length": 0x4000}),
    ], doc="SPEC 3.16"),
    Scenario("ioas-map-errors", DUAL, BOTH, [
        Open("p", "iommu", "A"), ioas_alloc("p", "A", ioas=1),
        ioas_map("p", "A", 2, iova=0x100000, err=E.ENOENT),
        ioas_map("p", "A", 1, iova=0x100000, length=0, err=E.EINVAL),
        ioas_map("p", "A", 1, iova=U64, err=E.EOVERFLOW),
        ioas_map("p", "A", 1, iova=0x100000, length=U64, err=E.EOVERFLOW),
    ], doc="SPEC 3.14"),
    Scenario("ioas-map-auto-iova-nonzero", DUAL, BOTH, [
        Open("p", "iommu", "A"), ioas_alloc("p", "A", ioas=1),
        ioas_map("p", "A", 1, flags=RW, length=0x1000, save="iova"),
        ioas_unmap("p", "A", 1, iova=0, length=U64, out={"length": 0x1000}),
    ], doc="SPEC 3.14: auto IOVA, never 0"),
    Scenario("ioas-unmap-errors", DUAL, BOTH, [
        Open("p", "iommu", "A"), ioas_alloc("p", "A", ioas=1),
        ioas_unmap("p", "A", 2, iova=0x1000, length=0x1000, err=E.ENOENT),
        ioas_unmap("p", "A", 1, iova=0x1000, length=0, err=E.EINVAL),
        ioas_unmap("p", "A", 1, iova=0x1000, length=0x1000, err=E.ENOENT),
    ], doc="SPEC 3.16"),
    Scenario("ioas-copy", DUAL, BOTH, [
        Open("p", "iommu", "A"), ioas_alloc("p", "A", ioas=1), ioas_alloc("p", "A", ioas=2),
        ioas_map("p", "A", 1, iova=0x100000, length=0x2000),
        ioas_copy("p", "A", 2, 1, length=0x2000, src_iova=0x100000, dst_iova=0x400000,
                  out={"dst_iova": 0x400000}),
        ioas_copy("p", "A", 2, 1, length=0x1000, src_iova=0x900000, dst_iova=0x800000, err=E.ENOENT),
        ioas_copy("p", "A", 2, 3, length=0x1000, src_iova=0x100000, dst_iova=0x800000, err=E.ENOENT),
        ioas_copy("p", "A", 2, 1, length=0, src_iova=0x100000, dst_iova=0x800000, err=E.EINVAL),
        ioas_unmap("p", "A", 2, iova=0, length=U64, out={"length": 0x2000}),
    ], doc="SPEC 3.15"),
    Scenario("ioas-iova-ranges-fresh", DUAL, BOTH, [
        Open("p", "iommu", "A"), ioas_alloc("p", "A", ioas=1),
        iova_ranges("p", "A", 1, num_iovas=0, err=E.EMSGSIZE, out={"num_iovas": 1, "out_iova_alignment": 1}),
        iova_ranges("p", "A", 9, err=E.ENOENT),
    ], doc="SPEC 3.12: one range, alignment 1, EMSGSIZE when it does not fit"),
    Scenario("ioas-allow-iovas-bad-ioas", DUAL, BOTH, [
        Open("p", "iommu", "A"),
        allow_iovas("p", "A", 1, err=E.ENOENT),
        ioas_alloc("p", "A", ioas=1),
        allow_iovas("p", "A", 1),
    ], doc="SPEC 3.13: num_iovas = 0 clears the list"),
    Scenario("option-rlimit-get", DUAL, BOTH, [
        Open("p", "iommu", "A"),
        option("p", "A", option_id=C.IOMMU_OPTION_RLIMIT_MODE, op=C.IOMMU_OPTION_OP_GET, out={"val64": 0}),
        option("p", "A", option_id=C.IOMMU_OPTION_RLIMIT_MODE, op=C.IOMMU_OPTION_OP_SET, val64=2,
               err=E.EINVAL),
        option("p", "A", option_id=C.IOMMU_OPTION_RLIMIT_MODE, op=C.IOMMU_OPTION_OP_SET, val64=1),
        option("p", "A", option_id=C.IOMMU_OPTION_RLIMIT_MODE, op=C.IOMMU_OPTION_OP_GET, out={"val64": 1}),
    ], doc="SPEC 3.17"),
    Scenario("option-huge-pages", DUAL, BOTH, [
        Open("p", "iommu", "A"),
        option("p", "A", option_id=C.IOMMU_OPTION_HUGE_PAGES, op=C.IOMMU_OPTION_OP_GET, object_id=1,
               err=E.ENOENT),
        ioas_alloc("p", "A", ioas=1),
        option("p", "A", option_id=C.IOMMU_OPTION_HUGE_PAGES, op=C.IOMMU_OPTION_OP_GET, object_id=1,
               out={"val64": 1}),
        option("p", "A", option_id=C.IOMMU_OPTION_HUGE_PAGES, op=C.IOMMU_OPTION_OP_SET, object_id=1,
               val64=2, err=E.EINVAL),
    ], doc="SPEC 3.17"),
    Scenario("vfio-ioas-get-set-clear", DUAL, BOTH, [
        Open("p", "iommu", "A"),
        vfio_ioas("p", "A", op=C.IOMMU_VFIO_IOAS_GET, err=E.ENODEV),
        vfio_ioas("p", "A", op=C.IOMMU_VFIO_IOAS_SET, ioas=1, err=E.ENOENT),
        ioas_alloc("p", "A", ioas=1),
        vfio_ioas("p", "A", op=C.IOMMU_VFIO_IOAS_SET, ioas=1),
        vfio_ioas("p", "A", op=C.IOMMU_VFIO_IOAS_GET, out={"ioas_id": 1}),
        vfio_ioas("p", "A", op=C.IOMMU_VFIO_IOAS_CLEAR),
        vfio_ioas("p", "A", op=C.IOMMU_VFIO_IOAS_GET, err=E.ENODEV),
    ], doc="SPEC 3.18"),
    Scenario("hw-info-bad-devid", DUAL, BOTH, [
        *cdev_bound(devid=1), ioas_alloc("p", "A", ioas=2),
        hw_info("p", "A", 9, err=E.ENOENT),
        hw_info("p", "A", 2, err=E.ENOENT),
        hw_info("p", "A", 1),
    ], doc="SPEC 3.20"),
    Scenario("bind-twice-two-contexts-ids", DUAL, BOTH, [
        Open("p", "iommu", "A"), Open("p", "iommu", "B"),
        ioas_alloc("p", "B", ioas=1),
        Open("p", cdev_path(F0), "d0"), bind("p", "d0", "B", devid=2),
        Open("p", cdev_path(F1), "d1"), bind("p", "d1", "A", devid=1),
        hot_reset_info("p", "d0", argsz=28, out_flags=1, entries=[entry(2, F0), entry(NOT_OWNED, F1)]),
        hot_reset_info("p", "d1", argsz=28, out_flags=1, entries=[entry(NOT_OWNED, F0), entry(1, F1)]),
    ], doc="SPEC 4.6: a device bound to another context is NOT_OWNED"),
    Scenario("saved-devid-roundtrip", DUAL, BOTH, [
        *cdev_bound(devid=None, save="devid"),
        ioas_alloc("p", "A", save="ioas"),
        attach("p", "d0", V("ioas"), save="hwpt"),
        destroy("p", "A", V("devid"), err=E.EBUSY),
        destroy("p", "A", V("hwpt"), err=E.EBUSY),
    ]),
]

SCENARIOS += [
    Scenario("attach-shared-group-other-hwpt-einval", SHARED, BOTH, [
        *cdev_bound(devid=1), ioas_alloc("p", "A", ioas=2), attach("p", "d0", 2, pt_out=3),
        Open("p", cdev_path(F1), "d1"), bind("p", "d1", "A", devid=4),
        ioas_alloc("p", "A", ioas=5),
        attach("p", "d1", 5, err=E.EINVAL),
        ioas_alloc("p", "A", ioas=6),
        attach("p", "d1", 3, pt_out=3),
    ], doc="SPEC 3.5: the group is attached to another hwpt -> EINVAL; the auto hwpt made for the try is "
           "aborted (its ID is free again)"),
    Scenario("attach-shared-group-replace-moves-group", SHARED, BOTH, [
        *cdev_bound(devid=1), ioas_alloc("p", "A", ioas=2), attach("p", "d0", 2, pt_out=3),
        Open("p", cdev_path(F1), "d1"), bind("p", "d1", "A", devid=4), attach("p", "d1", 2, pt_out=3),
        ioas_alloc("p", "A", ioas=5),
        attach("p", "d0", 5, pt_out=6),
        destroy("p", "A", 3, err=E.ENOENT),
        destroy("p", "A", 2),
        detach("p", "d0"),
        destroy("p", "A", 6, err=E.EBUSY),
        detach("p", "d1"),
        destroy("p", "A", 5),
    ], doc="iommufd_device_do_replace: the whole iommu group moves to the new hwpt (6.6 device.c)"),
    Scenario("bind-writes-only-out-devid", DUAL, BOTH, [
        Open("p", "iommu", "A"), Open("p", cdev_path(F0), "d0"),
        bind("p", "d0", "A", argsz=24, buflen=32, pack_len=16, devid=1,
             check=lambda w, v, raw: _untouched(raw, 16)),
    ], doc="SPEC 3.4 step 8: only out_devid is copied back; argsz > minsz is fine"),
    Scenario("attach-writes-only-pt-id", DUAL, BOTH, [
        *cdev_bound(devid=1), ioas_alloc("p", "A", ioas=2),
        attach("p", "d0", 2, argsz=16, buflen=24, pack_len=12, pt_out=3, check=lambda w, v, raw: _untouched(raw, 12)),
    ], doc="SPEC 3.5: the hwpt id is written back into pt_id only"),
]


def _untouched(raw: bytes, start: int) -> None:
    assert all(b == 0xA5 for b in raw[start:]), f"bytes from {start} written: {raw[start:].hex()}"


def _ranges(*rs: tuple[int, int]) -> Lazy:
    """A user array of iommu_iova_range {start, last}."""
    data = b"".join(S.IOMMU_IOVA_RANGE.pack(start=a, last=b) for a, b in rs)
    return Lazy(lambda w: w.proc("p").alloc(data or 16), f"ranges{rs}")


def _range_buf(n: int) -> Lazy:
    def fn(w: World) -> int:
        w.vals["rangebuf"] = w.proc("p").alloc(b"\xa5" * (16 * n))
        return w.vals["rangebuf"]

    return Lazy(fn, f"range_buf({n})")


def _read_ranges(n: int, want: list[tuple[int, int]]) -> Check:
    def fn(w: World) -> None:
        raw = w.proc("p").peek(w.vals["rangebuf"], 16 * n)
        got = [(S.IOMMU_IOVA_RANGE.unpack(raw[i * 16:(i + 1) * 16])["start"],
                S.IOMMU_IOVA_RANGE.unpack(raw[i * 16:(i + 1) * 16])["last"]) for i in range(len(want))]
        assert got == want, f"ranges {got}, expected {want}"

    return Check(fn, f"ranges == {want}")


def _iova_in(lo: int, hi: int) -> Check:
    def fn(w: World) -> None:
        assert lo <= w.vals["iova"] <= hi, f"iova {w.vals['iova']:#x} outside [{lo:#x}, {hi:#x}]"

    return Check(fn, f"{lo:#x} <= iova <= {hi:#x}")


SCENARIOS += [
    Scenario("ioas-iova-ranges-fresh-entries", DUAL, BOTH, [
        Open("p", "iommu", "A"), ioas_alloc("p", "A", ioas=1),
        Ioctl("p", "A", IO.IOMMU_IOAS_IOVA_RANGES, S.IOMMU_IOAS_IOVA_RANGES,
              fields={"size": 32, "ioas_id": 1, "num_iovas": 2, "allowed_iovas": _range_buf(2)},
              out={"num_iovas": 1, "out_iova_alignment": 1}),
        _read_ranges(1, [(0, U64)]),
    ], doc="SPEC 3.12: a fresh IOAS is one range [0, U64_MAX]"),
    Scenario("ioas-allow-iovas-auto-map-inside", DUAL, BOTH, [
        Open("p", "iommu", "A"), ioas_alloc("p", "A", ioas=1),
        Ioctl("p", "A", IO.IOMMU_IOAS_ALLOW_IOVAS, S.IOMMU_IOAS_ALLOW_IOVAS,
              fields={"size": 24, "ioas_id": 1, "num_iovas": 1,
                      "allowed_iovas": _ranges((0x10000000, 0x1FFFFFFF))}),
        ioas_map("p", "A", 1, flags=RW, length=0x2000, save="iova"),
        _iova_in(0x10000000, 0x1FFFFFFF - 0x1FFF),
    ], doc="SPEC 3.14: auto IOVA is searched in the allowed ranges"),
    Scenario("ioas-allow-iovas-bad-ranges", DUAL, BOTH, [
        Open("p", "iommu", "A"), ioas_alloc("p", "A", ioas=1),
        Ioctl("p", "A", IO.IOMMU_IOAS_ALLOW_IOVAS, S.IOMMU_IOAS_ALLOW_IOVAS,
              fields={"size": 24, "ioas_id": 1, "num_iovas": 1, "allowed_iovas": _ranges((0x2000, 0x1000))},
              err=E.EINVAL),
        Ioctl("p", "A", IO.IOMMU_IOAS_ALLOW_IOVAS, S.IOMMU_IOAS_ALLOW_IOVAS,
              fields={"size": 24, "ioas_id": 1, "num_iovas": 2,
                      "allowed_iovas": _ranges((0x1000, 0x4fff), (0x3000, 0x8fff))}, err=E.EINVAL),
        Ioctl("p", "A", IO.IOMMU_IOAS_ALLOW_IOVAS, S.IOMMU_IOAS_ALLOW_IOVAS,
              fields={"size": 24, "ioas_id": 1, "num_iovas": 1, "allowed_iovas": 0}, err=E.EFAULT),
    ], doc="SPEC 3.13: start >= last or overlapping ranges -> EINVAL; bad array pointer -> EFAULT"),
    Scenario("ioas-allow-iovas-reserved-conflict", DUAL, BOTH, [
        *cdev_bound(), ioas_alloc("p", "A", ioas=2), attach("p", "d0", 2, pt_out=3),
        Ioctl("p", "A", IO.IOMMU_IOAS_ALLOW_IOVAS, S.IOMMU_IOAS_ALLOW_IOVAS,
              fields={"size": 24, "ioas_id": 2, "num_iovas": 1,
                      "allowed_iovas": _ranges((0xFEE00000, 0xFEE0FFFF))}, err=E.EADDRINUSE),
    ], doc="SPEC 3.13: an allowed range intersecting a reserved one (MSI window) -> EADDRINUSE"),
]
