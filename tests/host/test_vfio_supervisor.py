"""Stat mode (fakedev.host.vfio_supervisor): the served kernel model's nodes stat
as char devices, so QEMU's ``open_cdev`` check passes.

A C program below does what upstream QEMU's ``open_cdev`` does: find
``vfio-dev/vfioN`` in the function's sysfs directory, read its ``dev``
("MAJ:MIN"), open ``vfioN`` in the device directory, and require ``fstat`` to
say S_ISCHR with ``st_rdev == MAJ:MIN``. It runs under a supervisor beside the
real FUSE server serving the dual-function NIC tree.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from fakedev.fuse import mount as M
from fakedev.host.server import Server
from fakedev.host.sysfs import generate_sysfs
from fakedev.host.vfio_supervisor import filter_config, start_supervised
from fakedev.kernel.kernel import Kernel
from fakedev.tree import load_tree

pytestmark = pytest.mark.needs_root

ROOT = Path(__file__).resolve().parents[2]

OPEN_CDEV = r"""
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

/* open_cdev VFIO_DEV_DIR DEV_DIR: QEMU's check, step by step */
int main(int argc, char **argv)
{
	if (argc != 3)
		return 2;
	DIR *d = opendir(argv[1]);
	if (!d) { perror("opendir"); return 1; }
	struct dirent *e;
	char name[256] = "";
	while ((e = readdir(d)))
		if (!strncmp(e->d_name, "vfio", 4)) { snprintf(name, sizeof(name), "%s", e->d_name); break; }
	closedir(d);
	if (!name[0]) { printf("no vfio entry\n"); return 1; }
	char path[4096];
	snprintf(path, sizeof(path), "%s/%s/dev", argv[1], name);
	FILE *f = fopen(path, "r");
	unsigned maj, min;
	if (!f || fscanf(f, "%u:%u", &maj, &min) != 2) { printf("bad dev file\n"); return 1; }
	fclose(f);
	snprintf(path, sizeof(path), "%s/%s", argv[2], name);
	struct stat st;
	if (stat(path, &st)) { perror("stat"); return 1; }
	printf("stat %s mode %o rdev %u:%u\n", name, st.st_mode, major(st.st_rdev), minor(st.st_rdev));
	int fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0) { perror("open"); return 1; }
	if (fstat(fd, &st)) { perror("fstat"); return 1; }
	printf("fstat %s mode %o rdev %u:%u\n", name, st.st_mode, major(st.st_rdev), minor(st.st_rdev));
	int ok = S_ISCHR(st.st_mode) && st.st_rdev == makedev(maj, min);
	printf("open_cdev %s\n", ok ? "ok" : "mismatch");
	if (stat(argv[2], &st)) { perror("stat dir"); return 1; }
	printf("dir mode %o\n", st.st_mode);
	snprintf(path, sizeof(path), "%s/%s/dev", argv[1], name);
	if (stat(path, &st)) { perror("stat dev"); return 1; }
	printf("sysfs mode %o\n", st.st_mode);
	close(fd);
	return ok ? 0 : 1;
}
"""


LEGACY = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

/* legacy MOUNT GROUP BDF: the group path to a device fd, at the mount's paths */
int main(int argc, char **argv)
{
	if (argc != 4)
		return 2;
	char path[4096];
	snprintf(path, sizeof(path), "%s/vfio/vfio", argv[1]);
	int c = open(path, O_RDWR);
	snprintf(path, sizeof(path), "%s/vfio/%s", argv[1], argv[2]);
	int g = open(path, O_RDWR);
	if (c < 0 || g < 0) { perror("open"); return 1; }
	uint32_t status[2] = {8, 0};
	if (ioctl(g, 0x3b67, status) || ioctl(g, 0x3b68, &c) || ioctl(c, 0x3b66, 3)) {
		perror("group setup"); return 1;
	}
	int bad = ioctl(g, 0x3b6a, "0000:99:00.0");
	printf("bad %d %d\n", bad, bad < 0 ? errno : 0);
	int p[2];
	if (pipe(p)) return 1;
	int other = ioctl(p[0], 0x3b6a, argv[3]);
	printf("pipe %d %d\n", other, other < 0 ? errno : 0);
	int d = ioctl(g, 0x3b6a, argv[3]);
	if (d < 0) { printf("getfd -1 %d\n", errno); return 1; }
	printf("getfd %d cloexec %d\n", d, (fcntl(d, F_GETFD) & FD_CLOEXEC) ? 1 : 0);
	uint32_t info[6] = {24, 0, 0, 0, 0, 0};
	int r = ioctl(d, 0x3b6b, info);
	printf("info %d flags %u regions %u irqs %u\n", r, info[1], info[2], info[3]);
	snprintf(path, sizeof(path), "%s/.fakedev/state.json", argv[1]);
	FILE *f = fopen(path, "r");
	if (!f) { perror("state"); return 1; }
	printf("state\n");
	char buf[4096];
	size_t n;
	while ((n = fread(buf, 1, sizeof(buf), f)) > 0)
		fwrite(buf, 1, n, stdout);
	fclose(f);
	return 0;
}
"""


def build(tmp_path_factory: pytest.TempPathFactory, name: str, source: str) -> str:
    gcc = shutil.which("gcc")
    assert gcc, f"gcc is needed to build {name}"
    d = tmp_path_factory.mktemp(name)
    (d / f"{name}.c").write_text(source)
    exe = d / name
    subprocess.run(
        [gcc, "-O1", "-Wall", "-Werror", "-o", str(exe), str(d / f"{name}.c")], check=True
    )
    return str(exe)


@pytest.fixture(scope="module")
def legacy(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build(tmp_path_factory, "legacy", LEGACY)


@pytest.fixture(scope="module")
def open_cdev(tmp_path_factory: pytest.TempPathFactory) -> str:
    gcc = shutil.which("gcc")
    assert gcc, "gcc is needed to build the open_cdev client"
    d = tmp_path_factory.mktemp("open_cdev")
    (d / "open_cdev.c").write_text(OPEN_CDEV)
    exe = d / "open_cdev"
    subprocess.run(
        [gcc, "-O1", "-Wall", "-Werror", "-o", str(exe), str(d / "open_cdev.c")], check=True
    )
    return str(exe)


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    m = tmp_path / "mnt"
    m.mkdir()
    yield m
    M.clear_stale(str(m))
    assert not M.mounts_at(str(m))


class Served:
    def __init__(self, kernel: Kernel, server: Server, mount: Path, sys: Path) -> None:
        self.kernel = kernel
        self.server = server
        self.mount = mount
        self.sys = sys


@pytest.fixture
async def served(mnt: Path, tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Served]:
    tree = load_tree(ROOT / "fixtures" / "dual-function-nic.toml")
    kernel = tree.make_kernel()
    index = {v.pdev.name: v.index for v in kernel.vfio_devices()}
    generate_sysfs(tmp_path / "sysroot", tree.topology, kernel.nodes(), index)
    srv = await nursery.start(Server(kernel).serve, str(mnt))
    yield Served(kernel, srv, mnt, tmp_path / "sysroot" / "sys")


async def run(cmd: list[str], served: Served, out_path: Path, stat_mode: bool) -> tuple[int, str]:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            proc, _sup = await start_supervised(nursery, served.server, cmd, stat_mode=stat_mode)
            status = await proc.wait()
            nursery.cancel_scope.cancel()
    return status, out_path.read_text()


def sh(cmd: list[str], out: Path) -> list[str]:
    quoted = " ".join(f"'{a}'" for a in cmd)
    return ["sh", "-c", f"{quoted} > '{out}' 2>&1"]


@pytest.mark.parametrize(
    ("bdf", "vfio", "minor"), [("0000:01:00.0", "vfio0", 0), ("0000:01:00.1", "vfio1", 1)]
)
async def test_open_cdev_check_passes_in_stat_mode(
    served: Served, open_cdev: str, tmp_path: Path, bdf: str, vfio: str, minor: int
) -> None:
    node = next(n for n in served.kernel.nodes() if n.path == f"vfio/devices/{vfio}")
    assert node.minor == minor
    vfio_dev = served.sys / "bus" / "pci" / "devices" / bdf / "vfio-dev"
    assert (vfio_dev / vfio / "dev").read_text() == f"{node.major}:{node.minor}\n"
    out = tmp_path / "out"
    cmd = sh([open_cdev, str(vfio_dev), str(served.mount / "vfio" / "devices")], out)
    status, text = await run(cmd, served, out, stat_mode=True)
    assert status == 0, text
    lines = text.splitlines()
    chr_mode = f"{stat.S_IFCHR | node.mode:o}"
    assert lines[0] == f"stat {vfio} mode {chr_mode} rdev {node.major}:{node.minor}", text
    assert lines[1] == f"fstat {vfio} mode {chr_mode} rdev {node.major}:{node.minor}", text
    assert lines[2] == "open_cdev ok"
    # neither a directory of the mount nor a file elsewhere is touched
    assert lines[3] == f"dir mode {stat.S_IFDIR | 0o755:o}"
    assert lines[4] == f"sysfs mode {stat.S_IFREG | 0o444:o}"
    # the client's open was the model's, and was released when it exited
    dev = next(d for d in served.kernel.describe()["devices"] if d["bdf"] == bdf)
    assert dev["cdev_files"] == 0 and served.server.releases == 1


async def test_without_stat_mode_the_check_fails(
    served: Served, open_cdev: str, tmp_path: Path
) -> None:
    vfio_dev = served.sys / "bus" / "pci" / "devices" / "0000:01:00.0" / "vfio-dev"
    out = tmp_path / "out"
    cmd = sh([open_cdev, str(vfio_dev), str(served.mount / "vfio" / "devices")], out)
    status, text = await run(cmd, served, out, stat_mode=False)
    assert status == 1, text
    assert f"fstat vfio0 mode {stat.S_IFREG | 0o600:o} rdev 0:0" in text
    assert "open_cdev mismatch" in text


async def test_every_node_maps_to_its_devnode(served: Served) -> None:
    def inos() -> dict[str, int]:
        return {n.path: os.stat(served.mount / n.path).st_ino for n in served.kernel.nodes()}

    by_path = await trio.to_thread.run_sync(inos)
    for n in served.kernel.nodes():
        assert served.server.devnode_for_ino(by_path[n.path]) == n
    root_ino = await trio.to_thread.run_sync(lambda: os.stat(served.mount).st_ino)
    assert served.server.devnode_for_ino(root_ino) is None


async def test_group_get_device_fd_binds_the_models_file_to_a_devfd_open(
    served: Served, legacy: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    cmd = sh([legacy, str(served.mount), "13", "0000:01:00.0"], out)
    status, text = await run(cmd, served, out, stat_mode=False)
    assert status == 0, text
    head, state_text = text.split("state\n", 1)
    lines = head.splitlines()
    assert lines[0] == f"bad -1 {errno.ENODEV}"  # the model's errno, through the supervisor
    assert lines[1] == f"pipe -1 {errno.ENOTTY}"  # not ours: the real kernel answered
    getfd, _fd, cloexec, flag = lines[2].split()
    assert getfd == "getfd" and cloexec == "cloexec" and flag == "1"
    # VFIO_DEVICE_FLAGS_PCI without RESET (no FLR, PM No_Soft_Reset), 9 regions, 5 irqs
    assert lines[3] == "info 0 flags 2 regions 9 irqs 5"
    # while the client held it, the model saw a group-opened device file
    state = json.loads(state_text)
    dev = next(d for d in state["devices"] if d["bdf"] == "0000:01:00.0")
    assert dev["open_count"] == 1 and not dev["cdev_opened"] and dev["cdev_files"] == 0, dev
    g13 = next(g for g in state["groups"] if g["id"] == 13)
    assert g13["open"] and g13["container_iommu"], g13
    # after the client exited, every open (container, group, device) was released
    with trio.fail_after(10):
        while served.server.open_files:
            await trio.sleep(0.01)
    assert not served.server._unbound  # the devfd open of the failed call was dropped
    after = served.kernel.describe()
    assert next(d for d in after["devices"] if d["bdf"] == "0000:01:00.0")["open_count"] == 0
    assert served.kernel.check_invariants() == []


async def test_devfd_open_never_bound_is_dropped(served: Served) -> None:
    def open_close() -> int:
        fd = os.open(served.mount / ".fakedev" / "devfd", os.O_RDWR)
        try:
            os.read(fd, 4)
        except OSError as exc:
            return exc.errno or 0
        finally:
            os.close(fd)
        return 0

    assert await trio.to_thread.run_sync(open_close) == errno.EBADF
    with trio.fail_after(10):
        while served.server._unbound:
            await trio.sleep(0.01)
    assert served.server.open_files == 0


def test_filter_traps_only_what_is_asked() -> None:
    assert filter_config(ioctls=False, stat_mode=True).ioctl_cmds == ()
    assert filter_config(ioctls=False, stat_mode=True).stat
    cfg = filter_config(ioctls=True, stat_mode=False)
    assert cfg.ioctl_cmds == (0x3B6A,) and not cfg.stat
