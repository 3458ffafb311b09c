"""Unmodified upstream QEMU (9 or later: the cdev + iommufd path) realizes fake
vfio-pci devices and hot-resets them on QMP ``system_reset`` with the
zero-length group-fd array.

These run when ``FAKEDEV_QEMU`` names such a qemu-system-x86_64 (``scripts/
build-qemu`` builds one from Debian's source package; ``scripts/test`` sets
the variable when it finds that build). Two ways in, as users run QEMU:

- ``host=BDF,iommufd=X`` inside ``fakedev run --stat-mode``: QEMU finds the
  cdev through sysfs and checks that it is a character device with the
  sysfs ``dev`` number; the supervisor answers the stat family for fakedev's
  nodes.
- fd passing (``-object iommufd,id=X,fd=N -device vfio-pci,id=D,fd=M``),
  as libvirt does: a plain ``fakedev run`` with no supervisor at all.

A small QMP driver inside the run starts QEMU with ``-qmp stdio``, snapshots
the model before and after ``system_reset`` and quits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import fakedev_run

QEMU = os.environ.get("FAKEDEV_QEMU", "")


def _qemu_version(path: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except OSError:
        return None
    words = out.split()
    if len(words) < 4 or words[2] != "version":
        return None
    return tuple(int(x) for x in words[3].split(".")[:2] if x.isdigit())


VERSION = _qemu_version(QEMU) if QEMU else None

UPSTREAM_QEMU_REASON = "FAKEDEV_QEMU does not name an upstream QEMU (scripts/build-qemu builds one)"

pytestmark = [pytest.mark.needs_root, pytest.mark.skipif(not QEMU, reason=UPSTREAM_QEMU_REASON)]

F0, F1 = "0000:01:00.0", "0000:01:00.1"
NIC = (0x8086, 0x10C9)  # the card of dual-function-nic.toml and shared-group.toml

DRIVER = r"""
import errno, json, os, subprocess, sys

cfg = json.loads(sys.argv[1])
state_file = os.path.join(os.environ["FAKEDEV_MOUNT"], ".fakedev", "state.json")

def state():
    with open(state_file) as f:
        return json.load(f)

def cdev_of(bdf):
    d = f"/sys/bus/pci/devices/{bdf}/vfio-dev"
    return "/dev/vfio/devices/" + next(n for n in sorted(os.listdir(d)) if n.startswith("vfio"))

holder = None
if cfg["holder"]:
    holder = subprocess.Popen(cfg["holder"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    said = []
    while not said or said[-1].strip() != "ready":
        line = holder.stdout.readline()
        assert line, f"holder exited: {said!r}"
        said.append(line)

args = [cfg["qemu"], "-M", "q35", "-accel", "tcg", "-nodefaults", "-display", "none",
        "-m", "128", "-qmp", "stdio",
        "-trace", "vfio_pci_hot_reset*", "-trace", "vfio_pci_reset*",
        "-trace", "iommufd_cdev_pci_hot_reset_dep_devices"]
for event in cfg.get("trace", []):
    args += ["-trace", event]
passed = []
if cfg["mode"] == "fd":
    ifd = os.open("/dev/iommu", os.O_RDWR)
    passed.append(ifd)
    args += ["-object", f"iommufd,id=iommufd0,fd={ifd}"]
    for i, bdf in enumerate(cfg["bdfs"]):
        dfd = os.open(cdev_of(bdf), os.O_RDWR)
        passed.append(dfd)
        args += ["-device", f"vfio-pci,id=hostdev{i},fd={dfd},iommufd=iommufd0"]
elif cfg["mode"] == "legacy":
    for i, bdf in enumerate(cfg["bdfs"]):
        args += ["-device", f"vfio-pci,host={bdf},id=hostdev{i}"]
else:
    args += ["-object", "iommufd,id=iommufd0"]
    for i, bdf in enumerate(cfg["bdfs"]):
        args += ["-device", f"vfio-pci,host={bdf},id=hostdev{i},iommufd=iommufd0"]
err = open(cfg["stderr"], "w")
qemu = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                        text=True, pass_fds=passed)
for fd in passed:  # QEMU holds its own copies now
    os.close(fd)

def recv():
    line = qemu.stdout.readline()
    if not line:
        raise EOFError("QEMU closed its QMP stream")
    return json.loads(line)

def execute(command, wait_event=None, **arguments):
    msg = {"execute": command}
    if arguments:
        msg["arguments"] = arguments
    qemu.stdin.write(json.dumps(msg) + "\n")
    qemu.stdin.flush()
    result, seen = None, wait_event is None
    while result is None or not seen:
        msg = recv()
        if "return" in msg or "error" in msg:
            result = msg
        elif msg.get("event") == wait_event:
            seen = True
    return result

def control(command):
    # one command to the server's control file: its reply, or the errno name
    fd = os.open(os.path.join(os.environ["FAKEDEV_MOUNT"], ".fakedev", "control"), os.O_RDWR)
    try:
        os.write(fd, command.encode())
        return os.pread(fd, 1 << 16, 0).decode()
    except OSError as e:
        return errno.errorcode[e.errno]
    finally:
        os.close(fd)

def hmp(line):
    return execute("human-monitor-command", **{"command-line": line})["return"]

def dma(plan):
    # the device writes guest RAM and reads it back; QEMU's own view of it (xp)
    bdf, gpa, data = plan["bdf"], plan["gpa"], plan["hex"]
    n = len(data) // 2
    res = {"xp_before": hmp(f"xp /{n}xb {gpa:#x}")}
    res["write"] = control(f"dma-write {bdf} {gpa:#x} {data}")
    res["xp_after"] = hmp(f"xp /{n}xb {gpa:#x}")
    res["read"] = control(f"dma-read {bdf} {gpa:#x} {n}")
    res["write_unmapped"] = control(f"dma-write {bdf} {plan['unmapped']:#x} {data}")
    return res

out = {}
try:
    recv()  # greeting
    execute("qmp_capabilities")
    out["pci"] = execute("query-pci")["return"]
    out["before"] = state()
    if cfg["dma"]:
        out["dma"] = dma(cfg["dma"])
    out["reset"] = execute("system_reset", wait_event="RESET")
    out["after"] = state()
    execute("quit")
except EOFError as exc:
    out["eof"] = str(exc)
out["rc"] = qemu.wait(timeout=60)
if holder is not None:
    holder.stdin.close()
    holder.wait(timeout=30)
print(json.dumps(out))
"""


@dataclass
class Run:
    """What one QEMU run left behind."""

    out: dict[str, Any]
    qemu_stderr: str
    trace: list[dict[str, Any]]
    fakedev_stderr: str

    def __repr__(self) -> str:  # shown by pytest when an assertion fails
        return f"QEMU stderr:\n{self.qemu_stderr}\nfakedev stderr:\n{self.fakedev_stderr}"

    def pci_devices(self) -> list[tuple[int, int, str]]:
        return [
            (d["id"]["vendor"], d["id"]["device"], d.get("qdev_id", ""))
            for bus in self.out["pci"]
            for d in bus["devices"]
        ]

    def hot_resets_during_system_reset(self) -> list[str]:
        before = len(self.out["before"]["reset_log"])
        return sorted(
            r["bdf"]
            for r in self.out["after"]["reset_log"][before:]
            if r["cause"] == "VFIO_DEVICE_PCI_HOT_RESET"
        )

    def calls(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.trace if r.get("op") == "ioctl" and r["name"] == name]

    def qemu_lines(self, prefix: str) -> list[str]:
        return [line for line in self.qemu_stderr.splitlines() if line.startswith(prefix)]


def run_qemu(
    tmp_path: Path,
    tree: str,
    bdfs: list[str],
    mode: str,
    holder: list[str] | None = None,
    dma: dict[str, Any] | None = None,
    qemu: str = QEMU,
    trace_events: list[str] | None = None,
) -> Run:
    """QEMU in ``fakedev run`` on ``tree``: ``mode`` "host" (host=, --stat-mode),
    "fd" (fd passing, no supervisor) or "legacy" (host= without an iommufd
    object: the group/container path, --supervise)."""
    driver = tmp_path / "qmp_driver.py"
    driver.write_text(DRIVER)
    trace = tmp_path / "trace.jsonl"
    stderr = tmp_path / "qemu.stderr"
    cfg = {"qemu": qemu, "bdfs": bdfs, "holder": holder, "stderr": str(stderr), "mode": mode,
           "dma": dma, "trace": trace_events or []}
    extra = ["--trace", str(trace), *({"host": ["--stat-mode"], "legacy": ["--supervise"]}.get(mode, []))]
    tmp_path.chmod(0o755)
    r = fakedev_run(tree, [sys.executable, str(driver), json.dumps(cfg)], extra=extra, timeout=300)
    qemu_stderr = stderr.read_text() if stderr.exists() else ""
    assert r.returncode == 0, r.stdout + r.stderr + qemu_stderr
    out = json.loads(r.stdout.splitlines()[-1])
    records = [json.loads(line) for line in trace.read_text().splitlines() if line.strip()]
    run = Run(out, qemu_stderr, records, r.stderr)
    assert "eof" not in out, run
    assert out["rc"] == 0, run
    return run


def device(state: dict[str, Any], bdf: str) -> dict[str, Any]:
    return next(d for d in state["devices"] if d["bdf"] == bdf)


def assert_realized_through_iommufd(run: Run, bdfs: list[str]) -> None:
    devices = run.pci_devices()
    for i, _ in enumerate(bdfs):
        assert (*NIC, f"hostdev{i}") in devices, run
    st = run.out["before"]
    ctxs = {device(st, bdf)["iommufd"] for bdf in bdfs}
    for bdf in bdfs:
        dev = device(st, bdf)
        assert dev["cdev_opened"] and dev["open_count"] == 1, dev
    assert len(ctxs) == 1 and None not in ctxs, ctxs  # one iommufd, all bound to it
    # The iommufd path, not the group path: no group ioctl reached fakedev.
    assert not [r for r in run.trace if r.get("op") == "ioctl" and r["name"].startswith("VFIO_GROUP")]
    for name in ("VFIO_DEVICE_BIND_IOMMUFD", "IOMMU_IOAS_ALLOC", "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
                 "VFIO_DEVICE_GET_INFO", "VFIO_DEVICE_GET_REGION_INFO"):
        calls = run.calls(name)
        assert calls and all(c["errno"] is None for c in calls), (name, calls)
    maps = run.calls("IOMMU_IOAS_MAP") + run.calls("IOMMU_IOAS_MAP_FILE")
    assert maps and all(c["errno"] is None for c in maps), maps  # guest RAM


def assert_zero_length_resets(run: Run, owned: int) -> None:
    """Every PCI_HOT_RESET QEMU sent was the zero-length form and succeeded."""
    resets = run.calls("VFIO_DEVICE_PCI_HOT_RESET")
    assert resets, run
    for c in resets:
        assert c["errno"] is None and c["result"] == 0, c
        assert c["request"]["count"] == 0 and c["request"]["argsz"] == 12, c
    infos = [c for c in run.calls("VFIO_DEVICE_GET_PCI_HOT_RESET_INFO") if c["errno"] is None]
    assert infos, run
    flags = infos[-1]["result_struct"]["flags"]
    assert flags & 0x1 and flags & 0x2, infos[-1]  # DEV_ID and DEV_ID_OWNED
    results = run.qemu_lines("vfio_pci_hot_reset_result")
    assert results and all(line.endswith("hot reset: Success") for line in results), run
    assert len(run.qemu_lines("iommufd_cdev_pci_hot_reset_dep_devices")) >= owned, run


@pytest.mark.parametrize("mode", ["host", "fd"])
def test_both_functions_system_reset_is_one_zero_length_hot_reset(
    tmp_path: Path, mode: str
) -> None:
    run = run_qemu(tmp_path, "dual-function-nic", [F0, F1], mode)
    assert_realized_through_iommufd(run, [F0, F1])
    assert_zero_length_resets(run, owned=2)
    # QEMU's multi-device pass: one reset for the card, recorded on both functions.
    assert any(line.endswith(") multi") for line in run.qemu_stderr.splitlines()), run
    assert run.hot_resets_during_system_reset() == [F0, F1], run
    log = [r["bdf"] for r in run.out["after"]["reset_log"] if r["cause"] == "VFIO_DEVICE_PCI_HOT_RESET"]
    assert sorted(log) == [F0, F0, F1, F1], log  # startup reset and system_reset


@pytest.mark.parametrize("mode", ["host", "fd"])
def test_one_function_of_a_shared_group_is_reset_alone_with_zero_length(
    tmp_path: Path, mode: str
) -> None:
    # shared-group: QEMU binds only 01:00.0, but owning group 13 owns 01:00.1
    # too, so INFO says DEV_ID_OWNED and 01:00.1 is reset with it, unopened.
    run = run_qemu(tmp_path, "shared-group", [F0], mode)
    assert_realized_through_iommufd(run, [F0])
    assert_zero_length_resets(run, owned=1)
    assert any(line.endswith(") one") for line in run.qemu_stderr.splitlines()), run
    assert run.hot_resets_during_system_reset() == [F0, F1], run
    assert device(run.out["after"], F1)["open_count"] == 0


@pytest.mark.parametrize("mode", ["host", "fd"])
def test_sibling_held_by_another_process_blocks_the_reset(
    tmp_path: Path, hotreset: str, mode: str
) -> None:
    holder = [hotreset, "--no-info", "--no-reset", "--hold", F1]
    run = run_qemu(tmp_path, "dual-function-nic", [F0], mode, holder=holder)
    assert_realized_through_iommufd(run, [F0])
    assert device(run.out["before"], F1)["cdev_opened"]
    infos = [c for c in run.calls("VFIO_DEVICE_GET_PCI_HOT_RESET_INFO") if c["errno"] is None]
    assert infos and all(not c["result_struct"]["flags"] & 0x2 for c in infos), infos
    assert any("which is not owned" in line for line in run.qemu_stderr.splitlines()), run
    assert not run.calls("VFIO_DEVICE_PCI_HOT_RESET")
    assert run.hot_resets_during_system_reset() == []


def xp_bytes(text: str) -> bytes:
    """The bytes of HMP ``xp /Nxb`` output ("0000000000200000: 0x66 0x61 ...")."""
    out = bytearray()
    for line in text.splitlines():
        _, _, values = line.partition(":")
        out.extend(int(v, 16) for v in values.split())
    return bytes(out)


@pytest.mark.parametrize("mode", ["host", "fd"])
def test_device_dma_reaches_guest_ram_through_qemus_mappings(tmp_path: Path, mode: str) -> None:
    """The device writes guest RAM through the IOAS mappings QEMU made; QEMU
    sees the bytes at that guest-physical address (IOVA = GPA without a
    vIOMMU), and an IOVA QEMU never mapped faults."""
    payload = b"fakedev DMA to guest RAM"
    plan = {"bdf": F0, "gpa": 0x200000, "hex": payload.hex(), "unmapped": 0xF0000000}
    run = run_qemu(tmp_path, "dual-function-nic", [F0, F1], mode, dma=plan)
    res = run.out["dma"]
    assert xp_bytes(res["xp_before"]) != payload, res
    assert res["write"].startswith(f"wrote {len(payload)} bytes"), res
    assert xp_bytes(res["xp_after"]) == payload, res
    assert bytes.fromhex(res["read"].strip()) == payload, res
    assert res["write_unmapped"] in ("EFAULT", "ENOENT", "EIO"), res
    dma = run.out["after"]["dma"]
    assert dma["writes"] >= 1 and dma["reads"] >= 1 and dma["faults"] == 1, dma
    assert [(f["bdf"], f["iova"]) for f in dma["recent_faults"]] == [(F0, plan["unmapped"])], dma
