"""VFIO no-IOMMU mode end to end: tools/noiommu.c (kernel uAPI only) runs
DPDK's noiommu sequence under ``fakedev run --supervise`` on fixtures/noiommu.toml."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import FIXTURES, REPO, fakedev_cmd, fakedev_env, fakedev_run

pytestmark = pytest.mark.needs_root

BDF = "0000:03:00.0"


@pytest.fixture(scope="module")
def noiommu(tmp_path_factory: pytest.TempPathFactory) -> str:
    """tools/noiommu.c compiled with gcc (strict warnings)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is missing (scripts/setup installs it)")
    out = tmp_path_factory.mktemp("bin") / "noiommu"
    subprocess.run(
        [gcc, "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out),
         str(REPO / "tools" / "noiommu.c")],
        check=True,
    )
    out.parent.chmod(0o755)
    return str(out)


def tagged(out: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in out.splitlines() if ": " in line and not line.startswith(" "))


def test_noiommu_sequence(noiommu: str) -> None:
    script = f"'{noiommu}' {BDF}; rc=$?; echo; cat \"$FAKEDEV_MOUNT/.fakedev/state.json\"; exit $rc"
    r = fakedev_run("noiommu", ["sh", "-c", script], extra=["--supervise"])
    assert r.returncode == 0, r.stdout + r.stderr
    head, _, state_text = r.stdout.partition("\n{")
    t = tagged(head)
    assert t["param"] == "Y"
    assert t["ext"] == "noiommu=1 type1v2=1"
    assert t["group"] == "0 name=vfio-noiommu"
    assert t["status"] == "flags=0x1"
    assert t["set_container"] == "0" and t["set_iommu"] == "0"
    assert t["map_dma"] == "-1 ENOTTY"
    assert t["device"] == "ok"
    assert t["info"].startswith("flags=0x3 ")  # VFIO_DEVICE_FLAGS_PCI | RESET
    assert t["region0"].startswith("size=0x20000 ")
    assert t["config"] == "8086:10d3"
    assert t["irqs"] == "msix=0 off=0"
    assert t["hr_info"] == "flags=0x0 count=1"
    assert t["hr_dev"] == f"{BDF} group=0"
    assert t["hr_reset"] == "0"
    assert t["cdev"] == "vfio0 open -1 ENOENT"  # a noiommu device has no cdev node
    state = json.loads("{" + state_text)
    assert any(rec["bdf"] == BDF and rec["cause"] == "VFIO_DEVICE_PCI_HOT_RESET" for rec in state["reset_log"])


def test_noiommu_needs_cap_sys_rawio(noiommu: str) -> None:
    capsh = shutil.which("setpriv")
    if capsh is None:
        pytest.fail("setpriv (util-linux) is missing")
    r = fakedev_run("noiommu", [capsh, "--inh-caps=-sys_rawio", "--bounding-set=-sys_rawio", "--",
                                noiommu, BDF], extra=["--supervise"])
    assert r.returncode == 1, r.stdout + r.stderr
    t = tagged(r.stdout)
    assert t["ext"] == "noiommu=1 type1v2=1"  # the container is unprivileged
    assert t["open"] == "/dev/vfio/noiommu-0 -1 EPERM"


def test_sysfs_of_a_noiommu_group(tmp_path: Path) -> None:
    script = ("cat /sys/kernel/iommu_groups/0/name /sys/kernel/iommu_groups/0/type; "
              f"readlink /sys/bus/pci/devices/{BDF}/iommu_group; ls /sys/kernel/iommu_groups/0/devices; "
              "ls /dev/vfio; test ! -e /dev/vfio/devices/vfio0 && echo no-cdev")
    r = fakedev_run("noiommu", ["sh", "-c", script])
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split() == ["vfio-noiommu", "unknown", "../../../../kernel/iommu_groups/0", BDF,
                                "noiommu-0", "vfio", "no-cdev"]


def test_show_names_the_noiommu_group() -> None:
    r = subprocess.run(fakedev_cmd("show", "--tree", str(FIXTURES / "noiommu.toml")),
                       capture_output=True, text=True, env=fakedev_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"  0: {BDF} (noiommu: /dev/vfio/noiommu-0)" in r.stdout.splitlines()
    assert f"  vfio0: {BDF} (no cdev: noiommu)" in r.stdout.splitlines()


def test_unbind_and_rebind_through_sysfs() -> None:
    script = (
        f"echo {BDF} > /sys/bus/pci/drivers/vfio-pci/unbind || exit 1; "
        "echo \"after-unbind $(ls /dev/vfio | tr '\\n' ' ')| $(ls /sys/kernel/iommu_groups | tr '\\n' ' ')"
        f"| $(ls /sys/class/vfio | tr '\\n' ' ')| $(readlink /sys/bus/pci/devices/{BDF}/iommu_group)\"; "
        f"echo vfio-pci > /sys/bus/pci/devices/{BDF}/driver_override; "
        f"echo {BDF} > /sys/bus/pci/drivers/vfio-pci/bind || exit 1; "
        "echo \"after-bind $(ls /dev/vfio | tr '\\n' ' ')| $(cat /sys/kernel/iommu_groups/0/name)"
        f"| $(ls /sys/class/vfio | tr '\\n' ' ')| $(readlink /sys/bus/pci/devices/{BDF}/iommu_group)\""
    )
    r = fakedev_run("noiommu", ["sh", "-c", script])
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert "after-unbind vfio | | | " in lines
    assert "after-bind noiommu-0 vfio | vfio-noiommu| noiommu-0 | ../../../../kernel/iommu_groups/0" in lines
