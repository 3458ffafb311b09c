"""Bad fds (EBADF) and fds of the wrong kind where an iommufd or group fd is expected."""

from __future__ import annotations

import errno as E

from tests.kernel.harness import (
    BOTH,
    Close,
    Dup,
    Open,
    Pipe,
    Scenario,
    Step,
    bind,
    cdev_path,
    group_path,
    hot_reset,
    set_container,
)
from tests.kernel.scenarios.common import DUAL, F0, F1, group_container, group_device


def _unbound() -> list[Step]:
    return [Open("p", "iommu", "A"), Open("p", cdev_path(F0), "d0")]


def _group_dev() -> list[Step]:
    return [*group_container(bdfs=(F0, F1), names=("g13", "g14")), *group_device(grp="g13")]


# what is passed as BIND's iommufd: (label, prologue steps, fd value, errno)
BIND_BAD: list[tuple[str, list[Step], object, int]] = [
    ("closed-9999", [], 9999, E.EBADF),
    ("minus-1", [], -1, E.EINVAL),
    ("int-min", [], -(1 << 31), E.EINVAL),
    ("eventfd", [Pipe("p", "ev", "eventfd")], "ev", E.EBADFD),
    ("pipe", [Pipe("p", "pp", "pipe")], "pp", E.EBADFD),
    ("own-cdev-fd", [], "d0", E.EBADFD),
    ("container-fd", [Open("p", "vfio/vfio", "c")], "c", E.EBADFD),
    ("group-fd-other-group", [Open("p", group_path(F1), "g14")], "g14", E.EBADFD),
    ("other-cdev-fd", [Open("p", cdev_path(F1), "d1")], "d1", E.EBADFD),
    ("closed-iommufd", [Open("p", "iommu", "X"), Close("p", "X")], 3 + 2, E.EBADF),
]

SCENARIOS: list[Scenario] = []
for label, pro, val, err in BIND_BAD:
    SCENARIOS.append(Scenario(f"fd-bind-iommufd-{label}", DUAL, BOTH, [
        *_unbound(), *pro,
        bind("p", "d0", val, err=err),
        bind("p", "d0", "A", devid=1),
    ], doc="SPEC 3.4 steps 2 and 6"))

SET_CONTAINER_BAD: list[tuple[str, list[Step], object, int]] = [
    ("closed-9999", [], 9999, E.EBADF),
    ("minus-1", [], -1, E.EBADF),
    ("eventfd", [Pipe("p", "ev", "eventfd")], "ev", E.EBADFD),
    ("pipe", [Pipe("p", "pp", "pipe")], "pp", E.EBADFD),
    ("cdev-fd", [Open("p", cdev_path(F0), "d0")], "d0", E.EBADFD),
    ("itself", [], "g13", E.EBADFD),
    ("other-group-fd", [Open("p", group_path(F1), "g14")], "g14", E.EBADFD),
]
for label, pro, val, err in SET_CONTAINER_BAD:
    SCENARIOS.append(Scenario(f"fd-set-container-{label}", DUAL, BOTH, [
        Open("p", "vfio/vfio", "c"), Open("p", group_path(F0), "g13"), *pro,
        set_container("p", "g13", val, err=err),
        set_container("p", "g13", "c"),
    ], doc="SPEC 3.2 SET_CONTAINER"))

HOT_RESET_BAD: list[tuple[str, list[Step], list[object], int]] = [
    ("closed-9999-second", [], ["g13", 9999], E.EBADF),
    ("closed-9999-first", [], [9999, "g13"], E.EBADF),
    ("minus-1", [], ["g13", -1], E.EBADF),
    ("eventfd", [Pipe("p", "ev", "eventfd")], ["g13", "ev"], E.EINVAL),
    ("pipe", [Pipe("p", "pp", "pipe")], ["pp", "g13"], E.EINVAL),
    ("container", [], ["g13", "c"], E.EINVAL),
    ("device-fd", [], ["g13", "gd0"], E.EINVAL),
    ("iommufd", [Open("p", "iommu", "A")], ["g13", "A"], E.EINVAL),
    ("cdev-fd", [Open("p", cdev_path(F1), "d1")], ["g13", "d1"], E.EINVAL),
    ("einval-before-ebadf", [Pipe("p", "pp", "pipe")], ["pp", 9999], E.EINVAL),
    ("ebadf-before-einval", [Pipe("p", "pp", "pipe")], [9999, "pp"], E.EBADF),
]
for label, pro, arr, err in HOT_RESET_BAD:
    SCENARIOS.append(Scenario(f"fd-hot-reset-array-{label}", DUAL, BOTH, [
        *_group_dev(), *pro,
        hot_reset("p", "gd0", arr, err=err),
        hot_reset("p", "gd0", ["g13", "g14"]),
    ], doc="SPEC 4.7 step 4: stop at the first bad fd"))

SCENARIOS += [
    Scenario("fd-bind-uses-callers-fd-table", DUAL, BOTH, [
        Open("q", "iommu", "Aq"),
        Open("p", cdev_path(F0), "d0"),
        Pipe("p", "pp", "pipe"),
        bind("p", "d0", "Aq", err=E.EBADFD),
    ], doc="fds are per process: q's iommufd number is p's pipe"),
    Scenario("fd-bind-dup-of-iommufd", DUAL, BOTH, [
        Open("p", "iommu", "A"), Dup("p", "A", "A2"), Close("p", "A"),
        Open("p", cdev_path(F0), "d0"),
        bind("p", "d0", "A2", devid=1),
    ], doc="a dup'ed fd of /dev/iommu is the same context"),
]
