"""Structured results of finished tool calls: outcome from kernel evidence, and feedback an agent can act on."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Any, ClassVar

from agentd.core.decode import decode, int_ranges
from agentd.core.intents import Limits
from agentd.core.units import format_size
from agentd.kernel.cgroupfs import CgroupStats


class Outcome(IntEnum):
    UNSPECIFIED = 0
    OK = 1
    FAILED = 2
    OOM_KILLED = 3
    TIMEOUT = 4
    KILLED_BY_POLICY = 5
    CANCELLED = 6
    EXITED = 7


class KillReason(IntEnum):
    """Why agentd itself killed a call; decides the outcome unless the kernel OOM-killed it first."""

    NONE = 0
    TIMEOUT = 1
    POLICY = 2
    CANCELLED = 3


class OomScope(Enum):
    """Whose memory limit made the kernel OOM-kill a call, from its memory.events and its ancestors'."""

    NONE = "none"  # not OOM-killed
    CALL = "call"  # its own memory.max: retrying unchanged fails the same way
    SESSION = "session"  # its session's budget (the session's memory.max), shared with the agent and its calls
    SESSIONS = "sessions"  # agentd's sessions/ limit, shared by every session
    HOST = "host"  # above agentd: the host ran out, or a limit on agentd's own cgroup
    ANCESTOR = "ancestor"  # not its own limit; which ancestor is unknown (no evidence from when the call began)


@dataclass(frozen=True)
class AncestorOoms:
    """OOM kills invoked at the call's ancestors' limits while it ran (their memory.events.local `oom` rose),
    and those limits (-1: none). Read by core/observe.py; None of it known for calls adopted after a restart."""

    session: int = 0
    sessions: int = 0
    session_limit: int = -1
    sessions_limit: int = -1


KILL_OUTCOME = {
    KillReason.TIMEOUT: Outcome.TIMEOUT,
    KillReason.POLICY: Outcome.KILLED_BY_POLICY,
    KillReason.CANCELLED: Outcome.CANCELLED,
}


@dataclass(frozen=True)
class ExitStatus:
    code: int = 0
    signal: int = 0
    JSON_RANGES: ClassVar = int_ranges(code=(0, 255), signal=(0, 64))

    @staticmethod
    def from_wait_status(status: int) -> ExitStatus:
        if os.WIFSIGNALED(status):
            return ExitStatus(0, os.WTERMSIG(status))
        return ExitStatus(os.WEXITSTATUS(status), 0)

    def describe(self) -> str:
        return f"was killed by signal {self.signal}" if self.signal else f"exited with status {self.code}"


@dataclass(frozen=True)
class Capture:
    """How an implicit call was captured: the rule that matched, exec -> moved, memory left behind."""

    rule: str
    latency_seconds: float
    memory_before_move: int  # RssAnon when moved: charged to agent/ (cgroup v2 does not move charges)


@dataclass(frozen=True)
class Result:
    call_id: str
    session_id: str
    tool: str
    argv: tuple[str, ...]
    outcome: Outcome
    exit_status: ExitStatus | None
    memory_peak: int
    memory_events: dict[str, int]
    cpu_user_seconds: float
    cpu_system_seconds: float
    cpu_throttled_usec: int
    pids_peak: int
    duration_seconds: float
    started_unix: float
    ended_unix: float
    limits: Limits
    not_enforced: tuple[str, ...]
    feedback: str
    retryable: bool
    implicit: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    kill_reason: str = ""
    network_denials: int = 0
    forks: int = -1  # processes forked inside the call, from the lifecycle program; -1 = not tracked
    capture: Capture | None = None
    oom_scope: OomScope = OomScope.NONE
    oom_killed_processes: int = 0  # each once (memory.events oom_kill counts a group's chosen victim twice)
    throttled_seconds: float = 0.0  # memory.high held below its own limit by the memory policy
    frozen_seconds: float = 0.0  # kept frozen by the memory policy
    policy_actions: tuple[str, ...] = ()  # what the memory policy did to it, in order
    JSON_RANGES: ClassVar = int_ranges(oom_killed_processes=(0, (1 << 31) - 1))

    def to_json(self) -> dict[str, Any]:
        data = dict(vars(self))
        data["outcome"] = self.outcome.name
        data["oom_scope"] = self.oom_scope.name
        data["argv"] = list(self.argv)
        data["not_enforced"] = list(self.not_enforced)
        data["policy_actions"] = list(self.policy_actions)
        data["limits"] = self.limits.to_json()
        data["exit_status"] = vars(self.exit_status) if self.exit_status is not None else None
        data["capture"] = vars(self.capture) if self.capture is not None else None
        return data

    @staticmethod
    def from_json(data: object) -> Result:
        return decode(Result, data)


def classify(ran: bool, stats: CgroupStats, kill: KillReason, exit_status: ExitStatus | None) -> Outcome:
    """Kernel evidence first: OOM only if memory.events oom_kill rose (never guessed from exit code 137)."""
    if stats.memory_events.get("oom_kill", 0) > 0:
        return Outcome.OOM_KILLED
    if not ran:
        return Outcome.CANCELLED
    if kill != KillReason.NONE:
        return KILL_OUTCOME[kill]
    if exit_status is None:
        return Outcome.EXITED
    return Outcome.OK if exit_status == ExitStatus(0, 0) else Outcome.FAILED


def oom_scope(outcome: Outcome, events: Mapping[str, int], ancestors: AncestorOoms | None) -> OomScope:
    """Whose limit OOM-killed the call. Its own if the OOM killer was invoked at its own memory.max (`oom` in
    its memory.events: a leaf's events are its own); else the nearest ancestor whose limit invoked it while the
    call ran (a kill from there leaves the call's `max` and `oom` at 0 and only raises its `oom_kill`)."""
    if outcome != Outcome.OOM_KILLED:
        return OomScope.NONE
    if events.get("oom", 0) > 0:
        return OomScope.CALL
    if ancestors is None:
        return OomScope.ANCESTOR
    if ancestors.session > 0:
        return OomScope.SESSION
    if ancestors.sessions > 0:
        return OomScope.SESSIONS
    return OomScope.HOST


def processes_oom_killed(events: Mapping[str, int]) -> int:
    """Processes the kernel OOM-killed in the call, each counted once. With memory.oom.group the kernel counts
    `oom_kill` for the victim it chose, then again for every process of the group while killing the group, the
    victim included (it is still exiting): one too many per group kill (`oom_group_kill`)."""
    kills = events.get("oom_kill", 0)
    if kills <= 0:
        return 0
    return max(1, kills - events.get("oom_group_kill", 0))


def feedback(
    outcome: Outcome,
    stats: CgroupStats,
    limits: Limits,
    exit_status: ExitStatus | None,
    not_enforced: tuple[str, ...],
    kill_detail: str,
    network_denials: int,
    scope: OomScope | None = None,
    ancestors: AncestorOoms | None = None,
) -> str:
    """One paragraph: what happened, which limit, the peak, and a concrete next step. `scope` defaults to what
    the call's own memory.events say (its own limit, or an unnamed ancestor's)."""
    peak = format_size(stats.memory_peak) if stats.memory_peak >= 0 else "not measured on this kernel"
    high_events = stats.memory_events.get("high", 0)
    parts: list[str] = []
    if outcome == Outcome.OOM_KILLED:
        if scope is None:
            scope = oom_scope(outcome, stats.memory_events, None)
        parts.append(_oom_feedback(scope, limits, peak, ancestors or AncestorOoms()))
    elif outcome == Outcome.TIMEOUT:
        parts.append(
            f"The tool call ran past its timeout of {limits.timeout_seconds:g} s and was killed together with "
            f"every process it started. Retrying it unchanged will time out again: declare a longer timeout, or "
            f"split the work (a subset of the tests, a per-test timeout, a smaller input)."
        )
    elif outcome == Outcome.KILLED_BY_POLICY:
        parts.append(
            f"agentd killed this tool call{f' ({kill_detail})' if kill_detail else ''} to protect other work on "
            f"the host; the command itself did not fail. It can be retried later, ideally with a smaller memory "
            f"footprint (peak was {peak})."
        )
    elif outcome == Outcome.CANCELLED:
        parts.append(f"The tool call was cancelled{f' ({kill_detail})' if kill_detail else ''} before it finished.")
    elif outcome == Outcome.FAILED and exit_status is not None:
        parts.append(
            f"The command {exit_status.describe()}. No agentd limit stopped it (peak memory {peak}); the failure "
            f"is the command's own, so look at its output rather than at resources."
        )
    else:
        parts.append(f"The tool call completed (peak memory {peak}).")
    if high_events and outcome != Outcome.OOM_KILLED:
        parts.append(
            f"It was throttled {high_events} times at its expected memory of {format_size(limits.memory_high)} "
            f"(memory.high): declare more expected memory next time to run without the slowdown."
        )
    if network_denials:
        times = "time" if network_denials == 1 else "times"
        parts.append(
            f"Its network intent is NONE: network access denied {network_denials} {times} (connect/send failed "
            f"with EPERM). If the command needs the network, declare network ANY."
        )
    if not_enforced:
        parts.append(f"Not enforced on this kernel: {', '.join(not_enforced)}.")
    return " ".join(parts)


def _oom_feedback(scope: OomScope, limits: Limits, peak: str, ancestors: AncestorOoms) -> str:
    own = format_size(limits.memory_max) if limits.memory_max else "none"
    if scope == OomScope.CALL:
        return (
            f"The tool call was OOM-killed at its own hard memory limit of {own} (memory.max; peak {peak}): "
            f"the kernel killed the whole call. Retrying it unchanged will fail the same way. Run a narrower "
            f"selection instead (for tests: one file, -k EXPR or -x; for builds: fewer parallel jobs such as "
            f"-j1), or declare more memory (memory_max_bytes of at least {format_size(limits.memory_max * 2)}) "
            f"if the session budget allows it."
        )
    below = f"It stayed within its own limit of {own} (peak {peak}), so it was not the call's own doing"
    if scope == OomScope.SESSION:
        return (
            f"The tool call was OOM-killed because its session ran out of its memory budget"
            f"{_of(ancestors.session_limit)} (the session's memory.max, shared by the agent and all its tool "
            f"calls), an ancestor's limit, not the call's. {below}. It can be retried once the session's other "
            f"calls have finished or use less; declare its memory honestly (expected_memory_bytes) so the "
            f"session's calls fit the budget together."
        )
    if scope == OomScope.SESSIONS:
        where = f"agentd's limit for all sessions together{_of(ancestors.sessions_limit)} (sessions/ memory.max)"
    elif scope == OomScope.HOST:
        where = "the host's memory (or a limit above agentd's sessions)"
    else:
        where = "an ancestor's memory limit (the session budget, the limit for all sessions, or the host)"
    return (
        f"The tool call was OOM-killed because {where} ran out, an ancestor's limit, not the call's. {below}. "
        f"It can be retried later, when the host has room; declare its memory honestly "
        f"(expected_memory_bytes) so agentd can place it."
    )


def _of(limit: int) -> str:
    return f" of {format_size(limit)}" if limit >= 0 else ""


def retryable(outcome: Outcome, scope: OomScope = OomScope.CALL) -> bool:
    """Whether retrying the same call unchanged can succeed: not after a timeout, the command's own failure, or
    an OOM kill at the call's own limit; yes after an OOM kill at an ancestor's limit (once there is room)."""
    if outcome == Outcome.OOM_KILLED:
        return scope not in (OomScope.CALL, OomScope.NONE)
    return outcome in (Outcome.OK, Outcome.EXITED, Outcome.KILLED_BY_POLICY, Outcome.CANCELLED)
