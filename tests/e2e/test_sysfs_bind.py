"""Binding drivers through sysfs under ``fakedev run``, the way libvirt and
driverctl do it: shell ``echo`` to driver_override, unbind, drivers_probe,
bind; the sysfs snapshot and /dev follow (driver link, vfio-dev/vfioN,
/sys/class/vfio-dev, /dev/vfio/devices/vfioN); an unbind of a device a
program holds waits for its release, with REQ signalled."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from tests.cli.conftest import unprivileged_python
from tests.e2e.conftest import FIXTURES, fakedev_run
from tests.e2e.test_qemu_iommufd import QEMU, UPSTREAM_QEMU_REASON

pytestmark = pytest.mark.needs_root

F0, F1 = "0000:01:00.0", "0000:01:00.1"
UNPLUG_CLIENT = Path(__file__).resolve().parents[1] / "host" / "unplug_client.py"

LIBVIRT = textwrap.dedent(f"""
    set -e
    B={F1}
    D=/sys/bus/pci/devices/$B
    echo "override $(cat $D/driver_override)"
    echo "driver $(basename $(readlink $D/driver))"
    echo vfio-pci > $D/driver_override
    echo "override $(cat $D/driver_override)"
    echo $B > $D/driver/unbind
    echo "unbound $(test -e $D/driver && echo no || echo yes)"
    echo $B > /sys/bus/pci/drivers_probe
    echo "driver $(basename $(readlink $D/driver))"
    echo "vfio-dev $(ls $D/vfio-dev)"
    echo "dev $(cat $D/vfio-dev/vfio1/dev)"
    echo "devices $(ls /dev/vfio/devices | tr '\\n' ' ')"
    echo "groups $(ls /dev/vfio | tr '\\n' ' ')"
    echo "class $(ls /sys/class/vfio-dev | tr '\\n' ' ')"
    echo "bound $(ls /sys/bus/pci/drivers/vfio-pci | grep 0000 | tr '\\n' ' ')"
    echo "group $(basename $(readlink $D/iommu_group))"
    "$HOTRESET" {F0} {F1}
    echo $B > /sys/bus/pci/drivers/vfio-pci/unbind
    echo > $D/driver_override
    echo $B > /sys/bus/pci/drivers_probe
    echo "back $(basename $(readlink $D/driver)) $(cat $D/driver_override)"
    echo "devices $(ls /dev/vfio/devices | tr '\\n' ' ')"
    echo "class $(ls /sys/class/vfio-dev | tr '\\n' ' ')"
    echo "igb $(ls /sys/bus/pci/drivers/igb | grep 0000 | tr '\\n' ' ')"
    test ! -e /dev/vfio/devices/vfio1 && test ! -e /dev/vfio/14 && echo "nodes gone"
    python3 - <<'EOF'
    import errno, os
    def write(path, data):
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, data.encode())
            return "ok"
        except OSError as e:
            return errno.errorcode[e.errno]
        finally:
            os.close(fd)
    print("bind igb again", write("/sys/bus/pci/drivers/igb/bind", "{F1}"))
    print("bind igb to vfio's", write("/sys/bus/pci/drivers/igb/bind", "{F0}"))
    print("bind vfio-pci without override", write("/sys/bus/pci/drivers/vfio-pci/unbind", "{F1}"))
    print("probe unknown", write("/sys/bus/pci/drivers_probe", "0000:05:00.0"))
    EOF
""")


def test_libvirt_sequence_moves_a_function_to_vfio_pci_and_back(hotreset: str) -> None:
    r = fakedev_run("host-driver-sibling", ["sh", "-c", f"HOTRESET={hotreset}\n{LIBVIRT}"])
    assert r.returncode == 0, r.stderr + r.stdout
    lines = r.stdout.splitlines()
    assert lines[:12] == [
        "override (null)",
        "driver igb",
        "override vfio-pci",
        "unbound yes",
        "driver vfio-pci",
        "vfio-dev vfio1",
        "dev 242:1",
        "devices vfio0 vfio1 ",
        "groups 13 14 devices vfio ",
        "class vfio0 vfio1 ",
        f"bound {F0} {F1} ",
        "group 14",
    ], r.stdout
    # both functions owned by one iommufd: INFO lists both, the zero-length reset works
    for line in ("info: flags=0x3 count=2", f"dev: {F0} devid=2", f"dev: {F1} devid=4", "reset: 0"):
        assert line in lines, r.stdout
    tail = lines[lines.index("reset: 0") + 1:]
    assert tail == [
        "back igb (null)",
        "devices vfio0 ",
        "class vfio0 ",
        f"igb {F1} ",
        "nodes gone",
        "bind igb again EBUSY",
        "bind igb to vfio's ENODEV",
        "bind vfio-pci without override ENODEV",
        "probe unknown ENODEV",
    ], r.stdout


HOLDER = textwrap.dedent(f"""
    import errno, json, os, signal, subprocess, sys, time
    KILL = sys.argv[1] == "kill"
    holder = subprocess.Popen([sys.executable, "{UNPLUG_CLIENT}", "/dev", "vfio0"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    def ask(cmd):
        holder.stdin.write(cmd + "\\n")
        holder.stdin.flush()
        return holder.stdout.readline().strip()
    def state():
        with open(os.environ["FAKEDEV_MOUNT"] + "/.fakedev/state.json") as f:
            return json.load(f)
    print(holder.stdout.readline().strip(), flush=True)
    writer = subprocess.Popen(["sh", "-c", "echo {F0} > /sys/bus/pci/drivers/vfio-pci/unbind"])
    print(ask("wait"), flush=True)
    time.sleep(0.3)
    print("writer waits", writer.poll() is None, flush=True)
    try:
        os.open("/dev/vfio/devices/vfio0", os.O_RDWR)
        print("reopen ok")
    except OSError as e:
        print("reopen", errno.errorcode[e.errno])
    print(ask("info"), flush=True)
    print("unbinds", [u["bdf"] for u in state()["unbinds"]], flush=True)
    if KILL:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=10)
        print("writer killed", writer.returncode, flush=True)
        print("still pending", [u["bdf"] for u in state()["unbinds"]], flush=True)
    print(ask("close"), flush=True)
    if not KILL:
        print("writer rc", writer.wait(timeout=20), flush=True)
    deadline = time.monotonic() + 20
    while os.listdir("/dev/vfio/devices") and time.monotonic() < deadline:
        time.sleep(0.05)
    print("devices", os.listdir("/dev/vfio/devices"))
    print("driver link", os.path.lexists("/sys/bus/pci/devices/{F0}/driver"))
    print("class", os.listdir("/sys/class/vfio-dev"))
    s = state()
    print("model", s["drivers"]["{F0}"], s["unbinds"], [d["bdf"] for d in s["devices"]])
""")


@pytest.mark.parametrize("how", ["close", "kill"])
def test_unbind_of_a_held_device_waits_for_the_release(how: str, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    r = fakedev_run("host-driver-sibling", ["python3", "-c", HOLDER, how], timeout=90,
                    extra=["--trace", str(trace)])
    assert r.returncode == 0, r.stderr + r.stdout
    recs = [json.loads(line) for line in trace.read_text().splitlines()]
    unbinds = [(x["errno"], x["waited"]) for x in recs
               if x["op"] == "sysfs-write" and x["path"].endswith("/unbind")]
    # the trace says the write waited, and how it ended
    assert unbinds == [("EINTR" if how == "kill" else None, True)], unbinds
    lines = r.stdout.splitlines()
    assert lines[:5] == ["ready", "req 1", "writer waits True", "reopen ENODEV", "info 9 5"], r.stdout
    assert lines[5] == f"unbinds ['{F0}']"
    rest = lines[6:]
    if how == "kill":
        # the killed writer is answered at once; the unbind stays pending
        assert rest[:2] == ["writer killed -9", f"still pending ['{F0}']"], r.stdout
        rest = rest[2:]
        assert rest[0] == "closed"
    else:
        assert rest[:2] == ["closed", "writer rc 0"], r.stdout
    assert rest[-4:] == ["devices []", "driver link False", "class []", "model None [] []"], r.stdout


ROOTLESS = textwrap.dedent(f"""
    B={F1}
    D=/sys/bus/pci/devices/$B
    echo vfio-pci > $D/driver_override
    echo $B > $D/driver/unbind
    echo $B > /sys/bus/pci/drivers_probe
    echo "driver $(basename $(readlink $D/driver))"
    echo "devices $(ls /dev/vfio/devices | tr '\\n' ' ')"
    echo "dev $(cat $D/vfio-dev/vfio1/dev)"
    exec 3<>/dev/vfio/devices/vfio1 && echo "opened vfio1"
""")


def test_libvirt_sequence_rootless(unprivileged_user: str, user_pythonpath: str, userns_allowed: None,
                                   dev_fuse_usable_by_all: None) -> None:
    """As a normal user (user namespace, shadowed /dev): the same files work."""
    exe = unprivileged_python(unprivileged_user)
    if exe is None:
        pytest.fail(f"no Python {sys.version_info[:2]} runnable by {unprivileged_user}")
    shared = Path(tempfile.mkdtemp(prefix="fakedev-e2e-"))
    shared.chmod(0o755)
    tree = shared / "tree.toml"
    shutil.copy(FIXTURES / "host-driver-sibling.toml", tree)
    tree.chmod(0o644)
    try:
        r = subprocess.run(
            ["runuser", "-u", unprivileged_user, "--", "env", f"PYTHONPATH={user_pythonpath}",
             exe, "-m", "fakedev.cli.main", "run", "--tree", str(tree), "--", "sh", "-c", ROOTLESS],
            capture_output=True, text=True, timeout=120, cwd="/",
        )
    finally:
        shutil.rmtree(shared)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == ["driver vfio-pci", "devices vfio0 vfio1 ", "dev 242:1", "opened vfio1"], \
        r.stdout + r.stderr


REMOVE = textwrap.dedent("""
    echo 1 > /sys/bus/pci/devices/0000:00:1c.0/remove && echo removed
    echo "devices $(ls /sys/bus/pci/devices | tr '\\n' ' ')"
    echo "host $(ls /sys/devices/pci0000:00 | grep 0000 | tr '\\n' ' ')"
    echo "mounts $(grep -c 0000:01:00 /proc/self/mountinfo)"
    echo "nodes $(ls /dev/vfio/devices | tr '\\n' ' ')"
    echo "class $(ls /sys/class/vfio-dev | tr '\\n' ' ')"
""")


def test_remove_of_a_bridge_takes_its_functions() -> None:
    """``remove`` on the root port: both functions go with it; the attribute
    files mounted in their directories are unmounted first."""
    r = fakedev_run("dual-function-nic", ["sh", "-c", REMOVE])
    assert r.returncode == 0, r.stderr + r.stdout
    assert r.stdout.splitlines() == ["removed", "devices ", "host ", "mounts 0", "nodes ", "class "], r.stdout


RESET = textwrap.dedent("""
    import errno, json, os
    d = "/sys/bus/pci/devices/0000:02:00.0"
    print(open(d + "/reset_method").read().strip())
    fd = os.open(d + "/reset", os.O_WRONLY)
    os.write(fd, b"1\\n")
    try:
        os.write(fd, b"2")
    except OSError as e:
        print("reset 2", errno.errorcode[e.errno])
    os.close(fd)
    state = json.load(open(os.environ["FAKEDEV_MOUNT"] + "/.fakedev/state.json"))
    print([(r["bdf"], r["method"], r["cause"]) for r in state["reset_log"]])
""")


def test_sysfs_reset_is_a_function_reset() -> None:
    r = fakedev_run("flr-device", ["python3", "-c", RESET])
    assert r.returncode == 0, r.stderr + r.stdout
    assert r.stdout.splitlines() == ["flr bus", "reset 2 EINVAL", "[('0000:02:00.0', 'flr', 'sysfs')]"], r.stdout


QEMU_AFTER_BIND = textwrap.dedent(f"""
    B={F1}
    D=/sys/bus/pci/devices/$B
    echo vfio-pci > $D/driver_override
    echo $B > $D/driver/unbind
    echo $B > /sys/bus/pci/drivers_probe
    printf 'system_reset\\nquit\\n' | "$QEMU" -M q35 -accel tcg -nodefaults -display none -m 128 \\
        -monitor stdio -object iommufd,id=iommufd0 \\
        -device vfio-pci,host={F0},id=nic0,iommufd=iommufd0 \\
        -device vfio-pci,host={F1},id=nic1,iommufd=iommufd0 >/dev/null
    echo "qemu $?"
    python3 -c 'import json, os; s = json.load(open(os.environ["FAKEDEV_MOUNT"] + "/.fakedev/state.json")); \\
        print(sorted({{r["bdf"] for r in s["reset_log"] if r["cause"] == "VFIO_DEVICE_PCI_HOT_RESET"}}))'
""")


@pytest.mark.skipif(not QEMU, reason=UPSTREAM_QEMU_REASON)
def test_qemu_uses_a_function_bound_through_sysfs() -> None:
    """QEMU (host=, --stat-mode: sysfs vfio-dev/vfio1/dev against the new node's
    rdev) takes both functions after the libvirt sequence, and hot-resets the
    card through the zero-length array."""
    r = fakedev_run("host-driver-sibling", ["sh", "-c", f"QEMU={QEMU}\n{QEMU_AFTER_BIND}"],
                    extra=["--stat-mode"], timeout=300)
    assert r.returncode == 0, r.stderr + r.stdout
    assert r.stdout.splitlines()[-2:] == ["qemu 0", f"['{F0}', '{F1}']"], r.stderr + r.stdout


def test_sysfs_writes_are_in_the_trace(tmp_path: Path) -> None:
    """Each write to a served sysfs attribute is a trace record: the real
    /sys path, what was written, and the result or errno."""
    trace = tmp_path / "trace.jsonl"
    script = (
        f"echo vfio-pci > /sys/bus/pci/devices/{F1}/driver_override && "
        f"echo {F1} > /sys/bus/pci/drivers/igb/unbind && "
        f"echo {F1} > /sys/bus/pci/drivers_probe && "
        f"(echo {F1} > /sys/bus/pci/drivers/igb/bind || true)"
    )
    r = fakedev_run("host-driver-sibling", ["sh", "-c", script],
                    extra=["--trace", str(trace), "--trace-text"])
    assert r.returncode == 0, r.stderr

    recs = [json.loads(line) for line in trace.read_text().splitlines()]
    writes = [(x["path"], x["data"], x["errno"]) for x in recs if x["op"] == "sysfs-write"]
    assert writes == [
        (f"/sys/devices/pci0000:00/0000:00:1c.0/{F1}/driver_override", "vfio-pci\n", None),
        ("/sys/bus/pci/drivers/igb/unbind", f"{F1}\n", None),
        ("/sys/bus/pci/drivers_probe", f"{F1}\n", None),
        # the override admits only vfio-pci: igb does not match (bind_store: ENODEV)
        ("/sys/bus/pci/drivers/igb/bind", f"{F1}\n", "ENODEV"),
    ], writes
    assert f'write(/sys/bus/pci/drivers/igb/unbind, "{F1}\\n") = 13' in r.stderr, r.stderr
