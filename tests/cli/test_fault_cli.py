"""--fault specs, fakedev fault/unplug/sweep argument errors, the control command
registry, sweep verdicts and leftovers (no mounts here; see tests/e2e)."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from fakedev.cli import main as cli
from fakedev.cli.sweep import Run, Sweep, _verdict, leftovers
from fakedev.host import control as C
from fakedev.kernel.errors import KernelError
from fakedev.kernel.fault_inject import FaultPlan
from fakedev.kernel.testing import FakeProcess
from fakedev.tree import load_tree
from fakedev.tree.loader import FIXTURES
from fakedev.uapi import ioctls as I
from fakedev.uapi import structs as S


@pytest.fixture(autouse=True)
def _outside_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cli.ENV_MOUNT, raising=False)


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(("spec", "problem"), [
    ("bogus", "is not KEY=VALUE"),
    ("call=VFIO_NOT_A_CALL", "unknown call"),
    ("call=open,nth=0", "nth: must be at least 1"),
    ("call=open,nth=x", "nth: must be an integer"),
    ("call=open,count=0", "count: must be at least 1"),
    ("call=open,errno=EWHAT", "errno: must be an errno name"),
    ("call=open,device=1:0.0", "device: must be a function address"),
    ("call=open,nth=1,nth=2", "nth: given twice"),
    ("call=open,after=open", "after: unknown field"),
    ("unplug=0000:01:00.1", "after: unplug needs after"),
    ("unplug=0000:01:00.1,after=NOPE", "after: unknown call"),
    ("reset-fails=xx", "device: must be a function address"),
    ("memory-lock-busy=0000:01:00.0,errno=EIO", "errno: unknown field"),
    ("explode=0000:01:00.0", "a fault starts with call=OP"),
])
@pytest.mark.parametrize("command", ["run", "mount"])
def test_bad_fault_specs_are_usage_errors(
    command: str, spec: str, problem: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    tail = ["--", "true"] if command == "run" else [str(tmp_path)]
    err = _usage_error([command, "--fault", spec, *tail], capsys)
    assert "argument --fault" in err and problem in err


def test_good_fault_specs_parse_in_order() -> None:
    args = cli.build_parser().parse_args([
        "run", "--fault", "call=VFIO_DEVICE_PCI_HOT_RESET,nth=1,errno=EBUSY,device=01:00.1,count=2",
        "--fault", "unplug=0000:01:00.1,after=VFIO_DEVICE_GET_INFO,nth=2",
        "--fault", "memory-lock-busy=0000:01:00.1", "--fault", "reset-fails=0000:01:00.0,errno=EIO",
        "--fault", "device-lock-busy=0000:01:00.1", "--", "true"])
    assert [s.text() for s in args.fault] == [
        "call=VFIO_DEVICE_PCI_HOT_RESET,nth=1,count=2,device=0000:01:00.1,errno=EBUSY",
        "unplug=0000:01:00.1,after=VFIO_DEVICE_GET_INFO,nth=2",
        "memory-lock-busy=0000:01:00.1",
        "reset-fails=0000:01:00.0,errno=EIO",
        "device-lock-busy=0000:01:00.1",
    ]


def test_a_fault_on_a_function_not_in_the_tree_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["mount", "--fault", "memory-lock-busy=0000:09:00.0", str(tmp_path)])
    assert exc.value.code == 1
    assert "no function 0000:09:00.0" in capsys.readouterr().err


def test_fault_and_unplug_outside_a_run_say_where_to_look(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["fault", "call=open"], ["unplug", "0000:01:00.1"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 1
        assert "not inside a `fakedev run`" in capsys.readouterr().err


def test_fault_with_a_mount_that_serves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["fault", "--mount", str(tmp_path), "call=open"])
    assert "cannot open" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["fault", "--mount", str(tmp_path)])
    assert "give a SPEC" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["unplug", "--mount", str(tmp_path), "01:00"])
    assert "not a function address" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "problem"), [
    (["sweep", "--"], "missing command"),
    (["sweep", "--call", "NOPE", "--", "true"], "--call 'NOPE'"),
    (["sweep", "--errno", "EWHAT", "--", "true"], "--errno 'EWHAT'"),
    (["sweep", "--device", "zz", "--", "true"], "--device 'zz'"),
    (["sweep", "--timeout", "0", "--", "true"], "--timeout must be positive"),
    (["sweep", "--tree", "/nonexistent.toml", "--", "true"], "cannot read the tree file"),
])
def test_sweep_argument_errors(argv: list[str], problem: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 1
    assert problem in capsys.readouterr().err


# ------------------------------------------------------------------ control registry


class _FakeServer:
    def __init__(self) -> None:
        k = load_tree(FIXTURES / "dual-function-nic.toml").make_kernel()
        self.kernel = k
        self.faults = k.faults
        self.unplugged: list[str] = []

    def unplug(self, bdf: str) -> None:
        self.unplugged.append(bdf)


def test_registered_command_gets_its_words_and_its_reply_is_returned() -> None:
    seen: list[Any] = []

    def handler(server: Any, args: list[str]) -> str:
        seen.append((server, args))
        return f"did {' '.join(args)}\n"

    C.register_command("test-echo", handler)
    try:
        assert "test-echo" in C.commands()
        srv = _FakeServer()
        assert C.run_command(srv, b"  test-echo a  b\n") == "did a b\n"  # type: ignore[arg-type]
        assert seen == [(srv, ["a", "b"])]
        with pytest.raises(ValueError):
            C.register_command("two words", handler)
    finally:
        C._COMMANDS.pop("test-echo", None)


@pytest.mark.parametrize(("text", "problem"), [
    (b"", "empty command"),
    (b"\n \n", "empty command"),
    (b"help\nhelp\n", "exactly one command"),
    (b"frobnicate", "unknown command 'frobnicate'"),
    (b"\xff\xfe", "not UTF-8"),
    (b"fault", "usage: fault SPEC"),
    (b"fault call=NOPE", "unknown call"),
    (b"fault memory-lock-busy=0000:09:00.0", "no function 0000:09:00.0"),
    (b"unplug", "usage: unplug BDF"),
    (b"unplug 01:00", "not a function address"),
    (b"clear now", "usage: clear"),
    (b"x" * (C.MAX_COMMAND + 1), "longer than"),
])
def test_bad_commands_are_control_errors(text: bytes, problem: str) -> None:
    with pytest.raises(C.ControlError) as exc:
        C.run_command(_FakeServer(), text)  # type: ignore[arg-type]
    assert problem in str(exc.value)
    assert exc.value.errno == errno.EINVAL


def test_fault_clear_faults_and_unplug_commands() -> None:
    srv = _FakeServer()
    assert C.run_command(srv, "fault call=VFIO_DEVICE_RESET,nth=2,errno=EIO") == (  # type: ignore[arg-type]
        "armed call=VFIO_DEVICE_RESET,nth=2,errno=EIO\n")
    assert srv.faults.armed and len(srv.faults.rules) == 1
    assert '"spec": "call=VFIO_DEVICE_RESET,nth=2,errno=EIO"' in C.run_command(srv, "faults")  # type: ignore[arg-type]
    assert C.run_command(srv, "clear") == "cleared\n"  # type: ignore[arg-type]
    assert not srv.faults.armed
    assert C.run_command(srv, "unplug 01:00.1") == "unplugged 0000:01:00.1\n"
    assert srv.unplugged == ["0000:01:00.1"]


def test_unplug_without_server_support_is_enosys() -> None:
    class Bare:
        faults = FaultPlan()

    with pytest.raises(KernelError) as exc:
        C.run_command(Bare(), "unplug 0000:01:00.1")  # type: ignore[arg-type]
    assert exc.value.errno == errno.ENOSYS


# ------------------------------------------------------------------ show, sweep verdicts


def test_render_faults() -> None:
    k = load_tree(FIXTURES / "dual-function-nic.toml").make_kernel()
    assert cli.render_faults(k.describe()["faults"]) == ""
    assert cli.render_faults(None) == ""
    k.faults.add(cli.fault_arg("call=open,nth=1,errno=EACCES"))
    k.faults.add(cli.fault_arg("memory-lock-busy=0000:01:00.1"))
    p = FakeProcess()
    with pytest.raises(KernelError):
        k.faults.open(k.open, "vfio/devices/vfio1", p.task())
    text = cli.render_faults(k.describe()["faults"])
    assert "call=open,nth=1,errno=EACCES  (matched 1, failed 1)" in text
    assert "memory-lock-busy=0000:01:00.1" in text
    assert f"call #1 open on vfio/devices/vfio1 [0000:01:00.1] by pid {p.pid}: EACCES" in text


def test_leftovers_name_what_is_still_held() -> None:
    k = load_tree(FIXTURES / "dual-function-nic.toml").make_kernel()
    assert leftovers(k.describe()) == []
    p = FakeProcess()
    t = p.task()
    ictx = p.install(k.open("iommu", t))
    dev = p.install(k.open("vfio/devices/vfio0", t))
    arg = p.alloc(S.VFIO_DEVICE_BIND_IOMMUFD.pack(argsz=16, iommufd=ictx))
    p.fds[dev].ioctl(t, I.VFIO_DEVICE_BIND_IOMMUFD, arg)  # type: ignore[union-attr]
    held = leftovers(k.describe())
    assert any(h.startswith("device 0000:01:00.0: open_count") and "iommufd" in h for h in held)
    assert any(h.startswith("iommufd context") for h in held)
    p.exit()
    assert leftovers(k.describe()) == []


@pytest.mark.parametrize(("status", "report", "verdict"), [
    (0, {}, "ok"),
    (1, {}, "failed-cleanly"),
    (139, {}, "CRASHED"),
    (134, {}, "CRASHED"),
    (None, None, "HUNG"),
    (0, None, "BROKEN"),
    (0, {"invariants": ["group 13: bad"]}, "BROKEN"),
    (1, {"leftovers": ["device 0000:01:00.0: open_count"]}, "LEAKED"),
])
def test_verdicts(status: int | None, report: dict[str, Any] | None, verdict: str) -> None:
    r = Run(1, None, status=status)
    _verdict(r, report, fakedev_failed=report is None)
    assert r.verdict == verdict
    if status == 139:
        assert r.signal == "SIGSEGV"


def test_sweep_table_and_json_shape() -> None:
    s = Sweep(["prog"], errno="ENOMEM")
    s.counted = 2
    s.runs = [Run(0, None, status=0, verdict="ok"),
              Run(1, {"seq": 1, "op": "open", "node": "iommu", "devices": []}, status=1, verdict="failed-cleanly"),
              Run(2, {"seq": 2, "op": "VFIO_DEVICE_GET_INFO", "node": "vfio0", "devices": ["0000:01:00.0"]},
                  status=139, verdict="CRASHED", signal="SIGSEGV")]
    table = s.table()
    assert "#2 VFIO_DEVICE_GET_INFO on vfio0 [0000:01:00.0]" in table
    assert "139 (SIGSEGV)" in table and "CRASHED" in table
    assert table.splitlines()[-1].startswith("2 calls counted (any call), 2 failed one by one with ENOMEM: 1 run")
    d = s.as_dict()
    assert d["bad"] == 1 and [r["verdict"] for r in d["runs"]] == ["ok", "failed-cleanly", "CRASHED"]
    assert s.fault_spec(2) == "call=*,nth=2,errno=ENOMEM"
