"""VFIO: container, groups, device files (group-opened and cdev), vfio-pci.

Mirrors drivers/vfio/: ``vfio_main.py`` (vfio_device, dev_set, device file
ioctl dispatch), ``group.py``, ``container.py``, ``device_cdev.py``,
``iommufd.py`` (the vfio side of iommufd: bind, attach, get_dev_id),
``vfio_iommu_type1.py``; and drivers/vfio/pci/: ``pci/vfio_pci_core.py``
(ioctls, hot reset, dev_set), ``pci/vfio_pci_config.py`` (virtualized config
space), ``pci/vfio_pci_intrs.py`` (SET_IRQS), ``pci/vfio_pci_rdwr.py``.
"""
