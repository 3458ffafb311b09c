"""Round-trip cost of a call served through FUSE: fakedev vs a minimal C server.

Three calls, each timed per call in a C client (clock_gettime around the
syscall): a GET_INFO-like ioctl (struct read and written in the caller's
memory), a BIND-like ioctl whose struct carries an fd the server must resolve
(pidfd_getfd + the identity ioctl), and a 4-byte pread of a region. With 1
and 8 client threads. The C baseline (benchmarks/c_fuse_server.c, libfuse3
low-level API, multi-threaded loop) does the same work per call.

Run as root:  .venv/bin/python benchmarks/fuse_roundtrip.py [--iters N] [--write]
(--write replaces benchmarks/RESULTS.md). Needs gcc and libfuse3-dev.
"""

from __future__ import annotations

import argparse
import errno
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

CLIENT_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>
struct thr { int dev, iommu, iters, mode; uint32_t *lat; int fails; };
static uint64_t now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + t.tv_nsec; }
static void *run(void *p) {
    struct thr *t = p;
    for (int i = 0; i < t->iters; i++) {
        uint32_t info[6] = { 24 }, bind[4] = { 16, 0, (uint32_t)t->iommu, 0 }, v = 0;
        uint64_t t0 = now();
        int ok;
        if (t->mode == 0) ok = ioctl(t->dev, 0x3b6b, info) == 0 && info[2] == 9;
        else if (t->mode == 1) ok = ioctl(t->dev, 0x3b76, bind) == 0 && bind[3] >= 1000;
        else ok = pread(t->dev, &v, 4, 7ull << 40) == 4 && v == 0x153a8086;
        t->lat[i] = (uint32_t)((now() - t0) / 10);  /* units of 10 ns */
        if (!ok) t->fails++;
    }
    return NULL;
}
int main(int argc, char **argv) {
    const char *dev = argv[1], *iommu = argv[2];
    int mode = atoi(argv[3]), nthr = atoi(argv[4]), iters = atoi(argv[5]);
    int d = open(dev, O_RDWR), io = open(iommu, O_RDWR);
    if (d < 0 || io < 0) { perror("open"); return 2; }
    pthread_t th[64]; struct thr t[64];
    for (int i = 0; i < 50; i++) { uint32_t info[6] = { 24 }; ioctl(d, 0x3b6b, info); }  /* warm up */
    uint64_t t0 = now();
    for (int i = 0; i < nthr; i++) {
        t[i] = (struct thr){ d, io, iters, mode, calloc(iters, 4), 0 };
        pthread_create(&th[i], NULL, run, &t[i]);
    }
    int fails = 0;
    for (int i = 0; i < nthr; i++) { pthread_join(th[i], NULL); fails += t[i].fails; }
    uint64_t wall = now() - t0;
    printf("%llu %d\n", (unsigned long long)wall, fails);
    for (int i = 0; i < nthr; i++)
        fwrite(t[i].lat, 4, iters, stdout);
    return 0;
}
"""

MODES = {0: "GET_INFO ioctl", 1: "fd-resolving ioctl (BIND)", 2: "4-byte pread"}


def serve_fakedev(mountpoint: str) -> None:
    """The fakedev side: a kernel with one device and /dev/iommu, served until killed."""
    import trio

    from fakedev.host.server import Server
    from fakedev.kernel.errors import KernelError
    from fakedev.kernel.file import DevNode, File
    from fakedev.kernel.task import Task
    from fakedev.uapi import ioctls as I
    from fakedev.uapi.ioctls import FileKind

    hdr = struct.Struct("<II")
    info = struct.Struct("<IIII").pack(24, 2, 9, 5)
    bind_s = struct.Struct("<IIiI")

    class Iommu(File):
        kind = FileKind.IOMMUFD
        label = "iommu"

        def __init__(self, n: int) -> None:
            self.n = n

    class Dev(File):
        kind = FileKind.DEVICE
        label = "vfio0"
        regs = bytes([0x86, 0x80, 0x3A, 0x15]) + bytes(4092)

        def ioctl(self, task: Task, cmd: int, arg: int) -> int:
            if cmd == I.VFIO_DEVICE_GET_INFO:
                argsz, _ = hdr.unpack(task.read(arg, 8))
                if argsz < 16:
                    raise KernelError(errno.EINVAL)
                task.write(arg, info)
                return 0
            if cmd == I.VFIO_DEVICE_BIND_IOMMUFD:
                argsz, flags, fd, _ = bind_s.unpack(task.read(arg, 16))
                if argsz < 16 or flags:
                    raise KernelError(errno.EINVAL)
                f = task.fget(fd)
                if not isinstance(f, Iommu):
                    if not isinstance(f, File):
                        f.close()
                    raise KernelError(errno.EBADF)
                task.write(arg + 12, (1000 + f.n).to_bytes(4, "little"))
                return 0
            raise KernelError(errno.ENOTTY)

        def read(self, task: Task, offset: int, size: int) -> bytes:
            off = offset & ((1 << 40) - 1)
            if offset >> 40 != 7 or off + size > len(self.regs):
                raise KernelError(errno.EINVAL)
            return self.regs[off:off + size]

    class K:
        n = 0

        def nodes(self) -> list[DevNode]:
            return [DevNode("dev", 511, 0, 0o666), DevNode("iommu", 10, 123, 0o666)]

        def open(self, path: str, task: Task) -> File:
            self.n += 1
            return Dev() if path == "dev" else Iommu(self.n)

        def describe(self) -> dict[str, Any]:
            return {}

    async def main() -> None:
        async with trio.open_nursery() as n:
            await n.start(Server(K()).serve, mountpoint)
            print("ready", flush=True)

    try:
        trio.run(main)
    except BaseException as e:  # SIGINT arrives wrapped in a group
        if not isinstance(e, KeyboardInterrupt | BaseExceptionGroup):
            raise


def build(tmp: Path) -> tuple[Path, Path]:
    client = tmp / "bench_client"
    (tmp / "bench_client.c").write_text(CLIENT_C)
    subprocess.run(["gcc", "-O2", "-o", str(client), str(tmp / "bench_client.c"), "-lpthread"], check=True)
    cserver = tmp / "c_fuse_server"
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], check=True, capture_output=True,
                           text=True).stdout.split()
    subprocess.run(["gcc", "-O2", "-o", str(cserver), str(HERE / "c_fuse_server.c"), *flags], check=True)
    return client, cserver


def start(cmd: list[str]) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout is not None
    line = p.stdout.readline()
    if line.strip() != "ready":
        p.kill()
        raise SystemExit(f"server did not start: {cmd}")
    return p


def stop(p: subprocess.Popen[str], mnt: str) -> None:
    p.send_signal(2)
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    subprocess.run(["umount", "-l", mnt], capture_output=True)


def measure(client: Path, mnt: str, mode: int, threads: int, iters: int) -> dict[str, float]:
    r = subprocess.run([str(client), f"{mnt}/dev", f"{mnt}/iommu", str(mode), str(threads), str(iters)],
                       check=True, capture_output=True)
    head, _, rest = r.stdout.partition(b"\n")
    wall_ns, fails = map(int, head.split())
    if fails:
        raise SystemExit(f"{fails} calls failed (mode {mode})")
    lat = sorted(x * 10 / 1000 for x in struct.unpack(f"<{threads * iters}I", rest))  # µs
    return {"median": statistics.median(lat), "p99": lat[int(len(lat) * 0.99) - 1],
            "rate": threads * iters / (wall_ns / 1e9)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--iters", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; each figure is the median over runs")
    ap.add_argument("--write", action="store_true", help="write benchmarks/RESULTS.md")
    a = ap.parse_args()
    if a.serve:
        serve_fakedev(a.serve)
        return
    results: dict[tuple[str, int, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        client, cserver = build(tmp)
        for name, cmd in (("C (libfuse3)", [str(cserver)]),
                          ("fakedev", [sys.executable, str(Path(__file__).resolve()), "--serve"])):
            mnt = tmp / ("m_" + name.split()[0])
            mnt.mkdir()
            p = start([*cmd, str(mnt)])
            try:
                for mode in MODES:
                    for threads in (1, 8):
                        iters = a.iters // (4 if mode == 1 else 1) // threads
                        runs = [measure(client, str(mnt), mode, threads, iters) for _ in range(a.repeat)]
                        results[(name, mode, threads)] = m = {
                            key: statistics.median(r[key] for r in runs) for key in runs[0]}
                        print(f"{name:13} {MODES[mode]:27} threads={threads}  median {m['median']:7.1f} µs  "
                              f"p99 {m['p99']:7.1f} µs  {m['rate']:9.0f} calls/s", flush=True)
            finally:
                stop(p, str(mnt))
    if a.write:
        write_results(results, a.repeat)


def write_results(results: dict[tuple[str, int, int], dict[str, float]], repeat: int) -> None:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    lines = [
        "# FUSE round trip: fakedev vs a minimal C server",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} with `benchmarks/fuse_roundtrip.py --write` on Linux "
        f"{platform.release()}, {os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}. "
        "Latency is per call as the calling thread sees it (clock_gettime around the syscall); "
        "calls/s is all threads' calls over the wall time; each figure is the median of "
        f"{repeat} runs. Load average when done: {os.getloadavg()[0]:.1f}. The C server is "
        "`benchmarks/c_fuse_server.c` (libfuse3 low-level, multi-threaded loop) doing the same "
        "work per call (process_vm_readv/writev; pidfd_getfd + identity ioctl for the fd).",
        "",
        "| call | threads | C median µs | C p99 µs | C calls/s | fakedev median µs | fakedev p99 µs "
        "| fakedev calls/s | median ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, label in MODES.items():
        for threads in (1, 8):
            c = results[("C (libfuse3)", mode, threads)]
            f = results[("fakedev", mode, threads)]
            lines.append(f"| {label} | {threads} | {c['median']:.1f} | {c['p99']:.1f} | {c['rate']:.0f} | "
                         f"{f['median']:.1f} | {f['p99']:.1f} | {f['rate']:.0f} | {f['median'] / c['median']:.1f}x |")
    c1 = results[("C (libfuse3)", 0, 1)]
    f1 = results[("fakedev", 0, 1)]
    ratio = f1["median"] / c1["median"]
    lines += [
        "",
        f"- GET_INFO median, 1 thread: {ratio:.1f}x the C server (target: within 3x) - "
        f"{'met' if ratio <= 3 else 'NOT met'}.",
        f"- GET_INFO from one thread: {f1['rate']:.0f} calls/s (target: at least 15,000) - "
        f"{'met' if f1['rate'] >= 15000 else 'NOT met'}.",
        "- The fd-resolving ioctl runs the model call in a worker thread (trio.to_thread) so the "
        "loop can answer the identity ioctl the lookup issues on our own mount; the two thread "
        "hand-offs and the extra FUSE round trip dominate its cost. Such calls are set-up calls "
        "(BIND_IOMMUFD, SET_CONTAINER, SET_IRQS, PCI_HOT_RESET, IOAS_MAP_FILE), not per-I/O ones.",
        "- One Python loop serves every thread, so fakedev's calls/s grow little with client "
        "threads; the C server answers on a pool of threads.",
    ]
    (HERE / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    if shutil.which("gcc") is None:
        raise SystemExit("needs gcc")
    main()
