"""Process tracking with the lifecycle BPF program, in the engine's terms.

The kernel reports execs in the session agent/ leaves and exits in the tool-call leaves added here, and only
counts the rest (forks too; and the execs of sessions wants_execs refuses: no auto-capture for them). Events
are read on the event loop when the ring buffer's fd is readable (an exec in an agent leaf of a basename given
to wake_on_exec_of, or a backlog) and by drain(),
which the engine calls before it finalises a call so that the exits of its processes are in. An exit gives
a call the exit status of its first process; an exec in an agent leaf goes to on_agent_exec (auto-capture):
at once if its basename was given to wake_on_exec_of, otherwise whenever the events are next read.
Per-session fork/exec/exit counts add the kernel's per-cgroup counters, those of ended calls included.

Without the program (tracker None) every method is a no-op and nothing is counted. When the kernel's map
of tracked cgroups is full, a new session or call runs untracked (no exit status from the kernel, no process
counts, no auto-capture): one error is logged when that starts, and again only after an add succeeded.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable, Iterable

from agentd.core.results import ExitStatus
from agentd.core.sessions import Session
from agentd.core.toolcalls import ToolCall
from agentd.kernel import cgroupfs
from agentd.kernel.bpf.libbpf import BpfError
from agentd.kernel.bpf.lifecycle import CgroupKind, EventType, LifecycleTracker, ProcessCounters, ProcessEvent

log = logging.getLogger(__name__)

ExecListener = Callable[[Session, ProcessEvent], None]
NONE_COUNTED = ProcessCounters(0, 0, 0)
COUNTED_ONLY = CgroupKind(0)  # a managed cgroup that reports nothing: its processes are only counted


def _add(a: ProcessCounters, b: ProcessCounters) -> ProcessCounters:
    return ProcessCounters(a.forks + b.forks, a.execs + b.execs, a.exits + b.exits)


class Tracking:
    def __init__(self, tracker: LifecycleTracker | None, loop: asyncio.AbstractEventLoop) -> None:
        self._tracker = tracker
        self._loop = loop
        self._calls: dict[int, ToolCall] = {}  # by cgroup id
        self._agent_leaves: dict[int, Session] = {}  # by cgroup id
        self._session_of: dict[int, str] = {}  # session id of every tracked cgroup id
        self._ended: dict[str, ProcessCounters] = {}  # per tracked session: counts of its ended calls
        self.on_agent_exec: ExecListener | None = None
        # Whether a session's agent leaf reports its execs to on_agent_exec (set with it; asked when the session is
        # added): the leaves of the others only count theirs, and agentd pays nothing for an exec it would ignore.
        self.wants_execs: Callable[[Session], bool] = lambda _session: True
        self._full_logged = False  # the "map is full" error was logged and no add succeeded since
        if tracker is not None:
            loop.add_reader(tracker.epoll_fd(), self.drain)

    @property
    def enabled(self) -> bool:
        return self._tracker is not None

    def wake_on_exec_of(self, names: Iterable[str]) -> None:
        """Have an exec in an agent leaf of a file with one of these basenames dispatched at once (the
        kernel wakes the event loop for it); replaces the previous names. The listener may still get
        other execs later, so it must apply its own rules."""
        if self._tracker is None:
            return
        try:
            self._tracker.set_wake_names(names)
        except (BpfError, ValueError) as exc:
            log.error("exec wakeups not set: auto-capture may be late", extra={"error": str(exc)})

    def add_session(self, session: Session) -> None:
        cgroup_id = cgroupfs.cgroup_id(session.agent_path)
        reports = self.on_agent_exec is not None and self.wants_execs(session)
        if self._manage(cgroup_id, CgroupKind.AGENT_LEAF if reports else COUNTED_ONLY, session.id):
            self._agent_leaves[cgroup_id] = session
            self._ended[session.id] = NONE_COUNTED

    def remove_session(self, session: Session) -> None:
        leaf = next((cgroup_id for cgroup_id, known in self._agent_leaves.items() if known is session), None)
        if leaf is not None:
            del self._agent_leaves[leaf]
            self._unmanage(leaf)
        self._ended.pop(session.id, None)

    def add_call(self, call: ToolCall) -> None:
        if self._manage(call.cgroup_id, CgroupKind.TOOL_CALL, call.session_id):
            self._calls[call.cgroup_id] = call

    def counters(self, call: ToolCall) -> ProcessCounters | None:
        """What the call's processes did so far (None: not tracked)."""
        if self._tracker is None or call.cgroup_id not in self._calls:
            return None
        return self._tracker.counters(call.cgroup_id)

    def remove_call(self, call: ToolCall, last: ProcessCounters | None) -> None:
        """Stop tracking an ended call; `last` are its final counters (counters() once it emptied), added to
        its session's totals."""
        if self._calls.pop(call.cgroup_id, None) is None:
            return
        self._unmanage(call.cgroup_id)
        if last is not None and call.session_id in self._ended:
            self._ended[call.session_id] = _add(self._ended[call.session_id], last)

    def drain(self) -> None:
        """Dispatch every event waiting in the ring buffer."""
        if self._tracker is None:
            return
        try:
            events = self._tracker.consume()
        except BpfError as exc:
            log.error("reading lifecycle events failed", extra={"error": str(exc)})
            return
        for event in events:
            if event.type is EventType.EXIT:
                call = self._calls.get(event.cgroup_id)
                if call is not None and event.tgid == call.pid and call.kernel_exit is None:
                    call.kernel_exit = ExitStatus.from_wait_status(event.wait_status)
            elif event.type is EventType.EXEC and self.on_agent_exec is not None:
                session = self._agent_leaves.get(event.cgroup_id)
                if session is not None:
                    try:
                        self.on_agent_exec(session, event)
                    except Exception:  # a bug there must not cost the other events
                        log.exception("exec listener failed", extra={"session": session.id, "pid": event.tgid})

    def session_counters(self) -> dict[str, ProcessCounters]:
        """Forks, execs and exits per session since it was created or adopted by this daemon."""
        totals = dict(self._ended)
        if self._tracker is not None:
            for cgroup_id, counters in self._tracker.all_counters().items():
                session_id = self._session_of.get(cgroup_id)
                if session_id in totals:
                    totals[session_id] = _add(totals[session_id], counters)
        return totals

    def map_use(self) -> tuple[int, int] | None:
        """Cgroups in the kernel's map of tracked cgroups, and its capacity; None without the program."""
        return self._tracker.managed_use() if self._tracker is not None else None

    def lost(self) -> int:
        """Events the kernel dropped because the ring buffer was full."""
        return self._tracker.lost() if self._tracker is not None else 0

    def close(self) -> None:
        if self._tracker is not None:
            self._loop.remove_reader(self._tracker.epoll_fd())

    def _manage(self, cgroup_id: int, kind: CgroupKind, session_id: str) -> bool:
        if self._tracker is None:
            return False
        try:
            self._tracker.add_cgroup(cgroup_id, kind)
        except BpfError as exc:
            self._not_tracked(cgroup_id, session_id, exc)
            return False
        self._full_logged = False
        self._session_of[cgroup_id] = session_id
        return True

    def _not_tracked(self, cgroup_id: int, session_id: str, exc: BpfError) -> None:
        assert self._tracker is not None
        if exc.errno != errno.E2BIG:
            log.error("cgroup not tracked", extra={"cgroup_id": cgroup_id, "session": session_id, "error": str(exc)})
            return
        if self._full_logged:
            return
        self._full_logged = True
        entries, capacity = self._tracker.managed_use()
        log.error(
            "the lifecycle map of tracked cgroups is full: new sessions and calls run untracked (no kernel exit "
            "status, process counts or auto-capture) until some end; raise MANAGED_MAX_ENTRIES in "
            "bpf/lifecycle.bpf.c",
            extra={"cgroup_id": cgroup_id, "session": session_id, "entries": entries, "capacity": capacity},
        )

    def _unmanage(self, cgroup_id: int) -> None:
        assert self._tracker is not None
        self._session_of.pop(cgroup_id, None)
        self._tracker.remove_cgroup(cgroup_id)
