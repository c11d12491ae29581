"""Verbs on a running tool call from outside (the API): end it, wait for it, kill, freeze or thaw it, change
its limits. Limit updates are validated like intents and written all-or-nothing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, replace

from agentd.core.config import Config
from agentd.core.errors import FailedPrecondition
from agentd.core.intents import Limits, validate_update
from agentd.core.reap import Reaper
from agentd.core.registry import Registry
from agentd.core.results import ExitStatus, KillReason, Result
from agentd.core.running import Running
from agentd.core.sessions import Session
from agentd.core.toolcalls import CallState, ToolCall
from agentd.kernel import cgroupfs
from agentd.kernel.capabilities import Capabilities

log = logging.getLogger(__name__)

FREEZE_WAIT_SECONDS = 2.0  # cgroup.freeze is asynchronous: how long FreezeToolCall waits for `frozen 1`
LIMIT_KNOBS_ORDER_LOWERING = ("memory.high", "memory.max", "cpu.max", "pids.max")
LIMIT_KNOBS_ORDER_RAISING = ("memory.max", "memory.high", "cpu.max", "pids.max")


@dataclass(eq=False)
class Control:
    config: Config
    caps: Capabilities
    registry: Registry
    running: Running
    reaper: Reaper

    async def end(self, call_id: str, scope: Session | None, exit_status: ExitStatus | None) -> Result:
        """The caller is done: record its exit status, kill what is left in the cgroup, finalise."""
        found = self.registry.lookup(call_id, scope)
        if isinstance(found, Result):
            return found
        call = found
        call.end_requested = True
        if exit_status is not None and call.exit_status is None:
            call.exit_status = exit_status
        if call.state == CallState.PENDING:
            self.running.kill_nowait(call, KillReason.CANCELLED, "ended before any process joined")
        elif not self.running.populated(call):
            self.reaper.finalise(call)
        elif exit_status is None:
            self.running.kill_nowait(call, KillReason.CANCELLED, "ended by the caller while running")
        else:
            cgroupfs.kill(call.path)  # stragglers the tool left behind; the outcome is the exit status
        assert call.done is not None
        if call.done.done():  # answered without a trip through the event loop
            return call.done.result()
        return await self.running.result_of(call)

    async def wait(self, call_id: str, scope: Session | None, timeout: float) -> Result:
        found = self.registry.lookup(call_id, scope)
        if isinstance(found, Result):
            return found
        if timeout > 0:
            return await asyncio.wait_for(self.running.result_of(found), timeout)
        return await self.running.result_of(found)

    async def kill(self, call_id: str, reason: str) -> Result:
        found = self.registry.lookup(call_id, None)
        if isinstance(found, Result):
            return found
        return await self.running.kill(found, KillReason.POLICY, reason or "killed by an operator")

    async def freeze(self, call_id: str, on: bool) -> ToolCall:
        call = self.registry.active(call_id, None)
        if call.state == CallState.PENDING:
            raise FailedPrecondition(f"tool call {call_id!r} has not started")
        log.info("call frozen" if on else "call thawed", extra={"call": call.id, "session": call.session_id,
                                                                 "by": "operator"})
        loop = self.running.loop
        waiter: asyncio.Future[None] = loop.create_future()
        call.freeze_waiters.append(waiter)
        cgroupfs.freeze(call.path, on)
        deadline = loop.time() + FREEZE_WAIT_SECONDS
        while cgroupfs.frozen(call.path) != on and loop.time() < deadline:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiter), deadline - loop.time())
            waiter = loop.create_future()
            call.freeze_waiters.append(waiter)
        if call.state != CallState.FINISHED:
            call.state = CallState.FROZEN if cgroupfs.frozen(call.path) else CallState.RUNNING
        return call

    def update(
        self, call_id: str, scope: Session | None, memory_high: int, memory_max: int, cpu_max: int, pids_max: int
    ) -> Limits:
        """Renegotiate a running call's limits (0: unchanged). memory.max is never set below current usage:
        such an update is refused, and memory.high is lowered to the requested value instead so the kernel
        reclaims toward it."""
        call = self.registry.active(call_id, scope)
        budget = self.registry.session(call.session_id).spec.memory_budget
        new = validate_update(call.limits, memory_high, memory_max, cpu_max, pids_max, budget, self.config)
        usage = cgroupfs.memory_current(call.path)
        if memory_max and 0 <= new.memory_max < usage:
            throttle = replace(call.limits, memory_high=min(new.memory_max, call.limits.memory_high))
            self._write(call, throttle)
            log.info("call update refused, memory.high lowered", extra={
                "call": call.id, "requested_memory_max": new.memory_max, "usage": usage,
                "memory_high": throttle.memory_high})
            raise FailedPrecondition(
                f"memory_max_bytes {new.memory_max} is below current usage {usage}: lowering memory.max now "
                f"would OOM-kill the call. memory.high was lowered to {throttle.memory_high} so the kernel "
                f"reclaims toward it; retry once usage is below the new limit"
            )
        self._write(call, new)
        log.info("call limits updated", extra={
            "call": call.id, "session": call.session_id, "memory_high": new.memory_high,
            "memory_max": new.memory_max, "cpu_max_millicores": new.cpu_max_millicores, "pids_max": new.pids_max,
            "usage": usage})
        return new

    def _write(self, call: ToolCall, limits: Limits) -> None:
        """Write the knobs that change, all or nothing: high <= max at every step (memory.high is lowered
        first, memory.max raised first); if the kernel refuses one, those written are put back."""
        new, old = limits.knobs(), call.limits.knobs()
        order = LIMIT_KNOBS_ORDER_LOWERING if limits.memory_max < call.limits.memory_max else LIMIT_KNOBS_ORDER_RAISING
        written: list[str] = []
        previous, call.limits = call.limits, limits  # the label is written from the call
        try:
            for knob in order:
                if new[knob] != old[knob]:
                    cgroupfs.apply_knobs(call.path, {knob: new[knob]}, self.caps.enforced)
                    written.append(knob)
            cgroupfs.set_label(call.path, "call", call.label())
        except cgroupfs.CgroupError as exc:
            call.limits = previous
            for knob in reversed(written):
                with contextlib.suppress(cgroupfs.CgroupError):
                    cgroupfs.apply_knobs(call.path, {knob: old[knob]}, self.caps.enforced)
            log.error("call limits not updated, restored", extra={"call": call.id, "error": str(exc),
                                                                   "restored": ",".join(written) or None})
            raise FailedPrecondition(f"the kernel refused the new limits ({exc}); the old ones stay") from exc
