"""mount(2)/umount2 and stale-mount clearing with real FUSE connections."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fakedev.fuse import mount as M

pytestmark = pytest.mark.needs_root


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    m = tmp_path / "mnt"
    m.mkdir()
    yield m
    M.clear_stale(str(m))
    M.clear_stale(str(m), "fakedevtest")
    assert not M.mounts_at(str(m))


def test_mount_shows_in_mountinfo_and_unmounts(mnt: Path) -> None:
    fd = M.open_dev_fuse()
    try:
        M.mount(str(mnt), fd, name="fakedevtest")
        (info,) = M.mounts_at(str(mnt), "fuse.fakedevtest")
        assert info.source == "fakedevtest" and info.major == 0
        assert M.ensure_fusectl()
        assert os.path.isdir(f"{M.FUSECTL}/{info.connection}")
        M.umount(str(mnt))
        assert not M.mounts_at(str(mnt))
    finally:
        os.close(fd)


def test_clear_stale_removes_a_dead_servers_mounts(mnt: Path) -> None:
    for _ in range(2):  # two stacked dead mounts
        fd = M.open_dev_fuse()
        M.mount(str(mnt), fd)
        os.close(fd)  # the "server" is gone: the connection is dead, the mount stays
    assert len(M.mounts_at(str(mnt), "fuse.fakedev")) == 2
    with pytest.raises(OSError):
        os.stat(mnt / "x")  # ENOTCONN
    assert M.clear_stale(str(mnt)) == 2
    assert not M.mounts_at(str(mnt))
    assert M.clear_stale(str(mnt)) == 0
    assert os.listdir(mnt) == []


def test_mount_errors_are_oserrors(tmp_path: Path) -> None:
    fd = M.open_dev_fuse()
    try:
        with pytest.raises(OSError):
            M.mount(str(tmp_path / "missing"), fd)
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        M.umount(str(tmp_path))
