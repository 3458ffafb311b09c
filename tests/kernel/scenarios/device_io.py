"""Device ioctls (GET_INFO, REGION_INFO, IRQ_INFO, SET_IRQS, RESET), region
access, the type1 container and the iommufd VFIO-compat layer (SPEC 3.1,
3.7, 3.8, 3.21)."""

from __future__ import annotations

import errno as E
from typing import Any

from fakedev.uapi import consts as C
from fakedev.uapi import ioctls as IO
from fakedev.uapi import structs as S
from tests.kernel.harness import (
    ANY,
    BOTH,
    FD,
    V66,
    Check,
    Ioctl,
    Open,
    Pipe,
    Read,
    Scenario,
    World,
    Write,
    api_version,
    check_extension,
    device_info,
    get_device_fd,
    group_path,
    irq_info,
    region_info,
    set_container,
    set_iommu,
    set_irqs,
)
from tests.kernel.scenarios.common import DUAL, F0, FLR, ROOT, cdev_bound, group_container

L0 = "0000:02:00.0"
R0 = "0000:00:02.0"
RD, WR, MM, CAPS = (C.VFIO_REGION_INFO_FLAG_READ, C.VFIO_REGION_INFO_FLAG_WRITE, C.VFIO_REGION_INFO_FLAG_MMAP,
                    C.VFIO_REGION_INFO_FLAG_CAPS)
EVT, MASKABLE, AUTO, NORESIZE = (C.VFIO_IRQ_INFO_EVENTFD, C.VFIO_IRQ_INFO_MASKABLE, C.VFIO_IRQ_INFO_AUTOMASKED,
                                 C.VFIO_IRQ_INFO_NORESIZE)
TRIG = C.VFIO_IRQ_SET_ACTION_TRIGGER
D_NONE, D_BOOL, D_EVT = C.VFIO_IRQ_SET_DATA_NONE, C.VFIO_IRQ_SET_DATA_BOOL, C.VFIO_IRQ_SET_DATA_EVENTFD


def off(i: int) -> int:
    return C.VFIO_PCI_INDEX_TO_OFFSET(i)


def _untouched_from(start: int) -> Any:
    def check(w: World, vals: dict[str, int], raw: bytes) -> None:
        assert all(b == 0xA5 for b in raw[start:]), f"bytes from {start} written: {raw[start:].hex()}"

    return check


def _fd_bytes(name: str) -> Any:
    from tests.kernel.harness import Lazy

    return Lazy(lambda w: w.fd(name).to_bytes(4, "little", signed=True), f"fd({name})")


def _counter(name: str, want: int) -> Check:
    def fn(w: World) -> None:
        ev = w.file_of(name)
        assert ev.counter == want, f"eventfd {name} counter {ev.counter}, expected {want}"

    return Check(fn, f"eventfd {name} == {want}")


SCENARIOS: list[Scenario] = [
    # -- GET_INFO -------------------------------------------------------------
    Scenario("info-dual-nic", DUAL, BOTH, [
        *cdev_bound(),
        device_info("p", "d0", out={"argsz": 24, "flags": C.VFIO_DEVICE_FLAGS_PCI, "num_regions": 9,
                                    "num_irqs": 5, "cap_offset": 0}),
    ], doc="SPEC 3.7"),
    Scenario("info-copy-size-argsz-16", DUAL, V66, [
        *cdev_bound(),
        device_info("p", "d0", argsz=16, buflen=24, pack_len=16, out={"num_irqs": 5}, check=_untouched_from(16)),
    ], doc="SPEC 3.7: copy-back min(argsz, 24)"),
    Scenario("info-flr-reset-flag", FLR, BOTH, [
        *cdev_bound(bdf=L0),
        device_info("p", "d0", out={"flags": C.VFIO_DEVICE_FLAGS_PCI | C.VFIO_DEVICE_FLAGS_RESET}),
    ], doc="SPEC 3.7: RESET iff the reset at open worked"),
    # -- REGION_INFO ----------------------------------------------------------
    Scenario("region-bar0-mmap", DUAL, BOTH, [
        *cdev_bound(),
        region_info("p", "d0", 0, out={"flags": RD | WR, "size": 0x20000, "offset": 0, "cap_offset": 0}),
    ], doc="SPEC 3.8, without MMAP: fakedev serves regions by pread/pwrite only (FUSE.md)"),
    Scenario("region-bar1-unimplemented", DUAL, BOTH, [
        *cdev_bound(),
        region_info("p", "d0", 1, out={"flags": 0, "size": 0, "offset": off(1)}),
        region_info("p", "d0", 4, out={"flags": 0, "size": 0, "offset": off(4)}),
        region_info("p", "d0", 5, out={"flags": 0, "size": 0, "offset": off(5)}),
    ]),
    Scenario("region-io-bar-no-mmap", DUAL, BOTH, [
        *cdev_bound(),
        region_info("p", "d0", 2, out={"flags": RD | WR, "size": 0x20, "offset": off(2)}),
    ], doc="SPEC 3.8: I/O BARs READ|WRITE, no MMAP"),
    Scenario("region-msix-bar-cap-short-buffer", DUAL, BOTH, [
        *cdev_bound(),
        region_info("p", "d0", 3, argsz=32, buflen=40,
                    out={"argsz": 32, "flags": RD | WR, "size": 0x4000, "cap_offset": 0},
                    check=_untouched_from(32)),
    ], doc="SPEC 3.8: MSIX_MAPPABLE only comes with MMAP, which fakedev never offers"),
    Scenario("region-config", DUAL, BOTH, [
        *cdev_bound(),
        region_info("p", "d0", C.VFIO_PCI_CONFIG_REGION_INDEX, out={"flags": RD | WR, "size": 4096, "offset": off(7)}),
    ]),
    Scenario("region-config-conventional", ROOT, BOTH, [
        *cdev_bound(bdf=R0),
        region_info("p", "d0", C.VFIO_PCI_CONFIG_REGION_INDEX, out={"flags": RD | WR, "size": 256}),
    ]),
    Scenario("region-rom-absent", DUAL, BOTH, [
        *cdev_bound(),
        region_info("p", "d0", C.VFIO_PCI_ROM_REGION_INDEX, out={"flags": 0, "size": 0, "offset": off(6)}),
    ]),
    Scenario("region-vga-and-beyond-einval", DUAL, BOTH, [
        *cdev_bound(),
        region_info("p", "d0", C.VFIO_PCI_VGA_REGION_INDEX, err=E.EINVAL),
        region_info("p", "d0", 9, err=E.EINVAL),
        region_info("p", "d0", 0xFFFFFFFF, err=E.EINVAL),
    ], doc="SPEC 3.8"),
    Scenario("region-flr-64bit-bar", FLR, BOTH, [
        *cdev_bound(bdf=L0),
        region_info("p", "d0", 0, out={"flags": RD | WR, "size": 0x100000}),
        region_info("p", "d0", 1, out={"flags": 0, "size": 0}),
        region_info("p", "d0", 4, argsz=40, out={"flags": RD | WR, "size": 0x1000, "cap_offset": 0}),
    ], doc="SPEC 3.8: upper half of a 64-bit BAR has size 0"),
    # -- IRQ_INFO ---------------------------------------------------------------
    Scenario("irq-info-dual-nic", DUAL, BOTH, [
        *cdev_bound(),
        irq_info("p", "d0", C.VFIO_PCI_INTX_IRQ_INDEX, out={"flags": EVT | MASKABLE | AUTO, "count": 1}),
        irq_info("p", "d0", C.VFIO_PCI_MSI_IRQ_INDEX, out={"flags": EVT | NORESIZE, "count": 1}),
        irq_info("p", "d0", C.VFIO_PCI_MSIX_IRQ_INDEX, out={"flags": ANY, "count": 10}),
        irq_info("p", "d0", C.VFIO_PCI_ERR_IRQ_INDEX, out={"flags": EVT | NORESIZE, "count": 1}),
        irq_info("p", "d0", C.VFIO_PCI_REQ_IRQ_INDEX, out={"flags": EVT | NORESIZE, "count": 1}),
        irq_info("p", "d0", 5, err=E.EINVAL),
    ], doc="SPEC 3.8 IRQ_INFO"),
    Scenario("irq-info-msi-multiple", FLR, BOTH, [
        *cdev_bound(bdf=L0),
        irq_info("p", "d0", C.VFIO_PCI_MSI_IRQ_INDEX, out={"count": 4}),
        irq_info("p", "d0", C.VFIO_PCI_MSIX_IRQ_INDEX, out={"count": 4}),
    ], doc="SPEC 3.8: MSI count = 1 << MMC"),
    Scenario("irq-info-err-conventional-einval", ROOT, BOTH, [
        *cdev_bound(bdf=R0),
        irq_info("p", "d0", C.VFIO_PCI_ERR_IRQ_INDEX, err=E.EINVAL),
        irq_info("p", "d0", C.VFIO_PCI_REQ_IRQ_INDEX, out={"count": 1}),
        irq_info("p", "d0", C.VFIO_PCI_MSIX_IRQ_INDEX, out={"count": 0}),
    ], doc="SPEC 3.8: ERR index on non-PCIe -> EINVAL"),
    # -- SET_IRQS -------------------------------------------------------------------
    Scenario("set-irqs-intx-eventfd-and-fire", DUAL, BOTH, [
        *cdev_bound(), Pipe("p", "ev", "eventfd"),
        set_irqs("p", "d0", index=0, flags=D_NONE | TRIG, count=1, err=E.EINVAL),
        set_irqs("p", "d0", index=0, flags=D_EVT | TRIG, count=1, data=_fd_bytes("ev")),
        set_irqs("p", "d0", index=0, flags=D_NONE | TRIG, count=1),
        _counter("ev", 1),
        set_irqs("p", "d0", index=0, flags=D_BOOL | TRIG, count=1, data=b"\1"),
        _counter("ev", 2),
        set_irqs("p", "d0", index=0, flags=D_NONE | TRIG, count=0),
    ], doc="vfio_pci_set_intx_trigger: DATA_NONE fires only once INTx is enabled"),
    Scenario("set-irqs-msi-while-intx-einval", DUAL, BOTH, [
        *cdev_bound(), Pipe("p", "ev", "eventfd"),
        set_irqs("p", "d0", index=0, flags=D_EVT | TRIG, count=1, data=_fd_bytes("ev")),
        set_irqs("p", "d0", index=1, flags=D_EVT | TRIG, count=1, data=_fd_bytes("ev"), err=E.EINVAL),
        set_irqs("p", "d0", index=0, flags=D_NONE | TRIG, count=0),
        set_irqs("p", "d0", index=1, flags=D_EVT | TRIG, count=1, data=_fd_bytes("ev")),
        set_irqs("p", "d0", index=1, flags=D_NONE | TRIG, count=0),
    ], doc="one interrupt type at a time"),
    Scenario("set-irqs-msi-mask-enotty", DUAL, BOTH, [
        *cdev_bound(),
        set_irqs("p", "d0", index=1, flags=D_NONE | C.VFIO_IRQ_SET_ACTION_MASK, count=1, err=E.ENOTTY),
        set_irqs("p", "d0", index=2, flags=D_NONE | C.VFIO_IRQ_SET_ACTION_UNMASK, count=1, err=E.ENOTTY),
        set_irqs("p", "d0", index=3, flags=D_NONE | C.VFIO_IRQ_SET_ACTION_MASK, count=1, err=E.ENOTTY),
    ], doc="SPEC 3.8: no handler for (index, action) -> ENOTTY"),
    Scenario("set-irqs-range-einval", DUAL, BOTH, [
        *cdev_bound(),
        set_irqs("p", "d0", index=0, flags=D_NONE | TRIG, start=0, count=2, err=E.EINVAL),
        set_irqs("p", "d0", index=0, flags=D_NONE | TRIG, start=1, count=1, err=E.EINVAL),
        set_irqs("p", "d0", index=2, flags=D_NONE | TRIG, start=10, count=1, err=E.EINVAL),
        set_irqs("p", "d0", index=2, flags=D_NONE | TRIG, start=1, count=0xFFFFFFFF, err=E.EINVAL),
    ], doc="SPEC 3.8: start/count against the IRQ_INFO count"),
    Scenario("set-irqs-short-payload-einval", DUAL, BOTH, [
        *cdev_bound(),
        set_irqs("p", "d0", index=1, flags=D_EVT | TRIG, count=1, argsz=20, err=E.EINVAL),
        set_irqs("p", "d0", index=2, flags=D_EVT | TRIG, count=2, data=b"\xff\xff\xff\xff", err=E.EINVAL),
        set_irqs("p", "d0", index=0, flags=D_BOOL | TRIG, count=1, argsz=20, err=E.EINVAL),
    ], doc="SPEC 3.8: argsz-20 < count*size"),
    Scenario("set-irqs-eventfd-bad-fds", DUAL, BOTH, [
        *cdev_bound(), Pipe("p", "pp", "pipe"),
        set_irqs("p", "d0", index=1, flags=D_EVT | TRIG, count=1, data=(9999).to_bytes(4, "little"),
                 err=E.EBADF),
        set_irqs("p", "d0", index=1, flags=D_EVT | TRIG, count=1, data=_fd_bytes("pp"), err=E.EINVAL),
        set_irqs("p", "d0", index=0, flags=D_EVT | TRIG, count=1, data=_fd_bytes("pp"), err=E.EINVAL),
    ], doc="eventfd_ctx_fdget: not open -> EBADF, not an eventfd -> EINVAL"),
    Scenario("set-irqs-err-req-trigger", DUAL, BOTH, [
        *cdev_bound(), Pipe("p", "ev", "eventfd"),
        set_irqs("p", "d0", index=3, flags=D_EVT | TRIG, count=1, data=_fd_bytes("ev")),
        set_irqs("p", "d0", index=4, flags=D_EVT | TRIG, count=1, data=_fd_bytes("ev")),
        set_irqs("p", "d0", index=3, flags=D_NONE | TRIG, count=1),
        _counter("ev", 1),
    ]),
    # -- region access --------------------------------------------------------------
    Scenario("read-config-ids", DUAL, BOTH, [
        *cdev_bound(),
        Read("p", "d0", off(7), 4, data=bytes.fromhex("361bf000")),
        Read("p", "d0", off(7) + 0x2C, 4, ret=ANY),
    ], doc="vendor 0x1b36 device 0x00f0 as the topology says"),
    Scenario("read-unbound-cdev-einval", DUAL, BOTH, [
        Open("p", "iommu", "A"), Open("p", "vfio/devices/vfio0", "d0"),
        Read("p", "d0", off(7), 4, err=E.EINVAL),
    ], doc="SPEC 3.3 step 2"),
    # -- VFIO_DEVICE_RESET ----------------------------------------------------------
    # -- type1 container --------------------------------------------------------------
]


def _cap(raw: bytes, cid: int, ver: int, nxt: int) -> None:
    got = S.VFIO_INFO_CAP_HEADER.unpack(raw)
    assert (got["id"], got["version"], got["next"]) == (cid, ver, nxt), f"cap header {got}"


def _vaddr(name: str, size: int = 0x2000) -> Any:
    from tests.kernel.harness import Lazy

    def fn(w: World) -> int:
        if name not in w.vals:
            w.vals[name] = w.proc("p").alloc(size)
        return w.vals[name]

    return Lazy(fn, f"buffer({name})")


def map_dma(ctr: str, *, vaddr: Any, iova: int, size: int, flags: int = C.VFIO_DMA_MAP_FLAG_READ
            | C.VFIO_DMA_MAP_FLAG_WRITE, **kw: Any) -> Ioctl:
    return Ioctl("p", ctr, IO.VFIO_IOMMU_MAP_DMA, S.VFIO_IOMMU_TYPE1_DMA_MAP,
                 fields={"argsz": 32, "flags": flags, "vaddr": vaddr, "iova": iova, "size": size}, **kw)


def unmap_dma(ctr: str, *, iova: int, size: int, flags: int = 0, **kw: Any) -> Ioctl:
    return Ioctl("p", ctr, IO.VFIO_IOMMU_UNMAP_DMA, S.VFIO_IOMMU_TYPE1_DMA_UNMAP,
                 fields={"argsz": 24, "flags": flags, "iova": iova, "size": size}, **kw)


RW = C.VFIO_DMA_MAP_FLAG_READ | C.VFIO_DMA_MAP_FLAG_WRITE

for label, pro, ctr in (
    ("type1", lambda: group_container(bdfs=(F0,)), "c"),
    ("compat", lambda: [Open("p", "iommu", "c"), Open("p", group_path(F0), "g0"), set_container("p", "g0", "c"),
                        set_iommu("p", "c")], "c"),
):
    SCENARIOS += [
        Scenario(f"{label}-map-unmap", DUAL, BOTH, [
            *pro(),
            map_dma(ctr, vaddr=_vaddr("buf"), iova=0x100000, size=0x2000),
            map_dma(ctr, vaddr=_vaddr("buf"), iova=0x100000, size=0x2000, err=E.EEXIST),
            map_dma(ctr, vaddr=_vaddr("buf"), iova=0x101000, size=0x2000, err=E.EEXIST),
            unmap_dma(ctr, iova=0x100000, size=0x2000, out={"size": 0x2000}),
        ], doc="SPEC 3.1 / 3.21"),
        Scenario(f"{label}-map-errors", DUAL, BOTH, [
            *pro(),
            map_dma(ctr, vaddr=_vaddr("buf"), iova=0x100000, size=0, err=E.EINVAL),
            map_dma(ctr, vaddr=_vaddr("buf"), iova=0x100000, size=0x1000, flags=RW | C.VFIO_DMA_MAP_FLAG_VADDR,
                    err=E.EINVAL),
        ]),
        Scenario(f"{label}-unmap-all", DUAL, BOTH, [
            *pro(),
            map_dma(ctr, vaddr=_vaddr("buf"), iova=0x100000, size=0x1000),
            map_dma(ctr, vaddr=_vaddr("buf2"), iova=0x300000, size=0x2000),
            unmap_dma(ctr, iova=0x1000, size=0, flags=C.VFIO_DMA_UNMAP_FLAG_ALL, err=E.EINVAL),
            unmap_dma(ctr, iova=0, size=0, flags=C.VFIO_DMA_UNMAP_FLAG_ALL, out={"size": 0x3000}),
        ], doc="SPEC 3.1 / 3.21: ALL needs iova=size=0"),
        Scenario(f"{label}-unmap-dirty-bitmap-flag", DUAL, BOTH, [
            *pro(),
            unmap_dma(ctr, iova=0x100000, size=0x1000,
                      flags=C.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP | C.VFIO_DMA_UNMAP_FLAG_ALL, err=E.EINVAL),
        ]),
        Scenario(f"{label}-get-info", DUAL, BOTH, [
            *pro(),
            Ioctl("p", ctr, IO.VFIO_IOMMU_GET_INFO, S.VFIO_IOMMU_TYPE1_INFO, fields={"argsz": 24},
                  out={"flags": C.VFIO_IOMMU_INFO_PGSIZES | C.VFIO_IOMMU_INFO_CAPS, "cap_offset": 0}),
        ], doc="SPEC 3.1: short buffer -> CAPS, argsz := 24 + caps"),
        Scenario(f"{label}-check-extension-after-set-iommu", DUAL, BOTH, [
            *pro(),
            check_extension("p", ctr, C.VFIO_TYPE1v2_IOMMU, ret=1),
            check_extension("p", ctr, C.VFIO_UNMAP_ALL, ret=1),
            api_version("p", ctr, ret=0),
        ]),
    ]

SCENARIOS += [
    Scenario("type1-unmap-nothing-mapped", DUAL, BOTH, [
        *group_container(bdfs=(F0,)),
        unmap_dma("c", iova=0x100000, size=0x1000, out={"size": 0}),
    ], doc="SPEC 3.1 v2: no mapping in range -> success, size 0"),
    Scenario("compat-unmap-nothing-mapped-enoent", DUAL, BOTH, [
        Open("p", "iommu", "c"), Open("p", group_path(F0), "g0"), set_container("p", "g0", "c"),
        set_iommu("p", "c"),
        unmap_dma("c", iova=0x100000, size=0x1000, err=E.ENOENT),
    ], doc="SPEC 3.21: UNMAP_DMA on iommufd has the IOAS_UNMAP result semantics (3.16): ENOENT"),
    Scenario("type1-map-unaligned-size", DUAL, BOTH, [
        *group_container(bdfs=(F0,)),
        map_dma("c", vaddr=_vaddr("buf"), iova=0x100000, size=0x1001, err=E.EINVAL),
        map_dma("c", vaddr=_vaddr("buf"), iova=0x100800, size=0x1000, err=E.EINVAL),
        map_dma("c", vaddr=0x10001, iova=0x100000, size=0x1000, err=E.EINVAL),
        map_dma("c", vaddr=_vaddr("buf"), iova=0x100000, size=0x1000, flags=0, err=E.EINVAL),
    ], doc="SPEC 3.1: size/iova/vaddr aligned to the IOMMU page; no READ/WRITE -> EINVAL"),
    Scenario("type1-map-unpinnable-vaddr-efault", DUAL, BOTH, [
        *group_container(bdfs=(F0,)),
        map_dma("c", vaddr=0x7F0000000000, iova=0x100000, size=0x1000, err=E.EFAULT),
    ], doc="SPEC 3.1: pin failure -> EFAULT"),
    Scenario("type1-unmap-bisect-einval", DUAL, BOTH, [
        *group_container(bdfs=(F0,)),
        map_dma("c", vaddr=_vaddr("buf"), iova=0x100000, size=0x2000),
        unmap_dma("c", iova=0x101000, size=0x1000, err=E.EINVAL),
        unmap_dma("c", iova=0x100000, size=0x1000, err=E.EINVAL),
        unmap_dma("c", iova=0x100000, size=0x2000, out={"size": 0x2000}),
    ], doc="SPEC 3.1 v2: a range that bisects a mapping -> EINVAL"),
    Scenario("type1-unknown-ioctl-enotty", DUAL, BOTH, [
        *group_container(bdfs=(F0,)),
        Ioctl("p", "c", IO.cmd("VFIO_IOMMU_ENABLE"), None, arg="none", err=E.ENOTTY),
    ], doc="SPEC 3.1: passed to the driver; type1 unknown -> ENOTTY"),
    Scenario("compat-no-ioas", DUAL, BOTH, [
        Open("p", "iommu", "A"),
        api_version("p", "A", ret=0),
        check_extension("p", "A", C.VFIO_TYPE1v2_IOMMU, ret=1),
        check_extension("p", "A", C.VFIO_UPDATE_VADDR, ret=0),
        check_extension("p", "A", C.VFIO_DMA_CC_IOMMU, err=E.ENODEV),
        set_iommu("p", "A", C.VFIO_TYPE1v2_IOMMU, err=E.ENODEV),
        set_iommu("p", "A", 99, err=E.EINVAL),
        map_dma("A", vaddr=0x10000, iova=0x100000, size=0x1000, err=E.ENODEV),
    ], doc="SPEC 3.21"),
    Scenario("compat-map-dma-vaddr-flag", DUAL, BOTH, [
        Open("p", "iommu", "A"), Open("p", group_path(F0), "g0"), set_container("p", "g0", "A"),
        map_dma("A", vaddr=0x10000, iova=0x100000, size=0x1000, flags=RW | C.VFIO_DMA_MAP_FLAG_VADDR,
                err=E.EINVAL),
        map_dma("A", vaddr=0x10000, iova=0x100000, size=0x1000, flags=1 << 7, err=E.EINVAL),
    ], doc="SPEC 3.21: flags outside READ|WRITE -> EINVAL"),
    Scenario("compat-device-fd-through-group", DUAL, BOTH, [
        Open("p", "iommu", "A"), Open("p", group_path(F0), "g0"), set_container("p", "g0", "A"),
        get_device_fd("p", "g0", F0, save_fd="gd0"),
        map_dma("A", vaddr=_vaddr("buf"), iova=0x100000, size=0x1000),
        unmap_dma("A", iova=0, size=0, flags=C.VFIO_DMA_UNMAP_FLAG_ALL, out={"size": 0x1000}),
    ]),
]
_ = FD

SCENARIOS += [
    Scenario("rw-config-out-of-range-efault", DUAL, BOTH, [
        *cdev_bound(),
        Read("p", "d0", off(7) + 4096, 4, err=E.EFAULT),
        Read("p", "d0", off(7) + 4094, 4, err=E.EFAULT),
    ], doc="vfio_config_do_rw: pos or pos+count beyond cfg_size -> EFAULT"),
    Scenario("rw-config-vendor-read-only", DUAL, BOTH, [
        *cdev_bound(),
        Write("p", "d0", off(7), b"\xff\xff\xff\xff", ret=4),
        Read("p", "d0", off(7), 4, data=bytes.fromhex("361bf000")),
    ], doc="vendor/device ids are read-only in vfio-pci's virtualized config space"),
    Scenario("rw-config-bar-sizing", DUAL, BOTH, [
        *cdev_bound(),
        Write("p", "d0", off(7) + 0x10, b"\xff\xff\xff\xff", ret=4),
        Read("p", "d0", off(7) + 0x10, 4, data=(0xFFFE0000).to_bytes(4, "little")),
    ], doc="vfio_bar_fixup: a BAR written all-ones reads back its size mask (0x20000 mem32 BAR)"),
    Scenario("rw-bar-past-end-einval", DUAL, BOTH, [
        *cdev_bound(),
        Read("p", "d0", off(0) + 0x20000, 4, err=E.EINVAL),
        Read("p", "d0", off(0) + 0x1FFFC, 4, ret=ANY),
    ], doc="vfio_pci_bar_rw: pos >= BAR end -> EINVAL"),
    Scenario("rw-region-index-out-of-range", DUAL, BOTH, [
        *cdev_bound(),
        Read("p", "d0", off(9), 4, err=E.EINVAL),
        Read("p", "d0", off(C.VFIO_PCI_VGA_REGION_INDEX), 1, err=E.EINVAL),
    ], doc="vfio_pci_rw: index beyond the regions -> EINVAL; VGA on a non-VGA device -> EINVAL"),
    Scenario("rw-rom-absent-einval", DUAL, BOTH, [
        *cdev_bound(),
        Read("p", "d0", off(6), 4, err=E.EINVAL),
        Write("p", "d0", off(6), b"\0\0\0\0", err=E.EINVAL),
    ]),
]
