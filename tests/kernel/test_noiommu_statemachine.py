"""The kernel state machine (test_statemachine.KernelMachine) on fixtures/noiommu.toml:
random call sequences from two processes on a noiommu group, its container
(VFIO_NOIOMMU_IOMMU) or an iommufd, with the invariants after every step and
"a failed call changed nothing" after every failure; some processes lack
CAP_SYS_RAWIO."""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule

from fakedev.kernel.kernel import Kernel
from fakedev.kernel.testing import FakeProcess
from fakedev.kernel.version import KernelVersion
from fakedev.uapi import consts as C
from fakedev.uapi import ioctls as IO
from fakedev.uapi.ioctls import FileKind
from tests.kernel.harness import build_topology
from tests.kernel.test_statemachine import NPROC, PICK, PROCS, PROFILE, KernelMachine


class NoiommuMachine(KernelMachine):
    TOPOLOGY = "noiommu"
    VERSION = "6.18"

    def __init__(self) -> None:
        RuleBasedStateMachine.__init__(self)
        self.topo = build_topology(self.TOPOLOGY)
        self.k = Kernel(self.topo, version=KernelVersion.parse(self.VERSION), noiommu=True)
        # the second process lacks CAP_SYS_RAWIO
        self.procs = [FakeProcess() if i == 0 else FakeProcess(caps=frozenset()) for i in range(NPROC)]
        self.paths = sorted(n.path for n in self.k.nodes())
        self.names = [vd.pdev.name for vd in self.k.vfio_devices()] + ["0000:7f:00.0"]
        self.ctxs: list[Any] = []

    @rule(pi=PROCS, g=PICK, use_iommufd=st.booleans(), iommu=st.sampled_from(
        [C.VFIO_NOIOMMU_IOMMU, C.VFIO_NOIOMMU_IOMMU, C.VFIO_TYPE1v2_IOMMU]))
    def group_session(self, pi: int, g: int, use_iommufd: bool, iommu: int = C.VFIO_NOIOMMU_IOMMU) -> None:
        """open a container (or /dev/iommu) and a noiommu group, SET_CONTAINER, SET_IOMMU, GET_DEVICE_FD."""
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
        if not use_iommufd and self._ioctl(pi, cfd, IO.VFIO_SET_IOMMU, iommu) is None:
            return
        gid = int(gpath.rsplit("-", 1)[1])
        for vd in self.k.vfio_devices():
            if vd.pdev.iommu_group == gid:
                name = self._struct(pi, vd.pdev.name.encode() + b"\0")
                self._ioctl(pi, gfd, IO.VFIO_GROUP_GET_DEVICE_FD, name)


    @rule(pi=PROCS, d=PICK, attach_to=st.integers(0, 3))
    def cdev_session(self, pi: int, d: int, attach_to: int) -> None:
        """a noiommu device has no cdev: its vfioN node does not exist."""
        p = self.procs[pi]
        assert not any(path.startswith("vfio/devices/") for path in self.paths)
        for vd in self.k.vfio_devices():
            path = f"vfio/devices/vfio{vd.index}"
            assert self._call(lambda path=path: p.install(self.k.open(path, p.task()))) is None  # type: ignore[misc]


def _machine(version: str) -> Any:
    return type(f"NoiommuMachine_{version.replace('.', '_')}", (NoiommuMachine,), {"VERSION": version})


TestNoiommu66 = PROFILE(_machine("6.6")).TestCase
TestNoiommu618 = PROFILE(_machine("6.18")).TestCase
