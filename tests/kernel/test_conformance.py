"""Table-driven conformance suite: every scenario of tests/kernel/scenarios.

Each scenario runs on a fresh Kernel for every kernel version it names; the
runner (tests/kernel/harness.py) checks the errno/return and outputs of every
step, ``check_invariants() == []`` after every step, and that a failed call
changed nothing. Known model bugs are marked xfail(strict=True) in the
scenario table, with the expected and actual behaviour in the reason.
"""

from __future__ import annotations

import pytest

from tests.kernel.harness import Scenario, run
from tests.kernel.scenarios import ALL


def _params() -> list[object]:
    out: list[object] = []
    seen: set[str] = set()
    for sc in ALL:
        assert sc.name not in seen, f"duplicate scenario name {sc.name}"
        seen.add(sc.name)
        for v in sc.versions:
            reason = sc.xfail.get(v) or sc.xfail.get("*")
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            out.append(pytest.param(sc, v, id=f"{sc.name}@{v}", marks=marks))
    return out


@pytest.mark.parametrize(("sc", "version"), _params())
def test_scenario(sc: Scenario, version: str) -> None:
    run(sc, version)


def test_enough_scenarios() -> None:
    assert len(ALL) >= 150 + 6
