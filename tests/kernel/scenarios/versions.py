"""Which calls exist in which kernel, and struct growth across versions (SPEC 1.3, 2, 6)."""

from __future__ import annotations

import errno as E

from fakedev.uapi import ioctls as IO
from fakedev.uapi import structs as S
from tests.kernel.harness import (
    BOTH,
    V66,
    V612,
    Ioctl,
    Open,
    Scenario,
    bind,
    cdev_path,
    ioas_alloc,
)
from tests.kernel.scenarios.common import DUAL, F0, cdev_bound

SCENARIOS: list[Scenario] = [
    Scenario("ver-dirty-tracking-absent-6.6", DUAL, V66, [
        Open("p", "iommu", "A"),
        Ioctl("p", "A", IO.cmd("IOMMU_HWPT_SET_DIRTY_TRACKING"), S.IOMMU_DESTROY, fields={"size": 16},
              buflen=16, err=E.ENOTTY),
        Ioctl("p", "A", IO.cmd("IOMMU_HWPT_GET_DIRTY_BITMAP"), S.IOMMU_DESTROY, fields={"size": 48},
              buflen=48, err=E.ENOTTY),
        Ioctl("p", "A", IO.cmd("IOMMU_HWPT_INVALIDATE"), S.IOMMU_DESTROY, fields={"size": 32},
              buflen=32, err=E.ENOTTY),
    ], doc="SPEC 6: dirty tracking is 6.7, invalidate 6.8; past the 6.6 op table -> ENOTTY"),
    Scenario("ver-map-file-change-process-absent-6.12", DUAL, V612, [
        Open("p", "iommu", "A"),
        Ioctl("p", "A", IO.IOMMU_IOAS_MAP_FILE, S.IOMMU_IOAS_MAP_FILE, fields={"size": 40}, err=E.ENOTTY),
        Ioctl("p", "A", IO.IOMMU_IOAS_CHANGE_PROCESS, S.IOMMU_IOAS_CHANGE_PROCESS, fields={"size": 8},
              err=E.ENOTTY),
    ], doc="SPEC 6: IOAS_MAP_FILE and IOAS_CHANGE_PROCESS are later than 6.12"),
    Scenario("ver-hwpt-alloc-6.7-fields-on-6.6-e2big", DUAL, V66, [
        *cdev_bound(), ioas_alloc("p", "A", ioas=2),
        Ioctl("p", "A", IO.IOMMU_HWPT_ALLOC, S.IOMMU_HWPT_ALLOC,
              fields={"size": 40, "dev_id": 1, "pt_id": 2, "data_type": 1}, err=E.E2BIG),
        Ioctl("p", "A", IO.IOMMU_HWPT_ALLOC, S.IOMMU_HWPT_ALLOC,
              fields={"size": 40, "dev_id": 1, "pt_id": 2}, out={"out_hwpt_id": 3}),
    ], doc="SPEC 1.3: the 6.6 kernel struct is 24 bytes; non-zero bytes beyond it -> E2BIG"),
    Scenario("ver-hwpt-alloc-data-type-without-len-6.12", DUAL, V612, [
        *cdev_bound(), ioas_alloc("p", "A", ioas=2),
        Ioctl("p", "A", IO.IOMMU_HWPT_ALLOC, S.IOMMU_HWPT_ALLOC,
              fields={"size": 40, "dev_id": 1, "pt_id": 2, "data_type": 1}, err=E.EINVAL),
        Ioctl("p", "A", IO.IOMMU_HWPT_ALLOC, S.IOMMU_HWPT_ALLOC,
              fields={"size": 24, "dev_id": 1, "pt_id": 2}, out={"out_hwpt_id": 3}),
    ], doc="6.7+: data_type without data_len -> EINVAL; a 6.6-sized struct is still accepted"),
    Scenario("ver-bind-token-ptr-ignored", DUAL, BOTH, [
        Open("p", "iommu", "A"), Open("p", cdev_path(F0), "d0"),
        bind("p", "d0", "A", argsz=24, devid=1, out={}),
    ], doc="SPEC 3.4: only 16 bytes are read in 6.6-6.12; a larger argsz is fine"),
    Scenario("ver-bind-flag-token-einval", DUAL, BOTH, [
        Open("p", "iommu", "A"), Open("p", cdev_path(F0), "d0"),
        bind("p", "d0", "A", argsz=24, flags=1, err=E.EINVAL),
    ], doc="SPEC 3.4: VFIO_DEVICE_BIND_FLAG_TOKEN is later than 6.12"),
]
