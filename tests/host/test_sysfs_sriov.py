"""The generated sysfs of an SR-IOV tree: the PF's sriov_* attributes and
virtfnN links, each VF's physfn link, vfio_pci's enable_sriov parameter."""

from __future__ import annotations

import os
from pathlib import Path

from fakedev.host import sysfs as SYS
from fakedev.tree.loader import FIXTURES, load_tree

PF, VF0, VF1 = "0000:01:00.0", "0000:01:10.0", "0000:01:10.2"


def test_sriov_entries(tmp_path: Path) -> None:
    tree = load_tree(FIXTURES / "sriov-nic.toml")
    k = tree.make_kernel()
    index = {d.pdev.name: d.index for d in k.vfio_devices()}
    SYS.generate_sysfs(tmp_path, k.topology, k.nodes(), index, enable_sriov=tree.enable_sriov)
    sys = tmp_path / "sys"
    pf = sys / "bus/pci/devices" / PF
    assert (pf / "sriov_totalvfs").read_text() == "8\n"
    assert (pf / "sriov_numvfs").read_text() == "2\n"
    assert (pf / "sriov_offset").read_text() == "128\n"
    assert (pf / "sriov_stride").read_text() == "2\n"
    assert (pf / "sriov_vf_device").read_text() == "10ed\n"
    assert os.path.basename(os.readlink(pf / "virtfn0")) == VF0
    assert os.path.basename(os.readlink(pf / "virtfn1")) == VF1
    assert (pf / "virtfn0").resolve() == (sys / "bus/pci/devices" / VF0).resolve()
    vf = sys / "bus/pci/devices" / VF0
    assert (vf / "physfn").resolve() == pf.resolve()
    assert not (vf / "sriov_totalvfs").exists() and not (pf / "physfn").exists()
    assert (sys / "module/vfio_pci/parameters/enable_sriov").read_text() == "Y\n"


def test_enable_sriov_parameter_off_by_default(tmp_path: Path) -> None:
    tree = load_tree(FIXTURES / "dual-function-nic.toml")
    k = tree.make_kernel()
    index = {d.pdev.name: d.index for d in k.vfio_devices()}
    SYS.generate_sysfs(tmp_path, k.topology, k.nodes(), index)
    assert (tmp_path / "sys/module/vfio_pci/parameters/enable_sriov").read_text() == "N\n"
    assert not (tmp_path / "sys/bus/pci/devices/0000:01:00.0/sriov_numvfs").exists()
