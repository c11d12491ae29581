"""Reconcile at start: adopt what a previous daemon left labelled and alive, finalise what is labelled and empty,
remove what is unlabelled and empty. Nothing unknown that still holds processes is ever killed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from agentd.core.engine import Engine
from agentd.core.sessions import AGENT_LEAF, Session
from agentd.core.toolcalls import CALL_PREFIX, ToolCall
from agentd.kernel import cgroupfs

log = logging.getLogger(__name__)


@dataclass
class Report:
    sessions: list[str] = field(default_factory=list)
    adopted_calls: list[str] = field(default_factory=list)
    finalised_calls: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    left_alone: list[str] = field(default_factory=list)


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
        engine.adopt_session(session)
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
        call = ToolCall.from_label(raw, cgroupfs.get_label(path, "started"), path, cgroupfs.cgroup_id(path))
    except (ValueError, KeyError, TypeError) as exc:
        log.error("unreadable call label", extra={"cgroup": str(path), "error": str(exc)})
        _remove_if_empty(path, report)
        return
    if engine.records.get(call.id) is not None:
        # Recorded before the crash, not yet removed.
        _remove_if_empty(path, report)
        return
    populated = cgroupfs.populated(path)
    engine.adopt_call(call)
    (report.adopted_calls if populated else report.finalised_calls).append(call.id)


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
