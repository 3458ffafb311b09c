"""Which kernel's behaviour the model follows, where behaviour changed.

A device tree names a version ("6.6", "6.12"); each behaviour switch is a
property here, so model code reads ``kver.hot_reset_info_local_buffer`` rather
than comparing numbers, and the table of what changed when is in one place.
"""

from __future__ import annotations

import re

from attrs import frozen


@frozen(order=True)
class KernelVersion:
    major: int
    minor: int

    @classmethod
    def parse(cls, text: str) -> KernelVersion:
        m = re.fullmatch(r"(\d+)\.(\d+)(?:\.\d+)?", text.strip())
        if not m:
            raise ValueError(f"not a kernel version: {text!r} (expected e.g. '6.6' or '6.12')")
        v = cls(int(m.group(1)), int(m.group(2)))
        if v < MINIMUM:
            raise ValueError(f"kernel version {text} is older than {MINIMUM} (the first with the vfio cdev)")
        return v

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"

    def at_least(self, major: int, minor: int) -> bool:
        return (self.major, self.minor) >= (major, minor)

    # -- behaviour switches ---------------------------------------------
    @property
    def hot_reset_info_local_buffer(self) -> bool:
        """6.10+: INFO counts first, ENOSPC with flags 0, entries from a kernel buffer.

        Before (6.6.0-6.9): entries copied inside the bus walk, ENOSPC with the
        computed flags and the entries that fit written (SPEC 4.6 B/C).
        """
        return self.at_least(6, 10)

    @property
    def hot_reset_array_count_u32(self) -> bool:
        """6.12+: HOT_RESET's array count is u32 (> INT_MAX gives EINVAL, not ENOMEM)."""
        return self.at_least(6, 12)

    @property
    def has_dirty_tracking(self) -> bool:
        """6.7+: HWPT_ALLOC data/flags, hw_info out_capabilities, dirty ioctls."""
        return self.at_least(6, 7)

    @property
    def has_atomic_comp_cap(self) -> bool:
        """VFIO_DEVICE_INFO_CAP_PCI_ATOMIC_COMP in vfio-pci's GET_INFO
        (vfio_pci_info_atomic_cap, posted May 2023, merged for 6.5): true for
        every modelled kernel (6.6 on); the switch records when it appeared."""
        return self.at_least(6, 5)

    @property
    def has_bind_token(self) -> bool:
        """VFIO_DEVICE_BIND_FLAG_TOKEN and PASID attach/detach flags."""
        return self.at_least(6, 16)

    @property
    def has_map_file(self) -> bool:
        """IOMMU_IOAS_MAP_FILE."""
        return self.at_least(6, 13)

    @property
    def has_change_process(self) -> bool:
        """IOMMU_IOAS_CHANGE_PROCESS."""
        return self.at_least(6, 13)

    @property
    def type1_has_nesting(self) -> bool:
        """VFIO_TYPE1_NESTING_IOMMU still offered by type1 (removed in 6.13)."""
        return not self.at_least(6, 13)

    @property
    def hot_reset_single_pass_locking(self) -> bool:
        """6.10+: hot reset checks ownership and trylocks memory_lock device by device.

        Before (6.6-6.9, vma_lock era): a first pass checks ownership (and the
        vma lock) of every member, a second pass trylocks each memory_lock, so a
        not-owned member wins over a contended memory_lock.
        """
        return self.at_least(6, 10)

    @property
    def noiommu_iommufd_open_fixed(self) -> bool:
        """VFIO_GROUP_GET_DEVICE_FD on a noiommu group set to an iommufd opens the
        device (6.17+: b25e271b3779 "vfio: Fix unbalanced vfio_df_close call in
        no-iommu mode", also backported to stable series such as 6.12.y). Before
        (6.6's 6086efe73498 on) it returns an fd whose open was skipped: access is
        never granted, every call on it fails with EINVAL. The kernel's open_count
        underflow when such an fd is closed is not modelled (it stays 0)."""
        return self.at_least(6, 17)


MINIMUM = KernelVersion(6, 6)
NEWEST = KernelVersion(6, 18)
