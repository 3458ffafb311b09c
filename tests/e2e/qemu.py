"""QEMU under ``fakedev run``, driven over QMP: the shared harness of the QEMU
end-to-end tests.

A small QMP driver (``DRIVER``, run inside the run) starts QEMU with
``-qmp stdio`` on the given functions, in one of three ways: ``host=`` with
an iommufd object (``mode`` "host", under ``--stat-mode``), fd passing
(``"fd"``, no supervisor) or ``host=`` without an iommufd object (``"legacy"``:
the group/container path, under ``--supervise``). It checks ``query-pci``,
snapshots the model's state before and after ``system_reset`` (QEMU still
running: no reset at close mixed in), optionally has the device DMA into
guest RAM, then quits. QEMU's own trace events go to its stderr, fakedev's
call trace to a JSON-lines file.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.e2e.conftest import FIXTURES, fakedev_run

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
    fd_dir = f"/proc/{qemu.pid}/fd"
    out["qemu_fds"] = {}
    for fd in os.listdir(fd_dir):
        try:
            out["qemu_fds"][fd] = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            pass
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
        """BDFs the model reset by VFIO_DEVICE_PCI_HOT_RESET between the snapshots, sorted."""
        before = len(self.out["before"]["reset_log"])
        return sorted(
            r["bdf"]
            for r in self.out["after"]["reset_log"][before:]
            if r["cause"] == "VFIO_DEVICE_PCI_HOT_RESET"
        )

    def calls(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.trace if r.get("op") == "ioctl" and r["name"] == name]

    def qemu_fds_on(self, suffix: str) -> list[int]:
        """QEMU's fds open on a file whose path ends with ``suffix``."""
        return sorted(int(fd) for fd, link in self.out["qemu_fds"].items() if link.endswith(suffix))

    def qemu_lines(self, prefix: str) -> list[str]:
        return [line for line in self.qemu_stderr.splitlines() if line.startswith(prefix)]


@dataclass
class AsUser:
    """Run ``fakedev run`` as ``name`` (rootless) with this interpreter and path."""

    name: str
    python: str
    pythonpath: str


def run_qemu(
    tmp_path: Path,
    tree: str,
    bdfs: list[str],
    mode: str,
    *,
    qemu: str,
    holder: list[str] | None = None,
    dma: dict[str, Any] | None = None,
    trace_events: list[str] | None = None,
    stat_mode: bool = False,
    user: AsUser | None = None,
) -> Run:
    """QEMU in ``fakedev run`` on fixture ``tree``, in ``mode`` (see the module
    header); ``stat_mode`` adds ``--stat-mode`` to a legacy run, ``user`` runs
    it rootless as that user."""
    driver = tmp_path / "qmp_driver.py"
    driver.write_text(DRIVER)
    trace = tmp_path / "trace.jsonl"
    stderr = tmp_path / "qemu.stderr"
    cfg = {"qemu": qemu, "bdfs": bdfs, "holder": holder, "stderr": str(stderr), "mode": mode,
           "dma": dma, "trace": trace_events or []}
    extra = ["--trace", str(trace)]
    if mode == "legacy":
        extra.append("--supervise")
    if mode == "host" or stat_mode:
        extra.append("--stat-mode")
    if user is None:
        tmp_path.chmod(0o755)
        r = fakedev_run(tree, [sys.executable, str(driver), json.dumps(cfg)], extra=extra, timeout=300)
    else:
        tmp_path.chmod(0o777)
        driver.chmod(0o644)
        tree_file = tmp_path / "tree.toml"
        shutil.copy(FIXTURES / f"{tree}.toml", tree_file)
        tree_file.chmod(0o644)
        r = subprocess.run(
            ["runuser", "-u", user.name, "--", "env", f"PYTHONPATH={user.pythonpath}", user.python,
             "-m", "fakedev.cli.main", "run", "--tree", str(tree_file), *extra, "--",
             user.python, str(driver), json.dumps(cfg)],
            capture_output=True, text=True, timeout=300, cwd="/",
        )
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
