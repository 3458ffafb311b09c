"""SPEC 4.4: mutual exclusion between the group path, the cdev path, several
iommufd contexts and host drivers, with the exact errnos."""

from __future__ import annotations

import errno as E

from fakedev.uapi import consts as C
from tests.kernel.harness import (
    BOTH,
    Close,
    Exit,
    Open,
    Scenario,
    attach,
    bind,
    cdev_path,
    get_device_fd,
    group_path,
    group_status,
    host_driver,
    ioas_alloc,
    set_container,
)
from tests.kernel.scenarios.common import DUAL, F0, F1, HOSTSIB, SHARED, cdev_bound, group_container

VIABLE = C.VFIO_GROUP_FLAGS_VIABLE
CSET = C.VFIO_GROUP_FLAGS_CONTAINER_SET

SCENARIOS: list[Scenario] = []

for topo in (DUAL, SHARED):
    t = "dual" if topo == DUAL else "shared"
    SCENARIOS += [
        Scenario(f"excl-{t}-group-open-while-cdev-bound", topo, BOTH, [
            *cdev_bound(),
            Open("q", group_path(F0), "g", err=E.EBUSY),
            Open("p", group_path(F0), "g", err=E.EBUSY),
        ], doc="SPEC 4.4 row 1"),
        Scenario(f"excl-{t}-group-open-while-cdev-open-unbound-ok", topo, BOTH, [
            Open("p", cdev_path(F0), "d0"),
            Open("q", group_path(F0), "g"),
        ], doc="SPEC 4.4: blocking happens at BIND, not at cdev open"),
        Scenario(f"excl-{t}-bind-while-group-open", topo, BOTH, [
            Open("q", group_path(F0), "g"),
            Open("p", "iommu", "A"), Open("p", cdev_path(F0), "d0"),
            bind("p", "d0", "A", err=E.EBUSY),
        ], doc="SPEC 4.4 row 2"),
        Scenario(f"excl-{t}-bind-after-group-close", topo, BOTH, [
            Open("q", group_path(F0), "g"),
            Open("p", "iommu", "A"), Open("p", cdev_path(F0), "d0"),
            bind("p", "d0", "A", err=E.EBUSY),
            Close("q", "g"),
            bind("p", "d0", "A", devid=1),
        ]),
        Scenario(f"excl-{t}-bind-after-group-holder-exits", topo, BOTH, [
            *group_container("q", bdfs=(F0,)),
            get_device_fd("q", "g0", F0, save_fd="qd"),
            Open("p", "iommu", "A"), Open("p", cdev_path(F0), "d0"),
            bind("p", "d0", "A", err=E.EBUSY),
            Exit("q"),
            bind("p", "d0", "A", devid=1),
        ]),
        Scenario(f"excl-{t}-group-device-fd-keeps-group-blocked", topo, BOTH, [
            *group_container("q", bdfs=(F0,)),
            get_device_fd("q", "g0", F0, save_fd="qd"),
            Close("q", "g0"),
            Open("p", "iommu", "A"), Open("p", cdev_path(F0), "d0"),
            bind("p", "d0", "A", err=E.EBUSY),
            Open("r", group_path(F0), "g", err=E.EBUSY),
            Close("q", "qd"),
            bind("p", "d0", "A", devid=1),
        ], doc="SPEC 3.2: container device fds hold the group file"),
        Scenario(f"excl-{t}-second-group-open", topo, BOTH, [
            Open("p", group_path(F0), "g"),
            Open("p", group_path(F0), "g2", err=E.EBUSY),
            Open("q", group_path(F0), "g3", err=E.EBUSY),
            Close("p", "g"),
            Open("q", group_path(F0), "g3"),
        ], doc="SPEC 4.4: single opener"),
        Scenario(f"excl-{t}-second-cdev-fd-bind-einval", topo, BOTH, [
            *cdev_bound(),
            Open("p", cdev_path(F0), "d0b"),
            bind("p", "d0b", "A", err=E.EINVAL),
            Open("q", "iommu", "B"), Open("q", cdev_path(F0), "d0q"),
            bind("q", "d0q", "B", err=E.EINVAL),
            Close("p", "d0"),
            bind("q", "d0q", "B", devid=1),
        ], doc="SPEC 4.2: single open for the cdev path (open_count != 0 -> EINVAL)"),
        Scenario(f"excl-{t}-rebind-same-fd-einval", topo, BOTH, [
            *cdev_bound(),
            bind("p", "d0", "A", err=E.EINVAL),
            Open("p", "iommu", "B"),
            bind("p", "d0", "B", err=E.EINVAL),
        ], doc="SPEC 3.4 step 5"),
        Scenario(f"excl-{t}-unbound-cdev-other-ioctls-einval", topo, BOTH, [
            Open("p", "iommu", "A"), Open("p", cdev_path(F0), "d0"),
            attach("p", "d0", 1, err=E.EINVAL),
            ioas_alloc("p", "A", ioas=1),
            attach("p", "d0", 1, err=E.EINVAL),
        ], doc="SPEC 3.3 step 2"),
        Scenario(f"excl-{t}-group-status-viable", topo, BOTH, [
            *group_container(bdfs=(F0,), iommu=False),
            group_status("p", "g0", flags=VIABLE | CSET),
        ], doc="SPEC 3.2 GET_STATUS"),
    ]

SCENARIOS += [
    Scenario("excl-shared-two-iommufds-eperm", SHARED, BOTH, [
        *cdev_bound(),
        Open("q", "iommu", "B"), Open("q", cdev_path(F1), "d1"),
        bind("q", "d1", "B", err=E.EPERM),
        Close("p", "d0"),
        bind("q", "d1", "B", devid=1),
    ], doc="SPEC 4.4 row 5"),
    Scenario("excl-shared-same-iommufd-ok", SHARED, BOTH, [
        *cdev_bound(),
        Open("p", cdev_path(F1), "d1"),
        bind("p", "d1", "A", devid=2),
    ], doc="SPEC 4.4: same iommufd, owner_cnt++"),
    Scenario("excl-shared-same-iommufd-other-process", SHARED, BOTH, [
        *cdev_bound(),
        Open("q", cdev_path(F1), "d1"),
        bind("q", "d1", 99, err=E.EBADF),
        bind("q", "d1", 3, err=E.EBADFD),
    ], doc="another process cannot name p's iommufd (q's fd 3 is its own cdev)"),
    Scenario("excl-shared-group-path-then-other-func-bind", SHARED, BOTH, [
        *group_container("q", bdfs=(F0,)),
        get_device_fd("q", "g0", F0, save_fd="qd"),
        Open("p", "iommu", "A"), Open("p", cdev_path(F1), "d1"),
        bind("p", "d1", "A", err=E.EBUSY),
    ], doc="the group file of F1's group is open -> EBUSY"),
    Scenario("excl-shared-get-device-fd-both-funcs", SHARED, BOTH, [
        *group_container(bdfs=(F0,)),
        get_device_fd("p", "g0", F0, save_fd="gd0"),
        get_device_fd("p", "g0", F1, save_fd="gd1"),
        get_device_fd("p", "g0", F0, save_fd="gd0b"),
    ], doc="SPEC 3.2: the device may be opened several times through the group"),
    Scenario("excl-dual-other-group-unaffected", DUAL, BOTH, [
        *cdev_bound(),
        Open("q", group_path(F1), "g14"),
        Open("q", "vfio/vfio", "c"),
        set_container("q", "g14", "c"),
        group_status("q", "g14", flags=VIABLE | CSET),
    ]),
    Scenario("excl-dual-two-iommufds-ok", DUAL, BOTH, [
        *cdev_bound(),
        Open("q", "iommu", "B"), Open("q", cdev_path(F1), "d1"),
        bind("q", "d1", "B", devid=1),
    ], doc="different iommu groups may use different iommufds"),
    Scenario("excl-hostsib-group-viable", HOSTSIB, BOTH, [
        Open("p", group_path(F0), "g13"),
        group_status("p", "g13", flags=VIABLE),
    ], doc="with ACS the host-driven sibling is in another group"),
]

_HOST_F1 = host_driver(F1)
SCENARIOS += [
    Scenario("excl-shared-host-sibling-bind-eperm", SHARED, BOTH, [
        Open("p", "iommu", "A"), Open("p", cdev_path(F0), "d0"),
        bind("p", "d0", "A", err=E.EPERM),
    ], tweak=_HOST_F1, doc="SPEC 4.4 row 6: a host driver owns the group"),
    Scenario("excl-shared-host-sibling-set-container-eperm", SHARED, BOTH, [
        Open("p", "vfio/vfio", "c"), Open("p", group_path(F0), "g"),
        group_status("p", "g", flags=0),
        set_container("p", "g", "c", err=E.EPERM),
        group_status("p", "g", flags=0),
    ], tweak=_HOST_F1, doc="SPEC 4.4 rows 7 and 9"),
    Scenario("excl-shared-host-sibling-set-container-iommufd-ok", SHARED, BOTH, [
        Open("p", "iommu", "A"), Open("p", group_path(F0), "g"),
        set_container("p", "g", "A"),
        get_device_fd("p", "g", F0, err=E.EPERM),
    ], tweak=_HOST_F1, doc="SPEC 3.2: with an iommufd ownership is claimed at GET_DEVICE_FD"),
]
