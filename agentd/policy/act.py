"""Carrying out the ladder's actions on tool calls, through the core: memory.high and cgroup.freeze through
the one cgroup writer, kills through the call's state machine (outcome KILLED_BY_POLICY). Each action is noted
on the call (time throttled and frozen, the actions, for its result) and logged as one structured line.

A call in two domains (its session's budget and sessions/) gets the lower of the two ladders' memory.high and
stays frozen while either ladder holds it frozen.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from agentd.core.engine import Engine
from agentd.core.results import KillReason
from agentd.core.toolcalls import CallState, ToolCall
from agentd.kernel import cgroupfs
from agentd.policy.model import Action, ActionKind, LadderMemory

log = logging.getLogger(__name__)

# The ladders of the other domains a call is in: (written memory.high or None, frozen by that ladder).
OtherHolds = Callable[[str], tuple[int | None, bool]]


def apply(engine: Engine, action: Action, others: OtherHolds, now: float) -> bool:
    """Carry out one action; False if the call is gone or the kernel refused (logged)."""
    call = engine.registry.calls.get(action.call_id)
    if call is None or call.state not in (CallState.RUNNING, CallState.FROZEN):
        return False
    other_high, other_frozen = others(call.id)
    try:
        if action.kind in (ActionKind.THROTTLE, ActionKind.RESTORE):
            _write_high(engine, call, action.memory_high, other_high, now)
        elif action.kind is ActionKind.FREEZE:
            cgroupfs.freeze(call.path, True)
            call.policy.frozen(True, now)
        elif action.kind is ActionKind.THAW:
            if action.memory_high:  # bounded before it runs again
                _write_high(engine, call, action.memory_high, other_high, now)
            if not other_frozen:
                cgroupfs.freeze(call.path, False)
                call.policy.frozen(False, now)
        elif action.kind is ActionKind.KILL:
            engine.running.kill_nowait(call, KillReason.POLICY, action.feedback())
    except cgroupfs.CgroupError as exc:
        log.error("policy action failed", extra={**action.log_extra(), "error": str(exc)})
        return False
    call.policy.actions.append(action.kind.value)
    return True


def _write_high(engine: Engine, call: ToolCall, wanted: int, other: int | None, now: float) -> None:
    """memory.high as the ladders want it (0 = back to the call's own limit), never above the call's own."""
    own = call.limits.memory_high
    candidates = [v for v in (wanted, other, own) if v]
    value = min(candidates) if candidates else 0
    cgroupfs.apply_knobs(call.path, {"memory.high": str(value) if value else "max"}, engine.caps.enforced)
    call.policy.throttled(bool(value) and value != own, now)


def holds(memories: dict[str, LadderMemory], skip: str) -> OtherHolds:
    """What the ladders of the domains other than `skip` hold of a call."""
    def of(call_id: str) -> tuple[int | None, bool]:
        high: int | None = None
        frozen = False
        for name, memory in memories.items():
            if name == skip or call_id not in memory.calls:
                continue
            mem = memory.calls[call_id]
            if mem.written_high is not None:
                high = mem.written_high if high is None else min(high, mem.written_high)
            frozen = frozen or mem.frozen_by_policy
        return high, frozen
    return of
