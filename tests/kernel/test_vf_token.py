"""SR-IOV VF tokens: the PF's VFIO_DEVICE_FEATURE_PCI_VF_TOKEN, the
``" vf_token=<uuid>"`` suffix of GET_DEVICE_FD, the cdev BIND token (6.16+).

On fixtures/sriov-nic.toml: PF 0000:01:00.0 (vfio0, group 21), VFs
0000:01:10.0 (vfio1, group 22) and 0000:01:10.2 (vfio2, group 23), all bound
to vfio-pci with enable_sriov. Each call goes through ``World.call``: the
model's invariants are checked after it, and a failed call must leave
``Kernel.describe()`` unchanged.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from fakedev.kernel.errors import KernelError
from fakedev.kernel.file import File
from fakedev.kernel.kernel import Kernel
from fakedev.kernel.testing import FakeProcess
from fakedev.kernel.version import KernelVersion
from fakedev.tree.loader import load_tree
from fakedev.uapi import consts as C
from fakedev.uapi import ioctls as I
from fakedev.uapi import structs as S

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
SRIOV = FIXTURES / "sriov-nic.toml"
PF, VF0, VF1 = "0000:01:00.0", "0000:01:10.0", "0000:01:10.2"
TOKEN = bytes.fromhex("bd8d9d2b5a5f4f5aa211f591514ba1f3")
TOKEN_TEXT = "bd8d9d2b-5a5f-4f5a-a211-f591514ba1f3"
OTHER_TEXT = "00000000-0000-0000-0000-000000000001"
BIND = S.VFIO_DEVICE_BIND_IOMMUFD
FEATURE = S.VFIO_DEVICE_FEATURE
T = C.VFIO_DEVICE_BIND_FLAG_TOKEN


class World:
    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.proc = FakeProcess()
        self.task = self.proc.task()

    def call(self, f: File, cmd: int, arg: int) -> int:
        """One ioctl: invariants after it; a failure changes nothing."""
        before = self.k.describe()
        try:
            rc = f.ioctl(self.task, cmd, arg)
        except KernelError as e:
            assert self.k.describe() == before, f"failed ioctl {cmd:#x} changed the model"
            rc = -e.errno
        assert self.k.check_invariants() == []
        return rc

    def open(self, path: str) -> File:
        f = self.k.open(path, self.task)
        assert self.k.check_invariants() == []
        return f

    def fd(self, f: File) -> int:
        return self.proc.install(f)

    def close(self, fd: int) -> None:
        self.proc.close(fd)
        assert self.k.check_invariants() == []

    def dev(self, bdf: str) -> dict[str, Any]:
        for d in self.k.describe()["devices"]:
            if d["bdf"] == bdf:
                return dict(d)
        raise AssertionError(bdf)


def world(version: str | None = None, path: Path = SRIOV) -> World:
    t = load_tree(path)
    v = KernelVersion.parse(version) if version else t.version
    return World(Kernel(t.topology, version=v, enable_sriov=t.enable_sriov))


def group_with_container(w: World, gid: int) -> File:
    """/dev/vfio/<gid> set to a type1v2 container (GET_DEVICE_FD can open devices)."""
    c = w.open("vfio/vfio")
    g = w.open(f"vfio/{gid}")
    assert w.call(g, I.VFIO_GROUP_SET_CONTAINER, w.proc.alloc(w.fd(c).to_bytes(4, "little"))) == 0
    assert w.call(c, I.VFIO_SET_IOMMU, C.VFIO_TYPE1v2_IOMMU) == 0
    return g


def get_fd(w: World, g: File, name: str) -> int:
    return w.call(g, I.VFIO_GROUP_GET_DEVICE_FD, w.proc.alloc(name.encode() + b"\0"))


def bound_cdev(w: World, index: int | str, token: bytes | None = None, flags: int | None = None) -> tuple[File, int]:
    """Open vfioN and BIND it to a new iommufd; (file, rc)."""
    d = w.open(f"vfio/devices/vfio{index}" if isinstance(index, int) else f"vfio/devices/{index}")
    ifd = w.fd(w.open("iommu"))
    if w.k.version.has_bind_token:
        ptr = w.proc.alloc(token) if token is not None else 0
        fl = (T if token is not None else 0) if flags is None else flags
        arg = w.proc.alloc(BIND.pack(argsz=BIND.size, flags=fl, iommufd=ifd, token_uuid_ptr=ptr))
    else:
        arg = w.proc.alloc(BIND.pack(argsz=16, iommufd=ifd)[:16])
    return d, w.call(d, I.VFIO_DEVICE_BIND_IOMMUFD, arg)


def feature(w: World, df: File, flags: int, payload: bytes = b"", argsz: int | None = None) -> int:
    size = FEATURE.size + len(payload) if argsz is None else argsz
    return w.call(df, I.VFIO_DEVICE_FEATURE, w.proc.alloc(FEATURE.pack(argsz=size, flags=flags) + payload))


def set_token(w: World, pf: File, token: bytes = TOKEN) -> None:
    assert feature(w, pf, C.VFIO_DEVICE_FEATURE_PCI_VF_TOKEN | C.VFIO_DEVICE_FEATURE_SET, token) == 0


def pf_cdev(w: World) -> File:
    pf, rc = bound_cdev(w, 0)
    assert rc == 0
    return pf


# --------------------------------------------------------------------------
# VFIO_DEVICE_FEATURE_PCI_VF_TOKEN
# --------------------------------------------------------------------------


def test_feature_token_set_probe_and_errors() -> None:
    w = world()
    pf = pf_cdev(w)
    tok = C.VFIO_DEVICE_FEATURE_PCI_VF_TOKEN
    S_, G, P = C.VFIO_DEVICE_FEATURE_SET, C.VFIO_DEVICE_FEATURE_GET, C.VFIO_DEVICE_FEATURE_PROBE
    assert feature(w, pf, tok | P | S_) == 0
    assert feature(w, pf, tok | P) == 0
    assert feature(w, pf, tok | P | G) == -errno.EINVAL  # no GET: it would show the last user's token
    assert feature(w, pf, tok | G, TOKEN) == -errno.EINVAL
    assert feature(w, pf, tok | S_, TOKEN[:15]) == -errno.EINVAL  # payload shorter than a uuid_t
    assert feature(w, pf, tok, TOKEN) == -errno.EINVAL  # neither GET nor SET
    assert w.dev(PF)["vf_token"] != TOKEN_TEXT
    set_token(w, pf)
    assert w.dev(PF)["vf_token"] == TOKEN_TEXT and w.dev(PF)["vf_token_users"] == 0
    # a longer payload is fine (16 bytes are read)
    set_token(w, pf, TOKEN[::-1] + b"\xff" * 8)
    assert w.dev(PF)["vf_token"] != TOKEN_TEXT


@pytest.mark.parametrize("version", ["6.6", "6.18"])
def test_feature_token_is_enotty_on_a_vf(version: str) -> None:
    w = world(version)
    g = group_with_container(w, 22)
    fd = get_fd(w, g, VF0)
    assert fd == -errno.EACCES
    set_token(w, pf_cdev(w))
    fd = get_fd(w, g, f"{VF0} vf_token={TOKEN_TEXT}")
    assert fd >= 0
    vf = w.proc.fds[fd]
    assert isinstance(vf, File)
    flags = C.VFIO_DEVICE_FEATURE_PCI_VF_TOKEN | C.VFIO_DEVICE_FEATURE_PROBE | C.VFIO_DEVICE_FEATURE_SET
    assert feature(w, vf, flags) == -errno.ENOTTY


def test_feature_token_is_enotty_on_a_device_without_sriov() -> None:
    w = world(path=FIXTURES / "dual-function-nic.toml")
    d, rc = bound_cdev(w, 0)
    assert rc == 0
    assert feature(w, d, C.VFIO_DEVICE_FEATURE_PCI_VF_TOKEN | C.VFIO_DEVICE_FEATURE_SET, TOKEN) == -errno.ENOTTY


# --------------------------------------------------------------------------
# GET_DEVICE_FD with " vf_token=<uuid>"
# --------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["6.6", "6.12", "6.18"])
def test_vf_opens_by_name_only_with_the_pf_token(version: str) -> None:
    w = world(version)
    set_token(w, pf_cdev(w))
    g = group_with_container(w, 22)
    assert get_fd(w, g, VF0) == -errno.EACCES  # missing
    assert get_fd(w, g, f"{VF0} vf_token={OTHER_TEXT}") == -errno.EACCES  # wrong
    assert w.dev(VF0)["open_count"] == 0 and w.dev(PF)["vf_token_users"] == 0
    fd = get_fd(w, g, f"{VF0} vf_token={TOKEN_TEXT.upper()}")  # uuid_parse takes either case
    assert fd >= 0
    assert w.dev(VF0)["open_count"] == 1 and w.dev(PF)["vf_token_users"] == 1
    fd2 = get_fd(w, g, f"{VF0}   vf_token={TOKEN_TEXT}  ")  # spaces around are skipped
    assert fd2 >= 0
    assert w.dev(PF)["vf_token_users"] == 1  # counted once per open device, not per fd
    w.close(fd)
    assert w.dev(PF)["vf_token_users"] == 1
    w.close(fd2)
    assert w.dev(PF)["vf_token_users"] == 0 and w.dev(VF0)["open_count"] == 0


@pytest.mark.parametrize(("suffix", "want"), [
    ("x", -errno.ENODEV),  # not a space after the name: another name, no device matches
    (" vf_token=xyz", -errno.EINVAL),  # shorter than a UUID
    (f" vf_token={TOKEN_TEXT[:-1]}g", -errno.EINVAL),  # not hex
    (f" vf_token={TOKEN_TEXT.replace('-', '_')}", -errno.EINVAL),  # no dashes
    (f" vf_token={TOKEN_TEXT}x", -errno.EINVAL),  # anything after the UUID
    (f" vf_token={TOKEN_TEXT} vf_token={TOKEN_TEXT}", -errno.EINVAL),  # twice
    (" foo=1", -errno.EINVAL),  # unknown option
    (f" VF_TOKEN={TOKEN_TEXT}", -errno.EINVAL),  # the option name is case-sensitive
])
def test_name_suffix_parsing(suffix: str, want: int) -> None:
    w = world()
    set_token(w, pf_cdev(w))
    g = group_with_container(w, 22)
    assert get_fd(w, g, VF0 + suffix) == want


def test_pf_needs_the_token_only_while_a_vf_is_open() -> None:
    w = world("6.6")
    g21 = group_with_container(w, 21)
    pf_fd = get_fd(w, g21, PF)  # no VF open: no token needed
    assert pf_fd >= 0
    pf = w.proc.fds[pf_fd]
    assert isinstance(pf, File)
    set_token(w, pf)
    g22 = group_with_container(w, 22)
    vf_fd = get_fd(w, g22, f"{VF0} vf_token={TOKEN_TEXT}")
    assert vf_fd >= 0
    assert get_fd(w, g21, PF) == -errno.EACCES
    assert get_fd(w, g21, f"{PF} vf_token={OTHER_TEXT}") == -errno.EACCES
    assert w.dev(PF)["vf_token"] == TOKEN_TEXT  # a wrong token does not replace it
    pf_fd2 = get_fd(w, g21, f"{PF} vf_token={TOKEN_TEXT}")
    assert pf_fd2 >= 0
    w.close(vf_fd)
    pf_fd3 = get_fd(w, g21, PF)
    assert pf_fd3 >= 0


def test_pf_name_with_token_sets_it_while_no_vf_is_open() -> None:
    w = world("6.6")
    g21 = group_with_container(w, 21)
    assert get_fd(w, g21, f"{PF} vf_token={TOKEN_TEXT}") >= 0
    assert w.dev(PF)["vf_token"] == TOKEN_TEXT
    g23 = group_with_container(w, 23)
    assert get_fd(w, g23, f"{VF1} vf_token={OTHER_TEXT}") == -errno.EACCES
    assert get_fd(w, g23, f"{VF1} vf_token={TOKEN_TEXT}") >= 0
    # with VF1 open the PF's token is checked, not set
    assert get_fd(w, g21, f"{PF} vf_token={OTHER_TEXT}") == -errno.EACCES
    assert w.dev(PF)["vf_token"] == TOKEN_TEXT


def test_token_for_a_device_that_is_neither_pf_nor_vf_is_einval() -> None:
    w = world(path=FIXTURES / "dual-function-nic.toml")
    g = group_with_container(w, 13)
    assert get_fd(w, g, f"0000:01:00.0 vf_token={TOKEN_TEXT}") == -errno.EINVAL
    assert get_fd(w, g, "0000:01:00.0") >= 0


def _host_pf_tree(tmp_path: Path) -> Path:
    text = SRIOV.read_text().replace('driver = "vfio-pci"\niommu_group = 21', 'driver = "ixgbe"\niommu_group = 21')
    assert 'driver = "ixgbe"' in text
    p = tmp_path / "host-pf.toml"
    p.write_text(text.replace("enable_sriov = true", "enable_sriov = false"))
    return p


@pytest.mark.parametrize("version", ["6.6", "6.18"])
def test_vf_of_a_host_driver_pf_takes_no_token(tmp_path: Path, version: str) -> None:
    w = world(version, _host_pf_tree(tmp_path))
    g = group_with_container(w, 22)
    assert get_fd(w, g, f"{VF0} vf_token={TOKEN_TEXT}") == -errno.EINVAL
    assert get_fd(w, g, VF0) >= 0
    # the cdev path of the other VF: no token needed, a token refused (6.16+)
    if w.k.version.has_bind_token:
        _, rc = bound_cdev(w, w.dev(VF1)["vfio"], TOKEN)
        assert rc == -errno.EINVAL
    _, rc = bound_cdev(w, w.dev(VF1)["vfio"])
    assert rc == 0


# --------------------------------------------------------------------------
# The cdev BIND token (6.16+) and its absence before
# --------------------------------------------------------------------------


def test_bind_token_rules_on_6_18() -> None:
    w = world("6.18")
    set_token(w, pf_cdev(w))
    _, rc = bound_cdev(w, 1)
    assert rc == -errno.EACCES  # no flag: match_token_uuid(NULL) on a VF of a vfio-pci PF
    _, rc = bound_cdev(w, 1, bytes(16))
    assert rc == -errno.EACCES
    _, rc = bound_cdev(w, 1, flags=T)  # the flag with a NULL pointer
    assert rc == -errno.EFAULT
    assert w.dev(VF0)["open_count"] == 0 and not w.dev(VF0)["cdev_opened"]
    vf, rc = bound_cdev(w, 1, TOKEN)
    assert rc == 0
    assert w.dev(VF0)["cdev_opened"] and w.dev(PF)["vf_token_users"] == 1
    vf.release()
    assert w.k.check_invariants() == [] and w.dev(PF)["vf_token_users"] == 0


def test_bind_of_the_pf_needs_the_token_while_a_vf_is_open() -> None:
    w = world("6.18")
    pf = pf_cdev(w)  # no VF open: bound without a token
    set_token(w, pf)
    pf.release()
    assert w.k.check_invariants() == [] and w.dev(PF)["vf_token"] == TOKEN_TEXT
    g = group_with_container(w, 22)
    assert get_fd(w, g, f"{VF0} vf_token={TOKEN_TEXT}") >= 0
    _, rc = bound_cdev(w, 0)
    assert rc == -errno.EACCES
    _, rc = bound_cdev(w, 0, bytes(16))
    assert rc == -errno.EACCES
    _, rc = bound_cdev(w, 0, TOKEN)
    assert rc == 0


@pytest.mark.parametrize("version", ["6.6", "6.15"])
def test_bind_checks_no_token_before_6_16(version: str) -> None:
    w = world(version)
    set_token(w, pf_cdev(w))
    _, rc = bound_cdev(w, 1)
    assert rc == 0  # the missed check fixed by 86624ba3b522 (6.16)
    assert w.dev(PF)["vf_token_users"] == 1


def test_pf_with_vfs_enabled_cannot_be_bound_to_vfio_pci(tmp_path: Path) -> None:
    w = world(None, _host_pf_tree(tmp_path))
    k = w.k
    k.unbind_driver(PF)
    k.driver_override_store(PF, b"vfio-pci\n")
    with pytest.raises(KernelError) as e:
        k.bind_store("vfio-pci", PF.encode())
    assert e.value.errno == errno.EBUSY  # vfio_pci_core_register_device: SR-IOV enabled
    assert k.topology.find(PF).driver is None  # type: ignore[union-attr]
    assert k.check_invariants() == []


def test_describe_names_the_physfn() -> None:
    w = world()
    assert w.dev(VF0)["physfn"] == PF and w.dev(VF1)["physfn"] == PF
    assert "physfn" not in w.dev(PF) and "vf_token" not in w.dev(VF0)
    pdev = w.k.topology.find(PF)
    assert pdev is not None and [v.name for v in pdev.virtfns] == [VF0, VF1]
