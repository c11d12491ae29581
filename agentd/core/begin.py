"""Where a tool call is born: a declared call (BeginToolCall) or a captured one (an exec in an agent leaf).

Validate the intent, derive its limits, take a spare cgroup, label it, write its knobs, watch and track it;
then place its first process (held or captured) or hand out a one-time join token. A call that fails on the way
leaves nothing behind: no record, no metrics, no cgroup.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agentd.core.config import Config
from agentd.core.errors import FailedPrecondition, ResourceExhausted
from agentd.core.housekeeping import Housekeeping
from agentd.core.intents import Intent, Limits, Network, derive_limits, validate_intent
from agentd.core.network import NetworkIntent
from agentd.core.placement import Placement
from agentd.core.registry import Registry
from agentd.core.results import Capture
from agentd.core.running import Running
from agentd.core.sessions import Session
from agentd.core.spares import Spares
from agentd.core.toolcalls import CallState, ToolCall
from agentd.core.tracking import Tracking
from agentd.core.tree import Tree
from agentd.kernel import cgroupfs, procs
from agentd.kernel.capabilities import Capabilities

log = logging.getLogger(__name__)

Held = tuple[int, int]  # (pid of the process asking, pid to place), both as the kernel reported them
BeginListener = Callable[[ToolCall], None]


@dataclass(eq=False)
class Births:
    config: Config
    tree: Tree
    caps: Capabilities
    registry: Registry
    spares: Spares
    tracking: Tracking
    network: NetworkIntent
    running: Running
    placement: Placement
    housekeeping: Housekeeping
    on_begin: list[BeginListener] = field(default_factory=list)

    def begin(
        self, session: Session, intent: Intent, report_exit: bool, confined: bool, held: Held | None = None
    ) -> tuple[ToolCall, str]:
        """A declared call: its cgroup, and a one-time token for the process that will join it; or, given a
        held process, that process placed at once and no token. The intent was validated by the API (before
        admission: validate_intent)."""
        call = self._new_call(session, intent, report_exit, confined, implicit=False)
        if held is not None:
            try:
                self.placement.place(call, *held)
            except BaseException:
                self.discard(call)
                raise
            self._register(session, call)
            self.running.start(call, held[1])
            return call, ""
        self._register(session, call)
        self.running.await_join(call)
        return call, self.registry.new_join_token(call)

    def capture(self, session: Session, pid: int, intent: Intent, rule: str, exec_ns: int) -> ToolCall | None:
        """An implicit call for a process the kernel saw exec in the session's agent/ leaf: placed at once, no
        join token (nothing to confine: the process is the session's own). Children it forked before the move
        follow it. None if the process left agent/ or ended before it could be moved."""
        if cgroupfs.cgroup_of_pid(self.tree.mount, pid) != session.agent_path:
            return None
        validate_intent(intent, self.config)  # made from what the process exec'd
        call = self._new_call(session, intent, report_exit=False, confined=False, implicit=True)
        try:
            cgroupfs.move(call.path, pid)
        except cgroupfs.CgroupError:
            self.discard(call)
            return None
        latency = (time.monotonic_ns() - exec_ns) / 1e9
        if not cgroupfs.populated(call.path) and cgroupfs.read_stats(call.path, ()).cpu_usage_usec == 0:
            # Never ran in the call: it was exiting, and the kernel skips such a process without an error.
            # (One that ran and ended since has CPU time here, and its populated notifications are queued.)
            self.discard(call)
            return None
        self.placement.rank(session, pid)
        self._move_children(session, call, pid)
        call.capture = Capture(rule, latency, procs.anon_resident_bytes(pid))
        self._register(session, call)
        self.running.start(call, pid)
        return call

    def discard(self, call: ToolCall) -> None:
        """Undo _new_call for a call that never became visible: no record, no metrics."""
        self.housekeeping.release(call, None)
        self.housekeeping.remove(call.path)

    def _move_children(self, session: Session, call: ToolCall, pid: int) -> None:
        """Move the descendants a captured process forked before its move (parents first, so that what they
        fork meanwhile lands in the call)."""
        pending = procs.children(pid)
        while pending:
            child = pending.pop()
            if cgroupfs.cgroup_of_pid(self.tree.mount, child) == session.agent_path:
                with contextlib.suppress(cgroupfs.CgroupError):  # it ended meanwhile
                    cgroupfs.move(call.path, child)
                    self.placement.rank(session, child)
                pending.extend(procs.children(child))

    def _new_call(
        self, session: Session, intent: Intent, report_exit: bool, confined: bool, implicit: bool
    ) -> ToolCall:
        """Derive limits from a valid intent, create the labelled cgroup with its knobs, watch and track it."""
        if session.deleting:
            raise FailedPrecondition(f"session {session.id!r} is being deleted")
        active = sum(1 for c in session.calls.values() if c.state != CallState.FINISHED)
        if active >= self.config.max_active_calls_per_session:
            raise ResourceExhausted(
                f"session {session.id!r} has {active} unfinished calls "
                f"([sessions] max_active_calls_per_session = {self.config.max_active_calls_per_session})"
            )
        limits = derive_limits(intent, self.config, session.spec.memory_budget)
        call_id, path, cgroup_id = self.spares.take(session)
        self.housekeeping.arm()  # tops the session's spares up
        call = ToolCall(
            id=call_id, session_id=session.id, intent=intent, limits=limits, path=path, cgroup_id=cgroup_id,
            created=time.time(), report_exit=report_exit, confined=confined, implicit=implicit,
        )
        try:
            call.not_enforced = tuple(cgroupfs.apply_knobs(call.path, limits.knobs(), self.caps.enforced))
            call.not_enforced = self.network.enforcement(call)
            cgroupfs.set_label(path, "call", call.label())
            self.running.watch(call)
            self.tracking.add_call(call)
        except BaseException:
            self.discard(call)
            raise
        log.info("call begun", extra={
            "call": call.id, "session": session.id, "tool": intent.tool, "implicit": implicit,
            "declared_memory": intent.expected_memory_bytes, "declared_memory_max": intent.memory_max_bytes,
            "session_budget": session.spec.memory_budget, "memory_high": limits.memory_high,
            "memory_max": limits.memory_max, "capped": ",".join(capped_by(intent, limits)) or None,
            "cpu_weight": limits.cpu_weight, "cpu_max_millicores": limits.cpu_max_millicores,
            "pids_max": limits.pids_max, "timeout_s": limits.timeout_seconds, "network": Network(limits.network).name,
            "not_enforced": ",".join(call.not_enforced) or None,
        })
        return call

    def _register(self, session: Session, call: ToolCall) -> None:
        call.done = self.running.loop.create_future()
        self.registry.add_call(session, call)
        for listener in self.on_begin:
            try:
                listener(call)
            except Exception:  # a bug there must not leave a placed process in a call without its timers
                log.exception("begin listener failed", extra={"call": call.id})


def capped_by(intent: Intent, limits: Limits) -> list[str]:
    """Which declared values the derived limits cut (by the session budget), for the begin log line."""
    capped = []
    if intent.memory_max_bytes and limits.memory_max < intent.memory_max_bytes:
        capped.append("memory_max")
    if intent.expected_memory_bytes and limits.memory_high < intent.expected_memory_bytes:
        capped.append("memory_high")
    return capped
