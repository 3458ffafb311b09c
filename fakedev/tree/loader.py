"""Device-tree files (TOML) -> ``DeviceTree`` (a validated ``PciTopology``).

What lives here: reading a tree with tomllib, checking every field, deriving
what the file leaves out (bus numbers, BAR addresses, multifunction bits,
iommu groups from ACS), building config space with ``config.py`` and the
``PciTopology`` of ``fakedev.kernel.pci``. The format is documented in
docs/device-tree.md.

What must not: no kernel behaviour (reset/dev_set logic is the model's; the
topology only records what the hardware and the PCI core would hold) and no
I/O beyond reading the tree file and the config files it names. A tree with
any error is refused whole: ``TreeError`` names the file, line and field.
"""

from __future__ import annotations

import itertools
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from attrs import define, evolve, field, frozen

from fakedev.kernel.fault_inject import KINDS as FAULT_KIND_NAMES
from fakedev.kernel.fault_inject import FaultSpec, FaultSpecError, make_spec
from fakedev.kernel.pci import (
    PCI_CFG_SPACE_EXP_SIZE,
    PCI_CFG_SPACE_SIZE,
    PCI_EXP_DEVCAP2_ATOMIC_COMP32,
    PCI_EXP_DEVCAP2_ATOMIC_COMP64,
    PCI_EXP_DEVCAP2_ATOMIC_COMP128,
    PCI_EXP_DEVCAP2_ATOMIC_ROUTE,
    PCI_EXP_TYPE_DOWNSTREAM,
    PCI_EXP_TYPE_ENDPOINT,
    PCI_EXP_TYPE_LEG_END,
    PCI_EXP_TYPE_RC_END,
    PCI_EXP_TYPE_ROOT_PORT,
    PCI_EXP_TYPE_UPSTREAM,
    PCI_EXT_CAP_ID_ACS,
    Bar,
    BarKind,
    PciBus,
    PciDev,
    PciSlot,
    PciTopology,
    ResetMethod,
    bdf_name,
)
from fakedev.kernel.version import NEWEST, KernelVersion
from fakedev.tree.config import (
    AfCap,
    BridgeBuses,
    DumpError,
    FunctionSpec,
    MsiCap,
    MsixCap,
    PcieCap,
    PmCap,
    SlotCap,
    SriovCap,
    Window,
    bars_from_config,
    build_config,
    parse_config_bytes,
)
from fakedev.tree.errors import PathElem, SourceLocator, TreeError

if TYPE_CHECKING:
    from fakedev.kernel.kernel import Kernel

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"

#: kind -> (PCIe port type or None for conventional PCI, is a bridge)
KINDS: dict[str, tuple[int | None, bool]] = {
    "endpoint": (PCI_EXP_TYPE_ENDPOINT, False),
    "legacy-endpoint": (PCI_EXP_TYPE_LEG_END, False),
    "integrated-endpoint": (PCI_EXP_TYPE_RC_END, False),
    "pci-endpoint": (None, False),
    "root-port": (PCI_EXP_TYPE_ROOT_PORT, True),
    "upstream-port": (PCI_EXP_TYPE_UPSTREAM, True),
    "downstream-port": (PCI_EXP_TYPE_DOWNSTREAM, True),
    "pci-bridge": (None, True),
}
_PORT_TYPES = {PCI_EXP_TYPE_ROOT_PORT, PCI_EXP_TYPE_UPSTREAM, PCI_EXP_TYPE_DOWNSTREAM}
_PCIE_TO_KIND = {t: k for k, (t, _) in KINDS.items() if t is not None}

_BDF = re.compile(r"^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-1][0-9a-fA-F])\.([0-7])$")
_BUS = re.compile(r"^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2})$")
_DRIVER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_PINS = {"none": 0, "A": 1, "B": 2, "C": 3, "D": 4}

TOP_KEYS = {"kernel", "description", "root_buses", "function", "fault", "noiommu", "enable_sriov"}

# [[fault]] kinds (fakedev.kernel.fault_inject: call-fails, unplug, and the
# KernelHooks ones memory-lock-busy, device-lock-busy, reset-fails)
FAULT_KINDS = set(FAULT_KIND_NAMES)
FUNC_KEYS = {
    "bdf", "kind", "vendor", "device", "subsystem_vendor", "subsystem_device", "class",
    "revision", "interrupt_pin", "irq", "bars", "rom_size", "capabilities", "config_size",
    "config_file", "secondary_bus", "slot", "driver", "iommu_group", "reset_methods",
    "behaviour", "physfn",
}  # fmt: skip
FILE_KEYS = {
    "bdf", "config_file", "bars", "rom_size", "irq", "secondary_bus", "slot", "driver",
    "iommu_group", "reset_methods", "behaviour", "physfn",
}  # fmt: skip
CAP_KEYS = {"pm", "msi", "msix", "pcie", "af", "acs", "sriov"}

VFIO_PCI = "vfio-pci"

#: bytes a capability needs for what the model reads of it (PM, MSI, PCIe v1, MSI-X, AF)
_CAP_MIN_LEN = {0x01: 8, 0x05: 10, 0x10: 0x24, 0x11: 12, 0x13: 6}

# where the "firmware" places BARs
_IO_START, _IO_END = 0x2000, 0x10000
_MEM_START, _MEM_END = 0xC000_0000, 0xFEC0_0000
_PREF_START = 0x40_0000_0000
_MB = 1 << 20


@frozen
class DeviceTree:
    """A loaded tree: the topology, the kernel version to model, fault entries."""

    topology: PciTopology
    version: KernelVersion
    source: Path
    faults: tuple[FaultSpec, ...] = ()
    description: str = ""
    #: (BDF, behaviour name) of the functions whose ``behaviour`` is not the default
    behaviours: tuple[tuple[str, str], ...] = ()
    #: ``noiommu = true``: a machine without an IOMMU (no iommu groups) with
    #: vfio's enable_unsafe_noiommu_mode set
    noiommu: bool = False
    #: ``enable_sriov = true``: vfio-pci's enable_sriov module parameter (a PF
    #: bound to vfio-pci may have VFs enabled only with it)
    enable_sriov: bool = False

    def make_kernel(self) -> Kernel:
        """A new kernel model (fresh VFIO/iommufd state) over this tree's topology.

        The ``PciTopology`` object is shared with the kernel, not copied.
        """
        from fakedev.kernel.kernel import Kernel
        from fakedev.kernel.vfio.pci.behaviours import make_behaviour

        behaviours = {}
        for bdf, name in self.behaviours:
            pdev = self.topology.find(bdf)
            assert pdev is not None
            behaviours[bdf] = make_behaviour(name, pdev)
        kernel = Kernel(self.topology, version=self.version, behaviours=behaviours, noiommu=self.noiommu,
                        enable_sriov=self.enable_sriov)
        for spec in self.faults:
            kernel.faults.add(spec)
        return kernel


def default_tree_path() -> Path:
    return FIXTURES / "dual-function-nic.toml"


def load_tree(path: Path | str) -> DeviceTree:
    """Read, validate and build the device tree in ``path``."""
    return _Loader(Path(path)).load()


# ---------------------------------------------------------------------------


@define
class _Fn:
    """One [[function]] entry after field validation."""

    index: int
    domain: int
    bus: int
    devfn: int
    kind: str = "endpoint"
    driver: str | None = None
    group: int | str | None = "auto"  # int, None (no group), "auto" (derived)
    irq: int | None = None
    reset_methods: list[ResetMethod] | None = None
    bars: list[Bar] = field(factory=list)
    rom_size: int = 0
    secondary: int | None = None
    slot: SlotCap | None = None
    slot_reset: bool = False
    spec: FunctionSpec | None = None  # None when config comes from a file
    file_config: bytearray | None = None
    pdev: PciDev | None = None
    subordinate: int = 0
    children: list[_Fn] = field(factory=list)
    physfn: str | None = None  # the PF's BDF (an SR-IOV VF)

    @property
    def is_bridge(self) -> bool:
        return self.secondary is not None

    @property
    def name(self) -> str:
        return bdf_name(self.domain, self.bus, self.devfn)


_MISSING: Any = object()


class _Loader:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.text = ""
        self.loc = SourceLocator("")
        self._fn_of: dict[int, _Fn] = {}
        self._names: dict[int, str] = {}

    # -- error helpers ------------------------------------------------------
    def fail(self, where: tuple[PathElem, ...], problem: str, label: str | None = None) -> NoReturn:
        if label is None:
            label = _dotted(where)
            if len(where) >= 2 and where[0] == "function" and isinstance(where[1], int):
                name = self._names.get(where[1])
                if name is not None:
                    label = f"function[{where[1]}] ({name})" + _dotted(where[2:], nested=True)
        raise TreeError(self.path, self.loc.line_of(where), label, problem)

    def fn_fail(self, f: _Fn, key: tuple[PathElem, ...], problem: str) -> NoReturn:
        where: tuple[PathElem, ...] = ("function", f.index, *key)
        self.fail(where, problem)

    def check_keys(
        self, table: Mapping[str, Any], allowed: set[str], where: tuple[PathElem, ...]
    ) -> None:
        for k in table:
            if k not in allowed:
                self.fail(
                    (*where, k),
                    f"unknown field {k!r} (allowed here: {', '.join(sorted(allowed))})",
                )

    def get_int(
        self,
        t: Mapping[str, Any],
        key: str,
        where: tuple[PathElem, ...],
        default: Any = _MISSING,
        lo: int | None = None,
        hi: int | None = None,
    ) -> Any:
        if key not in t:
            if default is _MISSING:
                self.fail(where, f"missing required field {key!r}")
            return default
        v = t[key]
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail((*where, key), f"must be an integer, not {_tname(v)} {v!r}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            self.fail((*where, key), f"{v:#x} ({v}) is out of range [{lo:#x}, {hi:#x}]")
        return v

    def get_bool(
        self, t: Mapping[str, Any], key: str, where: tuple[PathElem, ...], default: bool
    ) -> bool:
        if key not in t:
            return default
        v = t[key]
        if not isinstance(v, bool):
            self.fail((*where, key), f"must be true or false, not {_tname(v)} {v!r}")
        return v

    def get_str(
        self, t: Mapping[str, Any], key: str, where: tuple[PathElem, ...], default: Any = _MISSING
    ) -> Any:
        if key not in t:
            if default is _MISSING:
                self.fail(where, f"missing required field {key!r}")
            return default
        v = t[key]
        if not isinstance(v, str):
            self.fail((*where, key), f"must be a string, not {_tname(v)} {v!r}")
        return v

    def get_table(
        self, t: Mapping[str, Any], key: str, where: tuple[PathElem, ...]
    ) -> dict[str, Any] | None:
        if key not in t:
            return None
        v = t[key]
        if not isinstance(v, dict):
            self.fail((*where, key), f"must be a table, not {_tname(v)}")
        return v

    # -- top level ------------------------------------------------------------
    def load(self) -> DeviceTree:
        try:
            raw = self.path.read_bytes()
        except OSError as e:
            raise TreeError(self.path, 0, "", f"cannot read the tree file: {e.strerror}") from e
        try:
            self.text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TreeError(self.path, 0, "", "not UTF-8 text") from e
        self.loc = SourceLocator(self.text)
        try:
            doc = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as e:
            m = re.search(r"line (\d+)", str(e))
            raise TreeError(self.path, int(m.group(1)) if m else 0, "", f"TOML syntax: {e}") from e

        self.check_keys(doc, TOP_KEYS, ())
        version = NEWEST
        if "kernel" in doc:
            ktext = self.get_str(doc, "kernel", ())
            try:
                version = KernelVersion.parse(ktext)
            except ValueError as e:
                self.fail(("kernel",), str(e))
        description = self.get_str(doc, "description", (), "")
        noiommu = self.get_bool(doc, "noiommu", (), False)
        enable_sriov = self.get_bool(doc, "enable_sriov", (), False)

        funcs_raw = doc.get("function", [])
        if not isinstance(funcs_raw, list) or not all(isinstance(x, dict) for x in funcs_raw):
            self.fail(("function",), "must be an array of tables ([[function]])")
        if not funcs_raw:
            self.fail((), "the tree has no [[function]] entries", "function")
        fns = [self.parse_function(i, t) for i, t in enumerate(funcs_raw)]
        root_buses = self.parse_root_buses(doc, fns)
        if noiommu:
            for f in fns:
                if isinstance(f.group, int):
                    self.fn_fail(
                        f, ("iommu_group",),
                        "a tree with noiommu = true has no IOMMU, so no iommu groups"
                        " (vfio-pci gives its functions noiommu groups)",
                    )
                f.group = None
        self.check_sriov(fns, enable_sriov)
        topology = self.build(fns, root_buses)
        self.link_sriov(fns)
        faults = self.parse_faults(doc, {f.name for f in fns})
        behaviours = self.parse_behaviours(funcs_raw, fns)
        return DeviceTree(
            topology, version, self.path, faults, description, behaviours, noiommu, enable_sriov
        )

    def parse_root_buses(self, doc: Mapping[str, Any], fns: list[_Fn]) -> list[tuple[int, int]]:
        if "root_buses" not in doc:
            return sorted({(f.domain, 0) for f in fns})
        v = doc["root_buses"]
        if not isinstance(v, list) or not v:
            self.fail(("root_buses",), 'must be a non-empty array of "DDDD:BB" strings')
        out: list[tuple[int, int]] = []
        for item in v:
            m = _BUS.match(item) if isinstance(item, str) else None
            if not m:
                self.fail(("root_buses",), f'{item!r} is not a bus name like "0000:00"')
            rb = (int(m.group(1) or "0", 16), int(m.group(2), 16))
            if rb in out:
                self.fail(("root_buses",), f"{item!r} is listed twice")
            out.append(rb)
        return sorted(out)

    def parse_faults(self, doc: Mapping[str, Any], names: set[str]) -> tuple[FaultSpec, ...]:
        """``[[fault]]`` tables: ``kind`` (fakedev.kernel.fault_inject.KINDS) and
        that kind's fields (``device``, ``errno`` name, ``call``, ``nth``,
        ``count``, ``after``), checked by ``make_spec``; a device must be a
        function of this tree."""
        raw = doc.get("fault", [])
        if not isinstance(raw, list) or not all(isinstance(x, dict) for x in raw):
            self.fail(("fault",), "must be an array of tables ([[fault]])")
        out: list[FaultSpec] = []
        for i, t in enumerate(raw):
            w: tuple[PathElem, ...] = ("fault", i)
            fields = {k: v for k, v in t.items() if k != "kind"}
            try:
                spec = make_spec(t.get("kind"), fields)
            except FaultSpecError as e:
                self.fail((*w, e.field) if e.field and (e.field in t) else w, e.problem)
            if spec.device is not None and spec.device not in names:
                self.fail((*w, "device"), f"no function {spec.device} in this tree")
            out.append(spec)
        return tuple(out)

    def parse_behaviours(self, raw: list[dict[str, Any]], fns: list[_Fn]) -> tuple[tuple[str, str], ...]:
        """``behaviour = "NAME"`` of a function: what its BARs do (default "ram").

        Checked after the topology is built: the function must be bound to
        vfio-pci, and "dma-engine" needs a memory BAR0 holding its registers
        clear of the MSI-X table and PBA.
        """
        from fakedev.kernel.vfio.pci.behaviours import BEHAVIOURS
        from fakedev.kernel.vfio.pci.dma_engine import REGS_SIZE

        out: list[tuple[str, str]] = []
        for f, t in zip(fns, raw, strict=True):
            if "behaviour" not in t:
                continue
            name = self.get_str(t, "behaviour", ("function", f.index))
            if name not in BEHAVIOURS:
                self.fn_fail(f, ("behaviour",),
                             f"unknown behaviour {name!r} (one of: {', '.join(sorted(BEHAVIOURS))})")
            if f.driver != VFIO_PCI:
                self.fn_fail(f, ("behaviour",), f"a behaviour is for a function bound to vfio-pci, "
                                                f"not driver {f.driver or 'none'!r}")
            if name == "dma-engine":
                assert f.pdev is not None
                bar0 = next((b for b in f.pdev.bars if b.index == 0), None)
                if bar0 is None or bar0.kind is BarKind.IO or bar0.size < REGS_SIZE:
                    self.fn_fail(f, ("behaviour",), f"dma-engine needs a memory BAR0 of at least "
                                                    f"{REGS_SIZE:#x} bytes for its registers")
                for label, tbl in (("MSI-X table", 0x4), ("MSI-X PBA", 0x8)):
                    cap = f.pdev.find_capability(0x11)
                    if cap:
                        reg = f.pdev.cfg_read(cap + tbl, 4)
                        if reg & 7 == 0 and reg & ~7 < REGS_SIZE:
                            self.fn_fail(f, ("behaviour",), f"dma-engine registers (BAR0 0x0-"
                                                            f"{REGS_SIZE - 1:#x}) overlap the {label}")
            if name != "ram":
                out.append((f.name, name))
        return tuple(out)

    # -- one function ----------------------------------------------------------
    def parse_function(self, i: int, t: dict[str, Any]) -> _Fn:
        w: tuple[PathElem, ...] = ("function", i)
        bdf = self.get_str(t, "bdf", w)
        m = _BDF.match(bdf)
        if not m:
            self.fail((*w, "bdf"), f'{bdf!r} is not a function address like "0000:01:00.0"')
        domain, bus = int(m.group(1) or "0", 16), int(m.group(2), 16)
        devfn = (int(m.group(3), 16) << 3) | int(m.group(4))
        self._names[i] = bdf_name(domain, bus, devfn)
        f = _Fn(index=i, domain=domain, bus=bus, devfn=devfn)

        if "config_file" in t:
            self.check_keys(t, FILE_KEYS, w)
            self.parse_config_file(f, t)
        else:
            self.check_keys(t, FUNC_KEYS, w)
            kind = self.get_str(t, "kind", w, "endpoint")
            if kind not in KINDS:
                self.fn_fail(f, ("kind",), f"unknown kind {kind!r} (one of: {', '.join(KINDS)})")
            f.kind = kind

        is_bridge = KINDS[f.kind][1]
        pcie_type = KINDS[f.kind][0]
        # bridge bus numbers
        if is_bridge:
            if "secondary_bus" in t:
                f.secondary = self.get_int(t, "secondary_bus", w, lo=1, hi=255)
            elif f.file_config is not None and f.file_config[0x19]:
                f.secondary = f.file_config[0x19]
            else:
                self.fn_fail(f, (), f"a {f.kind} needs secondary_bus (the bus number behind it)")
            assert f.secondary is not None
            if f.secondary <= bus:
                self.fn_fail(
                    f,
                    ("secondary_bus",),
                    f"secondary bus {f.secondary:#04x} must be above the bridge's own bus {bus:#04x}",
                )
        elif "secondary_bus" in t:
            self.fn_fail(
                f,
                ("secondary_bus",),
                f"only bridges and ports have a secondary bus (this is a {f.kind})",
            )

        # slot
        slot_t = self.get_table(t, "slot", w)
        if slot_t is not None:
            if pcie_type not in (PCI_EXP_TYPE_ROOT_PORT, PCI_EXP_TYPE_DOWNSTREAM):
                self.fn_fail(f, ("slot",), "only a root-port or downstream-port has a slot")
            sw = (*w, "slot")
            self.check_keys(slot_t, {"number", "hotplug", "reset"}, sw)
            number = self.get_int(slot_t, "number", sw, lo=0, hi=0x1FFF)
            hotplug = self.get_bool(slot_t, "hotplug", sw, True)
            reset = self.get_bool(slot_t, "reset", sw, hotplug)
            if reset and not hotplug:
                self.fn_fail(
                    f, ("slot", "reset"), "slot reset needs a hot-plug slot (hotplug = true)"
                )
            f.slot = SlotCap(number, hotplug, True)
            f.slot_reset = reset

        # driver / group / reset methods / irq
        default_driver = (
            "pcieport" if pcie_type in _PORT_TYPES else (None if is_bridge else VFIO_PCI)
        )
        drv = self.get_str(t, "driver", w, default_driver or "none")
        if not _DRIVER.match(drv):
            self.fn_fail(
                f, ("driver",), f'{drv!r} is not a driver name (e.g. "vfio-pci", "igb", "none")'
            )
        f.driver = None if drv == "none" else drv
        if f.driver == VFIO_PCI and is_bridge:
            self.fn_fail(
                f, ("driver",), "vfio-pci does not bind bridges (vfio_pci_probe refuses them)"
            )
        if "iommu_group" in t:
            g = t["iommu_group"]
            if g == "none":
                f.group = None
            elif isinstance(g, int) and not isinstance(g, bool) and 0 <= g < 1 << 31:
                f.group = g
            else:
                self.fn_fail(
                    f, ("iommu_group",), f'must be a group number >= 0 or "none", not {g!r}'
                )
        if "reset_methods" in t:
            rm = t["reset_methods"]
            names = [r.value for r in ResetMethod]
            if not isinstance(rm, list) or not all(isinstance(x, str) for x in rm):
                self.fn_fail(
                    f, ("reset_methods",), f"must be an array of method names ({', '.join(names)})"
                )
            for x in rm:
                if x not in names:
                    self.fn_fail(
                        f,
                        ("reset_methods",),
                        f"unknown reset method {x!r} (one of: {', '.join(names)})",
                    )
            if len(set(rm)) != len(rm):
                self.fn_fail(f, ("reset_methods",), "a reset method is listed twice")
            f.reset_methods = [ResetMethod(x) for x in rm]
        if "irq" in t:
            f.irq = self.get_int(t, "irq", w, lo=0, hi=0xFFFF)

        # BARs and ROM
        nbars = 2 if is_bridge else 6
        if "bars" in t or f.file_config is None:
            f.bars = self.parse_bars(f, t.get("bars", []), nbars)
        else:
            f.bars = bars_from_config(f.file_config)
        if "rom_size" in t:
            f.rom_size = self.get_int(t, "rom_size", w, lo=0, hi=1 << 24)
            if f.rom_size and (f.rom_size < 2048 or not _pow2(f.rom_size)):
                self.fn_fail(
                    f, ("rom_size",), f"{f.rom_size:#x} must be 0 or a power of two >= 0x800"
                )
        if f.file_config is not None and "bars" in t:
            self.check_bars_match_file(f)

        if "physfn" in t:
            pf = self.get_str(t, "physfn", w)
            pm = _BDF.match(pf)
            if not pm:
                self.fn_fail(f, ("physfn",), f'{pf!r} is not a function address like "0000:01:00.0"')
            f.physfn = _bdf_from_match(pm)
            if f.kind != "endpoint":
                self.fn_fail(f, ("physfn",), f"a VF is an endpoint, not a {f.kind}")
            if f.physfn == f.name:
                self.fn_fail(f, ("physfn",), "a function cannot be its own PF")
        if f.file_config is None:
            f.spec = self.parse_generated(f, t, is_bridge, pcie_type)
        return f

    def parse_config_file(self, f: _Fn, t: Mapping[str, Any]) -> None:
        w: tuple[PathElem, ...] = ("function", f.index)
        rel = self.get_str(t, "config_file", w)
        cpath = (self.path.parent / rel).resolve()
        try:
            data = cpath.read_bytes()
        except OSError as e:
            self.fn_fail(f, ("config_file",), f"cannot read {cpath}: {e.strerror}")
        try:
            cfg = parse_config_bytes(data, f.name)
        except DumpError as e:
            at = f" (line {e.line} of {rel})" if e.line else ""
            self.fn_fail(f, ("config_file",), f"{rel}: {e}{at}")
        vendor = cfg[0] | cfg[1] << 8
        if vendor in (0, 0xFFFF):
            self.fn_fail(f, ("config_file",), f"{rel}: vendor id {vendor:#06x} means no device")
        header = cfg[0x0E] & 0x7F
        if header not in (0, 1):
            self.fn_fail(
                f, ("config_file",), f"{rel}: header type {header} is not supported (0 or 1)"
            )
        probe = PciDev(bus=PciBus(0, 0), devfn=0, config=cfg)
        for cid, pos in probe.capabilities():
            need = _CAP_MIN_LEN.get(cid, 2)
            if pos + need > PCI_CFG_SPACE_SIZE:
                self.fn_fail(
                    f,
                    ("config_file",),
                    f"{rel}: capability {cid:#04x} at {pos:#x} runs past the 256-byte header space",
                )
        ptype = probe.pcie_type
        if header == 1:
            f.kind = _PCIE_TO_KIND.get(ptype, "pci-bridge") if ptype is not None else "pci-bridge"
            if not KINDS[f.kind][1]:
                self.fn_fail(
                    f, ("config_file",), f"{rel}: type 1 header but PCIe type {ptype} is not a port"
                )
        else:
            f.kind = _PCIE_TO_KIND.get(ptype, "endpoint") if ptype is not None else "pci-endpoint"
            if KINDS[f.kind][1]:
                self.fn_fail(
                    f, ("config_file",), f"{rel}: type 0 header but PCIe type {ptype} is a port"
                )
        f.file_config = cfg

    def parse_bars(self, f: _Fn, raw: Any, nbars: int) -> list[Bar]:
        if not isinstance(raw, list) or not all(isinstance(x, dict) for x in raw):
            self.fn_fail(
                f,
                ("bars",),
                'must be an array of tables like { index = 0, type = "mem32", size = 0x1000 }',
            )
        used: dict[int, int] = {}
        out: list[Bar] = []
        for j, b in enumerate(raw):
            bw: tuple[PathElem, ...] = ("function", f.index, "bars", j)
            self.check_keys(b, {"index", "type", "size", "prefetchable"}, bw)
            if "index" not in b:
                self.fn_fail(f, ("bars", j), "missing required field 'index'")
            idx = b["index"]
            if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < nbars:
                self.fn_fail(
                    f,
                    ("bars", j, "index"),
                    f"BAR index {idx!r} must be 0..{nbars - 1}"
                    + (" (a bridge has BAR0 and BAR1 only)" if nbars == 2 else ""),
                )
            kind_s = b.get("type", "mem32")
            if kind_s not in ("mem32", "mem64", "io"):
                self.fn_fail(
                    f, ("bars", j, "type"), f'BAR type {kind_s!r} must be "mem32", "mem64" or "io"'
                )
            kind = BarKind(kind_s)
            if "size" not in b:
                self.fn_fail(f, ("bars", j), "missing required field 'size'")
            size = b["size"]
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or not _pow2(size):
                self.fn_fail(f, ("bars", j, "size"), f"BAR size {size!r} must be a power of two")
            pref = b.get("prefetchable", False)
            if not isinstance(pref, bool):
                self.fn_fail(f, ("bars", j, "prefetchable"), f"must be true or false, not {pref!r}")
            if kind is BarKind.IO:
                if not 4 <= size <= 256:
                    self.fn_fail(
                        f, ("bars", j, "size"), f"an I/O BAR is 4..256 bytes, not {size:#x}"
                    )
                if pref:
                    self.fn_fail(
                        f, ("bars", j, "prefetchable"), "an I/O BAR cannot be prefetchable"
                    )
            elif size < 16:
                self.fn_fail(
                    f, ("bars", j, "size"), f"a memory BAR is at least 16 bytes, not {size:#x}"
                )
            elif kind is BarKind.MEM32 and size > 1 << 30:
                self.fn_fail(
                    f,
                    ("bars", j, "size"),
                    f"a 32-bit BAR of {size:#x} bytes does not fit below 4 GiB; use mem64",
                )
            slots = [idx, idx + 1] if kind is BarKind.MEM64 else [idx]
            if slots[-1] >= nbars:
                self.fn_fail(
                    f,
                    ("bars", j, "index"),
                    f"a 64-bit BAR uses two registers; BAR{idx} is the last one",
                )
            for s in slots:
                if s in used:
                    self.fn_fail(
                        f,
                        ("bars", j, "index"),
                        f"BAR{idx} overlaps BAR{used[s]} (a 64-bit BAR takes two registers)",
                    )
                used[s] = idx
            out.append(Bar(idx, kind, size, pref))
        return sorted(out, key=lambda b: b.index)

    def check_bars_match_file(self, f: _Fn) -> None:
        assert f.file_config is not None
        regs = {b.index: b for b in bars_from_config(f.file_config)}
        for j, b in enumerate(f.bars):
            r = regs.get(b.index)
            if r is None or r.kind is not b.kind or r.prefetchable != b.prefetchable:
                got = (
                    f"{r.kind.value}{' prefetchable' if r.prefetchable else ''}"
                    if r
                    else "unassigned"
                )
                self.fn_fail(f, ("bars", j), f"BAR{b.index} is {got} in the config file")
            b.address = r.address

    def parse_generated(
        self, f: _Fn, t: Mapping[str, Any], is_bridge: bool, pcie_type: int | None
    ) -> FunctionSpec:
        w: tuple[PathElem, ...] = ("function", f.index)
        vendor = self.get_int(t, "vendor", w, lo=0, hi=0xFFFF)
        if vendor in (0, 0xFFFF):
            self.fn_fail(f, ("vendor",), f"{vendor:#06x} is not a vendor id (it means no device)")
        device = self.get_int(t, "device", w, lo=0, hi=0xFFFF)
        class_code = self.get_int(t, "class", w, 0x060400 if is_bridge else 0xFF0000, 0, 0xFFFFFF)
        if is_bridge and class_code >> 8 != 0x0604:
            self.fn_fail(
                f, ("class",), f"a {f.kind} has class 0x0604xx (PCI bridge), not {class_code:#08x}"
            )
        if not is_bridge and class_code >> 8 == 0x0604:
            self.fn_fail(
                f,
                ("class",),
                f'class {class_code:#08x} is a PCI bridge; use kind = "pci-bridge" or a port kind',
            )
        revision = self.get_int(t, "revision", w, 0, 0, 0xFF)
        sv = self.get_int(t, "subsystem_vendor", w, 0 if is_bridge else vendor, 0, 0xFFFF)
        sd = self.get_int(t, "subsystem_device", w, 0 if is_bridge else device, 0, 0xFFFF)
        pin_v = t.get("interrupt_pin", "none" if "physfn" in t else "A")
        if isinstance(pin_v, str) and pin_v in _PINS:
            pin = _PINS[pin_v]
        elif isinstance(pin_v, int) and not isinstance(pin_v, bool) and 0 <= pin_v <= 4:
            pin = pin_v
        else:
            self.fn_fail(f, ("interrupt_pin",), f'must be "A".."D", "none" or 0..4, not {pin_v!r}')
        if pin and "physfn" in t:
            self.fn_fail(f, ("interrupt_pin",), 'a VF has no INTx pin (interrupt_pin = "none")')

        caps_t = self.get_table(t, "capabilities", w) or {}
        cw: tuple[PathElem, ...] = (*w, "capabilities")
        self.check_keys(caps_t, CAP_KEYS, cw)
        pm = msi = msix = af = None
        pcie: PcieCap | None = None
        if (pm_t := self.get_table(caps_t, "pm", cw)) is not None:
            self.check_keys(pm_t, {"no_soft_reset"}, (*cw, "pm"))
            pm = PmCap(self.get_bool(pm_t, "no_soft_reset", (*cw, "pm"), False))
        if (msi_t := self.get_table(caps_t, "msi", cw)) is not None:
            mw = (*cw, "msi")
            self.check_keys(msi_t, {"vectors", "addr64", "maskable"}, mw)
            vec = self.get_int(msi_t, "vectors", mw, 1, 1, 32)
            if not _pow2(vec):
                self.fn_fail(
                    f,
                    ("capabilities", "msi", "vectors"),
                    f"MSI vector count {vec} must be 1, 2, 4, 8, 16 or 32",
                )
            msi = MsiCap(
                vec,
                self.get_bool(msi_t, "addr64", mw, True),
                self.get_bool(msi_t, "maskable", mw, False),
            )
        pcie_t = self.get_table(caps_t, "pcie", cw)
        if pcie_type is None and pcie_t is not None:
            self.fn_fail(
                f,
                ("capabilities", "pcie"),
                f"a {f.kind} is conventional PCI and has no PCIe capability",
            )
        if pcie_type is not None:
            pcie_t = pcie_t if pcie_t is not None else {}
            pw = (*cw, "pcie")
            self.check_keys(
                pcie_t,
                {"flr", "link_speed", "link_width", "atomic_completer", "atomic_routing",
                 "atomic_egress_blocked"},
                pw,
            )  # fmt: skip
            flr = self.get_bool(pcie_t, "flr", pw, False)
            if flr and pcie_type in _PORT_TYPES:
                self.fn_fail(
                    f,
                    ("capabilities", "pcie", "flr"),
                    "ports do not implement function level reset",
                )
            speed = self.get_int(pcie_t, "link_speed", pw, 3, 1, 5)
            width = self.get_int(pcie_t, "link_width", pw, 4, 1, 32)
            if width not in (1, 2, 4, 8, 12, 16, 32):
                self.fn_fail(
                    f,
                    ("capabilities", "pcie", "link_width"),
                    f"link width x{width} is not a PCIe width",
                )
            atomic = self.parse_atomic(f, pcie_t, pcie_type)
            egress = self.get_bool(pcie_t, "atomic_egress_blocked", pw, False)
            if egress and pcie_type not in _PORT_TYPES:
                self.fn_fail(
                    f, ("capabilities", "pcie", "atomic_egress_blocked"),
                    "AtomicOp egress blocking is a port's (root, upstream or downstream)",
                )  # fmt: skip
            pcie = PcieCap(
                pcie_type, flr, speed, width, port_number=f.devfn >> 3, slot=f.slot,
                atomic_cap=atomic, atomic_egress_blocked=egress,
            )  # fmt: skip
        if (x_t := self.get_table(caps_t, "msix", cw)) is not None:
            msix = self.parse_msix(f, x_t)
        if (af_t := self.get_table(caps_t, "af", cw)) is not None:
            self.check_keys(af_t, {"flr"}, (*cw, "af"))
            af = AfCap(self.get_bool(af_t, "flr", (*cw, "af"), True))
        sriov: SriovCap | None = None
        if (sr_t := self.get_table(caps_t, "sriov", cw)) is not None:
            sw = (*cw, "sriov")
            self.check_keys(sr_t, {"total_vfs", "num_vfs"}, sw)
            total = self.get_int(sr_t, "total_vfs", sw, lo=1, hi=0xFFFF)
            num = self.get_int(sr_t, "num_vfs", sw, 0, 0, 0xFFFF)
            if num > total:
                self.fn_fail(
                    f, ("capabilities", "sriov", "num_vfs"),
                    f"num_vfs {num} is more than total_vfs {total}",
                )  # fmt: skip
            if pcie is None or pcie_type in _PORT_TYPES or is_bridge:
                self.fn_fail(f, ("capabilities", "sriov"), "SR-IOV needs a PCIe endpoint")
            if "physfn" in t:
                self.fn_fail(f, ("capabilities", "sriov"), "a VF has no SR-IOV capability of its own")
            sriov = SriovCap(total, num)
        acs = False
        if "acs" in caps_t:
            a = caps_t["acs"]
            if isinstance(a, dict):
                self.check_keys(a, set(), (*cw, "acs"))
                acs = True
            elif isinstance(a, bool):
                acs = a
            else:
                self.fn_fail(
                    f, ("capabilities", "acs"), f"must be true/false or an empty table, not {a!r}"
                )
        default_size = PCI_CFG_SPACE_EXP_SIZE if pcie is not None else PCI_CFG_SPACE_SIZE
        cfg_size = self.get_int(t, "config_size", w, default_size)
        if cfg_size not in (PCI_CFG_SPACE_SIZE, PCI_CFG_SPACE_EXP_SIZE):
            self.fn_fail(f, ("config_size",), f"must be 256 or 4096, not {cfg_size}")
        if acs and cfg_size != PCI_CFG_SPACE_EXP_SIZE:
            self.fn_fail(
                f,
                ("capabilities", "acs"),
                "ACS is an extended capability: it needs config_size = 4096",
            )
        if sriov is not None and cfg_size != PCI_CFG_SPACE_EXP_SIZE:
            self.fn_fail(
                f, ("capabilities", "sriov"),
                "SR-IOV is an extended capability: it needs config_size = 4096",
            )  # fmt: skip
        if acs and pcie is None:
            self.fn_fail(
                f, ("capabilities", "acs"), "ACS needs a PCIe function (extended config space)"
            )
        return FunctionSpec(
            vendor=vendor, device=device, class_code=class_code, revision=revision,
            subsystem_vendor=sv, subsystem_device=sd, interrupt_pin=pin,
            bars=tuple(f.bars), rom_size=f.rom_size, pm=pm, msi=msi, pcie=pcie, msix=msix,
            af=af, acs=acs, sriov=sriov, cfg_size=cfg_size,
        )  # fmt: skip

    def parse_atomic(self, f: _Fn, pcie_t: Mapping[str, Any], pcie_type: int) -> int:
        """DevCap2 AtomicOp bits: ``atomic_completer`` sizes (32, 64, 128) and
        ``atomic_routing`` (ports only)."""
        key: tuple[PathElem, ...] = ("capabilities", "pcie", "atomic_completer")
        bits = {32: PCI_EXP_DEVCAP2_ATOMIC_COMP32, 64: PCI_EXP_DEVCAP2_ATOMIC_COMP64,
                128: PCI_EXP_DEVCAP2_ATOMIC_COMP128}  # fmt: skip
        out = 0
        sizes = pcie_t.get("atomic_completer", [])
        if not isinstance(sizes, list) or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in sizes
        ):
            self.fn_fail(f, key, "must be an array of operand sizes in bits (32, 64, 128)")
        for x in sizes:
            if x not in bits:
                self.fn_fail(f, key, f"{x} is not an AtomicOp completion size (32, 64 or 128)")
        if len(set(sizes)) != len(sizes):
            self.fn_fail(f, key, "a size is listed twice")
        for x in sizes:
            out |= bits[x]
        if self.get_bool(pcie_t, "atomic_routing", ("function", f.index, *key[:2]), False):
            if pcie_type not in _PORT_TYPES:
                self.fn_fail(
                    f, ("capabilities", "pcie", "atomic_routing"),
                    "AtomicOp routing is a port's (root, upstream or downstream)",
                )  # fmt: skip
            out |= PCI_EXP_DEVCAP2_ATOMIC_ROUTE
        return out

    def parse_msix(self, f: _Fn, x: Mapping[str, Any]) -> MsixCap:
        xw: tuple[PathElem, ...] = ("function", f.index, "capabilities", "msix")
        self.check_keys(x, {"table_size", "table_bar", "table_offset", "pba_bar", "pba_offset"}, xw)
        n = self.get_int(x, "table_size", xw, lo=1, hi=2048)
        bars = {b.index: b for b in f.bars}
        tbar = self.get_int(x, "table_bar", xw, lo=0, hi=5)
        toff = self.get_int(x, "table_offset", xw, 0, 0, 0xFFFFFFF8)
        pbar = self.get_int(x, "pba_bar", xw, tbar, 0, 5)
        tsize = 16 * n
        psize = 8 * ((n + 63) // 64)
        poff = self.get_int(
            x, "pba_offset", xw, (toff + tsize + 7) & ~7 if pbar == tbar else 0, 0, 0xFFFFFFF8
        )
        for key, idx, off, size in (("table", tbar, toff, tsize), ("pba", pbar, poff, psize)):
            bar = bars.get(idx)
            if bar is None or bar.kind is BarKind.IO:
                self.fn_fail(
                    f,
                    ("capabilities", "msix", f"{key}_bar"),
                    f"BAR{idx} is not a memory BAR of this function",
                )
            if off % 8:
                self.fn_fail(
                    f, ("capabilities", "msix", f"{key}_offset"), f"{off:#x} must be 8-byte aligned"
                )
            if off + size > bar.size:
                self.fn_fail(
                    f, ("capabilities", "msix", f"{key}_offset"),
                    f"the MSI-X {key} ({size:#x} bytes at {off:#x}) does not fit in BAR{idx} ({bar.size:#x} bytes)",
                )  # fmt: skip
        if tbar == pbar and toff < poff + psize and poff < toff + tsize:
            self.fn_fail(
                f, ("capabilities", "msix", "pba_offset"), "the PBA overlaps the MSI-X table"
            )
        return MsixCap(n, tbar, toff, pbar, poff)

    # -- the whole topology ---------------------------------------------------
    def check_sriov(self, fns: list[_Fn], enable_sriov: bool) -> None:
        """VFs name a PF with an SR-IOV capability; the PF's NumVFs is how many do;
        their routing ids are the PF's plus First VF Offset and VF Stride (put in
        the PF's capability); a PF bound to vfio-pci has VFs only with enable_sriov."""
        by_name = {f.name: f for f in fns}
        vfs_of: dict[str, list[_Fn]] = {}
        for f in fns:
            if f.physfn is None:
                continue
            pf = by_name.get(f.physfn)
            if pf is None:
                self.fn_fail(f, ("physfn",), f"no function {f.physfn} in the tree")
            if pf.physfn is not None:
                self.fn_fail(f, ("physfn",), f"{pf.name} is itself a VF")
            if pf.spec is not None and pf.spec.sriov is None:
                self.fn_fail(f, ("physfn",), f"{pf.name} has no SR-IOV capability (capabilities.sriov)")
            if (f.domain, f.bus, f.devfn) <= (pf.domain, pf.bus, pf.devfn) or f.domain != pf.domain:
                self.fn_fail(f, ("bdf",), f"a VF's routing id comes after its PF's ({pf.name})")
            vfs_of.setdefault(pf.name, []).append(f)
        for f in fns:
            if f.spec is None or f.spec.sriov is None:
                continue
            sr = f.spec.sriov
            vfs = sorted(vfs_of.get(f.name, []), key=lambda v: (v.bus, v.devfn))
            if len(vfs) != sr.num_vfs:
                self.fn_fail(
                    f, ("capabilities", "sriov", "num_vfs"),
                    f"num_vfs = {sr.num_vfs} but {len(vfs)} function(s) name {f.name} as physfn",
                )  # fmt: skip
            if f.driver == VFIO_PCI and sr.num_vfs and not enable_sriov:
                self.fn_fail(
                    f, ("driver",),
                    "a PF bound to vfio-pci has VFs only with enable_sriov = true at the top of"
                    " the tree (vfio-pci's sriov_configure refuses otherwise)",
                )  # fmt: skip
            if not vfs:
                continue
            rid = (f.bus << 8) | f.devfn
            rids = [(v.bus << 8) | v.devfn for v in vfs]
            stride = rids[1] - rids[0] if len(rids) > 1 else 1
            for i, (v, r) in enumerate(zip(vfs, rids, strict=True)):
                if r != rids[0] + i * stride:
                    self.fn_fail(
                        v, ("bdf",),
                        f"the VFs of {f.name} are not evenly spaced (VF Stride {stride} from {vfs[0].name})",
                    )  # fmt: skip
            devices = {v.spec.device for v in vfs if v.spec is not None}
            if len(devices) > 1:
                self.fn_fail(vfs[0], ("device",), f"the VFs of {f.name} have different device ids")
            vf_did = devices.pop() if devices else f.spec.device
            f.spec = evolve(
                f.spec, sriov=evolve(sr, vf_offset=rids[0] - rid, vf_stride=stride, vf_device=vf_did)
            )

    def link_sriov(self, fns: list[_Fn]) -> None:
        """pdev->physfn of each VF, and the PF's VFs in order."""
        by_name = {f.name: f for f in fns}
        for f in sorted(fns, key=lambda g: (g.domain, g.bus, g.devfn)):
            if f.physfn is None:
                continue
            pf = by_name[f.physfn]
            assert f.pdev is not None and pf.pdev is not None
            if not pf.pdev.is_physfn:
                self.fn_fail(f, ("physfn",), f"{pf.name} has no SR-IOV capability in its config space")
            f.pdev.physfn = pf.pdev
            pf.pdev.virtfns.append(f.pdev)
        for f in fns:
            p = f.pdev
            if p is not None and p.is_physfn and f.spec is None and len(p.virtfns) != p.sriov_num_vfs:
                self.fn_fail(
                    f, ("config_file",),
                    f"NumVFs is {p.sriov_num_vfs} but {len(p.virtfns)} function(s) name {f.name} as physfn",
                )  # fmt: skip

    def build(self, fns: list[_Fn], root_buses: list[tuple[int, int]]) -> PciTopology:
        by_name: dict[str, _Fn] = {}
        for f in fns:
            if f.name in by_name:
                self.fn_fail(
                    f, ("bdf",), f"{f.name} is already defined by function[{by_name[f.name].index}]"
                )
            by_name[f.name] = f
        producers: dict[tuple[int, int], _Fn] = {}
        for f in fns:
            if f.secondary is None:
                continue
            key = (f.domain, f.secondary)
            if key in producers:
                self.fn_fail(
                    f,
                    ("secondary_bus",),
                    f"bus {f.domain:04x}:{f.secondary:02x} is already behind {producers[key].name}",
                )
            if key in root_buses:
                self.fn_fail(
                    f, ("secondary_bus",), f"bus {f.domain:04x}:{f.secondary:02x} is a root bus"
                )
            producers[key] = f
        on_bus: dict[tuple[int, int], list[_Fn]] = {}
        for f in fns:
            key = (f.domain, f.bus)
            if key not in producers and key not in root_buses:
                self.fn_fail(
                    f, ("bdf",),
                    f"bus {f.domain:04x}:{f.bus:02x} is neither a root bus ({', '.join(f'{d:04x}:{b:02x}' for d, b in root_buses)})"
                    " nor the secondary_bus of any bridge",
                )  # fmt: skip
            on_bus.setdefault(key, []).append(f)
        for fl in on_bus.values():
            fl.sort(key=lambda g: g.devfn)
        self.check_placement(fns, producers, on_bus, root_buses)

        # subordinate bus numbers (max bus number below each bridge)
        def subordinate(f: _Fn, depth: int) -> int:
            assert f.secondary is not None
            top = f.secondary
            for c in on_bus.get((f.domain, f.secondary), []):
                if c.secondary is not None:
                    top = max(top, subordinate(c, depth + 1))
            f.subordinate = top
            return top

        for f in fns:
            if f.secondary is not None:
                subordinate(f, 0)
        for f in fns:
            if f.secondary is not None:
                for c in on_bus.get((f.domain, f.secondary), []):
                    if c.secondary is not None and c.subordinate > f.subordinate:
                        self.fn_fail(c, ("secondary_bus",), "bus range escapes its parent bridge")
        # sibling bridges must have disjoint bus ranges
        for fl in on_bus.values():
            ranges = sorted((f.secondary, f.subordinate, f) for f in fl if f.secondary is not None)
            for (_, hi_a, a), (lo_b, _, b) in itertools.pairwise(ranges):
                if lo_b <= hi_a:
                    self.fn_fail(
                        b,
                        ("secondary_bus",),
                        f"bus range {lo_b:#04x}.. overlaps {a.name}'s ({a.secondary:#04x}..{hi_a:#04x})",
                    )

        allocator = _Allocator()
        topology = PciTopology()
        for dom, num in root_buses:
            rb = PciBus(domain=dom, number=num)
            topology.root_buses.append(rb)
            self.populate(rb, on_bus, allocator)
        self.assign_groups(topology, by_name)
        return topology

    def check_placement(
        self,
        fns: list[_Fn],
        producers: Mapping[tuple[int, int], _Fn],
        on_bus: Mapping[tuple[int, int], list[_Fn]],
        root_buses: list[tuple[int, int]],
    ) -> None:
        for f in fns:
            parent = producers.get((f.domain, f.bus))
            ptype = KINDS[parent.kind][0] if parent else None
            on_root = parent is None
            if f.kind in ("root-port", "integrated-endpoint") and not on_root:
                self.fn_fail(
                    f,
                    ("bdf",),
                    f"a {f.kind} sits on a root bus, not behind {parent.name if parent else '?'}",
                )
            if (
                f.kind == "downstream-port"
                and parent is not None
                and ptype != PCI_EXP_TYPE_UPSTREAM
            ):
                self.fn_fail(
                    f, ("bdf",), "a downstream-port sits behind an upstream-port (or on a root bus)"
                )
            if f.kind == "upstream-port" and ptype not in (
                PCI_EXP_TYPE_ROOT_PORT,
                PCI_EXP_TYPE_DOWNSTREAM,
            ):
                self.fn_fail(
                    f, ("bdf",), "an upstream-port sits behind a root-port or downstream-port"
                )
            # (VFs are not found by the bus scan that stops at device 0: pci_iov_add_virtfn)
            if ptype in (PCI_EXP_TYPE_ROOT_PORT, PCI_EXP_TYPE_DOWNSTREAM) and f.devfn >> 3 != 0 \
                    and f.physfn is None:
                assert parent is not None
                self.fn_fail(
                    f,
                    ("bdf",),
                    f"behind PCIe port {parent.name} only device 00 exists (got device {f.devfn >> 3:02x})",
                )
        for fl in on_bus.values():
            devs: dict[int, list[_Fn]] = {}
            for f in fl:
                devs.setdefault(f.devfn >> 3, []).append(f)
            for group in devs.values():
                if group[0].devfn & 7 != 0:
                    self.fn_fail(
                        group[0],
                        ("bdf",),
                        f"function {group[0].devfn & 7} without function 0 of the same device (the kernel scans function 0 first)",
                    )

    def populate(
        self, bus: PciBus, on_bus: Mapping[tuple[int, int], list[_Fn]], alloc: _Allocator
    ) -> None:
        fl = on_bus.get((bus.domain, bus.number), [])
        slot_nos = {f.devfn >> 3 for f in fl}
        multi = {s for s in slot_nos if sum(1 for f in fl if f.devfn >> 3 == s) > 1}
        bridge = bus.self_bridge
        slot: PciSlot | None = None
        if bridge is not None:
            owner = self._fn_of.get(id(bridge))
            if owner is not None and owner.slot is not None:
                slot = PciSlot(bus=bus, number=0, reset_capable=owner.slot_reset)
                bus.slots.append(slot)
        for f in fl:
            rom_addr = 0
            if f.file_config is None:
                try:
                    for b in f.bars:
                        alloc.place(b)
                    if f.rom_size:
                        rom_addr = alloc.place_rom(f.rom_size)
                except _Exhausted as e:
                    self.fn_fail(f, ("bars",), str(e))
            pdev = PciDev(
                bus=bus, devfn=f.devfn, config=bytearray(), bars=list(f.bars), rom_size=f.rom_size
            )
            f.pdev = pdev
            self._fn_of[id(pdev)] = f
            pdev.driver = f.driver
            pdev.reset_methods_override = f.reset_methods
            if slot is not None and f.devfn >> 3 == slot.number:
                pdev.slot = slot
            bus.devices.append(pdev)
            windows: tuple[Window | None, Window | None, Window | None] = (None, None, None)
            if f.secondary is not None:
                sub = PciBus(domain=bus.domain, number=f.secondary, self_bridge=pdev, parent=bus)
                pdev.subordinate = sub
                bus.children.append(sub)
                mark = alloc.open_window()
                self.populate(sub, on_bus, alloc)
                windows = alloc.close_window(mark)
            pin = 0
            if f.spec is not None:
                occupied = bool(on_bus.get((bus.domain, f.secondary or -1)))
                pcie = f.spec.pcie
                if pcie is not None and pcie.slot is not None:
                    pcie = evolve(pcie, slot=SlotCap(pcie.slot.number, pcie.slot.hotplug, occupied))
                spec = FunctionSpec(
                    vendor=f.spec.vendor, device=f.spec.device, class_code=f.spec.class_code,
                    revision=f.spec.revision, subsystem_vendor=f.spec.subsystem_vendor,
                    subsystem_device=f.spec.subsystem_device,
                    multifunction=(f.devfn >> 3) in multi, interrupt_pin=f.spec.interrupt_pin,
                    interrupt_line=0, bars=tuple(f.bars), rom_size=f.rom_size,
                    rom_address=rom_addr,
                    bridge=BridgeBuses(bus.number, f.secondary, f.subordinate) if f.secondary is not None else None,
                    io_window=windows[0], mem_window=windows[1], pref_window=windows[2],
                    pm=f.spec.pm, msi=f.spec.msi, pcie=pcie, msix=f.spec.msix, af=f.spec.af,
                    acs=f.spec.acs, sriov=f.spec.sriov, cfg_size=f.spec.cfg_size,
                )  # fmt: skip
                pin = spec.interrupt_pin
                irq = f.irq if f.irq is not None else (_default_irq(f.devfn, pin) if pin else 0)
                spec = _with_line(spec, irq, _command(f))
                try:
                    pdev.config = build_config(spec)
                except ValueError as e:
                    self.fn_fail(f, ("capabilities",), str(e))
            else:
                assert f.file_config is not None
                cfg = f.file_config
                if f.secondary is not None:
                    cfg[0x18], cfg[0x19], cfg[0x1A] = bus.number, f.secondary, f.subordinate
                pin = cfg[0x3D]
                irq = f.irq if f.irq is not None else (_default_irq(f.devfn, pin) if pin else 0)
                pdev.config = cfg
            pdev.irq = irq

    def assign_groups(self, topology: PciTopology, by_name: Mapping[str, _Fn]) -> None:
        """Explicit numbers as given; the rest as pci_device_group() would group them."""
        fns = {id(f.pdev): f for f in by_name.values()}
        used = {f.group for f in by_name.values() if isinstance(f.group, int)}
        next_free = 0

        def fresh() -> int:
            nonlocal next_free
            while next_free in used:
                next_free += 1
            used.add(next_free)
            return next_free

        for dev in topology.devices():
            f = fns[id(dev)]
            if f.group != "auto":
                dev.iommu_group = f.group if isinstance(f.group, int) else None
                continue
            dev.iommu_group = _derived_group(dev, fresh)


def _acs_isolated(dev: PciDev) -> bool:
    """pci_acs_enabled(dev, SV|RR|CR|UF): the ACS controls that isolate a function."""
    pos = dev.find_ext_capability(PCI_EXT_CAP_ID_ACS)
    if not pos:
        return False
    need = 0x01 | 0x04 | 0x08 | 0x10
    return dev.cfg_read(pos + 6, 2) & need == need


def _acs_path(bridge: PciDev | None) -> bool:
    """pci_acs_path_enabled(bridge, NULL): every bridge up to the root bus isolates."""
    while bridge is not None:
        if not _acs_isolated(bridge):
            return False
        bridge = bridge.bus.self_bridge
    return True


def _derived_group(dev: PciDev, fresh: Callable[[], int]) -> int | None:
    """Models pci_device_group(): join a non-isolating bridge's or sibling's group."""
    bus: PciBus | None = dev.bus
    while bus is not None and not bus.is_root:
        bridge = bus.self_bridge
        assert bridge is not None
        if _acs_path(bridge):
            break
        if bridge.iommu_group is not None:
            return bridge.iommu_group
        bus = bus.parent
    if dev.multifunction and not _acs_isolated(dev):
        for other in dev.bus.devices:
            if (
                other is not dev
                and other.slot_no == dev.slot_no
                and other.iommu_group is not None
                and not _acs_isolated(other)
            ):
                return other.iommu_group
    return fresh()


def _with_line(spec: FunctionSpec, irq: int, command: int) -> FunctionSpec:
    return evolve(spec, interrupt_line=irq & 0xFF, command=command)


def _command(f: _Fn) -> int:
    """A host driver has enabled the function (pci_enable_device + bus master)."""
    if f.driver is None or f.driver == VFIO_PCI:
        return 0
    cmd = 0x0004  # bus master
    if any(b.kind is not BarKind.IO for b in f.bars) or f.secondary is not None:
        cmd |= 0x0002
    if any(b.kind is BarKind.IO for b in f.bars):
        cmd |= 0x0001
    return cmd


def _default_irq(devfn: int, pin: int) -> int:
    return 16 + ((devfn >> 3) + pin - 1) % 8


class _Allocator:
    """Hands out BAR and window addresses the way firmware would (aligned, in walk order)."""

    def __init__(self) -> None:
        self.io = _IO_START
        self.mem = _MEM_START
        self.pref = _PREF_START

    def place(self, bar: Bar) -> None:
        if bar.kind is BarKind.IO:
            self.io = _align(self.io, bar.size)
            bar.address, self.io = self.io, self.io + bar.size
            if self.io > _IO_END:
                raise _Exhausted("I/O port space (64 KiB) exhausted")
        elif bar.kind is BarKind.MEM64 and bar.prefetchable:
            self.pref = _align(self.pref, bar.size)
            bar.address, self.pref = self.pref, self.pref + bar.size
        else:
            self.mem = _align(self.mem, bar.size)
            bar.address, self.mem = self.mem, self.mem + bar.size
            if self.mem > _MEM_END:
                raise _Exhausted("32-bit memory space exhausted")

    def place_rom(self, size: int) -> int:
        self.mem = _align(self.mem, size)
        addr, self.mem = self.mem, self.mem + size
        return addr

    def open_window(self) -> tuple[int, int, int]:
        self.io = _align(self.io, 0x1000)
        self.mem = _align(self.mem, _MB)
        self.pref = _align(self.pref, _MB)
        return self.io, self.mem, self.pref

    def close_window(
        self, mark: tuple[int, int, int]
    ) -> tuple[Window | None, Window | None, Window | None]:
        self.io = _align(self.io, 0x1000)
        self.mem = _align(self.mem, _MB)
        self.pref = _align(self.pref, _MB)
        io = Window(mark[0], self.io - 1) if self.io > mark[0] else None
        mem = Window(mark[1], self.mem - 1) if self.mem > mark[1] else None
        pref = Window(mark[2], self.pref - 1) if self.pref > mark[2] else None
        return io, mem, pref


class _Exhausted(Exception):
    pass


def _align(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _tname(v: object) -> str:
    return {
        bool: "boolean",
        int: "integer",
        str: "string",
        float: "float",
        list: "array",
        dict: "table",
    }.get(type(v), type(v).__name__)


def _dotted(path: tuple[PathElem, ...], nested: bool = False) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out or nested else p)
    return out


def _bdf_from_match(m: re.Match[str]) -> str:
    return bdf_name(
        int(m.group(1) or "0", 16),
        int(m.group(2), 16),
        (int(m.group(3), 16) << 3) | int(m.group(4)),
    )
