"""fakedev: a FUSE-served model of Linux VFIO and iommufd."""

__version__ = "0.1.0"
