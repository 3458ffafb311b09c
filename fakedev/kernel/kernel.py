"""The kernel facade: one machine's VFIO + iommufd state behind /dev nodes.

``Kernel(topology, version, clock)`` probes vfio-pci on every function whose
``driver`` is "vfio-pci" (in topology walk order: vfio0, vfio1, ...), creates
the VFIO groups and dev_sets, and serves ``open`` of the nodes it lists in
``nodes()``. It also offers what tests and ``fakedev show`` need: the reset
log, fault hooks, ``check_invariants`` and ``describe``. Sans-I/O like the
rest of the model.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from fakedev.kernel.dma import Dma, DmaMaster, DmaMemory, DmaPort
from fakedev.kernel.errors import KernelError
from fakedev.kernel.fault_inject import FaultPlan
from fakedev.kernel.file import DevNode, File
from fakedev.kernel.iommu import (
    DRIVER_MANAGED_DMA,
    IommuGroup,
    build_iommu_groups,
    iommu_check_invariants,
)
from fakedev.kernel.pci import PciDev, PciTopology
from fakedev.kernel.task import Task
from fakedev.kernel.version import NEWEST, KernelVersion
from fakedev.kernel.vfio.container import VfioContainerFile
from fakedev.kernel.vfio.device_cdev import vfio_device_fops_cdev_open
from fakedev.kernel.vfio.group import VfioGroup, vfio_group_fops_open
from fakedev.kernel.vfio.pci.vfio_pci_core import VfioPciDevice
from fakedev.kernel.vfio.pci.vfio_pci_rdwr import BarBehaviour
from fakedev.kernel.vfio.vfio_main import (
    KernelHooks,
    ResetRecord,
    Vfio,
    VfioDevice,
    vfio_device_registration_held,
)

#: /dev/vfio/vfio: misc device VFIO_MINOR
VFIO_MISC_MAJOR = 10
VFIO_MINOR = 196
#: /dev/iommu: a dynamic misc minor
IOMMU_MINOR = 123
#: dynamic chrdev majors as the kernel would hand them out ("vfio", then "vfio-dev")
VFIO_GROUP_MAJOR = 243
VFIO_DEV_MAJOR = 242
#: vfio_unregister_group_dev() asks again after each wait of HZ * 10
UNPLUG_REQUEST_INTERVAL = 10.0

__all__ = [
    "IOMMU_MINOR",
    "VFIO_DEV_MAJOR",
    "VFIO_GROUP_MAJOR",
    "VFIO_MINOR",
    "Kernel",
    "KernelHooks",
    "PendingUnplug",
    "ResetRecord",
    "VfioPciDevice",
]


class PendingUnplug:
    """One removal of a PCI function (and everything below it) not yet finished.

    Removals are serialized as the kernel serializes them (every path takes
    pci_lock_rescan_remove()): only the first of ``Kernel.unplugs`` makes
    progress; the others wait, their devices fully usable. ``to_stop`` is the
    pci_stop_bus_device() order still to go; ``device`` the vfio device whose
    release it is waiting for, asked ``device.request_count`` times so far.
    """

    def __init__(self, pdev: PciDev, to_stop: list[PciDev]) -> None:
        self.pdev = pdev
        self.to_stop = to_stop
        self.device: VfioDevice | None = None
        self.next_request: float | None = None

    def __repr__(self) -> str:
        return f"<PendingUnplug {self.pdev.name} waiting={self.device.name if self.device else None}>"


def pci_stop_order(pdev: PciDev) -> list[PciDev]:
    """Models the pci_stop_bus_device() walk: below a bridge the children in
    reverse bus order (each recursively) first, then the device itself."""
    out: list[PciDev] = []
    if pdev.subordinate is not None:
        for child in reversed(pdev.subordinate.devices):
            out.extend(pci_stop_order(child))
    out.append(pdev)
    return out


class Kernel:
    """One simulated machine: its PCI topology, iommu groups, VFIO and iommufd.

    ``behaviours`` maps a BDF to the ``BarBehaviour`` of that function (default:
    RAM-backed BARs); a behaviour that does DMA (``DmaMaster``) is connected to
    its device's ``DmaPort`` at probe. ``dma`` is the machine's DMA path
    (``fakedev.kernel.dma.Dma``): the host installs its ``DmaMemory`` there
    (``dma_memory``), tests a fake one. ``bar_mmap`` makes REGION_INFO advertise mmap-able BARs as
    the real kernel does (off by default: through FUSE an mmap cannot work).
    """

    def __init__(self, topology: PciTopology, version: KernelVersion = NEWEST,
                 clock: Callable[[], float] | None = None,
                 behaviours: dict[str, BarBehaviour] | None = None, *, bar_mmap: bool = False,
                 dma_memory: DmaMemory | None = None) -> None:
        self.topology = topology
        self.dma = Dma(dma_memory)
        self.version = version
        self.vfio = Vfio(version, clock)
        self.vfio.bar_mmap = bar_mmap
        self.iommu_groups: dict[int, IommuGroup] = build_iommu_groups(topology)
        self.vfio.iommu_groups = self.iommu_groups
        self._ictx_names: dict[int, str] = {}
        self._ictxs: list[Any] = []
        self._ictx_seq = 0
        self._behaviours = behaviours or {}
        #: removals in progress, the first one active (see PendingUnplug)
        self.unplugs: list[PendingUnplug] = []
        #: the clock of the REQ re-request timer (seconds); the model's clock by default
        self.unplug_clock: Callable[[], float] = self.vfio.clock
        #: vfio groups removed from the system whose group file is still open
        self._dead_groups: list[VfioGroup] = []
        self.vfio.on_registration_released = self._registration_released
        for pdev in topology.devices():
            if pdev.driver == "vfio-pci" and pdev.iommu_group is not None:
                self._vfio_pci_probe(pdev)
        #: fault injection (fakedev.kernel.fault_inject): rules, hooks, unplugs
        self.faults = FaultPlan(self.vfio, [p.name for p in topology.devices()])

    # -- driver binding -------------------------------------------------------------
    def _vfio_pci_probe(self, pdev: PciDev) -> VfioPciDevice:
        """Models vfio_pci_probe() -> vfio_pci_core_register_device(): index and group minor lowest free."""
        assert pdev.iommu_group is not None
        igroup = self.iommu_groups[pdev.iommu_group]
        group = self.vfio.groups.get(igroup.id)
        if group is None:
            self._dead_groups = [g for g in self._dead_groups if g.opened_file is not None]
            minors = {g.minor for g in self.vfio.groups.values()} | {g.minor for g in self._dead_groups}
            group = VfioGroup(igroup, minor=min(set(range(len(minors) + 1)) - minors))
            self.vfio.groups[igroup.id] = group
        used = {d.index for d in self.vfio.devices}
        index = min(set(range(len(used) + 1)) - used)
        dev = VfioPciDevice(self.vfio, pdev, index, group, self._behaviours.get(pdev.name))
        if isinstance(dev.behaviour, DmaMaster):
            dev.behaviour.connect(DmaPort(self.dma, dev))
        group.devices.append(dev)
        self.vfio.devices.append(dev)
        return dev

    def unbind_driver(self, bdf: str) -> None:
        """Write of ``bdf`` to .../driver/unbind.

        For vfio-pci this is vfio_pci_remove(): while the device is open (or a
        cdev fd is open) the kernel waits, asking the user to let go through the
        REQ eventfd; the model signals REQ and answers EBUSY instead of blocking.
        """
        pdev = self.topology.find(bdf)
        if pdev is None or pdev.driver is None:
            raise KernelError(errno.ENODEV, f"{bdf} is not bound")
        if pdev.driver == "vfio-pci":
            dev = self.vfio.device_of(pdev)
            if dev is not None:
                if dev.open_count or dev.cdev_files:
                    if isinstance(dev, VfioPciDevice):
                        dev.irqs.raise_irq(4)  # vfio_pci_core_request()
                    raise KernelError(errno.EBUSY, f"{bdf} is in use")
                self.vfio.devices.remove(dev)
                dev.group.devices.remove(dev)
                if not dev.group.devices:
                    del self.vfio.groups[dev.group.id]
                dev.dev_set.device_list.remove(dev)
                if not dev.dev_set.device_list:
                    self.vfio.dev_sets.remove(dev.dev_set)
        pdev.driver = None

    def bind_driver(self, bdf: str, driver: str) -> None:
        """Write of ``bdf`` to /sys/bus/pci/drivers/<driver>/bind (probe)."""
        pdev = self.topology.find(bdf)
        if pdev is None or pdev.driver is not None:
            raise KernelError(errno.ENODEV, f"{bdf} is not an unbound device")
        ig = self.iommu_groups.get(pdev.iommu_group) if pdev.iommu_group is not None else None
        if driver == "vfio-pci":
            if ig is None:
                raise KernelError(errno.EINVAL, f"{bdf} has no iommu group")
            pdev.driver = driver
            self._vfio_pci_probe(pdev)
            return
        if driver not in DRIVER_MANAGED_DMA and ig is not None and ig.user_owned:
            # iommu_device_use_default_domain(): the group is owned by a user
            raise KernelError(errno.EBUSY, f"iommu group {ig.id} is owned by a user")
        pdev.driver = driver

    # -- hot removal ------------------------------------------------------------------
    def unplug_device(self, bdf: str) -> None:
        """Removal of the PCI function ``bdf`` (sysfs ``remove``, or a hot-unplug).

        Models pci_stop_and_remove_bus_device(): every driver below and on
        ``bdf`` is released first (for vfio-pci, vfio_pci_remove() ->
        vfio_unregister_group_dev(), which waits while a file holds the device,
        signalling the REQ eventfd at once and again every 10 s), then the
        functions leave the bus. Returns at once; the removal stays pending
        (``unplugs``) while a file holds the device and completes at its last
        close. ENODEV for a BDF not in the topology; a function already queued
        for removal is not queued twice (the second remove just waits).
        """
        pdev = self.topology.find(bdf)
        if pdev is None:
            raise KernelError(errno.ENODEV, f"no PCI device {bdf}")
        if any(u.pdev is pdev for u in self.unplugs):
            return
        self.unplugs.append(PendingUnplug(pdev, pci_stop_order(pdev)))
        if len(self.unplugs) == 1:
            self._unplug_run()

    def unplug_tick(self, now: float | None = None) -> float | None:
        """The re-request timer: at each 10 s wait that timed out, ops->request
        again with the next count. Returns when it next needs a tick (None:
        nothing pending)."""
        if not self.unplugs:
            return None
        now = self.unplug_clock() if now is None else now
        u = self.unplugs[0]
        dev = u.device
        if dev is None:
            return None
        if u.next_request is None:
            u.next_request = now + UNPLUG_REQUEST_INTERVAL
        elif now >= u.next_request:
            dev.request(dev.request_count)
            dev.request_count += 1
            u.next_request = now + UNPLUG_REQUEST_INTERVAL
        return u.next_request

    def set_unplug_clock(self, clock: Callable[[], float]) -> None:
        """Use ``clock`` (seconds) for the REQ re-request timer (a server's real clock)."""
        self.unplug_clock = clock

    def unplug_pending(self, bdf: str) -> bool:
        """True while a removal covering ``bdf`` is queued or waiting."""
        pdev = self.topology.find(bdf)
        return pdev is not None and any(pdev in u.to_stop for u in self.unplugs)

    def _registration_released(self, dev: VfioDevice) -> None:
        """complete(&device->comp): the waiting removal goes on."""
        if self.unplugs and self.unplugs[0].device is dev:
            self._unplug_run()

    def _unplug_run(self) -> None:
        """Advance the queue head until it waits on a held device or the queue is empty."""
        while self.unplugs:
            u = self.unplugs[0]
            if not self._unplug_advance(u):
                return
            self.unplugs.pop(0)

    def _unplug_advance(self, u: PendingUnplug) -> bool:
        """pci_stop_bus_device() then pci_remove_bus_device(); False while waiting."""
        while u.to_stop:
            pdev = u.to_stop[0]
            if not self._in_topology(pdev):  # removed meanwhile (e.g. with its bridge)
                u.to_stop.pop(0)
                continue
            dev = self.vfio.device_of(pdev) if pdev.driver == "vfio-pci" else None
            if dev is not None:
                if not dev.unregistering:
                    # vfio_unregister_group_dev(): drop the driver's reference
                    dev.unregistering = True
                    dev.request_count = 0
                if vfio_device_registration_held(dev):
                    if u.device is not dev:
                        u.device = dev
                        dev.request(dev.request_count)
                        dev.request_count += 1
                        u.next_request = self.unplug_clock() + UNPLUG_REQUEST_INTERVAL
                    return False
                self._vfio_unregister_finish(dev)
            pdev.driver = None  # device_release_driver()
            u.to_stop.pop(0)
            u.device = None
            u.next_request = None
        if self._in_topology(u.pdev):
            self._pci_remove_bus_device(u.pdev)
        return True

    def _vfio_unregister_finish(self, dev: VfioDevice) -> None:
        """The rest of vfio_unregister_group_dev() once released, and vfio_put_device().

        vfio_device_group_unregister() (out of the group's device list),
        vfio_device_del() (the vfioN node goes), vfio_device_remove_group()
        (the group's last device: the group node goes, its container is
        detached, its iommu_group cleared; an open group file stays, with
        ENODEV for what needs the group), vfio_release_device_set().
        """
        from fakedev.kernel.vfio.container import vfio_group_detach_container

        group = dev.group
        group.devices.remove(dev)
        self.vfio.devices.remove(dev)
        if not group.devices:
            if self.vfio.groups.get(group.id) is group:
                del self.vfio.groups[group.id]
            if group.container is not None:
                vfio_group_detach_container(group)
            group.iommu_group = None
            if group.opened_file is not None:
                self._dead_groups.append(group)
        ds = dev.dev_set
        if dev in ds.device_list:
            ds.device_list.remove(dev)
        if not ds.device_list and ds in self.vfio.dev_sets:
            self.vfio.dev_sets.remove(ds)

    def _in_topology(self, pdev: PciDev) -> bool:
        return pdev in pdev.bus.devices and any(d is pdev for d in self.topology.devices())

    def _pci_remove_bus_device(self, pdev: PciDev) -> None:
        """Models pci_remove_bus_device(): children first, then the device leaves
        its bus and its iommu group (an emptied iommu group goes too)."""
        if pdev.subordinate is not None:
            for child in reversed(list(pdev.subordinate.devices)):
                self._pci_remove_bus_device(child)
            if pdev.subordinate in pdev.bus.children:
                pdev.bus.children.remove(pdev.subordinate)
        if pdev in pdev.bus.devices:
            pdev.bus.devices.remove(pdev)
        if pdev.iommu_group is not None:
            ig = self.iommu_groups.get(pdev.iommu_group)
            if ig is not None and pdev in ig.devices:
                ig.devices.remove(pdev)
                if not ig.devices and not ig.user_owned:
                    del self.iommu_groups[ig.id]

    # -- state access ------------------------------------------------------------
    @property
    def hooks(self) -> KernelHooks:
        return self.vfio.hooks

    @property
    def reset_log(self) -> list[ResetRecord]:
        return self.vfio.reset_log

    def reset_count(self, bdf: str) -> int:
        return self.vfio.reset_counts.get(bdf, 0)

    def vfio_devices(self) -> list[VfioPciDevice]:
        return [d for d in self.vfio.devices if isinstance(d, VfioPciDevice)]

    def device(self, name: str) -> VfioPciDevice:
        """The vfio-pci device by BDF ("0000:01:00.0") or node name ("vfio0")."""
        for d in self.vfio_devices():
            if name in (d.name, f"vfio{d.index}"):
                return d
        raise KeyError(name)

    def raise_irq(self, name: str, index: int, vector: int = 0) -> bool:
        """The device ``name`` signals interrupt ``vector`` of IRQ ``index``."""
        return self.device(name).raise_irq(index, vector)

    # -- DMA ------------------------------------------------------------------------------
    @property
    def dma_memory(self) -> DmaMemory | None:
        return self.dma.memory

    @dma_memory.setter
    def dma_memory(self, memory: DmaMemory | None) -> None:
        self.dma.memory = memory

    def dma_read(self, name: str, iova: int, length: int) -> bytes:
        """Device ``name`` (BDF or vfioN) reads ``length`` bytes at ``iova``, through its IOMMU.

        KernelError (EFAULT, recorded in the fault log) when the range is
        unmapped, blocked or not readable; KeyError for an unknown device.
        """
        return self.dma.read(self.device(name), iova, length)

    def dma_write(self, name: str, iova: int, data: bytes) -> None:
        """Device ``name`` writes ``data`` at ``iova``, through its IOMMU (faults as ``dma_read``)."""
        self.dma.write(self.device(name), iova, data)

    # -- nodes ------------------------------------------------------------------------
    def nodes(self) -> list[DevNode]:
        out = [DevNode("vfio/vfio", VFIO_MISC_MAJOR, VFIO_MINOR, 0o666)]
        for g in self.vfio.groups.values():
            out.append(DevNode(f"vfio/{g.id}", VFIO_GROUP_MAJOR, g.minor, 0o600))
        for d in self.vfio.devices:
            out.append(DevNode(f"vfio/devices/vfio{d.index}", VFIO_DEV_MAJOR, d.index, 0o600))
        out.append(DevNode("iommu", VFIO_MISC_MAJOR, IOMMU_MINOR, 0o660))
        return out

    def open(self, path: str, task: Task) -> File:
        """open(2) of /dev/``path``; KernelError as the kernel's open would fail."""
        path = path.removeprefix("/dev/").strip("/")
        if path == "vfio/vfio":
            return VfioContainerFile(self.version, task.pid)
        if path == "iommu":
            from fakedev.kernel.iommufd.main import iommufd_fops_open

            f = iommufd_fops_open(self.version)
            self._prune_ctxs()
            self._ictx_seq += 1
            self._ictxs.append(f.ctx)
            self._ictx_names[id(f.ctx)] = f"iommufd{self._ictx_seq}"
            return f
        if path.startswith("vfio/devices/vfio"):
            num = path.removeprefix("vfio/devices/vfio")
            for d in self.vfio.devices:
                if num.isdigit() and d.index == int(num):
                    return vfio_device_fops_cdev_open(d, task)
            raise KernelError(errno.ENOENT, f"/dev/{path}")
        if path.startswith("vfio/"):
            gid = path.removeprefix("vfio/")
            if gid.isdigit() and int(gid) in self.vfio.groups:
                return vfio_group_fops_open(self.vfio.groups[int(gid)], task)
        raise KernelError(errno.ENOENT, f"/dev/{path}")

    # -- checking and showing ---------------------------------------------------------
    def _ctx_name(self, ctx: Any) -> str | None:
        if ctx is None:
            return None
        return self._ictx_names.get(id(ctx), f"iommufd@{id(ctx):x}")

    def _prune_ctxs(self) -> None:
        """Forget released contexts (a long-running server opens many)."""
        live = [c for c in self._ictxs if not c.dead]
        for c in self._ictxs:
            if c.dead:
                self._ictx_names.pop(id(c), None)
        self._ictxs = live

    def _all_ctxs(self) -> list[Any]:
        seen: dict[int, Any] = {id(c): c for c in self._ictxs}
        for d in self.vfio.devices:
            if d.iommufd_ictx is not None:
                seen.setdefault(id(d.iommufd_ictx), d.iommufd_ictx)
        for g in self.vfio.groups.values():
            if g.iommufd is not None:
                seen.setdefault(id(g.iommufd), g.iommufd)
        return list(seen.values())

    def check_invariants(self) -> list[str]:
        """[] when the model's state is consistent; else one line per violation."""
        from fakedev.kernel.iommufd.main import iommufd_check_invariants

        out: list[str] = list(iommu_check_invariants(self.iommu_groups))
        for ig0 in self.iommu_groups.values():
            if ig0.user_owner_cnt and ig0.kernel_owner_cnt:
                out.append(f"iommu group {ig0.id}: owned by a user and by a host driver")
        for d in self.vfio.devices:
            ig = d.iommu_group
            if d.open_count < 0:
                out.append(f"{d.name}: negative open_count")
            if d.cdev_opened and d.open_count != 1:
                out.append(f"{d.name}: cdev-opened with open_count {d.open_count}")
            if d.iommufd_device is not None:
                ctx = d.iommufd_ictx
                if ctx is None or ctx.dead:
                    out.append(f"{d.name}: bound to a released iommufd context")
                elif ctx.objects.get(d.iommufd_device.obj_id) is not d.iommufd_device:
                    out.append(f"{d.name}: devid {d.iommufd_device.obj_id} not in its context")
                if ig is not None and ig.owner is not ctx:
                    out.append(f"{d.name}: bound to {self._ctx_name(ctx)} but group {ig.id} owner is {ig.owner!r}")
                if d.open_count == 0:
                    out.append(f"{d.name}: iommufd-bound but not open")
            elif d.open_count and d.group.container is None:
                out.append(f"{d.name}: open without an iommufd or a container")
            if d.iommufd_attached and d.iommufd_device is None:
                out.append(f"{d.name}: attached but not bound")
        for vg in self.vfio.groups.values():
            g = vg
            ncdev = sum(1 for d in g.devices if d.cdev_opened)
            if g.cdev_device_open_cnt != ncdev:
                out.append(f"group {g.id}: cdev_device_open_cnt {g.cdev_device_open_cnt} != {ncdev} bound")
            if g.cdev_device_open_cnt and g.opened_file is not None:
                out.append(f"group {g.id}: open while a device is cdev-bound")
            if g.container is not None:
                users = 1 + sum(1 for d in g.devices if d.open_count and d.iommufd_device is None)
                if g.container_users != users:
                    out.append(f"group {g.id}: container_users {g.container_users} != {users}")
                if g.iommu_group is not None and g.iommu_group.owner is not g:
                    out.append(f"group {g.id}: in a container but not the DMA owner")
                if g.opened_file is None:
                    out.append(f"group {g.id}: container set but no open file")
            if g.container is not None and g.iommufd is not None:
                out.append(f"group {g.id}: both a container and an iommufd")
        ids: dict[int, list[int]] = {}
        for ctx in self._all_ctxs():
            out.extend(iommufd_check_invariants(ctx))
            for d in self.vfio.devices:
                if d.iommufd_ictx is ctx and d.iommufd_device is not None:
                    ids.setdefault(id(ctx), []).append(int(d.iommufd_device.obj_id))
        for lst in ids.values():
            if len(lst) != len(set(lst)):
                out.append(f"duplicate devids {sorted(lst)} in one iommufd context")
        out.extend(self._unplug_invariants())
        return out

    def _unplug_invariants(self) -> list[str]:
        """Removal bookkeeping: what is gone is gone everywhere; what waits is held."""
        out: list[str] = []
        present = {id(p) for p in self.topology.devices()}
        waiting = self.unplugs[0].device if self.unplugs else None
        for d in self.vfio.devices:
            if id(d.pdev) not in present:
                out.append(f"vfio{d.index}: {d.name} is no longer on the bus")
            if d.pdev.driver != "vfio-pci":
                out.append(f"vfio{d.index}: {d.name} is bound to {d.pdev.driver!r}")
            if d.unregistering and d is not waiting:
                out.append(f"{d.name}: unregistering but no removal waits for it")
            if d.dev_set not in self.vfio.dev_sets or d not in d.dev_set.device_list:
                out.append(f"{d.name}: not in its dev_set")
        if waiting is not None:
            if not waiting.unregistering:
                out.append(f"{waiting.name}: a removal waits for it but it is not unregistering")
            if not vfio_device_registration_held(waiting):
                out.append(f"{waiting.name}: a removal waits for it but no file holds it")
        for ds in self.vfio.dev_sets:
            if not ds.device_list:
                out.append(f"dev_set {ds.label}: empty")
            for d in ds.device_list:
                if d not in self.vfio.devices:
                    out.append(f"dev_set {ds.label}: {d.name} is not a vfio device")
        for g in self.vfio.groups.values():
            if not g.devices:
                out.append(f"group {g.id}: no devices")
            if g.iommu_group is None or self.iommu_groups.get(g.id) is not g.iommu_group:
                out.append(f"group {g.id}: its iommu group is gone")
        for ig in self.iommu_groups.values():
            for p in ig.devices:
                if id(p) not in present:
                    out.append(f"iommu group {ig.id}: {p.name} is no longer on the bus")
        for u in self.unplugs:
            if id(u.pdev) not in present:
                out.append(f"removal of {u.pdev.name} pending but it is gone")
        return out

    def describe(self) -> dict[str, Any]:
        """A plain-data snapshot: devices, groups, dev_sets, drivers, contexts."""
        devices = []
        for d in self.vfio_devices():
            entry = d.describe()
            entry["iommufd"] = self._ctx_name(d.iommufd_ictx)
            if d.unregistering:
                entry["unplug_requests"] = d.request_count
            devices.append(entry)
        groups = []
        for g in self.vfio.groups.values():
            ig = g.iommu_group
            groups.append({
                "id": g.id,
                "minor": g.minor,
                "devices": [d.name for d in g.devices],
                "open": g.opened_file is not None,
                "opener_pid": g.opened_file.pid if g.opened_file is not None else None,
                "container": g.container is not None,
                "container_iommu": g.container.iommu_driver is not None if g.container else False,
                "iommufd": self._ctx_name(g.iommufd),
                "container_users": g.container_users,
                "cdev_device_open_cnt": g.cdev_device_open_cnt,
                "dma_owner": ("container" if ig is not None and ig.owner is g else
                              self._ctx_name(ig.owner) if ig is not None and ig.owner is not None else None),
            })
        dev_sets = [{"key": ds.label, "devices": [d.name for d in ds.device_list]}
                    for ds in self.vfio.dev_sets]
        drivers = {p.name: p.driver for p in self.topology.devices()}
        iommu_groups = {g.id: {"devices": [p.name for p in g.devices], "owner_cnt": g.owner_cnt}
                        for g in self.iommu_groups.values()}
        ctxs = {}
        for ctx in self._all_ctxs():
            name = self._ctx_name(ctx)
            assert name is not None
            ctxs[name] = {"dead": ctx.dead, **ctx.describe()} if not ctx.dead else {"dead": True}
        return {
            "version": str(self.version),
            "devices": devices,
            "groups": groups,
            "dev_sets": dev_sets,
            "drivers": drivers,
            "iommu_groups": iommu_groups,
            "iommufd": ctxs,
            "dma": self.dma.describe(),
            "unplugs": [{
                "bdf": u.pdev.name,
                "state": "waiting" if i == 0 else "queued",
                "to_stop": [p.name for p in u.to_stop],
                "waiting_for": u.device.name if u.device is not None else None,
                "requests": u.device.request_count if u.device is not None else 0,
                "next_request": u.next_request,
            } for i, u in enumerate(self.unplugs)],
            "resets": len(self.vfio.reset_log),
            "reset_log": [{"bdf": r.bdf, "method": r.method, "cause": r.cause, "pid": r.pid} for r in self.vfio.reset_log],
            "faults": self.faults.describe(),
        }
