"""Fixtures of the robustness tests: the C clients built once, a mount point
that is always cleared afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fakedev.fuse import mount as M
from tests.robustness import harness as H


@pytest.fixture(scope="session")
def fuzz_client(tmp_path_factory: pytest.TempPathFactory) -> str:
    return H.build_fuzz_client(tmp_path_factory.mktemp("fuzzbin"))


@pytest.fixture(scope="session")
def kclient(tmp_path_factory: pytest.TempPathFactory) -> str:
    return H.build_kclient(tmp_path_factory.mktemp("kbin"))


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    m = tmp_path / "mnt"
    m.mkdir()
    yield m
    M.clear_stale(str(m))
    assert not M.mounts_at(str(m))
