"""Admission: does a Begin whose declared memory is known fit its pressure domain? Pure.

Available = headroom - outstanding - the throttle reserve, where outstanding is what running calls declared and
have not used yet (they are expected to take it): by default only calls of higher priority than the Begin's
(`admission_reserved_for = "higher"`: memory promised to a more important call is kept for it, while calls of
the same or lower priority that collide are the ladder's to sort out, so a LOW call does not wait for another
LOW call's whole run), or every running call ("all"). A Begin that fits is admitted. One that does not is handled by
its session's priority (`admission_high|normal|low`): admit (the ladder will make lower priorities give way),
queue (re-decided as the domain changes, refused after admission_max_wait_seconds), or refuse at once
(RESOURCE_EXHAUSTED, retryable, with a retry-after hint). A declaration larger than the domain can ever hold is
refused at once, not retryable, unless its priority admits everything. With the policy disabled everything is
admitted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import Enum

from agentd.core.units import format_size
from agentd.policy.model import CallView, DomainState, priority_name, rank
from agentd.policy.settings import PolicyConfig, reserve


class Verdict(Enum):
    ADMIT = "admit"
    QUEUE = "queue"
    REFUSE = "refuse"


@dataclass(frozen=True)
class AdmissionRequest:
    id: str  # the caller's handle for it (e.g. the call id to be)
    session_id: str
    priority: int
    expected: int  # the declared expected memory, or its class size when none was declared
    queued_since: float | None = None  # when it was first queued (None: a new Begin)


@dataclass(frozen=True)
class AdmissionDecision:
    verdict: Verdict
    request: AdmissionRequest
    reason: str
    headroom: int
    outstanding: int
    available: int
    retryable: bool = True
    retry_after_seconds: float = 0.0  # REFUSE: when trying again may succeed
    wait_until: float | None = None  # QUEUE: refused if still queued then

    def log_extra(self) -> dict[str, object]:
        return {
            "verdict": self.verdict.value,
            "session": self.request.session_id,
            "priority": priority_name(self.request.priority),
            "expected": self.request.expected,
            "headroom": self.headroom,
            "outstanding": self.outstanding,
            "available": self.available,
            "retry_after_seconds": self.retry_after_seconds,
            "reason": self.reason,
        }


def reserved_for(request_priority: int, call_priority: int, config: PolicyConfig) -> bool:
    """Must a Begin of this priority leave a running call's unused declaration free?"""
    return config.admission_reserved_for == "all" or rank(call_priority) > rank(request_priority)


def outstanding(calls: Iterable[CallView], priority: int, config: PolicyConfig) -> int:
    """Memory running calls declared and have not reached yet (the ladder's claim: usage or peak so far), of
    those a Begin of `priority` leaves free."""
    return sum(call.unclaimed for call in calls if reserved_for(priority, call.priority, config))


def admit(
    request: AdmissionRequest, domain: DomainState, calls: Iterable[CallView], config: PolicyConfig, now: float,
    extra_outstanding: int = 0,
) -> AdmissionDecision:
    owed = outstanding(calls, request.priority, config) + extra_outstanding
    margin = reserve(domain.limit, config.throttle_reserve_ratio, config.throttle_reserve_min)
    available = domain.headroom - owed - margin

    base = AdmissionDecision(Verdict.ADMIT, request, "", domain.headroom, owed, available)
    need = format_size(request.expected)
    if not config.enabled:
        return replace(base, reason="the policy is disabled")
    if request.expected <= available:
        return replace(base, reason=f"{need} fits: {format_size(available)} available in {domain.name}")
    mode = _mode(request.priority, config)
    short = f"{need} does not fit {domain.name}: {format_size(max(available, 0))} available"
    if mode == Verdict.ADMIT.value:
        return replace(base, reason=f"{short}; admitted by priority, lower priorities give way")
    if request.expected > domain.limit - margin:
        return replace(base, verdict=Verdict.REFUSE, retryable=False, reason=f"declares {need}, more than "
                       f"{domain.name} can ever hold ({format_size(domain.limit - margin)}): declare less")
    first = request.queued_since if request.queued_since is not None else now
    deadline = first + config.admission_max_wait_seconds
    if mode == Verdict.QUEUE.value and now < deadline:
        return replace(base, verdict=Verdict.QUEUE, wait_until=deadline, reason=f"{short}; queued until memory frees")
    waited = f" after waiting {now - first:.1f}s" if request.queued_since is not None else ""
    return replace(base, verdict=Verdict.REFUSE, retry_after_seconds=config.admission_retry_after_seconds,
                   reason=f"{short}{waited}; retry later or declare less")


def _mode(priority: int, config: PolicyConfig) -> str:
    return (config.admission_low, config.admission_normal, config.admission_high)[rank(priority)]


def admit_queue(
    requests: Iterable[AdmissionRequest], domain: DomainState, calls: Iterable[CallView], config: PolicyConfig,
    now: float,
) -> list[AdmissionDecision]:
    """Re-decide every waiting Begin of a domain, the most important first, then the longest waiting: each one
    admitted counts as outstanding for the next. A smaller request may pass a larger one that does not fit
    (the larger one's wait is bounded)."""
    running = tuple(calls)
    order = sorted(requests, key=lambda r: (-rank(r.priority), r.queued_since if r.queued_since is not None
                                            else now, r.id))
    decisions: list[AdmissionDecision] = []
    admitted: list[AdmissionRequest] = []
    for request in order:
        extra = sum(a.expected for a in admitted if reserved_for(request.priority, a.priority, config))
        result = admit(request, domain, running, config, now, extra)
        if result.verdict is Verdict.ADMIT:
            admitted.append(request)
        decisions.append(result)
    return decisions
