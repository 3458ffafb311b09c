"""Lifetimes across fds, processes and paths: dup'ed fds, container and group
teardown, mixed cdev/group users of one dev_set, iommufd option/compat
objects, and "nothing left" after exit (SPEC 3.2, 4.2, 4.3, 4.7)."""

from __future__ import annotations

import errno as E

from fakedev.uapi import consts as C
from tests.kernel.harness import (
    BOTH,
    Alive,
    Close,
    Dup,
    Exit,
    Lazy,
    MarkResets,
    NewProc,
    NoResets,
    NothingLeft,
    Open,
    Resets,
    Scenario,
    attach,
    bind,
    cdev_path,
    destroy,
    detach,
    entry,
    feature,
    gentry,
    get_device_fd,
    group_path,
    hot_reset,
    hot_reset_info,
    ioas_alloc,
    ioas_map,
    ioas_unmap,
    iova_ranges,
    option,
    set_container,
    set_iommu,
    unset_container,
    vfio_ioas,
)
from tests.kernel.scenarios.common import (
    DUAL,
    F0,
    F1,
    NOT_OWNED,
    SHARED,
    cdev_bound,
    group_container,
)


def _buf(size: int) -> Lazy:
    """A freshly mapped buffer of process p (real pages, so pinning succeeds)."""
    return Lazy(lambda w: w.proc("p").alloc(size), f"buffer({size:#x})")


RW_FIXED = C.IOMMU_IOAS_MAP_READABLE | C.IOMMU_IOAS_MAP_WRITEABLE | C.IOMMU_IOAS_MAP_FIXED_IOVA

SCENARIOS: list[Scenario] = [
    Scenario("life-dup-bound-cdev", DUAL, BOTH, [
        *cdev_bound(),
        Dup("p", "d0", "d0b"),
        Close("p", "d0"),
        hot_reset_info("p", "d0b", argsz=28, count=2, out_flags=1),
        Open("q", group_path(F0), "g", err=E.EBUSY),
        Close("p", "d0b"),
        Open("q", group_path(F0), "g"),
    ], doc="release runs at the last close of the open file, not of one fd"),
    Scenario("life-dup-iommufd-close-both", DUAL, BOTH, [
        *cdev_bound(), Dup("p", "A", "A2"), Close("p", "A"),
        ioas_alloc("p", "A2", ioas=2), Close("p", "A2"),
        attach("p", "d0", 2, pt_out=3),
        Alive(1),
        Close("p", "d0"),
        Alive(0), NothingLeft(),
    ], doc="SPEC 4.2: the context dies with its last reference"),
    Scenario("life-exit-nothing-left", SHARED, BOTH, [
        *cdev_bound(), ioas_alloc("p", "A", ioas=2), attach("p", "d0", 2, pt_out=3),
        ioas_map("p", "A", 2, iova=0x100000, user_va=_buf(0x1000), length=0x1000),
        Open("p", cdev_path(F1), "d1"), bind("p", "d1", "A", devid=4),
        *group_container("q", bdfs=(), iommu=False),
        Exit("p"), Exit("q"),
        NothingLeft(), Alive(0),
    ]),
    Scenario("life-group-exit-nothing-left", DUAL, BOTH, [
        *group_container(bdfs=(F0, F1), names=("g13", "g14")),
        get_device_fd("p", "g13", F0, save_fd="gd0"), get_device_fd("p", "g14", F1, save_fd="gd1"),
        Close("p", "g13"), Close("p", "g14"), Close("p", "c"),
        Open("q", group_path(F0), "x", err=E.EBUSY),
        Exit("p"),
        NothingLeft(),
        Open("q", group_path(F0), "x"),
    ], doc="SPEC 3.2: device fds keep the group (and its container) alive"),
    Scenario("life-container-fd-closed-group-keeps-it", DUAL, BOTH, [
        *group_container(bdfs=(F0,)),
        Close("p", "c"),
        get_device_fd("p", "g0", F0, save_fd="gd0"),
        hot_reset_info("p", "gd0", argsz=28, count=2, entries=[gentry(F0), gentry(F1)]),
    ], doc="the group holds the container; SET_IOMMU survives the container fd"),
    Scenario("life-second-group-joins-set-container", DUAL, BOTH, [
        *group_container(bdfs=(F0,), names=("g13",)),
        Open("p", group_path(F1), "g14"),
        set_container("p", "g14", "c"),
        get_device_fd("p", "g14", F1, save_fd="gd1"),
        set_iommu("p", "c", err=E.EINVAL),
    ], doc="SPEC 3.1: a group joining a container with a driver is attached to it"),
    Scenario("life-unset-last-group-drops-driver", DUAL, BOTH, [
        *group_container(bdfs=(F0,)),
        unset_container("p", "g0"),
        set_container("p", "g0", "c"),
        get_device_fd("p", "g0", F0, err=E.EINVAL),
        set_iommu("p", "c"),
        get_device_fd("p", "g0", F0, save_fd="gd0"),
    ], doc="SPEC 3.2: the last group of a container releases the IOMMU driver"),
    Scenario("life-unset-one-of-two-groups", DUAL, BOTH, [
        *group_container(bdfs=(F0, F1), names=("g13", "g14")),
        unset_container("p", "g14"),
        get_device_fd("p", "g13", F0, save_fd="gd0"),
        get_device_fd("p", "g14", F1, err=E.EINVAL),
    ]),
    Scenario("life-mixed-cdev-and-group-users", DUAL, BOTH, [
        *cdev_bound(),
        *group_container("q", bdfs=(F1,), names=("g14",)),
        get_device_fd("q", "g14", F1, save_fd="qd1"),
        hot_reset_info("p", "d0", argsz=28, count=2, out_flags=1,
                       entries=[entry(1, F0), entry(NOT_OWNED, F1)]),
        hot_reset_info("q", "qd1", argsz=28, count=2, out_flags=0, entries=[gentry(F0), gentry(F1)]),
        MarkResets(),
        hot_reset("p", "d0", [], err=E.EINVAL),
        hot_reset("q", "qd1", ["g14"], err=E.EINVAL),
        Open("q", group_path(F0), "g13", err=E.EBUSY),
        NoResets(),
        Close("p", "d0"), NoResets(),
        Open("q", group_path(F0), "g13"),
        set_container("q", "g13", "c"),
        hot_reset("q", "qd1", ["g13", "g14"]), Resets(F0, F1),
    ], doc="a dev_set split between a cdev user and a group user cannot be reset by either"),
    Scenario("life-group-iommufd-backed-hot-reset", DUAL, BOTH, [
        Open("p", "iommu", "A"),
        Open("p", group_path(F0), "g13"), Open("p", group_path(F1), "g14"),
        set_container("p", "g13", "A"), set_container("p", "g14", "A"),
        get_device_fd("p", "g13", F0, save_fd="gd0"),
        hot_reset_info("p", "gd0", argsz=28, count=2, out_flags=0, entries=[gentry(F0), gentry(F1)]),
        hot_reset("p", "gd0", [], err=E.EINVAL),
        MarkResets(),
        hot_reset("p", "gd0", ["g13", "g14"]), Resets(F0, F1),
    ], doc="a group-opened device is not cdev-opened even with an iommufd behind the group"),
    Scenario("life-compat-ioas-destroy", DUAL, BOTH, [
        Open("p", "iommu", "A"), Open("p", group_path(F0), "g"),
        set_container("p", "g", "A"),
        vfio_ioas("p", "A", op=C.IOMMU_VFIO_IOAS_GET, out={"ioas_id": 1}),
        get_device_fd("p", "g", F0, save_fd="gd0"),
        destroy("p", "A", 1, err=E.EBUSY),
        Close("p", "gd0"),
        destroy("p", "A", 1),
        vfio_ioas("p", "A", op=C.IOMMU_VFIO_IOAS_GET, err=E.ENODEV),
    ], doc="SPEC 3.10: destroying the compat IOAS clears it; busy while a device is attached"),
    Scenario("life-option-rlimit-set-busy-and-eperm", DUAL, BOTH, [
        Open("p", "iommu", "A"), ioas_alloc("p", "A", ioas=1),
        option("p", "A", option_id=C.IOMMU_OPTION_RLIMIT_MODE, op=C.IOMMU_OPTION_OP_SET, val64=1, err=E.EBUSY),
        NewProc("u", caps=frozenset()), Open("u", "iommu", "U"),
        option("u", "U", option_id=C.IOMMU_OPTION_RLIMIT_MODE, op=C.IOMMU_OPTION_OP_SET, val64=1, err=E.EPERM),
        option("u", "U", option_id=C.IOMMU_OPTION_RLIMIT_MODE, op=C.IOMMU_OPTION_OP_GET, out={"val64": 0}),
    ], doc="SPEC 3.17: SET needs CAP_SYS_RESOURCE and an empty context"),
    Scenario("life-iova-alignment-after-attach", DUAL, BOTH, [
        *cdev_bound(), ioas_alloc("p", "A", ioas=2),
        iova_ranges("p", "A", 2, err=E.EMSGSIZE, out={"out_iova_alignment": 1}),
        attach("p", "d0", 2, pt_out=3),
        iova_ranges("p", "A", 2, err=E.EMSGSIZE, out={"out_iova_alignment": 4096}),
        ioas_map("p", "A", 2, iova=0x100000, length=0x800, err=E.EINVAL),
        detach("p", "d0"),
        iova_ranges("p", "A", 2, err=E.EMSGSIZE, out={"out_iova_alignment": 1}),
    ], doc="SPEC 3.12: a domain raises the IOVA alignment to the IOMMU page size"),
    Scenario("life-attach-reserved-msi-window-conflict", DUAL, BOTH, [
        *cdev_bound(), ioas_alloc("p", "A", ioas=2),
        ioas_map("p", "A", 2, iova=0xFEE00000, user_va=0x200000, length=0x1000),
        attach("p", "d0", 2, err=E.EADDRINUSE),
    ], doc="SPEC 3.5/3.12: x86 MSI window 0xfee00000-0xfeefffff is reserved by an attached device"),
    Scenario("life-feature-vf-token-not-pf", DUAL, BOTH, [
        *cdev_bound(),
        feature("p", "d0", C.VFIO_DEVICE_FEATURE_PROBE | C.VFIO_DEVICE_FEATURE_SET
                | C.VFIO_DEVICE_FEATURE_PCI_VF_TOKEN, err=E.ENOTTY),
    ], doc="SPEC 3.9: VF token -> ENOTTY unless SR-IOV PF"),
    Scenario("life-two-processes-same-iommufd-via-dup", SHARED, BOTH, [
        *cdev_bound(), Close("p", "A"),
        Open("q", "iommu", "B"), Open("q", cdev_path(F1), "d1"),
        bind("q", "d1", "B", err=E.EPERM),
        Exit("p"),
        bind("q", "d1", "B", devid=1),
        hot_reset_info("q", "d1", argsz=28, count=2, out_flags=3, entries=[entry(0, F0), entry(1, F1)]),
    ]),
    Scenario("life-cdev-bound-then-ioas-map-pins", DUAL, BOTH, [
        *cdev_bound(), ioas_alloc("p", "A", ioas=2), attach("p", "d0", 2, pt_out=3),
        ioas_map("p", "A", 2, iova=0x100000, user_va=0x7F0000000000, length=0x1000, err=E.EFAULT),
    ], doc="SPEC 3.14: with a domain the pages are pinned; an unmapped user_va faults"),
]

SCENARIOS += [
    Scenario("life-cross-path-same-iommufd-hot-reset", DUAL, BOTH, [
        Open("p", "iommu", "A"),
        Open("p", group_path(F1), "g14"), set_container("p", "g14", "A"),
        get_device_fd("p", "g14", F1, save_fd="gd1"),
        Open("p", cdev_path(F0), "d0"), bind("p", "d0", "A", devid=4),
        hot_reset_info("p", "d0", argsz=28, count=2, out_flags=3, entries=[entry(4, F0), entry(2, F1)]),
        hot_reset("p", "gd1", ["g14"], err=E.EINVAL),
        MarkResets(),
        hot_reset("p", "d0", []), Resets(F0, F1),
    ], doc="vfio_iommufd_get_dev_id: a group-opened device bound (GET_DEVICE_FD) to the caller's iommufd "
           "reports its devid (compat IOAS 1, device 2, auto hwpt 3, cdev devid 4) and counts as owned"),
]

SCENARIOS += [
    Scenario("life-attach-pins-existing-mappings", DUAL, BOTH, [
        *cdev_bound(), ioas_alloc("p", "A", ioas=2),
        ioas_map("p", "A", 2, iova=0x100000, user_va=0x7F0000000000, length=0x1000),
        attach("p", "d0", 2, err=E.EFAULT),
        ioas_alloc("p", "A", ioas=3),
    ], doc="iopt_table_add_domain fills the new domain from the existing areas, pinning their pages: an "
           "unmapped user_va fails the attach with EFAULT (and the auto hwpt is aborted)"),
    Scenario("life-map-with-domain-real-buffer", DUAL, BOTH, [
        *cdev_bound(), ioas_alloc("p", "A", ioas=2), attach("p", "d0", 2, pt_out=3),
        ioas_map("p", "A", 2, iova=0x100000, user_va=_buf(0x2000), length=0x2000),
        ioas_unmap("p", "A", 2, iova=0x100000, length=0x2000, out={"length": 0x2000}),
    ]),
]

SCENARIOS += [
    Scenario("life-get-device-fd-no-compat-ioas-unwind-resets", DUAL, BOTH, [
        Open("p", "iommu", "A"), Open("p", group_path(F0), "g"),
        set_container("p", "g", "A"),
        destroy("p", "A", 1),
        MarkResets(),
        get_device_fd("p", "g", F0, err=E.ENODEV),
        Resets(F0, F1),
        ioas_alloc("p", "A", ioas=1),
    ], doc="vfio_df_group_open: the device is opened, the compat IOAS attach fails (ENODEV), and the "
           "vfio_df_close unwind closes it again: the last close of the dev_set resets the bus"),
]

SCENARIOS += [
    Scenario("life-get-device-fd-without-fd-install", DUAL, BOTH, [
        NewProc("n", no_fd_install=True),
        *group_container("n", bdfs=(F0,)),
        get_device_fd("n", "g0", F0, err=E.ENOTTY),
        unset_container("n", "g0"),
        Exit("n"),
        NothingLeft(),
        *cdev_bound("q"),
    ], doc="Task.fd_install contract: where no fd can be created the call fails ENOTTY and the model "
           "drops the device file (no open device, no group reference left)"),
]
