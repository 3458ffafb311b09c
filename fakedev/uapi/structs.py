"""Struct layouts of the VFIO and iommufd uAPI (x86-64, little endian).

From ``include/uapi/linux/vfio.h`` and ``include/uapi/linux/iommufd.h``.
Where a struct grew over time, the newest layout is given and the older size
is named (``*_SIZE_6_6``): the kernel's argsz/size rules decide which part a
caller supplied.
"""

from __future__ import annotations

from typing import Final

from fakedev.uapi.layout import Layout

# --- VFIO ------------------------------------------------------------------

VFIO_INFO_CAP_HEADER: Final = Layout("vfio_info_cap_header", 8, [("id", "H"), ("version", "H"), ("next", "I")])
VFIO_GROUP_STATUS: Final = Layout("vfio_group_status", 8, [("argsz", "I"), ("flags", "I")])
VFIO_DEVICE_INFO: Final = Layout(
    "vfio_device_info", 24,
    [("argsz", "I"), ("flags", "I"), ("num_regions", "I"), ("num_irqs", "I"), ("cap_offset", "I"), ("pad", "I")],
)
VFIO_REGION_INFO: Final = Layout(
    "vfio_region_info", 32,
    [("argsz", "I"), ("flags", "I"), ("index", "I"), ("cap_offset", "I"), ("size", "Q"), ("offset", "Q")],
)
VFIO_REGION_INFO_CAP_TYPE: Final = Layout(
    "vfio_region_info_cap_type", 16, [("id", "H"), ("version", "H"), ("next", "I"), ("type", "I"), ("subtype", "I")]
)
VFIO_REGION_INFO_CAP_SPARSE_MMAP: Final = Layout(
    "vfio_region_info_cap_sparse_mmap", 16,
    [("id", "H"), ("version", "H"), ("next", "I"), ("nr_areas", "I"), ("reserved", "I")],
)
VFIO_REGION_SPARSE_MMAP_AREA: Final = Layout("vfio_region_sparse_mmap_area", 16, [("offset", "Q"), ("size", "Q")])
VFIO_DEVICE_INFO_CAP_PCI_ATOMIC_COMP: Final = Layout(
    "vfio_device_info_cap_pci_atomic_comp", 16,
    [("id", "H"), ("version", "H"), ("next", "I"), ("flags", "I"), ("reserved", "I")],
)
VFIO_IRQ_INFO: Final = Layout(
    "vfio_irq_info", 16, [("argsz", "I"), ("flags", "I"), ("index", "I"), ("count", "I")]
)
VFIO_IRQ_SET: Final = Layout(
    "vfio_irq_set", 20, [("argsz", "I"), ("flags", "I"), ("index", "I"), ("start", "I"), ("count", "I")]
)
VFIO_PCI_DEPENDENT_DEVICE: Final = Layout(
    "vfio_pci_dependent_device", 8, [("devid", "I"), ("segment", "H"), ("bus", "B"), ("devfn", "B")]
)  # ``devid`` shares its bytes with ``group_id``
VFIO_PCI_HOT_RESET_INFO: Final = Layout(
    "vfio_pci_hot_reset_info", 12, [("argsz", "I"), ("flags", "I"), ("count", "I")]
)
VFIO_PCI_HOT_RESET: Final = Layout("vfio_pci_hot_reset", 12, [("argsz", "I"), ("flags", "I"), ("count", "I")])
VFIO_DEVICE_FEATURE: Final = Layout("vfio_device_feature", 8, [("argsz", "I"), ("flags", "I")])
VFIO_DEVICE_BIND_IOMMUFD: Final = Layout(
    "vfio_device_bind_iommufd", 24,
    [("argsz", "I"), ("flags", "I"), ("iommufd", "i"), ("out_devid", "I"), ("token_uuid_ptr", "Q")],
)
VFIO_DEVICE_BIND_IOMMUFD_SIZE_6_6: Final = 16
VFIO_DEVICE_ATTACH_IOMMUFD_PT: Final = Layout(
    "vfio_device_attach_iommufd_pt", 16, [("argsz", "I"), ("flags", "I"), ("pt_id", "I"), ("pasid", "I")]
)
VFIO_DEVICE_ATTACH_IOMMUFD_PT_SIZE_6_6: Final = 12
VFIO_DEVICE_DETACH_IOMMUFD_PT: Final = Layout(
    "vfio_device_detach_iommufd_pt", 12, [("argsz", "I"), ("flags", "I"), ("pasid", "I")]
)
VFIO_DEVICE_DETACH_IOMMUFD_PT_SIZE_6_6: Final = 8
VFIO_IOMMU_TYPE1_INFO: Final = Layout(
    "vfio_iommu_type1_info", 24,
    [("argsz", "I"), ("flags", "I"), ("iova_pgsizes", "Q"), ("cap_offset", "I"), ("pad", "I")],
)
VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE: Final = Layout(
    "vfio_iommu_type1_info_cap_iova_range", 16,
    [("id", "H"), ("version", "H"), ("next", "I"), ("nr_iovas", "I"), ("reserved", "I")],
)
VFIO_IOVA_RANGE: Final = Layout("vfio_iova_range", 16, [("start", "Q"), ("end", "Q")])
VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION: Final = Layout(
    "vfio_iommu_type1_info_cap_migration", 32,
    [("id", "H"), ("version", "H"), ("next", "I"), ("flags", "I"), ("pgsize_bitmap", "Q"),
     ("max_dirty_bitmap_size", "Q")],
)
VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL: Final = Layout(
    "vfio_iommu_type1_info_dma_avail", 12, [("id", "H"), ("version", "H"), ("next", "I"), ("avail", "I")]
)
VFIO_IOMMU_TYPE1_DMA_MAP: Final = Layout(
    "vfio_iommu_type1_dma_map", 32,
    [("argsz", "I"), ("flags", "I"), ("vaddr", "Q"), ("iova", "Q"), ("size", "Q")],
)
VFIO_IOMMU_TYPE1_DMA_UNMAP: Final = Layout(
    "vfio_iommu_type1_dma_unmap", 24, [("argsz", "I"), ("flags", "I"), ("iova", "Q"), ("size", "Q")]
)
VFIO_BITMAP: Final = Layout("vfio_bitmap", 24, [("pgsize", "Q"), ("size", "Q"), ("data", "Q")])

# --- iommufd ---------------------------------------------------------------

IOMMU_DESTROY: Final = Layout("iommu_destroy", 8, [("size", "I"), ("id", "I")])
IOMMU_IOAS_ALLOC: Final = Layout("iommu_ioas_alloc", 12, [("size", "I"), ("flags", "I"), ("out_ioas_id", "I")])
IOMMU_IOVA_RANGE: Final = Layout("iommu_iova_range", 16, [("start", "Q"), ("last", "Q")])
IOMMU_IOAS_IOVA_RANGES: Final = Layout(
    "iommu_ioas_iova_ranges", 32,
    [("size", "I"), ("ioas_id", "I"), ("num_iovas", "I"), ("__reserved", "I"), ("allowed_iovas", "Q"),
     ("out_iova_alignment", "Q")],
)
IOMMU_IOAS_ALLOW_IOVAS: Final = Layout(
    "iommu_ioas_allow_iovas", 24,
    [("size", "I"), ("ioas_id", "I"), ("num_iovas", "I"), ("__reserved", "I"), ("allowed_iovas", "Q")],
)
IOMMU_IOAS_MAP: Final = Layout(
    "iommu_ioas_map", 40,
    [("size", "I"), ("flags", "I"), ("ioas_id", "I"), ("__reserved", "I"), ("user_va", "Q"), ("length", "Q"),
     ("iova", "Q")],
)
IOMMU_IOAS_MAP_FILE: Final = Layout(
    "iommu_ioas_map_file", 40,
    [("size", "I"), ("flags", "I"), ("ioas_id", "I"), ("fd", "i"), ("start", "Q"), ("length", "Q"),
     ("iova", "Q")],
)
IOMMU_IOAS_COPY: Final = Layout(
    "iommu_ioas_copy", 40,
    [("size", "I"), ("flags", "I"), ("dst_ioas_id", "I"), ("src_ioas_id", "I"), ("length", "Q"),
     ("dst_iova", "Q"), ("src_iova", "Q")],
)
IOMMU_IOAS_UNMAP: Final = Layout(
    "iommu_ioas_unmap", 24, [("size", "I"), ("ioas_id", "I"), ("iova", "Q"), ("length", "Q")]
)
IOMMU_OPTION: Final = Layout(
    "iommu_option", 24,
    [("size", "I"), ("option_id", "I"), ("op", "H"), ("__reserved", "H"), ("object_id", "I"), ("val64", "Q")],
)
IOMMU_VFIO_IOAS: Final = Layout(
    "iommu_vfio_ioas", 12, [("size", "I"), ("ioas_id", "I"), ("op", "H"), ("__reserved", "H")]
)
IOMMU_HWPT_ALLOC: Final = Layout(
    "iommu_hwpt_alloc", 40,
    [("size", "I"), ("flags", "I"), ("dev_id", "I"), ("pt_id", "I"), ("out_hwpt_id", "I"), ("__reserved", "I"),
     ("data_type", "I"), ("data_len", "I"), ("data_uptr", "Q")],
)
IOMMU_HWPT_ALLOC_SIZE_6_6: Final = 24
IOMMU_HW_INFO: Final = Layout(
    "iommu_hw_info", 40,
    [("size", "I"), ("flags", "I"), ("dev_id", "I"), ("data_len", "I"), ("data_uptr", "Q"),
     ("out_data_type", "I"), ("__reserved", "I"), ("out_capabilities", "Q")],
)
IOMMU_HW_INFO_SIZE_6_6: Final = 32
IOMMU_HW_INFO_VTD: Final = Layout(
    "iommu_hw_info_vtd", 24, [("flags", "I"), ("__reserved", "I"), ("cap_reg", "Q"), ("ecap_reg", "Q")]
)
IOMMU_IOAS_CHANGE_PROCESS: Final = Layout("iommu_ioas_change_process", 8, [("size", "I"), ("__reserved", "I")])
