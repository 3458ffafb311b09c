"""The layering rules, checked on the source: imports flow one way.

- fakedev/uapi and fakedev/kernel are sans-I/O: no module that does I/O or
  concurrency (os, trio, ctypes, socket, subprocess, threading, time...).
- fakedev/uapi imports nothing from fakedev but itself; fakedev/kernel
  only uapi and itself; the FUSE codec knows nothing of VFIO.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "fakedev"
IO_MODULES = {
    "os", "io", "trio", "ctypes", "socket", "subprocess", "threading", "time", "select",
    "selectors", "signal", "fcntl", "mmap", "asyncio", "multiprocessing", "shutil", "tempfile",
    "pathlib", "builtins",
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def _files(sub: str) -> list[Path]:
    return sorted((ROOT / sub).rglob("*.py"))


@pytest.mark.parametrize("path", _files("kernel") + _files("uapi"), ids=lambda p: str(p.relative_to(ROOT)))
def test_model_is_sans_io(path: Path) -> None:
    bad = {m for m in _imports(path) if m.split(".")[0] in IO_MODULES}
    assert not bad, f"{path.relative_to(ROOT)} imports I/O modules {sorted(bad)}"


@pytest.mark.parametrize("path", _files("uapi"), ids=lambda p: str(p.relative_to(ROOT)))
def test_uapi_depends_on_nothing(path: Path) -> None:
    bad = {m for m in _imports(path) if m.startswith("fakedev.") and not m.startswith("fakedev.uapi")}
    assert not bad, bad


@pytest.mark.parametrize("path", _files("kernel"), ids=lambda p: str(p.relative_to(ROOT)))
def test_kernel_depends_only_on_uapi(path: Path) -> None:
    allowed = ("fakedev.uapi", "fakedev.kernel")
    bad = {m for m in _imports(path) if m.startswith("fakedev.") and not m.startswith(allowed)}
    assert not bad, bad


@pytest.mark.parametrize("path", _files("fuse"), ids=lambda p: str(p.relative_to(ROOT)))
def test_fuse_knows_no_vfio(path: Path) -> None:
    bad = {m for m in _imports(path) if m.startswith(("fakedev.kernel", "fakedev.uapi", "fakedev.host"))}
    assert not bad, bad
