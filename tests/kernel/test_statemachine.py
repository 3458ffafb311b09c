"""Random call sequences against the kernel model (hypothesis state machine).

Several FakeProcesses open and close nodes, bind/attach/detach cdevs, use
the group path (SET_CONTAINER, SET_IOMMU, GET_DEVICE_FD), allocate/map/unmap
and destroy iommufd objects, ask for and perform hot resets, and exit, while
sysfs writes override, bind, unbind, probe and reset functions. After
every step: ``check_invariants() == []``, at most one DMA owner per iommu
group, every bound device's iommufd context alive, iommufd IDs unique, and a
failed call changed nothing. When every process has exited nothing is left:
no live context, no DMA owner, no open device or group.

Profile: derandomized with a fixed example/step budget, so CI runs the same
sequences every time and stays well under a minute.
"""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from fakedev.kernel.errors import KernelError
from fakedev.kernel.file import File
from fakedev.kernel.testing import FakeOther, FakeProcess
from fakedev.kernel.version import KernelVersion
from fakedev.uapi import consts as C
from fakedev.uapi import ioctls as IO
from fakedev.uapi import structs as S
from fakedev.uapi.ioctls import FileKind
from tests.kernel.harness import _strip_resets, build_topology

NPROC = 2
PROCS = st.integers(0, NPROC - 1)
PICK = st.integers(0, 63)
RW_FIXED = C.IOMMU_IOAS_MAP_READABLE | C.IOMMU_IOAS_MAP_WRITEABLE | C.IOMMU_IOAS_MAP_FIXED_IOVA


def _vfio(k: Any) -> Any:
    return getattr(k, "vfio", None)


class KernelMachine(RuleBasedStateMachine):
    TOPOLOGY = "shared-group"
    VERSION = "6.6"

    def __init__(self) -> None:
        super().__init__()
        from fakedev.kernel.kernel import Kernel

        self.topo = build_topology(self.TOPOLOGY)
        self.k = Kernel(self.topo, version=KernelVersion.parse(self.VERSION))
        self.procs = [FakeProcess() for _ in range(NPROC)]
        self.paths = sorted(n.path for n in self.k.nodes())
        self.names = [vd.pdev.name for vd in self.k.vfio_devices()] + ["0000:7f:00.0"]
        self.ctxs: list[Any] = []  # every iommufd context seen (identity list)

    # -- helpers -------------------------------------------------------------
    def _snapshot(self) -> Any:
        refs = [{fd: f.refs for fd, f in p.fds.items() if not isinstance(f, File)} for p in self.procs]
        return (_strip_resets(self.k.describe()), [sorted(p.fds) for p in self.procs], refs)

    def _fds(self, pi: int, *kinds: FileKind) -> list[int]:
        out = []
        for fd, f in sorted(self.procs[pi].fds.items()):
            if isinstance(f, File) and (not kinds or f.kind in kinds):
                out.append(fd)
        return out

    def _pick(self, pi: int, j: int, *kinds: FileKind) -> int | None:
        """One of the process's fds of ``kinds``; with none, try to open a node of that kind."""
        fds = self._fds(pi, *kinds)
        if fds and j % 4:
            return fds[j % len(fds)]
        paths = [path for path in self.paths if self._kind_of(path) in kinds]
        if not paths:
            return fds[j % len(fds)] if fds else None
        path = paths[j % len(paths)]
        p = self.procs[pi]
        fd = self._call(lambda: p.install(self.k.open(path, p.task())))
        if fd is None:
            return fds[j % len(fds)] if fds else None
        return int(fd)

    @staticmethod
    def _kind_of(path: str) -> FileKind:
        if path == "iommu":
            return FileKind.IOMMUFD
        if path == "vfio/vfio":
            return FileKind.CONTAINER
        if path.startswith("vfio/devices/"):
            return FileKind.DEVICE
        return FileKind.GROUP

    def _note_ctxs(self) -> None:
        for p in self.procs:
            for f in p.fds.values():
                ctx = getattr(f, "ctx", None)
                if ctx is not None and not any(c is ctx for c in self.ctxs):
                    self.ctxs.append(ctx)

    def _call(self, fn: Any) -> Any:
        before = self._snapshot()
        nresets = len(self.k.reset_log)
        try:
            r = fn()
        except KernelError as e:
            after = self._snapshot()
            assert after == before, f"failed call ({e}) changed state:\n{before}\n{after}"
            bad = [r for r in self.k.reset_log[nresets:] if r.cause != "close"]
            assert not bad, f"failed call ({e}) reset {bad}"
            return None
        self._note_ctxs()
        return r

    def _ioctl(self, pi: int, fd: int, cmd: int, arg: int) -> Any:
        p = self.procs[pi]
        f = p.fds[fd]
        assert isinstance(f, File)
        return self._call(lambda: f.ioctl(p.task(), cmd, arg))

    def _struct(self, pi: int, data: bytes) -> int:
        return self.procs[pi].alloc(data)

    # -- rules -----------------------------------------------------------------
    @rule(pi=PROCS, n=PICK)
    def open_node(self, pi: int, n: int) -> None:
        p = self.procs[pi]
        path = self.paths[n % len(self.paths)]

        def go() -> int:
            return p.install(self.k.open(path, p.task()))

        self._call(go)

    @rule(pi=PROCS, j=PICK)
    def close_fd(self, pi: int, j: int) -> None:
        fds = sorted(self.procs[pi].fds)
        if fds:
            self.procs[pi].close(fds[j % len(fds)])

    @rule(pi=PROCS)
    def exit_process(self, pi: int) -> None:
        self.procs[pi].exit()
        self.procs[pi] = FakeProcess()

    @rule(pi=PROCS, d=PICK, attach_to=st.integers(0, 3))
    def cdev_session(self, pi: int, d: int, attach_to: int) -> None:
        """open /dev/iommu and a cdev, BIND, then ATTACH to a fresh IOAS (or not)."""
        p = self.procs[pi]
        cdevs = [path for path in self.paths if path.startswith("vfio/devices/")]
        ifd = self._call(lambda: p.install(self.k.open("iommu", p.task())))
        dfd = self._call(lambda: p.install(self.k.open(cdevs[d % len(cdevs)], p.task())))
        if ifd is None or dfd is None:
            return
        arg = self._struct(pi, S.VFIO_DEVICE_BIND_IOMMUFD.pack(argsz=16, iommufd=ifd))
        if self._ioctl(pi, dfd, IO.VFIO_DEVICE_BIND_IOMMUFD, arg) is None or not attach_to:
            return
        out = self._struct(pi, S.IOMMU_IOAS_ALLOC.pack(size=12))
        if self._ioctl(pi, ifd, IO.IOMMU_IOAS_ALLOC, out) is None:
            return
        ioas = S.IOMMU_IOAS_ALLOC.unpack(self.procs[pi].peek(out, 12))["out_ioas_id"]
        arg = self._struct(pi, S.VFIO_DEVICE_ATTACH_IOMMUFD_PT.pack(argsz=12, pt_id=ioas))
        self._ioctl(pi, dfd, IO.VFIO_DEVICE_ATTACH_IOMMUFD_PT, arg)

    @rule(pi=PROCS, attach_to=st.booleans())
    def cdev_all(self, pi: int, attach_to: bool) -> None:
        """open /dev/iommu and every cdev, BIND all to it (a hot reset can then succeed)."""
        p = self.procs[pi]
        ifd = self._call(lambda: p.install(self.k.open("iommu", p.task())))
        if ifd is None:
            return
        ioas = None
        if attach_to:
            out = self._struct(pi, S.IOMMU_IOAS_ALLOC.pack(size=12))
            if self._ioctl(pi, ifd, IO.IOMMU_IOAS_ALLOC, out) is not None:
                ioas = S.IOMMU_IOAS_ALLOC.unpack(self.procs[pi].peek(out, 12))["out_ioas_id"]
        for path in self.paths:
            if not path.startswith("vfio/devices/"):
                continue
            dfd = self._call(lambda path=path: p.install(self.k.open(path, p.task())))
            if dfd is None:
                continue
            arg = self._struct(pi, S.VFIO_DEVICE_BIND_IOMMUFD.pack(argsz=16, iommufd=ifd))
            if self._ioctl(pi, dfd, IO.VFIO_DEVICE_BIND_IOMMUFD, arg) is not None and ioas is not None:
                arg = self._struct(pi, S.VFIO_DEVICE_ATTACH_IOMMUFD_PT.pack(argsz=12, pt_id=ioas))
                self._ioctl(pi, dfd, IO.VFIO_DEVICE_ATTACH_IOMMUFD_PT, arg)

    @rule(pi=PROCS, g=PICK, use_iommufd=st.booleans())
    def group_session(self, pi: int, g: int, use_iommufd: bool) -> None:
        """open a container (or /dev/iommu) and a group, SET_CONTAINER, SET_IOMMU, GET_DEVICE_FD."""
        p = self.procs[pi]
        groups = [path for path in self.paths if self._kind_of(path) is FileKind.GROUP]
        if not groups:
            return
        cpath = "iommu" if use_iommufd else "vfio/vfio"
        cfd = self._call(lambda: p.install(self.k.open(cpath, p.task())))
        gpath = groups[g % len(groups)]
        gfd = self._call(lambda: p.install(self.k.open(gpath, p.task())))
        if cfd is None or gfd is None:
            return
        if self._ioctl(pi, gfd, IO.VFIO_GROUP_SET_CONTAINER, self._struct(pi, struct.pack("<i", cfd))) is None:
            return
        if not use_iommufd and self._ioctl(pi, cfd, IO.VFIO_SET_IOMMU, C.VFIO_TYPE1v2_IOMMU) is None:
            return
        gid = int(gpath.rsplit("/", 1)[1])
        for vd in self.k.vfio_devices():
            if vd.pdev.iommu_group == gid:
                name = self._struct(pi, vd.pdev.name.encode() + b"\0")
                self._ioctl(pi, gfd, IO.VFIO_GROUP_GET_DEVICE_FD, name)

    @rule(pi=PROCS, kind=st.sampled_from(["eventfd", "pipe"]))
    def foreign_fd(self, pi: int, kind: str) -> None:
        p = self.procs[pi]
        if kind == "eventfd":
            p.eventfd()
        else:
            p.pipe()

    @rule(pi=PROCS, j=PICK, m=PICK)
    def bind(self, pi: int, j: int, m: int) -> None:
        dev = self._pick(pi, j, FileKind.DEVICE)
        ictx = self._pick(pi, m, FileKind.IOMMUFD)
        if dev is None:
            return
        if ictx is None or m % 5 == 0:  # sometimes any fd of the process (a pipe, a group...)
            fds = sorted(self.procs[pi].fds)
            ictx = fds[m % len(fds)] if fds and m % 2 else m
        arg = self._struct(pi, S.VFIO_DEVICE_BIND_IOMMUFD.pack(argsz=16, iommufd=ictx))
        self._ioctl(pi, dev, IO.VFIO_DEVICE_BIND_IOMMUFD, arg)

    @rule(pi=PROCS, j=PICK, pt=st.integers(0, 7))
    def attach(self, pi: int, j: int, pt: int) -> None:
        dev = self._pick(pi, j, FileKind.DEVICE)
        if dev is not None:
            arg = self._struct(pi, S.VFIO_DEVICE_ATTACH_IOMMUFD_PT.pack(argsz=12, pt_id=pt))
            self._ioctl(pi, dev, IO.VFIO_DEVICE_ATTACH_IOMMUFD_PT, arg)

    @rule(pi=PROCS, j=PICK)
    def detach(self, pi: int, j: int) -> None:
        dev = self._pick(pi, j, FileKind.DEVICE)
        if dev is not None:
            arg = self._struct(pi, S.VFIO_DEVICE_DETACH_IOMMUFD_PT.pack(argsz=8))
            self._ioctl(pi, dev, IO.VFIO_DEVICE_DETACH_IOMMUFD_PT, arg)

    @rule(pi=PROCS, j=PICK)
    def ioas_alloc(self, pi: int, j: int) -> None:
        fd = self._pick(pi, j, FileKind.IOMMUFD)
        if fd is not None:
            self._ioctl(pi, fd, IO.IOMMU_IOAS_ALLOC, self._struct(pi, S.IOMMU_IOAS_ALLOC.pack(size=12)))

    def _ioas_id(self, pi: int, fd: int, n: int) -> int:
        """An IOAS id of the context behind ``fd`` when there is one (else ``n``)."""
        ctx = getattr(self.procs[pi].fds[fd], "ctx", None)
        ids = [oid for oid, o in sorted(getattr(ctx, "objects", {}).items())
               if getattr(getattr(o, "type", None), "value", "") == "ioas"]
        return ids[n % len(ids)] if ids and n else n

    @rule(pi=PROCS, j=PICK, ioas=st.integers(0, 4), slot=st.integers(0, 3), pages=st.integers(1, 2))
    def ioas_map(self, pi: int, j: int, ioas: int, slot: int, pages: int) -> None:
        fd = self._pick(pi, j, FileKind.IOMMUFD)
        if fd is None:
            return
        ioas = self._ioas_id(pi, fd, ioas)
        buf = self.procs[pi].alloc(pages * 4096)
        arg = self._struct(pi, S.IOMMU_IOAS_MAP.pack(size=40, flags=RW_FIXED, ioas_id=ioas, user_va=buf,
                                                     length=pages * 4096, iova=0x100000 + slot * 0x1000))
        self._ioctl(pi, fd, IO.IOMMU_IOAS_MAP, arg)

    @rule(pi=PROCS, j=PICK, ioas=st.integers(0, 4), slot=st.integers(-1, 3))
    def ioas_unmap(self, pi: int, j: int, ioas: int, slot: int) -> None:
        fd = self._pick(pi, j, FileKind.IOMMUFD)
        if fd is None:
            return
        ioas = self._ioas_id(pi, fd, ioas)
        iova, length = (0, C.U64_MAX) if slot < 0 else (0x100000 + slot * 0x1000, 0x1000)
        arg = self._struct(pi, S.IOMMU_IOAS_UNMAP.pack(size=24, ioas_id=ioas, iova=iova, length=length))
        self._ioctl(pi, fd, IO.IOMMU_IOAS_UNMAP, arg)

    @rule(pi=PROCS, j=PICK, oid=st.integers(0, 7))
    def destroy(self, pi: int, j: int, oid: int) -> None:
        fd = self._pick(pi, j, FileKind.IOMMUFD)
        if fd is not None:
            self._ioctl(pi, fd, IO.IOMMU_DESTROY, self._struct(pi, S.IOMMU_DESTROY.pack(size=8, id=oid)))

    @rule(pi=PROCS, j=PICK, dev=st.integers(0, 7), pt=st.integers(0, 7))
    def hwpt_alloc(self, pi: int, j: int, dev: int, pt: int) -> None:
        fd = self._pick(pi, j, FileKind.IOMMUFD)
        if fd is not None:
            arg = self._struct(pi, S.IOMMU_HWPT_ALLOC.pack(size=24, dev_id=dev, pt_id=pt))
            self._ioctl(pi, fd, IO.IOMMU_HWPT_ALLOC, arg)

    @rule(pi=PROCS, j=PICK, argsz=st.sampled_from([11, 12, 20, 28, 44]))
    def hot_reset_info(self, pi: int, j: int, argsz: int) -> None:
        dev = self._pick(pi, j, FileKind.DEVICE)
        if dev is None:
            return
        arg = self._struct(pi, S.VFIO_PCI_HOT_RESET_INFO.pack(argsz=argsz) + bytes(max(0, argsz - 12)))
        self._ioctl(pi, dev, IO.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, arg)

    @rule(pi=PROCS, j=PICK, mask=st.integers(0, 15), extra=st.booleans())
    def hot_reset(self, pi: int, j: int, mask: int, extra: bool) -> None:
        dev = self._pick(pi, j, FileKind.DEVICE)
        if dev is None:
            return
        foreign = [fd for fd, f in sorted(self.procs[pi].fds.items()) if not isinstance(f, File)]
        cands = self._fds(pi, FileKind.GROUP) + ([*foreign[:1], 9999] if extra else [])
        fds = [fd for i, fd in enumerate(cands) if mask >> i & 1]
        data = S.VFIO_PCI_HOT_RESET.pack(argsz=12 + 4 * len(fds), count=len(fds))
        data += b"".join(struct.pack("<i", fd) for fd in fds)
        self._ioctl(pi, dev, IO.VFIO_DEVICE_PCI_HOT_RESET, self._struct(pi, data))

    @rule(pi=PROCS, g=PICK, c=PICK)
    def set_container(self, pi: int, g: int, c: int) -> None:
        grp = self._pick(pi, g, FileKind.GROUP)
        target = self._pick(pi, c, FileKind.CONTAINER, FileKind.IOMMUFD)
        if c % 7 == 0:  # sometimes any fd of the process
            fds = sorted(self.procs[pi].fds)
            target = fds[c % len(fds)] if fds else None
        if grp is not None:
            arg = self._struct(pi, struct.pack("<i", target if target is not None else c))
            self._ioctl(pi, grp, IO.VFIO_GROUP_SET_CONTAINER, arg)

    @rule(pi=PROCS, g=PICK)
    def unset_container(self, pi: int, g: int) -> None:
        grp = self._pick(pi, g, FileKind.GROUP)
        if grp is not None:
            self._ioctl(pi, grp, IO.VFIO_GROUP_UNSET_CONTAINER, 0)

    @rule(pi=PROCS, c=PICK, typ=st.sampled_from([C.VFIO_TYPE1v2_IOMMU, C.VFIO_TYPE1_IOMMU, 99]))
    def set_iommu(self, pi: int, c: int, typ: int) -> None:
        fd = self._pick(pi, c, FileKind.CONTAINER, FileKind.IOMMUFD)
        if fd is not None:
            self._ioctl(pi, fd, IO.VFIO_SET_IOMMU, typ)

    @rule(pi=PROCS, g=PICK, n=PICK)
    def get_device_fd(self, pi: int, g: int, n: int) -> None:
        grp = self._pick(pi, g, FileKind.GROUP)
        if grp is not None:
            name = self.names[n % len(self.names)]
            self._ioctl(pi, grp, IO.VFIO_GROUP_GET_DEVICE_FD, self._struct(pi, name.encode() + b"\0"))

    @rule(pi=PROCS, g=PICK)
    def group_status(self, pi: int, g: int) -> None:
        grp = self._pick(pi, g, FileKind.GROUP)
        if grp is not None:
            arg = self._struct(pi, S.VFIO_GROUP_STATUS.pack(argsz=8))
            self._ioctl(pi, grp, IO.VFIO_GROUP_GET_STATUS, arg)

    @rule(b=PICK, drv=st.sampled_from(["vfio-pci", "pcieport", "igb", ""]),
          op=st.sampled_from(["override", "bind", "unbind", "probe", "reset"]))
    def sysfs_write(self, b: int, drv: str, op: str) -> None:
        """A write to a driver-core sysfs attribute, as libvirt or a test script
        makes them while the processes hold what they hold. An unbind of a held
        vfio-pci device waits (Blocked) and completes at its last close."""
        bdfs = [p.name for p in self.topo.devices()] + ["0000:7f:00.0"]
        bdf = bdfs[b % len(bdfs)]
        k = self.k
        line = (bdf + "\n").encode()
        fns = {
            "override": lambda: k.driver_override_store(bdf, (drv + "\n").encode()),
            "bind": lambda: k.bind_store(drv or "vfio-pci", line),
            "unbind": lambda: k.unbind_store(drv or "vfio-pci", line),
            "probe": lambda: k.drivers_probe_store(line),
            "reset": lambda: k.reset_store(bdf, b"1\n", 0),
        }
        self._call(fns[op])

    # -- invariants ---------------------------------------------------------
    @invariant()
    def model_invariants(self) -> None:
        assert self.k.check_invariants() == []

    @invariant()
    def one_dma_owner_per_group(self) -> None:
        v = _vfio(self.k)
        if v is None:
            return
        for g in v.iommu_groups.values():
            if g.user_owner_cnt:
                assert g.kernel_owner_cnt == 0, f"group {g.id}: host driver and user both own it"
                assert g.owner is not None
            else:
                assert g.owner is None
        # every cdev-bound device of a group is bound to the group's owner context
        for d in v.devices:
            if d.iommufd_device is not None and d.pdev.iommu_group is not None:
                g = v.iommu_groups[d.pdev.iommu_group]
                assert g.owner is d.iommufd_ictx, f"{d.pdev.name}: bound to a context that does not own its group"

    @invariant()
    def bound_contexts_alive(self) -> None:
        v = _vfio(self.k)
        if v is None:
            return
        for d in v.devices:
            if d.iommufd_ictx is not None:
                assert not d.iommufd_ictx.dead, f"{d.pdev.name} bound to a released context"
                assert d.iommufd_ictx.refs >= 1

    @invariant()
    def no_foreign_reference_leaks(self) -> None:
        for p in self.procs:
            for fd, f in p.fds.items():
                if isinstance(f, FakeOther):
                    assert f.refs == 1, f"pipe fd {fd} has {f.refs} references"

    @invariant()
    def iommufd_ids_unique(self) -> None:
        for ctx in self.ctxs:
            ids = [o.obj_id for o in ctx.objects.values()]
            assert len(ids) == len(set(ids)), f"duplicate ids {ids}"
            assert all(1 <= i <= C.INT_MAX for i in ids)

    def teardown(self) -> None:
        for p in self.procs:
            p.exit()
        assert self.k.check_invariants() == []
        for ctx in self.ctxs:
            assert ctx.dead and ctx.refs == 0 and not ctx.objects, f"context left alive: {ctx}"
        v = _vfio(self.k)
        if v is None:
            return
        for g in v.iommu_groups.values():
            assert g.user_owner_cnt == 0 and g.owner is None, f"iommu group {g.id} still owned"
        for d in v.devices:
            assert d.open_count == 0, f"{d.pdev.name} open_count {d.open_count}"
            assert not d.cdev_opened and d.iommufd_device is None
        for grp in v.groups.values():
            assert grp.opened_file is None, f"group {grp.id} still open"
            assert grp.cdev_device_open_cnt == 0
            assert grp.container is None and grp.iommufd is None


PROFILE = settings(max_examples=30, stateful_step_count=50, derandomize=True, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
                   print_blob=False)


def _machine(topology: str, version: str) -> Any:
    cls = type(f"Machine_{topology.replace('-', '_')}_{version.replace('.', '_')}", (KernelMachine,),
               {"TOPOLOGY": topology, "VERSION": version})
    return cls


TestSharedGroup66 = PROFILE(_machine("shared-group", "6.6")).TestCase
TestDualNic66 = PROFILE(_machine("dual-function-nic", "6.6")).TestCase
TestDualNic612 = PROFILE(_machine("dual-function-nic", "6.12")).TestCase
TestHotplug612 = PROFILE(_machine("hotplug-slot", "6.12")).TestCase
