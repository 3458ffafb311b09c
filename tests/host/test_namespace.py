"""fakedev.host.namespace: mountinfo parsing, the single-thread rule, and
placement (shadowing a directory, binding over files) inside a private
namespace of a child process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fakedev.host import namespace

REPO = Path(__file__).resolve().parents[2]


def run_py(code: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *sys.path[1:]])
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, env=env, timeout=60,
    )


def dev_mounts() -> list[str]:
    return [
        line for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4] == "/" or line.split()[4].startswith("/dev")
    ]


def test_mountinfo_parsing_unescapes(tmp_path: Path) -> None:
    f = tmp_path / "mountinfo"
    f.write_text(
        "22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
        "30 22 0:5 / /dev rw,nosuid shared:2 - devtmpfs udev rw\n"
        "31 30 0:25 / /dev/pts rw - devpts devpts rw\n"
        "32 31 0:26 / /dev/pts/x rw - tmpfs none rw\n"
        "33 30 0:27 / /dev/my\\040dir rw - tmpfs none rw\n"
        "34 22 0:28 / /devices rw - tmpfs none rw\n"
    )
    entries = namespace.read_mountinfo(str(f))
    assert [e.mountpoint for e in entries][-2:] == ["/dev/my dir", "/devices"]
    assert entries[1].fstype == "devtmpfs" and entries[1].source == "udev"
    assert namespace.top_submounts("/dev", entries) == ["/dev/my dir", "/dev/pts"]


def test_userns_restriction_reads_real_knobs() -> None:
    reason = namespace.userns_restriction()
    maxns = Path("/proc/sys/user/max_user_namespaces").read_text().strip()
    if maxns == "0":
        assert reason is not None and "max_user_namespaces" in reason
    elif not Path("/proc/sys/kernel/unprivileged_userns_clone").exists():
        assert reason is None or "apparmor" in reason


@pytest.mark.needs_root
def test_unshare_refused_once_threads_exist() -> None:
    r = run_py("""
        import threading, time
        from fakedev.host import namespace
        t = threading.Thread(target=time.sleep, args=(1,)); t.start()
        try:
            namespace.enter_private_namespace()
        except namespace.NamespaceError as e:
            print("refused:", e)
    """)
    assert "refused:" in r.stdout and "2 threads" in r.stdout, r.stderr


@pytest.mark.needs_root
def test_shadow_and_bind_leave_the_real_directory_alone(tmp_path: Path) -> None:
    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    (real / "file").write_text("real file\n")
    os.symlink("file", real / "link")
    served = tmp_path / "served"
    served.write_text("served\n")
    staging = tmp_path / "staging"
    staging.mkdir()
    r = run_py(f"""
        from pathlib import Path
        from fakedev.host import namespace as ns
        ns.enter_private_namespace()
        st = ns.make_staging(Path("{staging}"))
        real = Path("{real}")
        ns.ensure_file(st, real / "new" / "node")
        ns.bind(Path("{served}"), real / "new" / "node")
        print(sorted(p.name for p in real.iterdir()))
        print((real / "new" / "node").read_text().strip())
        print((real / "link").read_text().strip())
        (real / "sub" / "through-bind").write_text("x")
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "['file', 'link', 'new', 'sub']", "served", "real file"
    ]
    # Outside: no new entry, but writes through the re-bound subdirectory reach it.
    assert sorted(p.name for p in real.iterdir()) == ["file", "link", "sub"]
    assert (real / "sub" / "through-bind").read_text() == "x"
    assert not os.path.ismount(staging)


@pytest.mark.needs_root
def test_dev_overlay_keeps_real_nodes_and_submounts(tmp_path: Path) -> None:
    served = tmp_path / "iommu"
    served.write_text("fake iommu\n")
    staging = tmp_path / "staging"
    staging.mkdir()
    before = dev_mounts()
    r = run_py(f"""
        import os
        from pathlib import Path
        from fakedev.host import namespace as ns
        ns.enter_private_namespace()
        st = ns.make_staging(Path("{staging}"))
        print(ns.place_dev(st, [("iommu", Path("{served}")),
                                ("vfio/devices/vfio0", Path("{served}"))]))
        print(open("/dev/iommu").read().strip())
        print(open("/dev/vfio/devices/vfio0").read().strip())
        with open("/dev/null", "w") as f:
            f.write("x")
        print(len(open("/dev/urandom", "rb").read(8)))
        print(os.path.ismount("/dev/pts"))
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["overlay", "fake iommu", "fake iommu", "8", "True"]
    assert not os.path.exists("/dev/iommu") or os.path.realpath("/dev/iommu") != str(served)
    assert not os.path.exists("/dev/vfio/devices/vfio0")
    assert dev_mounts() == before
