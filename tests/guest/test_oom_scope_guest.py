"""Whose limit OOM-killed a call, told right (testbed guest: the memory controller enforces).

A call killed at its own memory.max is told so and not to retry unchanged; a call killed because its session's
budget or agentd's sessions/ limit ran out (its own limit not reached) is told that an ancestor's limit killed it
and that it can be retried. Each kill counts one call and its processes once, in the result and the metrics.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import Daemon, create_session, scrape, value, wait_for

from agentd.api.gen import agentd_pb2 as pb

pytestmark = pytest.mark.guest

MIB = 1 << 20
NO_POLICY: dict[str, Any] = {"enabled": False}
ALLOC = "import time; b = b'x' * ({mib} << 20); time.sleep({hold})"


def alloc(mib: int, hold: float = 0.0) -> list[str]:
    return [sys.executable, "-c", ALLOC.format(mib=mib, hold=hold)]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """The memory policy off: these tests check what the kernel's own OOM kill is told as (the policy would
    refuse, throttle or kill first)."""
    d = Daemon(tmp_path_factory.mktemp("agentd"), policy=NO_POLICY)
    try:
        yield d.start()
    finally:
        d.cleanup()


def oom_metrics(daemon: Daemon, scope: str) -> tuple[float, float]:
    page = scrape(daemon)
    calls = f'agentd_tool_calls_oom_killed_total{{scope="{scope}"}}'
    return (value(page, calls) if calls in page else 0.0), value(page, "agentd_oom_killed_processes_total")


def test_own_limit(daemon: Daemon, session: tuple[str, str]) -> None:
    sid, _ = session
    calls_before, processes_before = oom_metrics(daemon, "call")
    with daemon.admin() as admin:
        result = admin.run(alloc(256), sid, tool="hungry", memory_max_bytes=64 * MIB,
                           expected_memory_bytes=32 * MIB).result
    assert result.outcome == pb.OUTCOME_OOM_KILLED and result.oom_scope == pb.OOM_SCOPE_CALL
    assert result.memory_events.oom == 1  # the OOM killer ran at the call's own memory.max
    assert result.oom_killed_processes == 1 and result.pids_peak == 1
    assert result.memory_events.oom_kill == 2  # the kernel's counter: the group's victim, counted twice
    assert "own hard memory limit of 64.0 MiB" in result.feedback and not result.retryable
    wait_for(lambda: oom_metrics(daemon, "call") == (calls_before + 1, processes_before + 1))


def squeeze(daemon: Daemon, sid: str, limit_reached: Callable[[], bool]) -> list[pb.ToolCallResult]:
    """Two calls, each within its own limit of 150 MiB, that together exceed an ancestor's limit: one holds
    100 MiB while the other allocates 100 MiB. The OOM killer, invoked at the ancestor, kills one of them."""
    results: list[pb.ToolCallResult] = []

    def holder() -> None:
        with daemon.admin() as admin:
            results.append(admin.run(alloc(100, hold=60), sid, tool="holder", memory_max_bytes=150 * MIB,
                                     expected_memory_bytes=120 * MIB, timeout_seconds=120).result)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        wait_for(limit_reached, timeout=60)
        with daemon.admin() as admin:
            results.append(admin.run(alloc(100, hold=0), sid, tool="grower", memory_max_bytes=150 * MIB,
                                     expected_memory_bytes=120 * MIB, timeout_seconds=120).result)
    finally:
        thread.join(timeout=150)
    return results


def check_ancestor_kill(results: list[pb.ToolCallResult], scope: int, words: tuple[str, ...]) -> int:
    """Each call the ancestor's OOM killed is told so (under TCG the kernel sometimes takes both: the second
    allocates before the first victim's memory is back); returns how many."""
    killed = [r for r in results if r.outcome == pb.OUTCOME_OOM_KILLED]
    assert killed, [(r.tool, pb.Outcome.Name(r.outcome), r.feedback) for r in results]
    for result in killed:
        assert result.oom_scope == scope, pb.OomScope.Name(result.oom_scope)
        assert result.memory_events.oom == 0 and result.memory_events.max == 0  # its own limit was not reached
        assert 0 < result.memory_peak_bytes < 150 * MIB and result.oom_killed_processes == 1
        assert result.retryable
        assert "an ancestor's limit, not the call's" in result.feedback
        assert "fail the same way" not in result.feedback
        for word in words:
            assert word in result.feedback, result.feedback
    return len(killed)


def test_session_budget(daemon: Daemon) -> None:
    calls_before, processes_before = oom_metrics(daemon, "session")
    with daemon.admin() as admin:
        sid, _ = create_session(admin, memory_budget_bytes=160 * MIB)
    try:
        session_memory = daemon.session_path(sid) / "memory.current"
        results = squeeze(daemon, sid, lambda: int(session_memory.read_text()) >= 100 * MIB)
        kills = check_ancestor_kill(results, pb.OOM_SCOPE_SESSION, ("memory budget of 160 MiB", "retried"))
        wait_for(lambda: oom_metrics(daemon, "session") == (calls_before + kills, processes_before + kills))
    finally:
        with daemon.admin() as admin:
            admin.call("DeleteSession", pb.DeleteSessionRequest(session_id=sid, force=True))


def test_limit_of_all_sessions(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory(policy=NO_POLICY).start()
    with daemon.admin() as admin:
        sid, _ = create_session(admin)
    sessions: Path = daemon.session_path(sid).parent
    (sessions / "memory.max").write_text(str(160 * MIB))
    try:
        results = squeeze(daemon, sid, lambda: int((sessions / "memory.current").read_text()) >= 100 * MIB)
        kills = check_ancestor_kill(results, pb.OOM_SCOPE_SESSIONS,
                                    ("all sessions together of 160 MiB", "retried later"))
        assert oom_metrics(daemon, "sessions")[0] == kills
    finally:
        (sessions / "memory.max").write_text("max")
