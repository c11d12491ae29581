"""Structured results of finished tool calls: outcome from kernel evidence, and feedback an agent can act on."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import IntEnum
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

    def to_json(self) -> dict[str, Any]:
        data = dict(vars(self))
        data["outcome"] = self.outcome.name
        data["argv"] = list(self.argv)
        data["not_enforced"] = list(self.not_enforced)
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


def feedback(
    outcome: Outcome,
    stats: CgroupStats,
    limits: Limits,
    exit_status: ExitStatus | None,
    not_enforced: tuple[str, ...],
    kill_detail: str,
    network_denials: int,
) -> str:
    """One paragraph: what happened, which limit, the peak, and a concrete next step."""
    peak = format_size(stats.memory_peak) if stats.memory_peak >= 0 else "not measured on this kernel"
    high_events = stats.memory_events.get("high", 0)
    parts: list[str] = []
    if outcome == Outcome.OOM_KILLED:
        parts.append(
            f"The tool call was OOM-killed: it reached its hard memory limit of {format_size(limits.memory_max)} "
            f"(memory.max; peak {peak}), and the kernel killed the whole call. Retrying it unchanged will fail "
            f"the same way. Run a narrower selection instead (for tests: one file, -k EXPR or -x; for builds: "
            f"fewer parallel jobs such as -j1), or declare more memory (memory_max_bytes of at least "
            f"{format_size(limits.memory_max * 2)}) if the session budget allows it."
        )
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


def retryable(outcome: Outcome) -> bool:
    """Whether retrying the same call unchanged can succeed: not after OOM, timeout or the command's failure."""
    return outcome in (Outcome.OK, Outcome.EXITED, Outcome.KILLED_BY_POLICY, Outcome.CANCELLED)
