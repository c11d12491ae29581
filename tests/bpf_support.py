"""Support for the BPF tests, which load programs into this host's kernel: temporary cgroups that are
always removed (their processes killed first), processes placed in a cgroup before they run anything,
bpftool listings of loaded objects. The other tests/test_bpf_*.py modules import it; its own tests check
the clean-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

import pytest

from agentd.kernel.mounts import cgroup2_mount, own_cgroup

requires_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="loading BPF programs and making cgroups need root"
)


class Cgroups:
    """Makes uniquely named cgroups (agentd-test-*) and, on exit, kills their processes and removes them."""

    def __init__(self) -> None:
        self.root = cgroup2_mount().path
        self._made: list[Path] = []

    def make(self, parent: Path | None = None) -> Path:
        path = (parent or self.root) / f"agentd-test-{uuid.uuid4().hex[:10]}"
        path.mkdir()
        self._made.append(path)
        return path

    def __enter__(self) -> Cgroups:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for path in reversed(self._made):  # children before parents
            if path.exists():
                _remove_cgroup(path)


def popen_in_cgroup(cgroup: Path, argv: Sequence[str]) -> subprocess.Popen[bytes]:
    """Start argv inside cgroup: the child moves itself there before exec."""
    procs = cgroup / "cgroup.procs"
    return subprocess.Popen(argv, preexec_fn=lambda: procs.write_text(str(os.getpid())))


def run_in_cgroup(cgroup: Path, action: Callable[[], int]) -> int:
    """Fork, move the child into cgroup, run action there; returns its result, passed back as the child's exit
    status (0..255)."""
    pid = os.fork()
    if pid == 0:
        status = 255
        try:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))
            status = action()
        finally:
            os._exit(status)
    _, wait_status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wait_status)


def bpf_ids(kind: str) -> set[int]:
    """Ids of the loaded BPF objects of a kind (prog, map, link) per bpftool."""
    listing = subprocess.run(["bpftool", "-j", kind, "list"], check=True, capture_output=True, text=True)
    return {entry["id"] for entry in json.loads(listing.stdout or "[]")}


def wait_gone(kind: str, ids: set[int]) -> set[int]:
    """Wait (up to 5 s) until none of ids is loaded; returns those still there. Programs outlive their
    links by an RCU grace period, so their ids vanish shortly after detaching."""
    _wait_for(lambda: not bpf_ids(kind) & ids)
    return bpf_ids(kind) & ids


def _remove_cgroup(path: Path) -> None:
    (path / "cgroup.kill").write_text("1")
    _wait_for(lambda: "populated 0" in (path / "cgroup.events").read_text())
    path.rmdir()


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


@requires_root
def test_cgroups_are_removed_with_their_processes() -> None:
    with Cgroups() as cgroups:
        parent = cgroups.make()
        child = cgroups.make(parent)
        sleeper = popen_in_cgroup(child, ["sleep", "60"])
        assert str(sleeper.pid) in (child / "cgroup.procs").read_text().split()
    assert sleeper.wait(timeout=5) == -9
    assert not parent.exists()


@requires_root
def test_run_in_cgroup_reports_the_action_result() -> None:
    with Cgroups() as cgroups:
        cgroup = cgroups.make()
        expected = f"/{cgroup.relative_to(cgroups.root)}"
        assert run_in_cgroup(cgroup, lambda: 7 if own_cgroup() == expected else 1) == 7
