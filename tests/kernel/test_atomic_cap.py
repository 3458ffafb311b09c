"""VFIO_DEVICE_GET_INFO's AtomicOp completer capability
(VFIO_DEVICE_INFO_CAP_PCI_ATOMIC_COMP, vfio_pci_info_atomic_cap): the
device's DevCap2 completer sizes that pci_enable_atomic_ops_to_root() allows
on the path to the root port."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from fakedev.kernel.errors import KernelError
from fakedev.kernel.file import File
from fakedev.kernel.kernel import Kernel
from fakedev.kernel.testing import FakeProcess
from fakedev.kernel.version import KernelVersion
from fakedev.tree import TreeError, load_tree
from fakedev.uapi import consts as C
from fakedev.uapi import ioctls as I
from fakedev.uapi import structs as S

INFO = S.VFIO_DEVICE_INFO
CAP = S.VFIO_DEVICE_INFO_CAP_PCI_ATOMIC_COMP
A32, A64, A128 = C.VFIO_PCI_ATOMIC_COMP32, C.VFIO_PCI_ATOMIC_COMP64, C.VFIO_PCI_ATOMIC_COMP128
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def root_port(bus: int = 1, pcie: str = "") -> str:
    return f"""
[[function]]
bdf = "0000:00:1c.0"
kind = "root-port"
vendor = 0x8086
device = 0xa110
secondary_bus = {bus}
driver = "pcieport"
capabilities.pcie = {{ {pcie} }}
"""


def endpoint(bdf: str = "0000:01:00.0", pcie: str = "", kind: str = "endpoint") -> str:
    return f"""
[[function]]
bdf = "{bdf}"
kind = "{kind}"
vendor = 0x8086
device = 0x1572
class = 0x020000
capabilities.pcie = {{ {pcie} }}
"""


def switch(up: str = "atomic_routing = true", down: str = "atomic_routing = true") -> str:
    return f"""
[[function]]
bdf = "0000:01:00.0"
kind = "upstream-port"
vendor = 0x10b5
device = 0x8747
secondary_bus = 2
capabilities.pcie = {{ {up} }}

[[function]]
bdf = "0000:02:08.0"
kind = "downstream-port"
vendor = 0x10b5
device = 0x8747
secondary_bus = 3
capabilities.pcie = {{ {down} }}
"""


def kernel_of(tmp_path: Path, text: str, version: str | None = None) -> Kernel:
    p = tmp_path / "t.toml"
    p.write_text(text)
    t = load_tree(p)
    return Kernel(t.topology, version=KernelVersion.parse(version) if version else t.version,
                  enable_sriov=t.enable_sriov)


def get_info(k: Kernel, bdf: str, argsz: int) -> tuple[int, dict[str, int], bytes]:
    """Bind ``bdf``'s cdev to an iommufd, then GET_INFO with ``argsz``: (rc, info, bytes after it)."""
    proc = FakeProcess()
    task = proc.task()
    (dev,) = [d for d in k.vfio_devices() if d.pdev.name == bdf]
    df = k.open(f"vfio/devices/vfio{dev.index}", task)
    proc.install(df)
    ifd = proc.install(k.open("iommu", task))
    bind = S.VFIO_DEVICE_BIND_IOMMUFD
    assert df.ioctl(task, I.VFIO_DEVICE_BIND_IOMMUFD, proc.alloc(bind.pack(argsz=bind.size, iommufd=ifd))) == 0
    buf = proc.alloc(b"\xaa" * 64)
    proc.poke(buf, argsz.to_bytes(4, "little"))  # the rest stays 0xaa: what is written shows
    before = k.describe()
    try:
        rc = df.ioctl(task, I.VFIO_DEVICE_GET_INFO, buf)
    except KernelError as e:
        assert k.describe() == before
        rc = -e.errno
    assert k.check_invariants() == []
    raw = proc.peek(buf, 64)
    proc.exit()
    assert k.check_invariants() == []
    return rc, dict(INFO.unpack(raw[:INFO.size])), raw[INFO.size:]


def atomic_flags(k: Kernel, bdf: str) -> int | None:
    """The cap's flags (None: no cap), checking the short-buffer answer first."""
    rc, info, _ = get_info(k, bdf, INFO.size)
    assert rc == 0
    if not info["flags"] & C.VFIO_DEVICE_FLAGS_CAPS:
        assert info["argsz"] == INFO.size and info["cap_offset"] == 0
        return None
    assert info["argsz"] == INFO.size + CAP.size and info["cap_offset"] == 0
    rc, info, rest = get_info(k, bdf, INFO.size + CAP.size)
    assert rc == 0 and info["cap_offset"] == INFO.size
    assert info["flags"] == C.VFIO_DEVICE_FLAGS_PCI | C.VFIO_DEVICE_FLAGS_RESET | C.VFIO_DEVICE_FLAGS_CAPS
    cap = CAP.unpack(rest[:CAP.size])
    assert cap["id"] == C.VFIO_DEVICE_INFO_CAP_PCI_ATOMIC_COMP and cap["version"] == 1
    assert cap["next"] == 0 and cap["reserved"] == 0 and cap["flags"]
    assert rest[CAP.size:CAP.size + 4] == b"\xaa" * 4  # nothing written past the chain
    return int(cap["flags"])


def fl(pcie: str) -> str:
    """``flr = true`` plus ``pcie`` (a function needs a reset to be opened with RESET)."""
    return "flr = true" + (", " + pcie if pcie else "")


@pytest.mark.parametrize(("rp", "ep", "want"), [
    ("atomic_completer = [32, 64, 128]", "atomic_completer = [32, 64, 128]", A32 | A64 | A128),
    ("atomic_completer = [32, 64]", "atomic_completer = [32, 64, 128]", A32 | A64),  # root port lacks 128
    ("atomic_completer = [128]", "atomic_completer = [32, 64]", None),
    ("", "atomic_completer = [32, 64, 128]", None),  # root port completes nothing
    ("atomic_completer = [32, 64, 128]", "", None),  # device completes nothing
    ("atomic_completer = [64, 128]", "atomic_completer = [64]", A64),
])
def test_behind_a_root_port(tmp_path: Path, rp: str, ep: str, want: int | None) -> None:
    k = kernel_of(tmp_path, root_port(pcie=rp) + endpoint(pcie=fl(ep)))
    assert atomic_flags(k, "0000:01:00.0") == want


@pytest.mark.parametrize(("up", "down", "want"), [
    ("atomic_routing = true", "atomic_routing = true", A32 | A64),
    ("atomic_routing = true", "", None),  # a downstream port that does not route
    ("", "atomic_routing = true", None),  # an upstream port that does not route
    ("atomic_routing = true, atomic_egress_blocked = true", "atomic_routing = true", None),
    # egress blocking is checked on upstream ports only
    ("atomic_routing = true", "atomic_routing = true, atomic_egress_blocked = true", A32 | A64),
])
def test_behind_a_switch(tmp_path: Path, up: str, down: str, want: int | None) -> None:
    text = root_port(pcie="atomic_completer = [32, 64]") + switch(up, down) + endpoint(
        "0000:03:00.0", fl("atomic_completer = [32, 64, 128]"))
    k = kernel_of(tmp_path, text)
    assert atomic_flags(k, "0000:03:00.0") == want


def test_on_the_root_bus_no_bridge_is_checked(tmp_path: Path) -> None:
    k = kernel_of(tmp_path, endpoint("0000:00:03.0", fl("atomic_completer = [64]"), kind="integrated-endpoint"))
    assert atomic_flags(k, "0000:00:03.0") == A64


def test_legacy_endpoint_requests_too(tmp_path: Path) -> None:
    k = kernel_of(tmp_path, root_port(pcie="atomic_completer = [32]")
                  + endpoint(pcie=fl("atomic_completer = [32]"), kind="legacy-endpoint"))
    assert atomic_flags(k, "0000:01:00.0") == A32


def test_short_argsz_reports_the_size_in_the_16_bytes(tmp_path: Path) -> None:
    k = kernel_of(tmp_path, root_port(pcie="atomic_completer = [32]") + endpoint(pcie=fl("atomic_completer = [32]")))
    rc, info, _ = get_info(k, "0000:01:00.0", 16)
    assert rc == 0
    assert info["argsz"] == INFO.size + CAP.size
    assert info["flags"] & C.VFIO_DEVICE_FLAGS_CAPS
    assert info["cap_offset"] == 0xAAAAAAAA  # past argsz: not written
    rc, _, _ = get_info(k, "0000:01:00.0", 15)
    assert rc == -errno.EINVAL


def test_a_vf_reports_its_pf(tmp_path: Path) -> None:
    text = (FIXTURES / "sriov-nic.toml").read_text()
    text = text.replace('capabilities.acs = true\n', 'capabilities.acs = true\ncapabilities.pcie = { atomic_completer = [32, 64] }\n', 1)
    text = text.replace("pcie = { flr = true, link_speed = 2, link_width = 8 }",
                        "pcie = { flr = true, link_speed = 2, link_width = 8, atomic_completer = [32, 64, 128] }", 1)
    k = kernel_of(tmp_path, text)
    assert atomic_flags(k, "0000:01:00.0") == A32 | A64
    vf = k.topology.find("0000:01:10.0")
    assert vf is not None and vf.is_virtfn
    # the VF's own DevCap2 has no AtomicOp bits: the PF's are reported (pci_physfn)
    proc = FakeProcess()
    task = proc.task()
    pf_df = k.open("vfio/devices/vfio0", task)
    ifd = proc.install(k.open("iommu", task))
    bind = S.VFIO_DEVICE_BIND_IOMMUFD
    assert pf_df.ioctl(task, I.VFIO_DEVICE_BIND_IOMMUFD, proc.alloc(bind.pack(argsz=bind.size, iommufd=ifd))) == 0
    token = bytes(range(16))
    feat = S.VFIO_DEVICE_FEATURE
    assert pf_df.ioctl(task, I.VFIO_DEVICE_FEATURE, proc.alloc(
        feat.pack(argsz=24, flags=C.VFIO_DEVICE_FEATURE_PCI_VF_TOKEN | C.VFIO_DEVICE_FEATURE_SET) + token)) == 0
    vf_df = k.open("vfio/devices/vfio1", task)
    assert isinstance(vf_df, File)
    ifd2 = proc.install(k.open("iommu", task))
    assert vf_df.ioctl(task, I.VFIO_DEVICE_BIND_IOMMUFD, proc.alloc(bind.pack(
        argsz=bind.size, flags=C.VFIO_DEVICE_BIND_FLAG_TOKEN, iommufd=ifd2, token_uuid_ptr=proc.alloc(token)))) == 0
    buf = proc.alloc(INFO.pack(argsz=INFO.size + CAP.size) + bytes(CAP.size))
    assert vf_df.ioctl(task, I.VFIO_DEVICE_GET_INFO, buf) == 0
    cap = CAP.unpack(proc.peek(buf + INFO.size, CAP.size))
    assert cap["flags"] == A32 | A64


def test_the_default_fixtures_have_no_atomic_cap(tmp_path: Path) -> None:
    k = kernel_of(tmp_path, (FIXTURES / "dual-function-nic.toml").read_text())
    for bdf in ("0000:01:00.0", "0000:01:00.1"):
        assert atomic_flags(k, bdf) is None


@pytest.mark.parametrize("version", ["6.6", "6.12", "6.18"])
def test_every_modelled_version_has_it(tmp_path: Path, version: str) -> None:
    assert KernelVersion.parse(version).has_atomic_comp_cap
    k = kernel_of(tmp_path, root_port(pcie="atomic_completer = [32]") + endpoint(pcie=fl("atomic_completer = [32]")),
                  version)
    assert atomic_flags(k, "0000:01:00.0") == A32


@pytest.mark.parametrize(("text", "field", "message"), [
    (root_port() + endpoint(pcie="atomic_completer = [16]"), "atomic_completer", "not an AtomicOp completion size"),
    (root_port() + endpoint(pcie="atomic_completer = [32, 32]"), "atomic_completer", "twice"),
    (root_port() + endpoint(pcie='atomic_completer = "32"'), "atomic_completer", "array of operand sizes"),
    (root_port() + endpoint(pcie="atomic_routing = true"), "atomic_routing", "a port's"),
    (root_port() + endpoint(pcie="atomic_egress_blocked = true"), "atomic_egress_blocked", "a port's"),
    (root_port() + endpoint(pcie="atomic = [32]"), "atomic", "unknown field"),
])
def test_tree_errors(tmp_path: Path, text: str, field: str, message: str) -> None:
    p = tmp_path / "t.toml"
    p.write_text(text)
    with pytest.raises(TreeError) as ei:
        load_tree(p)
    e = ei.value
    assert e.field.endswith(field) and message in str(e), str(e)
    assert e.line == next(i + 1 for i, ln in enumerate(text.splitlines()) if field in ln and "bdf" not in ln), str(e)
