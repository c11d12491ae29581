"""The pressure ladder of one domain: `decide(domain, calls, config, now, memory)` -> actions and the ladder's
updated memory. Pure: no I/O, no clock, no globals; the loop reads the kernel, calls it, writes what it says
through the one cgroup writer, and logs one line per action (`Action.log_extra()`).

While pressure is active (level > NONE), victims (victims.py) are, per decision:
1. throttled: memory.high lowered toward usage plus a slack, by bounded steps, never below usage; the first victim
   toward usage plus the room the domain still has above the throttle reserve (less what is claimed), so that
   the bursts of calls of one tier take turns instead of all stalling at once;
2. frozen: the first victim not frozen when the projected headroom is below the freeze reserve, or when a
   higher-priority session still stalls after the victim's throttle grace; any victim throttled for
   max_throttle_seconds while pressure is still active (escalation is bounded in time);
3. killed: only when the headroom is below the last-resort reserve and the domain still grows toward its limit
   (oom_imminent), the first victim, once it was frozen (or at once below the emergency reserve); one kill at a
   time, the next after the killed call is gone or kill_settle_seconds have passed.
Once pressure has not been active for the dwell time (the band between active and clear), frozen calls are
thawed one per recover_step_seconds, each bounded to the headroom above the throttle reserve: frozen, a call
makes no progress at all, bounded, it cannot bring the pressure back by itself.
When pressure has been clear for the dwell time, recovery undoes the ladder one step per recover_step_seconds,
the most important call first: thaws, then memory.high raised step by step back to the call's own limit. A step
never gives a call that still wants more (presses against its memory.high, or grows) more room than the domain
has above the recover reserve (a call thawed without a memory.high of the ladder's gets one), so it grows back
to the recover mark and holds there, instead of into pressure and the next throttle (flapping); a steady call is
given everything back.
In the band between active and clear nothing else moves. Every action but a kill counts against the call's bound of
call_actions_per_interval; a decision takes at most max_actions_per_tick actions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

from agentd.core.units import format_size
from agentd.policy.assess import advance_episode, assess, growth_rate, measuring, room
from agentd.policy.model import (
    Action,
    ActionKind,
    Assessment,
    CallMemory,
    CallView,
    Decision,
    DomainState,
    LadderMemory,
    Level,
    rank,
)
from agentd.policy.settings import PolicyConfig
from agentd.policy.victims import candidates, importance_order

_RECOVERY = (ActionKind.THAW, ActionKind.RESTORE)
# Below this a call's usage is steady (page-cache noise), not demand for more memory.
STEADY_GROWTH_BYTES_PER_S = 1 << 20
# Below the last-resort reserve, a domain that would reach the emergency reserve within this time at its growth
# is about to OOM (a kill needs about this long to free its memory: kill_settle_seconds' default).
IMMINENT_SECONDS = 1.0


@dataclass(frozen=True)
class _Context:
    domain: DomainState
    calls: tuple[CallView, ...]
    config: PolicyConfig
    now: float
    memory: LadderMemory
    assessment: Assessment
    growth: Mapping[str, float]

    def mem(self, call: CallView) -> CallMemory:
        return self.memory.call(call.id)

    def frozen(self, call: CallView) -> bool:
        return call.frozen or self.mem(call).frozen_by_policy

    def action(self, kind: ActionKind, call: CallView, reason: str, memory_high: int = 0) -> Action:
        return Action(kind, call.id, call.session_id, call.priority, reason, self.assessment, call.usage,
                      call.expected, self.growth.get(call.id, 0.0), memory_high)


def decide(
    domain: DomainState, calls: Iterable[CallView], config: PolicyConfig, now: float, memory: LadderMemory
) -> Decision:
    views = tuple(calls)
    if not config.enabled:
        return Decision((), LadderMemory(), assess(domain, views, LadderMemory(), config, now))
    growth = {call.id: _call_growth(memory.call(call.id), call, now) for call in views}
    memory = _sync_with_views(memory, views)
    assessment = assess(domain, views, memory, config, now)
    memory = advance_episode(memory, assessment, now)
    ctx = _Context(domain, views, config, now, memory, assessment, MappingProxyType(growth))
    if assessment.active:
        actions = _escalate(ctx)
    elif _recovery_due(ctx):
        actions = _recover(ctx)
    elif _band_thaw_due(ctx):
        actions = _band_thaw(ctx)
    else:
        actions = []
    return Decision(tuple(actions), _remember(ctx, actions), assessment)


def _call_growth(mem: CallMemory, call: CallView, now: float) -> float:
    return growth_rate(mem.last_usage, mem.last_seen, call.usage, now)


def _sync_with_views(memory: LadderMemory, views: tuple[CallView, ...]) -> LadderMemory:
    """Forget calls that are gone; a call the ladder froze that is no longer frozen was thawed by someone else
    (an operator): theirs is the last word, the ladder no longer holds it frozen."""
    by_id = {call.id: call for call in views}
    kept: dict[str, CallMemory] = {}
    for call_id, mem in memory.calls.items():
        view = by_id.get(call_id)
        if view is None:
            continue
        if mem.frozen_by_policy and not view.frozen:
            mem = replace(mem, frozen_by_policy=False, frozen_since=None)
        kept[call_id] = mem
    return replace(memory, calls=MappingProxyType(kept))


# ----- escalation -----


def _escalate(ctx: _Context) -> list[Action]:
    victims = candidates(ctx.calls, ctx.memory, ctx.config, ctx.growth, ctx.now)
    kill = _kill_step(ctx, victims)
    freeze = _freeze_victim(ctx, victims, exclude=kill.call_id if kill else None)
    actions: list[Action] = []
    room = _room_above_throttle(ctx)
    for call in victims:
        if len(actions) >= ctx.config.max_actions_per_tick:
            break
        action = _step(ctx, call, kill, freeze, room)
        room = 0  # the room goes to the first victim: simultaneous bursts take turns instead of all stalling
        if action is not None and (action.kind is ActionKind.KILL or _within_bound(ctx, call)):
            actions.append(action)
    return actions


def _step(ctx: _Context, call: CallView, kill: Action | None, freeze: Action | None, room: int) -> Action | None:
    """This decision's one action on a victim: the highest rung that applies to it."""
    if kill is not None and kill.call_id == call.id:
        return kill
    if freeze is not None and freeze.call_id == call.id:
        return freeze
    timed = _timed_freeze(ctx, call)
    if timed is not None:
        return timed
    return None if ctx.frozen(call) else _throttle(ctx, call, room)


def _kill_step(ctx: _Context, victims: list[CallView]) -> Action | None:
    """Below the last-resort reserve: kill the first victim once frozen; freeze it first unless the headroom is
    below the emergency reserve too. None while an earlier kill is still settling."""
    a = ctx.assessment
    if not victims or _kill_settling(ctx):
        return None
    if a.level < Level.KILL:
        return None if a.claim_only else _stuck_kill(ctx, victims)
    victim = victims[0]
    emergency = a.headroom < a.reserves["emergency"]
    if not ctx.frozen(victim) and not emergency:
        return ctx.action(ActionKind.FREEZE, victim, f"headroom {format_size(a.headroom)} below the last-resort "
                          f"reserve of {format_size(a.reserves['kill'])}: frozen before it is killed")
    if not emergency and not oom_imminent(a, ctx.domain):
        return None  # frozen, the victims cannot grow; what still runs is not growing toward the limit
    return ctx.action(ActionKind.KILL, victim, _kill_reason(ctx, victim, emergency))


def oom_imminent(a: Assessment, domain: DomainState) -> bool:
    """Below the last-resort reserve, an OOM kill is imminent only if the domain still grows: its limit was hit
    (memory.events), or at its growth it reaches the emergency reserve within IMMINENT_SECONDS. Once the victims
    are frozen and nothing else grows, the domain holds where it is: killing then frees memory nobody needs."""
    if domain.events.limit_hit:
        return True
    above_emergency = a.headroom - a.reserves["emergency"]
    return a.growth * IMMINENT_SECONDS >= above_emergency


def _stuck_kill(ctx: _Context, victims: list[CallView]) -> Action | None:
    """Escalation bounded in time: the first victim the ladder has kept frozen for max_freeze_seconds while the
    pressure lasted is killed (frozen, it frees nothing and would otherwise wait for its own timeout)."""
    for call in victims:
        since = ctx.mem(call).frozen_since
        if ctx.mem(call).frozen_by_policy and since is not None and ctx.now - since >= ctx.config.max_freeze_seconds:
            return ctx.action(ActionKind.KILL, call, f"frozen for {ctx.now - since:.0f} s while "
                              f"{ctx.assessment.domain} stayed under pressure: freezing frees no memory, so it gives "
                              f"way for good")
    return None


def _kill_settling(ctx: _Context) -> bool:
    last = ctx.memory.last_kill_at
    if last is None or ctx.now - last >= ctx.config.kill_settle_seconds:
        return False
    return any(ctx.mem(call).killed_at is not None for call in ctx.calls)


def _kill_reason(ctx: _Context, victim: CallView, emergency: bool) -> str:
    a = ctx.assessment
    higher = [call for call in ctx.calls if rank(call.priority) > rank(victim.priority)]
    whom = "it yielded to higher-priority sessions" if higher else "no lower-priority call could give way"
    name, reserve = ("emergency", "emergency") if emergency else ("last-resort", "kill")
    return (f"{whom}: {a.domain} had {format_size(max(a.headroom, 0))} free, below the {name} reserve of "
            f"{format_size(a.reserves[reserve])}; an OOM kill was imminent")


def _freeze_victim(ctx: _Context, victims: list[CallView], exclude: str | None) -> Action | None:
    """The first victim not frozen, when the projected headroom is below the freeze reserve, or when it was
    throttled for the grace time and a higher-priority session still stalls."""
    a = ctx.assessment
    for call in victims:
        if call.id == exclude or ctx.frozen(call):
            continue
        if a.level >= Level.FREEZE:
            return ctx.action(ActionKind.FREEZE, call, f"projected headroom {_signed_size(a.projected_headroom)} "
                              f"below the freeze reserve of {format_size(a.reserves['freeze'])}")
        stall = _stall_above(ctx, call)
        if stall is not None and _throttled_for(ctx, call) >= ctx.config.freeze_grace_seconds:
            return ctx.action(ActionKind.FREEZE, call, f"a higher-priority session still stalls {stall:.1f}% "
                              f"after {_throttled_for(ctx, call):.2f}s of throttling")
    return None


def _stall_above(ctx: _Context, call: CallView) -> float | None:
    """The worst stall of a session more important than the call, if at or above freeze_stall_pct."""
    stalls = [s.stall_pct for s in ctx.domain.sessions
              if s.stall_pct is not None and rank(s.priority) > rank(call.priority)]
    worst = max(stalls, default=None)
    return worst if worst is not None and worst >= ctx.config.freeze_stall_pct else None


def _throttled_for(ctx: _Context, call: CallView) -> float:
    since = ctx.mem(call).throttled_since
    return 0.0 if since is None else ctx.now - since


def _timed_freeze(ctx: _Context, call: CallView) -> Action | None:
    """memory.high alone can throttle forever: a victim throttled this long while pressure lasts is frozen."""
    throttled = _throttled_for(ctx, call)
    if ctx.frozen(call) or throttled < ctx.config.max_throttle_seconds or ctx.assessment.claim_only:
        return None  # held for a claim, it runs: the claim is the higher tier's, not a shortage
    return ctx.action(ActionKind.FREEZE, call, f"throttled {throttled:.1f}s without relief "
                      f"(max_throttle_seconds {ctx.config.max_throttle_seconds:g})")


def _signed_size(nbytes: int) -> str:
    """A projection can be below zero (growth beyond the limit within the lookahead)."""
    return f"-{format_size(-nbytes)}" if nbytes < 0 else format_size(nbytes)


def throttle_target(call: CallView, config: PolicyConfig) -> int:
    """The lowest memory.high the ladder writes for a call: its usage plus a slack (never below usage)."""
    return call.usage + max(int(call.usage * config.throttle_slack_ratio), config.throttle_slack_min)


def _effective_high(ctx: _Context, call: CallView) -> int:
    """The memory.high in force now, as a number: the ladder's value, else the call's own, bounded by its
    memory.max and the domain's limit ("max" counts as those)."""
    written = ctx.mem(call).written_high
    bounds = [written if written is not None else call.memory_high, call.memory_max, ctx.domain.limit]
    return min(value for value in bounds if value > 0)


def _room_above_throttle(ctx: _Context) -> int:
    """What the domain has above the throttle reserve, less what is claimed: the first victim may still grow into
    it (the throttle holds the domain at the reserve, not the call at its usage). 0 while a stall or the
    domain's limit is the pressure: then the victims are held at their usage."""
    a = ctx.assessment
    if (a.stall_pct is not None and a.stall_pct >= ctx.config.pressure_stall_pct) or ctx.domain.events.limit_hit:
        return 0
    return max(a.free - a.reserves["throttle"], 0)


def _throttle(ctx: _Context, call: CallView, room: int = 0) -> Action | None:
    current = _effective_high(ctx, call)
    target = max(throttle_target(call, ctx.config), call.usage + room)
    if current <= target:
        return None
    new = max(target, int(current * (1.0 - ctx.config.throttle_step_ratio)))
    return ctx.action(ActionKind.THROTTLE, call, _pressure_reason(ctx.assessment, ctx.config), new)


def _pressure_reason(a: Assessment, config: PolicyConfig) -> str:
    if a.claim_only:
        return (f"projected headroom {_signed_size(a.projected_headroom)} less {format_size(a.claimed)} declared by "
                f"higher-priority calls and not used yet is below the throttle reserve of "
                f"{format_size(a.reserves['throttle'])}")
    if a.projected_headroom < a.reserves["throttle"]:
        return (f"projected headroom {_signed_size(a.projected_headroom)} below the throttle reserve of "
                f"{format_size(a.reserves['throttle'])}")
    if a.stall_pct is not None and a.stall_pct >= config.pressure_stall_pct:
        return f"sessions it protects stall {a.stall_pct:.1f}% (pressure_stall_pct {config.pressure_stall_pct:g})"
    return f"{a.domain} reached its memory limit (memory.events)"


def _within_bound(ctx: _Context, call: CallView) -> bool:
    return len(_recent(ctx.mem(call), ctx.now, ctx.config)) < ctx.config.call_actions_per_interval


def _recent(mem: CallMemory, now: float, config: PolicyConfig) -> tuple[float, ...]:
    return tuple(t for t in mem.recent_actions if now - t < config.call_action_interval_seconds)


# ----- recovery -----


def _step_due(ctx: _Context, since: float | None) -> bool:
    """A recovery step is due: its condition has held for the dwell time and the previous step is old enough."""
    m, config = ctx.memory, ctx.config
    if since is None or ctx.now - since < config.recover_dwell_seconds:
        return False
    return m.last_recovery_at is None or ctx.now - m.last_recovery_at >= config.recover_step_seconds


def _recovery_due(ctx: _Context) -> bool:
    return _step_due(ctx, ctx.memory.clear_since)


def _band_thaw_due(ctx: _Context) -> bool:
    return _step_due(ctx, ctx.memory.calm_since)


def _held(ctx: _Context) -> list[CallView]:
    """The calls recovery may act on, the most important first."""
    return [call for call in importance_order(ctx.calls, ctx.growth)
            if ctx.mem(call).held and ctx.mem(call).killed_at is None and _within_bound(ctx, call)]


def _thaw_first(ctx: _Context, held: list[CallView], reason: str, spare: int) -> list[Action]:
    """Thaw the most important call the ladder froze, bounded to `spare` (nothing if none is frozen)."""
    for call in held:
        if ctx.mem(call).frozen_by_policy:
            return [ctx.action(ActionKind.THAW, call, reason, _thaw_high(ctx, call, spare))]
    return []


def _band_thaw(ctx: _Context) -> list[Action]:
    """In the band (pressure no longer active, not yet clear) for the dwell time: thaw one frozen call, the most
    important first, bounded to the headroom above the throttle reserve, so it runs again but cannot bring the
    pressure back by itself. Frozen, a call makes no progress at all; bounded, it runs until it needs more
    memory. Raising memory.high still waits for clear."""
    a = ctx.assessment
    spare = max(a.free - a.reserves["throttle"], 0)
    reason = (f"pressure no longer active for {ctx.now - (ctx.memory.calm_since or ctx.now):.1f}s: headroom "
              f"{format_size(a.headroom)} ({format_size(a.claimed)} claimed), thawed within {format_size(spare)} "
              f"above the throttle reserve of {format_size(a.reserves['throttle'])}")
    return _thaw_first(ctx, _held(ctx), reason, spare)


def _recover(ctx: _Context) -> list[Action]:
    """One step, the most important held call first: every thaw before any memory.high is raised; a call whose
    next raise the domain has no room for is passed over (it stays held at what it has)."""
    held = _held(ctx)
    thaw = _thaw_first(ctx, held, _clear_reason(ctx), _spare(ctx))
    if thaw:
        return thaw
    for call in held:
        if ctx.mem(call).written_high is not None:
            value = _restore_value(ctx, call)
            if value is not None:
                return [ctx.action(ActionKind.RESTORE, call, _clear_reason(ctx), value)]
    return []


def _spare(ctx: _Context) -> int:
    """What the domain can give a call back without leaving the clear side: its headroom, less what is claimed,
    above the recover reserve."""
    return max(ctx.assessment.free - ctx.assessment.reserves["recover"], 0)


def _thaw_high(ctx: _Context, call: CallView, spare: int) -> int:
    """The memory.high a thaw writes first: none (0) if the call's room fits the spare headroom, else its usage
    plus that spare (at least the throttle slack, so it can run)."""
    free = room(replace(call, frozen=False), replace(ctx.mem(call), frozen_by_policy=False))
    if free is not None and free <= spare:
        return 0
    bound = call.usage + max(spare, ctx.config.throttle_slack_min)
    return min(bound, _effective_high(ctx, call)) if ctx.mem(call).written_high is not None else bound


def _restore_value(ctx: _Context, call: CallView) -> int | None:
    """The next memory.high on the way back: up by at most restore_step_ratio (and, for a call that still wants
    more, at most to its usage plus the spare headroom), then the call's own value (0 = "max", once the step
    passes its memory.max or the domain's limit). None when that is no raise."""
    current = _effective_high(ctx, call)
    ceiling = min(v for v in (call.memory_high, call.memory_max, ctx.domain.limit) if v > 0)
    raised = max(int(current * (1.0 + ctx.config.restore_step_ratio)), current + ctx.config.throttle_slack_min)
    if _wants_more(ctx, call, current):
        raised = min(raised, call.usage + _spare(ctx))
    if raised >= ceiling:
        return call.memory_high
    return raised if raised > current else None


def _wants_more(ctx: _Context, call: CallView, current: int) -> bool:
    """The call presses against its memory.high (the kernel hit it lately, or its usage is within half the
    throttle slack of it) or is still growing: it will take whatever a raise gives it. A call sitting below its
    bound, steady, will not."""
    pressing = call.at_high or current - call.usage <= ctx.config.throttle_slack_min // 2
    return pressing or ctx.assessment.call_growth.get(call.id, 0.0) >= STEADY_GROWTH_BYTES_PER_S


def _clear_reason(ctx: _Context) -> str:
    a = ctx.assessment
    assert ctx.memory.clear_since is not None
    stall = "no PSI" if a.stall_pct is None else f"stall {a.stall_pct:.1f}%"
    return (f"pressure clear for {ctx.now - ctx.memory.clear_since:.1f}s: headroom {format_size(a.headroom)} "
            f"({format_size(a.claimed)} claimed) "
            f"above the recover reserve of {format_size(a.reserves['recover'])}, {stall}")


# ----- memory -----


def _remember(ctx: _Context, actions: list[Action]) -> LadderMemory:
    """The memory after this decision: fresh usage samples, the actions' effects, the episode's end."""
    by_call = {action.call_id: action for action in actions}
    calls: dict[str, CallMemory] = {}
    sampling = measuring(ctx.memory, ctx.now, ctx.config)  # the domain's growth sample is renewed below
    for call in ctx.calls:
        mem = replace(ctx.mem(call), last_usage=call.usage, last_seen=ctx.now,
                      recent_actions=_recent(ctx.mem(call), ctx.now, ctx.config),
                      window_growth=ctx.assessment.call_growth.get(call.id, 0.0))
        if sampling:
            mem = replace(mem, sample_usage=call.usage)
        action = by_call.get(call.id)
        calls[call.id] = _apply(mem, action, call, ctx.now) if action is not None else mem
    memory = replace(ctx.memory, calls=MappingProxyType(calls), growth=ctx.assessment.growth)
    if sampling:
        memory = replace(memory, last_usage=ctx.domain.usage, last_seen=ctx.now)  # the next growth sample
    if any(action.kind is ActionKind.KILL for action in actions):
        memory = replace(memory, last_kill_at=ctx.now)
    if any(action.kind in _RECOVERY for action in actions):
        memory = replace(memory, last_recovery_at=ctx.now)
    if ctx.assessment.clear and not any(mem.held for mem in calls.values()):
        memory = replace(memory, pressure_since=None)
    return memory


def _apply(mem: CallMemory, action: Action, call: CallView, now: float) -> CallMemory:
    mem = replace(mem, recent_actions=(*mem.recent_actions, now))
    if action.kind is ActionKind.THROTTLE:
        since = mem.throttled_since if mem.throttled_since is not None else now
        return replace(mem, written_high=action.memory_high, throttled_since=since)
    if action.kind is ActionKind.FREEZE:
        return replace(mem, frozen_by_policy=True, frozen_since=now)
    if action.kind is ActionKind.KILL:
        return replace(mem, killed_at=now)
    if action.kind is ActionKind.THAW:
        mem = replace(mem, frozen_by_policy=False, frozen_since=None)
        if action.memory_high:
            since = mem.throttled_since if mem.throttled_since is not None else now
            mem = replace(mem, written_high=action.memory_high, throttled_since=since)
        return mem
    if action.memory_high == call.memory_high:  # back to the call's own value: the ladder lets go of it
        return replace(mem, written_high=None, throttled_since=None)
    return replace(mem, written_high=action.memory_high)
