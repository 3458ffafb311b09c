"""Shared prologues for the scenario tables: bound cdevs, group-path setups."""

from __future__ import annotations

from tests.kernel.harness import (
    Open,
    Step,
    bind,
    cdev_path,
    get_device_fd,
    group_path,
    set_container,
    set_iommu,
)

F0 = "0000:01:00.0"
F1 = "0000:01:00.1"
NOT_OWNED = 0xFFFFFFFF
OWNED = 0

DUAL = "dual-function-nic"
SHARED = "shared-group"
HOSTSIB = "host-driver-sibling"
FLR = "flr-device"
ROOT = "root-bus"
HOTPLUG = "hotplug-slot"


def cdev_bound(p: str = "p", bdf: str = F0, *, ictx: str = "A", dev: str = "d0", devid: int | None = 1,
               open_ictx: bool = True, save: str | None = None) -> list[Step]:
    """open /dev/iommu (as ``ictx``), open the cdev of ``bdf`` (as ``dev``), BIND."""
    steps: list[Step] = []
    if open_ictx:
        steps.append(Open(p, "iommu", ictx))
    steps.append(Open(p, cdev_path(bdf), dev))
    steps.append(bind(p, dev, ictx, devid=devid, save=save))
    return steps


def group_container(p: str = "p", bdfs: tuple[str, ...] = (F0,), *, cont: str = "c",
                    names: tuple[str, ...] | None = None, iommu: bool = True) -> list[Step]:
    """open /dev/vfio/vfio, open each bdf's group, SET_CONTAINER each, SET_IOMMU(TYPE1v2)."""
    names = names or tuple(f"g{i}" for i in range(len(bdfs)))
    steps: list[Step] = [Open(p, "vfio/vfio", cont)]
    for bdf, g in zip(bdfs, names, strict=True):
        steps.append(Open(p, group_path(bdf), g))
        steps.append(set_container(p, g, cont))
    if iommu:
        steps.append(set_iommu(p, cont))
    return steps


def group_device(p: str = "p", bdf: str = F0, *, grp: str = "g0", dev: str = "gd0") -> list[Step]:
    return [get_device_fd(p, grp, bdf, save_fd=dev)]
