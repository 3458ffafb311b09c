"""iommufd: /dev/iommu contexts, the object table, IOAS, HWPT, devices.

Mirrors drivers/iommu/iommufd/: ``main.py`` (context, object table, ioctl
dispatch), ``device.py``, ``ioas.py``, ``io_pagetable.py``,
``hw_pagetable.py``, ``vfio_compat.py``.

What VFIO calls (the model's include/linux/iommufd.h), all in ``device.py``
and ``main.py``:

- ``IommufdCtx``: one per open of /dev/iommu (``IommufdFile.ctx``). ``get()``/
  ``put()``: the context lives until the last reference (its file's release
  and every bound device's reference); when the last goes, every object is
  destroyed leaf-first.
- ``iommufd_ctx_from_file(f) -> IommufdCtx``: KernelError(EBADFD) if ``f`` is
  not an iommufd file (takes a reference; caller puts it).
- ``iommufd_device_bind(ictx, dev, group) -> IommufdDevice``: claims DMA
  ownership of ``group`` with ``ictx`` as cookie (EPERM when owned otherwise),
  allocates the device object; ``idev.obj_id`` is the devid.
- ``iommufd_device_unbind(idev)``.
- ``iommufd_device_attach(idev, pt_id) -> int`` (the hwpt id),
  ``iommufd_device_replace(idev, pt_id) -> int``, ``iommufd_device_detach(idev)``.
- ``iommufd_ctx_has_group(ictx, group) -> bool``.
- ``iommufd_vfio_compat_ioas_create(ictx)``, ``iommufd_vfio_compat_ioas_get_id(ictx)``,
  ``iommufd_vfio_compat_set_no_iommu(ictx)`` for the group path.
"""
