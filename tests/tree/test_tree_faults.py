"""[[fault]] entries of a tree reach the kernel model's fault hooks."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from fakedev.kernel.errors import KernelError
from fakedev.kernel.kernel import Kernel
from fakedev.kernel.testing import FakeProcess
from fakedev.tree import load_tree
from fakedev.tree.errors import TreeError
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


def test_call_fails_and_unplug_entries_arm_the_fault_plan(tmp_path: Path) -> None:
    tree = load_tree(_tree_with(tmp_path, (
        '[[fault]]\nkind = "call-fails"\ncall = "VFIO_DEVICE_PCI_HOT_RESET"\nnth = 1\nerrno = "EBUSY"\n\n'
        '[[fault]]\nkind = "call-fails"\ncall = "open"\nnth = 3\ncount = "all"\ndevice = "01:00.1"\n\n'
        '[[fault]]\nkind = "unplug"\ndevice = "0000:01:00.1"\nafter = "VFIO_DEVICE_GET_INFO"\nnth = 2\n'
    )))
    assert [s.text() for s in tree.faults] == [
        "call=VFIO_DEVICE_PCI_HOT_RESET,nth=1,errno=EBUSY",
        "call=open,nth=3,count=all,device=0000:01:00.1,errno=EIO",
        "unplug=0000:01:00.1,after=VFIO_DEVICE_GET_INFO,nth=2",
    ]
    k = tree.make_kernel()
    assert k.faults.armed
    assert [r.spec for r in k.faults.rules] == list(tree.faults[:2])
    assert [r.spec for r in k.faults.unplugs] == [tree.faults[2]]


def test_a_tree_call_fails_entry_fails_the_hot_reset(tmp_path: Path) -> None:
    tree = load_tree(_tree_with(
        tmp_path, '[[fault]]\nkind = "call-fails"\ncall = "VFIO_DEVICE_PCI_HOT_RESET"\nerrno = "EBUSY"\n'))
    k = tree.make_kernel()
    p = FakeProcess()
    t = p.task()
    ictx = p.install(k.open("iommu", t))
    devs = [p.install(k.open(f"vfio/devices/vfio{n}", t)) for n in (0, 1)]
    for fd in devs:
        arg = p.alloc(S.VFIO_DEVICE_BIND_IOMMUFD.pack(argsz=16, iommufd=ictx))
        k.faults.ioctl(p.fds[fd], t, I.VFIO_DEVICE_BIND_IOMMUFD, arg)  # type: ignore[arg-type]
    before = len(k.reset_log)
    arg = p.alloc(S.VFIO_PCI_HOT_RESET.pack(argsz=12))
    with pytest.raises(KernelError) as exc:
        k.faults.ioctl(p.fds[devs[0]], t, I.VFIO_DEVICE_PCI_HOT_RESET, arg)  # type: ignore[arg-type]
    assert exc.value.errno == errno.EBUSY
    assert len(k.reset_log) == before
    assert k.faults.ioctl(p.fds[devs[0]], t, I.VFIO_DEVICE_PCI_HOT_RESET, arg) == 0  # type: ignore[arg-type]
    p.exit()


@pytest.mark.parametrize(("entry", "field", "problem"), [
    ('kind = "call-fails"\ncall = "VFIO_NO_SUCH" #<', "fault[0].call", "unknown call"),
    ('kind = "call-fails"\ncall = "open"\nnth = 0 #<', "fault[0].nth", "at least 1"),
    ('kind = "call-fails"\ncall = "open"\nnth = "2" #<', "fault[0].nth", "must be an integer"),
    ('kind = "call-fails"\ncall = "open"\ncount = 0 #<', "fault[0].count", "at least 1"),
    ('kind = "call-fails"\ncall = "open"\nerrno = "EHUH" #<', "fault[0].errno", "errno name"),
    ('kind = "call-fails"\ncall = "open"\ndevice = "0000:05:00.0" #<', "fault[0].device", "no function"),
    ('kind = "call-fails"\ncall = "open"\nafter = "open" #<', "fault[0].after", "unknown field"),
    # a missing field: the line of the table's header
    ('kind = "call-fails"', "fault[0]", "needs call"),
    ('kind = "unplug"\ndevice = "0000:01:00.1"', "fault[0]", "needs after"),
    ('kind = "unplug"\ndevice = "0000:01:00.1"\nafter = "VFIO_BOGUS" #<', "fault[0].after", "unknown call"),
])
def test_bad_fault_entries_name_file_line_field(
    tmp_path: Path, entry: str, field: str, problem: str
) -> None:
    base = (FIXTURES / "dual-function-nic.toml").read_text()
    path = tmp_path / "t.toml"
    header = "[[fault]]" + ("" if "#<" in entry else " #<")
    path.write_text(base + f"\n{header}\n" + entry + "\n")
    with pytest.raises(TreeError) as exc:
        load_tree(path)
    e = exc.value
    marked = 1 + next(i for i, ln in enumerate(path.read_text().splitlines()) if "#<" in ln)
    assert (e.file, e.field) == (path, field)
    assert e.line == marked
    assert problem in e.problem
    assert str(e).startswith(f"{path}:{marked}: {field}: ")
