"""End-to-end helpers: the C client built once per session, and
``fakedev run`` in a subprocess (it unshares namespaces, so never in-process)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `tests.` imports work from any directory
    sys.path.insert(0, str(REPO))
FIXTURES = REPO / "fixtures"

from tests.cli.conftest import (  # noqa: E402  (fixtures shared with tests/cli)
    dev_fuse_usable_by_all,
    unprivileged_user,
    user_pythonpath,
    userns_allowed,
)

__all__ = ["dev_fuse_usable_by_all", "unprivileged_user", "user_pythonpath", "userns_allowed"]


def fakedev_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *sys.path[1:]])
    return env


def fakedev_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fakedev.cli.main", *args]


def fakedev_run(
    tree: str, cmd: Sequence[str], *, extra: Sequence[str] = (), timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``fakedev run --tree fixtures/<tree>.toml [extra] -- cmd``."""
    return subprocess.run(
        fakedev_cmd("run", "--tree", str(FIXTURES / f"{tree}.toml"), *extra, "--", *cmd),
        capture_output=True,
        text=True,
        env=fakedev_env(),
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def hotreset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """tools/hotreset.c compiled with gcc (strict warnings)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is missing (scripts/setup installs it)")
    out = tmp_path_factory.mktemp("bin") / "hotreset"
    subprocess.run(
        [gcc, "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out),
         str(REPO / "tools" / "hotreset.c")],
        check=True,
    )
    out.parent.chmod(0o755)
    return str(out)
