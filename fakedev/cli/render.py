"""Text rendering for ``fakedev show``: the PCI tree with iommu groups,
drivers, dev_sets and vfioN, and a running server's state (who holds what);
``decode_trace_record`` for ``fakedev trace-decode``.

Reads only: a Kernel (topology + ``vfio_devices()``) or the plain-data
``describe()`` snapshot a server publishes in ``.fakedev/state.json``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from fakedev.kernel.pci import PciBus, PciDev


def _dev_line(dev: PciDev, vfio_index: Mapping[str, int]) -> str:
    parts = [dev.name, f"[{dev.vendor:04x}:{dev.device:04x}]", f"class {dev.class_code:06x}"]
    group = "none" if dev.iommu_group is None else str(dev.iommu_group)
    parts.append(f"group {group}")
    parts.append(f"driver {dev.driver or '-'}")
    if dev.name in vfio_index:
        parts.append(f"vfio{vfio_index[dev.name]}")
    return " ".join(parts)


def _bus_lines(bus: PciBus, vfio_index: Mapping[str, int], indent: str) -> Iterator[str]:
    reset = "bus reset" if bus.probe_reset_bus() else "no bus reset"
    yield f"{indent}bus {bus.domain:04x}:{bus.number:02x} ({reset})"
    for slot in bus.slots:
        kind = "slot reset" if slot.reset_capable else "no slot reset"
        yield f"{indent}  hot-plug slot for device {slot.number:02x} ({kind})"
    for dev in bus.devices:
        yield f"{indent}  {_dev_line(dev, vfio_index)}"
        if dev.subordinate is not None:
            yield from _bus_lines(dev.subordinate, vfio_index, indent + "    ")


def render_kernel(kernel: Any) -> str:
    """The topology of ``kernel`` as an indented tree."""
    vfio_index = {v.pdev.name: v.index for v in kernel.vfio_devices()}
    topology = kernel.topology
    lines: list[str] = []
    for root in topology.root_buses:
        lines.extend(_bus_lines(root, vfio_index, ""))
    groups: dict[int, list[str]] = {}
    for dev in topology.devices():
        if dev.iommu_group is not None:
            groups.setdefault(dev.iommu_group, []).append(dev.name)
    noiommu = {v.group.id for v in kernel.vfio_devices() if getattr(v.group, "noiommu", False)}
    lines.append("iommu groups:")
    for gid in sorted(groups):
        tag = f" (noiommu: /dev/vfio/noiommu-{gid})" if gid in noiommu else ""
        lines.append(f"  {gid}: {' '.join(groups[gid])}{tag}")
    lines.append("vfio devices:")
    for vdev in sorted(kernel.vfio_devices(), key=lambda v: v.index):
        node = "no cdev: noiommu" if vdev.group.id in noiommu else f"/dev/vfio/devices/vfio{vdev.index}"
        lines.append(f"  vfio{vdev.index}: {vdev.pdev.name} ({node})")
    try:
        state = kernel.describe()
    except Exception:  # a partial model still shows its topology
        state = None
    if isinstance(state, Mapping) and "dev_sets" in state:
        lines.append("dev_sets:")
        lines.extend("  " + line for line in _plain(state["dev_sets"]))
    return "\n".join(lines)


def _plain(value: Any, indent: str = "") -> Iterator[str]:
    """Plain data as indented ``key: value`` lines."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(item, Mapping | list) and item:
                yield f"{indent}{key}:"
                yield from _plain(item, indent + "  ")
            else:
                yield f"{indent}{key}: {_scalar(item)}"
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, Mapping | list) and item:
                sub = list(_plain(item, indent + "  "))
                yield f"{indent}- {sub[0].strip()}"
                yield from sub[1:]
            else:
                yield f"{indent}- {_scalar(item)}"
    else:
        yield f"{indent}{_scalar(value)}"


def _scalar(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, Mapping | list):
        return "[]" if isinstance(value, list) else "{}"
    return str(value)


def _holders(state: Mapping[str, Any]) -> Iterator[str]:
    """One line per vfio device and iommu group: who holds it, and how."""
    for dev in state.get("devices", []) or []:
        if not isinstance(dev, Mapping):
            continue
        name = f"{dev.get('vfio', '?')} {dev.get('bdf', '?')}"
        if dev.get("open_count"):
            how = "cdev" if dev.get("cdev_opened") else "group"
            held = f"open ({how}) by pid {dev.get('opener_pid', '?')}"
            if dev.get("iommufd"):
                held += f", bound to {dev['iommufd']} as devid {dev.get('devid')}"
            if dev.get("attached_pt") is not None:
                held += f", attached to pt {dev['attached_pt']}"
        else:
            held = "free"
        if "unplug_requests" in dev:
            n = dev["unplug_requests"]
            held += f", being removed (REQ signalled {n} time{'' if n == 1 else 's'})"
        yield f"  {name}: {held}"
    for grp in state.get("groups", []) or []:
        if not isinstance(grp, Mapping):
            continue
        parts = []
        if grp.get("open"):
            parts.append(f"open by pid {grp.get('opener_pid', '?')}")
        if grp.get("container"):
            parts.append("in a container")
        if grp.get("dma_owner"):
            parts.append(f"DMA owned by {grp['dma_owner']}")
        yield f"  group {grp.get('name', grp.get('id', '?'))}: {', '.join(parts) or 'free'}"


def render_state(state: Mapping[str, Any], *, source: str | None = None) -> str:
    """A server's ``describe()`` snapshot: who holds what, then everything."""
    lines = [f"state from {source}"] if source else []
    holders = list(_holders(state))
    if holders:
        lines.append("holders:")
        lines.extend(holders)
    dma = state.get("dma")
    if isinstance(dma, Mapping) and (dma.get("reads") or dma.get("writes") or dma.get("faults")):
        lines.append(
            f"dma: {dma.get('reads', 0)} reads ({dma.get('bytes_read', 0)} bytes), "
            f"{dma.get('writes', 0)} writes ({dma.get('bytes_written', 0)} bytes), "
            f"{dma.get('faults', 0)} faults"
        )
        for f in dma.get("recent_faults", []) or []:
            if isinstance(f, Mapping):
                lines.append("  fault: " + ", ".join(f"{k}={_scalar(v)}" for k, v in f.items()))
    unplugs = state.get("unplugs")
    if isinstance(unplugs, list) and unplugs:
        lines.append("removals:")
        for u in unplugs:
            if isinstance(u, Mapping):
                what = f"  {u.get('bdf', '?')}: {u.get('state', '?')}"
                if u.get("waiting_for"):
                    what += f", waiting for {u['waiting_for']} to be released"
                lines.append(what)
    unbinds = state.get("unbinds")
    if isinstance(unbinds, list) and unbinds:
        lines.append("unbinds waiting for a release:")
        for u in unbinds:
            if isinstance(u, Mapping):
                lines.append(f"  {u.get('bdf', '?')}: REQ signalled {u.get('requests', 0)} times")
    overrides = state.get("driver_override")
    if isinstance(overrides, Mapping) and overrides:
        lines.append("driver_override:")
        lines.extend(f"  {bdf}: {drv}" for bdf, drv in sorted(overrides.items()))
    lines.extend(_plain(state))
    return "\n".join(lines)


def decode_trace_record(rec: Mapping[str, Any]) -> str:
    """One JSON trace record (``fakedev run --trace FILE``) as a strace-like line,
    the same line ``--trace-text`` prints (``fakedev.host.trace.format_record``)."""
    from fakedev.host.trace import format_record

    return format_record(rec)
