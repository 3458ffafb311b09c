"""ABI facts checked against independent derivations and SPEC's tables."""

from __future__ import annotations

import pytest

from fakedev.uapi import consts as C
from fakedev.uapi import ioctls as I
from fakedev.uapi import structs as S
from fakedev.uapi.ioctls import FileKind


def _io(type_: int, nr: int) -> int:
    # _IO(type, nr) = _IOC(_IOC_NONE, type, nr, 0): dir bits 0, size bits 0
    return (0 << 30) | (type_ << 8) | nr | (0 << 16)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("VFIO_GET_API_VERSION", 0x3B64),
        ("VFIO_CHECK_EXTENSION", 0x3B65),
        ("VFIO_SET_IOMMU", 0x3B66),
        ("VFIO_GROUP_GET_STATUS", 0x3B67),
        ("VFIO_GROUP_SET_CONTAINER", 0x3B68),
        ("VFIO_GROUP_UNSET_CONTAINER", 0x3B69),
        ("VFIO_GROUP_GET_DEVICE_FD", 0x3B6A),
        ("VFIO_DEVICE_GET_INFO", 0x3B6B),
        ("VFIO_DEVICE_GET_REGION_INFO", 0x3B6C),
        ("VFIO_DEVICE_GET_IRQ_INFO", 0x3B6D),
        ("VFIO_DEVICE_SET_IRQS", 0x3B6E),
        ("VFIO_DEVICE_RESET", 0x3B6F),
        ("VFIO_DEVICE_GET_PCI_HOT_RESET_INFO", 0x3B70),
        ("VFIO_IOMMU_GET_INFO", 0x3B70),
        ("VFIO_DEVICE_PCI_HOT_RESET", 0x3B71),
        ("VFIO_IOMMU_MAP_DMA", 0x3B71),
        ("VFIO_IOMMU_UNMAP_DMA", 0x3B72),
        ("VFIO_DEVICE_FEATURE", 0x3B75),
        ("VFIO_DEVICE_BIND_IOMMUFD", 0x3B76),
        ("VFIO_DEVICE_ATTACH_IOMMUFD_PT", 0x3B77),
        ("VFIO_DEVICE_DETACH_IOMMUFD_PT", 0x3B78),
        ("IOMMU_DESTROY", 0x3B80),
        ("IOMMU_IOAS_ALLOC", 0x3B81),
        ("IOMMU_IOAS_ALLOW_IOVAS", 0x3B82),
        ("IOMMU_IOAS_COPY", 0x3B83),
        ("IOMMU_IOAS_IOVA_RANGES", 0x3B84),
        ("IOMMU_IOAS_MAP", 0x3B85),
        ("IOMMU_IOAS_UNMAP", 0x3B86),
        ("IOMMU_OPTION", 0x3B87),
        ("IOMMU_VFIO_IOAS", 0x3B88),
        ("IOMMU_HWPT_ALLOC", 0x3B89),
        ("IOMMU_GET_HW_INFO", 0x3B8A),
        ("IOMMU_IOAS_MAP_FILE", 0x3B8F),
        ("IOMMU_IOAS_CHANGE_PROCESS", 0x3B92),
    ],
)
def test_numbers(name: str, value: int) -> None:
    assert I.cmd(name) == value
    assert I.by_name(name).cmd == _io(0x3B, value & 0xFF)


def test_aliases_are_split_by_file_kind() -> None:
    info = I.lookup(FileKind.DEVICE, 0x3B70)
    get_info = I.lookup(FileKind.CONTAINER, 0x3B70)
    assert info is not None and info.name == "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO"
    assert get_info is not None and get_info.name == "VFIO_IOMMU_GET_INFO"
    compat = I.lookup(FileKind.IOMMUFD, 0x3B71)
    assert compat is not None and compat.name == "VFIO_IOMMU_MAP_DMA"
    assert I.lookup(FileKind.GROUP, 0x3B71) is None
    # every (kind, cmd) pair names exactly one call
    seen: dict[tuple[FileKind, int], str] = {}
    for io in I.IOCTLS:
        for k in io.kinds:
            assert (k, io.cmd) not in seen, (io.name, seen.get((k, io.cmd)))
            seen[(k, io.cmd)] = io.name


@pytest.mark.parametrize(
    ("layout", "size", "fields"),
    [
        (S.VFIO_DEVICE_INFO, 24, {"num_regions": 8, "num_irqs": 12, "cap_offset": 16}),
        (S.VFIO_REGION_INFO, 32, {"index": 8, "cap_offset": 12, "size": 16, "offset": 24}),
        (S.VFIO_IRQ_SET, 20, {"start": 12, "count": 16}),
        (S.VFIO_PCI_DEPENDENT_DEVICE, 8, {"devid": 0, "segment": 4, "bus": 6, "devfn": 7}),
        (S.VFIO_PCI_HOT_RESET_INFO, 12, {"count": 8}),
        (S.VFIO_DEVICE_BIND_IOMMUFD, 24, {"iommufd": 8, "out_devid": 12, "token_uuid_ptr": 16}),
        (S.VFIO_DEVICE_ATTACH_IOMMUFD_PT, 16, {"pt_id": 8, "pasid": 12}),
        (S.VFIO_IOMMU_TYPE1_INFO, 24, {"iova_pgsizes": 8, "cap_offset": 16}),
        (S.VFIO_IOMMU_TYPE1_DMA_MAP, 32, {"vaddr": 8, "iova": 16, "size": 24}),
        (S.IOMMU_IOAS_IOVA_RANGES, 32, {"allowed_iovas": 16, "out_iova_alignment": 24}),
        (S.IOMMU_IOAS_MAP, 40, {"user_va": 16, "length": 24, "iova": 32}),
        (S.IOMMU_IOAS_MAP_FILE, 40, {"fd": 12, "start": 16, "length": 24, "iova": 32}),
        (S.IOMMU_IOAS_COPY, 40, {"length": 16, "dst_iova": 24, "src_iova": 32}),
        (S.IOMMU_OPTION, 24, {"op": 8, "__reserved": 10, "object_id": 12, "val64": 16}),
        (S.IOMMU_VFIO_IOAS, 12, {"op": 8, "__reserved": 10}),
        (S.IOMMU_HWPT_ALLOC, 40, {"out_hwpt_id": 16, "data_type": 24, "data_uptr": 32}),
        (S.IOMMU_HW_INFO, 40, {"data_uptr": 16, "out_data_type": 24, "out_capabilities": 32}),
    ],
)
def test_layouts(layout: object, size: int, fields: dict[str, int]) -> None:
    from fakedev.uapi.layout import Layout

    assert isinstance(layout, Layout)
    assert layout.size == size
    for name, off in fields.items():
        assert layout.field(name).offset == off, name


def test_minsz_values_used_by_the_kernel() -> None:
    assert S.VFIO_DEVICE_INFO.offsetofend("num_irqs") == 16
    assert S.VFIO_DEVICE_BIND_IOMMUFD.offsetofend("out_devid") == S.VFIO_DEVICE_BIND_IOMMUFD_SIZE_6_6
    assert S.VFIO_DEVICE_ATTACH_IOMMUFD_PT.offsetofend("pt_id") == S.VFIO_DEVICE_ATTACH_IOMMUFD_PT_SIZE_6_6
    assert S.IOMMU_HWPT_ALLOC.offsetofend("__reserved") == S.IOMMU_HWPT_ALLOC_SIZE_6_6
    assert S.IOMMU_HW_INFO.offsetofend("__reserved") == S.IOMMU_HW_INFO_SIZE_6_6
    assert S.IOMMU_IOAS_IOVA_RANGES.offsetofend("out_iova_alignment") == 32


def test_pack_unpack_roundtrip_and_wrap() -> None:
    raw = S.VFIO_PCI_DEPENDENT_DEVICE.pack(devid=-1, segment=0, bus=1, devfn=1)
    assert raw == bytes.fromhex("ffffffff00000101")
    assert S.VFIO_PCI_DEPENDENT_DEVICE.unpack(raw)["devid"] == C.VFIO_PCI_DEVID_NOT_OWNED
    bind = S.VFIO_DEVICE_BIND_IOMMUFD.pack(argsz=16, iommufd=-1)
    assert S.VFIO_DEVICE_BIND_IOMMUFD.unpack(bind)["iommufd"] == -1
    short = S.VFIO_DEVICE_BIND_IOMMUFD.unpack(bind[:16], partial=True)
    assert short["token_uuid_ptr"] == 0
    with pytest.raises(ValueError):
        S.VFIO_DEVICE_BIND_IOMMUFD.unpack(bind[:16])


def test_hot_reset_constants() -> None:
    assert C.VFIO_PCI_HOT_RESET_FLAG_DEV_ID == 1
    assert C.VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED == 2
    assert C.VFIO_PCI_DEVID_OWNED == 0
    assert C.VFIO_PCI_DEVID_NOT_OWNED == 0xFFFFFFFF
    assert C.VFIO_PCI_INDEX_TO_OFFSET(7) == 7 << 40
