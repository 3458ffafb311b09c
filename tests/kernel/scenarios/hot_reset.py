"""Hot reset, every outcome on both paths and both INFO versions (SPEC 4.5-4.7)."""

from __future__ import annotations

import errno as E

from fakedev.uapi import consts as C
from tests.kernel.harness import (
    BOTH,
    UNTOUCHED,
    V66,
    V612,
    Close,
    Exit,
    MarkResets,
    NoResets,
    Open,
    Resets,
    Scenario,
    SetHook,
    bind,
    cdev_path,
    device_info,
    device_reset,
    entry,
    gentry,
    group_path,
    hot_reset,
    hot_reset_info,
    ioas_alloc,
)
from tests.kernel.scenarios.common import (
    DUAL,
    F0,
    F1,
    FLR,
    HOSTSIB,
    HOTPLUG,
    NOT_OWNED,
    OWNED,
    ROOT,
    SHARED,
    cdev_bound,
    group_container,
    group_device,
)

R0 = "0000:00:02.0"  # root-bus device
L0 = "0000:02:00.0"  # flr-device
H0, H1 = "0000:05:00.0", "0000:05:00.1"  # hotplug-slot

INT_MAX = 0x7FFFFFFF


def _both_bound() -> list:
    return [*cdev_bound(devid=1), Open("p", cdev_path(F1), "d1"), bind("p", "d1", "A", devid=2)]


def _group2() -> list:
    return [*group_container(bdfs=(F0, F1), names=("g13", "g14")), *group_device(grp="g13")]


SCENARIOS: list[Scenario] = [
    # -- cdev path ------------------------------------------------------
    Scenario("hr-cdev-count-nonzero-einval", DUAL, BOTH, [
        *_both_bound(), MarkResets(),
        hot_reset("p", "d0", [], count=1, argsz=16, err=E.EINVAL),
        hot_reset("p", "d0", [], count=2, argsz=12, err=E.EINVAL),
        NoResets(),
    ], doc="SPEC 4.7 step 2: a cdev caller must pass count 0"),
    Scenario("hr-cdev-zero-length-success-resets-all", DUAL, BOTH, [
        *_both_bound(), MarkResets(),
        hot_reset("p", "d0", [], argsz=12), Resets(F0, F1),
    ], doc="SPEC 4.7 step 5"),
    Scenario("hr-cdev-argsz-large-ok", DUAL, BOTH, [
        *_both_bound(), MarkResets(),
        hot_reset("p", "d0", [], argsz=4096, buflen=4096), Resets(F0, F1),
    ]),
    Scenario("hr-cdev-other-ctx-not-owned", DUAL, BOTH, [
        *cdev_bound(devid=1),
        Open("q", "iommu", "B"), Open("q", cdev_path(F1), "d1"), bind("q", "d1", "B", devid=1),
        MarkResets(),
        hot_reset("p", "d0", [], err=E.EINVAL),
        hot_reset("q", "d1", [], err=E.EINVAL),
        NoResets(),
    ], doc="SPEC 4.7: a dev_set member bound to another iommufd is not owned"),
    Scenario("hr-cdev-shared-group-unopened-sibling-owned", SHARED, BOTH, [
        *cdev_bound(devid=1), MarkResets(),
        hot_reset("p", "d0", []), Resets(F0, F1),
    ], doc="SPEC 4.7: unopened device in a group with a device bound to the ctx counts as owned"),
    Scenario("hr-cdev-shared-group-info-both-bound", SHARED, BOTH, [
        *cdev_bound(devid=1), Open("p", cdev_path(F1), "d1"), bind("p", "d1", "A", devid=2),
        hot_reset_info("p", "d1", argsz=28, count=2, out_flags=3, entries=[entry(1, F0), entry(2, F1)]),
    ]),
    Scenario("hr-cdev-info-after-sibling-unbind", DUAL, BOTH, [
        *_both_bound(),
        Close("p", "d1"),
        hot_reset_info("p", "d0", argsz=28, count=2, out_flags=1,
                       entries=[entry(1, F0), entry(NOT_OWNED, F1)]),
        hot_reset("p", "d0", [], err=E.EINVAL),
    ]),
    Scenario("hr-cdev-info-sibling-other-ctx", SHARED, BOTH, [
        *cdev_bound(devid=1),
        hot_reset_info("p", "d0", argsz=28, count=2, out_flags=3, entries=[entry(1, F0), entry(OWNED, F1)]),
        Close("p", "d0"),
        Open("p", cdev_path(F1), "d1"), bind("p", "d1", "A", devid=1),
        hot_reset_info("p", "d1", argsz=28, count=2, out_flags=3, entries=[entry(OWNED, F0), entry(1, F1)]),
    ]),
    Scenario("hr-cdev-unbound-fd-einval", DUAL, BOTH, [
        Open("p", cdev_path(F0), "d0"),
        hot_reset_info("p", "d0", argsz=28, err=E.EINVAL),
        hot_reset("p", "d0", [], err=E.EINVAL),
    ], doc="SPEC 3.3 step 2"),
    Scenario("hr-cdev-info-argsz-11", DUAL, BOTH, [
        *cdev_bound(), hot_reset_info("p", "d0", argsz=11, err=E.EINVAL),
    ]),
    Scenario("hr-cdev-flr-device-alone", FLR, BOTH, [
        *cdev_bound(bdf=L0, devid=1),
        hot_reset_info("p", "d0", argsz=28, count=1, out_flags=3, entries=[entry(1, L0), UNTOUCHED]),
        MarkResets(),
        hot_reset("p", "d0", []), Resets(L0),
    ], doc="single function behind a root port: bus reset of one"),
    Scenario("hr-hotplug-slot-cdev", HOTPLUG, BOTH, [
        *cdev_bound(bdf=H0, devid=1),
        hot_reset_info("p", "d0", argsz=28, count=2, out_flags=1,
                       entries=[entry(1, H0), entry(NOT_OWNED, H1)]),
        hot_reset("p", "d0", [], err=E.EINVAL),
        Open("p", cdev_path(H1), "d1"), bind("p", "d1", "A", devid=2),
        hot_reset_info("p", "d0", argsz=28, count=2, out_flags=3, entries=[entry(1, H0), entry(2, H1)]),
        MarkResets(),
        hot_reset("p", "d1", []), Resets(H0, H1),
    ], doc="SPEC 4.5: dev_set keyed by the slot"),
    Scenario("hr-hotplug-slot-group", HOTPLUG, BOTH, [
        *group_container(bdfs=(H0, H1), names=("g30", "g31")),
        *group_device(bdf=H0, grp="g30"),
        hot_reset_info("p", "gd0", argsz=28, count=2, out_flags=0, entries=[entry(30, H0), entry(31, H1)]),
        hot_reset("p", "gd0", ["g30"], err=E.EINVAL),
        MarkResets(),
        hot_reset("p", "gd0", ["g31", "g30"]), Resets(H0, H1),
    ]),
    # -- root bus: ENODEV ----------------------------------------------
    Scenario("hr-root-bus-cdev-enodev", ROOT, BOTH, [
        *cdev_bound(bdf=R0, devid=1),
        hot_reset_info("p", "d0", argsz=28, err=E.ENODEV),
        hot_reset("p", "d0", [], err=E.ENODEV),
        hot_reset("p", "d0", [], count=1, argsz=16, err=E.EINVAL),
        hot_reset("p", "d0", [], flags=1, err=E.EINVAL),
    ], doc="SPEC 4.5, 4.7: count/cdev check and flags before the -ENODEV probe"),
    Scenario("hr-root-bus-group-enodev", ROOT, BOTH, [
        *group_container(bdfs=(R0,), names=("g1",)),
        *group_device(bdf=R0, grp="g1"),
        hot_reset_info("p", "gd0", argsz=28, err=E.ENODEV),
        hot_reset("p", "gd0", ["g1"], err=E.ENODEV),
        hot_reset("p", "gd0", [], err=E.EINVAL),
    ]),
    Scenario("hr-root-bus-info-argsz-before-enodev", ROOT, BOTH, [
        *cdev_bound(bdf=R0, devid=1),
        hot_reset_info("p", "d0", argsz=8, err=E.EINVAL),
    ]),
    # -- host driver on the bus -----------------------------------------
    Scenario("hr-host-sibling-group-path-count-2", HOSTSIB, BOTH, [
        *group_container(bdfs=(F0,), names=("g13",)),
        *group_device(grp="g13"),
        hot_reset("p", "gd0", ["g13", "g13"], err=E.EINVAL),
        hot_reset("p", "gd0", ["g13", "g13", "g13"], err=E.EINVAL),
    ]),
    # -- group path ------------------------------------------------------
    Scenario("hr-group-count-0-einval", DUAL, BOTH, [
        *_group2(), hot_reset("p", "gd0", [], argsz=12, err=E.EINVAL),
    ], doc="SPEC 4.7 step 2: a group-opened caller must pass count > 0"),
    Scenario("hr-group-count-gt-ndev", DUAL, BOTH, [
        *_group2(),
        hot_reset("p", "gd0", ["g13", "g14", "g13"], err=E.EINVAL),
        hot_reset("p", "gd0", [], count=3, argsz=12, err=E.EINVAL),
        hot_reset("p", "gd0", [], count=1000, argsz=12, err=E.EINVAL),
    ], doc="SPEC 4.7: count > ndev -> EINVAL (before the array is read)"),
    Scenario("hr-group-count-gt-intmax-6.6-enomem", DUAL, V66, [
        *_group2(),
        hot_reset("p", "gd0", [], count=INT_MAX + 1, argsz=12, err=E.ENOMEM),
        hot_reset("p", "gd0", [], count=0xFFFFFFFF, argsz=12, err=E.ENOMEM),
    ], doc="SPEC 4.7: int array_count, negative passes the check, kcalloc fails"),
    Scenario("hr-group-count-gt-intmax-6.12-einval", DUAL, V612, [
        *_group2(),
        hot_reset("p", "gd0", [], count=INT_MAX + 1, argsz=12, err=E.EINVAL),
        hot_reset("p", "gd0", [], count=0xFFFFFFFF, argsz=12, err=E.EINVAL),
    ], doc="SPEC 4.7: u32 array_count from 6.12"),
    Scenario("hr-group-count-intmax-einval", DUAL, BOTH, [
        *_group2(),
        hot_reset("p", "gd0", [], count=INT_MAX, argsz=12, err=E.EINVAL),
    ]),
    Scenario("hr-group-missing-group", DUAL, BOTH, [
        *_group2(), MarkResets(),
        hot_reset("p", "gd0", ["g14"], err=E.EINVAL),
        hot_reset("p", "gd0", ["g13", "g13"], err=E.EINVAL),
        NoResets(),
    ], doc="SPEC 4.7: every dev_set member must be covered by a supplied group"),
    Scenario("hr-group-success-from-either-device", DUAL, BOTH, [
        *_group2(), *group_device(bdf=F1, grp="g14", dev="gd1"),
        MarkResets(),
        hot_reset("p", "gd1", ["g13", "g14"]), Resets(F0, F1),
        hot_reset("p", "gd0", ["g14", "g13"]), Resets(F0, F1),
    ]),
    Scenario("hr-group-unopened-sibling-reset", DUAL, BOTH, [
        *_group2(), MarkResets(),
        hot_reset("p", "gd0", ["g13", "g14"]), Resets(F0, F1),
    ], doc="SPEC 4.7: 01:00.1 is not opened but is reset"),
    Scenario("hr-group-fd-of-other-process-group", DUAL, BOTH, [
        *group_container(bdfs=(F0,), names=("g13",)), *group_device(grp="g13"),
        Open("q", group_path(F1), "g14q"),
        hot_reset("p", "gd0", ["g13", 4], err=E.EINVAL),
    ], doc="fd 4 in p is its group-13 file; q's group 14 fd is not p's"),
    Scenario("hr-group-shared-one-group-fd", SHARED, BOTH, [
        *group_container(bdfs=(F0,), names=("g13",)), *group_device(grp="g13"),
        hot_reset_info("p", "gd0", argsz=28, count=2, out_flags=0, entries=[gentry(F0), gentry(F1)]),
        MarkResets(),
        hot_reset("p", "gd0", ["g13"]), Resets(F0, F1),
        hot_reset("p", "gd0", ["g13", "g13"]), Resets(F0, F1),
    ]),
    # -- memory_lock contention -----------------------------------------
    # -- silent reset at last close --------------------------------------
    Scenario("hr-last-close-resets-dev-set", DUAL, BOTH, [
        *_both_bound(), MarkResets(),
        Close("p", "d0"), NoResets(),
        Close("p", "d1"), Resets(F0, F1),
    ], doc="SPEC 4.5: vfio_pci_dev_set_try_reset on the last close of the set"),
    Scenario("hr-last-close-single-bound", DUAL, BOTH, [
        *cdev_bound(devid=1), MarkResets(),
        Close("p", "d0"), Resets(F0, F1),
    ], doc="no other device of the set is open: the bus is reset"),
    Scenario("hr-last-close-group-path", DUAL, BOTH, [
        *_group2(), MarkResets(),
        Close("p", "gd0"), Resets(F0, F1),
    ]),
    Scenario("hr-last-close-host-sibling-no-bus-reset", HOSTSIB, BOTH, [
        *cdev_bound(devid=1), MarkResets(),
        Close("p", "d0"), NoResets(),
    ], doc="a bus with a non-vfio device is not resettable"),
    Scenario("hr-last-close-process-exit", DUAL, BOTH, [
        *_both_bound(), MarkResets(),
        Exit("p"), Resets(F0, F1),
    ]),
    Scenario("hr-last-close-other-process-still-open", DUAL, BOTH, [
        *cdev_bound(devid=1),
        Open("q", "iommu", "B"), Open("q", cdev_path(F1), "d1"), bind("q", "d1", "B", devid=1),
        MarkResets(),
        Close("p", "d0"), NoResets(),
        Close("q", "d1"), Resets(F0, F1),
    ]),
]
SCENARIOS = [s for s in SCENARIOS if s is not None]

# INFO in every buffer size, both versions, both paths (SPEC 4.6 B vs C)
for argsz in (12, 13, 19, 20, 27):
    fits = (argsz - 12) // 8
    SCENARIOS += [
        Scenario(f"hr-info-enospc-cdev-{argsz}-6.6", DUAL, V66, [
            *cdev_bound(devid=1),
            hot_reset_info("p", "d0", argsz=argsz, buflen=28, err=E.ENOSPC, count=2, out_flags=3,
                           entries=[entry(1, F0), UNTOUCHED][:fits] + [UNTOUCHED] * (2 - fits)),
        ]),
        Scenario(f"hr-info-enospc-cdev-{argsz}-6.12", DUAL, V612, [
            *cdev_bound(devid=1),
            hot_reset_info("p", "d0", argsz=argsz, buflen=28, err=E.ENOSPC, count=2, out_flags=0,
                           entries=UNTOUCHED),
        ]),
        Scenario(f"hr-info-enospc-group-{argsz}-6.6", DUAL, V66, [
            *_group2(),
            hot_reset_info("p", "gd0", argsz=argsz, buflen=28, err=E.ENOSPC, count=2, out_flags=0,
                           entries=[gentry(F0), UNTOUCHED][:fits] + [UNTOUCHED] * (2 - fits)),
        ]),
        Scenario(f"hr-info-enospc-group-{argsz}-6.12", DUAL, V612, [
            *_group2(),
            hot_reset_info("p", "gd0", argsz=argsz, buflen=28, err=E.ENOSPC, count=2, out_flags=0,
                           entries=UNTOUCHED),
        ]),
    ]
SCENARIOS += [
    Scenario("hr-info-enospc-shared-owned-6.6", SHARED, V66, [
        *cdev_bound(devid=1),
        hot_reset_info("p", "d0", argsz=20, buflen=28, err=E.ENOSPC, count=2, out_flags=3,
                       entries=[entry(1, F0), UNTOUCHED]),
    ]),
    Scenario("hr-info-enospc-hostsib-6.6", HOSTSIB, V66, [
        *cdev_bound(devid=1),
        hot_reset_info("p", "d0", argsz=20, buflen=28, err=E.ENOSPC, count=2, out_flags=3,
                       entries=[entry(1, F0), UNTOUCHED]),
    ], doc="SPEC 4.6 B: the NOT_OWNED entry was never evaluated, flags stay 0x3"),
    Scenario("hr-info-enospc-hostsib-6.12", HOSTSIB, V612, [
        *cdev_bound(devid=1),
        hot_reset_info("p", "d0", argsz=20, buflen=28, err=E.ENOSPC, count=2, out_flags=0,
                       entries=UNTOUCHED),
    ]),
    Scenario("hr-info-enospc-second-device-caller-6.6", DUAL, V66, [
        *cdev_bound(devid=1),
        Open("q", "iommu", "B"), Open("q", cdev_path(F1), "d1"), bind("q", "d1", "B", devid=1),
        hot_reset_info("q", "d1", argsz=20, buflen=28, err=E.ENOSPC, count=2, out_flags=1,
                       entries=[entry(NOT_OWNED, F0), UNTOUCHED]),
    ], doc="SPEC 4.6 B: the first entry (01:00.0, bound elsewhere) was evaluated: NOT_OWNED clears OWNED"),
    Scenario("hr-info-enospc-second-device-caller-6.12", DUAL, V612, [
        *cdev_bound(devid=1),
        Open("q", "iommu", "B"), Open("q", cdev_path(F1), "d1"), bind("q", "d1", "B", devid=1),
        hot_reset_info("q", "d1", argsz=20, buflen=28, err=E.ENOSPC, count=2, out_flags=0,
                       entries=UNTOUCHED),
    ]),
]

# -- fault hooks: memory_lock contention, device lock, reset failure ------------
SCENARIOS += [
    Scenario("hr-cdev-memory-lock-contended-ebusy", DUAL, BOTH, [
        *_both_bound(), MarkResets(),
        SetHook("memory_lock_contended", {F1}),
        hot_reset("p", "d0", [], err=E.EBUSY),
        NoResets(),
        SetHook("memory_lock_contended", set()),
        hot_reset("p", "d0", []), Resets(F0, F1),
    ], doc="SPEC 4.7 step 4: any lock contention -> EBUSY, nothing reset"),
    Scenario("hr-cdev-memory-lock-contended-unopened-sibling", SHARED, BOTH, [
        *cdev_bound(devid=1), MarkResets(),
        SetHook("memory_lock_contended", {F1}),
        hot_reset("p", "d0", [], err=E.EBUSY),
        NoResets(),
    ], doc="every dev_set member is locked, opened or not"),
    Scenario("hr-group-memory-lock-contended-ebusy", DUAL, BOTH, [
        *_group2(), MarkResets(),
        SetHook("memory_lock_contended", {F0}),
        hot_reset("p", "gd0", ["g13", "g14"], err=E.EBUSY),
        NoResets(),
    ]),
    Scenario("hr-ownership-checked-before-memory-lock-6.6", DUAL, V66, [
        *cdev_bound(devid=1), MarkResets(),
        SetHook("memory_lock_contended", {F0}),
        hot_reset("p", "d0", [], err=E.EINVAL),
    ], doc="SPEC 4.7 (6.6-6.9): every device is proven owned (first pass) before any memory_lock"),
    Scenario("hr-memory-lock-per-device-in-loop-6.12", DUAL, V612, [
        *cdev_bound(devid=1), MarkResets(),
        SetHook("memory_lock_contended", {F0}),
        hot_reset("p", "d0", [], err=E.EBUSY),
    ], doc="later kernels: owned check and memory_lock trylock per device in one loop, 01:00.0 first"),
    Scenario("hr-not-owned-second-member-before-its-lock", DUAL, BOTH, [
        *cdev_bound(devid=1), MarkResets(),
        SetHook("memory_lock_contended", {F1}),
        hot_reset("p", "d0", [], err=E.EINVAL),
        NoResets(),
    ]),
    Scenario("hr-reset-errno-hook", DUAL, BOTH, [
        *_both_bound(), MarkResets(),
        SetHook("reset_errno", {F0: E.EIO}),
        hot_reset("p", "d0", [], err=E.EIO),
        SetHook("reset_errno", {}),
        hot_reset("p", "d0", []), Resets(F0, F1),
    ], doc="the result of pci_reset_bus is returned"),
    Scenario("device-reset-no-reset-method-einval", DUAL, BOTH, [
        *cdev_bound(devid=1), MarkResets(),
        device_reset("p", "d0", err=E.EINVAL),
        NoResets(),
    ], doc="SPEC 3.8 RESET: !reset_works -> EINVAL (multi-function bus, no FLR)"),
    Scenario("device-reset-flr", FLR, BOTH, [
        *cdev_bound(bdf=L0, devid=1), MarkResets(),
        device_reset("p", "d0"),
        Resets(L0),
        device_info("p", "d0", out={"flags": C.VFIO_DEVICE_FLAGS_PCI | C.VFIO_DEVICE_FLAGS_RESET}),
    ], doc="SPEC 3.8 RESET"),
    Scenario("device-reset-flr-device-lock-eagain", FLR, BOTH, [
        *cdev_bound(bdf=L0, devid=1), MarkResets(),
        SetHook("device_lock_contended", {L0}),
        device_reset("p", "d0", err=E.EAGAIN),
        NoResets(),
    ], doc="SPEC 3.8: pci_try_reset_function -> EAGAIN"),
    Scenario("device-info-flags-no-reset", DUAL, BOTH, [
        *cdev_bound(devid=1),
        device_info("p", "d0", out={"flags": C.VFIO_DEVICE_FLAGS_PCI, "num_regions": 9, "num_irqs": 5}),
    ], doc="SPEC 3.7"),
    Scenario("flr-open-resets-function", FLR, BOTH, [
        MarkResets(),
        *cdev_bound(bdf=L0, devid=1),
        Resets(L0),
    ], doc="vfio_pci_core_enable: pci_try_reset_function at first open"),
]

# -- more edges: group fds without a container, reset failure, resets at open/close ---
SCENARIOS += [
    Scenario("hr-group-fd-without-container-proves-ownership", DUAL, BOTH, [
        *group_container(bdfs=(F0,), names=("g13",)), *group_device(grp="g13"),
        Open("p", group_path(F1), "g14"),
        MarkResets(),
        hot_reset("p", "gd0", ["g13", "g14"]), Resets(F0, F1),
    ], doc="SPEC 4.7: group mode owns a device iff a supplied group file is its group (vfio_file_has_dev); "
           "no container needed on that group"),
    Scenario("hr-reset-errno-nothing-reset", DUAL, BOTH, [
        *_both_bound(), MarkResets(),
        SetHook("reset_errno", {F1: E.EIO}),
        hot_reset("p", "d1", [], err=E.EIO),
        NoResets(),
    ]),
    Scenario("hr-flr-close-function-reset", FLR, BOTH, [
        *cdev_bound(bdf=L0, devid=1), MarkResets(),
        Close("p", "d0"), Resets(L0),
    ], doc="vfio_pci_core_disable: function reset at close (FLR works), no bus reset needed after"),
    Scenario("hr-root-bus-open-close-pm-reset", ROOT, BOTH, [
        MarkResets(),
        *cdev_bound(bdf=R0, devid=1), Resets(R0),
        device_reset("p", "d0"), Resets(R0),
        Close("p", "d0"), Resets(R0),
    ], doc="a root-bus device with a PM reset: reset at open, VFIO_DEVICE_RESET, reset at close"),
    Scenario("hr-hotplug-last-close-slot-reset", HOTPLUG, BOTH, [
        *cdev_bound(bdf=H0, devid=1), MarkResets(),
        Close("p", "d0"), Resets(H0, H1),
    ], doc="SPEC 4.5: the dev_set is the slot; its last close resets the slot"),
    Scenario("hr-info-caller-entry-always-devid", SHARED, BOTH, [
        *cdev_bound(devid=1), ioas_alloc("p", "A", ioas=2),
        Open("p", cdev_path(F1), "d1"), bind("p", "d1", "A", devid=3),
        Close("p", "d0"),
        hot_reset_info("p", "d1", argsz=28, count=2, out_flags=3, entries=[entry(OWNED, F0), entry(3, F1)]),
    ]),
]

# -- a four-function card behind a switch (fixtures/large.toml) --------------------
LARGE = "large"
S0, S1, S2, S3 = (f"0000:03:00.{i}" for i in range(4))  # behind a slot with slot reset
B0, B1, B2, B3 = (f"0000:04:00.{i}" for i in range(4))  # bus reset only


def _large_two_bound() -> list:
    return [*cdev_bound(bdf=S0, devid=1), Open("p", cdev_path(S1), "d1"), bind("p", "d1", "A", devid=2)]


SCENARIOS += [
    Scenario("hr-large-slot-card-info-6.6", LARGE, V66, [
        *_large_two_bound(),
        hot_reset_info("p", "d0", argsz=28, buflen=44, err=E.ENOSPC, count=4, out_flags=3,
                       entries=[entry(1, S0), entry(2, S1)]),
        hot_reset_info("p", "d0", argsz=44, count=4, out_flags=1,
                       entries=[entry(1, S0), entry(2, S1), entry(NOT_OWNED, S2), entry(NOT_OWNED, S3)]),
        hot_reset("p", "d0", [], err=E.EINVAL),
    ], doc="SPEC 4.6 B with four functions: the two entries that fit were owned, flags stay 0x3"),
    Scenario("hr-large-slot-card-info-6.12", LARGE, V612, [
        *_large_two_bound(),
        hot_reset_info("p", "d0", argsz=28, buflen=44, err=E.ENOSPC, count=4, out_flags=0, entries=UNTOUCHED),
        hot_reset_info("p", "d0", argsz=44, count=4, out_flags=1,
                       entries=[entry(1, S0), entry(2, S1), entry(NOT_OWNED, S2), entry(NOT_OWNED, S3)]),
    ]),
    Scenario("hr-large-bus-card-group-reset", LARGE, V66, [
        *group_container(bdfs=(B0, B1, B2, B3), names=("g0", "g1", "g2", "g3")),
        *group_device(bdf=B2, grp="g2", dev="gd2"),
        hot_reset_info("p", "gd2", argsz=44, count=4, out_flags=0,
                       entries=[gentry(B0), gentry(B1), gentry(B2), gentry(B3)]),
        hot_reset("p", "gd2", ["g0", "g1", "g2"], err=E.EINVAL),
        hot_reset("p", "gd2", ["g0", "g1", "g2", "g3", "g3"], err=E.EINVAL),
        MarkResets(),
        hot_reset("p", "gd2", ["g3", "g2", "g1", "g0"]), Resets(B0, B1, B2, B3),
    ], doc="the card's bus is its dev_set; only its four functions are reset"),
]


def _no_group(bdf: str):  # type: ignore[no-untyped-def]
    def tweak(topo) -> None:  # type: ignore[no-untyped-def]
        d = topo.find(bdf)
        d.iommu_group = None

    return tweak


SCENARIOS += [
    Scenario("hr-info-group-mode-sibling-without-iommu-group-6.6", HOSTSIB, V66, [
        *group_container(bdfs=(F0,), names=("g13",)), *group_device(grp="g13"),
        hot_reset_info("p", "gd0", argsz=28, flags=0x5A5A5A5A, err=E.EPERM,
                       out={"flags": 0x5A5A5A5A, "count": 0}, entries=[gentry(F0), UNTOUCHED]),
        hot_reset_info("p", "gd0", argsz=20, buflen=28, err=E.ENOSPC, count=2, out_flags=0,
                       entries=[gentry(F0), UNTOUCHED]),
    ], tweak=_no_group(F1), doc="SPEC 4.6 B: group mode, a device without iommu group -> EPERM at once; "
                                 "the entries before it were already copied, the header was not"),
    Scenario("hr-info-group-mode-sibling-without-iommu-group-6.12", HOSTSIB, V612, [
        *group_container(bdfs=(F0,), names=("g13",)), *group_device(grp="g13"),
        hot_reset_info("p", "gd0", argsz=28, flags=0x5A5A5A5A, err=E.EPERM,
                       out={"flags": 0x5A5A5A5A, "count": 0}, entries=UNTOUCHED),
        hot_reset_info("p", "gd0", argsz=12, buflen=28, err=E.ENOSPC, count=2, out_flags=0, entries=UNTOUCHED),
    ], tweak=_no_group(F1), doc="SPEC 4.6 C: the kernel buffer is filled first; nothing reaches the user"),
    Scenario("hr-info-cdev-sibling-without-iommu-group", HOSTSIB, BOTH, [
        *cdev_bound(devid=1),
        hot_reset_info("p", "d0", argsz=28, count=2, out_flags=1,
                       entries=[entry(1, F0), entry(NOT_OWNED, F1)]),
    ], tweak=_no_group(F1), doc="SPEC 4.6: cdev mode never asks for the iommu group of a non-member"),
]

SCENARIOS += [
    Scenario("bind-flr-device-lock-contended-eagain", FLR, BOTH, [
        Open("p", "iommu", "A"), Open("p", cdev_path(L0), "d0"),
        SetHook("device_lock_contended", {L0}),
        MarkResets(),
        bind("p", "d0", "A", err=E.EAGAIN),
        NoResets(),
        Open("q", group_path(L0), "g"), Close("q", "g"),
        SetHook("device_lock_contended", set()),
        bind("p", "d0", "A", devid=1),
    ], doc="SPEC 3.4 step 7: open_device fails EAGAIN when the initial reset cannot take the device lock; "
           "everything (group block, ownership, devid) is undone"),
]

# -- the same rules on the hot-plug slot and the shared group -----------------------
SCENARIOS += [
    Scenario("hr-hotplug-enospc-6.6", HOTPLUG, V66, [
        *cdev_bound(bdf=H0, devid=1),
        hot_reset_info("p", "d0", argsz=20, buflen=28, err=E.ENOSPC, count=2, out_flags=3,
                       entries=[entry(1, H0), UNTOUCHED]),
    ]),
    Scenario("hr-hotplug-enospc-6.12", HOTPLUG, V612, [
        *cdev_bound(bdf=H0, devid=1),
        hot_reset_info("p", "d0", argsz=20, buflen=28, err=E.ENOSPC, count=2, out_flags=0, entries=UNTOUCHED),
    ]),
    Scenario("hr-hotplug-group-count-checks", HOTPLUG, BOTH, [
        *group_container(bdfs=(H0, H1), names=("g30", "g31")),
        *group_device(bdf=H1, grp="g31", dev="gd1"),
        hot_reset("p", "gd1", [], err=E.EINVAL),
        hot_reset("p", "gd1", ["g30", "g31", "g31"], err=E.EINVAL),
        hot_reset("p", "gd1", ["g31", 9999], err=E.EBADF),
        hot_reset("p", "gd1", ["g31", "c"], err=E.EINVAL),
        MarkResets(),
        hot_reset("p", "gd1", ["g30", "g31"]), Resets(H0, H1),
    ]),
    Scenario("hr-hotplug-memory-lock", HOTPLUG, BOTH, [
        *cdev_bound(bdf=H0, devid=1), Open("p", cdev_path(H1), "d1"), bind("p", "d1", "A", devid=2),
        MarkResets(),
        SetHook("memory_lock_contended", {H1}),
        hot_reset("p", "d0", [], err=E.EBUSY), NoResets(),
    ]),
    Scenario("hr-shared-group-cdev-count-1-einval", SHARED, BOTH, [
        *cdev_bound(devid=1),
        Open("q", "vfio/vfio", "c"),
        hot_reset("p", "d0", [], count=1, argsz=16, err=E.EINVAL),
    ]),
    Scenario("hr-shared-group-path-group-count-gt-ndev", SHARED, BOTH, [
        *group_container(bdfs=(F0,), names=("g13",)), *group_device(grp="g13"),
        hot_reset("p", "gd0", ["g13", "g13", "g13"], err=E.EINVAL),
    ]),
    Scenario("hr-shared-last-close-after-both", SHARED, BOTH, [
        *cdev_bound(devid=1), Open("p", cdev_path(F1), "d1"), bind("p", "d1", "A", devid=2),
        MarkResets(),
        Close("p", "d1"), NoResets(),
        Close("p", "d0"), Resets(F0, F1),
    ]),
    Scenario("hr-hostsib-group-info-enospc-6.6", HOSTSIB, V66, [
        *group_container(bdfs=(F0,), names=("g13",)), *group_device(grp="g13"),
        hot_reset_info("p", "gd0", argsz=20, buflen=28, err=E.ENOSPC, count=2, out_flags=0,
                       entries=[gentry(F0), UNTOUCHED]),
    ]),
]
