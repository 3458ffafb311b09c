"""The legacy group path: container, group, GET_DEVICE_FD (SPEC 3.1, 3.2, 4.3)."""

from __future__ import annotations

import errno as E

from fakedev.uapi import consts as C
from fakedev.uapi import ioctls as IO
from fakedev.uapi import structs as S
from tests.kernel.harness import (
    ANY,
    BOTH,
    Close,
    Exit,
    Ioctl,
    Open,
    Read,
    Scenario,
    api_version,
    attach,
    bind,
    cdev_path,
    check_extension,
    device_info,
    get_device_fd,
    group_path,
    group_status,
    set_container,
    set_iommu,
    unset_container,
    vfio_ioas,
)
from tests.kernel.scenarios.common import DUAL, F0, F1, SHARED, group_container

VIABLE = C.VFIO_GROUP_FLAGS_VIABLE
CSET = C.VFIO_GROUP_FLAGS_CONTAINER_SET

SCENARIOS: list[Scenario] = [
    Scenario("group-status-lifecycle", DUAL, BOTH, [
        Open("p", "vfio/vfio", "c"), Open("p", group_path(F0), "g"),
        group_status("p", "g", flags=VIABLE),
        set_container("p", "g", "c"),
        group_status("p", "g", flags=VIABLE | CSET),
        unset_container("p", "g"),
        group_status("p", "g", flags=VIABLE),
    ], doc="SPEC 3.2 GET_STATUS"),
    Scenario("group-status-copies-8-bytes", DUAL, BOTH, [
        Open("p", group_path(F0), "g"),
        group_status("p", "g", argsz=64, buflen=64, flags=VIABLE),
    ]),
    Scenario("group-set-container-twice", DUAL, BOTH, [
        Open("p", "vfio/vfio", "c"), Open("p", "vfio/vfio", "c2"), Open("p", group_path(F0), "g"),
        set_container("p", "g", "c"),
        set_container("p", "g", "c", err=E.EINVAL),
        set_container("p", "g", "c2", err=E.EINVAL),
    ], doc="SPEC 3.2: already has container -> EINVAL"),
    Scenario("group-set-container-iommufd-then-container", DUAL, BOTH, [
        Open("p", "vfio/vfio", "c"), Open("p", "iommu", "A"), Open("p", group_path(F0), "g"),
        set_container("p", "g", "A"),
        group_status("p", "g", flags=VIABLE | CSET),
        set_container("p", "g", "c", err=E.EINVAL),
    ]),
    Scenario("group-unset-without-container", DUAL, BOTH, [
        Open("p", group_path(F0), "g"),
        unset_container("p", "g", err=E.EINVAL),
    ], doc="SPEC 3.2 UNSET_CONTAINER"),
    Scenario("group-unset-with-device-fd-ebusy", DUAL, BOTH, [
        *group_container(bdfs=(F0,)),
        get_device_fd("p", "g0", F0, save_fd="gd0"),
        unset_container("p", "g0", err=E.EBUSY),
        Close("p", "gd0"),
        unset_container("p", "g0"),
        group_status("p", "g0", flags=VIABLE),
    ], doc="SPEC 3.2: container_users != 1 -> EBUSY"),
    Scenario("group-unset-iommufd-with-device-fd", DUAL, BOTH, [
        Open("p", "iommu", "A"), Open("p", group_path(F0), "g"),
        set_container("p", "g", "A"),
        get_device_fd("p", "g", F0, save_fd="gd0"),
        Close("p", "gd0"),
        unset_container("p", "g"),
    ]),
    Scenario("container-set-iommu-without-group", DUAL, BOTH, [
        Open("p", "vfio/vfio", "c"),
        set_iommu("p", "c", err=E.EINVAL),
    ], doc="SPEC 3.1"),
    Scenario("container-set-iommu-twice", DUAL, BOTH, [
        *group_container(bdfs=(F0,)),
        set_iommu("p", "c", err=E.EINVAL),
        set_iommu("p", "c", C.VFIO_TYPE1_IOMMU, err=E.EINVAL),
    ], doc="SPEC 3.1: driver already set"),
    Scenario("container-set-iommu-unknown-type", DUAL, BOTH, [
        *group_container(bdfs=(F0,), iommu=False),
        set_iommu("p", "c", 99, err=E.ENODEV),
        set_iommu("p", "c", C.VFIO_TYPE1_IOMMU),
    ], doc="SPEC 3.1: no driver claimed the type -> ENODEV"),
    Scenario("container-check-extension", DUAL, BOTH, [
        Open("p", "vfio/vfio", "c"),
        api_version("p", "c", ret=0),
        check_extension("p", "c", C.VFIO_TYPE1_IOMMU, ret=1),
        check_extension("p", "c", C.VFIO_TYPE1v2_IOMMU, ret=1),
        check_extension("p", "c", C.VFIO_UNMAP_ALL, ret=1),
        check_extension("p", "c", C.VFIO_UPDATE_VADDR, ret=0),
        check_extension("p", "c", 99, ret=0),
        check_extension("p", "c", C.VFIO_NOIOMMU_IOMMU, ret=0),
    ], doc="SPEC 3.1 CHECK_EXTENSION"),
    Scenario("container-other-ioctl-before-set-iommu", DUAL, BOTH, [
        Open("p", "vfio/vfio", "c"),
        Ioctl("p", "c", IO.VFIO_IOMMU_GET_INFO, S.VFIO_IOMMU_TYPE1_INFO, fields={"argsz": 24}, err=E.EINVAL),
    ], doc="SPEC 3.1: no driver set -> EINVAL"),
    Scenario("container-get-info-after-set-iommu", DUAL, BOTH, [
        *group_container(bdfs=(F0,)),
        Ioctl("p", "c", IO.VFIO_IOMMU_GET_INFO, S.VFIO_IOMMU_TYPE1_INFO, fields={"argsz": 16},
              out={"flags": ANY}),
    ]),
    Scenario("get-device-fd-before-set-iommu", DUAL, BOTH, [
        *group_container(bdfs=(F0,), iommu=False),
        get_device_fd("p", "g0", F0, err=E.EINVAL),
        set_iommu("p", "c"),
        get_device_fd("p", "g0", F0, save_fd="gd0"),
    ], doc="SPEC 3.2: vfio_group_use_container"),
    Scenario("get-device-fd-without-container", DUAL, BOTH, [
        Open("p", group_path(F0), "g"),
        get_device_fd("p", "g", F0, err=E.EINVAL),
    ], doc="SPEC 3.2"),
    Scenario("get-device-fd-unknown-name", DUAL, BOTH, [
        *group_container(bdfs=(F0,)),
        get_device_fd("p", "g0", "0000:02:00.0", err=E.ENODEV),
        get_device_fd("p", "g0", F1, err=E.ENODEV),
        get_device_fd("p", "g0", "", err=E.ENODEV),
    ], doc="SPEC 3.2: no device of the group matches -> ENODEV"),
    Scenario("get-device-fd-twice", DUAL, BOTH, [
        *group_container(bdfs=(F0,)),
        get_device_fd("p", "g0", F0, save_fd="gd0"),
        get_device_fd("p", "g0", F0, save_fd="gd0b"),
        device_info("p", "gd0", out={"num_irqs": 5}),
        Close("p", "gd0"),
        device_info("p", "gd0b", out={"num_irqs": 5}),
    ], doc="SPEC 3.2: open_count++"),
    Scenario("group-device-fd-info", DUAL, BOTH, [
        *group_container(bdfs=(F0,)),
        get_device_fd("p", "g0", F0, save_fd="gd0"),
        device_info("p", "gd0", argsz=16, out={"num_regions": 9, "num_irqs": 5}),
        device_info("p", "gd0", argsz=15, err=E.EINVAL),
    ], doc="SPEC 3.7"),
    Scenario("group-device-fd-cdev-only-ioctls", DUAL, BOTH, [
        *group_container(bdfs=(F0,)),
        get_device_fd("p", "g0", F0, save_fd="gd0"),
        attach("p", "gd0", 1, err=E.ENOTTY),
        Ioctl("p", "gd0", IO.VFIO_DEVICE_DETACH_IOMMUFD_PT, S.VFIO_DEVICE_DETACH_IOMMUFD_PT,
              fields={"argsz": 8}, err=E.ENOTTY),
        Open("p", "iommu", "A"),
        bind("p", "gd0", "A", err=E.EINVAL),
    ], doc="SPEC 3.3 step 4, 3.4 step 3"),
    Scenario("group-unknown-ioctl-enotty", DUAL, BOTH, [
        Open("p", group_path(F0), "g"),
        Ioctl("p", "g", IO.VFIO_DEVICE_GET_INFO, S.VFIO_DEVICE_INFO, fields={"argsz": 24}, err=E.ENOTTY),
    ], doc="SPEC 3.2"),
    Scenario("group-with-iommufd-compat-ioas", DUAL, BOTH, [
        Open("p", "iommu", "A"), Open("p", group_path(F0), "g"),
        set_container("p", "g", "A"),
        vfio_ioas("p", "A", op=C.IOMMU_VFIO_IOAS_GET, out={"ioas_id": 1}),
        get_device_fd("p", "g", F0, save_fd="gd0"),
        device_info("p", "gd0", out={"num_irqs": 5}),
    ], doc="SPEC 3.2: iommufd creates the compat IOAS; GET_DEVICE_FD needs no SET_IOMMU"),
    Scenario("group-two-groups-one-container", DUAL, BOTH, [
        *group_container(bdfs=(F0, F1), names=("g13", "g14")),
        get_device_fd("p", "g13", F0, save_fd="gd0"),
        get_device_fd("p", "g14", F1, save_fd="gd1"),
        get_device_fd("p", "g13", F1, err=E.ENODEV),
    ]),
    Scenario("group-second-container-set-iommu", DUAL, BOTH, [
        Open("p", "vfio/vfio", "c1"), Open("p", "vfio/vfio", "c2"),
        Open("p", group_path(F0), "g13"), Open("p", group_path(F1), "g14"),
        set_container("p", "g13", "c1"), set_container("p", "g14", "c2"),
        set_iommu("p", "c1"), set_iommu("p", "c2"),
        get_device_fd("p", "g13", F0, save_fd="gd0"),
        get_device_fd("p", "g14", F1, save_fd="gd1"),
    ]),
    Scenario("group-close-releases-ownership", SHARED, BOTH, [
        *group_container("q", bdfs=(F0,)),
        get_device_fd("q", "g0", F0, save_fd="qd0"),
        Exit("q"),
        Open("p", "iommu", "A"), Open("p", cdev_path(F1), "d1"),
        bind("p", "d1", "A", devid=1),
    ]),
    Scenario("group-container-exit-then-reopen", DUAL, BOTH, [
        *group_container("q", bdfs=(F0,)),
        Exit("q"),
        *group_container("p", bdfs=(F0,)),
        get_device_fd("p", "g0", F0, save_fd="gd0"),
    ]),
    Scenario("group-device-read-config", DUAL, BOTH, [
        *group_container(bdfs=(F0,)),
        get_device_fd("p", "g0", F0, save_fd="gd0"),
        Read("p", "gd0", C.VFIO_PCI_INDEX_TO_OFFSET(C.VFIO_PCI_CONFIG_REGION_INDEX), 4),
    ]),
    Scenario("cdev-unbound-read-einval", DUAL, BOTH, [
        Open("p", cdev_path(F0), "d0"),
        Read("p", "d0", C.VFIO_PCI_INDEX_TO_OFFSET(C.VFIO_PCI_CONFIG_REGION_INDEX), 4, err=E.EINVAL),
    ], doc="SPEC 3.3 step 2: read before BIND -> EINVAL"),
]
