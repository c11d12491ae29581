"""The testbed kernel really provides what agentd builds on.

Runs only on a suitable kernel (`make test-kernel`: the QEMU guest, or the Vagrant VM). Every check here is one
that the development hosts cannot make: their cgroup v2 hierarchy has no memory/cpu controllers, PSI is disabled
and sched_ext is missing. Keep these tests quick: under TCG Python runs 10-15x slower than on the host.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import os
import select
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import SLOW, Daemon

from agentd.api.gen import agentd_pb2 as pb
from agentd.kernel.mounts import cgroup2_mount

pytestmark = pytest.mark.guest

REQUIRED_CONTROLLERS = ("memory", "cpu", "pids", "io")
# Interface files agentd reads or writes on a tool-call cgroup.
INTERFACE_FILES = (
    "cgroup.kill", "cgroup.freeze", "cgroup.events",
    "memory.max", "memory.high", "memory.low", "memory.peak", "memory.events", "memory.oom.group", "memory.pressure",
    "cpu.max", "cpu.weight", "cpu.stat",
    "pids.max", "pids.peak",
    "io.max", "io.stat",
)  # fmt: skip
MiB = 1 << 20
SCHED_EXT = Path("/sys/kernel/sched_ext")
MINIMAL_SCX = Path(__file__).with_name("minimal_scx.bpf.c")
MINIMAL_SCX_NAME = "agentd_minimal"  # the scheduler's .name in minimal_scx.bpf.c


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fstype, super options) of every mount, from /proc/self/mountinfo."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fstype, _, rest = right.partition(" ")
        out.append((left.split(" ")[4], fstype, rest.split(" ")[-1]))
    return out


def _keyed(path: Path) -> dict[str, int]:
    """Parse a flat-keyed cgroup file such as memory.events ("oom_kill 1")."""
    return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines())}


def _remove_cgroup(path: Path) -> None:
    """Kill whatever is left in a leaf cgroup, wait until it is empty and remove it."""
    if not path.exists():
        return
    with contextlib.suppress(OSError):
        (path / "cgroup.kill").write_text("1")
    deadline = time.monotonic() + 20
    while True:
        try:
            path.rmdir()
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture
def cgroup() -> Iterator[Path]:
    """A fresh leaf cgroup below the cgroup2 root with memory/cpu/pids/io enabled; removed afterwards."""
    root = cgroup2_mount().path
    enabled = (root / "cgroup.subtree_control").read_text().split()
    missing = [c for c in REQUIRED_CONTROLLERS if c not in enabled]
    if missing:
        (root / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in missing))
    path = root / f"agentd-testbed-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield path
    finally:
        _remove_cgroup(path)


def _spawn_in(cgroup: Path, *argv: str) -> subprocess.Popen[bytes]:
    """Start argv inside cgroup: the shell moves itself in, then execs (nothing is charged before the move)."""
    return subprocess.Popen(
        ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cgroup / "cgroup.procs"), *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_cgroup2_root_has_required_controllers() -> None:
    root = cgroup2_mount().path
    available = set((root / "cgroup.controllers").read_text().split())
    assert set(REQUIRED_CONTROLLERS) <= available, f"{root}/cgroup.controllers: {sorted(available)}"


def test_leaf_cgroup_has_the_interface_files_agentd_uses(cgroup: Path) -> None:
    missing = [name for name in INTERFACE_FILES if not (cgroup / name).exists()]
    assert not missing, missing
    # A restarted daemon recognises its cgroups by user xattrs on cgroupfs.
    os.setxattr(cgroup, "user.agentd.test", b"1")
    assert os.getxattr(cgroup, "user.agentd.test") == b"1"


def test_memory_max_oom_kills_inside_the_cgroup(cgroup: Path) -> None:
    (cgroup / "memory.max").write_text(str(50 * MiB))
    if (cgroup / "memory.swap.max").exists():
        (cgroup / "memory.swap.max").write_text("0")
    # dd reads 200 MiB from /dev/zero into one buffer: allocates and touches every page.
    proc = _spawn_in(cgroup, "dd", "if=/dev/zero", "of=/dev/null", "bs=200M", "count=1")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, f"dd exit {proc.returncode}: {err.decode(errors='replace')}"
    events = _keyed(cgroup / "memory.events")
    assert events["oom_kill"] >= 1, events
    assert events["max"] >= 1, events


def test_psi_trigger_is_accepted_and_fires_under_memory_pressure(cgroup: Path) -> None:
    fd = os.open(cgroup / "memory.pressure", os.O_RDWR | os.O_NONBLOCK)
    try:
        # EINVAL here means PSI is disabled (as on the development hosts).
        os.write(fd, b"some 50000 1000000")
        poller = select.poll()
        poller.register(fd, select.POLLPRI)
        assert poller.poll(0) == [], "trigger fired without any pressure"
        # Over memory.high (no swap to reclaim to) the kernel throttles the allocator: a memory stall.
        (cgroup / "memory.high").write_text(str(16 * MiB))
        proc = _spawn_in(cgroup, "dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1000")
        try:
            events = poller.poll(30_000)
        finally:
            (cgroup / "cgroup.kill").write_text("1")
            proc.wait(timeout=60)
        assert events, "no PSI event within 30 s of memory.high throttling"
        assert events[0][1] & select.POLLPRI, events
        assert not events[0][1] & (select.POLLERR | select.POLLNVAL), events
    finally:
        os.close(fd)


def _kernel_config() -> dict[str, str]:
    """The running kernel's build configuration (CONFIG_X -> value), from wherever this system keeps it."""
    release = os.uname().release
    for path in (Path(f"/boot/config-{release}"), Path(f"/usr/lib/modules/{release}/config")):
        if path.exists():
            text = path.read_text()
            break
    else:
        ikconfig = Path("/proc/config.gz")
        assert ikconfig.exists(), f"no build configuration for kernel {release} in /boot, /usr/lib/modules or /proc"
        text = gzip.decompress(ikconfig.read_bytes()).decode()
    return dict(line.split("=", 1) for line in text.splitlines() if line.startswith("CONFIG_"))


def test_sched_ext_is_built_in_and_reported(daemon: Daemon) -> None:
    """The kernel's own build configuration, not the file agentd's probe reads; and agentd agrees."""
    assert _kernel_config().get("CONFIG_SCHED_CLASS_EXT") == "y", "kernel built without CONFIG_SCHED_CLASS_EXT"
    with daemon.admin() as admin:
        assert admin.call("GetStatus", pb.GetStatusRequest()).sched_ext_available


def _sched_ext_state() -> str:
    return (SCHED_EXT / "state").read_text().strip()


def test_a_sched_ext_scheduler_can_be_registered(tmp_path: Path) -> None:
    """Compile the smallest BPF scheduler (minimal_scx.bpf.c), register it as struct_ops: the kernel switches
    to it; removing its pinned link switches back."""
    assert (SCHED_EXT / "state").exists(), "kernel without CONFIG_SCHED_CLASS_EXT"
    assert _sched_ext_state() == "disabled", "another BPF scheduler is running"
    obj = tmp_path / "minimal_scx.bpf.o"
    subprocess.run(["clang", "-target", "bpf", "-g", "-O2", "-Wall", "-Werror", "-c", str(MINIMAL_SCX), "-o",
                    str(obj)], check=True, timeout=120 * SLOW)
    links = Path("/sys/fs/bpf") / f"agentd-testbed-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    links.mkdir()
    try:
        subprocess.run(["bpftool", "struct_ops", "register", str(obj), str(links)], check=True, timeout=60 * SLOW)
        assert (_sched_ext_state(), (SCHED_EXT / "root" / "ops").read_text().strip()) == (
            "enabled", MINIMAL_SCX_NAME)
    finally:
        shutil.rmtree(links)  # the pinned link is the scheduler's last reference: unregistered
    deadline = time.monotonic() + 10 * SLOW
    while _sched_ext_state() != "disabled" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sched_ext_state() == "disabled"


def test_kernel_btf_is_exposed() -> None:
    btf = Path("/sys/kernel/btf/vmlinux")
    assert btf.exists(), "kernel without CONFIG_DEBUG_INFO_BTF"
    with btf.open("rb") as f:
        assert f.read(2) == b"\x9f\xeb"  # BTF magic (little endian)


def test_bpffs_is_mounted() -> None:
    bpf_mounts = [m for m, fstype, _ in _mounts() if fstype == "bpf"]
    assert "/sys/fs/bpf" in bpf_mounts, bpf_mounts
