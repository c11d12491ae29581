"""The tool-call state machine, driven by the kernel's cgroup.events notifications and by timers.

    PENDING ──placed──▶ RUNNING ◀──frozen 0 / frozen 1──▶ FROZEN
       │                   │                                 │
       │ join deadline,    │ populated 0 (cgroup empty) ─────┴──▶ [grace for the exit report] ──▶ FINISHED
       │ cancelled         │ timeout / kill ──▶ cgroup.kill ──▶ populated 0 ─────────────────────▶ FINISHED
       └───────────────────┴──────────────────────────────────────────────────────────────────────▶ FINISHED

A PENDING call has no process: killing or expiring it finalises it at once. A RUNNING or FROZEN one ends
only when its cgroup is empty (the kernel says so), however it was killed; FINISHED is set by the reaper.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from agentd.core.config import Config
from agentd.core.deadlines import Deadlines
from agentd.core.reap import Reaper
from agentd.core.registry import Registry
from agentd.core.results import KillReason, Result
from agentd.core.toolcalls import CallState, ToolCall
from agentd.core.tracking import Tracking
from agentd.kernel import cgroupfs
from agentd.kernel.watch import Watcher, reread

log = logging.getLogger(__name__)

STARTED_LABEL = "started"


@dataclass(eq=False)
class Running:
    loop: asyncio.AbstractEventLoop
    config: Config
    registry: Registry
    watcher: Watcher
    tracking: Tracking
    reaper: Reaper
    deadlines: Deadlines = field(init=False)  # the calls' timers (timeouts, join deadlines, exit-report graces)

    def __post_init__(self) -> None:
        self.deadlines = Deadlines(self.loop)

    def watch(self, call: ToolCall) -> None:
        call.events_fd = self.watcher.watch(f"{call.path}/cgroup.events", lambda fd: self._on_events(call, fd))

    def populated(self, call: ToolCall) -> bool:
        """Whether the call's cgroup has processes, read through its watched cgroup.events when it has one."""
        if call.events_fd is None:
            return cgroupfs.populated(call.path)
        return cgroupfs.parse_flat_keyed(reread(call.events_fd)).get("populated", 0) == 1

    def await_join(self, call: ToolCall) -> None:
        """PENDING until its process joins, at most [api] join_timeout_seconds."""
        call.timers.append(self.deadlines.call_later(self.config.join_timeout_seconds, self._join_expired, call))

    def start(self, call: ToolCall, pid: int) -> None:
        """The call's first process is in: RUNNING, timeout armed, start time labelled (a restarted daemon
        adopts a populated call as running even without that label)."""
        call.cancel_timers()
        call.pid = pid
        call.state = CallState.RUNNING
        call.started = time.time()
        call.timers.append(self.deadlines.call_later(call.limits.timeout_seconds, self._timed_out, call))
        log.debug("call started", extra={"call": call.id, "session": call.session_id, "pid": pid})
        try:
            cgroupfs.set_label(call.path, STARTED_LABEL, f"{call.started!r} {pid}".encode())
        except cgroupfs.CgroupError as exc:
            log.error("start label not written", extra={"call": call.id, "pid": pid, "error": str(exc)})

    def resume(self, call: ToolCall) -> None:
        """A running call adopted after a restart: watched again, what is left of its timeout re-armed."""
        self.watch(call)
        remaining = call.started + call.limits.timeout_seconds - time.time()
        call.timers.append(self.deadlines.call_later(max(0.0, remaining), self._timed_out, call))
        if not cgroupfs.populated(call.path):
            self._emptied(call)

    def kill_nowait(self, call: ToolCall, reason: KillReason, detail: str) -> None:
        """Kill the call's processes (the end follows from the kernel's populated 0); a PENDING call ends now."""
        if call.state == CallState.FINISHED:
            return
        if call.kill_reason == KillReason.NONE:
            call.kill_reason, call.kill_detail = reason, detail
        log.info("call killed", extra={"call": call.id, "session": call.session_id, "reason": reason.name,
                                       "detail": detail, "state": call.state.name})
        if call.state == CallState.PENDING:
            self.reaper.finalise(call)
            return
        try:
            cgroupfs.kill(call.path)
        except cgroupfs.CgroupError as exc:
            log.error("cgroup.kill failed", extra={"call": call.id, "error": str(exc)})

    async def kill(self, call: ToolCall, reason: KillReason, detail: str) -> Result:
        self.kill_nowait(call, reason, detail)
        return await self.result_of(call)

    async def result_of(self, call: ToolCall) -> Result:
        assert call.done is not None
        return await asyncio.shield(call.done)

    def _join_expired(self, call: ToolCall) -> None:
        if call.state == CallState.PENDING:
            self.kill_nowait(call, KillReason.CANCELLED, "no process joined in time")

    def _timed_out(self, call: ToolCall) -> None:
        self.kill_nowait(call, KillReason.TIMEOUT, f"timeout of {call.limits.timeout_seconds:g} s")

    def _on_events(self, call: ToolCall, fd: int) -> None:
        events = cgroupfs.parse_flat_keyed(reread(fd))
        frozen = events.get("frozen", 0) == 1
        if frozen and call.state == CallState.RUNNING:
            call.state = CallState.FROZEN
        elif not frozen and call.state == CallState.FROZEN:
            call.state = CallState.RUNNING
        for waiter in call.freeze_waiters:
            if not waiter.done():
                waiter.set_result(None)
        call.freeze_waiters.clear()
        if events.get("populated", 1) == 0 and call.state in (CallState.RUNNING, CallState.FROZEN):
            self._emptied(call)

    def _emptied(self, call: ToolCall) -> None:
        """The cgroup is empty: finalise, after a grace for the client's exit report if it promised one and
        neither it nor the kernel has said how the first process ended."""
        if call.emptied:
            return
        call.emptied = True
        call.cancel_timers()
        waiting = call.report_exit and call.exit_status is None and not call.end_requested
        if waiting:
            self.tracking.drain()  # the lifecycle program may already say how the first process ended
            waiting = call.kernel_exit is None
        if waiting:
            call.timers.append(
                self.deadlines.call_later(self.config.exit_report_grace_seconds, self.reaper.finalise, call))
        else:
            self.reaper.finalise(call)
