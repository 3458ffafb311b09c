"""Random call sequences against the model: only KernelError ever escapes, the
invariants hold after every call, and a failed call leaves describe() unchanged."""

from __future__ import annotations

import copy
import random
import struct

import pytest

from fakedev.kernel.errors import KernelError
from fakedev.kernel.file import File
from fakedev.uapi import consts as C
from fakedev.uapi import ioctls as IO
from fakedev.uapi import structs as S
from tests.kernel import topologies as T
from tests.kernel.conftest import Rig

PATHS = ("vfio/vfio", "iommu", "vfio/devices/vfio0", "vfio/devices/vfio1", "vfio/13", "vfio/14", "vfio/30")
DEVICE_CMDS = [io.cmd for io in IO.IOCTLS if IO.FileKind.DEVICE in io.kinds]


def _arg(rng: random.Random, r: Rig, pname: str, cmd: int, fds: list[int]) -> int:
    p = r[pname]
    fd = rng.choice([*fds, -1, 99]) if fds else rng.choice([-1, 99])
    argsz = rng.choice([0, 8, 11, 12, 16, 20, 24, 28, 32, 40, 64])
    flags = rng.choice([0, 0, 0, 1, 2, 3, 0x21, 0x24, 0x22, 0x11, C.VFIO_DEVICE_FEATURE_GET | 1,
                        C.VFIO_DEVICE_FEATURE_SET | 3, C.VFIO_DEVICE_FEATURE_PROBE | 5])
    if cmd == IO.VFIO_DEVICE_BIND_IOMMUFD:
        body = S.VFIO_DEVICE_BIND_IOMMUFD.pack(argsz=rng.choice([16, 24, 12]), flags=rng.choice([0, 0, 1]),
                                               iommufd=fd)
    elif cmd == IO.VFIO_DEVICE_PCI_HOT_RESET:
        n = rng.choice([0, 0, 1, 2, 3])
        body = struct.pack("<III", rng.choice([12, 16, 20]), rng.choice([0, 0, 1]), n)
        body += b"".join(struct.pack("<i", rng.choice([*fds, 99]) if fds else 99) for _ in range(n))
    elif cmd == IO.VFIO_GROUP_SET_CONTAINER:
        body = struct.pack("<i", fd)
    elif cmd == IO.VFIO_GROUP_GET_DEVICE_FD:
        body = rng.choice([b"0000:01:00.0\0", b"0000:01:00.1\0", b"bogus\0", b"0000:01:00.0 vf_token=x\0"])
    elif cmd == IO.VFIO_DEVICE_SET_IRQS:
        count = rng.choice([0, 1, 2])
        body = struct.pack("<IIIII", 20 + 4 * count, flags | rng.choice([0x20, 0x8, 0x10]),
                           rng.choice([0, 1, 2, 3, 4, 5]), rng.choice([0, 1]), count)
        body += b"".join(struct.pack("<i", rng.choice([*fds, -1]) if fds else -1) for _ in range(count))
    else:
        body = struct.pack("<II", argsz, flags) + bytes(rng.choice([0, 4, 8, 16, 56]))
        if len(body) >= 12:
            body = body[:8] + struct.pack("<I", rng.choice([0, 1, 2, 3, 6, 7, 8, 9])) + body[12:]
    if rng.random() < 0.05:
        return 0x10  # unmapped
    return p.buf(body)


def _smart(rng: random.Random, r: Rig, pname: str, fds: list[int]) -> None:
    """One well-formed call with a random choice of the caller's fds."""
    p = r[pname]
    kinds = {fd: p.file(fd).kind for fd in fds}

    def pick(kind: IO.FileKind) -> int:
        c = [fd for fd, k in kinds.items() if k is kind]
        return rng.choice(c) if c else rng.choice(fds)

    D, G, IFD, K = IO.FileKind.DEVICE, IO.FileKind.GROUP, IO.FileKind.IOMMUFD, IO.FileKind.CONTAINER
    what = rng.randrange(11)
    if what == 0:
        p.bind(pick(D), pick(IFD))
    elif what == 1:
        g = pick(G)
        p.ioctl(g, IO.VFIO_GROUP_SET_CONTAINER, p.buf(struct.pack("<i", rng.choice([pick(K), pick(IFD)]))))
    elif what == 2:
        p.ioctl(pick(K), IO.VFIO_SET_IOMMU, C.VFIO_TYPE1v2_IOMMU)
    elif what == 3:
        p.get_device_fd(pick(G), rng.choice(["0000:01:00.0", "0000:01:00.1", "0000:05:00.0", "0000:05:00.1"]))
    elif what == 4:
        p.attach(pick(D), rng.choice([1, 2, 3, 4]))
    elif what == 5:
        p.ioas_alloc(pick(IFD))
    elif what == 6:
        err, _, _ = p.hot_reset_info(pick(D))
        if err:
            raise KernelError(err)
    elif what == 7:
        gs = [fd for fd, k in kinds.items() if k is G]
        p.hot_reset(pick(D), rng.sample(gs, k=min(len(gs), rng.randrange(3))) if gs else [])
    elif what == 8:
        efd, _ = p.p.eventfd()
        body = S.VFIO_IRQ_SET.pack(argsz=24, flags=C.VFIO_IRQ_SET_DATA_EVENTFD | C.VFIO_IRQ_SET_ACTION_TRIGGER,
                                   index=rng.choice([0, 1, 2, 3, 4]), start=0, count=1) + struct.pack("<i", efd)
        try:
            p.ioctl(pick(D), IO.VFIO_DEVICE_SET_IRQS, p.buf(body))
        finally:
            p.close(efd)
    elif what == 9:
        p.detach(pick(D))
    else:
        p.ioctl(pick(G), IO.VFIO_GROUP_UNSET_CONTAINER, 0)


@pytest.mark.parametrize("seed", range(6))
def test_random_sequences(seed: int) -> None:
    rng = random.Random(seed)
    topo = ("dual-function-nic", "shared-group", "hotplug-slot")[seed % 3]
    r = Rig(topo, ("6.6", "6.12")[seed % 2])
    assert T.build(topo) is not None
    for _ in range(400):
        pname = rng.choice("pq")
        p = r[pname]
        fds = sorted(fd for fd, f in p.p.fds.items() if isinstance(f, File))
        op = rng.random()
        before = copy.deepcopy(r.k.describe())
        failed = False
        try:
            if op < 0.2 or not fds:
                p.open(rng.choice(PATHS))
            elif op < 0.3:
                p.close(rng.choice(fds))
            elif op < 0.6:
                _smart(rng, r, pname, fds)
            elif op < 0.65:
                fd = rng.choice(fds)
                f = p.file(fd)
                if rng.random() < 0.5:
                    f.read(p.t, rng.choice([0, 7 << 40, 6 << 40, 3 << 40, (7 << 40) + 0x3C]), rng.choice([1, 2, 4, 8]))
                else:
                    f.write(p.t, rng.choice([0x10, (7 << 40) + 4, (7 << 40) + 0x10, (2 << 40)]), b"\xff\xff\xff\xff")
            else:
                fd = rng.choice(fds)
                kind = p.file(fd).kind
                cands = [io.cmd for io in IO.IOCTLS if kind in io.kinds]
                cmd = rng.choice([*cands, IO.VFIO_DEVICE_BIND_IOMMUFD, 15359])
                arg = cmd if cmd in (IO.VFIO_CHECK_EXTENSION, IO.VFIO_SET_IOMMU) else _arg(rng, r, pname, cmd, fds)
                if cmd in (IO.VFIO_CHECK_EXTENSION, IO.VFIO_SET_IOMMU):
                    arg = rng.choice([1, 3, 8, 9, 10])
                p.ioctl(fd, cmd, arg)
        except KernelError:
            failed = True
        assert r.k.check_invariants() == []
        if failed and op >= 0.3:
            assert r.k.describe() == before
    for name in "pq":
        r[name].p.exit()
    assert r.k.check_invariants() == []
    snap = r.k.describe()
    assert all(d["open_count"] == 0 for d in snap["devices"])
    assert all(not g["open"] for g in snap["groups"])
    assert all(g["owner_cnt"] == 0 for g in snap["iommu_groups"].values())
