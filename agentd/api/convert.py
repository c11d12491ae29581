"""Translation between protobuf messages and core values (no logic beyond field mapping)."""

from __future__ import annotations

from agentd.api.gen import agentd_pb2 as pb
from agentd.core.intents import Intent, Limits
from agentd.core.results import Capture, OomScope, Result
from agentd.core.sessions import Session, SessionSpec
from agentd.core.toolcalls import ToolCall
from agentd.policy.events import PolicyEvent
from agentd.policy.loop import DomainView


def intent_from_pb(msg: pb.Intent) -> Intent:
    return Intent(
        tool=msg.tool,
        argv=tuple(msg.argv),
        expected_memory_bytes=msg.expected_memory_bytes,
        memory_class=msg.memory_class,
        memory_max_bytes=msg.memory_max_bytes,
        cpu_class=msg.cpu_class,
        cpu_max_millicores=msg.cpu_max_millicores,
        pids_max=msg.pids_max,
        timeout_seconds=msg.timeout_seconds,
        network=msg.network,
        labels=dict(msg.labels),
    )


def intent_to_pb(intent: Intent) -> pb.Intent:
    return pb.Intent(
        tool=intent.tool,
        argv=list(intent.argv),
        expected_memory_bytes=intent.expected_memory_bytes,
        memory_class=intent.memory_class,  # type: ignore[arg-type]
        memory_max_bytes=intent.memory_max_bytes,
        cpu_class=intent.cpu_class,  # type: ignore[arg-type]
        cpu_max_millicores=intent.cpu_max_millicores,
        pids_max=intent.pids_max,
        timeout_seconds=intent.timeout_seconds,
        network=intent.network,  # type: ignore[arg-type]
        labels=intent.labels,
    )


def limits_to_pb(limits: Limits, not_enforced: tuple[str, ...] | list[str]) -> pb.Limits:
    return pb.Limits(
        memory_high_bytes=limits.memory_high,
        memory_max_bytes=limits.memory_max,
        cpu_weight=limits.cpu_weight,
        cpu_max_millicores=limits.cpu_max_millicores,
        pids_max=limits.pids_max,
        timeout_seconds=limits.timeout_seconds,
        network=limits.network,  # type: ignore[arg-type]
        not_enforced=list(not_enforced),
    )


def result_to_pb(result: Result) -> pb.ToolCallResult:
    events = result.memory_events
    msg = pb.ToolCallResult(
        call_id=result.call_id,
        session_id=result.session_id,
        tool=result.tool,
        argv=list(result.argv),
        outcome=int(result.outcome),  # type: ignore[arg-type]
        has_exit_status=result.exit_status is not None,
        memory_peak_bytes=result.memory_peak,
        memory_events=pb.MemoryEvents(
            low=events.get("low", 0),
            high=events.get("high", 0),
            max=events.get("max", 0),
            oom=events.get("oom", 0),
            oom_kill=events.get("oom_kill", 0),
        ),
        cpu_user_seconds=result.cpu_user_seconds,
        cpu_system_seconds=result.cpu_system_seconds,
        cpu_throttled_usec=result.cpu_throttled_usec,
        pids_peak=result.pids_peak,
        duration_seconds=result.duration_seconds,
        started_unix=result.started_unix,
        ended_unix=result.ended_unix,
        limits=limits_to_pb(result.limits, result.not_enforced),
        feedback=result.feedback,
        retryable=result.retryable,
        implicit=result.implicit,
        labels=result.labels,
        kill_reason=result.kill_reason,
        network_denials=result.network_denials,
        forks=result.forks,
        capture=capture_to_pb(result.capture) if result.capture is not None else None,
        oom_scope=oom_scope_to_pb(result.oom_scope),
        oom_killed_processes=result.oom_killed_processes,
        throttled_seconds=result.throttled_seconds,
        frozen_seconds=result.frozen_seconds,
        policy_actions=list(result.policy_actions),
    )
    if result.exit_status is not None:
        msg.exit_code = result.exit_status.code
        msg.exit_signal = result.exit_status.signal
    return msg


def oom_scope_to_pb(scope: OomScope) -> str:
    """The proto enum's name (NONE is its UNSPECIFIED)."""
    return "OOM_SCOPE_UNSPECIFIED" if scope == OomScope.NONE else f"OOM_SCOPE_{scope.name}"


def capture_to_pb(capture: Capture) -> pb.CaptureInfo:
    return pb.CaptureInfo(
        rule=capture.rule,
        latency_seconds=capture.latency_seconds,
        memory_before_move_bytes=capture.memory_before_move,
    )


def spec_from_pb(msg: pb.SessionSpec) -> SessionSpec:
    return SessionSpec(
        id=msg.id,
        priority=msg.priority,
        memory_budget=msg.memory_budget_bytes,
        memory_protected=msg.memory_protected_bytes,
        pids_budget=msg.pids_budget,
        labels=dict(msg.labels),
        capture=msg.capture,
    )


def session_to_pb(
    session: Session, agent_processes: int, memory_current: int, cpu_weight: int
) -> pb.Session:
    spec = session.spec
    return pb.Session(
        spec=pb.SessionSpec(
            id=spec.id,
            priority=spec.priority,  # type: ignore[arg-type]
            memory_budget_bytes=spec.memory_budget,
            memory_protected_bytes=spec.memory_protected,
            pids_budget=spec.pids_budget,
            labels=spec.labels,
            capture=spec.capture,  # type: ignore[arg-type]
        ),
        cgroup=str(session.path),
        active_calls=len(session.calls),
        agent_processes=agent_processes,
        memory_current_bytes=memory_current,
        cpu_weight=cpu_weight,
        not_enforced=session.not_enforced,
        created_unix=session.created,
        network_denials=session.network_denials,
    )


def call_to_pb(call: ToolCall, memory_current: int, pids: list[int]) -> pb.ToolCallInfo:
    return pb.ToolCallInfo(
        call_id=call.id,
        session_id=call.session_id,
        intent=intent_to_pb(call.intent),
        limits=limits_to_pb(call.limits, call.not_enforced),
        state=int(call.state),  # type: ignore[arg-type]
        created_unix=call.created,
        started_unix=call.started,
        memory_current_bytes=memory_current,
        pids=pids,
        cgroup=str(call.path),
        implicit=call.implicit,
        throttled=call.policy.throttled_since is not None,
    )


def domain_to_pb(domain: DomainView) -> pb.DomainPressure:
    return pb.DomainPressure(
        domain=domain.name, limit_bytes=domain.limit, usage_bytes=domain.usage, headroom_bytes=domain.headroom,
        stall_pct=domain.stall_pct if domain.stall_pct is not None else -1.0, level=domain.level,
        calls_held=domain.calls_held,
    )


def policy_event_to_pb(event: PolicyEvent) -> pb.PolicyEvent:
    return pb.PolicyEvent(
        time_unix=event.time, domain=event.domain, kind=event.kind, call_id=event.call_id,
        session_id=event.session_id, call_usage_bytes=event.call_usage, call_expected_bytes=event.call_expected,
        memory_high_bytes=event.memory_high, domain_usage_bytes=event.domain_usage,
        domain_limit_bytes=event.domain_limit, headroom_bytes=event.headroom,
        stall_pct=event.stall_pct if event.stall_pct is not None else -1.0, reason=event.reason,
    )
