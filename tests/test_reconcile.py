"""Restart safety: SIGKILL the daemon mid-flight; the next start adopts, finalises and removes, losing nothing."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from damage import damaged, json_values, places
from hypothesis import given, settings
from hypothesis import strategies as st
from support import Daemon, create_session, spawn_in, wait_for

from agentd.api import convert
from agentd.api.gen import agentd_pb2 as pb
from agentd.api.gen import agentd_pb2_grpc as pb_grpc
from agentd.core.intents import Intent, Limits
from agentd.core.sessions import Session, SessionSpec
from agentd.core.toolcalls import ToolCall
from agentd.kernel import cgroupfs


def test_sigkill_and_restart_loses_nothing(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(api={"exit_report_grace_seconds": 0.5}).start()
    with d.admin() as admin:
        sid, token = create_session(admin, "survivor", priority=pb.PRIORITY_HIGH)
        agent = spawn_in(d.session_path(sid) / "agent", ["sleep", "300"])
        running = admin.begin(pb.Intent(tool="long", timeout_seconds=600), sid, report_exit=False)
        long_pid = admin.spawn(running, ["sleep", "300"])
        ending = admin.begin(pb.Intent(tool="ends-while-down"), sid, report_exit=False)
        # Stopped until the daemon is gone, then exits on its own while nobody watches.
        read_fd, write_fd = os.pipe()
        os.set_inheritable(read_fd, True)
        short_pid = admin.spawn(ending, [sys.executable, "-c", f"import os; os.read({read_fd}, 1)"])
        os.close(read_fd)
        pending = admin.begin(pb.Intent(tool="never-joined"), sid)
        timing = admin.begin(pb.Intent(tool="times-out-after-restart", timeout_seconds=3), sid, report_exit=False)
        timing_pid = admin.spawn(timing, ["sleep", "300"])

    d.kill9()
    os.write(write_fd, b"x")
    os.close(write_fd)
    os.waitpid(short_pid, 0)
    stray = d.session_path(sid) / "tc-unlabelled"
    stray.mkdir()  # an unlabelled empty leftover, e.g. a crash between mkdir and label
    records_before = len(d.records_lines())

    d.start()
    with d.admin() as admin:
        assert not stray.exists()
        # The call that ended while the daemon was down got its record (exit status unknown: EXITED).
        ended = admin.wait(ending.call_id, timeout=10)
        assert ended.outcome == pb.OUTCOME_EXITED
        assert admin.wait(pending.call_id, timeout=10).outcome == pb.OUTCOME_CANCELLED
        # The running call was adopted: visible, still timed, still ends through the kernel notification.
        info = admin.call("GetToolCall", pb.ToolCallRequest(call_id=running.call_id))
        assert info.state == pb.CALL_STATE_RUNNING and long_pid in info.pids
        assert admin.wait(timing.call_id, timeout=30).outcome == pb.OUTCOME_TIMEOUT
        os.waitpid(timing_pid, 0)
        os.kill(long_pid, signal.SIGTERM)
        os.waitpid(long_pid, 0)
        ended_after = admin.wait(running.call_id, timeout=10)
        if admin.call("GetStatus", pb.GetStatusRequest()).bpf_lifecycle:
            # The first pid survived the restart in the call's label: the kernel's word on its exit counts.
            assert (ended_after.outcome, ended_after.exit_signal) == (pb.OUTCOME_FAILED, signal.SIGTERM)
        else:
            assert ended_after.outcome == pb.OUTCOME_EXITED
        # The session (and its token) survived; the agent process was never touched.
        assert agent.poll() is None
        with d.sandbox(token) as sandbox:
            assert sandbox.call("GetSession", pb.GetSessionRequest()).spec.priority == pb.PRIORITY_HIGH
        for call in (ending, pending, timing, running):
            d.record(call.call_id)  # written exactly once
        ids = [json.loads(line)["call_id"] for line in d.records_lines()]
        assert len(ids) == len(set(ids)), "a call was recorded twice"
        assert {ending.call_id, pending.call_id, timing.call_id, running.call_id} <= set(ids)
        assert len(ids) == records_before + 4
        admin.call("DeleteSession", pb.DeleteSessionRequest(session_id=sid, force=True))
    agent.wait(5)
    assert sorted(p.name for p in cgroupfs.children(d.cgroup_root / "sessions")) == []


def test_recorded_but_not_removed_is_not_recorded_twice(daemon_factory: Callable[..., Daemon]) -> None:
    """A crash between the record and rmdir: the restart removes the cgroup without a second record."""
    d = daemon_factory().start()
    with d.admin() as admin:
        sid, _ = create_session(admin, "twice")
        done = admin.run(["true"], sid)
    leftover = d.session_path(sid) / f"tc-{done.result.call_id}"
    wait_for(lambda: not leftover.exists())  # recorded, then removed
    d.kill9()
    leftover.mkdir()
    label = {"v": 1, "id": done.result.call_id, "session": sid, "intent": {"tool": "true"},
             "limits": {"memory_high": 1, "memory_max": 1, "cpu_weight": 100, "cpu_max_millicores": 0,
                        "pids_max": 1, "timeout_seconds": 1.0, "network": 1},
             "created": 1.0, "report_exit": False, "confined": False, "implicit": False,
             "not_enforced": []}
    os.setxattr(leftover, "user.agentd.call", json.dumps(label).encode())
    os.setxattr(leftover, "user.agentd.started", b"1.0")
    before = d.records_lines()
    d.start()
    wait_for(lambda: not leftover.exists())
    assert d.records_lines() == before


def test_stop_leaves_sessions_for_the_next_start(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory().start()
    with d.admin() as admin:
        sid, _ = create_session(admin, "kept")
        admin.run(["true"], sid)
        # Spare call cgroups are made ahead (unlabelled, empty) and removed at stop.
        wait_for(lambda: any(p.name.startswith("tc-") for p in cgroupfs.children(d.session_path(sid))))
    assert d.stop() == 0
    assert d.session_path(sid).is_dir()
    assert [p.name for p in cgroupfs.children(d.session_path(sid))] == ["agent"]
    for sock in (d.admin_socket, d.sandbox_socket, d.join_socket):
        assert not sock.exists()
    d.start()
    with d.admin() as admin:
        assert [s.spec.id for s in admin.call("ListSessions", pb.ListSessionsRequest()).sessions] == [sid]


def test_stops_on_sigterm_even_when_started_with_it_blocked(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    inherited = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})  # survives exec
    try:
        d.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, inherited)
    assert d.stop() == 0


def test_a_damaged_record_line_is_skipped_at_start(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory().start()
    with d.admin() as admin:
        sid, _ = create_session(admin, "kept")
        call_id = admin.run(["true"], sid).result.call_id
    d.stop()
    good = d.record(call_id)
    with d.records.open("a") as f:  # the same record, its call id now a number: JSON, but not a record
        f.write(json.dumps({**good, "call_id": 5}) + "\n")
    d.start()
    with d.admin() as admin:
        listed = admin.call("ListToolCalls", pb.ListToolCallsRequest(session_id=sid)).finished
    assert [r.call_id for r in listed] == [call_id]
    assert "skipping unreadable record" in d.log.read_text()


def test_a_session_with_an_unreadable_label_is_left_alone(daemon_factory: Callable[..., Daemon]) -> None:
    """Its calls may hold results not recorded yet: nothing under it is removed, and the start says so."""
    d = daemon_factory().start()
    d.stop()
    damaged = d.session_path("damaged")
    call = damaged / "tc-0123456789abcdef"
    call.mkdir(parents=True)
    os.setxattr(damaged, "user.agentd.session", b'{"v": 1, "spec": {"id": 5}}')
    os.setxattr(call, "user.agentd.call", b'{"v": 1}')
    d.start()
    assert call.is_dir()
    assert "unreadable session label, leaving it alone" in d.log.read_text()
    with d.admin() as admin:
        assert not admin.call("ListSessions", pb.ListSessionsRequest()).sessions


def test_connections_beyond_max_connections_are_refused(daemon_factory: Callable[..., Daemon]) -> None:
    """Each socket takes at most [api] max_connections at once (a sandbox cannot use up agentd's descriptors)."""
    d = daemon_factory(api={"max_connections": 16}).start()
    channels = [grpc.insecure_channel(f"unix:{d.admin_socket}", options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(17)]
    joins = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(17)]
    try:
        codes = []
        for channel in channels:
            try:
                pb_grpc.AdminStub(channel).GetStatus(pb.GetStatusRequest(), timeout=5)  # type: ignore[no-untyped-call]
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
        assert codes == ["OK"] * 16 + ["UNAVAILABLE"]
        for sock in joins:
            sock.settimeout(5)
            sock.connect(str(d.join_socket))
        assert joins[-1].recv(100) == b"ERR RESOURCE_EXHAUSTED too many join connections\n"
        joins[0].sendall(b"JOIN nothing\n")
        assert joins[0].recv(100).startswith(b"ERR PERMISSION_DENIED")  # the first 16 are served
    finally:
        for channel in channels:
            channel.close()
        for sock in joins:
            sock.close()


def test_second_daemon_on_the_same_socket_refuses(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory().start()
    again = subprocess.run([sys.executable, "-m", "agentd.daemon", "--config", str(d.config)],
                           capture_output=True, text=True, env=d.env(), timeout=60)
    assert again.returncode == 1 and "already listening" in again.stderr
    assert d.admin_socket.exists()


def test_a_client_outlives_a_daemon_restart(daemon_factory: Callable[..., Daemon]) -> None:
    """One Client across a restart: its gRPC channel and join connection come back by themselves."""
    d = daemon_factory().start()
    with d.admin() as admin:
        sid, _ = create_session(admin, "steady")
        assert admin.run(["true"], sid).ok
        assert d.stop() == 0
        d.start()
        again = admin.run(["sh", "-c", "exit 4"], sid)
        assert (again.exit_code, again.result.outcome, again.result.exit_code) == (4, pb.OUTCOME_FAILED, 4)


def test_full_disk_keeps_the_call_until_its_record_is_written(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    """The answer does not wait for the records file, but the call's cgroup stays until its line is written:
    with the state directory full, nothing is removed and nothing is lost; once there is room, both happen."""
    state = tmp_path / "state-on-tmpfs"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(state)], check=True)
    d = daemon_factory(daemon={"state_dir": str(state)})
    try:
        d.start()
        with d.admin() as admin:
            sid, _ = create_session(admin, "full")
            filler = os.open(state / "filler", os.O_WRONLY | os.O_CREAT)
            with contextlib.suppress(OSError):
                while True:
                    os.write(filler, b"x" * 4096)
            os.close(filler)
            done = admin.run(["true"], sid)
            assert done.ok
            call_dir = d.session_path(sid) / f"tc-{done.result.call_id}"
            wait_for(lambda: b"records not written" in d.log.read_bytes())
            assert call_dir.is_dir() and cgroupfs.get_label(call_dir, "call") is not None
            listed = admin.call("ListToolCalls", pb.ListToolCallsRequest(session_id=sid)).finished
            assert [r.call_id for r in listed] == [done.result.call_id]
            (state / "filler").unlink()
            wait_for(lambda: not call_dir.exists())
            lines = (state / "records.jsonl").read_text().splitlines()
            assert [json.loads(line)["call_id"] for line in lines] == [done.result.call_id]
    finally:
        d.stop()
        subprocess.run(["umount", str(state)], check=True)


CALL_LABEL = json.loads(ToolCall(
    id="abc", session_id="s1", intent=Intent(tool="t", argv=("a",), labels={"k": "v"}),
    limits=Limits(1, 2, 100, 0, 10, 60.0, 1), path=Path("/cg/sessions/s1/tc-abc"), cgroup_id=1, created=1.0,
    report_exit=True, confined=False,
).label())
SESSION_LABEL = json.loads(Session(SessionSpec(id="s1", priority=1, labels={"a": "b"}), Path("/cg/sessions/s1"),
                                   "f" * 64, 2.0).label())


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_a_damaged_label_is_refused_where_read_or_served(data: st.DataObject) -> None:
    """A label edited by hand or written by another version: refused when reconcile reads it (it logs it; what
    happens to the cgroup then is test_a_session_with_an_unreadable_label_is_left_alone's), or adopted as
    something agentd can serve; never a failure later."""
    kind = data.draw(st.sampled_from(["call", "session"]))
    document = CALL_LABEL if kind == "call" else SESSION_LABEL
    place = data.draw(st.sampled_from(places(document)))
    raw = json.dumps(damaged(document, place, data.draw(json_values))).encode()
    try:
        if kind == "call":
            call = ToolCall.from_label(raw, None, Path("/cg/sessions/s1/tc-abc"), 1)
        else:
            session = Session.from_label(raw, Path("/cg/sessions/s1"))
    except (ValueError, KeyError, TypeError):  # what reconcile catches
        return
    if kind == "call":
        convert.call_to_pb(call, 0, [])
    else:
        convert.session_to_pb(session, 0, 0, 100)


def test_a_label_for_another_cgroup_is_refused() -> None:
    raw = json.dumps(CALL_LABEL).encode()
    with pytest.raises(ValueError, match="not this cgroup"):
        ToolCall.from_label(raw, None, Path("/cg/sessions/s1/tc-other"), 1)
    with pytest.raises(ValueError, match="not this cgroup"):
        ToolCall.from_label(raw, None, Path("/cg/sessions/s2/tc-abc"), 1)
    with pytest.raises(ValueError, match="not this cgroup"):
        Session.from_label(json.dumps(SESSION_LABEL).encode(), Path("/cg/sessions/s2"))
