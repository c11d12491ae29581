"""Empty tool-call cgroups made ahead, per session, so that beginning a call does not wait for mkdir.

A spare is an unlabelled, empty `tc-<id>` directory under its session: invisible to the API, removed with its
session and at shutdown, and removed at start by reconcile like any unlabelled empty cgroup if the daemon died.
Taking one marks its session for a top-up, which the engine runs after its answers (housekeeping).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from agentd.core.sessions import Session
from agentd.core.toolcalls import CALL_PREFIX, new_call_id
from agentd.kernel import cgroupfs

log = logging.getLogger(__name__)

PER_SESSION = 2


class Spare(NamedTuple):
    call_id: str
    path: Path
    cgroup_id: int


class Spares:
    def __init__(self) -> None:
        self._free: dict[str, list[Spare]] = {}  # by session id
        self._short: set[str] = set()  # sessions to top up

    def take(self, session: Session) -> Spare:
        """A cgroup for a new call of the session: a spare if there is one, else made now."""
        self._short.add(session.id)
        free = self._free.get(session.id)
        return free.pop() if free else _make(session)

    def top_up(self, sessions: Mapping[str, Session]) -> None:
        """Make spares for the sessions that used theirs (and still exist)."""
        short, self._short = self._short, set()
        for session_id in short:
            session = sessions.get(session_id)
            if session is None or session.deleting:
                continue
            free = self._free.setdefault(session_id, [])
            try:
                while len(free) < PER_SESSION:
                    free.append(_make(session))
            except cgroupfs.CgroupError as exc:
                log.warning("spare cgroup not made", extra={"session": session_id, "error": str(exc)})

    def drop(self, session_id: str) -> None:
        """Remove a session's spares (before the session itself is removed)."""
        for spare in self._free.pop(session_id, []):
            cgroupfs.remove(spare.path)
        self._short.discard(session_id)

    def close(self) -> None:
        for session_id in list(self._free):
            self.drop(session_id)

    def __len__(self) -> int:
        return sum(len(free) for free in self._free.values())


def _make(session: Session) -> Spare:
    call_id = new_call_id()
    path = session.path / f"{CALL_PREFIX}{call_id}"
    return Spare(call_id, path, cgroupfs.make(path))
