"""argsz/size below the minimum for every struct, E2BIG tails, and bad pointers.

SPEC 1.2 (VFIO: copy minsz -> EFAULT, then argsz < minsz -> EINVAL) and 1.3
(iommufd: get_user(size) -> EFAULT, size < min_size -> EINVAL, non-zero bytes
past the kernel struct -> E2BIG, copy fault -> EFAULT).
"""

from __future__ import annotations

import errno as E
from collections.abc import Callable
from typing import Any

from fakedev.uapi import consts as C
from fakedev.uapi import ioctls as IO
from fakedev.uapi import structs as S
from fakedev.uapi.layout import Layout
from tests.kernel.harness import (
    BOTH,
    Ioctl,
    Open,
    Scenario,
    Step,
    get_device_fd,
    hot_reset,
    hot_reset_info,
    ioas_alloc,
    set_container,
)
from tests.kernel.scenarios.common import DUAL, F0, F1, cdev_bound, group_container, group_device

Prologue = Callable[[], list[Step]]


def _bound() -> list[Step]:
    return cdev_bound(devid=1)


def _unbound() -> list[Step]:
    from tests.kernel.harness import cdev_path

    return [Open("p", "iommu", "A"), Open("p", cdev_path(F0), "d0")]


def _container() -> list[Step]:
    return group_container(bdfs=(F0,), names=("g0",))


def _group() -> list[Step]:
    from tests.kernel.harness import group_path

    return [Open("p", group_path(F0), "g0")]


def _iommufd() -> list[Step]:
    return [Open("p", "iommu", "A"), ioas_alloc("p", "A", ioas=1)]


# (name, prologue, fd, cmd, layout, minsz, extra fields)
VFIO_STRUCTS: list[tuple[str, Prologue, str, int, Layout, int, dict[str, Any]]] = [
    ("DEVICE_GET_INFO", _bound, "d0", IO.VFIO_DEVICE_GET_INFO, S.VFIO_DEVICE_INFO, 16, {}),
    ("DEVICE_GET_REGION_INFO", _bound, "d0", IO.VFIO_DEVICE_GET_REGION_INFO, S.VFIO_REGION_INFO, 32,
     {"index": C.VFIO_PCI_CONFIG_REGION_INDEX}),
    ("DEVICE_GET_IRQ_INFO", _bound, "d0", IO.VFIO_DEVICE_GET_IRQ_INFO, S.VFIO_IRQ_INFO, 16, {"index": 0}),
    ("DEVICE_SET_IRQS", _bound, "d0", IO.VFIO_DEVICE_SET_IRQS, S.VFIO_IRQ_SET, 20,
     {"flags": C.VFIO_IRQ_SET_DATA_NONE | C.VFIO_IRQ_SET_ACTION_TRIGGER, "index": 0, "count": 0}),
    ("DEVICE_GET_PCI_HOT_RESET_INFO", _bound, "d0", IO.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO,
     S.VFIO_PCI_HOT_RESET_INFO, 12, {}),
    ("DEVICE_PCI_HOT_RESET", _bound, "d0", IO.VFIO_DEVICE_PCI_HOT_RESET, S.VFIO_PCI_HOT_RESET, 12, {}),
    ("DEVICE_FEATURE", _bound, "d0", IO.VFIO_DEVICE_FEATURE, S.VFIO_DEVICE_FEATURE, 8,
     {"flags": C.VFIO_DEVICE_FEATURE_PROBE | C.VFIO_DEVICE_FEATURE_SET | 3}),
    ("DEVICE_BIND_IOMMUFD", _unbound, "d0", IO.VFIO_DEVICE_BIND_IOMMUFD, S.VFIO_DEVICE_BIND_IOMMUFD, 16,
     {"iommufd": "A"}),
    ("DEVICE_ATTACH_IOMMUFD_PT", _bound, "d0", IO.VFIO_DEVICE_ATTACH_IOMMUFD_PT,
     S.VFIO_DEVICE_ATTACH_IOMMUFD_PT, 12, {"pt_id": 1}),
    ("DEVICE_DETACH_IOMMUFD_PT", _bound, "d0", IO.VFIO_DEVICE_DETACH_IOMMUFD_PT,
     S.VFIO_DEVICE_DETACH_IOMMUFD_PT, 8, {}),
    ("GROUP_GET_STATUS", _group, "g0", IO.VFIO_GROUP_GET_STATUS, S.VFIO_GROUP_STATUS, 8, {}),
    ("IOMMU_GET_INFO", _container, "c", IO.VFIO_IOMMU_GET_INFO, S.VFIO_IOMMU_TYPE1_INFO, 16, {}),
    ("IOMMU_MAP_DMA", _container, "c", IO.VFIO_IOMMU_MAP_DMA, S.VFIO_IOMMU_TYPE1_DMA_MAP, 32,
     {"flags": C.VFIO_DMA_MAP_FLAG_READ, "size": 4096, "iova": 0x100000, "vaddr": 0x10000}),
    ("IOMMU_UNMAP_DMA", _container, "c", IO.VFIO_IOMMU_UNMAP_DMA, S.VFIO_IOMMU_TYPE1_DMA_UNMAP, 24,
     {"size": 4096, "iova": 0x100000}),
]

# (name, cmd, layout, min_size, fields)
IOMMUFD_STRUCTS: list[tuple[str, int, Layout, int, dict[str, Any]]] = [
    ("DESTROY", IO.IOMMU_DESTROY, S.IOMMU_DESTROY, 8, {"id": 1}),
    ("IOAS_ALLOC", IO.IOMMU_IOAS_ALLOC, S.IOMMU_IOAS_ALLOC, 12, {}),
    ("IOAS_ALLOW_IOVAS", IO.IOMMU_IOAS_ALLOW_IOVAS, S.IOMMU_IOAS_ALLOW_IOVAS, 24, {"ioas_id": 1}),
    ("IOAS_COPY", IO.IOMMU_IOAS_COPY, S.IOMMU_IOAS_COPY, 40, {"dst_ioas_id": 1, "src_ioas_id": 1}),
    ("IOAS_IOVA_RANGES", IO.IOMMU_IOAS_IOVA_RANGES, S.IOMMU_IOAS_IOVA_RANGES, 32, {"ioas_id": 1}),
    ("IOAS_MAP", IO.IOMMU_IOAS_MAP, S.IOMMU_IOAS_MAP, 40, {"ioas_id": 1}),
    ("IOAS_UNMAP", IO.IOMMU_IOAS_UNMAP, S.IOMMU_IOAS_UNMAP, 24, {"ioas_id": 1}),
    ("OPTION", IO.IOMMU_OPTION, S.IOMMU_OPTION, 24, {"op": C.IOMMU_OPTION_OP_GET}),
    ("VFIO_IOAS", IO.IOMMU_VFIO_IOAS, S.IOMMU_VFIO_IOAS, 12, {}),
    ("HWPT_ALLOC", IO.IOMMU_HWPT_ALLOC, S.IOMMU_HWPT_ALLOC, 24, {"pt_id": 1}),
    ("GET_HW_INFO", IO.IOMMU_GET_HW_INFO, S.IOMMU_HW_INFO, 32, {}),
]


def _fields(extra: dict[str, Any]) -> dict[str, Any]:
    from tests.kernel.harness import FD

    return {k: (FD(v) if isinstance(v, str) else v) for k, v in extra.items()}


SCENARIOS: list[Scenario] = []

for name, pro, fd, cmd, lay, minsz, extra in VFIO_STRUCTS:
    for argsz in sorted({0, minsz - 4, minsz - 1}):
        if argsz < 0:
            continue
        SCENARIOS.append(Scenario(f"argsz-{name}-{argsz}-below-{minsz}", DUAL, BOTH, [
            *pro(),
            Ioctl("p", fd, cmd, lay, fields={"argsz": argsz, **_fields(extra)}, err=E.EINVAL),
        ], doc="SPEC 1.2: argsz < minsz -> EINVAL"))
    SCENARIOS.append(Scenario(f"efault-{name}-null", DUAL, BOTH, [
        *pro(),
        Ioctl("p", fd, cmd, lay, fields={"argsz": lay.size, **_fields(extra)}, addr=0, err=E.EFAULT),
    ], doc="SPEC 1.2: copy of minsz bytes faults"))
    SCENARIOS.append(Scenario(f"efault-{name}-crosses-unmapped", DUAL, BOTH, [
        *pro(),
        Ioctl("p", fd, cmd, lay, fields={"argsz": lay.size, **_fields(extra)}, mapped=minsz - 1, err=E.EFAULT),
    ], doc="SPEC 1.2: struct runs into an unmapped page"))

for name, cmd, lay, minsz, extra in IOMMUFD_STRUCTS:
    for size in sorted({0, 4, minsz - 4, minsz - 1}):
        SCENARIOS.append(Scenario(f"size-{name}-{size}-below-{minsz}", DUAL, BOTH, [
            *_iommufd(),
            Ioctl("p", "A", cmd, lay, fields={"size": size, **extra}, err=E.EINVAL),
        ], doc="SPEC 1.3 step 4"))
    SCENARIOS.append(Scenario(f"efault-{name}-null", DUAL, BOTH, [
        *_iommufd(),
        Ioctl("p", "A", cmd, lay, fields={"size": minsz, **extra}, addr=0, err=E.EFAULT),
    ], doc="SPEC 1.3 step 2"))
    SCENARIOS.append(Scenario(f"efault-{name}-crosses-unmapped", DUAL, BOTH, [
        *_iommufd(),
        Ioctl("p", "A", cmd, lay, fields={"size": minsz, **extra}, mapped=minsz - 1, err=E.EFAULT),
    ], doc="SPEC 1.3 step 5: size readable, the struct is not"))
    SCENARIOS.append(Scenario(f"e2big-{name}-nonzero-tail", DUAL, BOTH, [
        *_iommufd(),
        Ioctl("p", "A", cmd, lay, fields={"size": lay.size + 8, **extra}, trailer=b"\0\0\0\0\1\0\0\0",
              err=E.E2BIG),
    ], doc="SPEC 1.3 step 5: copy_struct_from_user, non-zero bytes past the struct"))

SCENARIOS += [
    Scenario("e2big-IOAS_ALLOC-zero-tail-ok", DUAL, BOTH, [
        Open("p", "iommu", "A"),
        Ioctl("p", "A", IO.IOMMU_IOAS_ALLOC, S.IOMMU_IOAS_ALLOC, fields={"size": 64}, trailer=bytes(52),
              out={"out_ioas_id": 1}),
    ], doc="SPEC 1.3 step 5: a zero tail is accepted"),
    Scenario("iommufd-ioas-alloc-larger-size-out-written", DUAL, BOTH, [
        Open("p", "iommu", "A"),
        ioas_alloc("p", "A", ioas=1),
        Ioctl("p", "A", IO.IOMMU_IOAS_ALLOC, S.IOMMU_IOAS_ALLOC, fields={"size": 16}, trailer=bytes(4),
              out={"out_ioas_id": 2}),
    ]),
    Scenario("iommufd-iowr-encoded-cmd-enotty", DUAL, BOTH, [
        Open("p", "iommu", "A"),
        Ioctl("p", "A", IO.IOMMU_IOAS_ALLOC | (3 << 30) | (12 << 16), S.IOMMU_IOAS_ALLOC,
              fields={"size": 12}, err=E.ENOTTY),
    ], doc="SPEC 1.3 step 3: op->ioctl_num != cmd -> ENOTTY"),
    Scenario("iommufd-unknown-nr-enotty", DUAL, BOTH, [
        Open("p", "iommu", "A"),
        Ioctl("p", "A", 0x3BFE, S.IOMMU_DESTROY, fields={"size": 8}, err=E.ENOTTY),
    ], doc="SPEC 1.3 step 1"),
    Scenario("iommufd-compat-device-cmd-enotty", DUAL, BOTH, [
        Open("p", "iommu", "A"),
        Ioctl("p", "A", IO.VFIO_DEVICE_GET_INFO, S.VFIO_DEVICE_INFO, fields={"argsz": 24}, err=E.ENOTTY),
    ], doc="SPEC 1.3/3.21: nr < 0x80 not a compat call -> ENOTTY"),
    Scenario("efault-info-entries-unmapped", DUAL, BOTH, [
        *cdev_bound(devid=1),
        hot_reset_info("p", "d0", argsz=28, mapped=20, err=E.EFAULT),
    ], doc="SPEC 4.6: entry copy faults -> EFAULT (both INFO versions)"),
    Scenario("efault-info-header-only-mapped", DUAL, BOTH, [
        *cdev_bound(devid=1),
        hot_reset_info("p", "d0", argsz=28, mapped=12, err=E.EFAULT),
    ]),
    Scenario("efault-hot-reset-fd-array-unmapped", DUAL, BOTH, [
        *group_container(bdfs=(F0, F1), names=("g13", "g14")),
        *group_device(grp="g13"),
        hot_reset("p", "gd0", ["g13", "g14"], mapped=16, err=E.EFAULT),
    ], doc="SPEC 4.7: copy of count fds faults -> EFAULT"),
    Scenario("hot-reset-argsz-not-checked-against-count", DUAL, BOTH, [
        *group_container(bdfs=(F0, F1), names=("g13", "g14")),
        *group_device(grp="g13"),
        hot_reset("p", "gd0", ["g13", "g14"], argsz=12),
    ], doc="SPEC 4.7: argsz is not checked against count"),
    Scenario("efault-set-container-null", DUAL, BOTH, [
        Open("p", "vfio/vfio", "c"),
        *_group(),
        set_container("p", "g0", "c", addr=0, err=E.EFAULT),
    ], doc="SPEC 3.2: get_user fault"),
    Scenario("efault-get-device-fd-null-name", DUAL, BOTH, [
        *_container(),
        get_device_fd("p", "g0", F0, addr=0, err=E.EFAULT),
    ], doc="SPEC 3.2: strndup_user fault"),
    Scenario("efault-bind-struct-crosses-unmapped", DUAL, BOTH, [
        *_unbound(),
        Ioctl("p", "d0", IO.VFIO_DEVICE_BIND_IOMMUFD, S.VFIO_DEVICE_BIND_IOMMUFD,
              fields={"argsz": 16, "iommufd": _fields({"x": "A"})["x"]}, mapped=12, err=E.EFAULT),
        Ioctl("p", "d0", IO.VFIO_DEVICE_BIND_IOMMUFD, S.VFIO_DEVICE_BIND_IOMMUFD,
              fields={"argsz": 16, "iommufd": _fields({"x": "A"})["x"]}, mapped=16, out={"out_devid": 1}),
    ], doc="SPEC 3.4 step 1; then the same struct exactly fitting the page succeeds"),
]
_ = F1
