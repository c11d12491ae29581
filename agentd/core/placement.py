"""Placing a process into a tool call, before it execs the tool: identified by the kernel (the join socket's
SO_PEERCRED or a pidfd), checked against the call's session, written to cgroup.procs.

A call begun by a sandbox (confined) accepts only processes, and senders, inside that sandbox's session.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from agentd.core.config import Config
from agentd.core.errors import FailedPrecondition, PermissionDenied
from agentd.core.registry import Registry
from agentd.core.running import Running
from agentd.core.sessions import Session
from agentd.core.toolcalls import CallState, ToolCall
from agentd.core.tree import Tree
from agentd.kernel import cgroupfs, procs

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Placement:
    config: Config
    tree: Tree
    registry: Registry
    running: Running

    def place(self, call: ToolCall, sender: int, pid: int) -> None:
        """Move `pid` into the call on behalf of `sender`, both checked against a confined call's session."""
        if pid == os.getpid() or pid <= 1:
            raise PermissionDenied(f"pid {pid} cannot join a tool call")
        session = self.registry.sessions.get(call.session_id)
        if session is None or session.deleting:
            raise FailedPrecondition(f"session {call.session_id!r} is being deleted")
        if call.confined:
            mount, within = str(self.tree.mount), str(session.path)
            for who in {sender, pid}:
                where = cgroupfs.cgroup_path_of_pid(mount, who)
                if where is None or not cgroupfs.is_within(where, within):
                    log.warning("placement refused", extra={"call": call.id, "session": session.id, "pid": who,
                                                             "cgroup": str(where)})
                    raise PermissionDenied(
                        f"pid {who} is not in session {session.id!r}'s cgroups; only the session's own processes "
                        f"can join its calls"
                    )
        try:
            cgroupfs.move(call.path, pid)
        except cgroupfs.CgroupError as exc:
            raise FailedPrecondition(f"could not place pid {pid}: {exc}") from exc
        if not self.running.populated(call):  # the kernel skips an exiting process without an error
            raise FailedPrecondition(f"could not place pid {pid}: it has exited")
        self.rank(session, pid)

    def rank(self, session: Session, pid: int) -> None:
        """Give a placed process its session's oom_score_adj (before it execs the tool: what it forks inherits
        it), so that an OOM kill above the calls takes lower priorities first."""
        try:
            procs.set_oom_score_adj(pid, session.oom_score_adj(self.config))
        except OSError as exc:  # it exited meanwhile
            log.debug("oom_score_adj not set", extra={"pid": pid, "error": str(exc)})

    def join(self, token: str, sender: int, target: int | None = None) -> ToolCall:
        """Place a process into the call its join token belongs to. `sender` is the pid the kernel reports for
        the connecting process (SO_PEERCRED); `target` the pid of a pidfd it passed (None: itself)."""
        call = self.registry.call_for_join_token(token)
        if call is None or call.state != CallState.PENDING:
            raise PermissionDenied("unknown, expired or already used join token")
        pid = sender if target is None else target
        self.place(call, sender, pid)
        self.registry.drop_join_token(call)
        self.running.start(call, pid)
        return call
