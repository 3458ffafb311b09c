"""``Kernel.check_invariants`` is not vacuous: corrupting the state is caught.

The conformance suite and the state machine rely on ``check_invariants() ==
[]`` after every step; these tests build a real state through the uAPI,
break one relation the kernel keeps (the kind of slip a model bug makes),
and require a report.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.kernel.harness import Open, Scenario, V, World, attach, group_path, ioas_alloc, run
from tests.kernel.scenarios.common import (
    DUAL,
    F0,
    F1,
    SHARED,
    cdev_bound,
    group_container,
    group_device,
)


def _bound(topology: str = DUAL) -> World:
    return run(Scenario("bound", topology, ("6.6",), [
        *cdev_bound(), ioas_alloc("p", "A", save="ioas"), attach("p", "d0", V("ioas"), save="hwpt"),
    ]), "6.6")


def _group() -> World:
    return run(Scenario("group", DUAL, ("6.6",), [
        *group_container(bdfs=(F0,)), *group_device(grp="g0"),
    ]), "6.6")


def _dev(w: World, bdf: str) -> Any:
    return next(d for d in w.k.vfio.devices if d.pdev.name == bdf)


def _ctx(w: World) -> Any:
    return w.file_of("A").ctx


def _set(obj: Any, name: str, value: Any) -> None:
    setattr(obj, name, value)


MUTATIONS: list[tuple[str, Callable[[], World], Callable[[World], None]]] = [
    ("group cdev_device_open_cnt off by one", _bound,
     lambda w: _set(_dev(w, F0).group, "cdev_device_open_cnt", 2)),
    ("iommu group lost its owner", _bound,
     lambda w: _set(w.k.vfio.iommu_groups[13], "owner", None)),
    ("iommu group owned by another cookie", _bound,
     lambda w: _set(w.k.vfio.iommu_groups[13], "owner", object())),
    ("cdev-opened device open twice", _bound, lambda w: _set(_dev(w, F0), "open_count", 2)),
    ("negative open_count", _bound, lambda w: _set(_dev(w, F1), "open_count", -1)),
    ("devid missing from its context", _bound,
     lambda w: _ctx(w).objects.pop(_dev(w, F0).iommufd_device.obj_id)),
    ("object stored under a second id", _bound,
     lambda w: _ctx(w).objects.__setitem__(77, _ctx(w).objects[w.vals["ioas"]])),
    ("hwpt users wrong", _bound,
     lambda w: _set(_ctx(w).objects[w.vals["hwpt"]], "users", 7)),
    ("host driver bound beside a user owner", lambda: _bound(SHARED),
     lambda w: _set(w.pdev(F1), "driver", "igb")),
    ("bound device's context released", _bound, lambda w: _set(_ctx(w), "dead", True)),
    ("container_users wrong", _group, lambda w: _set(_dev(w, F0).group, "container_users", 5)),
    ("container group without an open file", _group,
     lambda w: _set(_dev(w, F0).group, "opened_file", None)),
]


@pytest.mark.parametrize(("what", "build", "mutate"), MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_corruption_is_reported(what: str, build: Callable[[], World], mutate: Callable[[World], None]) -> None:
    w = build()
    assert w.k.check_invariants() == []
    mutate(w)
    assert w.k.check_invariants() != [], f"check_invariants missed: {what}"


def test_clean_states_pass() -> None:
    for build in (_bound, _group, lambda: _bound(SHARED)):
        assert build().k.check_invariants() == []


def test_group_open_with_bound_cdev_is_reported() -> None:
    w = _bound()
    other = run(Scenario("g", DUAL, ("6.6",), [Open("q", group_path(F0), "g")]), "6.6")
    grp = _dev(w, F0).group
    grp.opened_file = other.file_of("g")
    assert w.k.check_invariants() != []
