"""vfio-pci: the device ioctls, dev_set, resets and the hot-reset series.

Mirrors drivers/vfio/pci/vfio_pci_core.c. Lives here: ``VfioPciDevice``
(struct vfio_pci_core_device: open/close, GET_INFO, GET_REGION_INFO,
GET_IRQ_INFO, SET_IRQS, RESET, the hot-reset pair, read/write of regions,
the driver's VFIO_DEVICE_FEATUREs), the dev_set assignment rule, slot/bus
probing and walking, ``vfio_pci_dev_set_hot_reset`` and
``vfio_pci_dev_set_try_reset``.

Version differences (``KernelVersion`` switches):
- GET_PCI_HOT_RESET_INFO: 6.6-6.9 copy entries inside the bus walk and
  report the computed flags with ENOSPC; >= 6.10 counts first and reports
  ENOSPC with flags 0 (``hot_reset_info_local_buffer``).
- PCI_HOT_RESET's group-fd count is an ``int`` before 6.12 (> INT_MAX gives
  ENOMEM from kcalloc) and a ``u32`` from 6.12 (EINVAL)
  (``hot_reset_array_count_u32``).
"""

from __future__ import annotations

import errno
import random
import re
from typing import TYPE_CHECKING, Any

from fakedev.kernel import pci as P
from fakedev.kernel.errors import KernelError
from fakedev.kernel.file import File
from fakedev.kernel.pci import BarKind, PciDev, PciSlot, ResetMethod
from fakedev.kernel.task import Task
from fakedev.uapi import consts as C
from fakedev.uapi import ioctls as IO
from fakedev.uapi import structs as S

from .. import iommufd as viommufd
from ..vfio_iommu_type1 import build_cap_chain
from ..vfio_main import (
    Vfio,
    VfioDevice,
    VfioDeviceFile,
    VfioDeviceSet,
    vfio_assign_device_set,
    vfio_check_feature,
    vfio_device_set_open_count,
    vfio_find_device_in_devset,
)
from .vfio_pci_config import VfioPciConfig
from .vfio_pci_intrs import ERR, INTX, MSI, MSIX, REQ, VfioPciIrqs
from .vfio_pci_rdwr import (
    BarBehaviour,
    RamBars,
    bar_len,
    msix_table_range,
    rom_image,
    vfio_pci_bar_read,
    vfio_pci_bar_write,
    vfio_pci_rom_read,
)

if TYPE_CHECKING:
    from ..group import VfioGroup

VGA_REGION_SIZE = 0xC0000
VF_TOKEN_ARG = "vf_token="
UUID_STRING_LEN = 36
_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def uuid_parse(text: str) -> bytes:
    """Models uuid_parse() (lib/uuid.c): 36 characters, dashes at 8, 13, 18, 23,
    hex digits elsewhere (either case); the 16 bytes in string order (uuid_t)."""
    if not _UUID_RE.fullmatch(text):
        raise KernelError(errno.EINVAL, f"not a UUID: {text!r}")
    return bytes.fromhex(text.replace("-", ""))


def uuid_string(uuid: bytes) -> str:
    """%pUb: the UUID's text form."""
    h = uuid.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class VfioPciVfToken:
    """struct vfio_pci_vf_token: a vfio-pci PF's VF token and how many of its
    VFs are open (users, counted at vfio_pci_core_finish_enable / close_device)."""

    def __init__(self) -> None:
        # vfio_pci_vf_init(): uuid_gen(), a random token nobody knows
        self.uuid = random.getrandbits(128).to_bytes(16, "big")
        self.users = 0


# --------------------------------------------------------------------------
# PCI core helpers: reset probing and walking
# --------------------------------------------------------------------------


def pci_probe_reset_slot(slot: PciSlot | None) -> bool:
    """pci_probe_reset_slot(slot) == 0."""
    return slot is not None and slot.reset_capable


def pci_probe_reset_bus(pdev: PciDev) -> bool:
    """pci_probe_reset_bus(pdev->bus) == 0: not the root bus (a bridge above can reset it)."""
    return pdev.bus.probe_reset_bus()


def vfio_pci_probe_reset(pdev: PciDev) -> bool:
    """The slot-or-bus choice of the hot-reset ioctls: True = slot; ENODEV if neither."""
    if pci_probe_reset_slot(pdev.slot):
        return True
    if not pci_probe_reset_bus(pdev):
        raise KernelError(errno.ENODEV, f"{pdev.name}: no slot or bus reset")
    return False


def _below_slot(pdev: PciDev, slot: PciSlot) -> bool:
    """Models vfio_pci_dev_below_slot()."""
    d: PciDev | None = pdev
    while d is not None:
        if d.bus is slot.bus:
            return d.slot is slot
        d = d.bus.self_bridge
    return False


def vfio_pci_slot_or_bus_devices(pdev: PciDev, slot: bool) -> list[PciDev]:
    """Models vfio_pci_for_each_slot_or_bus(): pci_walk_bus(pdev->bus), filtered to the slot."""
    out = []
    for d in pdev.bus.walk():
        if not slot or (pdev.slot is not None and _below_slot(d, pdev.slot)):
            out.append(d)
    return out


def pcie_capability_read_dword(pdev: PciDev, reg: int) -> int:
    """pcie_capability_read_dword(): 0 without a PCIe capability, and 0 for the
    v2 registers (DevCap2 on) of a version 1 capability."""
    pos = pdev.find_capability(P.PCI_CAP_ID_EXP)
    if not pos:
        return 0
    if reg >= P.PCI_EXP_DEVCAP2 and pdev.cfg_read(pos + P.PCI_EXP_FLAGS, 2) & 0xF < 2:
        return 0
    return pdev.cfg_read(pos + reg, 4)


def pci_enable_atomic_ops_to_root(pdev: PciDev, cap_mask: int) -> bool:
    """Models pci_enable_atomic_ops_to_root() == 0 (drivers/pci/pci.c, before
    the late-2025 root-port rework): not for a VF; only (legacy / RC
    integrated) endpoints request; every switch port above must route
    AtomicOps, an upstream port must not block their egress, and the root
    port must complete every size in ``cap_mask``. The AtomicOp Requester
    Enable bit the kernel then sets in the device's DevCtl2 is not modelled."""
    if pdev.is_virtfn or not pdev.is_pcie:
        return False
    if pdev.pcie_type not in (P.PCI_EXP_TYPE_ENDPOINT, P.PCI_EXP_TYPE_LEG_END, P.PCI_EXP_TYPE_RC_END):
        return False
    bus = pdev.bus
    while bus.parent is not None and bus.self_bridge is not None:
        bridge = bus.self_bridge
        cap = pcie_capability_read_dword(bridge, P.PCI_EXP_DEVCAP2)
        ptype = bridge.pcie_type if bridge.is_pcie else None
        if ptype in (P.PCI_EXP_TYPE_UPSTREAM, P.PCI_EXP_TYPE_DOWNSTREAM):
            if not cap & P.PCI_EXP_DEVCAP2_ATOMIC_ROUTE:
                return False
        elif ptype == P.PCI_EXP_TYPE_ROOT_PORT and cap & cap_mask != cap_mask:
            return False
        if ptype == P.PCI_EXP_TYPE_UPSTREAM:
            ctl2 = pcie_capability_read_dword(bridge, P.PCI_EXP_DEVCTL2) & 0xFFFF
            if ctl2 & P.PCI_EXP_DEVCTL2_ATOMIC_EGRESS_BLOCK:
                return False
        bus = bus.parent
    return True


def function_reset_method(pdev: PciDev) -> str | None:
    """What pci_reset_function() would use: the first method whose probe succeeds.

    A bus/slot reset serves a single function only when nothing else shares it
    (pci_dev_reset_slot_function / pci_parent_bus_reset).
    """
    for m in pdev.reset_methods():
        if m is not ResetMethod.BUS:
            return str(m.value)
        if pdev.reset_methods_override is not None:
            return "slot" if pci_probe_reset_slot(pdev.slot) else "bus"
        if pdev.subordinate is not None:
            continue
        if pdev.slot is not None and pdev.slot.reset_capable and not pdev.multifunction:
            return "slot"
        if pdev.bus.self_bridge is not None and all(d is pdev for d in pdev.bus.devices):
            return "bus"
    return None


def vfio_pci_dev_set_key(pdev: PciDev) -> tuple[object, str]:
    """The set_id of vfio_pci_core_register_device(): root bus -> device; slot -> slot; else bus."""
    if pdev.bus.is_root:
        return pdev, f"dev {pdev.name}"
    if pci_probe_reset_slot(pdev.slot):
        assert pdev.slot is not None
        return pdev.slot, f"slot {pdev.domain:04x}:{pdev.slot.bus.number:02x}:{pdev.slot.number:02x}"
    return pdev.bus, f"bus {pdev.domain:04x}:{pdev.bus.number:02x}"


# --------------------------------------------------------------------------
# The device
# --------------------------------------------------------------------------


class VfioPciDevice(VfioDevice):
    """struct vfio_pci_core_device."""

    def __init__(self, vfio: Vfio, pdev: PciDev, index: int, group: VfioGroup,
                 behaviour: BarBehaviour | None = None) -> None:
        super().__init__(vfio, pdev, index, group)
        self.behaviour: BarBehaviour = behaviour if behaviour is not None else RamBars(pdev)
        self.config = VfioPciConfig(pdev, on_flr=self._config_flr)
        self.irqs = VfioPciIrqs(self.get_irq_count, pdev.is_pcie)
        self.reset_works = False
        self.needs_reset = False
        self.low_power = False
        self._task: Task | None = None  # the caller of the ioctl in flight (for reset records)
        #: vdev->vf_token: a PF's token state (vfio_pci_vf_init; None unless an SR-IOV PF)
        self.vf_token: VfioPciVfToken | None = VfioPciVfToken() if pdev.is_physfn else None
        #: the PF whose vf_token counts this VF as a user while it is open
        self._token_pf: VfioPciDevice | None = None
        key, label = vfio_pci_dev_set_key(pdev)
        vfio_assign_device_set(vfio, self, key, label)

    def __repr__(self) -> str:
        return f"<VfioPciDevice vfio{self.index} {self.name}>"

    # -- state resets -----------------------------------------------------------
    def _reset_state(self) -> None:
        """What a reset does to the function: config restored, BAR state lost."""
        self.config.reset()
        self.behaviour.reset()

    def _config_flr(self) -> None:
        task = self._task
        self._do_function_reset("PCI_EXP_DEVCTL_BCR_FLR", task.pid if task else None, quiet=True)

    def _do_function_reset(self, cause: str, pid: int | None, quiet: bool = False) -> None:
        """pci_try_reset_function(): one function, first working method."""
        method = function_reset_method(self.pdev)
        if method is None:
            if quiet:
                return
            raise KernelError(errno.ENOTTY, "no reset method")
        if self.name in self.vfio.hooks.device_lock_contended:
            if quiet:
                return
            raise KernelError(errno.EAGAIN, "device lock contended")
        err = self.vfio.hooks.reset_errno.get(self.name)
        if err:
            if quiet:
                return
            raise KernelError(err, "reset failed (injected)")
        self._reset_state()
        self.vfio.record_reset(self.pdev, method, cause, pid)

    # -- open / close -------------------------------------------------------------
    @property
    def sriov_pf_core_dev(self) -> VfioPciDevice | None:
        """vdev->sriov_pf_core_dev: for a VF, its PF's vfio-pci device when the VFs
        were created by vfio-pci's sriov_configure (the PF bound to vfio-pci with
        enable_sriov set: the tree loader allows VFs under a vfio-pci PF only then)."""
        pf = self.pdev.physfn
        if pf is None or pf.driver != "vfio-pci" or not self.vfio.enable_sriov:
            return None
        dev = self.vfio.device_of(pf)
        return dev if isinstance(dev, VfioPciDevice) and dev.vf_token is not None else None

    def open_device(self, task: Task | None) -> None:
        """Models vfio_pci_core_enable() (open_device), then
        vfio_pci_core_finish_enable(): a VF of a vfio-pci PF counts as a user of
        the PF's VF token."""
        if self.name in self.vfio.hooks.device_lock_contended:
            raise KernelError(errno.EAGAIN, "device lock contended at open")
        pid = task.pid if task is not None else None
        try:
            self._do_function_reset("open", pid)
            self.reset_works = True
        except KernelError:
            self.reset_works = False
        self.config.reload_bars()
        self.config.enable_decode()
        self.low_power = False
        pf = self.sriov_pf_core_dev
        if pf is not None:
            assert pf.vf_token is not None
            pf.vf_token.users += 1
            self._token_pf = pf

    def close_device(self, task: Task | None) -> None:
        """Models vfio_pci_core_close_device() -> vfio_pci_core_disable()."""
        pf = self._token_pf
        if pf is not None:
            assert pf.vf_token is not None and pf.vf_token.users > 0
            pf.vf_token.users -= 1
            self._token_pf = None
        self.irqs.teardown()
        self.low_power = False
        self.needs_reset = True
        # a release has no calling task: the record names the process that had the device open
        pid = task.pid if task is not None else self.opener_pid
        if self.reset_works:
            try:
                self._do_function_reset("close", pid)
                self.needs_reset = False
            except KernelError:
                pass
        vfio_pci_dev_set_try_reset(self.dev_set, pid)

    def match(self, buf: str) -> int:
        """Models vfio_pci_core_match(): the PCI name as a prefix; after it only
        spaces and one ``vf_token=<uuid>``; then the token rules
        (vfio_pci_core_match_token_uuid). 1 match, 0 no match, else KernelError."""
        name = self.pdev.name
        if not buf.startswith(name):
            return 0
        uuid: bytes | None = None
        if len(buf) > len(name):
            i = len(name)
            if buf[i] != " ":
                return 0  # not a space after the name: another device's name
            while i < len(buf):
                if buf[i] == " ":
                    i += 1
                    continue
                if uuid is None and buf.startswith(VF_TOKEN_ARG, i):
                    i += len(VF_TOKEN_ARG)
                    if len(buf) - i < UUID_STRING_LEN:
                        raise KernelError(errno.EINVAL, "vf_token too short")
                    uuid = uuid_parse(buf[i:i + UUID_STRING_LEN])
                    i += UUID_STRING_LEN
                else:
                    raise KernelError(errno.EINVAL, f"unknown or repeated option at {buf[i:]!r}")
        self.match_token(uuid)
        return 1

    has_match_token = True

    def match_token(self, token: bytes | None) -> None:
        """Models vfio_pci_core_match_token_uuid() (before 6.16
        vfio_pci_validate_vf_token()); ``token`` None: none given.

        A VF whose PF is vfio-pci's needs the PF's token (EACCES if missing
        or wrong); a VF of another PF driver takes none (EINVAL if given). A
        vfio-pci PF needs the token only while some of its VFs are open
        (EACCES if missing or wrong); otherwise a token given sets it. Any
        other device takes none (EINVAL).
        """
        if self.pdev.is_virtfn:
            pf = self.sriov_pf_core_dev
            if pf is None:
                if token is not None:
                    raise KernelError(errno.EINVAL, "VF token given, PF not bound to vfio-pci")
                return
            assert pf.vf_token is not None
            if token is None:
                raise KernelError(errno.EACCES, "VF token required to access device")
            if token != pf.vf_token.uuid:
                raise KernelError(errno.EACCES, "incorrect VF token provided for device")
        elif self.vf_token is not None:
            if self.vf_token.users:
                if token is None:
                    raise KernelError(errno.EACCES, "VF token required to access device")
                if token != self.vf_token.uuid:
                    raise KernelError(errno.EACCES, "incorrect VF token provided for device")
            elif token is not None:
                self.vf_token.uuid = token
        elif token is not None:
            raise KernelError(errno.EINVAL, "VF token given for a device that is not a PF or VF")

    # -- irq counts -----------------------------------------------------------------
    def get_irq_count(self, index: int) -> int:
        """Models vfio_pci_get_irq_count()."""
        pdev = self.pdev
        if index == INTX:
            return 1 if pdev.interrupt_pin and not pdev.is_virtfn else 0
        if index == MSI:
            pos = pdev.find_capability(P.PCI_CAP_ID_MSI)
            if pos:
                flags = pdev.cfg_read(pos + P.PCI_MSI_FLAGS, 2)
                return 1 << ((flags & P.PCI_MSI_FLAGS_QMASK) >> 1)
            return 0
        if index == MSIX:
            pos = pdev.find_capability(P.PCI_CAP_ID_MSIX)
            if pos:
                return (pdev.cfg_read(pos + P.PCI_MSIX_FLAGS, 2) & P.PCI_MSIX_FLAGS_QSIZE) + 1
            return 0
        if index == ERR:
            return 1 if pdev.is_pcie else 0
        if index == REQ:
            return 1
        return 0

    def raise_irq(self, index: int, vector: int = 0) -> bool:
        """The device signals interrupt ``vector`` of ``index``; True if an eventfd fired."""
        return self.irqs.raise_irq(index, vector)

    def request(self, count: int) -> None:
        """Models vfio_pci_core_request(): signal the REQ eventfd if one is set
        (the kernel only logs, at count 0, when none is)."""
        self.irqs.raise_irq(REQ)

    # -- ioctls ---------------------------------------------------------------------
    def ioctl(self, df: VfioDeviceFile, task: Task, cmd: int, arg: int) -> int:
        """Models vfio_pci_core_ioctl()."""
        handler = _PCI_IOCTLS.get(cmd)
        if handler is None:
            raise KernelError(errno.ENOTTY)
        self._task = task
        try:
            return handler(self, df, task, arg)
        finally:
            self._task = None

    def info_atomic_cap(self) -> bytes | None:
        """Models vfio_pci_info_atomic_cap(): the PF's DevCap2 completer sizes the
        path to the root supports (a VF reports its PF's); None (-ENODEV) if none."""
        pdev = self.pdev.physfn or self.pdev
        devcap2 = pcie_capability_read_dword(pdev, P.PCI_EXP_DEVCAP2)
        flags = 0
        for bit, out in ((P.PCI_EXP_DEVCAP2_ATOMIC_COMP32, C.VFIO_PCI_ATOMIC_COMP32),
                         (P.PCI_EXP_DEVCAP2_ATOMIC_COMP64, C.VFIO_PCI_ATOMIC_COMP64),
                         (P.PCI_EXP_DEVCAP2_ATOMIC_COMP128, C.VFIO_PCI_ATOMIC_COMP128)):
            if devcap2 & bit and pci_enable_atomic_ops_to_root(pdev, bit):
                flags |= out
        if not flags:
            return None
        return S.VFIO_DEVICE_INFO_CAP_PCI_ATOMIC_COMP.pack(
            id=C.VFIO_DEVICE_INFO_CAP_PCI_ATOMIC_COMP, version=1, flags=flags)

    def ioctl_get_info(self, df: VfioDeviceFile, task: Task, arg: int) -> int:
        """Models vfio_pci_ioctl_get_info() (6.6: copy-back min(argsz, 24)); the
        only capability modelled is the AtomicOp completer one (no s390 zPCI)."""
        lay = S.VFIO_DEVICE_INFO
        minsz = lay.offsetofend("num_irqs")
        info = lay.unpack(task.read(arg, minsz), partial=True)
        if info["argsz"] < minsz:
            raise KernelError(errno.EINVAL)
        copysz = min(info["argsz"], lay.size)
        info["flags"] = C.VFIO_DEVICE_FLAGS_PCI | (C.VFIO_DEVICE_FLAGS_RESET if self.reset_works else 0)
        info["num_regions"] = C.VFIO_PCI_NUM_REGIONS
        info["num_irqs"] = C.VFIO_PCI_NUM_IRQS
        info["cap_offset"] = 0
        info["pad"] = 0
        caps: list[bytes] = []
        if self.vfio.version.has_atomic_comp_cap:
            atomic = self.info_atomic_cap()
            if atomic is not None:
                caps.append(atomic)
        chain = build_cap_chain(caps, lay.size)
        if chain:
            info["flags"] |= C.VFIO_DEVICE_FLAGS_CAPS
            if info["argsz"] < lay.size + len(chain):
                info["argsz"] = lay.size + len(chain)
            else:
                task.write(arg + lay.size, chain)
                info["cap_offset"] = lay.size
        task.write(arg, lay.pack(info)[:copysz])
        return 0

    def ioctl_get_region_info(self, df: VfioDeviceFile, task: Task, arg: int) -> int:
        """Models vfio_pci_ioctl_get_region_info().

        BARs are not advertised mmap-able (FUSE cannot trap MMIO) unless the
        kernel was built with ``bar_mmap=True``: then memory BARs carry
        FLAG_MMAP and the MSI-X BAR the MSIX_MAPPABLE capability, as the kernel does.
        """
        lay = S.VFIO_REGION_INFO
        minsz = lay.offsetofend("offset")
        info = lay.unpack(task.read(arg, minsz))
        if info["argsz"] < minsz:
            raise KernelError(errno.EINVAL)
        idx = info["index"]
        caps: list[bytes] = []
        rw = C.VFIO_REGION_INFO_FLAG_READ | C.VFIO_REGION_INFO_FLAG_WRITE
        if idx == C.VFIO_PCI_CONFIG_REGION_INDEX:
            info.update(offset=C.VFIO_PCI_INDEX_TO_OFFSET(idx), size=self.pdev.cfg_size, flags=rw)
        elif C.VFIO_PCI_BAR0_REGION_INDEX <= idx <= C.VFIO_PCI_BAR5_REGION_INDEX:
            size = bar_len(self.pdev, idx)
            info.update(offset=C.VFIO_PCI_INDEX_TO_OFFSET(idx), size=size, flags=rw if size else 0)
            if size and self.vfio.bar_mmap and self._bar_mmap_supported(idx):
                info["flags"] |= C.VFIO_REGION_INFO_FLAG_MMAP
                x = msix_table_range(self.pdev)
                if x is not None and x[0] == idx:
                    caps.append(S.VFIO_INFO_CAP_HEADER.pack(id=C.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, version=1))
        elif idx == C.VFIO_PCI_ROM_REGION_INDEX:
            img = rom_image(self.pdev)
            info.update(offset=C.VFIO_PCI_INDEX_TO_OFFSET(idx), size=len(img),
                        flags=C.VFIO_REGION_INFO_FLAG_READ if img else 0)
        elif idx == C.VFIO_PCI_VGA_REGION_INDEX:
            raise KernelError(errno.EINVAL, "no VGA")
        else:
            raise KernelError(errno.EINVAL, "no such region")
        chain = build_cap_chain(caps, lay.size)
        if chain:
            info["flags"] |= C.VFIO_REGION_INFO_FLAG_CAPS
            if info["argsz"] < lay.size + len(chain):
                info["argsz"] = lay.size + len(chain)
                info["cap_offset"] = 0
            else:
                task.write(arg + lay.size, chain)
                info["cap_offset"] = lay.size
        task.write(arg, lay.pack(info))
        return 0

    def _bar_mmap_supported(self, idx: int) -> bool:
        """vdev->bar_mmap_supported[]: memory BARs of at least a page (or page aligned)."""
        for b in self.pdev.bars:
            if b.index == idx:
                return b.kind is not BarKind.IO and (b.size >= 4096 or not b.address & 0xFFF)
        return False

    def ioctl_get_irq_info(self, df: VfioDeviceFile, task: Task, arg: int) -> int:
        """Models vfio_pci_ioctl_get_irq_info() (dynamic MSI-X: no NORESIZE on MSI-X)."""
        lay = S.VFIO_IRQ_INFO
        minsz = lay.offsetofend("count")
        info = lay.unpack(task.read(arg, minsz))
        if info["argsz"] < minsz or info["index"] >= C.VFIO_PCI_NUM_IRQS:
            raise KernelError(errno.EINVAL)
        idx = info["index"]
        if idx == ERR and not self.pdev.is_pcie:
            raise KernelError(errno.EINVAL)
        flags = C.VFIO_IRQ_INFO_EVENTFD
        if idx == INTX:
            flags |= C.VFIO_IRQ_INFO_MASKABLE | C.VFIO_IRQ_INFO_AUTOMASKED
        elif idx != MSIX:
            flags |= C.VFIO_IRQ_INFO_NORESIZE
        info["flags"] = flags
        info["count"] = self.get_irq_count(idx)
        task.write(arg, lay.pack(info))
        return 0

    def ioctl_set_irqs(self, df: VfioDeviceFile, task: Task, arg: int) -> int:
        """Models vfio_pci_ioctl_set_irqs() + vfio_set_irqs_validate_and_prepare()."""
        lay = S.VFIO_IRQ_SET
        minsz = lay.offsetofend("count")
        hdr = lay.unpack(task.read(arg, minsz))
        index, start, count, flags = hdr["index"], hdr["start"], hdr["count"], hdr["flags"]
        if (hdr["argsz"] < minsz or index >= C.VFIO_PCI_NUM_IRQS or count >= C.U32_MAX - start
                or flags & ~(C.VFIO_IRQ_SET_DATA_TYPE_MASK | C.VFIO_IRQ_SET_ACTION_TYPE_MASK)):
            raise KernelError(errno.EINVAL)
        nirqs = self.get_irq_count(index)
        if start >= nirqs or start + count > nirqs:
            raise KernelError(errno.EINVAL)
        dtype = flags & C.VFIO_IRQ_SET_DATA_TYPE_MASK
        size = {C.VFIO_IRQ_SET_DATA_NONE: 0, C.VFIO_IRQ_SET_DATA_BOOL: 1, C.VFIO_IRQ_SET_DATA_EVENTFD: 4}.get(dtype)
        if size is None:
            raise KernelError(errno.EINVAL)
        data = b""
        if size:
            if hdr["argsz"] - minsz < count * size:
                raise KernelError(errno.EINVAL)
            data = task.read(arg + minsz, count * size)
        return self.irqs.set_irqs(task, flags, index, start, count, data)

    def ioctl_reset(self, df: VfioDeviceFile, task: Task, arg: int) -> int:
        """Models vfio_pci_ioctl_reset(): EINVAL unless reset_works; pci_try_reset_function()."""
        if not self.reset_works:
            raise KernelError(errno.EINVAL, "device has no function reset")
        self.low_power = False
        self._do_function_reset("VFIO_DEVICE_RESET", task.pid)
        return 0

    # -- hot reset ------------------------------------------------------------------------
    def _fill_entry(self, d: PciDev, cdev: bool, ictx: Any) -> tuple[int, bool]:
        """Models vfio_pci_fill_devs() for one function: (devid|group_id, clears DEV_ID_OWNED)."""
        if cdev:
            vdev = vfio_find_device_in_devset(self.dev_set, d)
            if vdev is None:
                devid = C.VFIO_PCI_DEVID_NOT_OWNED
            else:
                i = viommufd.vfio_iommufd_get_dev_id(vdev, ictx)
                if i > 0:
                    devid = i
                elif i == -errno.ENOENT:
                    devid = C.VFIO_PCI_DEVID_OWNED
                else:
                    devid = C.VFIO_PCI_DEVID_NOT_OWNED
            return devid, devid == C.VFIO_PCI_DEVID_NOT_OWNED
        if d.iommu_group is None:
            raise KernelError(errno.EPERM, f"{d.name} has no iommu group")
        return d.iommu_group, False

    def ioctl_get_pci_hot_reset_info(self, df: VfioDeviceFile, task: Task, arg: int) -> int:
        """Models vfio_pci_ioctl_get_pci_hot_reset_info() (6.6-6.9 copy-in-loop, or >= 6.10)."""
        hl = S.VFIO_PCI_HOT_RESET_INFO
        el = S.VFIO_PCI_DEPENDENT_DEVICE
        minsz = hl.offsetofend("count")
        hdr = hl.unpack(task.read(arg, minsz))
        if hdr["argsz"] < minsz:
            raise KernelError(errno.EINVAL)
        hdr["flags"] = 0
        slot = vfio_pci_probe_reset(self.pdev)
        devs = vfio_pci_slot_or_bus_devices(self.pdev, slot)
        cdev = self.cdev_opened
        ictx = viommufd.vfio_iommufd_device_ictx(self)
        cap = (hdr["argsz"] - minsz) // el.size
        fill_flags = (C.VFIO_PCI_HOT_RESET_FLAG_DEV_ID | C.VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED) if cdev else 0

        def entry(d: PciDev, ident: int) -> bytes:
            return el.pack(devid=ident, segment=d.domain, bus=d.bus.number, devfn=d.devfn)

        if self.vfio.version.hot_reset_info_local_buffer:
            count = len(devs)
            if count == 0:
                raise KernelError(errno.ERANGE)
            if count > cap:
                hdr["count"] = count
                task.write(arg, hl.pack(hdr))
                raise KernelError(errno.ENOSPC)
            buf = bytearray()
            for d in devs:
                ident, clear = self._fill_entry(d, cdev, ictx)
                if clear:
                    fill_flags &= ~C.VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED
                buf += entry(d, ident)
            task.write(arg + minsz, bytes(buf))
            hdr["count"] = count
            hdr["flags"] = fill_flags
            task.write(arg, hl.pack(hdr))
            return 0
        # 6.6-6.9: copy each entry inside the walk
        written = 0
        total = 0
        for d in devs:
            total += 1
            if written >= cap:
                continue
            ident, clear = self._fill_entry(d, cdev, ictx)
            if clear:
                fill_flags &= ~C.VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED
            task.write(arg + minsz + el.size * written, entry(d, ident))
            written += 1
        hdr["count"] = total
        hdr["flags"] = fill_flags
        task.write(arg, hl.pack(hdr))
        if total > written:
            raise KernelError(errno.ENOSPC)
        return 0

    def ioctl_pci_hot_reset(self, df: VfioDeviceFile, task: Task, arg: int) -> int:
        """Models vfio_pci_ioctl_pci_hot_reset()."""
        from ..group import VfioGroupFile

        hl = S.VFIO_PCI_HOT_RESET
        minsz = hl.offsetofend("count")
        hdr = hl.unpack(task.read(arg, minsz))
        if hdr["argsz"] < minsz or hdr["flags"]:
            raise KernelError(errno.EINVAL)
        count = hdr["count"]
        if bool(count) == self.cdev_opened:
            raise KernelError(errno.EINVAL, "cdev callers pass count 0, group callers count > 0")
        slot = vfio_pci_probe_reset(self.pdev)
        if not count:
            return vfio_pci_dev_set_hot_reset(self.dev_set, None, viommufd.vfio_iommufd_device_ictx(self), task)
        # vfio_pci_ioctl_pci_hot_reset_groups()
        ndev = len(vfio_pci_slot_or_bus_devices(self.pdev, slot))
        if not self.vfio.version.hot_reset_array_count_u32 and count > C.INT_MAX:
            raise KernelError(errno.ENOMEM, "negative int array_count")
        if count > ndev:
            raise KernelError(errno.EINVAL, "more group fds than devices")
        raw = task.read(arg + minsz, 4 * count)
        fds = [int.from_bytes(raw[4 * i: 4 * i + 4], "little", signed=True) for i in range(count)]
        groups: list[VfioGroupFile] = []
        for fd in fds:
            f = task.fget(fd)  # EBADF
            if not isinstance(f, VfioGroupFile):
                if not isinstance(f, File):
                    f.close()
                raise KernelError(errno.EINVAL, f"fd {fd} is not a VFIO group")
            groups.append(f)
        return vfio_pci_dev_set_hot_reset(self.dev_set, groups, None, task)

    # -- read / write -----------------------------------------------------------------------
    def read(self, task: Task, offset: int, size: int) -> bytes:
        """Models vfio_pci_core_read() -> vfio_pci_rw()."""
        idx = C.VFIO_PCI_OFFSET_TO_INDEX(offset)
        pos = offset & C.VFIO_PCI_OFFSET_MASK
        if idx == C.VFIO_PCI_CONFIG_REGION_INDEX:
            return self.config.read(pos, size)
        if idx <= C.VFIO_PCI_BAR5_REGION_INDEX:
            return vfio_pci_bar_read(self.pdev, self.behaviour, idx, pos, size, self.config.memory_enabled())
        if idx == C.VFIO_PCI_ROM_REGION_INDEX:
            return vfio_pci_rom_read(self.pdev, pos, size)
        raise KernelError(errno.EINVAL)

    def write(self, task: Task, offset: int, data: bytes) -> int:
        """Models vfio_pci_core_write() -> vfio_pci_rw()."""
        idx = C.VFIO_PCI_OFFSET_TO_INDEX(offset)
        pos = offset & C.VFIO_PCI_OFFSET_MASK
        if idx == C.VFIO_PCI_CONFIG_REGION_INDEX:
            self._task = task
            try:
                return self.config.write(pos, data)
            finally:
                self._task = None
        if idx <= C.VFIO_PCI_BAR5_REGION_INDEX:
            return vfio_pci_bar_write(self.pdev, self.behaviour, idx, pos, data, self.config.memory_enabled())
        raise KernelError(errno.EINVAL)

    # -- features ----------------------------------------------------------------------------
    def device_feature(self, task: Task, flags: int, arg: int, argsz: int) -> int:
        """Models vfio_pci_core_ioctl_feature()."""
        feature = flags & C.VFIO_DEVICE_FEATURE_MASK
        if feature == C.VFIO_DEVICE_FEATURE_PCI_VF_TOKEN:
            return self.feature_token(task, flags, arg, argsz)
        if feature in (C.VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY, C.VFIO_DEVICE_FEATURE_LOW_POWER_EXIT):
            if not vfio_check_feature(flags, argsz, C.VFIO_DEVICE_FEATURE_SET, 0):
                return 0
            self.low_power = feature == C.VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY
            return 0
        if feature == C.VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP:
            if not vfio_check_feature(flags, argsz, C.VFIO_DEVICE_FEATURE_SET, 8):
                return 0
            from .vfio_pci_intrs import eventfd_ctx_fdget

            fd = int.from_bytes(task.read(arg, 4), "little", signed=True)
            eventfd_ctx_fdget(task, fd).close()
            self.low_power = True
            return 0
        raise KernelError(errno.ENOTTY)

    def feature_token(self, task: Task, flags: int, arg: int, argsz: int) -> int:
        """Models vfio_pci_core_feature_token(): SET only (a GET could show the
        previous user's token), 16 bytes of uuid_t; ENOTTY unless an SR-IOV PF."""
        if self.vf_token is None:
            raise KernelError(errno.ENOTTY, "not an SR-IOV PF")
        if not vfio_check_feature(flags, argsz, C.VFIO_DEVICE_FEATURE_SET, 16):
            return 0
        uuid = task.read(arg, 16)
        self.vf_token.uuid = uuid
        return 0

    # -- describe --------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        ictx = viommufd.vfio_iommufd_device_ictx(self)
        return {
            "bdf": self.name,
            "vfio": f"vfio{self.index}",
            "group": self.group.id,
            "dev_set": self.dev_set.label,
            "open_count": self.open_count,
            "cdev_opened": self.cdev_opened,
            "cdev_files": len(self.cdev_files),
            "opener_pid": self.opener_pid,
            "iommufd": id(ictx) if ictx is not None else None,
            "devid": viommufd.vfio_iommufd_device_id(self) if ictx is not None else None,
            "attached_pt": self.pt_id,
            "reset_works": self.reset_works,
            "needs_reset": self.needs_reset,
            "irqs": self.irqs.describe(),
            **({"vf_token": uuid_string(self.vf_token.uuid), "vf_token_users": self.vf_token.users}
               if self.vf_token is not None else {}),
            **({"physfn": self.pdev.physfn.name} if self.pdev.physfn is not None else {}),
        }


# --------------------------------------------------------------------------
# dev_set operations
# --------------------------------------------------------------------------


def vfio_pci_dev_set_resettable(dev_set: VfioDeviceSet) -> PciDev | None:
    """Models vfio_pci_dev_set_resettable(): every function on the slot/bus is in the set."""
    pdev = dev_set.device_list[0].pdev
    slot = pci_probe_reset_slot(pdev.slot)
    if not slot and not pci_probe_reset_bus(pdev):
        return None
    for d in vfio_pci_slot_or_bus_devices(pdev, slot):
        if vfio_find_device_in_devset(dev_set, d) is None:
            return None
    return pdev


def _pci_reset_bus(dev_set: VfioDeviceSet, pdev: PciDev, cause: str, pid: int | None) -> None:
    """Models pci_reset_bus(pdev): slot or secondary-bus reset of everything below."""
    vfio = dev_set.device_list[0].vfio
    slot = pci_probe_reset_slot(pdev.slot)
    devs = vfio_pci_slot_or_bus_devices(pdev, slot)
    for d in devs:
        err = vfio.hooks.reset_errno.get(d.name)
        if err:
            raise KernelError(err, f"reset of {d.name} failed (injected)")
    for d in devs:
        vd = vfio.device_of(d)
        if isinstance(vd, VfioPciDevice):
            vd._reset_state()
            vd.low_power = False
        vfio.record_reset(d, "slot" if slot else "bus", cause, pid)


def vfio_dev_in_groups(vdev: VfioDevice, groups: list[Any] | None) -> bool:
    """Models vfio_dev_in_groups()."""
    from ..group import vfio_file_has_dev

    if not groups:
        return False
    return any(vfio_file_has_dev(g, vdev) for g in groups)


def vfio_pci_dev_set_hot_reset(dev_set: VfioDeviceSet, groups: list[Any] | None, ictx: Any,
                               task: Task) -> int:
    """Models vfio_pci_dev_set_hot_reset().

    Every dev_set member, open or not, must be owned (cdev: devid > 0 or
    -ENOENT from vfio_iommufd_get_dev_id; group: its group file supplied), and
    its memory_lock must be free (EBUSY). >= 6.10 checks both member by member
    in list order; 6.6-6.9 checks every member's ownership first, then the
    memory_locks (``hot_reset_single_pass_locking``).
    """
    pdev = vfio_pci_dev_set_resettable(dev_set)
    if pdev is None:
        raise KernelError(errno.EINVAL, "a function on the slot/bus is not bound to vfio-pci")
    vfio = dev_set.device_list[0].vfio
    hooks = vfio.hooks
    single_pass = vfio.version.hot_reset_single_pass_locking
    for vdev in dev_set.device_list:
        if ictx is not None:
            devid = viommufd.vfio_iommufd_get_dev_id(vdev, ictx)
            owned = devid > 0 or devid == -errno.ENOENT
        else:
            owned = vfio_dev_in_groups(vdev, groups)
        if not owned:
            raise KernelError(errno.EINVAL, f"{vdev.name} is not owned by the caller")
        if single_pass and vdev.name in hooks.memory_lock_contended:
            raise KernelError(errno.EBUSY, f"{vdev.name}: memory_lock contended")
    if not single_pass:  # 6.6-6.9: the memory_lock pass after the ownership/vma_lock pass
        for vdev in dev_set.device_list:
            if vdev.name in hooks.memory_lock_contended:
                raise KernelError(errno.EBUSY, f"{vdev.name}: memory_lock contended")
    _pci_reset_bus(dev_set, pdev, "VFIO_DEVICE_PCI_HOT_RESET", task.pid)
    return 0


def vfio_pci_dev_set_try_reset(dev_set: VfioDeviceSet, pid: int | None) -> None:
    """Models vfio_pci_dev_set_try_reset(): a silent bus/slot reset when the set is idle."""
    if vfio_device_set_open_count(dev_set) > 1:
        return
    if not any(isinstance(d, VfioPciDevice) and d.needs_reset for d in dev_set.device_list):
        return
    pdev = vfio_pci_dev_set_resettable(dev_set)
    if pdev is None:
        return
    try:
        _pci_reset_bus(dev_set, pdev, "close", pid)
    except KernelError:
        return
    for d in dev_set.device_list:
        if isinstance(d, VfioPciDevice):
            d.needs_reset = False


_PCI_IOCTLS = {
    IO.VFIO_DEVICE_GET_INFO: VfioPciDevice.ioctl_get_info,
    IO.VFIO_DEVICE_GET_REGION_INFO: VfioPciDevice.ioctl_get_region_info,
    IO.VFIO_DEVICE_GET_IRQ_INFO: VfioPciDevice.ioctl_get_irq_info,
    IO.VFIO_DEVICE_SET_IRQS: VfioPciDevice.ioctl_set_irqs,
    IO.VFIO_DEVICE_RESET: VfioPciDevice.ioctl_reset,
    IO.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: VfioPciDevice.ioctl_get_pci_hot_reset_info,
    IO.VFIO_DEVICE_PCI_HOT_RESET: VfioPciDevice.ioctl_pci_hot_reset,
}

__all__ = ["VfioPciDevice", "build_cap_chain"]
