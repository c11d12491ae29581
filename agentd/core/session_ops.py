"""Session verbs: create one (cgroup, label, knobs, agent/ leaf), move an agent's processes into it, delete it
(its calls cancelled and recorded first), and take one over after a restart."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from agentd.core import sessions as sess
from agentd.core.config import Config
from agentd.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from agentd.core.housekeeping import Housekeeping
from agentd.core.registry import Registry
from agentd.core.results import KillReason, Result
from agentd.core.running import Running
from agentd.core.sessions import Session, SessionSpec
from agentd.core.spares import Spares
from agentd.core.tracking import Tracking
from agentd.core.tree import Tree
from agentd.kernel import cgroupfs, procs
from agentd.kernel.capabilities import Capabilities
from agentd.kernel.watch import Watcher, reread

log = logging.getLogger(__name__)
SessionListener = Callable[[Session], None]

EMPTY_WAIT_SECONDS = 10.0  # DeleteSession with force: how long the killed agent/ leaf may take to empty
PLACE_AGENT_PASSES = 5  # a tree is walked again while new descendants appear, at most this often


@dataclass(eq=False)
class SessionOps:
    config: Config
    tree: Tree
    caps: Capabilities
    registry: Registry
    watcher: Watcher
    tracking: Tracking
    spares: Spares
    running: Running
    housekeeping: Housekeeping
    on_created: list[SessionListener] = field(default_factory=list)  # also adopted ones
    on_deleted: list[SessionListener] = field(default_factory=list)
    _deleting: dict[str, asyncio.Task[list[Result]]] = field(default_factory=dict, init=False, repr=False)

    def create(self, spec: SessionSpec) -> tuple[Session, str]:
        sess.validate_spec(spec, self.config)
        if not spec.id:
            spec = replace(spec, id="s-" + secrets.token_hex(6))
        if spec.id in self.registry.sessions:
            raise AlreadyExists(f"session {spec.id!r} already exists")
        if len(self.registry.sessions) >= self.config.max_sessions:
            raise ResourceExhausted(f"at most {self.config.max_sessions} sessions ([sessions] max_sessions)")
        token = sess.new_token()
        path = self.tree.session_path(spec.id)
        session = Session(spec, path, sess.token_hash(token), time.time())
        try:
            cgroupfs.make(path)
        except cgroupfs.CgroupError as exc:
            if exc.errno == errno.EEXIST:
                raise AlreadyExists(f"cgroup {path} already exists") from exc
            raise
        try:
            cgroupfs.set_label(path, "session", session.label())
            self._configure(session)
            cgroupfs.make(session.agent_path)
        except BaseException:
            self.housekeeping.remove(session.agent_path)
            self.housekeeping.remove(path)
            raise
        self._register(session)
        log.info("session created", extra={
            "session": spec.id, "priority": sess.Priority(spec.priority).name, "memory_budget": spec.memory_budget,
            "memory_protected": spec.memory_protected, "pids_budget": spec.pids_budget,
            "knobs": session.knobs(self.config), "not_enforced": ",".join(session.not_enforced) or None})
        return session, token

    def adopt(self, session: Session) -> None:
        """A session found labelled at start: its knobs rewritten from the current config, its agent/ leaf made
        if it is missing."""
        self._configure(session)
        cgroupfs.ensure(session.agent_path)
        self._register(session)

    async def delete(self, session_id: str, force: bool) -> list[Result]:
        """Cancel the session's calls (recorded first), kill its agent if forced, remove its cgroups. A delete
        asked while one is in progress waits for it and answers as it does."""
        running = self._deleting.get(session_id)
        if running is None:
            session = self.registry.session(session_id)
            running = asyncio.get_running_loop().create_task(self._delete(session, force))
            self._deleting[session_id] = running
            running.add_done_callback(lambda _t: self._deleting.pop(session_id, None))
        return await asyncio.shield(running)

    async def _delete(self, session: Session, force: bool) -> list[Result]:
        agents = cgroupfs.procs(session.agent_path)
        if agents and not force:
            raise FailedPrecondition(
                f"session {session.id!r} still has {len(agents)} agent process(es) in its agent/ cgroup; "
                f"stop the agent first or delete with force to kill them"
            )
        session.deleting = True  # from here on no call can begin, be captured or joined in it
        try:
            results = await asyncio.gather(
                *(self.running.kill(call, KillReason.CANCELLED, "session deleted")
                  for call in list(session.calls.values()))
            )
            self.housekeeping.flush()  # their record lines are written before their cgroups go
            self.spares.drop(session.id)
            if force and cgroupfs.populated(session.agent_path):
                cgroupfs.kill(session.agent_path)
                await self._wait_empty(session, EMPTY_WAIT_SECONDS)
            for child in list(cgroupfs.children(session.path)):
                cgroupfs.remove(child)
            if not cgroupfs.remove(session.path):
                raise FailedPrecondition(f"session cgroup {session.path} could not be removed (still populated)")
        finally:
            session.deleting = False
        self.tracking.remove_session(session)
        self.registry.remove_session(session)
        self._tell(self.on_deleted, session)
        log.info("session deleted", extra={"session": session.id, "calls_ended": len(results), "force": force,
                                           "agents_killed": len(agents) if force else 0})
        return list(results)

    def place_agent(self, session_id: str, pid: int, include_descendants: bool) -> list[int]:
        """Move a process (and, if asked, each of its current descendants) into the session's agent/ leaf.
        The kernel moves one process per write, so a tree is walked again until no new descendant appears;
        only that tree is read from /proc."""
        session = self.registry.session(session_id)
        if pid <= 1 or pid == os.getpid():
            raise InvalidArgument("pid", f"refusing to move pid {pid}")
        if cgroupfs.cgroup_of_pid(self.tree.mount, pid) is None:
            raise NotFound(f"no process {pid}")
        moved: list[int] = []
        for _ in range(PLACE_AGENT_PASSES):
            tree = [pid] + (_descendants(pid) if include_descendants else [])
            fresh = [p for p in tree if p not in moved]
            if not fresh:
                break
            for p in fresh:
                self._check_not_foreign(p, session)
                try:
                    cgroupfs.move(session.agent_path, p)
                except cgroupfs.CgroupError as exc:
                    if p == pid:
                        raise FailedPrecondition(str(exc)) from exc
                    continue  # a descendant that exited meanwhile
                moved.append(p)
        log.info("agent placed", extra={"session": session.id, "pid": pid, "moved": len(moved)})
        return moved

    def _check_not_foreign(self, pid: int, session: Session) -> None:
        where = cgroupfs.cgroup_of_pid(self.tree.mount, pid)
        if where is not None and where.is_relative_to(self.tree.sessions) and not where.is_relative_to(
            session.path
        ):
            raise FailedPrecondition(f"pid {pid} belongs to another session ({where})")

    def _configure(self, session: Session) -> None:
        enabled = cgroupfs.enable_controllers(session.path, self.caps.enforced)
        session.not_enforced = cgroupfs.apply_knobs(session.path, session.knobs(self.config), enabled)

    def _register(self, session: Session) -> None:
        self.registry.add_session(session)
        self.tracking.add_session(session)
        self._tell(self.on_created, session)

    def _tell(self, listeners: list[SessionListener], session: Session) -> None:
        for listener in listeners:
            try:
                listener(session)
            except Exception:  # a bug there must not undo the session's creation or deletion
                log.exception("session listener failed", extra={"session": session.id})

    async def _wait_empty(self, session: Session, timeout: float) -> None:
        """Wait until the agent/ leaf has no processes, via its cgroup.events notification."""
        emptied: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def check(fd: int) -> None:
            if cgroupfs.parse_flat_keyed(reread(fd)).get("populated") == 0 and not emptied.done():
                emptied.set_result(None)

        fd = self.watcher.watch(session.agent_path / "cgroup.events", check)
        try:
            check(fd)
            await asyncio.wait_for(emptied, timeout)
        finally:
            self.watcher.unwatch(fd)


def _descendants(pid: int) -> list[int]:
    """A process's descendants now, parents before children (only its own tree is read from /proc)."""
    found: list[int] = []
    pending = procs.children(pid)
    while pending:
        child = pending.pop(0)
        found.append(child)
        pending.extend(procs.children(child))
    return found
