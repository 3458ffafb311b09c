"""Conformance scenario tables (data for ``tests/kernel/harness.py``).

Each module lists ``SCENARIOS``; ``ALL`` is every scenario of every module.
The expected answers are SPEC.md's (section named in each scenario's doc) or,
where SPEC is silent, the kernel source's.
"""

from __future__ import annotations

from tests.kernel.harness import Scenario
from tests.kernel.scenarios import (
    argsz,
    device_io,
    exclusion,
    fds,
    flags,
    group_path,
    hot_reset,
    iommufd_objects,
    lifecycle,
    versions,
    worked_examples,
)

ALL: list[Scenario] = [
    *worked_examples.SCENARIOS,
    *argsz.SCENARIOS,
    *flags.SCENARIOS,
    *fds.SCENARIOS,
    *exclusion.SCENARIOS,
    *iommufd_objects.SCENARIOS,
    *group_path.SCENARIOS,
    *hot_reset.SCENARIOS,
    *device_io.SCENARIOS,
    *lifecycle.SCENARIOS,
    *versions.SCENARIOS,
]
