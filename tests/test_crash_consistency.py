"""After any crash the record says what the agent was told, and a running call stays running.

Both cases are made deterministic with the real kernel: a full state directory (tmpfs) keeps a finished call's
record line from being written, so the daemon is killed between its answer and its record; kernfs's limit of
user xattrs per cgroup keeps a call's start label from being written.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import Daemon, create_session, wait_for

from agentd.api.gen import agentd_pb2 as pb
from agentd.kernel import cgroupfs

KERNFS_MAX_USER_XATTRS = 128  # fs/kernfs: user xattrs one cgroup directory may carry


@contextlib.contextmanager
def full_tmpfs(path: Path) -> Iterator[Path]:
    """A tiny tmpfs at `path`; yields the filler file that keeps it full (unlink it to make room)."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(path)], check=True)
    try:
        yield path / "filler"
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(filler: Path) -> None:
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    with contextlib.suppress(OSError):
        while True:
            os.write(fd, b"x" * 4096)
    os.close(fd)


def test_a_crash_between_answer_and_record_records_what_was_answered(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    with full_tmpfs(tmp_path / "state") as filler:
        d = daemon_factory(daemon={"state_dir": str(filler.parent)})
        d.records = filler.parent / "records.jsonl"
        d.start()
        with d.admin() as admin:
            sid, _ = create_session(admin, "crash")
            fill(filler)  # the records file is empty: its first line needs a page the tmpfs does not have
            told = admin.run(["sh", "-c", "sleep 0.2; exit 4"], sid).result
            assert (told.outcome, told.exit_code) == (pb.OUTCOME_FAILED, 4)
            wait_for(lambda: b"records not written" in d.log.read_bytes())
        d.kill9()
        filler.unlink()
        d.start()
        record = d.record(told.call_id)
        assert record["outcome"] == "FAILED"
        assert record["exit_status"] == {"code": 4, "signal": 0}
        assert record["duration_seconds"] == pytest.approx(told.duration_seconds, abs=1e-6)
        assert record["ended_unix"] == pytest.approx(told.ended_unix, abs=1e-6)
        assert not (d.session_path(sid) / f"tc-{told.call_id}").exists()
        with d.admin() as admin:
            listed = admin.call("ListToolCalls", pb.ListToolCallsRequest(session_id=sid)).finished
            assert [r.exit_code for r in listed if r.call_id == told.call_id] == [4]
        d.stop()


def test_a_running_call_without_its_start_label_is_adopted_running(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    d.start()
    with d.admin() as admin:
        sid, _ = create_session(admin, "nolabel")
        ran = admin.run(["true"], sid)  # afterwards the session has spare call cgroups, made ahead
        session = d.session_path(sid)
        # The finished call's cgroup reads as unlabelled once it is being removed: only then are the rest spares.
        wait_for(lambda: not (session / f"tc-{ran.result.call_id}").exists())
        spares: list[Path] = []

        def spares_made() -> bool:
            spares[:] = [p for p in session.glob("tc-*") if cgroupfs.get_label(p, "call") is None]
            return len(spares) >= 2

        wait_for(spares_made)
        for spare in spares:  # room for the call label, none for the start label
            for i in range(KERNFS_MAX_USER_XATTRS - 1):
                os.setxattr(spare, f"user.filler{i}", b"x")
        sleeper = admin.begin(pb.Intent(tool="sleep", argv=["sleep", "60"]), sid)
        pid = admin.spawn(sleeper, ["sleep", "60"])
        try:
            call_dir = session / f"tc-{sleeper.call_id}"
            assert cgroupfs.procs(call_dir) == [pid]
            assert cgroupfs.get_label(call_dir, "started") is None
            d.kill9()
            d.start()
            with d.admin() as again:
                info = again.call("GetToolCall", pb.ToolCallRequest(call_id=sleeper.call_id))
                assert info.state == pb.CALL_STATE_RUNNING
            assert cgroupfs.procs(call_dir) == [pid]
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    d.stop()
