"""cgroupfs.KeptFiles on the host's cgroup v2: a kept file re-reads afresh, and nothing it keeps pins a cgroup for
longer than one sweep."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentd.kernel import cgroupfs
from agentd.kernel.mounts import cgroup2_mount


@pytest.fixture
def cgroup() -> Iterator[Path]:
    path = cgroup2_mount().path / f"agentd-test-kept-{os.getpid()}"
    path.mkdir()
    try:
        yield path
    finally:
        cgroupfs.remove_tree(path)


def open_fds() -> set[str]:
    return {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")}


def test_a_kept_file_is_read_afresh_each_time(cgroup: Path) -> None:
    files = cgroupfs.KeptFiles()
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert files.read(cgroup, "cgroup.procs") == ""
        cgroupfs.write_file(f"{cgroup}/cgroup.procs", str(child.pid))
        assert files.read(cgroup, "cgroup.procs") == f"{child.pid}\n"  # the same open file, the new content
        assert files.open_count == 1
        assert cgroupfs.parse_flat_keyed(files.read(cgroup, "cgroup.events"))["populated"] == 1
    finally:
        child.kill()
        child.wait()
        files.close()


def test_a_sweep_closes_what_was_not_read_since_the_previous_one(cgroup: Path) -> None:
    files = cgroupfs.KeptFiles()
    try:
        files.read(cgroup, "cgroup.procs")
        files.read(cgroup, "cgroup.events")
        files.sweep()
        assert files.open_count == 2  # both read since the start
        files.read(cgroup, "cgroup.events")
        files.sweep()
        assert files.open_count == 1
        assert f"{cgroup}/cgroup.procs" not in open_fds()
        files.sweep()
        assert files.open_count == 0 and not any(p.startswith(str(cgroup)) for p in open_fds())
    finally:
        files.close()


def test_a_removed_cgroup_reads_as_absent_and_its_file_is_closed(cgroup: Path) -> None:
    files = cgroupfs.KeptFiles()
    gone = cgroup / "gone"
    gone.mkdir()
    try:
        assert files.read(gone, "cgroup.procs") == ""
        gone.rmdir()  # removable while a file of it is open; the open file pins it until closed
        assert files.read(gone, "cgroup.procs") is None
        assert files.open_count == 0
        assert files.read(gone, "cgroup.procs") is None  # and absent from the start
        assert files.read_int(gone, "memory.current") == -1
    finally:
        files.close()


def test_unkept_files_keep_nothing_open(cgroup: Path) -> None:
    before = open_fds()
    assert cgroupfs.UNKEPT.read(cgroup, "cgroup.procs") == ""
    cgroupfs.UNKEPT.sweep()
    assert cgroupfs.UNKEPT.open_count == 0 and open_fds() == before
