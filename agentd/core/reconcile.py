"""Reconcile at start: adopt what a previous daemon left labelled and alive, finalise what is labelled and empty,
remove what is unlabelled and empty. Nothing unknown that still holds processes is ever killed.

A call cgroup carries up to three labels: `call` (identity, intent, limits; written at birth), `started` (start
time and first pid; written when its process was placed) and `result` (the result its waiters were answered
with; written when it was reaped). With a result label the call is recorded exactly as answered; without one
it is adopted (populated) or finalised from the kernel's evidence (empty). A populated call without a start
label had its process placed: it is adopted as running, never cancelled.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from agentd.core.engine import Engine
from agentd.core.reap import RESULT_LABEL
from agentd.core.results import KillReason, Result
from agentd.core.running import STARTED_LABEL
from agentd.core.sessions import AGENT_LEAF, Session
from agentd.core.toolcalls import CALL_PREFIX, CallState, ToolCall
from agentd.kernel import cgroupfs

log = logging.getLogger(__name__)


@dataclass
class Report:
    sessions: list[str] = field(default_factory=list)
    adopted_calls: list[str] = field(default_factory=list)
    finalised_calls: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    left_alone: list[str] = field(default_factory=list)
    recorded_from_labels: list[Path] = field(default_factory=list)


def reconcile(engine: Engine) -> Report:
    report = Report()
    for path in sorted(cgroupfs.children(engine.tree.sessions)):
        raw = cgroupfs.get_label(path, "session")
        if raw is None:
            _remove_if_empty(path, report)
            continue
        try:
            session = Session.from_label(raw, path)
        except (ValueError, KeyError, TypeError) as exc:
            # Its calls may hold results not recorded yet: nothing under it is removed.
            log.error("unreadable session label, leaving it alone", extra={"cgroup": str(path), "error": str(exc)})
            report.left_alone.append(str(path))
            continue
        engine.session_ops.adopt(session)
        report.sessions.append(session.id)
        for child in sorted(cgroupfs.children(path)):
            if child.name == AGENT_LEAF:
                continue
            if child.name.startswith(CALL_PREFIX):
                _reconcile_call(engine, child, report)
            else:
                _remove_if_empty(child, report)
    for child in cgroupfs.children(engine.tree.root):
        if child not in (engine.tree.supervisor, engine.tree.sessions):
            _remove_if_empty(child, report)
    _remove_recorded(engine, report)
    log.info(
        "reconciled",
        extra={
            "sessions": len(report.sessions),
            "adopted_calls": len(report.adopted_calls),
            "finalised_calls": len(report.finalised_calls),
            "removed": len(report.removed),
            "left_alone": len(report.left_alone),
        },
    )
    return report


def _reconcile_call(engine: Engine, path: Path, report: Report) -> None:
    raw = cgroupfs.get_label(path, "call")
    if raw is None:
        _remove_if_empty(path, report)
        return
    try:
        call = ToolCall.from_label(raw, cgroupfs.get_label(path, STARTED_LABEL), path, cgroupfs.cgroup_id(path))
    except (ValueError, KeyError, TypeError) as exc:
        log.error("unreadable call label", extra={"cgroup": str(path), "error": str(exc)})
        _remove_if_empty(path, report)
        return
    if engine.records.get(call.id) is not None:
        # Recorded before the crash, not yet removed.
        _remove_if_empty(path, report)
        return
    answered = _answered(path, call)
    if answered is not None and not cgroupfs.populated(path):
        engine.records.append(answered)
        report.recorded_from_labels.append(path)
        log.info("call recorded as answered", extra={"call": call.id, "outcome": answered.outcome.name})
        report.finalised_calls.append(call.id)
        return
    populated = cgroupfs.populated(path)
    if populated and call.state == CallState.PENDING:
        # Placed, but the start label was not written: it runs, and must not be cancelled.
        call.state, call.started = CallState.RUNNING, call.created
        log.warning("running call without a start label adopted", extra={"call": call.id})
    adopt_call(engine, call)
    (report.adopted_calls if populated else report.finalised_calls).append(call.id)


def _answered(path: Path, call: ToolCall) -> Result | None:
    """The result a previous daemon answered with, if it wrote one."""
    raw = cgroupfs.get_label(path, RESULT_LABEL)
    if raw is None:
        return None
    try:
        result = Result.from_json(json.loads(raw))
    except (ValueError, KeyError, TypeError) as exc:
        log.error("unreadable result label; the call is finalised from the kernel's evidence",
                  extra={"call": call.id, "error": str(exc)})
        return None
    if result.call_id != call.id or result.session_id != call.session_id:
        log.error("result label of another call ignored", extra={"call": call.id, "named": result.call_id})
        return None
    return result


def adopt_call(engine: Engine, call: ToolCall) -> None:
    """Take over a call found after a restart: registered, tracked, watched and its timeout re-armed; or
    finalised at once if nothing can join it any more."""
    session = engine.registry.sessions[call.session_id]
    call.done = engine.loop.create_future()
    engine.registry.add_call(session, call)
    engine.tracking.add_call(call)  # its first process is unknown: no exit status from the kernel
    call.not_enforced = engine.network.enforcement(call)
    if call.state == CallState.PENDING:
        # Its join token died with the old daemon: nothing can join any more.
        call.kill_reason, call.kill_detail = KillReason.CANCELLED, "daemon restarted before any process joined"
        engine.reaper.finalise(call)
        return
    engine.running.resume(call)


def _remove_recorded(engine: Engine, report: Report) -> None:
    """The cgroups of calls recorded from their result labels go once their lines are written."""
    try:
        engine.records.write_pending()
    except OSError as exc:  # they stay labelled for the next start
        log.error("records not written at start", extra={"error": str(exc)})
        return
    for path in report.recorded_from_labels:
        _remove_if_empty(path, report)


def _remove_if_empty(path: Path, report: Report) -> None:
    """Remove an unlabelled or stale subtree bottom-up, but only if no process lives in it."""
    if cgroupfs.populated(path):
        log.warning("unknown populated cgroup left alone", extra={"cgroup": str(path)})
        report.left_alone.append(str(path))
        return
    for child in list(cgroupfs.children(path)):
        _remove_if_empty(child, report)
    if cgroupfs.remove(path):
        report.removed.append(str(path))
