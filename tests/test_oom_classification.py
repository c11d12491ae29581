"""Whose limit OOM-killed a call, and how many processes it killed, decided from the kernel's counters alone.

The counters are those the testbed kernel (7.3) wrote for real kills (see tests/guest/test_oom_scope.py): a
call killed at its own memory.max has `oom` 1 in its memory.events; one killed at its session's (or sessions/'s)
limit has `oom` 0 there and the ancestor's memory.events.local `oom` rose; with memory.oom.group the chosen
victim is counted twice in `oom_kill` (once chosen, once in the group kill), so one process reads 2.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agentd.core.intents import Intent, Limits
from agentd.core.reap import build_result
from agentd.core.results import (
    AncestorOoms,
    ExitStatus,
    KillReason,
    OomScope,
    Outcome,
    Result,
    classify,
    feedback,
    oom_scope,
    processes_oom_killed,
    retryable,
)
from agentd.core.toolcalls import CallState, ToolCall
from agentd.kernel.cgroupfs import CgroupStats

MIB = 1 << 20
OWN_LIMIT = {"max": 66, "oom": 1, "oom_kill": 2, "oom_group_kill": 1}  # one process, killed at its own limit
ANCESTOR_KILL = {"max": 0, "oom": 0, "oom_kill": 2, "oom_group_kill": 1}  # one process, an ancestor's limit
LIMITS = Limits(memory_high=256 * MIB, memory_max=620 * MIB, cpu_weight=100, cpu_max_millicores=0, pids_max=0,
                timeout_seconds=60.0, network=0)


def stats(events: dict[str, int], peak: int = 300 * MIB) -> CgroupStats:
    return CgroupStats(memory_peak=peak, memory_events=events)


@pytest.mark.parametrize(("events", "ancestors", "scope"), [
    (OWN_LIMIT, AncestorOoms(), OomScope.CALL),
    (OWN_LIMIT, AncestorOoms(session=1), OomScope.CALL),  # its own `oom` says it hit its own limit first
    (ANCESTOR_KILL, AncestorOoms(session=1, sessions=1), OomScope.SESSION),  # the nearest ancestor
    (ANCESTOR_KILL, AncestorOoms(sessions=1), OomScope.SESSIONS),
    (ANCESTOR_KILL, AncestorOoms(), OomScope.HOST),  # neither of agentd's limits invoked the OOM killer
    (ANCESTOR_KILL, None, OomScope.ANCESTOR),  # nothing known from when it began (adopted)
])
def test_scope_from_the_counters(events: dict[str, int], ancestors: AncestorOoms | None, scope: OomScope) -> None:
    outcome = classify(True, stats(events), KillReason.NONE, ExitStatus(0, 9))
    assert outcome == Outcome.OOM_KILLED
    assert oom_scope(outcome, events, ancestors) == scope


def test_no_scope_unless_oom_killed() -> None:
    assert oom_scope(Outcome.FAILED, {"max": 3, "oom": 0, "oom_kill": 0}, AncestorOoms(session=1)) == OomScope.NONE


@pytest.mark.parametrize(("events", "killed"), [
    ({"oom_kill": 2, "oom_group_kill": 1}, 1),  # the victim, counted when chosen and again in the group kill
    ({"oom_kill": 4, "oom_group_kill": 1}, 3),  # sh, sleep and python3 (python3 twice)
    ({"oom_kill": 1, "oom_group_kill": 1}, 1),  # the victim had exited before the group kill reached it
    ({"oom_kill": 1}, 1),  # no memory.oom.group (or a kernel without oom_group_kill)
    ({"oom_kill": 0, "oom_group_kill": 0}, 0),
    ({}, 0),
])
def test_processes_counted_once(events: dict[str, int], killed: int) -> None:
    assert processes_oom_killed(events) == killed


def test_own_limit_is_not_retryable_an_ancestors_is() -> None:
    assert not retryable(Outcome.OOM_KILLED, OomScope.CALL)
    for scope in (OomScope.SESSION, OomScope.SESSIONS, OomScope.HOST, OomScope.ANCESTOR):
        assert retryable(Outcome.OOM_KILLED, scope), scope
    assert retryable(Outcome.OK, OomScope.NONE) and not retryable(Outcome.TIMEOUT, OomScope.NONE)


def _feedback(events: dict[str, int], scope: OomScope | None, ancestors: AncestorOoms | None = None) -> str:
    return feedback(Outcome.OOM_KILLED, stats(events), LIMITS, ExitStatus(0, 9), (), "", 0, scope, ancestors)


def test_feedback_of_an_own_limit_kill() -> None:
    text = _feedback(OWN_LIMIT, OomScope.CALL)
    assert "own hard memory limit of 620 MiB" in text and "peak 300 MiB" in text
    assert "Retrying it unchanged will fail the same way" in text and "at least 1.2 GiB" in text


@pytest.mark.parametrize(("scope", "names"), [
    (OomScope.SESSION, ("session ran out of its memory budget of 1.0 GiB", "session's other calls")),
    (OomScope.SESSIONS, ("all sessions together of 2.0 GiB", "retried later")),
    (OomScope.HOST, ("host's memory", "retried later")),
    (OomScope.ANCESTOR, ("an ancestor's memory limit", "retried later")),
])
def test_feedback_of_an_ancestor_kill(scope: OomScope, names: tuple[str, ...]) -> None:
    text = _feedback(ANCESTOR_KILL, scope, AncestorOoms(session_limit=1 << 30, sessions_limit=2 << 30))
    assert "an ancestor's limit, not the call's" in text
    assert "stayed within its own limit of 620 MiB (peak 300 MiB)" in text
    assert "fail the same way" not in text and "declare more memory" not in text
    for name in names:
        assert name in text


def test_feedback_without_ancestor_evidence_still_tells_own_from_ancestor() -> None:
    """A caller that passes no scope gets what the call's own memory.events say."""
    assert "own hard memory limit" in _feedback(OWN_LIMIT, None)
    assert "an ancestor's limit, not the call's" in _feedback(ANCESTOR_KILL, None)


def test_result_keeps_scope_and_count_through_json() -> None:
    result = Result("c1", "s1", "tool", (), Outcome.OOM_KILLED, ExitStatus(0, 9), 300 * MIB, ANCESTOR_KILL, 0.1, 0.0,
                    0, 1, 1.0, 1.0, 2.0, LIMITS, (), "text", True, oom_scope=OomScope.SESSION,
                    oom_killed_processes=1)
    data = result.to_json()
    assert (data["oom_scope"], data["oom_killed_processes"]) == ("SESSION", 1)
    assert Result.from_json(data) == result
    with pytest.raises(ValueError, match="oom_scope"):
        Result.from_json({**data, "oom_scope": "NEIGHBOUR"})
    with pytest.raises(ValueError, match="oom_killed_processes"):
        Result.from_json({**data, "oom_killed_processes": -1})
    old = {k: v for k, v in data.items() if k not in ("oom_scope", "oom_killed_processes")}
    assert Result.from_json(old).oom_scope == OomScope.NONE  # records written before these fields


def test_ancestors_are_asked_only_for_a_call_oom_killed_from_above() -> None:
    """Reading the ancestors' OOM counts and limits costs file reads per call: only a call OOM-killed without an
    OOM at its own limit needs them (to name whose limit it was)."""
    call = ToolCall(id="c", session_id="s", intent=Intent(tool="t"), limits=LIMITS, path=Path("/nonexistent/tc-c"),
                    cgroup_id=1, created=0.0, report_exit=False, confined=False)
    call.state, call.started = CallState.RUNNING, 1.0
    asked: list[str] = []

    def witness() -> AncestorOoms:
        asked.append(call.id)
        return AncestorOoms(session=1, sessions=0, session_limit=512 * MIB, sessions_limit=-1)

    plain = build_result(call, stats({}), True, 0, 0, 2.0, witness)
    own = build_result(call, stats(OWN_LIMIT), True, 0, 0, 2.0, witness)
    assert (plain.oom_scope, own.oom_scope, asked) == (OomScope.NONE, OomScope.CALL, [])
    above = build_result(call, stats(ANCESTOR_KILL), True, 0, 0, 2.0, witness)
    assert (above.outcome, above.oom_scope, asked) == (Outcome.OOM_KILLED, OomScope.SESSION, ["c"])
    assert "budget of 512 MiB" in above.feedback
