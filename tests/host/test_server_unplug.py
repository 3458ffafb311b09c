"""Server.unplug: a real process holding a device sees REQ, keeps a working fd,
and after its close the nodes (and the sysfs entries) are gone from the mount."""

from __future__ import annotations

import errno
import os
import struct
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from fakedev.fuse import mount as M
from fakedev.host import sysfs as SYS
from fakedev.host.server import Server
from fakedev.kernel import kernel as kernel_mod
from fakedev.kernel.kernel import Kernel
from fakedev.kernel.pci import PciTopology
from fakedev.uapi import consts as C
from tests.kernel import topologies

CLIENT = str(Path(__file__).with_name("unplug_client.py"))
F0, F1 = "0000:01:00.0", "0000:01:00.1"


def _index(k: Kernel) -> dict[str, int]:
    return {d.name: d.index for d in k.vfio_devices()}


# ------------------------------------------------------------------ sysfs alone


def test_sysfs_remove_vanished(tmp_path: Path) -> None:
    k = Kernel(topologies.build("dual-function-nic"))
    SYS.generate_sysfs(tmp_path, k.topology, k.nodes(), _index(k))
    before = SYS.sysfs_view(k.topology, k.nodes(), _index(k))
    sysd = tmp_path / "sys"
    dev0 = sysd / "devices/pci0000:00/0000:00:1c.0" / F0
    assert dev0.is_dir() and (dev0 / "vfio-dev/vfio0").is_dir()
    k.unplug_device(F0)  # not open: gone at once
    after = SYS.sysfs_view(k.topology, k.nodes(), _index(k))
    gone = SYS.remove_vanished(tmp_path, before, after)
    assert gone == [F0, "vfio group 13", "iommu group 13"]
    for rel in (f"devices/pci0000:00/0000:00:1c.0/{F0}", f"bus/pci/devices/{F0}",
                f"bus/pci/drivers/vfio-pci/{F0}", "class/vfio-dev/vfio0", "class/vfio/13",
                "devices/virtual/vfio/13", "kernel/iommu_groups/13"):
        assert not os.path.lexists(sysd / rel), rel
    for rel in (f"devices/pci0000:00/0000:00:1c.0/{F1}/vfio-dev/vfio1", f"bus/pci/devices/{F1}",
                "class/vfio-dev/vfio1", "class/vfio/14", "kernel/iommu_groups/14/devices/" + F1):
        assert os.path.lexists(sysd / rel), rel
    assert os.path.exists(sysd / "bus/pci/devices" / F1 / "config")
    # the bridge, and with it everything below
    k.unplug_device("0000:00:1c.0")
    gone = SYS.remove_vanished(tmp_path, after, SYS.sysfs_view(k.topology, k.nodes(), _index(k)))
    assert set(gone) >= {"0000:00:1c.0", F1}
    assert sorted(os.listdir(sysd / "bus/pci/devices")) == []
    assert not os.path.lexists(sysd / "devices/pci0000:00/0000:00:1c.0")


def test_unplug_not_serving_changes_the_model_only() -> None:
    k = Kernel(topologies.build("dual-function-nic"))
    srv = Server(k)
    srv.unplug(F1)
    assert [d.name for d in k.vfio_devices()] == [F0]
    with pytest.raises(kernel_mod.KernelError) as e:
        srv.unplug("0000:07:00.0")
    assert e.value.errno == errno.ENODEV


def test_unplug_needs_a_model_that_can() -> None:
    class Plain:
        topology = PciTopology()

        def nodes(self) -> list[object]:
            return []

    srv = Server(Plain())  # type: ignore[arg-type]
    with pytest.raises(kernel_mod.KernelError) as e:
        srv.unplug(F0)
    assert e.value.errno == errno.ENOSYS


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
    k = Kernel(topologies.build("dual-function-nic"))
    srv = Server(k)
    SYS.generate_sysfs(tmp_path / "sysroot", k.topology, k.nodes(), _index(k))
    srv.sysfs_root = tmp_path / "sysroot"
    await nursery.start(srv.serve, str(mnt))
    yield k, srv


class Client:
    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        assert proc.stdout is not None and proc.stdin is not None
        self._out = proc.stdout
        self._in = proc.stdin
        self._buf = b""

    async def line(self) -> str:
        with trio.fail_after(30):
            while b"\n" not in self._buf:
                chunk = await self._out.receive_some(4096)
                assert chunk, "client exited"
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    async def finish(self) -> None:
        """End of input: the client exits (0)."""
        await self._in.aclose()
        with trio.fail_after(30):
            assert await self.proc.wait() == 0

    async def ask(self, cmd: str) -> str:
        await self._in.send_all(cmd.encode() + b"\n")
        return await self.line()


async def start_client(nursery: trio.Nursery, mnt: Path, name: str) -> Client:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = await trio.lowlevel.open_process([sys.executable, CLIENT, str(mnt), name], stdin=-1, stdout=-1,
                                            env=env)
    nursery.start_soon(proc.wait)
    c = Client(proc)
    assert await c.line() == "ready"
    return c


def _try(fn: object) -> int:
    try:
        fn()  # type: ignore[operator]
    except OSError as e:
        return e.errno or -1
    return 0


async def in_thread(fn: object) -> int:
    return await trio.to_thread.run_sync(_try, fn)


async def removed(k: Kernel, srv: Server, path: Path) -> None:
    """Wait until the model has no removal pending and ``path`` stats as gone."""
    with trio.fail_after(20):
        while True:
            async with srv.lock:
                pending = bool(k.unplugs)
            if not pending and await in_thread(lambda: os.stat(path)) == errno.ENOENT:
                return
            await trio.sleep(0.02)


@pytest.mark.needs_root
async def test_unplug_open_device_req_then_gone(served: tuple[Kernel, Server], mnt: Path, tmp_path: Path,
                                                nursery: trio.Nursery) -> None:
    k, srv = served
    devs = mnt / "vfio/devices"
    assert sorted(await trio.to_thread.run_sync(os.listdir, devs)) == ["vfio0", "vfio1"]
    await trio.to_thread.run_sync(os.stat, devs / "vfio0")  # a cached dentry to invalidate
    await trio.to_thread.run_sync(os.stat, mnt / "vfio/13")
    c = await start_client(nursery, mnt, "vfio0")
    await srv.locked(lambda: srv.unplug(F0))
    assert await c.ask("wait") == "req 1"
    # pending: the node stays, new opens fail as the kernel's do, the holder works
    assert sorted(await trio.to_thread.run_sync(os.listdir, devs)) == ["vfio0", "vfio1"]
    assert await in_thread(lambda: os.close(os.open(devs / "vfio0", os.O_RDWR))) == errno.ENODEV
    assert await c.ask("info") == f"info {C.VFIO_PCI_NUM_REGIONS} {C.VFIO_PCI_NUM_IRQS}"
    async with srv.lock:
        assert k.check_invariants() == []
        assert k.describe()["unplugs"][0]["waiting_for"] == F0
    assert await c.ask("close") == "closed"
    await removed(k, srv, devs / "vfio0")
    assert sorted(await trio.to_thread.run_sync(os.listdir, devs)) == ["vfio1"]
    assert await in_thread(lambda: os.stat(mnt / "vfio/13")) == errno.ENOENT
    assert sorted(await trio.to_thread.run_sync(os.listdir, mnt / "vfio")) == ["14", "devices", "vfio"]
    async with srv.lock:
        assert k.check_invariants() == []
        assert [d.name for d in k.vfio_devices()] == [F1]
        assert F0 not in {p.name for p in k.topology.devices()}
    sysd = tmp_path / "sysroot/sys"
    assert not os.path.lexists(sysd / "bus/pci/devices" / F0)
    assert not os.path.lexists(sysd / "class/vfio-dev/vfio0")
    assert not os.path.lexists(sysd / "kernel/iommu_groups/13")
    assert os.path.lexists(sysd / "bus/pci/devices" / F1)
    # the survivor still serves
    assert await in_thread(lambda: os.close(os.open(devs / "vfio1", os.O_RDWR))) == 0
    await c.finish()
    assert srv.unexpected_errors == 0


@pytest.mark.needs_root
async def test_req_asked_again_while_held(served: tuple[Kernel, Server], mnt: Path, nursery: trio.Nursery,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    k, srv = served
    monkeypatch.setattr(kernel_mod, "UNPLUG_REQUEST_INTERVAL", 0.1)
    c = await start_client(nursery, mnt, "vfio1")
    await srv.locked(lambda: srv.unplug(F1))
    assert await c.ask("wait") == "req 1"
    # the server's timer asks again (count 1, 2, ...) while the device is held
    assert (await c.ask("wait")).startswith("req ")
    async with srv.lock:
        assert k.device(F1).request_count >= 2
    assert await c.ask("close") == "closed"
    await removed(k, srv, mnt / "vfio/devices/vfio1")
    async with srv.lock:
        assert k.check_invariants() == [] and not k.unplugs
    await c.finish()


@pytest.mark.needs_root
async def test_unplug_unheld_device_gone_at_once(served: tuple[Kernel, Server], mnt: Path) -> None:
    k, srv = served
    await trio.to_thread.run_sync(os.stat, mnt / "vfio/devices/vfio1")
    await srv.locked(lambda: srv.unplug(F1))
    await removed(k, srv, mnt / "vfio/devices/vfio1")
    assert sorted(await trio.to_thread.run_sync(os.listdir, mnt / "vfio/devices")) == ["vfio0"]
    with pytest.raises(kernel_mod.KernelError) as e:
        await srv.locked(lambda: srv.unplug(F1))
    assert e.value.errno == errno.ENODEV


def test_inval_notifications_wire_format() -> None:
    from fakedev.fuse import protocol as P

    m = P.notify_inval_entry(7, "vfio0")
    assert m == (struct.pack("<IiQ", 16 + 16 + 6, P.FUSE_NOTIFY_INVAL_ENTRY, 0)
                 + struct.pack("<QII", 7, 5, 0) + b"vfio0\0")
    m = P.notify_inval_inode(9)
    assert m == struct.pack("<IiQ", 16 + 24, P.FUSE_NOTIFY_INVAL_INODE, 0) + struct.pack("<Qqq", 9, 0, 0)


@pytest.mark.needs_root
async def test_refresh_nodes_after_driver_changes(served: tuple[Kernel, Server], mnt: Path,
                                                  tmp_path: Path) -> None:
    k, srv = served
    devs = mnt / "vfio/devices"
    ino0 = (await trio.to_thread.run_sync(os.stat, devs / "vfio0")).st_ino
    await trio.to_thread.run_sync(os.stat, devs / "vfio1")

    def unbind() -> None:
        k.unbind_driver(F1)
        srv.refresh_nodes()

    await srv.locked(unbind)
    with trio.fail_after(20):
        while await in_thread(lambda: os.stat(devs / "vfio1")) != errno.ENOENT:
            await trio.sleep(0.02)
    assert sorted(await trio.to_thread.run_sync(os.listdir, devs)) == ["vfio0"]
    assert sorted(await trio.to_thread.run_sync(os.listdir, mnt / "vfio")) == ["13", "devices", "vfio"]
    # the function stays on the bus; only its vfio-dev entries left the sysfs
    sysd = tmp_path / "sysroot/sys"
    assert os.path.lexists(sysd / "bus/pci/devices" / F1)
    assert not os.path.lexists(sysd / "class/vfio-dev/vfio1")

    def bind() -> None:
        k.bind_driver(F1, "vfio-pci")
        srv.refresh_nodes()

    await srv.locked(bind)
    st = await trio.to_thread.run_sync(os.stat, devs / "vfio1")
    assert st.st_ino != ino0
    assert (await trio.to_thread.run_sync(os.stat, devs / "vfio0")).st_ino == ino0  # unchanged
    assert await in_thread(lambda: os.close(os.open(devs / "vfio1", os.O_RDWR))) == 0
    assert await in_thread(lambda: os.close(os.open(mnt / "vfio/14", os.O_RDWR))) == 0
    with trio.fail_after(10):
        while srv.open_files:
            await trio.sleep(0.01)
    async with srv.lock:
        assert k.check_invariants() == []
