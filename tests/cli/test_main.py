"""fakedev.cli.main: argument handling, status mapping, `show` from a state file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fakedev.cli import main as cli
from fakedev.cli.render import render_state


def test_run_requires_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--"])
    assert exc.value.code == 1
    assert "missing command" in capsys.readouterr().err


def test_run_keeps_the_command_verbatim() -> None:
    args = cli.build_parser().parse_args(["run", "--tree", "t.toml", "--", "prog", "--tree", "-x"])
    assert args.tree == Path("t.toml")
    assert args.cmd == ["--", "prog", "--tree", "-x"]


@pytest.mark.parametrize(("rc", "status"), [(0, 0), (3, 3), (-15, 143), (-9, 137)])
def test_exit_status(rc: int, status: int) -> None:
    assert cli.exit_status(rc) == status


def test_show_reads_a_state_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / ".fakedev").mkdir()
    state = {"devices": [{"name": "vfio0", "holder": "pid 42"}], "reset_log": []}
    (tmp_path / ".fakedev" / "state.json").write_text(json.dumps(state))
    assert cli.main(["show", "--mount", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "vfio0" in out and "pid 42" in out
    assert cli.main(["show", "--mount", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == state


def test_show_pid_outside_a_run_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["show", "--pid", str(os.getpid())])
    assert "not inside a `fakedev run`" in capsys.readouterr().err


def test_render_state_nested() -> None:
    text = render_state({"a": {"b": [1, {"c": None}]}, "empty": []}, source="x")
    assert text.splitlines() == ["state from x", "a:", "  b:", "    - 1", "    - c: -", "empty: []"]


def test_trace_decode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recs = [
        {"op": "ioctl", "pid": 7, "fd": 5, "node": "vfio0", "name": "VFIO_DEVICE_PCI_HOT_RESET",
         "request": {"argsz": 12, "flags": 0, "count": 0}, "result_struct": None,
         "result": None, "errno": "EINVAL"},
        {"op": "ioctl", "pid": 7, "fd": None, "node": "iommufd", "name": "IOMMU_IOAS_ALLOC",
         "request": {"size": 12, "flags": 0, "out_ioas_id": 0},
         "result_struct": {"size": 12, "flags": 0, "out_ioas_id": 2}, "result": 0, "errno": None},
        {"op": "read", "pid": 7, "node": "vfio0", "offset": 7 << 40, "size": 4, "result": 4,
         "errno": None},
    ]
    f = tmp_path / "trace.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert cli.main(["trace-decode", str(f)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "[pid 7] VFIO_DEVICE_PCI_HOT_RESET(fd=5 vfio0, {argsz=12, flags=0, count=0}) = -1 EINVAL",
        "[pid 7] IOMMU_IOAS_ALLOC(fd=? iommufd, {size=12, flags=0, out_ioas_id=0}) = 0"
        " => {size=12, flags=0, out_ioas_id=2}",
        "[pid 7] pread(vfio0, 4, 0x70000000000) = 4",
    ]
