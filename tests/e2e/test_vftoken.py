"""SR-IOV VF tokens end to end: tools/vftoken.c (kernel uAPI only) sets the
token on the PF through its cdev and opens a VF through its group with
``GET_DEVICE_FD("<bdf> vf_token=<uuid>")`` under ``fakedev run --supervise``
on fixtures/sriov-nic.toml."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.e2e.conftest import REPO, fakedev_run

pytestmark = pytest.mark.needs_root

PF, VF = "0000:01:00.0", "0000:01:10.0"
UUID = "bd8d9d2b-5a5f-4f5a-a211-f591514ba1f3"


@pytest.fixture(scope="module")
def vftoken(tmp_path_factory: pytest.TempPathFactory) -> str:
    """tools/vftoken.c compiled with gcc (strict warnings)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is missing (scripts/setup installs it)")
    out = tmp_path_factory.mktemp("bin") / "vftoken"
    subprocess.run(
        [gcc, "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out),
         str(REPO / "tools" / "vftoken.c")],
        check=True,
    )
    out.parent.chmod(0o755)
    return str(out)


def tagged(out: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in out.splitlines() if ": " in line and not line.startswith(" "))


def test_vf_token_handshake(vftoken: str) -> None:
    script = (f"'{vftoken}' {PF} {VF} {UUID}; rc=$?; echo; "
              "cat \"$FAKEDEV_MOUNT/.fakedev/state.json\"; exit $rc")
    r = fakedev_run("sriov-nic", ["sh", "-c", script], extra=["--supervise"])
    assert r.returncode == 0, r.stdout + r.stderr
    head, _, state_text = r.stdout.partition("\n{")
    t = tagged(head)
    assert t["pf_bind"] == "0" and t["probe"] == "0" and t["set_token"] == "0"
    assert t["param"] == "Y"  # /sys/module/vfio_pci/parameters/enable_sriov
    assert t["physfn"] == PF
    assert t["set_container"] == "0" and t["set_iommu"] == "0"
    assert t["missing"] == "-1 EACCES"
    assert t["wrong"] == "-1 EACCES"
    assert t["vf_open"] == "ok"
    assert t["vf_info"] == "flags=0x3 regions=9 irqs=5"
    assert t["vf_feature"] == "-1 ENOTTY"  # the token feature is the PF's
    assert t["pf_bind2"] == "-1 EACCES"  # the PF itself needs the token while a VF is open
    state = json.loads("{" + state_text)
    devs = {d["bdf"]: d for d in state["devices"]}
    assert devs[PF]["vf_token"] == UUID
    # the client has exited: its VF closed, no users of the token left
    assert devs[PF]["vf_token_users"] == 0
    assert devs[VF]["open_count"] == 0 and devs[VF]["physfn"] == PF
