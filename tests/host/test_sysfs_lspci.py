"""lspci (pciutils) lists and decodes the generated sysfs.

lspci reads ``<sysfs.path>/devices/*`` (``-O sysfs.path=``), the same files it
reads from the real /sys; one test also bind-mounts the tree over /sys in a
private mount namespace, as ``fakedev run`` does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fakedev.host.sysfs import generate_sysfs, vfio_index_for
from fakedev.kernel.file import DevNode
from fakedev.tree import load_tree
from fakedev.tree.config import parse_lspci_dump
from fakedev.tree.loader import FIXTURES

LSPCI = shutil.which("lspci") or "/usr/bin/lspci"
pytestmark = pytest.mark.skipif(not os.path.exists(LSPCI), reason="pciutils not installed")


def build(tmp_path: Path, fixture: str = "dual-function-nic") -> Path:
    t = load_tree(FIXTURES / f"{fixture}.toml")
    idx = vfio_index_for(t.topology)
    nodes = [DevNode(f"vfio/devices/vfio{n}", 509, n, 0o600) for n in idx.values()]
    generate_sysfs(tmp_path, t.topology, nodes, idx)
    return tmp_path / "sys"


def lspci(sys: Path, *args: str) -> str:
    out = subprocess.run(
        [LSPCI, "-A", "linux-sysfs", "-O", f"sysfs.path={sys}/bus/pci", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


def test_lspci_lists_the_tree(tmp_path: Path) -> None:
    sys = build(tmp_path)
    lines = lspci(sys, "-n").splitlines()
    assert [ln.split()[0] for ln in lines] == ["00:1c.0", "01:00.0", "01:00.1"]
    assert "0200: 8086:10c9 (rev 01)" in lines[1]
    assert "0604: 8086:a110" in lines[0]


def test_lspci_tree_view(tmp_path: Path) -> None:
    out = lspci(build(tmp_path), "-tvn")
    assert out.splitlines()[0].startswith("-[0000:00]---1c.0-[01]--+-00.0  8086:10c9")
    assert "\\-00.1  8086:10c9" in out


def test_lspci_decodes_a_function(tmp_path: Path) -> None:
    out = lspci(build(tmp_path), "-vvv", "-s", "01:00.1")
    for expected in (
        "Interrupt: pin A",
        "IOMMU group: 14",
        "Region 0: Memory at",
        "(32-bit, non-prefetchable)",
        "Region 2: Memory at",
        "(64-bit, non-prefetchable)",
        "Power Management version 3",
        "NoSoftRst+",
        "MSI: Enable- Count=1/1 Maskable+ 64bit+",
        "Express (v2) Endpoint",
        "FLReset-",
        "MSI-X: Enable- Count=10",
        "Vector table: BAR=2 offset=00000000",
        "PBA: BAR=2 offset=00002000",
        "Access Control Services",
        "Kernel driver in use: vfio-pci",
    ):
        assert expected in out, expected


def test_lspci_decodes_the_root_port_and_flr(tmp_path: Path) -> None:
    rp = lspci(build(tmp_path), "-vvv", "-s", "00:1c.0")
    assert "Bus: primary=00, secondary=01, subordinate=01" in rp
    assert "Root Port (Slot-)" in rp
    assert "Kernel driver in use: pcieport" in rp
    flr = lspci(build(tmp_path / "flr", "flr-device"), "-vvv", "-s", "02:00.0")
    assert "FLReset+" in flr and "Expansion ROM at" in flr
    assert "(64-bit, prefetchable)" in flr


def test_lspci_slot(tmp_path: Path) -> None:
    out = lspci(build(tmp_path, "hotplug-slot"), "-vvv", "-s", "00:1e.0")
    assert "Downstream Port (Slot+)" in out
    assert "HotPlug+" in out and "Slot #5" in out
    assert "Physical Slot: 5" in lspci(build(tmp_path / "b", "hotplug-slot"), "-v", "-s", "05:00.0")


def test_lspci_hex_dump_round_trips(tmp_path: Path) -> None:
    sys = build(tmp_path)
    t = load_tree(FIXTURES / "dual-function-nic.toml")
    d = t.topology.find("0000:01:00.0")
    assert d is not None
    assert parse_lspci_dump(lspci(sys, "-xxxx", "-s", "01:00.0")) == d.config
    assert parse_lspci_dump(lspci(sys, "-xxx", "-s", "01:00.0")) == d.config[:256]
    both = lspci(sys, "-xxx", "-s", "01:00")
    assert parse_lspci_dump(both, "0000:01:00.1") == t.topology.find("0000:01:00.1").config[:256]  # type: ignore[union-attr]


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare"
)
def test_lspci_at_the_real_paths_in_a_private_namespace(tmp_path: Path) -> None:
    sys = build(tmp_path)
    script = f"mount --make-rprivate / && mount --bind {sys} /sys && {LSPCI} -tvn && {LSPCI} -k -s 01:00.1"
    res = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True)
    if res.returncode != 0 and "Operation not permitted" in res.stderr:
        pytest.skip("mount namespaces are not available here")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("-[0000:00]---1c.0-[01]--+-00.0  8086:10c9")
    assert "Kernel driver in use: vfio-pci" in res.stdout
    # the host's /sys is untouched
    assert not Path("/sys/bus/pci/devices/0000:01:00.1").exists() or os.path.realpath(
        "/sys/bus/pci/devices/0000:01:00.1"
    ) != str(sys / "devices/pci0000:00/0000:00:1c.0/0000:01:00.1")
