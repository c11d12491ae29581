"""Enforcement that needs cgroup v2 memory/cpu/pids controllers: runs in the testbed guest (make test-kernel).

Each test asserts what the kernel did (memory.events, cpu.stat, pids) through agentd's real gRPC path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
from support import AGENTCTL, Daemon, create_session, rpc_error, spawn_in, wait_for

from agentd.api.gen import agentd_pb2 as pb
from agentd.kernel import cgroupfs

pytestmark = pytest.mark.guest

MIB = 1 << 20
# Allocate and touch N MiB (bytes multiplication writes every page), then hold it for a while.
ALLOC = "import sys, time; b = b'x' * ({mib} << 20); time.sleep({hold})"


def alloc(mib: int, hold: float = 0.0) -> list[str]:
    return [sys.executable, "-c", ALLOC.format(mib=mib, hold=hold)]


def test_controllers_enforced_and_probe(daemon: Daemon) -> None:
    with daemon.admin() as admin:
        status = admin.call("GetStatus", pb.GetStatusRequest())
    assert {"memory", "cpu", "pids"} <= set(status.controllers_enforced)
    assert status.controllers_missing == []
    assert status.psi_available and status.sched_ext_available
    # The CO-RE objects built against the host's BTF load on this kernel too.
    assert status.bpf_lifecycle and status.bpf_network, list(status.bpf_errors)
    assert os.path.exists("/sys/kernel/sched_ext/state")


def test_limits_are_written(daemon: Daemon, session: tuple[str, str]) -> None:
    sid, _ = session
    with daemon.admin() as admin:
        intent = pb.Intent(tool="limits", expected_memory_bytes=100 * MIB, memory_max_bytes=200 * MIB,
                           cpu_class=pb.CPU_CLASS_INTERACTIVE, cpu_max_millicores=1500, pids_max=50)
        begun = admin.begin(intent, sid)
        assert list(begun.limits.not_enforced) == []
        path = daemon.session_path(sid) / f"tc-{begun.call_id}"
        files = {name: (path / name).read_text().strip() for name in
                 ("memory.high", "memory.max", "memory.oom.group", "cpu.weight", "cpu.max", "pids.max")}
        assert files == {"memory.high": str(100 * MIB), "memory.max": str(200 * MIB), "memory.oom.group": "1",
                         "cpu.weight": "400", "cpu.max": "150000 100000", "pids.max": "50"}
        admin.end(begun.call_id, None)


def test_oom_kill_is_reported_from_memory_events(daemon: Daemon, session: tuple[str, str]) -> None:
    sid, _ = session
    agent = spawn_in(daemon.session_path(sid) / "agent", ["sleep", "300"])
    try:
        with daemon.admin() as admin:
            outcome = admin.run(alloc(256), sid, tool="hungry", memory_max_bytes=64 * MIB,
                                expected_memory_bytes=32 * MIB)
            result = outcome.result
            assert outcome.exit_code == 137
            assert result.outcome == pb.OUTCOME_OOM_KILLED and result.memory_events.oom_kill >= 1
            assert 48 * MIB <= result.memory_peak_bytes <= 64 * MIB + MIB
            assert "64.0 MiB" in result.feedback and "peak" in result.feedback and not result.retryable
            # The agent and the daemon survive the call's OOM.
            assert agent.poll() is None
            assert admin.call("GetStatus", pb.GetStatusRequest()).version
    finally:
        agent.kill()
        agent.wait()


def test_agentctl_prints_oom_feedback(daemon: Daemon, session: tuple[str, str]) -> None:
    sid, _ = session
    run = subprocess.run([*AGENTCTL, "run", "--session", sid, "--memory", "32M", "--memory-max", "64M", "--",
                          *alloc(256)], capture_output=True, text=True, env=daemon.env(), timeout=300)
    assert run.returncode == 137
    assert "OOM_KILLED" in run.stderr and "memory.max" in run.stderr


def test_memory_high_throttles_without_killing(daemon: Daemon, session: tuple[str, str]) -> None:
    sid, _ = session
    with daemon.admin() as admin:
        outcome = admin.run(alloc(48), sid, tool="squeezed", expected_memory_bytes=32 * MIB,
                            memory_max_bytes=256 * MIB)
    result = outcome.result
    assert outcome.exit_code == 0 and result.outcome == pb.OUTCOME_OK
    assert result.memory_events.high > 0 and result.memory_events.oom_kill == 0
    assert "throttled" in result.feedback


def test_cpu_max_holds_half_a_core(daemon: Daemon, session: tuple[str, str]) -> None:
    sid, _ = session
    busy = [sys.executable, "-c", "import time\nend = time.monotonic() + 4\nwhile time.monotonic() < end: pass"]
    with daemon.admin() as admin:
        outcome = admin.run(busy, sid, tool="spin", cpu_max_millicores=500)
    result = outcome.result
    used = result.cpu_user_seconds + result.cpu_system_seconds
    share = used / result.duration_seconds
    assert 0.4 <= share <= 0.6, f"cpu share {share:.2f} ({used:.2f} s of {result.duration_seconds:.2f} s)"
    assert result.cpu_throttled_usec > 0


def test_pids_max_stops_a_fork_bomb(daemon: Daemon, session: tuple[str, str]) -> None:
    sid, _ = session
    bomb = [sys.executable, "-c",
            "import os, time\nfailed = 0\nfor _ in range(100):\n"
            "    try:\n        pid = os.fork()\n    except BlockingIOError:\n        failed += 1\n        continue\n"
            "    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n"
            "print(failed, flush=True)\nos._exit(0)"]
    with daemon.admin() as admin:
        begun = admin.begin(pb.Intent(tool="bomb", pids_max=20), sid, report_exit=False)
        proc = _spawn_joined(begun, bomb)
        out, _ = proc.communicate(timeout=120)
        assert int(out.decode().strip()) >= 100 - 20  # forks beyond pids.max fail with EAGAIN
        path = daemon.session_path(sid) / f"tc-{begun.call_id}"
        assert int((path / "pids.peak").read_text()) <= 20
        # The rest of the session is unaffected: another call starts and forks normally.
        assert admin.run(["sh", "-c", "true & wait"], sid).exit_code == 0
        result = admin.end(begun.call_id, None)
        assert result.pids_peak == 20


def _spawn_joined(begun: pb.BeginToolCallResponse, argv: list[str]) -> subprocess.Popen[bytes]:
    """Start argv with stdout captured, joined to the call before exec (placement through the join socket)."""
    code = (
        "import os, sys; from agentd.joinclient import join; "
        f"join({begun.join_socket!r}, {begun.join_token!r}); os.execv(sys.argv[1], sys.argv[1:])"
    )
    return subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))


def test_session_memory_max_contains_its_calls(daemon_factory: Callable[..., Daemon]) -> None:
    """The kernel's containment (the memory policy off: it would queue the second Begin, then throttle, freeze or
    kill first; tests/guest/test_policy_guest.py covers that)."""
    daemon = daemon_factory(policy={"enabled": False}).start()
    with daemon.admin() as admin:
        sid, _ = create_session(admin, "budgeted", memory_budget_bytes=128 * MIB)
        try:
            path = daemon.session_path(sid)
            assert (path / "memory.max").read_text().strip() == str(128 * MIB)
            calls = [admin.begin(pb.Intent(tool=f"half-{i}", expected_memory_bytes=90 * MIB), sid,
                                 report_exit=False) for i in range(2)]
            for begun in calls:  # each call alone fits its limit, both together exceed the session budget
                assert begun.limits.memory_max_bytes == 128 * MIB
            procs = [_spawn_joined(begun, alloc(90, hold=5)) for begun in calls]
            for proc in procs:
                proc.wait(120)
            results = [admin.wait(begun.call_id, timeout=60) for begun in calls]
            assert pb.OUTCOME_OOM_KILLED in [r.outcome for r in results]
            assert int((path / "memory.peak").read_text()) <= 128 * MIB
            assert int(cgroupfs.parse_flat_keyed((path / "memory.events").read_text())["oom_kill"]) >= 1
        finally:
            admin.call("DeleteSession", pb.DeleteSessionRequest(session_id=sid, force=True))


def test_high_priority_session_knobs(daemon_factory: object) -> None:
    d = daemon_factory(sessions={"default_memory_protected_high": "32M"}).start()  # type: ignore[operator]
    with d.admin() as admin:
        explicit, _ = create_session(admin, "vip", priority=pb.PRIORITY_HIGH, memory_protected_bytes=64 * MIB,
                                     memory_budget_bytes=512 * MIB)
        default, _ = create_session(admin, "vip-default", priority=pb.PRIORITY_HIGH)
        low, _ = create_session(admin, "bulk", priority=pb.PRIORITY_LOW)
        assert (d.session_path(explicit) / "memory.low").read_text().strip() == str(64 * MIB)
        assert (d.session_path(default) / "memory.low").read_text().strip() == str(32 * MIB)
        assert (d.session_path(low) / "memory.low").read_text().strip() == "0"
        assert (d.session_path(explicit) / "cpu.weight").read_text().strip() == "400"
        assert (d.session_path(low) / "cpu.weight").read_text().strip() == "25"


def test_update_below_usage_is_refused_and_throttles(daemon: Daemon, session: tuple[str, str]) -> None:
    sid, _ = session
    with daemon.admin() as admin:
        begun = admin.begin(pb.Intent(tool="resident", expected_memory_bytes=128 * MIB), sid, report_exit=False)
        proc = _spawn_joined(begun, alloc(64, hold=60))
        path = daemon.session_path(sid) / f"tc-{begun.call_id}"
        wait_for(lambda: cgroupfs.memory_current(path) > 60 * MIB, timeout=120)
        max_before = (path / "memory.max").read_text()
        err = rpc_error(admin.call, "UpdateToolCall",
                        pb.UpdateToolCallRequest(call_id=begun.call_id, memory_max_bytes=16 * MIB))
        assert err.code().name == "FAILED_PRECONDITION" and "below current usage" in err.details()
        assert (path / "memory.high").read_text().strip() == str(16 * MIB)
        assert (path / "memory.max").read_text() == max_before
        time.sleep(0.5)
        assert proc.poll() is None, "lowering limits must not kill the call"
        raised = admin.call("UpdateToolCall", pb.UpdateToolCallRequest(call_id=begun.call_id,
                                                                       memory_max_bytes=512 * MIB))
        assert raised.memory_max_bytes == 512 * MIB
        assert (path / "memory.max").read_text().strip() == str(512 * MIB)
        result = admin.end(begun.call_id, None)
        proc.wait(30)
        assert result.outcome == pb.OUTCOME_CANCELLED and result.memory_events.oom_kill == 0


def test_captured_command_is_limited_like_a_declared_one(daemon_factory: Callable[..., Daemon]) -> None:
    """An undeclared `bash -c` from the agent is captured into its own call with the default intent (here 64 MiB
    expected, so memory.max 96 MiB), and that limit really holds: the command is OOM-killed, the agent lives on."""
    d = daemon_factory(limits={"memory_class_medium": "64M"}).start()
    command = f"{sys.executable} -c \"b = b'x' * (256 << 20)\""
    agent_code = f"import subprocess; print(subprocess.run(['bash', '-c', {command!r}]).returncode)"
    with d.admin() as admin:
        sid, _ = create_session(admin, "captured")
        agent = spawn_in(d.session_path(sid) / "agent", [sys.executable, "-c", agent_code], stdout=subprocess.PIPE)
        out, _ = agent.communicate(timeout=300)
        assert agent.returncode == 0 and int(out) == -9  # the agent saw its tool killed, and lives on
        listed = admin.call("ListToolCalls", pb.ListToolCallsRequest(session_id=sid, limit=5))
        captured = [r for r in listed.finished if r.implicit]
        assert captured and captured[0].outcome == pb.OUTCOME_OOM_KILLED
        assert captured[0].limits.memory_max_bytes == 96 * MIB
        assert captured[0].memory_peak_bytes <= 96 * MIB
