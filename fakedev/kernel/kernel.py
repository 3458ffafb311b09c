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
    iommu_group_alloc_id,
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
#: driver_set_override() refuses a value of PAGE_SIZE - 1 bytes or more
PAGE_SIZE = 4096
VFIO_PCI = "vfio-pci"
#: PCI_ANY_ID in a dynamic id
PCI_ANY_ID = 0xFFFFFFFF
#: vfio_pci_dev_in_denylist(): Intel QAT (PF and VF) and SPR DSA/IAX
_VFIO_PCI_DENYLIST = frozenset((0x8086, d) for d in (0x19E2, 0x19E3, 0x37C8, 0x37C9, 0x0435, 0x0443,
                                                      0x0B25, 0x0CFE))

__all__ = [
    "IOMMU_MINOR",
    "VFIO_DEV_MAJOR",
    "VFIO_GROUP_MAJOR",
    "VFIO_MINOR",
    "Blocked",
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

    def __init__(self, pdev: PciDev, to_stop: list[PciDev], *, unbind: bool = False) -> None:
        self.pdev = pdev
        self.to_stop = to_stop
        self.device: VfioDevice | None = None
        self.next_request: float | None = None
        #: an unbind (device_release_driver of ``pdev`` only; in ``Kernel.unbinds``,
        #: each waiting on its own device lock) rather than a removal
        self.unbind = unbind
        #: set once finished (the waiting writer of a sysfs file may return)
        self.done = False

    def __repr__(self) -> str:
        what = "PendingUnbind" if self.unbind else "PendingUnplug"
        return f"<{what} {self.pdev.name} waiting={self.device.name if self.device else None}>"


class Blocked:
    """A sysfs write that has to wait: the writer sleeps until ``pending.done``.

    ``retry``: the device lock was held by ``pending`` (an unbind or removal
    waiting for a release); once it is done the write runs again from the
    start (and may now fail, e.g. ENODEV). Otherwise the write itself
    started ``pending`` and succeeds when it is done.
    """

    def __init__(self, pending: PendingUnplug, *, retry: bool) -> None:
        self.pending = pending
        self.retry = retry

    def __repr__(self) -> str:
        return f"<Blocked on {self.pending!r} retry={self.retry}>"


def _name(data: bytes) -> str:
    """A device name as bus_find_device_by_name() compares it (sysfs_streq: one trailing newline)."""
    text = data.split(b"\0", 1)[0]
    if text.endswith(b"\n"):
        text = text[:-1]
    return text.decode(errors="replace")


def _kstrtoul(data: bytes) -> int:
    """kstrtoul(buf, 0): an unsigned number (0x / 0 prefixes), one trailing newline; else EINVAL."""
    text = data.split(b"\0", 1)[0].decode(errors="replace")
    if text.endswith("\n"):
        text = text[:-1]
    text = text.removeprefix("+")
    try:
        if text[:2].lower() == "0x":
            value = int(text[2:], 16)
        elif len(text) > 1 and text[0] == "0":
            value = int(text[1:], 8)
        else:
            value = int(text, 10)
    except ValueError:
        raise KernelError(errno.EINVAL, f"not a number: {text!r}") from None
    if not text or value < 0 or not text[-1:].isalnum():
        raise KernelError(errno.EINVAL, f"not a number: {text!r}")
    return value


def _hex_fields(data: bytes, most: int) -> list[int]:
    """sscanf(buf, "%x %x ...") with up to ``most`` conversions: the fields read."""
    out: list[int] = []
    for word in data.split(b"\0", 1)[0].decode(errors="replace").split()[:most]:
        digits = word[2:] if word[:2].lower() == "0x" else word
        n = 0
        while n < len(digits) and digits[n] in "0123456789abcdefABCDEF":
            n += 1
        if n == 0:
            break
        out.append(int(digits[:n], 16) & 0xFFFFFFFF)
        if n < len(digits):
            break
    return out


def _dynid(f: list[int]) -> tuple[int, int, int, int, int, int, int]:
    """A pci_dynid from new_id / remove_id fields (subvendor and subdevice default to PCI_ANY_ID)."""
    full = f + [PCI_ANY_ID, PCI_ANY_ID, 0, 0, 0][len(f) - 2:]
    return (full[0], full[1], full[2], full[3], full[4], full[5], full[6] if len(full) > 6 else 0)


def _dynid_match(d: tuple[int, ...], vendor: int, device: int, sv: int, sd: int, cls: int) -> bool:
    """pci_match_one_device()."""
    return ((d[0] == PCI_ANY_ID or d[0] == vendor) and (d[1] == PCI_ANY_ID or d[1] == device)
            and (d[2] == PCI_ANY_ID or d[2] == sv) and (d[3] == PCI_ANY_ID or d[3] == sd)
            and not ((d[4] ^ cls) & d[5]))


def _vfio_pci_denylisted(pdev: PciDev) -> bool:
    """vfio_pci_is_denylisted() with disable_denylist off."""
    return (pdev.vendor, pdev.device) in _VFIO_PCI_DENYLIST


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
                 dma_memory: DmaMemory | None = None, noiommu: bool = False,
                 enable_sriov: bool = False) -> None:
        self.topology = topology
        self.dma = Dma(dma_memory)
        self.version = version
        self.vfio = Vfio(version, clock)
        self.vfio.bar_mmap = bar_mmap
        self.vfio.noiommu = noiommu
        #: vfio-pci's enable_sriov module parameter
        self.vfio.enable_sriov = enable_sriov
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
        #: unbinds waiting for a release (one per device: each holds its device lock)
        self.unbinds: list[PendingUnplug] = []
        #: each function's driver in the tree: the host driver whose id table matches it
        self.native_drivers: dict[str, str | None] = {p.name: p.driver for p in topology.devices()}
        #: the PCI drivers, in registration order (the tree's host drivers, then vfio-pci)
        host = {p.driver for p in topology.devices() if p.driver is not None} - {VFIO_PCI}
        self.drivers: list[str] = [*sorted(host), VFIO_PCI]
        #: driver_override per function (absent: "(null)")
        self.driver_override: dict[str, str] = {}
        #: dynamic ids (new_id) per driver: (vendor, device, subvendor, subdevice, class, mask, data)
        self.dynids: dict[str, list[tuple[int, int, int, int, int, int, int]]] = {}
        for pdev in topology.devices():
            if pdev.driver == "vfio-pci" and (pdev.iommu_group is not None or noiommu):
                self._vfio_pci_probe(pdev)
        #: fault injection (fakedev.kernel.fault_inject): rules, hooks, unplugs
        self.faults = FaultPlan(self.vfio, [p.name for p in topology.devices()])

    # -- driver binding -------------------------------------------------------------
    def _vfio_pci_probe(self, pdev: PciDev) -> VfioPciDevice:
        """Models vfio_pci_probe() -> vfio_pci_core_register_device(): index and group minor lowest free.

        A function without an iommu group, with noiommu mode on, gets a new
        noiommu group (vfio_noiommu_group_alloc: iommu_group_alloc() takes the
        lowest free group id, named "vfio-noiommu", the device added to it)
        and the kernel is tainted.
        """
        noiommu = pdev.iommu_group is None
        if noiommu:
            assert self.vfio.noiommu
            gid = iommu_group_alloc_id(self.iommu_groups)
            self.iommu_groups[gid] = IommuGroup(gid, [pdev], name="vfio-noiommu")
            pdev.iommu_group = gid
            self.vfio.tainted = True
        assert pdev.iommu_group is not None
        igroup = self.iommu_groups[pdev.iommu_group]
        group = self.vfio.groups.get(igroup.id)
        if group is None:
            self._dead_groups = [g for g in self._dead_groups if g.opened_file is not None]
            minors = {g.minor for g in self.vfio.groups.values()} | {g.minor for g in self._dead_groups}
            group = VfioGroup(igroup, minor=min(set(range(len(minors) + 1)) - minors), noiommu=noiommu)
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
        """Unbind ``bdf`` from its driver, without waiting (the try form).

        For vfio-pci while a file holds the device this signals REQ (as
        vfio_pci_remove() would) and fails EBUSY, changing nothing else; the
        form that waits as the kernel's does is ``unbind_store``.
        """
        pdev = self.topology.find(bdf)
        if pdev is None or pdev.driver is None:
            raise KernelError(errno.ENODEV, f"{bdf} is not bound")
        if pdev.driver == VFIO_PCI:
            dev = self.vfio.device_of(pdev)
            if dev is not None:
                if vfio_device_registration_held(dev):
                    if isinstance(dev, VfioPciDevice):
                        dev.irqs.raise_irq(4)  # vfio_pci_core_request()
                    raise KernelError(errno.EBUSY, f"{bdf} is in use")
                self._vfio_unregister_finish(dev)
        pdev.driver = None

    def bind_driver(self, bdf: str, driver: str) -> None:
        """Attach ``driver`` to the unbound ``bdf`` whatever the id tables say
        (device_driver_attach() without driver_match_device()); ENODEV if
        ``bdf`` is bound or gone, else the probe's errno (``bind_store`` is the
        sysfs form, with matching)."""
        pdev = self.topology.find(bdf)
        if pdev is None or pdev.driver is not None:
            raise KernelError(errno.ENODEV, f"{bdf} is not an unbound device")
        err = self._driver_probe_device(driver, pdev)
        if err:
            raise KernelError(abs(err), f"probe of {bdf} by {driver} failed")

    # -- the driver core's sysfs files (drivers/base/bus.c, dd.c, pci-driver.c) ---------
    def driver_override_show(self, bdf: str) -> str:
        """driver_override_show(): the override and a newline, or ``(null)``."""
        self._find(bdf)
        return f"{self.driver_override.get(bdf, '(null)')}\n"

    def driver_override_store(self, bdf: str, data: bytes) -> int:
        """driver_override_store() -> driver_set_override(): up to the first
        NUL and newline; empty (or a leading newline) clears; EINVAL from one
        page less one byte on. Takes effect at the next probe only."""
        self._find(bdf)
        if len(data) >= PAGE_SIZE - 1:
            raise KernelError(errno.EINVAL, "driver_override too long")
        text = data.split(b"\0", 1)[0].split(b"\n", 1)[0]
        if not text:
            self.driver_override.pop(bdf, None)
        else:
            self.driver_override[bdf] = text.decode(errors="surrogateescape")
        return len(data)

    def bind_store(self, driver: str, data: bytes) -> int | Blocked:
        """/sys/bus/pci/drivers/<driver>/bind (bind_store()): ENODEV unless the
        function exists and the driver matches it (driver_match_device), then
        device_driver_attach(): EBUSY if it has a driver, EBUSY from
        pci_dma_configure() for a host driver while a user owns the iommu
        group, the probe's errno (vfio-pci: EINVAL for a bridge or a function
        without an iommu group)."""
        self._check_driver(driver)
        pdev = self._lookup(data)
        if pdev is None or not self._driver_match(driver, pdev):
            raise KernelError(errno.ENODEV, f"{driver} does not match {_name(data)}")
        held = self._device_lock_holder(pdev)
        if held is not None:
            return Blocked(held, retry=True)
        err = self._driver_probe_device(driver, pdev)
        if err:
            raise KernelError(abs(err), f"probe of {pdev.name} by {driver} failed")
        return len(data)

    def unbind_store(self, driver: str, data: bytes) -> int | Blocked:
        """/sys/bus/pci/drivers/<driver>/unbind (unbind_store()): ENODEV unless
        ``driver`` drives the function; then device_driver_detach(). For
        vfio-pci, vfio_unregister_group_dev(): while a file holds the device
        the write waits (``Blocked``), REQ signalled at once and every 10 s
        (``unplug_tick``); the device stays usable by its holders, new opens
        fail ENODEV, and the unbind completes at the last close."""
        self._check_driver(driver)
        pdev = self._lookup(data)
        if pdev is None or pdev.driver != driver:
            raise KernelError(errno.ENODEV, f"{_name(data)} is not bound to {driver}")
        held = self._device_lock_holder(pdev)
        if held is not None:
            return Blocked(held, retry=True)
        pending = self._device_release_driver(pdev)
        if pending is not None:
            return Blocked(pending, retry=False)
        return len(data)

    def drivers_probe_store(self, data: bytes) -> int | Blocked:
        """/sys/bus/pci/drivers_probe (drivers_probe_store()): ENODEV for an
        unknown function; an unbound one is offered to each driver in
        registration order (device_attach()): the first that matches and
        probes wins, a failed probe lets the next try, no match is success;
        an error that is not a probe failure (EBUSY from the iommu group
        ownership) ends it and the write fails EINVAL."""
        pdev = self._lookup(data)
        if pdev is None:
            raise KernelError(errno.ENODEV, f"no PCI device {_name(data)}")
        held = self._device_lock_holder(pdev)
        if held is not None:
            return Blocked(held, retry=True)
        if pdev.driver is None:
            for driver in self.drivers:
                if not self._driver_match(driver, pdev):
                    continue
                err = self._driver_probe_device(driver, pdev)
                if err < 0:
                    raise KernelError(errno.EINVAL, f"probe of {pdev.name} by {driver}: {-err}")
                if err == 0:
                    break
        return len(data)

    def new_id_store(self, driver: str, data: bytes) -> int:
        """new_id_store(): "vendor device [subvendor subdevice class class_mask
        driver_data]" in hex; EINVAL below two fields, EEXIST if a dynamic id
        already matches; then driver_attach() offers every unbound function."""
        self._check_driver(driver)
        f = _hex_fields(data, 7)
        if len(f) < 2:
            raise KernelError(errno.EINVAL, "new_id needs vendor and device")
        dynid = _dynid(f)
        if len(f) != 7 and any(_dynid_match(d, dynid[0], dynid[1], dynid[2], dynid[3], dynid[4])
                               for d in self.dynids.get(driver, [])):
            raise KernelError(errno.EEXIST, "id already known")
        self.dynids.setdefault(driver, []).append(dynid)
        for pdev in list(self.topology.devices()):  # driver_attach()
            if pdev.driver is None and self._driver_match(driver, pdev) \
                    and self._device_lock_holder(pdev) is None:
                self._driver_probe_device(driver, pdev)
        return len(data)

    def remove_id_store(self, driver: str, data: bytes) -> int:
        """remove_id_store(): ENODEV unless that exact dynamic id exists; EINVAL below two fields."""
        self._check_driver(driver)
        f = _hex_fields(data, 6)
        if len(f) < 2:
            raise KernelError(errno.EINVAL, "remove_id needs vendor and device")
        want = _dynid(f)
        ids = self.dynids.get(driver, [])
        for d in ids:
            if d[:6] == want[:6]:
                ids.remove(d)
                return len(data)
        raise KernelError(errno.ENODEV, "no such id")

    def reset_store(self, bdf: str, data: bytes, pid: int | None = None) -> int | Blocked:
        """/sys/bus/pci/devices/<bdf>/reset (reset_store()): "1" runs
        pci_reset_function() with the first working method (ENOTTY: none),
        recorded in the reset log with cause "sysfs"; other values EINVAL."""
        pdev = self._find(bdf)
        if _kstrtoul(data) != 1:
            raise KernelError(errno.EINVAL, "reset takes 1")
        held = self._device_lock_holder(pdev)
        if held is not None:
            return Blocked(held, retry=True)
        dev = self.vfio.device_of(pdev)
        if isinstance(dev, VfioPciDevice):
            dev._do_function_reset("sysfs", pid)
            return len(data)
        from fakedev.kernel.vfio.pci.vfio_pci_core import function_reset_method

        method = function_reset_method(pdev)
        if method is None:
            raise KernelError(errno.ENOTTY, f"{bdf}: no reset method")
        self.vfio.record_reset(pdev, method, "sysfs", pid)
        return len(data)

    def remove_store(self, bdf: str, data: bytes) -> int | Blocked:
        """/sys/bus/pci/devices/<bdf>/remove (remove_store()): a non-zero number
        removes the function (``unplug_device``); the write waits until the
        removal is done. EINVAL for what is not a number; 0 does nothing."""
        pdev = self._find(bdf)
        if not _kstrtoul(data):
            return len(data)
        self.unplug_device(bdf)
        for u in self.unplugs:
            if u.pdev is pdev:
                return Blocked(u, retry=False)
        return len(data)

    def _find(self, bdf: str) -> PciDev:
        pdev = self.topology.find(bdf)
        if pdev is None:
            raise KernelError(errno.ENODEV, f"no PCI device {bdf}")
        return pdev

    def _lookup(self, data: bytes) -> PciDev | None:
        """bus_find_device_by_name(): the name as sysfs_streq compares it (one trailing newline ignored)."""
        return self.topology.find(_name(data))

    def _check_driver(self, driver: str) -> None:
        if driver not in self.drivers:
            raise KernelError(errno.ENOENT, f"no driver {driver}")

    def _driver_match(self, driver: str, pdev: PciDev) -> bool:
        """pci_bus_match() -> pci_match_device(): an override admits only the
        driver it names (and always that one); else the dynamic ids, then the
        static table: vfio-pci's matches only with an override; a host
        driver's is modelled as the function it drives in the tree."""
        override = self.driver_override.get(pdev.name)
        if override is not None and override != driver:
            return False
        sv, sd = (pdev.cfg_read(0x2C, 2), pdev.cfg_read(0x2E, 2)) if pdev.header_type == 0 else (0, 0)
        for d in self.dynids.get(driver, []):
            if _dynid_match(d, pdev.vendor, pdev.device, sv, sd, pdev.class_code):
                return True
        if override is not None:
            return True
        return driver != VFIO_PCI and self.native_drivers.get(pdev.name) == driver

    def _device_lock_holder(self, pdev: PciDev) -> PendingUnplug | None:
        """The waiting unbind or removal holding device_lock(pdev), if any."""
        for u in self.unbinds:
            if u.pdev is pdev:
                return u
        if self.unplugs and self.unplugs[0].device is not None and self.unplugs[0].device.pdev is pdev:
            return self.unplugs[0]
        return None

    def _driver_probe_device(self, driver: str, pdev: PciDev) -> int:
        """__driver_probe_device() -> really_probe(), with the kernel's signs:
        0 bound; negative: not probed (-ENODEV gone, -EBUSY already bound or
        pci_dma_configure() refused: iommu_device_use_default_domain() while
        a user owns the group); positive: the driver's probe failed."""
        if not self._in_topology(pdev):
            return -errno.ENODEV
        if pdev.driver is not None:
            return -errno.EBUSY
        ig = self.iommu_groups.get(pdev.iommu_group) if pdev.iommu_group is not None else None
        if driver not in DRIVER_MANAGED_DMA and ig is not None and ig.user_owned:
            return -errno.EBUSY
        if driver == VFIO_PCI:
            # vfio_pci_probe(): the denylist, then vfio_pci_core_register_device()
            if _vfio_pci_denylisted(pdev) or pdev.header_type != 0 or (ig is None and not self.vfio.noiommu):
                return errno.EINVAL
            if pdev.sriov_num_vfs:
                # vfio_pci_core_register_device(): "Cannot bind to PF with SR-IOV enabled"
                return errno.EBUSY
            pdev.driver = driver
            self._vfio_pci_probe(pdev)
            return 0
        pdev.driver = driver
        return 0

    def _device_release_driver(self, pdev: PciDev) -> PendingUnplug | None:
        """device_release_driver(): for vfio-pci, vfio_pci_remove() ->
        vfio_unregister_group_dev(): no new opens, REQ while held; returns the
        pending unbind while a file holds the device, None when done."""
        dev = self.vfio.device_of(pdev) if pdev.driver == VFIO_PCI else None
        if dev is not None:
            dev.unregistering = True
            dev.request_count = 0
            if vfio_device_registration_held(dev):
                u = PendingUnplug(pdev, [pdev], unbind=True)
                u.device = dev
                self.unbinds.append(u)
                dev.request(dev.request_count)
                dev.request_count += 1
                u.next_request = self.unplug_clock() + UNPLUG_REQUEST_INTERVAL
                return u
            self._vfio_unregister_finish(dev)
        pdev.driver = None
        return None

    def _unbind_released(self, dev: VfioDevice) -> None:
        """A waiting unbind's device was released: finish it."""
        for u in [u for u in self.unbinds if u.device is dev]:
            self.unbinds.remove(u)
            self._vfio_unregister_finish(dev)
            u.pdev.driver = None
            u.device = None
            u.next_request = None
            u.done = True

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
        now = self.unplug_clock() if now is None else now
        waits = list(self.unbinds)
        if self.unplugs:
            head = self.unplugs[0]
            if head.device is not None and not any(b.device is head.device for b in self.unbinds):
                waits.append(head)  # (a device being unbound is asked by its unbind)
        nxt: float | None = None
        for u in waits:
            dev = u.device
            if dev is None:
                continue
            if u.next_request is None:
                u.next_request = now + UNPLUG_REQUEST_INTERVAL
            elif now >= u.next_request:
                dev.request(dev.request_count)
                dev.request_count += 1
                u.next_request = now + UNPLUG_REQUEST_INTERVAL
            nxt = u.next_request if nxt is None else min(nxt, u.next_request)
        return nxt

    def set_unplug_clock(self, clock: Callable[[], float]) -> None:
        """Use ``clock`` (seconds) for the REQ re-request timer (a server's real clock)."""
        self.unplug_clock = clock

    def unplug_pending(self, bdf: str) -> bool:
        """True while a removal covering ``bdf`` is queued or waiting."""
        pdev = self.topology.find(bdf)
        return pdev is not None and any(pdev in u.to_stop for u in self.unplugs)

    def _registration_released(self, dev: VfioDevice) -> None:
        """complete(&device->comp): the waiting unbind and removal go on."""
        self._unbind_released(dev)
        if self.unplugs and self.unplugs[0].device is dev:
            self._unplug_run()

    def _unplug_run(self) -> None:
        """Advance the queue head until it waits on a held device or the queue is empty."""
        while self.unplugs:
            u = self.unplugs[0]
            if not self._unplug_advance(u):
                return
            self.unplugs.pop(0)
            u.done = True

    def _unplug_advance(self, u: PendingUnplug) -> bool:
        """pci_stop_bus_device() then pci_remove_bus_device(); False while waiting."""
        while u.to_stop:
            pdev = u.to_stop[0]
            if not self._in_topology(pdev):  # removed meanwhile (e.g. with its bridge)
                u.to_stop.pop(0)
                continue
            dev = self.vfio.device_of(pdev) if pdev.driver == "vfio-pci" else None
            if dev is not None:
                if any(b.device is dev for b in self.unbinds):
                    # an unbind holds the device lock: wait for it, asking nothing
                    u.device = dev
                    u.next_request = None
                    return False
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
        if group.noiommu and group.iommu_group is not None:
            # vfio_device_remove_group(): iommu_group_remove_device() of the fake group
            ig = group.iommu_group
            if dev.pdev in ig.devices:
                ig.devices.remove(dev.pdev)
            dev.pdev.iommu_group = None
            if not ig.devices and self.iommu_groups.get(ig.id) is ig:
                del self.iommu_groups[ig.id]
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
            out.append(DevNode(f"vfio/{g.name}", VFIO_GROUP_MAJOR, g.minor, 0o600))
        for d in self.vfio.devices:
            if d.group.noiommu:
                continue  # vfio_device_add(): no cdev for a noiommu device
            out.append(DevNode(f"vfio/devices/vfio{d.index}", VFIO_DEV_MAJOR, d.index, 0o600))
        out.append(DevNode("iommu", VFIO_MISC_MAJOR, IOMMU_MINOR, 0o660))
        return out

    def open(self, path: str, task: Task) -> File:
        """open(2) of /dev/``path``; KernelError as the kernel's open would fail."""
        path = path.removeprefix("/dev/").strip("/")
        if path == "vfio/vfio":
            return VfioContainerFile(self.version, task.pid, self.vfio.noiommu)
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
                if num.isdigit() and d.index == int(num) and not d.group.noiommu:
                    return vfio_device_fops_cdev_open(d, task)
            raise KernelError(errno.ENOENT, f"/dev/{path}")
        if path.startswith("vfio/"):
            name = path.removeprefix("vfio/")
            for g in self.vfio.groups.values():
                if g.name == name:
                    return vfio_group_fops_open(g, task)
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

    def _vf_token_invariants(self) -> list[str]:
        """A PF's VF token users are exactly its open VFs (finish_enable/close_device)."""
        out: list[str] = []
        devs = [d for d in self.vfio.devices if isinstance(d, VfioPciDevice)]
        for d in devs:
            counted = [v for v in devs if v._token_pf is d]
            if d.vf_token is None:
                if counted:
                    out.append(f"{d.name}: counted as the VF token PF but has no token")
                continue
            if d.vf_token.users != len(counted):
                out.append(f"{d.name}: vf_token users {d.vf_token.users} != {len(counted)} open VFs")
            for v in counted:
                if v.open_count == 0 or v.pdev.physfn is not d.pdev:
                    out.append(f"{v.name}: counted as a VF token user of {d.name} while closed or not its VF")
        return out

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
            elif d.open_count and d.group.container is None and not d.group.noiommu:
                out.append(f"{d.name}: open without an iommufd or a container")
            if d.iommufd_attached and d.iommufd_device is None:
                out.append(f"{d.name}: attached but not bound")
        out.extend(self._vf_token_invariants())
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
                if not g.noiommu and g.iommu_group is not None and g.iommu_group.owner is not g:
                    out.append(f"group {g.id}: in a container but not the DMA owner")
                if g.container.noiommu != g.noiommu:
                    out.append(f"group {g.name}: in a container of the other kind (noiommu)")
                if g.opened_file is None:
                    out.append(f"group {g.id}: container set but no open file")
            if g.noiommu:
                ig1 = g.iommu_group
                if ig1 is not None and (ig1.owner_cnt or ig1.name != "vfio-noiommu"):
                    out.append(f"group {g.name}: noiommu group owned or misnamed ({ig1.owner_cnt}, {ig1.name!r})")
                if any(d.cdev_opened or d.iommufd_device is not None for d in g.devices):
                    out.append(f"group {g.name}: a noiommu device bound to an iommufd")
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
        unbinding = {id(u.device) for u in self.unbinds if u.device is not None}
        for u in self.unbinds:
            if u.device is None or u.device not in self.vfio.devices:
                out.append(f"unbind of {u.pdev.name} pending without its vfio device")
            elif not vfio_device_registration_held(u.device):
                out.append(f"{u.pdev.name}: an unbind waits but no file holds it")
        for d in self.vfio.devices:
            if id(d.pdev) not in present:
                out.append(f"vfio{d.index}: {d.name} is no longer on the bus")
            if d.pdev.driver != "vfio-pci":
                out.append(f"vfio{d.index}: {d.name} is bound to {d.pdev.driver!r}")
            if d.unregistering and d is not waiting and id(d) not in unbinding:
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
                "name": g.name,
                "noiommu": g.noiommu,
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
            "noiommu_mode": self.vfio.noiommu,
            "tainted": self.vfio.tainted,
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
            "unbinds": [{
                "bdf": u.pdev.name,
                "waiting_for": u.device.name if u.device is not None else None,
                "requests": u.device.request_count if u.device is not None else 0,
                "next_request": u.next_request,
            } for u in self.unbinds],
            "driver_override": dict(self.driver_override),
            "resets": len(self.vfio.reset_log) + self.vfio.reset_log_dropped,
            "reset_log_dropped": self.vfio.reset_log_dropped,
            "reset_log": [{"bdf": r.bdf, "method": r.method, "cause": r.cause, "pid": r.pid} for r in self.vfio.reset_log],
            "faults": self.faults.describe(),
        }
