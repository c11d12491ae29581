"""Sessions and tool calls on the real cgroup v2 hierarchy: layout, labels, placement, finalisation, records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import AGENTCTL, Daemon, call_cgroups, create_session, rpc_error, spawn_in, wait_for

from agentd.api.gen import agentd_pb2 as pb
from agentd.api.join import MAX_HELD_PER_CONNECTION
from agentd.joinclient import JoinError, Placement, join
from agentd.kernel import cgroupfs
from agentd.kernel.mounts import cgroup2_mount
from agentd.launch import launch, release


def test_session_layout_and_label(daemon: Daemon) -> None:
    with daemon.admin() as admin:
        sid, token = create_session(admin, "layout-1", priority=pb.PRIORITY_HIGH, labels={"team": "a"})
        try:
            path = daemon.session_path(sid)
            assert (path / "agent").is_dir()
            label = json.loads(os.getxattr(path, "user.agentd.session"))
            assert label["spec"]["id"] == sid and label["spec"]["labels"] == {"team": "a"}
            assert token not in json.dumps(label)  # only a hash of the secret is stored
            assert (daemon.cgroup_root / "supervisor").is_dir()
            assert daemon.proc is not None
            assert cgroupfs.procs(daemon.cgroup_root / "supervisor") == [daemon.proc.pid]
            shown = admin.call("GetSession", pb.GetSessionRequest(session_id=sid))
            assert shown.spec.priority == pb.PRIORITY_HIGH and shown.cgroup == str(path)
            err = rpc_error(admin.call, "CreateSession", pb.CreateSessionRequest(spec=pb.SessionSpec(id=sid)))
            assert err.code().name == "ALREADY_EXISTS"
        finally:
            admin.call("DeleteSession", pb.DeleteSessionRequest(session_id=sid))
        assert not path.exists()


def test_call_runs_in_its_own_cgroup_and_is_finalised(daemon: Daemon, session: tuple[str, str]) -> None:
    sid, _ = session
    with daemon.admin() as admin:
        begun = admin.begin(pb.Intent(tool="probe", argv=["probe"], labels={"k": "v"}), sid)
        call_cgroup = daemon.session_path(sid) / f"tc-{begun.call_id}"
        assert call_cgroup.is_dir()
        assert json.loads(os.getxattr(call_cgroup, "user.agentd.call"))["id"] == begun.call_id
        info = admin.call("GetToolCall", pb.ToolCallRequest(call_id=begun.call_id))
        assert info.state == pb.CALL_STATE_PENDING
        # The child joins through the real socket (SO_PEERCRED) before exec, then reports where it is.
        read_fd, write_fd = os.pipe()
        os.set_inheritable(write_fd, True)
        pid = admin.spawn(begun, [sys.executable, "-c",
                                  f"import os; os.write({write_fd}, open('/proc/self/cgroup').read().encode())"])
        os.close(write_fd)
        _, status = os.waitpid(pid, 0)
        where = os.read(read_fd, 4096).decode()
        os.close(read_fd)
        assert f"0::/{call_cgroup.relative_to(daemon.cgroup_root.parent)}" in where
        result = admin.wait(begun.call_id, timeout=10)
        # Without an exit report the populated notification alone finalises the call.
        assert result.outcome in (pb.OUTCOME_EXITED, pb.OUTCOME_OK)
        assert result.duration_seconds > 0 and result.cpu_user_seconds + result.cpu_system_seconds > 0
        assert result.labels == {"k": "v"}
        assert os.WEXITSTATUS(status) == 0
        wait_for(lambda: not call_cgroup.exists())
        record = json.loads(daemon.records_lines()[-1])
        assert record["call_id"] == begun.call_id and record["session_id"] == sid


def test_exit_status_reaches_result_and_record(daemon: Daemon, session: tuple[str, str]) -> None:
    sid, _ = session
    with daemon.admin() as admin:
        outcome = admin.run(["sh", "-c", "exit 7"], sid)
        assert outcome.exit_code == 7
        assert outcome.result.outcome == pb.OUTCOME_FAILED
        assert outcome.result.has_exit_status and outcome.result.exit_code == 7
        assert "exited with status 7" in outcome.result.feedback
        ok = admin.run(["true"], sid)
        assert ok.result.outcome == pb.OUTCOME_OK and ok.exit_code == 0
        killed = admin.run(["sh", "-c", "kill -9 $$"], sid)
        assert killed.exit_code == 137 and killed.result.exit_signal == 9
        # 137 without memory.events oom_kill is not an OOM.
        assert killed.result.outcome == pb.OUTCOME_FAILED
        assert daemon.record(killed.result.call_id)["exit_status"] == {"code": 0, "signal": 9}
        listed = admin.call("ListToolCalls", pb.ListToolCallsRequest(session_id=sid))
        assert [r.call_id for r in listed.finished][:3] == [
            killed.result.call_id, ok.result.call_id, outcome.result.call_id]


def test_end_kills_stragglers(daemon: Daemon, session: tuple[str, str]) -> None:
    """A tool that leaves a background process behind: EndToolCall kills it atomically (cgroup.kill)."""
    sid, _ = session
    with daemon.admin() as admin:
        outcome = admin.run(["sh", "-c", "sleep 300 & echo $! > /dev/null; exit 0"], sid)
        assert outcome.result.outcome == pb.OUTCOME_OK
        wait_for(lambda: not (daemon.session_path(sid) / f"tc-{outcome.result.call_id}").exists())


def test_timeout_kills_the_whole_tree(daemon: Daemon, session: tuple[str, str]) -> None:
    sid, _ = session
    with daemon.admin() as admin:
        begun = admin.begin(pb.Intent(tool="sleepy", timeout_seconds=0.5), sid, report_exit=False)
        pid = admin.spawn(begun, ["sh", "-c", "sleep 100 & sleep 100"])
        started = time.monotonic()
        result = admin.wait(begun.call_id, timeout=30)
        os.waitpid(pid, 0)
        assert result.outcome == pb.OUTCOME_TIMEOUT
        assert 0.4 < time.monotonic() - started < 10
        assert "timeout of 0.5 s" in result.feedback and not result.retryable
        wait_for(lambda: not (daemon.session_path(sid) / f"tc-{begun.call_id}").exists())


def test_join_token_is_single_use_and_expires(daemon_factory: object) -> None:
    d = daemon_factory(api={"join_timeout_seconds": 0.5}).start()  # type: ignore[operator]
    with d.admin() as admin:
        sid, _ = create_session(admin, "expiry")
        begun = admin.begin(pb.Intent(tool="never"), sid)
        result = admin.wait(begun.call_id, timeout=10)
        assert result.outcome == pb.OUTCOME_CANCELLED and "no process joined" in result.feedback
        with pytest.raises(JoinError) as err:
            join(begun.join_socket, begun.join_token)
        assert err.value.code == "PERMISSION_DENIED"
        used = admin.begin(pb.Intent(tool="once"), sid)
        pid = admin.spawn(used, ["true"])
        os.waitpid(pid, 0)
        with pytest.raises(JoinError):
            join(used.join_socket, used.join_token)
        with pytest.raises(JoinError) as bad:
            join(used.join_socket, "garbage")
        assert bad.value.code == "PERMISSION_DENIED"


def test_an_exited_process_cannot_join(daemon: Daemon, session: tuple[str, str]) -> None:
    """Writing an exiting process into cgroup.procs succeeds without moving it: the join must say so instead of
    leaving a call that never gets a process."""
    sid, _ = session
    with daemon.admin() as admin:
        begun = admin.begin(pb.Intent(tool="late"), sid)
        zombie = subprocess.Popen(["true"])
        stat = Path(f"/proc/{zombie.pid}/stat")
        wait_for(lambda: stat.read_text().split(")")[1].split()[0] == "Z")
        pidfd = os.pidfd_open(zombie.pid)
        placement = Placement(begun.join_socket)
        try:
            with pytest.raises(JoinError) as refused:
                placement.place(begun.join_token, pidfd)
        finally:
            placement.close()
            os.close(pidfd)
            zombie.wait()
        assert refused.value.code == "FAILED_PRECONDITION" and "exited" in str(refused.value)
        pid = admin.spawn(begun, ["true"])  # the token is still good
        os.waitpid(pid, 0)
        assert admin.end(begun.call_id, 0).outcome == pb.OUTCOME_OK


def test_freeze_and_thaw(daemon: Daemon, session: tuple[str, str]) -> None:
    sid, _ = session
    with daemon.admin() as admin:
        begun = admin.begin(pb.Intent(tool="counter"), sid, report_exit=False)
        read_fd, write_fd = os.pipe()
        os.set_inheritable(write_fd, True)
        pid = admin.spawn(begun, [sys.executable, "-u", "-c",
                                  f"import os, time\nwhile True:\n os.write({write_fd}, b'.'); time.sleep(0.01)"])
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        cgroup = daemon.session_path(sid) / f"tc-{begun.call_id}"
        frozen = admin.call("FreezeToolCall", pb.ToolCallRequest(call_id=begun.call_id), admin=True)
        assert frozen.state == pb.CALL_STATE_FROZEN
        assert cgroupfs.frozen(cgroup)
        drained = _drain(read_fd)
        time.sleep(0.3)
        assert _drain(read_fd) == 0, f"a frozen process kept running ({drained} before)"
        thawed = admin.call("ThawToolCall", pb.ToolCallRequest(call_id=begun.call_id), admin=True)
        assert thawed.state == pb.CALL_STATE_RUNNING and not cgroupfs.frozen(cgroup)
        wait_for(lambda: _drain(read_fd) > 0)
        result = admin.call("KillToolCall", pb.KillToolCallRequest(call_id=begun.call_id, reason="test"), admin=True)
        assert result.outcome == pb.OUTCOME_KILLED_BY_POLICY and result.retryable
        os.waitpid(pid, 0)
        os.close(read_fd)


def _drain(fd: int) -> int:
    total = 0
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return total
        if not chunk:
            return total
        total += len(chunk)


def test_frozen_call_times_out(daemon: Daemon, session: tuple[str, str]) -> None:
    """cgroup.kill works on a frozen call: a timeout still ends it."""
    sid, _ = session
    with daemon.admin() as admin:
        begun = admin.begin(pb.Intent(tool="frozen", timeout_seconds=1), sid, report_exit=False)
        pid = admin.spawn(begun, ["sleep", "100"])
        admin.call("FreezeToolCall", pb.ToolCallRequest(call_id=begun.call_id), admin=True)
        result = admin.wait(begun.call_id, timeout=30)
        os.waitpid(pid, 0)
        assert result.outcome == pb.OUTCOME_TIMEOUT


def test_delete_session_kills_calls_and_refuses_live_agents(daemon: Daemon) -> None:
    with daemon.admin() as admin:
        sid, _ = create_session(admin, "doomed")
        path = daemon.session_path(sid)
        agent = spawn_in(path / "agent", ["sleep", "100"])
        begun = admin.begin(pb.Intent(tool="victim"), sid, report_exit=False)
        pid = admin.spawn(begun, ["sh", "-c", "sleep 100 & sleep 100"])
        err = rpc_error(admin.call, "DeleteSession", pb.DeleteSessionRequest(session_id=sid))
        assert err.code().name == "FAILED_PRECONDITION" and "agent process" in err.details()
        assert path.is_dir() and agent.poll() is None
        reply = admin.call("DeleteSession", pb.DeleteSessionRequest(session_id=sid, force=True))
        assert [r.outcome for r in reply.finished] == [pb.OUTCOME_CANCELLED]
        os.waitpid(pid, 0)
        assert agent.wait(5) == -9
        assert not path.exists()
        assert daemon.record(begun.call_id)["outcome"] == "CANCELLED"


def test_place_agent_moves_a_process_tree(daemon: Daemon, session: tuple[str, str]) -> None:
    sid, _ = session
    parent = subprocess.Popen(["sh", "-c", "sleep 100 & sleep 100 & wait"])
    try:
        wait_for(lambda: _children(parent.pid) == 2)
        with daemon.admin() as admin:
            moved = admin.call("PlaceAgent", pb.PlaceAgentRequest(session_id=sid, pid=parent.pid,
                                                                  include_descendants=True), admin=True).moved
            assert sorted(moved) == sorted([parent.pid, *_children_pids(parent.pid)])
            assert set(cgroupfs.procs(daemon.session_path(sid) / "agent")) == set(moved)
            err = rpc_error(admin.call, "PlaceAgent", pb.PlaceAgentRequest(session_id=sid, pid=1), admin=True)
            assert err.code().name == "INVALID_ARGUMENT"
    finally:
        cgroupfs.kill(daemon.session_path(sid) / "agent")
        parent.wait(5)


def _children_pids(pid: int) -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process(pid).children(recursive=True)]


def _children(pid: int) -> int:
    return len(_children_pids(pid))


def test_agentctl_run_passthrough(daemon: Daemon, session: tuple[str, str]) -> None:
    sid, _ = session
    env = daemon.env()
    run = subprocess.run([*AGENTCTL, "run", "--session", sid, "--", "sh", "-c", "read x; echo got:$x; exit 5"],
                         input=b"hello\n", capture_output=True, env=env, timeout=60)
    assert run.returncode == 5
    assert run.stdout == b"got:hello\n"
    assert b"FAILED" in run.stderr and b"exited with status 5" in run.stderr
    sig = subprocess.run([*AGENTCTL, "run", "--session", sid, "--", "sh", "-c", "kill -TERM $$"],
                         capture_output=True, env=env, timeout=60)
    assert sig.returncode == 128 + 15
    missing = subprocess.run([*AGENTCTL, "run", "--session", sid, "--", "/nonexistent/tool"],
                             capture_output=True, env=env, timeout=60)
    assert missing.returncode == 127 and b"/nonexistent/tool" in missing.stderr
    quiet = subprocess.run([*AGENTCTL, "run", "--session", sid, "--memory", "2G", "--", "true"],
                           capture_output=True, env=env, timeout=60)
    assert quiet.returncode == 0 and quiet.stderr == b""


def test_agentctl_session_commands(daemon: Daemon) -> None:
    env = daemon.env()

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*AGENTCTL, *args], capture_output=True, text=True, env=env, timeout=60)

    created = ctl("session", "create", "--id", "cli-1", "--priority", "low", "--memory-budget", "1G")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["token"]
    assert "cli-1\tLOW" in ctl("session", "list").stdout
    assert json.loads(ctl("session", "show", "cli-1").stdout)["spec"]["memory_budget_bytes"] == str(1 << 30)
    status = ctl("status")
    assert status.returncode == 0 and "cgroup root" in status.stdout
    assert ctl("session", "delete", "cli-1").returncode == 0
    gone = ctl("session", "show", "cli-1")
    assert gone.returncode == 125 and "NOT_FOUND" in gone.stderr


def test_join_socket_leaves_no_descriptor_open(daemon: Daemon, session: tuple[str, str]) -> None:
    """Placements by pidfd, held (HOLD + BeginToolCall) or joined (JOIN + pidfd), and finished calls leave no
    descriptor open in agentd."""
    sid, _ = session
    assert daemon.proc is not None
    fds = Path(f"/proc/{daemon.proc.pid}/fd")
    with daemon.admin() as admin:
        admin.run(["true"], sid)  # the client's join connection is open from here on
        before = len(list(fds.iterdir()))
        for _ in range(20):
            assert admin.run(["true"], sid).exit_code == 0
            begun = admin.begin(pb.Intent(tool="joined"), sid)
            os.waitpid(admin.spawn(begun, ["true"]), 0)
            assert admin.end(begun.call_id, 0).outcome == pb.OUTCOME_OK
        wait_for(lambda: len(list(fds.iterdir())) <= before)


def test_end_refuses_what_is_not_a_wait_status(daemon: Daemon, session: tuple[str, str]) -> None:
    sid, _ = session
    with daemon.admin() as admin:
        begun = admin.begin(pb.Intent(tool="ends"), sid)
        pid, go = launch(["true"])
        pidfd = os.pidfd_open(pid)
        placement = Placement(begun.join_socket)
        try:
            assert placement.place(begun.join_token, pidfd) == begun.call_id
            release(go)
            _, status = os.waitpid(pid, 0)
            for bogus in (-1, 1 << 40, 0x137F, 0x10000):  # negative, huge, a stopped child, over 16 bits
                with pytest.raises(JoinError) as refused:
                    placement.end(begun.call_id, bogus)
                assert refused.value.code == "INVALID_ARGUMENT" and "wait status" in str(refused.value)
            result = placement.end(begun.call_id, status)
        finally:
            placement.close()
            os.close(pidfd)
        assert (result.outcome, result.exit_code) == (pb.OUTCOME_OK, 0)


def test_held_process_refusals(daemon: Daemon, session: tuple[str, str]) -> None:
    """A held process that exited, a reference nobody held, a HOLD without a pidfd: refused, nothing created."""
    sid, _ = session
    intent = pb.Intent(tool="held")
    with daemon.admin() as admin:
        placement = Placement(str(daemon.join_socket))
        pid, go = launch(["true"])
        pidfd = os.pidfd_open(pid)
        os.close(go)  # the held child exits without running anything
        os.waitpid(pid, 0)
        placement.hold("gone", pidfd)
        os.close(pidfd)
        request = pb.BeginToolCallRequest(session_id=sid, intent=intent, held_process="gone")
        err = rpc_error(admin.call, "BeginToolCall", request)
        assert err.code().name == "FAILED_PRECONDITION" and "exited" in err.details()
        request.held_process = "never-held"
        err = rpc_error(admin.call, "BeginToolCall", request)
        assert err.code().name == "FAILED_PRECONDITION" and "no process held" in err.details()
        placement.sock.sendall(b"HOLD nofd\n")
        assert placement.sock.recv(64) == b""  # a malformed HOLD closes the connection
        placement.close()
        assert not call_cgroups(daemon.session_path(sid))
    # HOLDs nobody claims keep descriptors in agentd: a connection may not pile them up, and closing it
    # releases them.
    assert daemon.proc is not None
    fds = Path(f"/proc/{daemon.proc.pid}/fd")
    before = len(list(fds.iterdir()))
    sleeper = subprocess.Popen(["sleep", "100"])
    flood = Placement(str(daemon.join_socket))
    try:
        pidfd = os.pidfd_open(sleeper.pid)
        for i in range(MAX_HELD_PER_CONNECTION + 1):
            flood.hold(f"flood-{i}", pidfd)
        os.close(pidfd)
        assert flood.sock.recv(64) == b""
    finally:
        flood.close()
        sleeper.kill()
        sleeper.wait()
    wait_for(lambda: len(list(fds.iterdir())) <= before)


def test_status_says_whether_placements_can_stall(daemon: Daemon) -> None:
    """Without the cgroup2 mount option favordynmods a move into a cgroup can wait for an RCU grace period:
    agentd reads the mount's options and warns (log, GetStatus) exactly then."""
    cgroup2 = [line.split(" - ", 1)[1].split() for line in Path("/proc/self/mountinfo").read_text().splitlines()
               if " - cgroup2 " in line]
    favored = "favordynmods" in cgroup2[0][2].split(",")
    with daemon.admin() as admin:
        warnings = admin.call("GetStatus", pb.GetStatusRequest()).warnings
    assert any("favordynmods" in w for w in warnings) == (not favored)


def test_cgroup2_mount_from_mountinfo(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
        "30 22 0:26 /sub /elsewhere rw - cgroup2 cgroup2 rw\n"  # a bind mount of a subtree: not the root
        "31 22 0:26 / /sys/fs/cg\\040v2 rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate,favordynmods\n"
    )
    mount = cgroup2_mount(mountinfo)
    assert mount.path == Path("/sys/fs/cg v2")
    assert mount.options == {"rw", "nsdelegate", "favordynmods"}
