"""The policy ladder and admission (agentd/policy/), driven without a kernel: unit tests of each rung, hypothesis
properties over random domains and tick sequences, and a small deterministic simulator (usage grows, memory.high
holds it, freezing stops it, killing frees it, the kernel OOM-kills past the limit)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import LADDER_TEST_TUNING, REPO

from agentd.core.sessions import Priority
from agentd.policy.admission import AdmissionRequest, Verdict, admit, admit_queue
from agentd.policy.assess import reserves
from agentd.policy.ladder import decide, throttle_target
from agentd.policy.model import (
    Action,
    ActionKind,
    CallView,
    Decision,
    DomainState,
    LadderMemory,
    Level,
    MemoryEvents,
    SessionPressure,
    rank,
)
from agentd.policy.pace import watch_growth, watch_trips
from agentd.policy.settings import PolicyConfig, PolicyConfigError, describe, from_table, policy_keys
from agentd.policy.victims import victim_order

M = 1 << 20
HIGH, NORMAL, LOW = Priority.HIGH, Priority.NORMAL, Priority.LOW
CONFIG = PolicyConfig(**LADDER_TEST_TUNING)  # type: ignore[arg-type]
LIMIT = 1100 * M
TICK = 0.05
NO_EVENTS = MemoryEvents()
ESCALATIONS = (ActionKind.THROTTLE, ActionKind.FREEZE, ActionKind.KILL)


def call(cid: str, priority: int, usage: int, expected: int = 0, *, high: int = 0, mx: int = 0,
         frozen: bool = False, session: str = "") -> CallView:
    return CallView(cid, session or f"s-{cid}", priority, usage, expected or usage, high, mx, frozen)


def domain(usage: int, calls: Sequence[CallView] = (), limit: int = LIMIT, stall: dict[str, float] | None = None,
           events: MemoryEvents = NO_EVENTS) -> DomainState:
    sessions = tuple(SessionPressure(c.session_id, c.priority, (stall or {}).get(c.session_id)) for c in calls)
    return DomainState("sessions", limit, usage, sessions=sessions, events=events)


def kinds(decision: Decision) -> list[tuple[str, str]]:
    return [(a.kind.value, a.call_id) for a in decision.actions]


# ----- the simulator -----


@dataclass
class SimCall:
    id: str
    priority: int
    usage: int
    expected: int
    rate: float  # bytes/s it allocates while it may
    peak: int  # it stops growing here
    high: int = 0  # its own memory.high (0 = max)
    written_high: int | None = None
    frozen: bool = False
    killed: bool = False
    oom_killed: bool = False
    end_at: float | None = None  # it finishes (frees everything) then

    def view(self) -> CallView:
        at_high = self.written_high is not None and self.usage >= self.written_high and self.usage < self.peak
        return CallView(self.id, f"s-{self.id}", self.priority, self.usage, self.expected, self.high, 0, self.frozen,
                        at_high=at_high and not self.frozen)


@dataclass
class Sim:
    calls: list[SimCall]
    limit: int = LIMIT
    base: int = 0  # the agents' own memory, outside any tool call
    config: PolicyConfig = CONFIG
    now: float = 0.0
    memory: LadderMemory = field(default_factory=LadderMemory)
    log: list[tuple[float, Decision, LadderMemory, tuple[CallView, ...]]] = field(default_factory=list)
    ooms: int = 0

    def live(self) -> list[SimCall]:
        return [c for c in self.calls
                if not c.killed and not c.oom_killed and (c.end_at is None or self.now < c.end_at)]

    def usage(self) -> int:
        return self.base + sum(c.usage for c in self.live())

    def stall(self, c: SimCall) -> float:
        """A session stalls when the domain is nearly full and it wants more, or when its own limit holds it."""
        wants = not c.frozen and c.usage < c.peak
        if not wants:
            return 0.0
        held = c.written_high is not None and c.usage + c.rate * TICK > c.written_high
        return 40.0 if held or self.limit - self.usage() < 64 * M else 0.0

    def step(self) -> Decision:
        live = self.live()
        views = tuple(c.view() for c in live)
        sessions = tuple(SessionPressure(f"s-{c.id}", c.priority, self.stall(c)) for c in live)
        state = DomainState("sessions", self.limit, self.usage(), sessions=sessions)
        before = self.memory
        decision = decide(state, views, self.config, self.now, self.memory)
        self.log.append((self.now, decision, before, views))
        self.memory = decision.memory
        for action in decision.actions:
            self._apply(action)
        self._advance()
        return decision

    def _apply(self, action: Action) -> None:
        target = next(c for c in self.calls if c.id == action.call_id)
        if action.kind is ActionKind.THROTTLE:
            target.written_high = action.memory_high
        elif action.kind is ActionKind.RESTORE:
            target.written_high = None if action.memory_high == target.high else action.memory_high
        elif action.kind is ActionKind.FREEZE:
            target.frozen = True
        elif action.kind is ActionKind.THAW:
            target.frozen = False
            target.written_high = action.memory_high or target.written_high
        else:
            target.killed = True

    def _advance(self) -> None:
        self.now = round(self.now + TICK, 6)
        for c in self.live():
            if c.frozen:
                continue
            ceiling = min(v for v in (c.peak, c.written_high or c.peak, c.high or c.peak))
            c.usage = max(c.usage, min(ceiling, c.usage + int(c.rate * TICK)))
        while self.usage() > self.limit:  # the kernel's OOM killer: the largest call goes
            self.ooms += 1
            max(self.live(), key=lambda c: c.usage).oom_killed = True

    def run(self, seconds: float) -> None:
        for _ in range(round(seconds / TICK)):
            self.step()

    def actions(self) -> list[tuple[float, Action]]:
        return [(t, a) for t, d, _, _ in self.log for a in d.actions]


def check_invariants(sim: Sim) -> None:
    """What must hold on every decision, whatever the load."""
    config = sim.config
    for now, decision, before, views in sim.log:
        a = decision.assessment
        for action in decision.actions:
            victim = next(v for v in views if v.id == action.call_id)
            if action.kind in ESCALATIONS:  # never above a lower-priority call that can give way
                lower = [v for v in views if rank(v.priority) < rank(victim.priority)
                         and before.call(v.id).killed_at is None and v.usage >= config.min_victim_bytes]
                assert not lower, (now, action.kind, victim.id, [v.id for v in lower])
            if action.kind is ActionKind.KILL:
                frozen_since = before.call(victim.id).frozen_since
                stuck = frozen_since is not None and now - frozen_since >= config.max_freeze_seconds
                assert a.headroom < a.reserves["kill"] or stuck, (now, a.headroom)
                tried = victim.frozen or before.call(victim.id).frozen_by_policy
                assert tried or a.headroom < a.reserves["emergency"], (now, victim.id)
            if action.kind is ActionKind.THROTTLE:
                assert action.memory_high >= throttle_target(victim, config) > victim.usage
    per_call: dict[str, list[float]] = {}
    for now, action in sim.actions():
        if action.kind is not ActionKind.KILL:
            per_call.setdefault(action.call_id, []).append(now)
    for times in per_call.values():
        for i, start in enumerate(times):
            inside = [t for t in times[i:] if t - start < config.call_action_interval_seconds]
            assert len(inside) <= config.call_actions_per_interval


# ----- victim order and the tiers -----


def test_victims_lowest_priority_then_most_over_declaration_then_fastest_grower() -> None:
    calls = [
        call("high", HIGH, 600 * M, 100 * M),
        call("normal", NORMAL, 300 * M, 100 * M),
        call("low-within-slow", LOW, 100 * M, 200 * M),
        call("low-within-fast", LOW, 100 * M, 200 * M),
        call("low-over-a-bit", LOW, 150 * M, 140 * M),
        call("low-over-most", LOW, 250 * M, 100 * M),
    ]
    memory = decide(domain(990 * M, calls), calls, CONFIG, -10.0, LadderMemory()).memory  # a sample, no pressure
    calls[3] = replace(calls[3], usage=110 * M)  # grew 10 MiB since
    decision = decide(domain(1000 * M, calls), calls, replace(CONFIG, max_actions_per_tick=10), TICK, memory)
    assert decision.assessment.level is Level.THROTTLE
    assert [cid for _, cid in kinds(decision)] == ["low-over-most", "low-over-a-bit", "low-within-fast",
                                                   "low-within-slow"]


def test_high_is_never_touched_while_a_lower_call_can_give_way() -> None:
    calls = [call("high", HIGH, 900 * M), call("low", LOW, 100 * M, frozen=True)]
    memory = LadderMemory()
    for i in range(100):  # everything the LOW can do is done; the domain stays at the freeze level
        decision = decide(domain(1045 * M, calls), calls, CONFIG, i * TICK, memory)
        memory = decision.memory
        assert all(a.call_id == "low" for a in decision.actions)
    assert decision.assessment.level is Level.FREEZE


def test_high_is_throttled_when_nothing_lower_can_give_way() -> None:
    """A LOW call below min_victim_bytes cannot give way: it shields no one and is never a victim."""
    calls = [call("high", HIGH, 900 * M), call("tiny", LOW, 2 * M)]
    decision = decide(domain(1000 * M, calls), calls, CONFIG, 0.0, LadderMemory())
    assert kinds(decision) == [("throttle", "high")]


# ----- rung 1: throttle -----


def test_the_first_victim_may_grow_up_to_the_throttle_reserve_the_others_are_held_at_usage() -> None:
    """Two LOW calls burst at once; the domain still has 100 MiB above the throttle reserve but its growth
    projects below it: the first victim is throttled at usage plus that room (its burst fits), the second at
    usage plus the slack (it takes its turn). Under a stall both are held at usage."""
    memory = LadderMemory()
    throttle = reserves(LIMIT, CONFIG)["throttle"]
    usage = LIMIT - throttle - 100 * M
    lows = [call("low1", LOW, 300 * M, high=500 * M), call("low2", LOW, 290 * M, high=500 * M)]
    memory = decide(domain(usage - 60 * M, lows), lows, CONFIG, 0.0, memory).memory
    grown = [call("low1", LOW, 330 * M, high=500 * M), call("low2", LOW, 320 * M, high=500 * M)]
    decision = decide(domain(usage, grown), grown, CONFIG, 0.1, memory)  # 600 MiB/s: 120 MiB in the lookahead
    highs = {a.call_id: a.memory_high for a in decision.actions if a.kind is ActionKind.THROTTLE}
    assert decision.assessment.active and decision.assessment.headroom - throttle == 100 * M
    first, second = (v for v in victim_order(tuple(grown), decision.assessment.call_growth))
    assert highs[first.id] == first.usage + 100 * M  # up to the reserve, not beyond
    assert highs[second.id] == throttle_target(second, CONFIG)
    stalled = decide(domain(usage, grown, stall={"s-low1": 50.0, "s-low2": 50.0}), grown, CONFIG, 0.1, memory)
    assert all(a.memory_high == throttle_target(next(c for c in grown if c.id == a.call_id), CONFIG)
               for a in stalled.actions if a.kind is ActionKind.THROTTLE)


def test_throttle_steps_are_bounded_and_converge_just_above_usage() -> None:
    calls = [call("low", LOW, 100 * M, mx=1024 * M)]
    memory, written = LadderMemory(), []
    for i in range(10):
        decision = decide(domain(1000 * M, calls), calls, CONFIG, i * TICK, memory)
        memory = decision.memory
        written += [a.memory_high for a in decision.actions]
    target = 100 * M + CONFIG.throttle_slack_min
    assert written == [512 * M, 256 * M, 128 * M, target]  # halves each step, never below usage + slack
    assert memory.call("low").written_high == target


def test_throttle_without_psi_runs_on_headroom_and_says_why() -> None:
    calls = [call("low", LOW, 300 * M)]
    decision = decide(domain(1000 * M, calls), calls, CONFIG, 0.0, LadderMemory())
    assert decision.assessment.stall_pct is None
    (action,) = decision.actions
    extra = action.log_extra()
    assert extra["action"] == "throttle" and extra["headroom"] == 100 * M and extra["call_usage"] == 300 * M
    assert extra["throttle_reserve"] == 128 * M and "below the throttle reserve" in str(extra["reason"])


def test_stall_of_a_protected_session_is_pressure_with_plenty_of_headroom() -> None:
    calls = [call("high", HIGH, 100 * M), call("low", LOW, 100 * M)]
    quiet = decide(domain(300 * M, calls, stall={"s-high": 1.0}), calls, CONFIG, 0.0, LadderMemory())
    stalled = decide(domain(300 * M, calls, stall={"s-high": 25.0}), calls, CONFIG, 0.0, LadderMemory())
    assert quiet.actions == () and kinds(stalled) == [("throttle", "low")]


def test_the_victims_own_stall_does_not_keep_the_episode_alive() -> None:
    """A throttled call stalls by design: its session's stall is not pressure, so the episode can clear."""
    calls = [call("high", HIGH, 100 * M), call("low", LOW, 100 * M)]
    memory = decide(domain(300 * M, calls, stall={"s-high": 25.0}), calls, CONFIG, 0.0, LadderMemory()).memory
    later = decide(domain(300 * M, calls, stall={"s-high": 0.5, "s-low": 60.0}), calls, CONFIG, TICK, memory)
    assert later.assessment.clear and later.assessment.stall_pct == 0.5


def test_memory_events_of_the_domain_are_pressure() -> None:
    calls = [call("low", LOW, 100 * M)]
    state = domain(300 * M, calls, events=MemoryEvents(max=3))
    decision = decide(state, calls, CONFIG, 0.0, LadderMemory())
    assert kinds(decision) == [("throttle", "low")] and "memory limit" in decision.actions[0].reason


# ----- rung 2: freeze -----


def test_freeze_below_the_freeze_reserve() -> None:
    calls = [call("low1", LOW, 300 * M, 100 * M), call("low2", LOW, 200 * M, 100 * M)]
    decision = decide(domain(1050 * M, calls), calls, CONFIG, 0.0, LadderMemory())
    assert kinds(decision) == [("freeze", "low1"), ("throttle", "low2")]  # one freeze per decision


def test_freeze_after_the_grace_when_a_higher_priority_session_still_stalls() -> None:
    calls = [call("high", HIGH, 100 * M), call("low", LOW, 400 * M)]
    stall = {"s-high": 30.0}
    memory, seen = LadderMemory(), []
    for i in range(15):
        decision = decide(domain(600 * M, calls, stall=stall), calls, CONFIG, i * TICK, memory)
        memory = decision.memory
        calls = [replace(c, frozen=memory.call(c.id).frozen_by_policy) for c in calls]
        seen += [(round(i * TICK, 2), kind) for kind, _ in kinds(decision)]
    freezes = [t for t, kind in seen if kind == "freeze"]
    assert freezes == [CONFIG.freeze_grace_seconds]  # throttled at 0, frozen once the grace has passed


def test_throttling_is_bounded_in_time_then_the_victim_is_frozen() -> None:
    """memory.high alone can throttle forever: without relief, escalate after max_throttle_seconds."""
    calls = [call("low", LOW, 300 * M)]
    memory, first_freeze = LadderMemory(), None
    for i in range(round(12 / TICK)):
        decision = decide(domain(1000 * M, calls), calls, CONFIG, i * TICK, memory)
        memory = decision.memory
        if ("freeze", "low") in kinds(decision) and first_freeze is None:
            first_freeze = i * TICK
    assert first_freeze == pytest.approx(CONFIG.max_throttle_seconds)


# ----- rung 3: kill -----


def test_kill_freezes_first_then_kills_below_the_last_resort_reserve() -> None:
    calls = [call("high", HIGH, 700 * M), call("low", LOW, 380 * M)]
    first = decide(domain(1080 * M, calls), calls, CONFIG, 0.0, LadderMemory())
    assert first.assessment.level is Level.KILL and kinds(first) == [("freeze", "low")]
    frozen = [replace(calls[0], usage=705 * M), replace(calls[1], frozen=True)]  # the HIGH call still grows
    second = decide(domain(1085 * M, frozen), frozen, CONFIG, 2 * TICK, first.memory)
    assert kinds(second) == [("kill", "low")]
    feedback = second.actions[0].feedback()
    assert "yielded to higher-priority sessions" in feedback and "declared 380 MiB" in feedback
    assert "1.1 GiB" in feedback and "Retry later" in feedback


def test_no_kill_below_the_last_resort_reserve_while_nothing_grows() -> None:
    """Setup B's premature kills: with the LOW calls frozen the domain held at 30 MiB free, below the last-resort
    reserve, for seconds, and the ladder killed them although nothing could take that memory. A kill is due only
    once the domain grows toward the limit again, or its limit is hit."""
    lows = [call(f"low{i}", LOW, 240 * M, frozen=True) for i in range(4)]
    calls = [call("high", HIGH, 100 * M), *lows]
    memory = decide(domain(1070 * M, calls), calls, CONFIG, 0.0, LadderMemory()).memory
    for i in range(1, round(5 / TICK)):
        decision = decide(domain(1070 * M, calls), calls, CONFIG, i * TICK, memory)
        memory = decision.memory
        assert decision.assessment.level is Level.KILL and decision.actions == (), i
    now = 5.1  # the growth sample is at least lookahead/2 old
    grown = [replace(calls[0], usage=104 * M), *lows]  # the HIGH call grows again: ~25 MiB/s
    kill = decide(domain(1074 * M, grown), grown, CONFIG, now, memory)
    assert [kind for kind, _ in kinds(kill)] == ["kill"]
    hit = decide(domain(1070 * M, calls, events=MemoryEvents(max=1)), calls, CONFIG, now, memory)
    assert [kind for kind, _ in kinds(hit)] == ["kill"]


def test_emergency_kills_at_once() -> None:
    calls = [call("high", HIGH, 700 * M), call("low", LOW, 395 * M)]
    decision = decide(domain(1095 * M, calls), calls, CONFIG, 0.0, LadderMemory())
    assert decision.assessment.headroom < decision.assessment.reserves["emergency"]
    assert kinds(decision)[0] == ("kill", "low")


def test_one_kill_at_a_time_until_the_killed_call_is_gone_or_settled() -> None:
    calls = [call("high", HIGH, 500 * M), call("low1", LOW, 300 * M), call("low2", LOW, 295 * M)]
    decision = decide(domain(1095 * M, calls), calls, CONFIG, 0.0, LadderMemory())
    assert ("kill", "low1") in kinds(decision) and ("kill", "low2") not in kinds(decision)
    memory = decision.memory
    for i in range(1, round(CONFIG.kill_settle_seconds / TICK)):  # low1 has not exited yet
        decision = decide(domain(1095 * M, calls), calls, CONFIG, i * TICK, memory)
        memory = decision.memory
        assert all(kind != "kill" for kind, _ in kinds(decision))
    decision = decide(domain(1095 * M, calls), calls, CONFIG, CONFIG.kill_settle_seconds, memory)
    assert ("kill", "low2") in kinds(decision)


def test_a_dying_call_shields_higher_priorities_while_its_kill_settles() -> None:
    """The killed LOW call's memory is not released yet: the HIGH call must not be frozen in the meantime."""
    calls = [call("high", HIGH, 700 * M), call("low", LOW, 395 * M)]
    decision = decide(domain(1095 * M, calls), calls, CONFIG, 0.0, LadderMemory())
    assert kinds(decision) == [("kill", "low")]
    memory = decision.memory
    squeezed = 1075 * M  # headroom 25 MiB: below the last-resort reserve, above the emergency one
    for i in range(1, round(CONFIG.kill_settle_seconds / TICK)):
        decision = decide(domain(squeezed, calls), calls, CONFIG, i * TICK, memory)
        memory = decision.memory
        assert decision.actions == ()
    late = decide(domain(squeezed, calls), calls, CONFIG, CONFIG.kill_settle_seconds, memory)
    assert kinds(late) == [("freeze", "high")]  # it never exited: nothing lower can give way any more


def test_no_kill_while_headroom_is_above_the_last_resort_reserve() -> None:
    calls = [call("low", LOW, 1000 * M, 100 * M)]
    memory = LadderMemory()
    for i in range(round(30 / TICK)):
        decision = decide(domain(1060 * M, calls), calls, CONFIG, i * TICK, memory)
        memory = decision.memory
        calls = [replace(calls[0], frozen=memory.call("low").frozen_by_policy)]
        assert all(kind != "kill" for kind, _ in kinds(decision))


# ----- declarations: what a more important call claims -----


def test_a_higher_calls_unused_declaration_holds_the_lower_tier_by_throttling_only() -> None:
    """HIGH declared 600 MiB and uses 100: a LOW call growing into that memory is throttled with 500 MiB still
    free, held there as long as the claim stands (no timed freeze, no kill), and restored once HIGH has reached
    its declaration; without reserve_declared it is left alone."""
    high = call("high", HIGH, 100 * M, 600 * M)
    memory, now = LadderMemory(), 0.0
    low = call("low", LOW, 500 * M, 600 * M)
    kinds_seen: list[str] = []
    for _ in range(round(15 / TICK)):  # longer than max_throttle_seconds
        calls = [high, low]
        decision = decide(domain(600 * M, calls), calls, CONFIG, now, memory)
        memory, now = decision.memory, now + TICK
        kinds_seen += [kind for kind, _ in kinds(decision)]
        assert decision.assessment.claimed == 500 * M and decision.assessment.level is Level.THROTTLE
    assert set(kinds_seen) == {"throttle"} and memory.call("low").written_high is not None
    assert "declared by higher-priority calls" in decide(domain(600 * M, [high, low]), [high, low], CONFIG, now,
                                                        LadderMemory()).actions[0].reason
    peaked = replace(high, peak=600 * M)  # it reached its declaration once, then fell back: it claims nothing
    restored = []
    for _ in range(round(5 / TICK)):
        calls = [peaked, low]
        decision = decide(domain(600 * M, calls), calls, CONFIG, now, memory)
        memory, now = decision.memory, now + TICK
        restored += [kind for kind, _ in kinds(decision)]
    assert "restore" in restored and memory.call("low").written_high is None
    off = replace(CONFIG, reserve_declared=False)
    assert decide(domain(600 * M, [high, low]), [high, low], off, 0.0, LadderMemory()).actions == ()


# ----- the watch between episodes -----


def test_the_watch_decides_only_near_the_throttle_reserve_and_on_fast_growth() -> None:
    calls = [call("low", LOW, 600 * M)]
    decision = decide(domain(600 * M, calls), calls, CONFIG, 0.0, LadderMemory())
    last, memory = decision.assessment, decision.memory
    throttle = last.reserves["throttle"]
    calm = LIMIT - throttle - 50 * M
    # The decision's sample (600 MiB at 0.0) is part of what a reading is judged by: 1 s later at `calm` the
    # domain grew 322 MiB/s, 64 MiB within the lookahead, more than the 50 MiB of margin.
    assert watch_trips(last, calm, watch_growth(memory, (), calm, 1.0, CONFIG), CONFIG)
    quiet = ((calm - M, 0.8),)
    later = replace(memory, last_usage=calm - M, last_seen=0.8)
    assert not watch_trips(last, calm, watch_growth(later, quiet, calm, 1.0, CONFIG), CONFIG)  # 5 MiB/s
    fast = ((calm - 200 * M, 0.8),)  # 1 GiB/s over 0.2 s: 200 MiB within the lookahead
    assert watch_trips(last, calm, watch_growth(later, fast, calm, 1.0, CONFIG), CONFIG)
    assert watch_trips(last, LIMIT - throttle + M, 0.0, CONFIG)
    # What the watch lets pass, the decision would not call pressure either (same usage, same growth).
    grown = [replace(calls[0], usage=600 * M + M)]
    assert not decide(domain(calm, grown), grown, CONFIG, 1.0, later).assessment.active


# ----- rung 4: recovery -----


def squeeze(calls: list[CallView], memory: LadderMemory, now: float, config: PolicyConfig = CONFIG,
            ticks: int = 6) -> tuple[list[CallView], LadderMemory, float]:
    """Ticks of a domain at 1050 of 1100 MiB (the freeze level): the views follow the ladder's freezes."""
    for _ in range(ticks):
        memory = decide(domain(1050 * M, calls), calls, config, now, memory).memory
        calls = [replace(c, frozen=memory.call(c.id).frozen_by_policy) for c in calls]
        now += TICK
    return calls, memory, now


def held_calls() -> tuple[list[CallView], LadderMemory]:
    """A NORMAL call squeezed alone (throttled, then frozen), then two LOW calls begin and are squeezed too."""
    normal = [call("normal", NORMAL, 200 * M, high=400 * M)]
    config = replace(CONFIG, max_actions_per_tick=10, lookahead_seconds=0.0)
    calls, memory, now = squeeze(normal, LadderMemory(), 0.0, replace(config, freeze_reserve_min=40 * M,
                                                                       freeze_reserve_ratio=0.03))
    calls, memory, now = squeeze(calls, memory, now, config, 1)  # its next step: frozen
    lows = [call("low", LOW, 200 * M, 100 * M, high=400 * M), call("low2", LOW, 150 * M)]
    calls, memory, _ = squeeze(calls + lows, memory, now, config, 3)
    return calls, memory


def test_recovery_waits_for_the_dwell_then_thaws_then_restores_most_important_first() -> None:
    calls, memory = held_calls()
    assert all(memory.call(c.id).frozen_by_policy for c in calls)
    assert [c.id for c in calls if memory.call(c.id).written_high] == ["normal", "low2"]
    config = CONFIG
    steps: list[tuple[float, str, str, int]] = []
    now = 1.0
    while now < 30:
        decision = decide(domain(300 * M, calls), calls, config, now, memory)
        memory = decision.memory
        for a in decision.actions:
            steps.append((now, a.kind.value, a.call_id, a.memory_high))
        calls = [replace(c, frozen=memory.call(c.id).frozen_by_policy) for c in calls]
        now = round(now + TICK, 6)
    assert steps[0][0] >= 1.0 + config.recover_dwell_seconds
    assert all(b[0] - a[0] >= config.recover_step_seconds - 1e-9 for a, b in itertools.pairwise(steps))
    thaws = [cid for _, kind, cid, _ in steps if kind == "thaw"]
    restores = [cid for _, kind, cid, _ in steps if kind == "restore"]
    assert [kind for _, kind, _, _ in steps[: len(thaws)]] == ["thaw"] * len(thaws)  # every thaw first
    order = {"normal": 0, "low2": 1, "low": 2}  # importance: NORMAL, the LOW within its declaration, the other
    assert thaws == sorted(thaws, key=order.__getitem__)
    assert restores == sorted(restores, key=order.__getitem__)  # each call fully restored before the next
    final = {cid: high for _, kind, cid, high in steps if kind == "restore"}
    assert thaws == ["normal", "low2", "low"]
    assert final == {"normal": 400 * M, "low2": 0}  # its own memory.high; 0 = "max"
    assert not any(m.held for m in memory.calls.values()) and memory.pressure_since is None


def test_the_band_between_the_marks_holds_and_restarts_the_dwell() -> None:
    calls, memory = held_calls()
    band = 1100 * M - 150 * M  # headroom 150 MiB: above the throttle reserve (128), below recover (192)
    config = replace(CONFIG, lookahead_seconds=0.0)  # the jump into the band is not read as growth to come
    now, clear_usage = 1.0, 300 * M
    for usage in [clear_usage] * 30 + [band] + [clear_usage] * 30:  # 1.5 s clear, a blip, 1.5 s clear
        decision = decide(domain(usage, calls), calls, config, now, memory)
        memory = decision.memory
        assert not decision.assessment.active
        assert all(a.kind is ActionKind.THAW for a in decision.actions)  # no memory.high raised: the dwell restarted
        calls = [replace(c, frozen=memory.call(c.id).frozen_by_policy) for c in calls]
        now += TICK
    assert kinds(decide(domain(clear_usage, calls), calls, config, now + 1.0, memory))  # now it recovers


def test_frozen_calls_are_thawed_in_the_band_within_the_headroom_above_the_throttle_reserve() -> None:
    """Pressure over, the domain stays in the band (not clear): a frozen call would make no progress for as long
    as that lasts (in the isolation benchmark, the whole HIGH run). After the dwell each is thawed, most
    important first, one per step, bounded so it cannot bring the pressure back; nothing's memory.high rises."""
    calls, memory = held_calls()
    config = replace(CONFIG, lookahead_seconds=0.0)
    usage = 1100 * M - 150 * M  # headroom 150 MiB: 22 MiB above the throttle reserve
    steps: list[tuple[float, Action]] = []
    now = 1.0
    while now < 6.0:
        decision = decide(domain(usage, calls), calls, config, now, memory)
        assert not decision.assessment.active and not decision.assessment.clear
        memory = decision.memory
        steps += [(now, a) for a in decision.actions]
        calls = [replace(c, frozen=memory.call(c.id).frozen_by_policy) for c in calls]
        now = round(now + TICK, 6)
    assert [a.kind for _, a in steps] == [ActionKind.THAW] * 3
    assert [a.call_id for _, a in steps] == ["normal", "low2", "low"]  # the most important first
    assert steps[0][0] >= 1.0 + config.recover_dwell_seconds
    assert all(b[0] - a[0] >= config.recover_step_seconds - 1e-9 for a, b in itertools.pairwise(steps))
    by_id = {c.id: c for c in calls}
    for _, action in steps:
        bound = memory.call(action.call_id).written_high
        assert bound is not None and bound - by_id[action.call_id].usage <= max(22 * M, CONFIG.throttle_slack_min)
    assert not any(c.frozen for c in calls) and all(memory.call(c.id).held for c in calls)


def test_an_operator_frozen_call_is_never_thawed_and_an_operator_thaw_wins() -> None:
    calls = [call("mine", LOW, 200 * M), call("low", LOW, 300 * M)]
    memory = decide(domain(1000 * M, calls), calls, CONFIG, 0.0, LadderMemory()).memory  # both throttled
    calls = [replace(calls[0], frozen=True), calls[1]]  # an operator freezes "mine" (FreezeToolCall)
    memory = decide(domain(1050 * M, calls), calls, CONFIG, TICK, memory).memory
    assert memory.call("low").frozen_by_policy and not memory.call("mine").frozen_by_policy
    assert memory.call("mine").held  # its memory.high is the ladder's
    calls = [calls[0], replace(calls[1], frozen=False)]  # an operator thaws "low" meanwhile
    memory = decide(domain(1000 * M, calls), calls, CONFIG, 2 * TICK, memory).memory
    assert not memory.call("low").frozen_by_policy
    seen: list[tuple[str, str]] = []
    for i in range(3, 400):
        decision = decide(domain(300 * M, calls), calls, CONFIG, i * TICK, memory)
        memory = decision.memory
        seen += kinds(decision)
    assert ("restore", "mine") in seen and ("thaw", "mine") not in seen  # its limit back, its freeze kept
    assert not any(m.held for m in memory.calls.values())


def test_disabled_does_nothing() -> None:
    calls = [call("low", LOW, 400 * M)]
    decision = decide(domain(1095 * M, calls), calls, replace(CONFIG, enabled=False), 0.0, LadderMemory())
    assert decision.actions == () and decision.assessment.level is Level.KILL


# ----- properties -----

priorities = st.sampled_from([HIGH, NORMAL, LOW, Priority.UNSPECIFIED])


@st.composite
def sims(draw: st.DrawFn, steady: bool = False) -> Sim:
    n = draw(st.integers(1, 5))
    calls = []
    for i in range(n):
        usage = draw(st.integers(0, 400)) * M
        peak = usage if steady else usage + draw(st.integers(0, 600)) * M
        calls.append(SimCall(f"c{i}", draw(priorities), usage, draw(st.integers(1, 500)) * M,
                             0.0 if steady else draw(st.integers(0, 3000)) * M, peak,
                             high=draw(st.sampled_from([0, 256 * M, 512 * M]))))
    base = draw(st.integers(0, 300)) * M
    limit = draw(st.integers(400, 2000)) * M
    total = base + sum(c.usage for c in calls)
    if total > limit:  # start within the limit
        limit = total + draw(st.integers(0, 100)) * M
    # The logic at the pinned tuning, and today's defaults.
    return Sim(calls, limit=limit, base=base, config=draw(st.sampled_from([CONFIG, PolicyConfig()])))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sim=sims())
def test_invariants_hold_under_any_growth(sim: Sim) -> None:
    """Never above a lower call that can give way; never a kill above the last-resort reserve; a kill only after
    a freeze (or below the emergency reserve); throttles never below usage; bounded actions per call."""
    sim.run(8.0)
    check_invariants(sim)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sim=sims(steady=True))
def test_steady_load_converges_without_flapping(sim: Sim) -> None:
    """Constant usage: the ladder only escalates or only recovers, and then stops acting."""
    sim.run(20.0)
    check_invariants(sim)
    for cid in {a.call_id for _, a in sim.actions()}:
        directions = [a.kind in ESCALATIONS for _, a in sim.actions() if a.call_id == cid]
        assert directions == sorted(directions, reverse=True) or directions == sorted(directions), (cid, directions)
    assert all(not d.actions for _, d, _, _ in sim.log[-round(5.0 / TICK):])


@pytest.mark.parametrize("config", [CONFIG, PolicyConfig()], ids=["pinned", "defaults"])
@pytest.mark.parametrize("rate", [100, 200, 400, 800, 1600])
def test_a_call_throttled_on_its_growth_is_not_restored_back_into_pressure(rate: int, config: PolicyConfig) -> None:
    """The guest's steady-load test in miniature: 512 MiB, HIGH holds 160, LOW grows toward 320 at `rate` MiB/s
    (all of it would leave less than the freeze reserve). The growing LOW call is throttled (or, faster, frozen)
    on the projection while the headroom itself is still above the recover reserve; held, it stops growing, so
    the domain reads clear. Recovery must not hand it back more than the headroom above the recover reserve.
    Before the fix a restore let it grow into pressure again and it was frozen, and a thawed call catching up to
    its memory.high read as runaway growth and was frozen again (freeze, thaw, freeze... while it ran)."""
    sim = Sim([SimCall("high", HIGH, 160 * M, 192 * M, 0.0, 160 * M),
               SimCall("low", LOW, 10 * M, 432 * M, rate * M, 320 * M, high=432 * M)], base=20 * M, limit=512 * M,
              config=config)
    sim.run(20.0)
    check_invariants(sim)
    acted = [(t, a.kind) for t, a in sim.actions()]
    assert acted and acted[0][1] in (ActionKind.THROTTLE, ActionKind.FREEZE)
    directions = [kind in ESCALATIONS for _, kind in acted]
    assert directions == sorted(directions, reverse=True), acted  # never escalated again after a restore
    assert not any(t > 10.0 for t, _ in acted), acted  # and then left alone
    assert sim.ooms == 0 and not sim.calls[1].frozen
    assert sim.limit - sim.usage() >= reserves(sim.limit, config)["throttle"]  # it ends in the band, not in pressure


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_recovery_restores_in_priority_order(data: st.DataObject) -> None:
    """Calls arrive most important first, each priority squeezed while it is the lowest present, so every tier
    holds throttled or frozen calls; recovery then reaches them most important first and releases them all."""
    n = data.draw(st.integers(2, 6))
    calls = [call(f"c{i}", data.draw(priorities), data.draw(st.integers(20, 150)) * M,
                  data.draw(st.integers(20, 150)) * M, high=data.draw(st.sampled_from([0, 300 * M])))
             for i in range(n)]
    config = replace(CONFIG, max_actions_per_tick=20, call_actions_per_interval=20)
    present: list[CallView] = []
    memory, now = LadderMemory(), 0.0
    for tier in (2, 1, 0):
        present += [c for c in calls if rank(c.priority) == tier]
        present, memory, now = squeeze(present, memory, now, config)
    held = {c.id for c in present if memory.call(c.id).held}
    firsts: list[str] = []
    for i in range(1000):
        decision = decide(domain(300 * M, present), present, config, now + 1.0 + i * TICK, memory)
        memory = decision.memory
        present = [replace(c, frozen=memory.call(c.id).frozen_by_policy) for c in present]
        firsts += [a.call_id for a in decision.actions if a.call_id not in firsts]
    assert set(firsts) == held and not any(m.held for m in memory.calls.values())
    ranks = [rank(next(c for c in present if c.id == cid).priority) for cid in firsts]
    assert ranks == sorted(ranks, reverse=True)


# ----- the simulated isolation scenario -----


def test_a_growing_low_call_gives_way_and_the_high_call_is_never_touched() -> None:
    """Setup A in miniature: HIGH grows to 550 MiB while two LOW calls grow toward 300 MiB each under 1100 MiB
    with 300 MiB of agents: somebody must give way. The LOWs are throttled, frozen, then one is killed by the
    policy; the HIGH call is never acted on and the kernel never OOM-kills. What HIGH declared and has not used
    yet is claimed for it: the LOWs are held from the start, near their usage, instead of growing into it."""
    sim = Sim([SimCall("high", HIGH, 50 * M, 550 * M, 400 * M, 550 * M),
               SimCall("low1", LOW, 50 * M, 100 * M, 300 * M, 300 * M),
               SimCall("low2", LOW, 50 * M, 100 * M, 300 * M, 300 * M)], base=300 * M)
    sim.run(10.0)
    check_invariants(sim)
    acted = [(a.kind, a.call_id) for _, a in sim.actions()]
    assert sim.ooms == 0 and all(cid != "high" for _, cid in acted)
    assert sim.calls[0].usage == 550 * M and not sim.calls[0].oom_killed
    first_kinds = {cid: [k for k, c in acted if c == cid][:1] for cid in ("low1", "low2")}
    assert first_kinds == {"low1": [ActionKind.THROTTLE], "low2": [ActionKind.THROTTLE]}
    assert [k for k, _ in acted].count(ActionKind.KILL) == 1
    assert all(c.usage < 150 * M for c in sim.calls[1:])


def test_when_the_high_call_ends_the_lows_are_restored() -> None:
    """The squeeze needs no kill (frozen LOWs leave enough for HIGH): once HIGH ends and the dwell passed, the
    LOWs are thawed and their memory.high restored, and they finish growing."""
    sim = Sim([SimCall("high", HIGH, 50 * M, 400 * M, 400 * M, 400 * M, end_at=3.0),
               SimCall("low1", LOW, 50 * M, 100 * M, 200 * M, 250 * M),
               SimCall("low2", LOW, 50 * M, 100 * M, 200 * M, 250 * M)], base=300 * M)
    sim.run(15.0)
    check_invariants(sim)
    assert sim.ooms == 0 and not any(c.killed for c in sim.calls)
    assert all(c.written_high is None and not c.frozen for c in sim.calls[1:])
    assert all(c.usage == 250 * M for c in sim.calls[1:])  # both finished growing to their peak
    assert not any(m.held for m in sim.memory.calls.values())


# ----- admission -----


def request(priority: int, expected: int, queued_since: float | None = None, rid: str = "r") -> AdmissionRequest:
    return AdmissionRequest(rid, f"s-{rid}", priority, expected, queued_since)


def test_admission_counts_what_running_calls_declared_but_have_not_used() -> None:
    running = [call("a", NORMAL, 100 * M, 500 * M)]  # owes 400 MiB
    state = domain(300 * M, running)  # headroom 800 MiB, minus 400 owed, minus the 128 MiB reserve: 272 MiB
    assert admit(request(LOW, 272 * M), state, running, CONFIG, 0.0).verdict is Verdict.ADMIT
    queued = admit(request(LOW, 273 * M), state, running, CONFIG, 0.0)
    assert queued.verdict is Verdict.QUEUE and queued.wait_until == CONFIG.admission_max_wait_seconds
    assert queued.log_extra()["available"] == 272 * M


def test_admission_and_the_ladder_agree_on_what_is_still_owed() -> None:
    """A call that has reached its declaration once (memory.peak) owes nothing more, to admission as to the
    ladder's claim (setup B: a 1.9 GB LOW Begin was refused three times while a HIGH call far past its peak still
    "owed" its whole declaration by its usage)."""
    peaked = [call("high", HIGH, 100 * M, 500 * M)]
    peaked = [replace(peaked[0], peak=520 * M)]
    state = domain(300 * M, peaked)
    late = admit(request(LOW, 600 * M), state, peaked, CONFIG, 0.0)
    assert late.verdict is Verdict.ADMIT and late.outstanding == 0 == peaked[0].unclaimed
    assert decide(state, [*peaked, call("low", LOW, 100 * M)], CONFIG, 0.0, LadderMemory()).assessment.claimed == 0
    climbing = [replace(peaked[0], peak=300 * M)]  # not there yet: 200 MiB still owed, to both
    early = admit(request(LOW, 600 * M), state, climbing, CONFIG, 0.0)
    assert early.verdict is Verdict.QUEUE and early.outstanding == 200 * M
    assert decide(state, [*climbing, call("low", LOW, 100 * M)], CONFIG, 0.0, LadderMemory()).assessment.claimed \
        == 200 * M


def test_admission_keeps_declarations_of_higher_priorities_only_by_default() -> None:
    running = [call("high", HIGH, 100 * M, 500 * M), call("low", LOW, 100 * M, 500 * M)]  # each owes 400 MiB
    state = domain(300 * M, running)  # headroom 800 MiB, minus the 128 MiB reserve: 672 MiB
    low = admit(request(LOW, 272 * M), state, running, CONFIG, 0.0)
    assert low.verdict is Verdict.ADMIT and low.outstanding == 400 * M  # HIGH's owed kept, the other LOW's not
    assert admit(request(LOW, 273 * M), state, running, CONFIG, 0.0).verdict is Verdict.QUEUE
    high = admit(request(HIGH, 672 * M), state, running, replace(CONFIG, admission_high="queue"), 0.0)
    assert high.verdict is Verdict.ADMIT and high.outstanding == 0
    strict = replace(CONFIG, admission_reserved_for="all")
    assert admit(request(LOW, 272 * M), state, running, strict, 0.0).verdict is Verdict.QUEUE
    assert admit(request(HIGH, 1), state, running, strict, 0.0).outstanding == 800 * M
    with pytest.raises(PolicyConfigError, match="admission_reserved_for"):
        from_table({"admission_reserved_for": "some"})


def test_admission_by_priority_queue_bounded_then_refused_with_retry_after() -> None:
    state = domain(1000 * M)
    assert admit(request(HIGH, 500 * M), state, [], CONFIG, 0.0).verdict is Verdict.ADMIT
    assert admit(request(NORMAL, 500 * M, queued_since=0.0), state, [], CONFIG, 9.9).verdict is Verdict.QUEUE
    late = admit(request(NORMAL, 500 * M, queued_since=0.0), state, [], CONFIG, 10.0)
    assert late.verdict is Verdict.REFUSE and late.retryable
    assert late.retry_after_seconds == CONFIG.admission_retry_after_seconds and "after waiting 10.0s" in late.reason
    strict = replace(CONFIG, admission_low="refuse")
    assert admit(request(LOW, 500 * M), state, [], strict, 0.0).verdict is Verdict.REFUSE
    never = admit(request(LOW, 2000 * M), domain(0), [], CONFIG, 0.0)
    assert never.verdict is Verdict.REFUSE and not never.retryable and "declare less" in never.reason
    assert admit(request(LOW, 2000 * M), state, [], replace(CONFIG, enabled=False), 0.0).verdict is Verdict.ADMIT


def test_admission_queue_most_important_first_and_admitted_ones_count() -> None:
    state = domain(500 * M)  # 600 MiB headroom, 472 MiB available
    waiting = [request(LOW, 300 * M, 0.0, "low-old"), request(HIGH, 300 * M, 5.0, "high-new"),
               request(LOW, 100 * M, 1.0, "low-small")]
    decisions = admit_queue(waiting, state, [], CONFIG, 6.0)
    assert [(d.request.id, d.verdict) for d in decisions] == [
        ("high-new", Verdict.ADMIT), ("low-old", Verdict.QUEUE), ("low-small", Verdict.ADMIT)]


@settings(max_examples=300, deadline=None)
@given(priority=priorities, expected=st.integers(0, 3000), usage=st.integers(0, 1100), waited=st.floats(0, 30),
       mode=st.sampled_from(["admit", "queue", "refuse"]))
def test_admission_decisions_are_consistent(priority: int, expected: int, usage: int, waited: float,
                                            mode: str) -> None:
    config = replace(CONFIG, admission_high=mode, admission_normal=mode, admission_low=mode)
    d = admit(request(priority, expected * M, queued_since=0.0), domain(usage * M), [], config, waited)
    fits = expected * M <= d.available
    if d.verdict is Verdict.QUEUE:
        assert not fits and mode == "queue" and d.wait_until is not None and waited < d.wait_until
    elif d.verdict is Verdict.REFUSE:
        assert not fits and mode != "admit" and (d.retry_after_seconds > 0 or not d.retryable)
    else:
        assert fits or mode == "admit"


# ----- configuration -----


def test_every_key_is_documented_in_docs_policy() -> None:
    text = (REPO / "docs" / "policy.md").read_text()
    for name, key in policy_keys():
        assert f"`{name}`" in text, name
        assert key.doc
    assert list(describe(CONFIG)) == [f"policy.{name}" for name, _ in policy_keys()]


@pytest.mark.parametrize(("table", "wrong"), [
    ({"kill_reserve_ratio": 0.2}, "kill_reserve_ratio: must be below freeze_reserve_ratio"),
    ({"emergency_reserve_min": 32 * M}, "emergency_reserve_min: must be below kill_reserve_min"),
    ({"clear_stall_pct": 20.0}, "clear_stall_pct: must be below pressure_stall_pct"),
    ({"admission_low": "maybe"}, "admission_low: must be one of admit, queue, refuse"),
    ({"tick_seconds": "fast"}, "tick_seconds: expected a float"),
    ({"enabled": 1}, "enabled: expected a bool"),
    ({"max_actions_per_tick": 0}, "max_actions_per_tick: must be at least 1"),
    ({"throttle_slack_min": -1}, "throttle_slack_min: must not be negative"),
    ({"lookahead_seconds": float("nan")}, "lookahead_seconds: must be finite"),
    ({"no_such_key": 1}, "no_such_key: unknown key"),
])
def test_invalid_configuration_names_the_key(table: dict[str, object], wrong: str) -> None:
    with pytest.raises(PolicyConfigError, match=rf"^\[policy\] {wrong}"):
        from_table(table)


def test_configuration_from_a_toml_table() -> None:
    config = from_table({"max_throttle_seconds": 5, "admission_low": "refuse"})
    assert config.max_throttle_seconds == 5.0 and isinstance(config.max_throttle_seconds, float)
    assert from_table({}) == PolicyConfig()


def test_reserves_are_ordered_and_floors_scale_down_for_small_domains() -> None:
    defaults = PolicyConfig()
    big, mid, small = (reserves(limit, defaults) for limit in (4096 * M, LIMIT, 256 * M))
    for marks in (big, mid, small):
        assert list(marks.values()) == sorted(marks.values()) and len(set(marks.values())) == 5
    assert big["throttle"] == int(4096 * M * 0.05) and big["recover"] == int(4096 * M * 0.08)  # shares
    assert mid["throttle"] == 64 * M and mid["recover"] == 96 * M  # floors
    assert small["recover"] == 24 * M and small["kill"] == 6 * M  # floors x 1/4, not 96/24 MiB of 256
