"""Reaping a tool call: read its accounting (before rmdir: it vanishes with the cgroup), build the result,
keep it with the cgroup (the `result` label) and answer whoever waits. Record line and rmdir follow in
housekeeping.

The result label is what makes a crash harmless: the answer an agent got and the record a restarted daemon
writes are the same result, exit status and duration included. A call is answered even when the kernel
refuses to give its accounting (the result then says the accounting is missing); it is never left unanswered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agentd.core.housekeeping import Housekeeping
from agentd.core.network import NetworkIntent
from agentd.core.observe import OomWitness
from agentd.core.records import RecordStore, encode_result
from agentd.core.registry import Registry
from agentd.core.results import (
    AncestorOoms,
    Outcome,
    Result,
    classify,
    feedback,
    oom_scope,
    processes_oom_killed,
    retryable,
)
from agentd.core.toolcalls import CallState, ToolCall
from agentd.core.tracking import Tracking
from agentd.kernel import cgroupfs
from agentd.kernel.bpf.libbpf import BpfError
from agentd.kernel.bpf.lifecycle import ProcessCounters
from agentd.kernel.capabilities import Capabilities

log = logging.getLogger(__name__)

RESULT_LABEL = "result"


@dataclass(eq=False)
class Reaper:
    caps: Capabilities
    registry: Registry
    records: RecordStore
    tracking: Tracking
    network: NetworkIntent
    housekeeping: Housekeeping
    oom_witness: OomWitness = field(init=False)  # its began() is an on_begin listener

    def __post_init__(self) -> None:
        self.oom_witness = OomWitness(memory="memory" in self.caps.enforced)

    def finalise(self, call: ToolCall) -> Result | None:
        """Build the call's result and answer its waiters. Idempotent: None if it was finalised already."""
        if call.state == CallState.FINISHED:
            return None
        call.cancel_timers()
        if call.exit_status is None:
            self.tracking.drain()  # the exit of the call's first process is in the ring buffer by now
        stats, counters, denials = self._evidence(call)
        try:
            result = build_result(call, stats, call.state != CallState.PENDING, denials,
                                  counters.forks if counters else -1, time.time(), lambda: self.oom_witness.ended(call))
        finally:
            self.oom_witness.forget(call)
        call.state = CallState.FINISHED
        session = self.registry.remove_call(call)
        if session is not None:
            session.network_denials += result.network_denials
        encoded = encode_result(result)
        self._keep(call, encoded)
        self.records.append(result, encoded)
        if call.done is not None and not call.done.done():
            call.done.set_result(result)
        self.housekeeping.retire_later(call, result, counters)
        log.info("call finished", extra={
            "call": call.id, "session": call.session_id, "outcome": result.outcome.name,
            "exit_code": result.exit_status.code if result.exit_status else None,
            "exit_signal": result.exit_status.signal if result.exit_status else None,
            "kill_reason": call.kill_detail or None, "memory_peak": result.memory_peak,
            "memory_max": call.limits.memory_max, "oom_scope": result.oom_scope.value,
            "oom_killed_processes": result.oom_killed_processes,
            "duration_s": round(result.duration_seconds, 6), "pids_peak": result.pids_peak,
            "network_denials": result.network_denials,
        })
        return result

    def _evidence(self, call: ToolCall) -> tuple[cgroupfs.CgroupStats, ProcessCounters | None, int]:
        """What the kernel says about the call; whatever it refuses is left unknown (logged), never raised."""
        try:
            stats = cgroupfs.read_stats(call.path, self.caps.enforced)
        except (OSError, ValueError) as exc:  # CgroupError is an OSError
            log.error("accounting not read", extra={"call": call.id, "error": str(exc)})
            stats = cgroupfs.CgroupStats()
        try:
            counters = self.tracking.counters(call)
        except (BpfError, OSError) as exc:
            log.error("process counters not read", extra={"call": call.id, "error": str(exc)})
            counters = None
        try:
            denials = self.network.denials(call)
        except (BpfError, OSError) as exc:
            log.error("network denials not read", extra={"call": call.id, "error": str(exc)})
            denials = 0
        return stats, counters, denials

    def _keep(self, call: ToolCall, encoded: bytes) -> None:
        """Label the cgroup with its result (encode_result(): as its record line will hold it), so that a restart
        records what the agent was told."""
        try:
            cgroupfs.set_label(call.path, RESULT_LABEL, encoded)
        except cgroupfs.CgroupError as exc:
            log.error("result label not written: a crash before the record is written would record the call "
                      "from the kernel's evidence alone", extra={"call": call.id, "error": str(exc)})


def build_result(
    call: ToolCall, stats: cgroupfs.CgroupStats, ran: bool, denials: int, forks: int, ended: float,
    witness: Callable[[], AncestorOoms | None] | None = None,
) -> Result:
    """The result from the call's state and the kernel's evidence: the client's report of the exit status
    first, then the kernel's word on the first process. `witness` gives the OOM kills the call's ancestors'
    limits invoked while it ran; asked only for a call OOM-killed from above (it reads their files)."""
    exit_status = call.exit_status if call.exit_status is not None else call.kernel_exit
    outcome = classify(ran, stats, call.kill_reason, exit_status)
    throttled, frozen = call.policy.totals(ended)
    from_above = outcome == Outcome.OOM_KILLED and stats.memory_events.get("oom", 0) == 0
    ancestors = witness() if witness is not None and from_above else None
    scope = oom_scope(outcome, stats.memory_events, ancestors)
    return Result(
        call_id=call.id,
        session_id=call.session_id,
        tool=call.intent.tool,
        argv=call.intent.argv,
        outcome=outcome,
        exit_status=exit_status,
        memory_peak=stats.memory_peak,
        memory_events=dict(stats.memory_events),
        cpu_user_seconds=stats.cpu_user_usec / 1e6,
        cpu_system_seconds=stats.cpu_system_usec / 1e6,
        cpu_throttled_usec=stats.cpu_throttled_usec,
        pids_peak=stats.pids_peak,
        duration_seconds=(ended - call.started) if call.started else 0.0,
        started_unix=call.started,
        ended_unix=ended,
        limits=call.limits,
        not_enforced=call.not_enforced,
        feedback=feedback(outcome, stats, call.limits, exit_status, call.not_enforced, call.kill_detail, denials,
                          scope, ancestors),
        retryable=retryable(outcome, scope),
        implicit=call.implicit,
        labels=dict(call.intent.labels),
        kill_reason=call.kill_detail,
        network_denials=denials,
        forks=forks,
        capture=call.capture,
        oom_scope=scope,
        oom_killed_processes=processes_oom_killed(stats.memory_events),
        throttled_seconds=throttled,
        frozen_seconds=frozen,
        policy_actions=tuple(call.policy.actions),
    )
