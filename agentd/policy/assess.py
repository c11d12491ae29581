"""How bad a pressure domain is: its level on the ladder, whether pressure is active or clear now, and the
episode's timers (since when active, since when clear) for hysteresis. Pure.

Stall counts only for sessions the ladder holds nothing of: a call throttled by memory.high stalls by design,
and counting that stall would keep the episode alive forever. Without PSI the ladder runs on headroom and the
domain's memory.events alone.

Declarations (reserve_declared): what calls above the victims' tier declared and have not reached yet is claimed
for them. Pressure is active when the projected headroom minus that claim is below the throttle reserve, and clear
only when the headroom minus the claim is above the recover reserve: the lower tier is held before it takes
memory the higher one said it will need, since freezing frees nothing and a kill would have to give it back. A
claim alone only throttles (freeze and kill levels go by the memory actually in use).

The projection (headroom minus lookahead x growth) counts no growth the kernel will not allow: a call bounded by
a memory.high or memory.max (the ladder's or its own) can add at most its room below that bound, a frozen one
nothing. Without that, a thawed or restored call catching up to its bound in one tick reads as runaway growth and
is frozen again at once (flapping).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from types import MappingProxyType

from agentd.policy.model import Assessment, CallMemory, CallView, DomainState, LadderMemory, Level
from agentd.policy.settings import PolicyConfig, reserve
from agentd.policy.victims import claimed


def reserves(limit: int, config: PolicyConfig) -> dict[str, int]:
    """Every headroom threshold of a domain with this limit, lowest first."""
    names = ("emergency", "kill", "freeze", "throttle", "recover")
    return {
        name: reserve(limit, getattr(config, f"{name}_reserve_ratio"), getattr(config, f"{name}_reserve_min"))
        for name in names
    }


def growth_rate(last_usage: int, last_seen: float | None, usage: int, now: float) -> float:
    """Bytes per second since the previous sample (0 without one)."""
    if last_seen is None or now <= last_seen:
        return 0.0
    return (usage - last_usage) / (now - last_seen)


def domain_growth(memory: LadderMemory, usage: int, now: float, config: PolicyConfig) -> float:
    """The domain's growth, measured over at least half the lookahead: between two ticks a few MiB of jitter
    would read as hundreds of MiB/s (and a freeze); until the sample is that old, the last measurement holds."""
    if not measuring(memory, now, config):
        return memory.growth
    return growth_rate(memory.last_usage, memory.last_seen, usage, now)


def measuring(memory: LadderMemory, now: float, config: PolicyConfig) -> bool:
    """The growth sample is old enough for a new measurement (and is then replaced)."""
    return memory.last_seen is None or now - memory.last_seen >= config.lookahead_seconds / 2


def window_growth(
    memory: LadderMemory, calls: tuple[CallView, ...], now: float, config: PolicyConfig
) -> dict[str, float]:
    """Each call's growth over the same window as the domain's (remembered between measurements); a call that
    arrived after the sample counts as 0 here, its usage is in the domain's growth."""
    if not measuring(memory, now, config):
        return {call.id: memory.call(call.id).window_growth for call in calls}
    growth: dict[str, float] = {}
    for call in calls:
        sample = memory.call(call.id).sample_usage
        growth[call.id] = 0.0 if sample is None else growth_rate(sample, memory.last_seen, call.usage, now)
    return growth


def room(call: CallView, mem: CallMemory) -> int | None:
    """How much more the kernel lets the call use now: none when frozen, else up to the lowest of the ladder's
    memory.high, its own memory.high and memory.max; None when nothing bounds it."""
    if call.frozen or mem.frozen_by_policy:
        return 0
    bounds = [v for v in (mem.written_high or 0, call.memory_high, call.memory_max) if v > 0]
    return max(min(bounds) - call.usage, 0) if bounds else None


def projected_growth(
    growth: float, call_growth: Mapping[str, float], calls: tuple[CallView, ...], memory: LadderMemory,
    config: PolicyConfig,
) -> int:
    """Bytes the domain may add within the lookahead: its growth extrapolated, except that bounded calls add at
    most their room. Never more than the plain extrapolation."""
    lookahead = config.lookahead_seconds
    plain = max(growth, 0.0) * lookahead
    bounded_rate, bounded_bytes = 0.0, 0.0
    for call in calls:
        limit = room(call, memory.call(call.id))
        if limit is None:
            continue
        rate = call_growth.get(call.id, 0.0)
        bounded_rate += rate
        bounded_bytes += min(max(rate, 0.0) * lookahead, limit)
    unbounded = max(growth - bounded_rate, 0.0) * lookahead
    return int(min(plain, unbounded + bounded_bytes))


def protected_stall(
    domain: DomainState, calls: tuple[CallView, ...], memory: Mapping[str, CallMemory]
) -> float | None:
    """The worst stall among sessions the ladder holds no call of; the domain's own stall while it holds none."""
    held_sessions = {call.session_id for call in calls if memory.get(call.id, CallMemory()).held}
    if not held_sessions:
        values = [domain.stall_pct] + [s.stall_pct for s in domain.sessions]
    else:
        values = [s.stall_pct for s in domain.sessions if s.id not in held_sessions]
    known = [value for value in values if value is not None]
    return max(known) if known else None


def assess(
    domain: DomainState, calls: tuple[CallView, ...], memory: LadderMemory, config: PolicyConfig, now: float
) -> Assessment:
    marks = reserves(domain.limit, config)
    growth = domain_growth(memory, domain.usage, now, config)
    call_growth = window_growth(memory, calls, now, config)
    headroom = domain.headroom
    projected = headroom - projected_growth(growth, call_growth, calls, memory, config)
    claim = claimed(calls, memory, config) if config.reserve_declared else 0
    stall = protected_stall(domain, calls, memory.calls)
    physical = (
        projected < marks["throttle"]
        or (stall is not None and stall >= config.pressure_stall_pct)
        or domain.events.limit_hit
    )
    active = physical or projected - claim < marks["throttle"]
    clear = (
        not active
        and headroom - claim >= marks["recover"]
        and (stall is None or stall < config.clear_stall_pct)
    )
    return Assessment(
        domain=domain.name, limit=domain.limit, usage=domain.usage, headroom=headroom,
        projected_headroom=projected, growth=growth, stall_pct=stall, level=_level(headroom, projected, active, marks),
        active=active, clear=clear, reserves=marks, call_growth=MappingProxyType(call_growth), claimed=claim,
        claim_only=active and not physical,
    )


def _level(headroom: int, projected: int, active: bool, marks: Mapping[str, int]) -> Level:
    """KILL on the headroom as it is (never on a projection); FREEZE and THROTTLE ahead of time."""
    if headroom < marks["kill"]:
        return Level.KILL
    if projected < marks["freeze"]:
        return Level.FREEZE
    return Level.THROTTLE if active else Level.NONE


def advance_episode(memory: LadderMemory, assessment: Assessment, now: float) -> LadderMemory:
    """The episode timers after this assessment. Active starts (or continues) an episode; clear starts (or
    continues) the dwell; anything but clear restarts the dwell, so recovery needs it clear without a break. The
    calm timer runs while pressure is not active (the band or clear): it paces thawing in the band."""
    pressure_since = memory.pressure_since
    if assessment.active and pressure_since is None:
        pressure_since = now
    clear_since = (memory.clear_since if memory.clear_since is not None else now) if assessment.clear else None
    calm_since = None if assessment.active else (memory.calm_since if memory.calm_since is not None else now)
    return replace(memory, pressure_since=pressure_since, clear_since=clear_since, calm_since=calm_since)
