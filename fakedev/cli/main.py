"""The ``fakedev`` command: ``run``, ``mount``, ``show``, ``trace-decode``,
``fault``, ``unplug``, ``sweep``.

What lives here: argument parsing, the order of start-up (the private
namespace is entered before trio starts, because ``unshare(CLONE_NEWNS)``
refuses a multi-threaded process), and the one trio nursery that owns the FUSE
server and the child process of ``fakedev run``. What must not: kernel
behaviour, FUSE protocol or mount details (those live in fakedev.kernel,
fakedev.fuse and fakedev.host).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from fakedev.cli import dma as dma_cli

PROG = "fakedev"

# Environment handed to the program run by ``fakedev run``.
ENV_MOUNT = "FAKEDEV_MOUNT"  # where the FUSE mount is, inside the namespace
ENV_PID = "FAKEDEV_PID"  # pid of the serving fakedev process
STATE_FILE = ".fakedev/state.json"


CONTROL_FILE = ".fakedev/control"


class CliError(Exception):
    """A user-facing failure: printed as ``fakedev: <message>``, exit 1."""


def _fail(message: str, status: int = 1) -> NoReturn:
    print(f"{PROG}: {message}", file=sys.stderr)
    raise SystemExit(status)


def fault_arg(text: str) -> Any:
    """argparse type of ``--fault SPEC``: the parsed FaultSpec, or a usage error."""
    from fakedev.kernel.fault_inject import FaultSpecError, parse_spec

    try:
        return parse_spec(text)
    except FaultSpecError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from exc


FAULT_HELP = (
    "inject a fault (repeatable): call=OP[,nth=N][,count=K|all][,device=BDF][,errno=E] "
    "(OP an ioctl name, open, read, write or *), unplug=BDF,after=OP[,nth=N], "
    "memory-lock-busy=BDF, reset-fails=BDF[,errno=E], device-lock-busy=BDF"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Serve a model of Linux VFIO and iommufd at the real /dev and /sys paths.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run a program with the fake devices at /dev/vfio, /dev/iommu and /sys",
        description="Run CMD in a private mount namespace in which the device tree's "
        "nodes appear at /dev/vfio/..., /dev/iommu and its sysfs under /sys. "
        "The host's /dev, /sys and mount table do not change. Exit status is CMD's.",
    )
    run.add_argument("--tree", type=Path, help="device tree file (default: the bundled default)")
    run.add_argument("--trace", type=Path, help="record every call to FILE")
    run.add_argument(
        "--trace-text", action="store_true", help="print the decoded call trace to stderr"
    )
    run.add_argument(
        "--rootless",
        action="store_true",
        default=None,
        help="use a user namespace even when root (default: only when not root)",
    )
    run.add_argument(
        "--supervise",
        action="store_true",
        help="answer VFIO_GROUP_GET_DEVICE_FD through a seccomp supervisor, so the legacy "
        "group path works (sets no_new_privs for CMD)",
    )
    run.add_argument(
        "--stat-mode",
        action="store_true",
        help="the nodes stat as character devices (S_ISCHR, st_rdev), for programs that "
        "check (QEMU's open_cdev); every stat of CMD is trapped",
    )
    run.add_argument("--fault", type=fault_arg, action="append", default=[], metavar="SPEC",
                     help=FAULT_HELP)
    run.add_argument(
        "--fault-report",
        type=Path,
        metavar="FILE",
        help="after CMD, write JSON to FILE: its exit status, every call it made, the "
        "injected failures, the model's invariant violations and what it still holds",
    )
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")

    mnt = sub.add_parser("mount", help="serve the device nodes at DIR in the foreground")
    mnt.add_argument("--tree", type=Path, help="device tree file")
    mnt.add_argument("--trace", type=Path, help="record every call to FILE")
    mnt.add_argument("--trace-text", action="store_true", help="print the decoded trace")
    mnt.add_argument("--fault", type=fault_arg, action="append", default=[], metavar="SPEC",
                     help=FAULT_HELP)
    mnt.add_argument("dir", type=Path)

    show = sub.add_parser("show", help="show a device tree, or the state of a running fakedev")
    show.add_argument("--tree", type=Path, help="device tree file")
    show.add_argument(
        "--pid", type=int, help="a process inside a `fakedev run` (or the server itself)"
    )
    show.add_argument("--mount", type=Path, help="a directory served by `fakedev mount`")
    show.add_argument("--json", action="store_true", help="print the raw state as JSON")

    dec = sub.add_parser("trace-decode", help="print a recorded trace as text")
    dec.add_argument("file", type=Path)
    dma_cli.register(sub)
    _add_fault_commands(sub)
    return p


def _add_fault_commands(sub: Any) -> None:
    """``fault``, ``unplug`` and ``sweep``."""

    def where(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--mount", type=Path, help="a directory served by `fakedev mount`")
        sp.add_argument("--pid", type=int, help="a process inside a `fakedev run`")

    flt = sub.add_parser(
        "fault",
        help="arm faults in a running fakedev (inside `fakedev run`, or --mount/--pid)",
        description="Write to the running fakedev's control file (.fakedev/control). "
        + FAULT_HELP,
    )
    where(flt)
    flt.add_argument("--clear", action="store_true", help="disarm every fault first")
    flt.add_argument("--list", action="store_true", help="print the armed faults and injections")
    flt.add_argument("spec", nargs="*", type=fault_arg, metavar="SPEC")

    unp = sub.add_parser("unplug", help="unplug a function from a running fakedev")
    where(unp)
    unp.add_argument("bdf")

    swp = sub.add_parser(
        "sweep",
        help="rerun CMD once per call it makes, failing that call; report crashes and hangs",
        description="Run CMD under fakedev once to count its calls, then once per call with "
        "only that call failing (a fresh model each time). Verdicts: ok, failed-cleanly, "
        "CRASHED (signal), HUNG (timeout), LEAKED (the model still holds something), "
        "BROKEN (invariants). Exit status 1 if any run crashed, hung, leaked or broke.",
    )
    swp.add_argument("--tree", type=Path, help="device tree file")
    swp.add_argument("--call", default="*", metavar="OP",
                     help="fail only calls of OP (an ioctl name, open, read, write; default: every call)")
    swp.add_argument("--errno", default=None, metavar="E", help="errno to fail with (default ENOMEM)")
    swp.add_argument("--device", metavar="BDF", help="only calls targeting this function")
    swp.add_argument("--timeout", type=float, default=None, metavar="S",
                     help="seconds each run may take before it counts as HUNG (default 30)")
    swp.add_argument("--limit", type=int, metavar="N", help="fail at most the first N calls")
    swp.add_argument("--supervise", action="store_true", help="as `fakedev run --supervise`")
    swp.add_argument("--stat-mode", action="store_true", help="as `fakedev run --stat-mode`")
    swp.add_argument("--json", action="store_true", help="print the result as JSON")
    swp.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("show", "trace-decode"):
        # Printing into `| head` ends quietly, as other tools do.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "mount":
            return cmd_mount(args)
        if args.command == "show":
            return cmd_show(args)
        if args.command == "trace-decode":
            return cmd_trace_decode(args)
        if args.command == "dma":
            return dma_cli.cmd_dma(args)
        if args.command == "fault":
            return cmd_fault(args)
        if args.command == "unplug":
            return cmd_unplug(args)
        if args.command == "sweep":
            return cmd_sweep(args)
    except CliError as exc:
        _fail(str(exc))
    raise AssertionError(args.command)


# ------------------------------------------------------------------ helpers


def load_kernel(tree_path: Path | None) -> tuple[Any, Any]:
    """(tree, kernel) for ``tree_path`` or the default tree."""
    from fakedev.tree import default_tree_path, load_tree

    path = tree_path if tree_path is not None else default_tree_path()
    try:
        tree = load_tree(path)
    except FileNotFoundError as exc:
        raise CliError(f"no such tree file: {path}") from exc
    except (ValueError, KeyError) as exc:
        raise CliError(f"{path}: {exc}") from exc
    return tree, tree.make_kernel()


def make_server(kernel: Any, trace: Path | None, trace_text: bool) -> Any:
    """A Server for ``kernel``; tracing to ``trace`` (JSON lines) and/or as
    decoded text on stderr."""
    from fakedev.host.server import Server
    from fakedev.host.trace import Tracer

    tracer = Tracer(
        str(trace) if trace is not None else None,
        "/proc/self/fd/2" if trace_text else None,
        enabled=trace is not None or trace_text,
    )
    return Server(kernel, tracer=tracer)


def apply_faults(kernel: Any, specs: Sequence[Any]) -> None:
    """Arm ``--fault`` specs in the model (a device must be one of its functions)."""
    from fakedev.kernel.fault_inject import FaultSpecError

    for spec in specs:
        try:
            kernel.faults.add(spec)
        except FaultSpecError as exc:
            raise CliError(f"--fault {spec.text()}: {exc}") from exc


def write_fault_report(path: Path, status: int, kernel: Any) -> None:
    """``--fault-report``: what ``fakedev sweep`` needs to judge a run."""
    from fakedev.cli.sweep import leftovers

    plan = kernel.faults
    report = {
        "status": status,
        "calls": [c.as_dict() for c in plan.calls],
        "injected": [i.as_dict() for i in plan.injected],
        "injected_total": plan.injected_total,
        "invariants": kernel.check_invariants(),
        "leftovers": leftovers(kernel.describe()),
    }
    try:
        path.write_text(json.dumps(report, indent=1) + "\n")
    except OSError as exc:
        raise CliError(f"--fault-report {path}: {exc.strerror}") from exc


def exit_status(returncode: int) -> int:
    """A shell-style status: 128+N for a child killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


# ------------------------------------------------------------------ run


def cmd_run(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise CliError("run: missing command (usage: fakedev run [options] -- CMD ARGS...)")
    rootless = args.rootless if args.rootless else os.geteuid() != 0
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        mode = ""
        try:
            mode = f" (mode {os.stat('/dev/fuse').st_mode & 0o777:04o})"
        except OSError:
            pass
        raise CliError(
            f"/dev/fuse is not usable by uid {os.getuid()}{mode}; as root run "
            "`chmod 0666 /dev/fuse` (its usual mode) or load the fuse module"
        )

    from fakedev.host import namespace

    # Before anything can start a thread (trio, imports with thread pools).
    try:
        ns = namespace.enter_private_namespace(rootless=rootless)
    except namespace.NamespaceError as exc:
        raise CliError(str(exc)) from exc

    import trio

    from fakedev.cli.session import OwnedNodes, RunSession

    tree, kernel = load_kernel(args.tree)
    apply_faults(kernel, args.fault)
    if args.fault_report is not None:
        kernel.faults.log_calls = True
    served: Any = kernel
    if ns.rootless:
        served = OwnedNodes(served, ns.uid, ns.gid)
    server = make_server(served, args.trace, args.trace_text)
    session = RunSession(
        tree=tree,
        kernel=kernel,
        server=server,
        cmd=cmd,
        rootless=ns.rootless,
        staging_root=Path(tempfile.mkdtemp(prefix="fakedev-")),
        supervise=args.supervise,
        stat_mode=args.stat_mode,
    )
    status: int = trio.run(session.run)
    if args.fault_report is not None:
        write_fault_report(args.fault_report, status, kernel)
    return status


# ------------------------------------------------------------------ mount


def cmd_mount(args: argparse.Namespace) -> int:
    import trio

    _tree, kernel = load_kernel(args.tree)
    apply_faults(kernel, args.fault)
    server = make_server(kernel, args.trace, args.trace_text)
    if not args.dir.is_dir():
        raise CliError(f"mount: {args.dir} is not a directory")

    ended_by_itself = False

    async def serve() -> None:
        nonlocal ended_by_itself
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:

                async def run_server(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                    nonlocal ended_by_itself
                    await server.serve(str(args.dir), task_status=task_status)
                    # Unmounted or aborted from outside: nothing left to serve.
                    ended_by_itself = True
                    nursery.cancel_scope.cancel()

                async def stop_on_signal() -> None:
                    async for _signum in signals:
                        nursery.cancel_scope.cancel()  # serve() unmounts on the way out
                        return

                await nursery.start(run_server)
                nursery.start_soon(stop_on_signal)
                print(f"{PROG}: serving at {args.dir} (Ctrl-C to stop)", file=sys.stderr)

    trio.run(serve)
    if ended_by_itself:
        print(f"{PROG}: the mount at {args.dir} was unmounted or its connection aborted",
              file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------ show


def state_path_for_pid(pid: int) -> Path:
    """The state file of the fakedev serving the process ``pid``, reached
    through ``/proc/<pid>/root`` (so it works from outside the namespace)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError as exc:
        raise CliError(f"show: cannot read the environment of pid {pid}: {exc.strerror}") from exc
    mount = None
    for item in environ:
        if item.startswith(ENV_MOUNT.encode() + b"="):
            mount = item.split(b"=", 1)[1].decode()
    if mount is None:
        # The server itself: find its staging mount in its mountinfo.
        from fakedev.host.namespace import read_mountinfo

        for e in read_mountinfo(f"/proc/{pid}/mountinfo"):
            if e.fstype.startswith("fuse") and e.mountpoint.endswith("/fuse"):
                mount = e.mountpoint
                break
    if mount is None:
        raise CliError(f"show: pid {pid} is not inside a `fakedev run`")
    return Path(f"/proc/{pid}/root") / mount.lstrip("/") / STATE_FILE


def cmd_show(args: argparse.Namespace) -> int:
    state: dict[str, Any] | None = None
    source = None
    if args.pid is not None:
        path = state_path_for_pid(args.pid)
    elif args.mount is not None:
        path = args.mount / STATE_FILE
    elif args.tree is None and os.environ.get(ENV_MOUNT):
        path = Path(os.environ[ENV_MOUNT]) / STATE_FILE
    else:
        path = None
    if path is not None:
        try:
            state = json.loads(path.read_text())
        except OSError as exc:
            raise CliError(f"show: cannot read {path}: {exc.strerror}") from exc
        source = str(path)
        if args.json:
            print(json.dumps(state, indent=2, sort_keys=True))
            return 0
        from fakedev.cli.render import render_state

        # the faults get their own section below
        print(render_state({k: v for k, v in state.items() if k != "faults"}, source=source))
        faults = render_faults(state.get("faults"))
        if faults:
            print(faults)
        return 0
    _tree, kernel = load_kernel(args.tree)
    if args.json:
        print(json.dumps(kernel.describe(), indent=2, sort_keys=True, default=str))
        return 0
    from fakedev.cli.render import render_kernel

    print(render_kernel(kernel))
    return 0


def render_faults(faults: Any) -> str:
    """The fault section of a running model's state ("" when none was armed)."""
    if not isinstance(faults, dict):
        return ""
    rules, unplugs, hooks = faults.get("rules", []), faults.get("unplugs", []), faults.get("hooks", [])
    injected = faults.get("injected", [])
    if not (rules or unplugs or hooks or injected):
        return ""
    lines = ["faults:"]
    lines += [f"  {r['spec']}  (matched {r['seen']}, failed {r['fired']})" for r in rules]
    lines += [f"  {u['spec']}  ({'done' if u['fired'] else 'waiting'})" for u in unplugs]
    lines += [f"  {h}" for h in hooks]
    if injected:
        lines.append(f"injected failures ({faults.get('injected_total', len(injected))}):")
        for i in injected:
            devs = ",".join(i.get("devices", []))
            lines.append(f"  call #{i['seq']} {i['op']} on {i['node']}{f' [{devs}]' if devs else ''} "
                         f"by pid {i['pid']}: {i['errno']}")
    return "\n".join(lines)


# ------------------------------------------------------------------ fault / unplug


def control_path(args: argparse.Namespace) -> Path:
    """The control file of the fakedev meant: --mount DIR, --pid PID, or the run we are inside."""
    if args.mount is not None:
        return Path(args.mount) / CONTROL_FILE
    if args.pid is not None:
        return state_path_for_pid(args.pid).parent / Path(CONTROL_FILE).name
    if os.environ.get(ENV_MOUNT):
        return Path(os.environ[ENV_MOUNT]) / CONTROL_FILE
    raise CliError(f"{args.command}: not inside a `fakedev run` (give --mount DIR or --pid PID)")


def send_control(path: Path, command: str) -> str:
    """Write one command to the control file ``path``; its reply. CliError with the
    server's reason when the command is refused."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as exc:
        raise CliError(f"cannot open {path}: {exc.strerror}") from exc
    try:
        try:
            os.write(fd, command.encode() + b"\n")
        except OSError as exc:
            reply = os.pread(fd, 65536, 0).decode(errors="replace").strip()
            reason = reply.removeprefix("error: ") if reply.startswith("error:") else exc.strerror
            raise CliError(f"{command}: {reason}") from exc
        return os.pread(fd, 65536, 0).decode(errors="replace")
    finally:
        os.close(fd)


def cmd_fault(args: argparse.Namespace) -> int:
    if not (args.spec or args.clear or args.list):
        raise CliError("fault: give a SPEC, --clear or --list")
    path = control_path(args)
    if args.clear:
        sys.stdout.write(send_control(path, "clear"))
    for spec in args.spec:
        sys.stdout.write(send_control(path, f"fault {spec.text()}"))
    if args.list:
        state = json.loads(send_control(path, "faults"))
        print(render_faults(state) or "no faults armed")
    return 0


def cmd_unplug(args: argparse.Namespace) -> int:
    from fakedev.kernel.fault_inject import canonical_bdf

    bdf = canonical_bdf(args.bdf)
    if bdf is None:
        raise CliError(f"unplug: {args.bdf!r} is not a function address like 0000:01:00.0")
    sys.stdout.write(send_control(control_path(args), f"unplug {bdf}"))
    return 0


# ------------------------------------------------------------------ sweep


def cmd_sweep(args: argparse.Namespace) -> int:
    from fakedev.cli.sweep import DEFAULT_ERRNO, DEFAULT_TIMEOUT, Sweep
    from fakedev.kernel.fault_inject import canonical_bdf, errno_of, known_op

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise CliError("sweep: missing command (usage: fakedev sweep [options] -- CMD ARGS...)")
    if not known_op(args.call):
        raise CliError(f"sweep: --call {args.call!r} is not an ioctl name, open, read, write or *")
    err = args.errno or DEFAULT_ERRNO
    if errno_of(err) is None:
        raise CliError(f"sweep: --errno {err!r} is not an errno name like EIO")
    device = None
    if args.device is not None:
        device = canonical_bdf(args.device)
        if device is None:
            raise CliError(f"sweep: --device {args.device!r} is not a function address")
    timeout = args.timeout if args.timeout is not None else DEFAULT_TIMEOUT
    if timeout <= 0:
        raise CliError("sweep: --timeout must be positive")
    if args.limit is not None and args.limit < 0:
        raise CliError("sweep: --limit must be 0 or more")
    run_args: list[str] = []
    if args.tree is not None:
        load_kernel(args.tree)  # a bad tree is reported once, here
        run_args += ["--tree", str(args.tree.resolve())]
    if args.supervise:
        run_args.append("--supervise")
    if args.stat_mode:
        run_args.append("--stat-mode")
    sweep = Sweep(cmd, run_args, op=args.call, errno=err, device=device, timeout=timeout,
                  limit=args.limit, progress=sys.stderr)
    status = sweep.run()
    if args.json:
        print(json.dumps(sweep.as_dict(), indent=2))
    else:
        print(sweep.table())
    return status


# ------------------------------------------------------------------ trace-decode


def cmd_trace_decode(args: argparse.Namespace) -> int:
    from fakedev.cli.render import decode_trace_record

    try:
        with open(args.file) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CliError(f"trace-decode: {args.file}:{number}: not JSON: {exc}") from exc
                print(decode_trace_record(rec))
    except OSError as exc:
        raise CliError(f"trace-decode: {args.file}: {exc.strerror}") from exc
    return 0


if __name__ == "__main__":
    sys.exit(main())
