"""The call trace (fakedev.host.trace): struct decoding bounded by argsz, the
hot-reset arrays, open numbers, and the text of every kind of record; then the
real kernel model served through FUSE to a legacy-path C client under the
seccomp supervisor, with the trace on."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from fakedev.fuse import mount as M
from fakedev.host.server import Server
from fakedev.host.trace import Tracer, decode_info_entries, decode_struct, format_record
from fakedev.host.vfio_supervisor import start_supervised
from fakedev.tree import load_tree
from fakedev.uapi import structs as S

ROOT = Path(__file__).resolve().parents[2]


def reader(buf: bytes) -> Any:
    """A ``read(addr, size)`` over ``buf`` at address 0x1000 (EFAULT outside it)."""
    from fakedev.kernel.errors import KernelError

    def read(addr: int, size: int) -> bytes:
        off = addr - 0x1000
        if off < 0 or off + size > len(buf):
            raise KernelError(errno.EFAULT)
        return buf[off:off + size]

    return read


# -- decoding ---------------------------------------------------------------------------

def test_struct_is_read_only_as_far_as_argsz() -> None:
    # argsz 8 and nothing mapped after it: the fields past argsz are absent, never read
    mem = S.VFIO_DEVICE_INFO.pack(argsz=8, flags=3)[:8]
    vals, absent = decode_struct(S.VFIO_DEVICE_INFO, reader(mem), 0x1000)
    assert vals == {"argsz": 8, "flags": 3}
    assert absent == ["num_regions", "num_irqs", "cap_offset", "pad"]


def test_6_6_sized_bind_shows_the_token_absent() -> None:
    mem = S.VFIO_DEVICE_BIND_IOMMUFD.pack(argsz=16, iommufd=5)[:16]
    vals, absent = decode_struct(S.VFIO_DEVICE_BIND_IOMMUFD, reader(mem), 0x1000)
    assert vals["iommufd"] == 5 and absent == ["token_uuid_ptr"]


def test_argsz_larger_than_the_struct_reads_the_struct() -> None:
    mem = S.IOMMU_IOAS_ALLOC.pack(size=12, out_ioas_id=7) + b"\xff" * 20
    vals, absent = decode_struct(S.IOMMU_IOAS_ALLOC, reader(mem), 0x1000, 32)
    assert vals == {"size": 12, "flags": 0, "out_ioas_id": 7} and absent == []


def test_info_entries_by_devid_and_by_group() -> None:
    el = S.VFIO_PCI_DEPENDENT_DEVICE
    entries = (el.pack(devid=2, segment=0, bus=1, devfn=0) + el.pack(devid=0xFFFFFFFF, segment=0, bus=1, devfn=1)
               + el.pack(devid=0, segment=1, bus=0x3a, devfn=(0x1f << 3) | 7))
    hdr = {"argsz": 12 + 3 * 8, "flags": 3, "count": 3}
    mem = S.VFIO_PCI_HOT_RESET_INFO.pack(hdr) + entries
    got = decode_info_entries(reader(mem), 0x1000, hdr, hdr["argsz"])
    assert [(e["bdf"], e["devid"]) for e in got] == [
        ("0000:01:00.0", 2), ("0000:01:00.1", 0xFFFFFFFF), ("0001:3a:1f.7", 0)]
    # without DEV_ID the same bytes are group ids; argsz bounds how many were written
    legacy = {"argsz": 12 + 2 * 8, "flags": 0, "count": 3}
    got = decode_info_entries(reader(mem), 0x1000, legacy, legacy["argsz"])
    assert [(e["bdf"], e["group_id"]) for e in got] == [("0000:01:00.0", 2), ("0000:01:00.1", 0xFFFFFFFF)]


# -- text -------------------------------------------------------------------------------

def ioctl_rec(name: str, request: Any, result_struct: Any = None, **kw: Any) -> dict[str, Any]:
    rec = {"op": "ioctl", "pid": 7, "fd": 5, "open": 3, "node": "vfio0", "name": name,
           "request": request, "absent": [], "result_struct": result_struct, "result": 0, "errno": None}
    rec.update(kw)
    return rec


def test_hot_reset_group_fds_are_printed_with_what_they_refer_to() -> None:
    req = {"argsz": 24, "flags": 0, "count": 3, "group_fds": [
        {"fd": 12, "path": "/dev/vfio/13", "ref": "group 13"},
        {"fd": 4, "path": "pipe:[77]", "ref": "not a VFIO file"},
        {"fd": 99, "ref": "EBADF"}]}
    line = format_record(ioctl_rec("VFIO_DEVICE_PCI_HOT_RESET", req, result=None, errno="EINVAL"))
    assert line == ("[pid 7] VFIO_DEVICE_PCI_HOT_RESET(fd=5 open#3 vfio0, {argsz=24, flags=0, count=3, "
                    "group_fds=[fd 12 -> /dev/vfio/13 (group 13), fd 4 -> pipe:[77] (not a VFIO file), "
                    "fd 99 (EBADF)]}) = -1 EINVAL")


def test_zero_length_reset_shows_an_empty_array() -> None:
    req = {"argsz": 12, "flags": 0, "count": 0, "group_fds": []}
    line = format_record(ioctl_rec("VFIO_DEVICE_PCI_HOT_RESET", req, dict(req)))
    assert line == "[pid 7] VFIO_DEVICE_PCI_HOT_RESET(fd=5 open#3 vfio0, {argsz=12, flags=0, count=0, group_fds=[]}) = 0"


def test_group_fd_past_argsz_and_a_long_array_are_marked() -> None:
    req = {"argsz": 16, "flags": 0, "count": 100, "group_fds": [
        {"fd": 3, "path": "/dev/vfio/13", "ref": "group 13"},
        {"fd": 4, "path": "/dev/vfio/14", "ref": "group 14", "past_argsz": True}], "group_fds_more": 98}
    line = format_record(ioctl_rec("VFIO_DEVICE_PCI_HOT_RESET", req))
    assert "fd 4 -> /dev/vfio/14 (group 14) past argsz, ... 98 more]" in line


def test_info_result_names_flags_and_devids() -> None:
    req = {"argsz": 28, "flags": 0, "count": 0}
    out = {"argsz": 28, "flags": 3, "count": 2, "devices": [
        {"bdf": "0000:01:00.0", "devid": 2}, {"bdf": "0000:01:00.1", "devid": 0xFFFFFFFF}]}
    line = format_record(ioctl_rec("VFIO_DEVICE_GET_PCI_HOT_RESET_INFO", req, out))
    assert line.endswith(" = 0 => {argsz=28, flags=0x3 (DEV_ID|DEV_ID_OWNED), count=2, devices=[0000:01:00.0 "
                         "devid=2, 0000:01:00.1 devid=VFIO_PCI_DEVID_NOT_OWNED]}")
    out = {"argsz": 28, "flags": 1, "count": 1, "devices": [{"bdf": "0000:01:00.1", "devid": 0}]}
    line = format_record(ioctl_rec("VFIO_DEVICE_GET_PCI_HOT_RESET_INFO", req, out))
    assert "flags=0x1 (DEV_ID), count=1, devices=[0000:01:00.1 devid=VFIO_PCI_DEVID_OWNED]" in line
    # an ENOSPC probe: the count the kernel wrote back is shown
    probe = {"argsz": 12, "flags": 3, "count": 2}
    line = format_record(ioctl_rec("VFIO_DEVICE_GET_PCI_HOT_RESET_INFO", {"argsz": 12, "flags": 0, "count": 0},
                                   probe, result=None, errno="ENOSPC"))
    assert line.endswith("= -1 ENOSPC => {argsz=12, flags=0x3 (DEV_ID|DEV_ID_OWNED), count=2}")


def test_absent_fields_and_open_release_lines() -> None:
    rec = ioctl_rec("VFIO_DEVICE_GET_INFO", {"argsz": 4}, absent=["flags", "num_regions"], result=None,
                    errno="EINVAL")
    assert format_record(rec) == ("[pid 7] VFIO_DEVICE_GET_INFO(fd=5 open#3 vfio0, {argsz=4, flags=<absent>, "
                                  "num_regions=<absent>}) = -1 EINVAL")
    assert format_record({"op": "open", "pid": 7, "path": "/dev/vfio/13", "node": "13", "open": 9,
                          "fd": None, "result": 0, "errno": None}) == "[pid 7] open(/dev/vfio/13) = open#9"
    assert format_record({"op": "open", "pid": 7, "path": "/dev/vfio/13", "node": "vfio/13", "open": None,
                          "fd": None, "result": None, "errno": "EBUSY"}) == "[pid 7] open(/dev/vfio/13) = -1 EBUSY"
    assert format_record({"op": "release", "pid": 0, "node": "13", "open": 9, "fd": None, "result": 0,
                          "errno": None}) == "[pid 0] release(open#9 13) = 0"
    assert format_record({"op": "read", "pid": 7, "fd": None, "open": 9, "node": "vfio0", "offset": 7 << 40,
                          "size": 4, "result": 4, "errno": None}) == "[pid 7] pread(fd=? open#9 vfio0, 4, 0x70000000000) = 4"


def test_supervisor_device_fd_record() -> None:
    rec = {"op": "ioctl", "pid": 7, "fd": 6, "open": 4, "node": "13", "name": "VFIO_GROUP_GET_DEVICE_FD",
           "request": "0000:01:00.0", "absent": [], "result_struct": None, "result": 9, "errno": None,
           "new_open": 11, "new_node": "0000:01:00.0", "via": "supervisor"}
    assert format_record(rec) == ('[pid 7] VFIO_GROUP_GET_DEVICE_FD(fd=6 open#4 13, "0000:01:00.0") = 9 '
                                  "(open#11 0000:01:00.0) [supervisor]")
    rec.update(result=None, errno="ENODEV", new_open=None)
    assert format_record(rec).endswith('"0000:01:00.0") = -1 ENODEV [supervisor]')


def test_tracer_writes_the_same_line_to_text_and_json(tmp_path: Path) -> None:
    t = Tracer(str(tmp_path / "t.jsonl"), str(tmp_path / "t.txt"), enabled=True)

    class Task:
        tid = 42

    class F:
        label = "13"

    t.release(Task(), 9, F())  # type: ignore[arg-type]
    t.close()
    rec = json.loads((tmp_path / "t.jsonl").read_text())
    assert (tmp_path / "t.txt").read_text() == format_record(rec) + "\n" == "[pid 42] release(open#9 13) = 0\n"


# -- served, under the supervisor ---------------------------------------------------------------

LEGACY = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

static int at(const char *mnt, const char *node)
{
	char path[4096];
	snprintf(path, sizeof(path), "%s/%s", mnt, node);
	return open(path, O_RDWR);
}

static int reset(int d, int n, const int *fds, uint32_t argsz)
{
	uint32_t buf[8] = {argsz, 0, (uint32_t)n};
	memcpy(&buf[3], fds, sizeof(int) * n);
	int r = ioctl(d, 0x3b71, buf);
	return r < 0 ? errno : r;
}

/* trace MOUNT: two opens of the container node, two groups, a device fd
   through the supervisor, INFO, and resets with good and bad group fds */
int main(int argc, char **argv)
{
	if (argc != 2)
		return 2;
	int c = at(argv[1], "vfio/vfio"), c2 = at(argv[1], "vfio/vfio");
	int g13 = at(argv[1], "vfio/13"), g14 = at(argv[1], "vfio/14");
	if (c < 0 || c2 < 0 || g13 < 0 || g14 < 0) { perror("open"); return 1; }
	if (ioctl(g13, 0x3b68, &c) || ioctl(g14, 0x3b68, &c) || ioctl(c, 0x3b66, 3)) {
		perror("setup"); return 1;
	}
	ioctl(c2, 0x3b64);  /* VFIO_GET_API_VERSION on the second open */
	char byte;
	if (pread(c2, &byte, 1, 0) >= 0) { printf("read the container?\n"); return 1; }
	int bad = ioctl(g13, 0x3b6a, "0000:99:00.0");
	int d = ioctl(g13, 0x3b6a, "0000:01:00.0");
	if (d < 0 || bad >= 0) { perror("getfd"); return 1; }
	uint32_t info[3 + 2 * 4] = {sizeof(info), 0, 0};
	int ri = ioctl(d, 0x3b70, info);
	int p[2];
	if (pipe(p)) return 1;
	int both[2] = {g13, g14}, piped[2] = {g13, p[0]}, badfd[2] = {g13, 999};
	int r1 = reset(d, 2, both, 20);
	int r2 = reset(d, 2, piped, 20);
	int r3 = reset(d, 2, badfd, 20);
	int r4 = reset(d, 0, both, 12);
	printf("fds %d %d %d %d %d %d\n", c, c2, g13, g14, d, p[0]);
	printf("results %d %d %d %d %d\n", ri, r1, r2, r3, r4);
	return 0;
}
"""


@pytest.fixture(scope="module")
def legacy_client(tmp_path_factory: pytest.TempPathFactory) -> str:
    gcc = shutil.which("gcc")
    assert gcc, "gcc is needed to build the trace client"
    d = tmp_path_factory.mktemp("trace_client")
    (d / "trace.c").write_text(LEGACY)
    subprocess.run([gcc, "-O1", "-Wall", "-Werror", "-o", str(d / "trace"), str(d / "trace.c")], check=True)
    return str(d / "trace")


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    m = tmp_path / "mnt"
    m.mkdir()
    yield m
    M.clear_stale(str(m))
    assert not M.mounts_at(str(m))


@pytest.fixture
async def traced(mnt: Path, tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Server]:
    kernel = load_tree(ROOT / "fixtures" / "dual-function-nic.toml").make_kernel()
    tracer = Tracer(str(tmp_path / "trace.jsonl"), str(tmp_path / "trace.txt"), enabled=True)
    srv = await nursery.start(Server(kernel, tracer=tracer).serve, str(mnt))
    yield srv
    tracer.close()


@pytest.mark.needs_root
async def test_legacy_sequence_under_the_supervisor(traced: Server, mnt: Path, tmp_path: Path,
                                                    legacy_client: str) -> None:
    out = tmp_path / "out"
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            proc, _sup = await start_supervised(
                nursery, traced, ["sh", "-c", f"'{legacy_client}' '{mnt}' > '{out}' 2>&1"])
            status = await proc.wait()
            nursery.cancel_scope.cancel()
        while traced.open_files:
            await trio.sleep(0.01)
    assert status == 0, out.read_text()
    fds_line, results_line = out.read_text().splitlines()
    c, c2, g13, g14, d, pipe = (int(x) for x in fds_line.split()[1:])
    ri, r1, r2, r3, r4 = (int(x) for x in results_line.split()[1:])
    assert (ri, r1, r2, r3, r4) == (0, 0, errno.EINVAL, errno.EBADF, errno.EINVAL)
    traced.tracer.flush()
    recs = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    text = (tmp_path / "trace.txt").read_text().splitlines()
    assert text == [format_record(r) for r in recs]

    # every open has its number; the two opens of vfio/vfio are told apart
    opens = {r["open"]: r for r in recs if r["op"] == "open"}
    containers = [n for n, r in opens.items() if r["path"] == "/dev/vfio/vfio"]
    assert len(containers) == 2
    by_name = {}
    for r in recs:
        if r["op"] == "ioctl":
            by_name.setdefault(r["name"], []).append(r)
    set_iommu = by_name["VFIO_SET_IOMMU"][0]
    version = by_name["VFIO_GET_API_VERSION"][0]
    assert (set_iommu["fd"], version["fd"]) == (c, c2)
    assert {set_iommu["open"], version["open"]} == set(containers)
    # a read (served on the loop until the fd lookup needs a worker) names the second open too
    read = next(r for r in recs if r["op"] == "read")
    assert (read["fd"], read["open"], read["errno"] is not None) == (c2, version["open"], True)
    released = {r["open"] for r in recs if r["op"] == "release"}
    assert set(opens) <= released

    # GROUP_GET_DEVICE_FD answered by the supervisor: both calls recorded
    getfd = by_name["VFIO_GROUP_GET_DEVICE_FD"]
    assert [(r["request"], r["fd"], r["result"], r["errno"], r["via"]) for r in getfd] == [
        ("0000:99:00.0", g13, None, "ENODEV", "supervisor"), ("0000:01:00.0", g13, d, None, "supervisor")]
    dev_open = getfd[1]["new_open"]
    assert getfd[1]["open"] == next(r["open"] for r in by_name["VFIO_GROUP_SET_CONTAINER"] if r["fd"] == g13)
    assert any(line.endswith(f'VFIO_GROUP_GET_DEVICE_FD(fd={g13} open#{getfd[1]["open"]} 13, "0000:01:00.0")'
                             f" = {d} (open#{dev_open} 0000:01:00.0) [supervisor]") for line in text), text

    # INFO on the group-opened device: group ids, both entries
    info = by_name["VFIO_DEVICE_GET_PCI_HOT_RESET_INFO"][0]
    assert (info["fd"], info["open"]) == (d, dev_open)
    assert [(e["bdf"], e["group_id"]) for e in info["result_struct"]["devices"]] == [
        ("0000:01:00.0", 13), ("0000:01:00.1", 14)]

    # the group fds of each reset, with what they are
    resets = by_name["VFIO_DEVICE_PCI_HOT_RESET"]
    g = [[(e["fd"], e.get("path"), e["ref"]) for e in r["request"]["group_fds"]] for r in resets]
    path13, path14 = g[0][0][1], g[0][1][1]  # as the caller sees them (the mount's paths here)
    assert path13.endswith("/vfio/13") and path14.endswith("/vfio/14")
    assert g == [
        [(g13, path13, "group 13"), (g14, path14, "group 14")],
        [(g13, path13, "group 13"), (pipe, g[1][1][1], "not a VFIO file")],
        [(g13, path13, "group 13"), (999, None, "EBADF")],
        [],
    ]
    assert g[1][1][1].startswith("pipe:[")
    assert [r["errno"] for r in resets] == [None, "EINVAL", "EBADF", "EINVAL"]
    reset_lines = [line for line in text if "VFIO_DEVICE_PCI_HOT_RESET(" in line]
    assert f"group_fds=[fd {g13} -> {path13} (group 13), fd {g14} -> {path14} (group 14)]}}) = 0" in reset_lines[0]
    assert "fd 999 (EBADF)]" in reset_lines[2]
    assert reset_lines[3].endswith("count=0, group_fds=[]}) = -1 EINVAL")
