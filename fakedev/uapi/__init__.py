"""ABI facts of the VFIO and iommufd uAPI: numbers, layouts, flags. No behaviour."""
