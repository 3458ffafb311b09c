"""Device DMA end to end: tools/dmatest.c (kernel uAPI only) programs the
dma-engine of fixtures/dma-engine.toml under ``fakedev run`` and checks that
the device's DMA moved the bytes in its own memory (and in a memfd mapped with
IOMMU_IOAS_MAP_FILE), on the iommufd cdev path and on the legacy container
path; ``fakedev dma read|write`` reaches the same mappings from outside."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO, fakedev_run

pytestmark = pytest.mark.needs_root

BDF = "0000:03:00.0"


@pytest.fixture(scope="module")
def dmatest(tmp_path_factory: pytest.TempPathFactory) -> str:
    """tools/dmatest.c compiled with gcc (strict warnings)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is missing (scripts/setup installs it)")
    out = tmp_path_factory.mktemp("bin") / "dmatest"
    subprocess.run(
        [gcc, "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out),
         str(REPO / "tools" / "dmatest.c")],
        check=True,
    )
    out.parent.chmod(0o755)
    return str(out)


def lines_of(out: str, tag: str) -> list[str]:
    return [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith(tag + ": ")]


def test_cdev_path_copy_map_file_fill_and_fault(dmatest: str) -> None:
    r = fakedev_run("dma-engine", [dmatest, "--map-file", "--fault", BDF], extra=["--trace-text"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert lines_of(r.stdout, "id") == ["0x45414d44"]
    assert lines_of(r.stdout, "map") == [
        "src iova=0x100000 len=16384", "dst iova=0x200000 len=16384", "file iova=0x300000 len=16384"]
    # the MSI eventfd fired once per command, and the bytes are where they belong
    assert lines_of(r.stdout, "copy") == ["status=0x1 irq=1 ok"]
    assert lines_of(r.stdout, "file") == ["status=0x1 irq=1 ok"]
    assert lines_of(r.stdout, "fill") == ["status=0x1 irq=1 ok"]
    # a copy to an unmapped IOVA: DONE|FAULT, reason 2 (unmapped), the faulting IOVA
    assert lines_of(r.stdout, "fault") == ["status=0x3 reason=2 iova=0x700000"]
    assert "IOMMU_IOAS_MAP_FILE" in r.stderr


def test_legacy_container_path_with_intx(dmatest: str) -> None:
    r = fakedev_run("dma-engine", [dmatest, "--legacy", "--intx", "--fault", BDF], extra=["--supervise"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert lines_of(r.stdout, "device")[0].startswith(BDF)
    assert lines_of(r.stdout, "copy") == ["status=0x1 irq=1 ok"]
    assert lines_of(r.stdout, "fill") == ["status=0x1 irq=1 ok"]
    assert lines_of(r.stdout, "fault") == ["status=0x3 reason=2 iova=0x700000"]


def test_fakedev_dma_cli_reaches_the_clients_memory(dmatest: str) -> None:
    fakedev = f"'{sys.executable}' -m fakedev.cli.main"
    script = f"""
        set -e
        d=$(mktemp -d)
        mkfifo "$d/hold"
        '{dmatest}' --hold {BDF} < "$d/hold" > "$d/out" &
        exec 3> "$d/hold"
        while ! grep -q '^ready$' "$d/out"; do sleep 0.05; done
        echo "read: $({fakedev} dma read 03:00.0 0x200025 8)"
        {fakedev} dma write {BDF} 0x200000 c0ffee00deadbeef
        set +e
        {fakedev} dma read 03:00.0 0x600000 8 2> "$d/err1"; echo "unmapped: rc=$? $(cat "$d/err1")"
        {fakedev} dma write vfio0 0x100000 00 2> "$d/err2"; echo "readonly: rc=$? $(cat "$d/err2")"
        echo go >&3
        exec 3>&-
        wait
        cat "$d/out"
        cat "$FAKEDEV_MOUNT/.fakedev/state.json"
    """
    r = fakedev_run("dma-engine", ["sh", "-c", script])
    assert r.returncode == 0, r.stdout + r.stderr
    # the destination buffer after the engine's copy holds src[100:108] (src[i] = 7i + 3)
    want = bytes((7 * i + 3) & 0xFF for i in range(100, 108)).hex()
    assert lines_of(r.stdout, "read") == [want]
    assert "wrote 8 bytes" in r.stdout
    assert lines_of(r.stdout, "unmapped")[0].startswith("rc=1 fakedev: dma: EFAULT")
    assert "unmapped" in lines_of(r.stdout, "unmapped")[0]
    assert "read-only" in lines_of(r.stdout, "readonly")[0]
    # the client sees the bytes the CLI's DMA wrote into its buffer
    assert lines_of(r.stdout, "dst") == ["c0ffee00deadbeef0000000000000000"]
    state = json.loads(r.stdout[r.stdout.index("\n{") + 1:])
    assert state["dma"]["fault_counts"] == {"permission": 1, "unmapped": 1}
    assert state["dma"]["memory"] is True


def test_fixture_is_listed_by_show() -> None:
    r = subprocess.run([sys.executable, "-m", "fakedev.cli.main", "show", "--tree",
                        str(Path(REPO) / "fixtures" / "dma-engine.toml")],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert BDF in r.stdout


QEMU_DRIVER = r"""
import json, os, socket, subprocess, sys, time
qemu, mode, d = sys.argv[1], sys.argv[2], sys.argv[3]
fakedev = [sys.executable, "-m", "fakedev.cli.main"]
sock = os.path.join(d, "qmp.sock")
args = [qemu, "-machine", "q35,accel=tcg", "-nodefaults", "-display", "none", "-m", "64", "-S",
        "-qmp", f"unix:{sock},server=on,wait=off", "-device", "pcie-root-port,id=rp0"]
if mode == "iommufd":
    args += ["-object", "memory-backend-memfd,id=mem0,size=64M", "-machine", "memory-backend=mem0",
             "-object", "iommufd,id=iommufd0",
             "-device", "vfio-pci,host=0000:03:00.0,bus=rp0,iommufd=iommufd0"]
else:
    args += ["-device", "vfio-pci,host=0000:03:00.0,bus=rp0"]
q = subprocess.Popen(args)
for _ in range(600):
    if os.path.exists(sock) or q.poll() is not None:
        break
    time.sleep(0.05)
s = socket.socket(socket.AF_UNIX)
s.connect(sock)
f = s.makefile("rw")

def qmp(cmd, **kw):
    f.write(json.dumps({"execute": cmd, "arguments": kw}) + "\n")
    f.flush()
    while True:
        r = json.loads(f.readline())
        if "return" in r or "error" in r:
            return r

def dma(*a):
    r = subprocess.run(fakedev + ["dma", *a], capture_output=True, text=True)
    print(f"{a[0]}: rc={r.returncode} {r.stdout.strip()} {r.stderr.strip()}", flush=True)

f.readline()
qmp("qmp_capabilities")
dma("write", "03:00.0", "0x100000", "0123456789abcdef")  # guest RAM
print("xp: " + qmp("human-monitor-command", **{"command-line": "xp /8xb 0x100000"})["return"].strip())
dma("read", "03:00.0", "0xffff0", "5")  # the BIOS reset vector (ROM, mapped read-only)
dma("write", "03:00.0", "0xffff0", "00")
dma("read", "03:00.0", "0x8000000", "8")  # above the 64 MiB of RAM
qmp("quit")
q.wait()
"""


QEMU_VARIANTS = [
    pytest.param("legacy", shutil.which("qemu-system-x86_64") or "", ["--supervise"], id="legacy-debian-qemu"),
    pytest.param("iommufd", os.environ.get("FAKEDEV_QEMU", ""), ["--stat-mode"], id="iommufd-FAKEDEV_QEMU"),
]


@pytest.mark.parametrize(("mode", "qemu", "extra"), QEMU_VARIANTS)
def test_device_dma_reaches_qemu_guest_memory(mode: str, qemu: str, extra: list[str]) -> None:
    """QEMU's own guest-RAM mappings (MAP_DMA, or IOAS_MAP / MAP_FILE with iommufd) are
    what the device's DMA goes through: a write lands in guest RAM (QEMU's ``xp``
    shows it), the BIOS ROM reads back its reset vector and refuses writes."""
    if not qemu:
        pytest.skip("no QEMU for this path (Debian's qemu-system-x86; FAKEDEV_QEMU for iommufd)")
    script = f"d=$(mktemp -d); '{sys.executable}' -c '{QEMU_DRIVER}' '{qemu}' {mode} \"$d\"; " \
             'cat "$FAKEDEV_MOUNT/.fakedev/state.json"'
    r = fakedev_run("dma-engine", ["sh", "-c", script], extra=extra)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    writes, reads = lines_of(out, "write"), lines_of(out, "read")
    assert writes[0].startswith("rc=0 wrote 8 bytes"), out + r.stderr
    assert lines_of(out, "xp") == ["0000000000100000: 0x01 0x23 0x45 0x67 0x89 0xab 0xcd 0xef"]
    assert reads[0].startswith("rc=0 ea5be000f0")  # jmp f000:e05b
    assert writes[1].startswith("rc=1") and "read-only" in writes[1]
    assert reads[1].startswith("rc=1") and "unmapped" in reads[1]
    state = json.loads(out[out.index("\n{") + 1:])
    assert state["dma"]["fault_counts"] == {"permission": 1, "unmapped": 1}
