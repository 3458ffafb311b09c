"""`fakedev sweep` end to end: tools/hotreset.c copes with every call failing;
tests/e2e/fragile.c crashes on exactly the call whose error path is buggy,
and hangs when asked to."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

import pytest

from tests.e2e.conftest import FIXTURES, REPO, fakedev_cmd, fakedev_env

pytestmark = pytest.mark.needs_root

A, B = "0000:01:00.0", "0000:01:00.1"


@pytest.fixture(scope="module")
def fragile(tmp_path_factory: pytest.TempPathFactory) -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is missing (scripts/setup installs it)")
    out = tmp_path_factory.mktemp("bin") / "fragile"
    subprocess.run([gcc, "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out),
                    str(REPO / "tests" / "e2e" / "fragile.c")], check=True)
    return str(out)


def sweep(*args: str, timeout: float = 300) -> tuple[int, dict[str, Any]]:
    r = subprocess.run(fakedev_cmd("sweep", "--json", *args), capture_output=True, text=True,
                       env=fakedev_env(), timeout=timeout)
    assert r.returncode in (0, 1), r.stderr
    return r.returncode, json.loads(r.stdout)


def _pids_running(path: str) -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/exe") == path:
                out.append(int(pid))
        except OSError:
            continue
    return out


def test_sweep_over_hotreset_fails_each_of_its_calls_once(hotreset: str) -> None:
    status, res = sweep("--tree", str(FIXTURES / "dual-function-nic.toml"), "--", hotreset, A, B)
    runs = res["runs"]
    base, failing = runs[0], runs[1:]
    assert base["verdict"] == "ok" and base["call"] is None
    assert res["counted_calls"] == len(failing) == 11  # 3 opens, IOAS_ALLOC, 2x(BIND, ATTACH), 2 INFO, RESET
    assert [r["nth"] for r in failing] == list(range(1, 12))
    assert [r["call"]["seq"] for r in failing] == list(range(1, 12))
    for r in failing:
        assert r["reached"] is True
        (inj,) = r["injected"]
        assert (inj["seq"], inj["op"], inj["errno"]) == (r["call"]["seq"], r["call"]["op"], "ENOMEM")
        assert r["verdict"] == "failed-cleanly", r
        assert r["problems"] == []
    ops = [r["call"]["op"] for r in failing]
    assert ops[0] == "open" and ops[-1] == "VFIO_DEVICE_PCI_HOT_RESET"
    assert ops.count("VFIO_DEVICE_BIND_IOMMUFD") == 2
    assert status == 0 and res["bad"] == 0


def test_sweep_finds_the_crash_on_exactly_the_buggy_call(fragile: str) -> None:
    status, res = sweep("--timeout", "20", "--", fragile)
    runs = res["runs"]
    assert res["counted_calls"] == 6 == len(runs) - 1
    verdicts = {r["call"]["op"] if r["call"] else None: r["verdict"] for r in runs}
    assert verdicts == {
        None: "ok",
        "open": "failed-cleanly",
        "IOMMU_IOAS_ALLOC": "failed-cleanly",
        "VFIO_DEVICE_BIND_IOMMUFD": "failed-cleanly",
        "VFIO_DEVICE_ATTACH_IOMMUFD_PT": "failed-cleanly",
        "VFIO_DEVICE_GET_INFO": "CRASHED",
    }
    crashed = [r for r in runs if r["verdict"] == "CRASHED"]
    assert [(r["nth"], r["signal"], r["call"]["node"]) for r in crashed] == [(6, "SIGSEGV", "vfio0")]
    assert status == 1 and res["bad"] == 1


def test_sweep_reports_a_hang_and_kills_it(fragile: str) -> None:
    status, res = sweep("--call", "VFIO_DEVICE_BIND_IOMMUFD", "--errno", "EINVAL", "--timeout", "3",
                        "--", fragile, "--hang-on-bind")
    base, hung = res["runs"]
    assert base["verdict"] == "ok"
    assert hung["verdict"] == "HUNG" and hung["status"] is None
    assert hung["call"]["op"] == "VFIO_DEVICE_BIND_IOMMUFD"
    assert "bind failed, waiting" in hung["output"]
    assert status == 1
    assert _pids_running(fragile) == []


def test_sweep_with_a_limit_and_a_device(hotreset: str) -> None:
    status, res = sweep("--device", B, "--limit", "2", "--", hotreset, A, B)
    assert res["counted_calls"] == 3  # open vfio1, its BIND and ATTACH
    assert [r["call"]["op"] for r in res["runs"][1:]] == ["open", "VFIO_DEVICE_BIND_IOMMUFD"]
    assert all(r["call"]["devices"] == [B] for r in res["runs"][1:])
    assert status == 0


def test_sweep_over_the_legacy_path_finds_no_ignored_failure(hotreset: str) -> None:
    """A failed VFIO_GET_API_VERSION or CHECK_EXTENSION(TYPE1v2) once went unnoticed
    (hotreset exited 0): every failure of the container's first calls must stop it."""
    status, res = sweep("--supervise", "--limit", "3", "--", hotreset, "--legacy", A, B)
    runs = res["runs"][1:]
    assert [r["call"]["op"] for r in runs] == ["open", "VFIO_GET_API_VERSION", "VFIO_CHECK_EXTENSION"]
    assert [(r["verdict"], r["status"]) for r in runs] == [("failed-cleanly", 2)] * 3
    assert status == 0
