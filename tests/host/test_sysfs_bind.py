"""The sysfs of driver binding: ``update_sysfs`` writes what a bind adds (driver
links, vfio-dev, vfio group) and removes what an unbind takes; the server
serves the writable attributes under ``.fakedev/sysfs`` (the paths ``fakedev
mount`` users write, and what ``fakedev run`` bind-mounts over /sys), with the
kernel's errnos and an unbind of a held device answered at the release."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from fakedev.fuse import mount as M
from fakedev.host import sysfs as SYS
from fakedev.host.server import Server
from fakedev.kernel.kernel import Kernel
from tests.host.test_server_unplug import start_client
from tests.kernel import topologies

F0, F1 = "0000:01:00.0", "0000:01:00.1"
DEV1 = "devices/pci0000:00/0000:00:1c.0/" + F1
LSPCI = shutil.which("lspci") or "/usr/bin/lspci"


def _index(k: Kernel) -> dict[str, int]:
    return {d.name: d.index for d in k.vfio_devices()}


def view(k: Kernel) -> SYS.SysfsView:
    return SYS.sysfs_view(k.topology, k.nodes(), _index(k))


def lspci_driver(sysd: Path, bdf: str) -> str:
    out = subprocess.run([LSPCI, "-A", "linux-sysfs", "-O", f"sysfs.path={sysd}/bus/pci", "-k", "-s", bdf],
                         capture_output=True, text=True, check=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if "driver in use" in line), "")


def test_update_sysfs_follows_a_bind_and_an_unbind(tmp_path: Path) -> None:
    k = Kernel(topologies.build("host-driver-sibling"))
    SYS.generate_sysfs(tmp_path, k.topology, k.nodes(), _index(k))
    sysd = tmp_path / "sys"
    assert os.readlink(sysd / DEV1 / "driver") == "../../../../bus/pci/drivers/igb"
    assert lspci_driver(sysd, "01:00.1") == "igb"
    assert (sysd / "bus/pci/drivers_probe").exists()
    before = view(k)
    k.driver_override_store(F1, b"vfio-pci")
    k.unbind_store("igb", F1.encode())
    mid = view(k)
    SYS.update_sysfs(tmp_path, before, mid, k.nodes())
    assert not os.path.lexists(sysd / DEV1 / "driver")
    assert not os.path.lexists(sysd / "bus/pci/drivers/igb" / F1)
    assert "DRIVER=" not in (sysd / DEV1 / "uevent").read_text()
    assert lspci_driver(sysd, "01:00.1") == ""
    k.drivers_probe_store(F1.encode())
    after = view(k)
    changed = SYS.update_sysfs(tmp_path, mid, after, k.nodes())
    assert sorted(changed) == [f"{F1} driver vfio-pci", "vfio group 14", "vfio1"]
    assert os.readlink(sysd / DEV1 / "driver") == "../../../../bus/pci/drivers/vfio-pci"
    assert (sysd / "bus/pci/drivers/vfio-pci" / F1 / "vendor").exists()  # the link resolves
    assert (sysd / DEV1 / "vfio-dev/vfio1/dev").read_text() == "242:1\n"
    assert (sysd / "class/vfio-dev/vfio1/dev").read_text() == "242:1\n"
    assert (sysd / "class/vfio/14/dev").read_text().startswith("243:")
    assert (sysd / DEV1 / "uevent").read_text().startswith("DRIVER=vfio-pci\n")
    assert os.readlink(sysd / DEV1 / "iommu_group") == "../../../../kernel/iommu_groups/14"
    assert lspci_driver(sysd, "01:00.1") == "vfio-pci"
    # and back: the vfio entries go
    k.unbind_store("vfio-pci", F1.encode())
    k.driver_override_store(F1, b"\n")
    k.drivers_probe_store(F1.encode())
    SYS.update_sysfs(tmp_path, after, view(k), k.nodes())
    assert not os.path.lexists(sysd / DEV1 / "vfio-dev")
    assert not os.path.lexists(sysd / "class/vfio-dev/vfio1")
    assert not os.path.lexists(sysd / "class/vfio/14")
    assert not os.path.lexists(sysd / "bus/pci/drivers/vfio-pci" / F1)
    assert lspci_driver(sysd, "01:00.1") == "igb"


def test_writable_attributes() -> None:
    k = Kernel(topologies.build("host-driver-sibling"))
    attrs = {a.sys_rel: a for a in SYS.writable_attributes(k.topology, k.drivers)}
    assert attrs["bus/pci/drivers_probe"].kind == "drivers_probe"
    assert attrs["bus/pci/drivers/igb/bind"].arg == "igb"
    assert attrs["bus/pci/drivers/vfio-pci/unbind"].fuse_rel == ".fakedev/sysfs/bus/pci/drivers/vfio-pci/unbind"
    a = attrs[f"{DEV1}/driver_override"]
    assert (a.kind, a.arg, a.mode, a.fuse_rel) == ("driver_override", F1, 0o644,
                                                   f".fakedev/sysfs/bus/pci/devices/{F1}/driver_override")
    assert f"{DEV1}/remove" in attrs
    for pdev in k.topology.devices():  # reset only where a method probed (as generated)
        assert (f"{SYS.device_path(pdev)}/reset" in attrs) == bool(pdev.reset_methods())
    assert {a.arg for a in attrs.values() if a.kind == "bind"} == {"igb", "pcieport", "vfio-pci"}


# ------------------------------------------------------------------ served


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    m = tmp_path / "mnt"
    m.mkdir()
    yield m
    M.clear_stale(str(m))
    assert not M.mounts_at(str(m))


@pytest.fixture
async def served(mnt: Path, tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[tuple[Kernel, Server]]:
    k = Kernel(topologies.build("host-driver-sibling"))
    srv = Server(k)
    SYS.generate_sysfs(tmp_path / "sysroot", k.topology, k.nodes(), _index(k))
    srv.sysfs_root = tmp_path / "sysroot"
    await nursery.start(srv.serve, str(mnt))
    yield k, srv


def write(path: Path, data: bytes) -> int:
    """0 or the errno of one write (the file opened as a shell's ``>`` does)."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, data)
        return 0
    except OSError as e:
        return e.errno or -1
    finally:
        os.close(fd)


async def in_thread(fn: object) -> int:
    def run() -> int:
        try:
            fn()  # type: ignore[operator]
            return 0
        except OSError as e:
            return e.errno or -1

    return await trio.to_thread.run_sync(run)


@pytest.mark.needs_root
async def test_served_attributes_bind_and_unbind(served: tuple[Kernel, Server], mnt: Path,
                                                 tmp_path: Path) -> None:
    k, srv = served
    attrs = mnt / ".fakedev/sysfs/bus/pci"
    ov = attrs / "devices" / F1 / "driver_override"
    assert await trio.to_thread.run_sync(ov.read_text) == "(null)\n"
    assert await trio.to_thread.run_sync(write, ov, b"vfio-pci\n") == 0
    assert await trio.to_thread.run_sync(ov.read_text) == "vfio-pci\n"
    # write-only files: no read (kernfs has no show method for them)
    assert await in_thread(lambda: os.open(attrs / "drivers_probe", os.O_RDONLY)) == errno.EACCES
    assert await trio.to_thread.run_sync(write, attrs / "drivers/vfio-pci/bind", F1.encode()) == errno.EBUSY
    assert await trio.to_thread.run_sync(write, attrs / "drivers/vfio-pci/unbind", F1.encode()) == errno.ENODEV
    assert await trio.to_thread.run_sync(write, attrs / "drivers/igb/unbind", F1.encode() + b"\n") == 0
    assert await trio.to_thread.run_sync(write, attrs / "drivers_probe", F1.encode()) == 0
    # when the write returns, the node is served and the sysfs shows the bind
    assert sorted(await trio.to_thread.run_sync(os.listdir, mnt / "vfio/devices")) == ["vfio0", "vfio1"]
    sysd = tmp_path / "sysroot/sys"
    assert (sysd / DEV1 / "vfio-dev/vfio1/dev").read_text() == "242:1\n"
    assert os.readlink(sysd / DEV1 / "driver").endswith("/vfio-pci")
    # a program holds vfio1: the unbind waits for its release, REQ asks for it
    async with trio.open_nursery() as nursery:
        c = await start_client(nursery, mnt, "vfio1")  # bound, REQ eventfd set: "ready"
        done = trio.Event()
        result: list[int] = []

        async def unbind() -> None:
            result.append(await trio.to_thread.run_sync(write, attrs / "drivers/vfio-pci/unbind", F1.encode()))
            done.set()

        nursery.start_soon(unbind)
        assert await c.ask("wait") == "req 1"
        await trio.sleep(0.3)
        assert not done.is_set()
        assert await c.ask("info") == "info 9 5"
        async with srv.lock:
            assert k.describe()["unbinds"][0]["bdf"] == F1
            assert k.check_invariants() == []
        assert await c.ask("close") == "closed"
        with trio.fail_after(20):
            await done.wait()
        assert result == [0]
        await c.finish()
    assert sorted(await trio.to_thread.run_sync(os.listdir, mnt / "vfio/devices")) == ["vfio0"]
    assert not os.path.lexists(sysd / DEV1 / "vfio-dev")
    async with srv.lock:
        assert k.check_invariants() == []
        assert k.describe()["drivers"][F1] is None
    assert srv.unexpected_errors == 0
