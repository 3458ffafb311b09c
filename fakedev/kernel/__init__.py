"""The kernel model: VFIO and iommufd as Linux implements them. Sans-I/O.

Nothing here does I/O: no ``os``, no ``trio``, no syscalls. A call arrives as
(``File`` method, ``Task``) and returns a value or raises ``KernelError``.
The file split mirrors the kernel's (``vfio/vfio_main.py`` ~
``drivers/vfio/vfio_main.c``, ``iommufd/ioas.py`` ~
``drivers/iommu/iommufd/ioas.c``); each model function names the kernel
function it stands for in its docstring.

The facade is ``fakedev.kernel.kernel.Kernel``:

    k = Kernel(topology, version=KernelVersion.parse("6.6"))
    k.nodes()                    # DevNodes to serve under /dev
    f = k.open("vfio/devices/vfio0", task)   # -> File, or KernelError
    f.ioctl(task, cmd, arg); f.read(task, off, n); f.write(task, off, data)
    f.release()                  # after the last close
    k.vfio_devices()             # VfioPciDevice per vfio-pci function (vfioN, BDF, group)
    k.reset_log                  # every reset the model performed
    k.check_invariants()         # [] when the state is consistent
    k.describe()                 # plain-data snapshot for `fakedev show`
    k.dma_memory = memory        # the host's DmaMemory (fakedev.kernel.dma); then device DMA
    k.dma_read(bdf, iova, n); k.dma_write(bdf, iova, data)  # via the IOMMU; EFAULT on a fault
    k.unplug_device(bdf)         # hot removal: REQ now, gone at the holder's last close
    k.unplug_tick(now)           # REQ again every 10 s while pending; -> next deadline
    k.driver_override_store(bdf, b"vfio-pci\n"); k.driver_override_show(bdf)
    k.bind_store(drv, b"BDF"); k.unbind_store(drv, b"BDF"); k.drivers_probe_store(b"BDF")
    k.new_id_store(drv, data); k.remove_id_store(drv, data); k.reset_store(bdf, b"1", pid)
    k.remove_store(bdf, b"1")    # the sysfs stores: bytes taken, KernelError, or Blocked(pending,
                                 # retry): the writer waits until pending.done (then retries)
    k.faults.add(parse_spec("call=VFIO_DEVICE_RESET,nth=1,errno=EIO"))  # fakedev.kernel.fault_inject
    k.faults.ioctl(f, task, cmd, arg)   # f.ioctl with the armed faults (also .open/.read/.write)
"""
