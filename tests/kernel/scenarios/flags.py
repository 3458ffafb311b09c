"""Unknown flags and non-zero reserved fields, per ioctl (SPEC 1.2, 1.3, 3.x)."""

from __future__ import annotations

import errno as E

from fakedev.uapi import consts as C
from fakedev.uapi import ioctls as IO
from fakedev.uapi import structs as S
from tests.kernel.harness import (
    BOTH,
    V66,
    Ioctl,
    Open,
    Scenario,
    allow_iovas,
    attach,
    bind,
    cdev_path,
    detach,
    feature,
    hot_reset,
    hw_info,
    hwpt_alloc,
    ioas_alloc,
    ioas_map,
    iova_ranges,
    option,
    set_irqs,
    vfio_ioas,
)
from tests.kernel.scenarios.common import DUAL, F0, F1, cdev_bound, group_container, group_device

RW = C.IOMMU_IOAS_MAP_READABLE | C.IOMMU_IOAS_MAP_WRITEABLE
TRIG = C.VFIO_IRQ_SET_ACTION_TRIGGER


def _ioas() -> list:
    return [Open("p", "iommu", "A"), ioas_alloc("p", "A", ioas=1)]


SCENARIOS: list[Scenario] = []

for bit in (0, 1, 31):
    SCENARIOS += [
        Scenario(f"flags-bind-bit{bit}", DUAL, BOTH, [
            Open("p", "iommu", "A"), Open("p", cdev_path(F0), "d0"),
            bind("p", "d0", "A", flags=1 << bit, err=E.EINVAL),
            bind("p", "d0", "A", devid=1),
        ], doc="SPEC 3.4 step 2: flags != 0 (the token flag is later than 6.12)"),
        Scenario(f"flags-attach-bit{bit}", DUAL, BOTH, [
            *cdev_bound(), ioas_alloc("p", "A", ioas=2),
            attach("p", "d0", 2, flags=1 << bit, err=E.EINVAL),
            attach("p", "d0", 2, pt_out=3),
        ], doc="SPEC 3.5"),
        Scenario(f"flags-detach-bit{bit}", DUAL, BOTH, [
            *cdev_bound(), ioas_alloc("p", "A", ioas=2), attach("p", "d0", 2, pt_out=3),
            detach("p", "d0", flags=1 << bit, err=E.EINVAL),
            detach("p", "d0"),
        ], doc="SPEC 3.6"),
        Scenario(f"flags-hot-reset-cdev-bit{bit}", DUAL, BOTH, [
            *cdev_bound(),
            hot_reset("p", "d0", [], flags=1 << bit, err=E.EINVAL),
        ], doc="SPEC 4.7 step 1"),
        Scenario(f"flags-ioas-alloc-bit{bit}", DUAL, BOTH, [
            Open("p", "iommu", "A"),
            ioas_alloc("p", "A", flags=1 << bit, err=E.EOPNOTSUPP),
            ioas_alloc("p", "A", ioas=1),
        ], doc="SPEC 3.11"),
    ]

SCENARIOS += [
    Scenario("flags-hot-reset-group-flags", DUAL, BOTH, [
        *group_container(bdfs=(F0, F1), names=("g13", "g14")),
        *group_device(grp="g13"),
        hot_reset("p", "gd0", ["g13", "g14"], flags=1, err=E.EINVAL),
        hot_reset("p", "gd0", ["g13", "g14"]),
    ], doc="SPEC 4.7 step 1"),
]

SCENARIOS += [
    Scenario("flags-ioas-map-unknown-bit", DUAL, BOTH, [
        *_ioas(), ioas_map("p", "A", 1, flags=RW | (1 << 3), iova=0x100000, err=E.EOPNOTSUPP),
    ], doc="SPEC 3.14"),
    Scenario("flags-ioas-map-reserved", DUAL, BOTH, [
        *_ioas(), ioas_map("p", "A", 1, reserved=1, iova=0x100000, err=E.EOPNOTSUPP),
    ], doc="SPEC 3.14"),
    Scenario("flags-ioas-map-no-rw", DUAL, BOTH, [
        *_ioas(), ioas_map("p", "A", 1, flags=C.IOMMU_IOAS_MAP_FIXED_IOVA, iova=0x100000, err=E.EINVAL),
    ], doc="SPEC 3.14: neither READABLE nor WRITEABLE"),
    Scenario("flags-iova-ranges-reserved", DUAL, BOTH, [
        *_ioas(), iova_ranges("p", "A", 1, reserved=1, err=E.EOPNOTSUPP),
    ], doc="SPEC 3.12"),
    Scenario("flags-allow-iovas-reserved", DUAL, BOTH, [
        *_ioas(), allow_iovas("p", "A", 1, reserved=1, err=E.EOPNOTSUPP),
    ], doc="SPEC 3.13"),
    Scenario("flags-option-reserved", DUAL, BOTH, [
        *_ioas(), option("p", "A", option_id=C.IOMMU_OPTION_RLIMIT_MODE, op=C.IOMMU_OPTION_OP_GET, reserved=1,
                         err=E.EOPNOTSUPP),
    ], doc="SPEC 3.17"),
    Scenario("flags-option-unknown-option", DUAL, BOTH, [
        *_ioas(), option("p", "A", option_id=99, op=C.IOMMU_OPTION_OP_GET, err=E.EOPNOTSUPP),
    ], doc="SPEC 3.17"),
    Scenario("flags-option-unknown-op", DUAL, BOTH, [
        *_ioas(), option("p", "A", option_id=C.IOMMU_OPTION_RLIMIT_MODE, op=7, err=E.EOPNOTSUPP),
    ], doc="SPEC 3.17"),
    Scenario("flags-option-rlimit-object-id", DUAL, BOTH, [
        *_ioas(), option("p", "A", option_id=C.IOMMU_OPTION_RLIMIT_MODE, op=C.IOMMU_OPTION_OP_GET, object_id=1,
                         err=E.EOPNOTSUPP),
    ], doc="SPEC 3.17"),
    Scenario("flags-vfio-ioas-reserved", DUAL, BOTH, [
        *_ioas(), vfio_ioas("p", "A", op=C.IOMMU_VFIO_IOAS_GET, reserved=1, err=E.EOPNOTSUPP),
    ], doc="SPEC 3.18"),
    Scenario("flags-vfio-ioas-unknown-op", DUAL, BOTH, [
        *_ioas(), vfio_ioas("p", "A", op=9, err=E.EOPNOTSUPP),
    ], doc="SPEC 3.18"),
    Scenario("flags-hwpt-alloc-flags-6.6", DUAL, V66, [
        *cdev_bound(), ioas_alloc("p", "A", ioas=2),
        hwpt_alloc("p", "A", 1, 2, flags=1, err=E.EOPNOTSUPP),
        hwpt_alloc("p", "A", 1, 2, flags=1 << 7, err=E.EOPNOTSUPP),
    ], doc="SPEC 3.19"),
    Scenario("flags-hwpt-alloc-reserved", DUAL, BOTH, [
        *cdev_bound(), ioas_alloc("p", "A", ioas=2),
        hwpt_alloc("p", "A", 1, 2, reserved=1, err=E.EOPNOTSUPP),
    ], doc="SPEC 3.19"),
    Scenario("flags-hw-info-flags-6.6", DUAL, V66, [
        *cdev_bound(),
        hw_info("p", "A", 1, flags=1, err=E.EOPNOTSUPP),
    ], doc="SPEC 3.20"),
    Scenario("flags-hw-info-reserved", DUAL, BOTH, [
        *cdev_bound(),
        hw_info("p", "A", 1, reserved=1, err=E.EOPNOTSUPP),
    ], doc="SPEC 3.20"),
    Scenario("flags-set-irqs-unknown-bit", DUAL, BOTH, [
        *cdev_bound(),
        set_irqs("p", "d0", flags=C.VFIO_IRQ_SET_DATA_NONE | TRIG | (1 << 6), err=E.EINVAL),
    ], doc="SPEC 3.8"),
    Scenario("flags-set-irqs-two-data-types", DUAL, BOTH, [
        *cdev_bound(),
        set_irqs("p", "d0", flags=C.VFIO_IRQ_SET_DATA_NONE | C.VFIO_IRQ_SET_DATA_BOOL | TRIG, count=1,
                 data=b"\1", err=E.EINVAL),
    ], doc="SPEC 3.8: data type not exactly one"),
    Scenario("flags-set-irqs-index-out-of-range", DUAL, BOTH, [
        *cdev_bound(),
        set_irqs("p", "d0", index=5, flags=C.VFIO_IRQ_SET_DATA_NONE | TRIG, err=E.EINVAL),
    ], doc="SPEC 3.8"),
    Scenario("flags-feature-unknown-bit", DUAL, BOTH, [
        *cdev_bound(),
        feature("p", "d0", C.VFIO_DEVICE_FEATURE_PROBE | (1 << 20) | 3, err=E.EINVAL),
    ], doc="SPEC 3.9"),
    Scenario("flags-feature-get-and-set", DUAL, BOTH, [
        *cdev_bound(),
        feature("p", "d0", C.VFIO_DEVICE_FEATURE_GET | C.VFIO_DEVICE_FEATURE_SET | 3, err=E.EINVAL),
    ], doc="SPEC 3.9: GET and SET without PROBE"),
    Scenario("flags-feature-probe-low-power", DUAL, BOTH, [
        *cdev_bound(),
        feature("p", "d0", C.VFIO_DEVICE_FEATURE_PROBE | C.VFIO_DEVICE_FEATURE_SET | 3),
    ], doc="SPEC 3.9: PROBE of a supported feature -> 0"),
    Scenario("flags-feature-unknown-index", DUAL, BOTH, [
        *cdev_bound(),
        feature("p", "d0", C.VFIO_DEVICE_FEATURE_PROBE | C.VFIO_DEVICE_FEATURE_GET | 0x7FF, err=E.ENOTTY),
    ], doc="SPEC 3.9: vfio-pci, unknown index -> ENOTTY"),
    Scenario("flags-feature-migration-no-ops", DUAL, BOTH, [
        *cdev_bound(),
        feature("p", "d0", C.VFIO_DEVICE_FEATURE_PROBE | C.VFIO_DEVICE_FEATURE_GET
                | C.VFIO_DEVICE_FEATURE_MIGRATION, err=E.ENOTTY),
    ], doc="SPEC 3.9: core feature without migration ops -> ENOTTY"),
    Scenario("flags-map-dma-unknown-bit", DUAL, BOTH, [
        *group_container(bdfs=(F0,)),
        Ioctl("p", "c", IO.VFIO_IOMMU_MAP_DMA, S.VFIO_IOMMU_TYPE1_DMA_MAP,
              fields={"argsz": 32, "flags": C.VFIO_DMA_MAP_FLAG_READ | (1 << 5), "vaddr": 0x10000,
                      "iova": 0x100000, "size": 4096}, err=E.EINVAL),
    ], doc="SPEC 3.1"),
    Scenario("flags-unmap-dma-unknown-bit", DUAL, BOTH, [
        *group_container(bdfs=(F0,)),
        Ioctl("p", "c", IO.VFIO_IOMMU_UNMAP_DMA, S.VFIO_IOMMU_TYPE1_DMA_UNMAP,
              fields={"argsz": 24, "flags": 1 << 5, "iova": 0x100000, "size": 4096}, err=E.EINVAL),
    ], doc="SPEC 3.1"),
]
