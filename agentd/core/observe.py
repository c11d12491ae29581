"""Read-only views of what the kernel says about sessions and calls, for the API and the metrics.

api/ never reads cgroup files itself: it asks here (memory and processes of a session or a call, pressure of a
cgroup). Also the evidence of whose limit OOM-killed a call: OomWitness notes, when a call begins, how many
OOM kills its session's and sessions/'s own limits had invoked (memory.events.local `oom`), so that the count
read when it ends says whether they invoked one meanwhile. Nothing here writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agentd.core.results import AncestorOoms
from agentd.core.sessions import Session
from agentd.core.toolcalls import ToolCall
from agentd.kernel import cgroupfs, psi
from agentd.kernel.psi import Pressure


@dataclass(frozen=True)
class Usage:
    """Memory charged to a cgroup (-1: not measured here) and the processes in it."""

    memory_current: int
    procs: tuple[int, ...]


def call_usage(call: ToolCall) -> Usage:
    return Usage(cgroupfs.memory_current(call.path), tuple(cgroupfs.procs(call.path)))


def session_memory(session: Session) -> int:
    """Memory charged to the session (its agent and its calls); -1 without the memory controller."""
    return cgroupfs.memory_current(session.path)


def agent_processes(session: Session) -> int:
    """Processes in the session's agent/ leaf."""
    return len(cgroupfs.procs(session.agent_path))


def pressure(cgroup: Path) -> list[Pressure]:
    """PSI averages of the cgroup for each resource that reports them."""
    return [p for p in (psi.read_pressure(cgroup, r) for r in psi.RESOURCES) if p is not None]


@dataclass(frozen=True)
class _LimitOoms:
    """One ancestor's memory.max (-1: none) and the OOM kills its own limit invoked (memory.events.local)."""

    limit: int
    ooms: int


def _ooms(cgroup: Path) -> int:
    return cgroupfs.parse_flat_keyed(cgroupfs.read_text(f"{cgroup}/memory.events.local")).get("oom", 0)


def _limit_ooms(cgroup: Path) -> _LimitOoms:
    text = cgroupfs.read_text(f"{cgroup}/memory.max")
    limit = int(text) if text is not None and text.strip().isdigit() else -1
    return _LimitOoms(limit, _ooms(cgroup))


class OomWitness:
    """Per running call: its ancestors' OOM counts when it began. A call's cgroup is <sessions>/<session>/tc-*."""

    def __init__(self, memory: bool = True) -> None:
        self._began: dict[str, tuple[int, int]] = {}  # call id -> OOMs at (session, sessions/) when it began
        self._memory = memory  # the memory controller is enabled for the calls: the counts exist

    def began(self, call: ToolCall) -> None:
        """Note the ancestors' counts now (an engine on_begin listener); calls adopted at start have none."""
        if not self._memory:  # no memory.events.local to read: what reading them would give, without the reads
            self._began[call.id] = (0, 0)
            return
        try:
            counts = (_ooms(call.path.parent), _ooms(call.path.parent.parent))
        except (OSError, ValueError):  # unreadable: the call's OOM, if any, is blamed on an unnamed ancestor
            return
        self._began[call.id] = counts

    def ended(self, call: ToolCall) -> AncestorOoms | None:
        """The OOM kills its ancestors' limits invoked since it began, and those limits; None if it was not seen
        beginning (an adopted call). Forgets the call. Asked only for a call OOM-killed from above (the reaper):
        the others forget()."""
        before = self._began.pop(call.id, None)
        if before is None:
            return None
        try:
            session, sessions = _limit_ooms(call.path.parent), _limit_ooms(call.path.parent.parent)
        except (OSError, ValueError):
            return None
        return AncestorOoms(
            session=max(0, session.ooms - before[0]),
            sessions=max(0, sessions.ooms - before[1]),
            session_limit=session.limit,
            sessions_limit=sessions.limit,
        )

    def forget(self, call: ToolCall) -> None:
        self._began.pop(call.id, None)

    def __len__(self) -> int:
        return len(self._began)
