"""[[fault]] entries of a tree reach the kernel model's fault hooks."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from fakedev.kernel.errors import KernelError
from fakedev.kernel.kernel import Kernel
from fakedev.kernel.testing import FakeProcess
from fakedev.tree import load_tree
from fakedev.tree.loader import FIXTURES
from fakedev.uapi import ioctls as I
from fakedev.uapi import structs as S


def _tree_with(tmp_path: Path, faults: str) -> Path:
    p = tmp_path / "t.toml"
    p.write_text((FIXTURES / "dual-function-nic.toml").read_text() + "\n" + faults)
    return p


def _bind_both_and_reset(k: Kernel) -> int:
    """Bind vfio0 and vfio1 to one iommufd, then a zero-length hot reset: 0 or -errno."""
    p = FakeProcess()
    t = p.task()
    ictx = p.install(k.open("iommu", t))
    devs = [p.install(k.open(f"vfio/devices/vfio{n}", t)) for n in (0, 1)]
    for fd in devs:
        arg = p.alloc(S.VFIO_DEVICE_BIND_IOMMUFD.pack(argsz=16, iommufd=ictx))
        p.fds[fd].ioctl(t, I.VFIO_DEVICE_BIND_IOMMUFD, arg)  # type: ignore[union-attr]
    arg = p.alloc(S.VFIO_PCI_HOT_RESET.pack(argsz=12))
    try:
        return p.fds[devs[0]].ioctl(t, I.VFIO_DEVICE_PCI_HOT_RESET, arg)  # type: ignore[union-attr]
    except KernelError as e:
        return -e.errno
    finally:
        p.exit()


def test_no_faults_resets(tmp_path: Path) -> None:
    k = load_tree(_tree_with(tmp_path, "")).make_kernel()
    assert _bind_both_and_reset(k) == 0
    assert k.reset_count("0000:01:00.1") >= 1


def test_memory_lock_busy_gives_ebusy_and_resets_nothing(tmp_path: Path) -> None:
    tree = load_tree(_tree_with(tmp_path, '[[fault]]\nkind = "memory-lock-busy"\ndevice = "0000:01:00.1"\n'))
    k = tree.make_kernel()
    assert k.hooks.memory_lock_contended == {"0000:01:00.1"}
    before = [r for r in k.reset_log if r.cause == "VFIO_DEVICE_PCI_HOT_RESET"]
    assert _bind_both_and_reset(k) == -errno.EBUSY
    assert [r for r in k.reset_log if r.cause == "VFIO_DEVICE_PCI_HOT_RESET"] == before


@pytest.mark.parametrize(("given", "expect"), [('errno = "EIO"', errno.EIO), ('errno = "ENOTTY"', errno.ENOTTY), ("", errno.EIO)])
def test_reset_fails_with_the_given_errno(tmp_path: Path, given: str, expect: int) -> None:
    tree = load_tree(
        _tree_with(tmp_path, f'[[fault]]\nkind = "reset-fails"\ndevice = "0000:01:00.0"\n{given}\n')
    )
    k = tree.make_kernel()
    assert k.hooks.reset_errno == {"0000:01:00.0": expect}
    assert _bind_both_and_reset(k) == -expect


def test_device_lock_busy_reaches_the_hook(tmp_path: Path) -> None:
    tree = load_tree(_tree_with(tmp_path, '[[fault]]\nkind = "device-lock-busy"\ndevice = "0000:01:00.0"\n'))
    assert tree.make_kernel().hooks.device_lock_contended == {"0000:01:00.0"}
