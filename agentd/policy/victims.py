"""Who gives way: the victim order and the one priority tier the ladder may touch. Pure.

Victims come lowest priority first; within a priority, calls above their declaration come before calls within
it, the furthest above first; calls within their declaration come by growth, the fastest first (ties: call id,
so the order is deterministic). The ladder touches only the lowest tier that still holds a call able to give
way (alive, not killed by the ladder, using at least `min_victim_bytes`) or is dying (killed by the ladder
within kill_settle_seconds): a HIGH session's call is never touched while a lower-priority call can give way or
is about to release its memory. Recovery goes the other way: the most important first. What the calls above
that tier declared and have not used yet is claimed for them (`claimed`).
"""

from __future__ import annotations

from collections.abc import Mapping

from agentd.policy.model import CallView, LadderMemory, rank
from agentd.policy.settings import PolicyConfig


def can_give_way(call: CallView, memory: LadderMemory, config: PolicyConfig) -> bool:
    return memory.call(call.id).killed_at is None and call.usage >= config.min_victim_bytes


def _victim_key(call: CallView, growth: Mapping[str, float]) -> tuple[int, int, int, float, str]:
    over = call.excess > 0
    return (rank(call.priority), 0 if over else 1, -call.excess if over else 0, -growth.get(call.id, 0.0), call.id)


def victim_order(calls: tuple[CallView, ...], growth: Mapping[str, float]) -> list[CallView]:
    return sorted(calls, key=lambda call: _victim_key(call, growth))


def importance_order(calls: tuple[CallView, ...], growth: Mapping[str, float]) -> list[CallView]:
    """The most important first: the reverse of the victim order."""
    return victim_order(calls, growth)[::-1]


def dying(call: CallView, memory: LadderMemory, config: PolicyConfig, now: float) -> bool:
    """Killed by the ladder within kill_settle_seconds and not gone yet: its memory is about to be released."""
    killed_at = memory.call(call.id).killed_at
    return killed_at is not None and now - killed_at < config.kill_settle_seconds


def claimed(calls: tuple[CallView, ...], memory: LadderMemory, config: PolicyConfig) -> int:
    """What the calls above the victims' tier declared and have not reached yet (0 when every call is in one tier):
    memory they said they will need, which the tier below must leave them."""
    able = [rank(call.priority) for call in calls if can_give_way(call, memory, config)]
    if not able:
        return 0
    tier = min(able)
    return sum(call.unclaimed for call in calls if rank(call.priority) > tier)


def candidates(
    calls: tuple[CallView, ...], memory: LadderMemory, config: PolicyConfig, growth: Mapping[str, float],
    now: float,
) -> list[CallView]:
    """The calls the ladder may act on now, in victim order: those able to give way in the lowest tier that
    holds one. A dying call shields the tiers above it like one that can still give way, but is not acted on."""
    able = [call for call in calls if can_give_way(call, memory, config)]
    shields = able + [call for call in calls if dying(call, memory, config, now)]
    if not shields:
        return []
    tier = min(rank(call.priority) for call in shields)
    return victim_order(tuple(call for call in able if rank(call.priority) == tier), growth)
