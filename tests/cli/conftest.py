"""Helpers for running ``fakedev`` pieces in their own processes (namespaces
are per process) and as an unprivileged user."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def relevant_mounts() -> list[str]:
    """The host's mounts a run could disturb: /, /dev/..., /sys/..., and any
    staging directory of ours. (Other suites may mount elsewhere meanwhile.)"""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if point == "/sys/fs/fuse/connections":
            continue  # fusectl: other suites' FUSE tests may mount it on the host
        if point == "/" or point.startswith(("/dev", "/sys", "/tmp/fakedev-")):
            out.append(line)
    return out

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `tests.` imports work from any directory
    sys.path.insert(0, str(REPO))
UNPRIVILEGED_USER = "fakedevtest"


def python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *sys.path[1:]])
    return env


def unprivileged_python(user: str) -> str | None:
    """An interpreter ``user`` may execute, of this interpreter's version."""
    candidates = [sys.executable, f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}"]
    for exe in candidates:
        ok = subprocess.run(
            ["runuser", "-u", user, "--", exe, "-c", "import sys; print(sys.version_info[:2])"],
            capture_output=True,
            text=True,
        )
        if ok.returncode == 0 and ok.stdout.strip() == str(tuple(sys.version_info[:2])):
            return exe
    return None


@pytest.fixture(scope="session")
def unprivileged_user() -> str:
    """A plain user account (created if missing); needs root and runuser."""
    if os.geteuid() != 0:
        pytest.skip("creating a test user needs root")  # the suite runs as root in CI
    if shutil.which("runuser") is None:
        pytest.fail("runuser (util-linux) is missing")
    try:
        pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", UNPRIVILEGED_USER], check=True)
    return UNPRIVILEGED_USER


RUNTIME_PACKAGES = ("fakedev", "trio", "attr", "attrs", "sortedcontainers", "idna", "outcome",
                    "sniffio")


def user_can_read(user: str, path: Path) -> bool:
    return subprocess.run(["runuser", "-u", user, "--", "test", "-r", str(path)]).returncode == 0


@pytest.fixture(scope="session")
def user_pythonpath(
    unprivileged_user: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A PYTHONPATH the unprivileged user can read: ours if it can, else a
    world-readable copy of the runtime packages (e.g. a checkout under /root;
    FAKEDEV_TEST_COPY_SITE=1 forces the copy)."""
    import importlib

    paths = python_env()["PYTHONPATH"].split(os.pathsep)
    if not os.environ.get("FAKEDEV_TEST_COPY_SITE") and all(user_can_read(unprivileged_user, Path(p)) for p in paths if Path(p).exists()):
        if user_can_read(unprivileged_user, REPO / "fakedev" / "__init__.py"):
            yield python_env()["PYTHONPATH"]
            return
    shared = Path(tempfile.mkdtemp(prefix="fakedev-site-"))
    for name in RUNTIME_PACKAGES:
        mod = importlib.import_module(name)
        assert mod.__file__ is not None
        src = Path(mod.__file__).parent
        shutil.copytree(src, shared / name, ignore=shutil.ignore_patterns("__pycache__"))
    for d in (shared, *shared.rglob("*")):
        d.chmod(0o755 if d.is_dir() else 0o644)
    yield str(shared)
    shutil.rmtree(shared, ignore_errors=True)


@pytest.fixture(scope="session")
def userns_allowed() -> None:
    from fakedev.host.namespace import userns_restriction

    reason = userns_restriction()
    if reason is not None:
        pytest.skip(f"the kernel forbids what rootless mode needs: {reason}")


@pytest.fixture
def dev_fuse_usable_by_all():  # type: ignore[no-untyped-def]
    """/dev/fuse with its usual 0666 mode for the duration of a test."""
    st = os.stat("/dev/fuse")
    mode = st.st_mode & 0o7777
    if mode & 0o006 != 0o006:
        os.chmod("/dev/fuse", 0o666)
    yield
    if mode & 0o006 != 0o006:
        os.chmod("/dev/fuse", mode)
