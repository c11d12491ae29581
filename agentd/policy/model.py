"""The ladder's vocabulary: immutable snapshots in (a pressure domain, its tool calls), actions out, and the
ladder's own small memory carried from one decision to the next.

A pressure domain is `sessions/` (every agent on the host) or a session with a budget of its own. Only tool
calls appear here: an agent leaf can never be a victim because it is never in the model. Sizes are bytes,
times are seconds on one monotonic clock chosen by the caller, stall is PSI 'some' in percent over the trigger
window (None: the kernel has no PSI).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from types import MappingProxyType

from agentd.core.sessions import Priority
from agentd.core.units import format_size


class Level(IntEnum):
    """How bad the domain is, from its headroom and stall; each level includes the actions of those below."""

    NONE = 0
    THROTTLE = 1
    FREEZE = 2
    KILL = 3


class ActionKind(Enum):
    THROTTLE = "throttle"  # lower memory.high to `memory_high`
    FREEZE = "freeze"  # cgroup.freeze 1
    KILL = "kill"  # cgroup.kill: outcome KILLED_BY_POLICY
    THAW = "thaw"  # cgroup.freeze 0
    RESTORE = "restore"  # raise memory.high to `memory_high` (0 = "max")


def rank(priority: int) -> int:
    """How much a call is protected: LOW 0, NORMAL (and unspecified) 1, HIGH 2. Victims come from the lowest."""
    if priority == Priority.LOW:
        return 0
    return 2 if priority == Priority.HIGH else 1


def priority_name(priority: int) -> str:
    return {Priority.LOW: "low", Priority.HIGH: "high"}.get(Priority(priority), "normal")


@dataclass(frozen=True)
class MemoryEvents:
    """The domain's own memory.events counters that rose since the previous decision."""

    high: int = 0
    max: int = 0
    oom: int = 0
    oom_kill: int = 0

    @property
    def limit_hit(self) -> bool:
        return self.high + self.max + self.oom + self.oom_kill > 0


@dataclass(frozen=True)
class SessionPressure:
    """A session of the domain (with or without calls): its priority and how much it stalls."""

    id: str
    priority: int
    stall_pct: float | None = None


@dataclass(frozen=True)
class DomainState:
    name: str
    limit: int  # the memory available to the domain (> 0)
    usage: int
    stall_pct: float | None = None  # the domain's own memory.pressure
    sessions: tuple[SessionPressure, ...] = ()
    events: MemoryEvents = MemoryEvents()

    def __post_init__(self) -> None:
        if self.limit <= 0:
            raise ValueError(f"domain {self.name!r}: a pressure domain needs a limit, got {self.limit}")

    @property
    def headroom(self) -> int:
        return self.limit - self.usage


@dataclass(frozen=True)
class CallView:
    """A running tool call as the ladder sees it."""

    id: str
    session_id: str
    priority: int
    usage: int
    expected: int  # the declared expectation (or its class size): what the call said it needs
    memory_high: int  # the configured memory.high (its limits), what recovery restores; 0 = "max"
    memory_max: int  # 0 = "max"
    # The value of cgroup.freeze (what was written, by the ladder or an operator), not cgroup.events' `frozen`,
    # which lags: a call the ladder froze that reads unfrozen here was thawed by someone else.
    frozen: bool = False
    # The kernel hit its memory.high lately (memory.events `high` rose): held there, it wants more, even while
    # reclaim keeps its usage a few MiB below the bound. Read only for calls whose memory.high the ladder holds.
    at_high: bool = False
    peak: int = 0  # its highest usage so far (memory.peak; 0: unknown)

    @property
    def excess(self) -> int:
        """How far above its declaration it is (negative: within it)."""
        return self.usage - self.expected

    @property
    def unclaimed(self) -> int:
        """What it declared and has not reached yet (usage or peak so far): memory it said it will need."""
        return max(self.expected - max(self.usage, self.peak), 0)


@dataclass(frozen=True)
class CallMemory:
    """What the ladder remembers of one call of its domain."""

    last_usage: int = 0
    last_seen: float | None = None
    written_high: int | None = None  # what the ladder wrote into memory.high (None: untouched)
    throttled_since: float | None = None
    frozen_by_policy: bool = False
    frozen_since: float | None = None
    killed_at: float | None = None
    recent_actions: tuple[float, ...] = ()  # when it acted on the call, within the last action interval
    sample_usage: int | None = None  # its usage at the domain's growth sample (None: it arrived after it)
    window_growth: float = 0.0  # its growth over the domain's last measurement window (bytes/s)

    @property
    def held(self) -> bool:
        """The ladder has changed something of this call that recovery must undo (or it killed it)."""
        return self.written_high is not None or self.frozen_by_policy or self.killed_at is not None


def _empty_calls() -> Mapping[str, CallMemory]:
    return MappingProxyType({})


@dataclass(frozen=True)
class LadderMemory:
    """The ladder's state for one domain, returned updated by every decision (start with `LadderMemory()`)."""

    calls: Mapping[str, CallMemory] = field(default_factory=_empty_calls)
    last_usage: int = 0  # the domain's usage sample growth is measured from (kept for at least half the lookahead)
    last_seen: float | None = None
    growth: float = 0.0  # the domain's last growth measurement (bytes/s)
    pressure_since: float | None = None  # the current episode began (None: no episode)
    clear_since: float | None = None  # the episode's pressure has been clear since
    calm_since: float | None = None  # pressure has not been active since (the band or clear)
    last_recovery_at: float | None = None
    last_kill_at: float | None = None

    def call(self, call_id: str) -> CallMemory:
        return self.calls.get(call_id, CallMemory())


@dataclass(frozen=True)
class Assessment:
    """The domain's pressure as one decision saw it: the numbers every action and the status carry."""

    domain: str
    limit: int
    usage: int
    headroom: int
    projected_headroom: int  # headroom minus lookahead x the domain's growth
    growth: float  # bytes/s, the domain's usage trend since the previous decision
    stall_pct: float | None  # the stall of what the ladder protects (sessions it holds nothing of)
    level: Level
    active: bool  # pressure now
    clear: bool  # clear now (below the low-water marks)
    reserves: Mapping[str, int]
    call_growth: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))  # over the window
    # What calls more important than the victims declared and have not reached yet (reserve_declared): kept free
    # for them, so the lower tier is held before it takes memory a kill would have to give back.
    claimed: int = 0
    claim_only: bool = False  # active only because of `claimed`: throttling, never a timed freeze or kill

    @property
    def free(self) -> int:
        """The headroom the victims' tier may use: headroom minus what is claimed."""
        return self.headroom - self.claimed

    def log_extra(self) -> dict[str, object]:
        return {
            "domain": self.domain,
            "limit": self.limit,
            "usage": self.usage,
            "headroom": self.headroom,
            "projected_headroom": self.projected_headroom,
            "claimed": self.claimed,
            "domain_growth": round(self.growth),
            "stall_pct": self.stall_pct,
            "level": self.level.name.lower(),
            **{f"{name}_reserve": value for name, value in self.reserves.items()},
        }


@dataclass(frozen=True)
class Action:
    """One step of the ladder on one call, with the numbers that drove it."""

    kind: ActionKind
    call_id: str
    session_id: str
    priority: int
    reason: str
    assessment: Assessment
    usage: int
    expected: int
    growth: float  # the call's bytes/s
    memory_high: int = 0  # THROTTLE/RESTORE: the value to write (0 = "max"); THAW: a bound written first (0: none)

    def log_extra(self) -> dict[str, object]:
        """The fields of the one structured log line of this decision."""
        return {
            "action": self.kind.value,
            "call": self.call_id,
            "session": self.session_id,
            "priority": priority_name(self.priority),
            "call_usage": self.usage,
            "call_expected": self.expected,
            "call_growth": round(self.growth),
            "memory_high": self.memory_high,
            "reason": self.reason,
            **self.assessment.log_extra(),
        }

    def feedback(self) -> str:
        """For a kill: what the agent is told (KILLED_BY_POLICY, retryable)."""
        a = self.assessment
        return (
            f"killed by agentd's memory policy: {self.reason}. Memory of {a.domain} at the time: "
            f"{format_size(a.usage)} of {format_size(a.limit)} ({format_size(max(a.headroom, 0))} free). "
            f"This call used {format_size(self.usage)} and declared {format_size(self.expected)}. Retry later, "
            f"declare less, or run a narrower selection (one test file instead of the suite)."
        )


@dataclass(frozen=True)
class Decision:
    actions: tuple[Action, ...]
    memory: LadderMemory
    assessment: Assessment
