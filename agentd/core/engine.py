"""The engine: sessions and tool calls over the cgroup tree, driven by one asyncio loop.

Every state change happens on the loop thread. Kernel work goes through agentd.kernel.cgroupfs; change
notifications (cgroup.events) arrive through one Watcher; process events through Tracking (the lifecycle
BPF program), network intents through NetworkIntent (the netpolicy program), both optional. A call ends
when its cgroup empties (or on EndToolCall/timeout/kill): pending process events are read, accounting is
read BEFORE rmdir and waiters are answered; right after, the record is appended, then the cgroup removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import psutil

from agentd.core import sessions as sess
from agentd.core.config import Config
from agentd.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from agentd.core.intents import Intent, Limits, check_size, derive_limits, validate_intent
from agentd.core.network import NetworkIntent
from agentd.core.programs import Programs
from agentd.core.records import RecordStore
from agentd.core.results import Capture, ExitStatus, KillReason, Result, classify, feedback, retryable
from agentd.core.sessions import Session, SessionSpec
from agentd.core.spares import Spares
from agentd.core.toolcalls import CallState, ToolCall
from agentd.core.tracking import Tracking
from agentd.core.tree import Tree
from agentd.kernel import cgroupfs, procs
from agentd.kernel.bpf.lifecycle import ProcessCounters
from agentd.kernel.capabilities import Capabilities
from agentd.kernel.watch import Watcher, reread

log = logging.getLogger(__name__)

FREEZE_WAIT_SECONDS = 2.0
EMPTY_WAIT_SECONDS = 10.0
# Work the answers do not wait for (a finished call's record line and rmdir, new spare cgroups) runs at most
# this long after them, batched with the work of other answers meanwhile.
HOUSEKEEPING_DELAY_SECONDS = 0.005
RECORDS_RETRY_SECONDS = 1.0

FinishListener = Callable[[Result], None]
Placement = tuple[int, int]  # (pid of the process asking, pid to place), both as the kernel reported them
BeginListener = Callable[[ToolCall], None]


class Engine:
    def __init__(
        self,
        config: Config,
        tree: Tree,
        caps: Capabilities,
        records: RecordStore,
        watcher: Watcher,
        loop: asyncio.AbstractEventLoop,
        programs: Programs,
    ) -> None:
        self.config = config
        self.tree = tree
        self.caps = caps
        self.records = records
        self.watcher = watcher
        self.loop = loop
        self.sessions: dict[str, Session] = {}
        self.calls: dict[str, ToolCall] = {}
        self._by_token: dict[str, Session] = {}
        self._join_tokens: dict[str, str] = {}
        self._retiring: list[tuple[ToolCall, Result, ProcessCounters | None]] = []
        self._housekeeping_timer: asyncio.TimerHandle | None = None
        self.spares = Spares()
        self.on_begin: list[BeginListener] = []
        self.on_finish: list[FinishListener] = []
        self.tracking = Tracking(programs.lifecycle, loop)
        self.network = NetworkIntent(programs.network, config.network_none_allows_loopback)

    # ----- sessions -------------------------------------------------------------------------------------

    def create_session(self, spec: SessionSpec) -> tuple[Session, str]:
        sess.validate_spec(spec, self.config)
        if not spec.id:
            spec = replace(spec, id="s-" + secrets.token_hex(6))
        if spec.id in self.sessions:
            raise AlreadyExists(f"session {spec.id!r} already exists")
        if len(self.sessions) >= self.config.max_sessions:
            raise ResourceExhausted(f"at most {self.config.max_sessions} sessions ([sessions] max_sessions)")
        token = sess.new_token()
        path = self.tree.session_path(spec.id)
        session = Session(spec, path, sess.token_hash(token), time.time())
        try:
            cgroupfs.make(path)
        except FileExistsError as exc:
            raise AlreadyExists(f"cgroup {path} already exists") from exc
        try:
            cgroupfs.set_label(path, "session", session.label())
            self._configure_session(session)
            cgroupfs.make(session.agent_path)
        except BaseException:
            cgroupfs.remove_tree(path)
            raise
        self._register_session(session)
        log.info("session created", extra={"session": spec.id, "priority": spec.priority})
        return session, token

    def _configure_session(self, session: Session) -> None:
        enabled = cgroupfs.enable_controllers(session.path, self.caps.enforced)
        session.not_enforced = cgroupfs.apply_knobs(session.path, session.knobs(self.config), enabled)

    def _register_session(self, session: Session) -> None:
        self.sessions[session.id] = session
        self._by_token[session.token_sha256] = session
        self.tracking.add_session(session)

    def session(self, session_id: str) -> Session:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise NotFound(f"no session {session_id!r}") from None

    def session_for_token(self, token: str) -> Session:
        session = self._by_token.get(sess.token_hash(token))
        if session is None:
            raise PermissionDenied("unknown session token")
        return session

    async def delete_session(self, session_id: str, force: bool) -> list[Result]:
        session = self.session(session_id)
        agents = cgroupfs.procs(session.agent_path)
        if agents and not force:
            raise FailedPrecondition(
                f"session {session_id!r} still has {len(agents)} agent process(es) in its agent/ cgroup; "
                f"stop the agent first or delete with force to kill them"
            )
        session.deleting = True
        try:
            results = await asyncio.gather(
                *(self._kill(call, KillReason.CANCELLED, "session deleted") for call in list(session.calls.values()))
            )
            self.spares.drop(session_id)
            if force and cgroupfs.populated(session.agent_path):
                cgroupfs.kill(session.agent_path)
                await self.wait_empty(session.agent_path, EMPTY_WAIT_SECONDS)
            for child in list(cgroupfs.children(session.path)):
                cgroupfs.remove(child)
            if not cgroupfs.remove(session.path):
                raise FailedPrecondition(f"session cgroup {session.path} could not be removed (still populated)")
        finally:
            session.deleting = False
        self.tracking.remove_session(session)
        del self.sessions[session_id]
        self._by_token.pop(session.token_sha256, None)
        log.info("session deleted", extra={"session": session_id, "calls_ended": len(results)})
        return list(results)

    def place_agent(self, session_id: str, pid: int, include_descendants: bool) -> list[int]:
        """Move a process (and, if asked, each of its current descendants) into the session's agent/ leaf.
        The kernel moves one process per write, so a tree is walked again until no new descendant appears."""
        session = self.session(session_id)
        if pid <= 1 or pid == os.getpid():
            raise InvalidArgument("pid", f"refusing to move pid {pid}")
        try:
            root = psutil.Process(pid)
        except psutil.NoSuchProcess:
            raise NotFound(f"no process {pid}") from None
        moved: list[int] = []
        for _ in range(5):
            try:
                tree = [root] + (root.children(recursive=True) if include_descendants else [])
            except psutil.NoSuchProcess:
                break
            fresh = [p.pid for p in tree if p.pid not in moved]
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
        return moved

    def _check_not_foreign(self, pid: int, session: Session) -> None:
        where = cgroupfs.cgroup_of_pid(self.tree.mount, pid)
        if where is not None and where.is_relative_to(self.tree.sessions) and not where.is_relative_to(
            session.path
        ):
            raise FailedPrecondition(f"pid {pid} belongs to another session ({where})")

    # ----- tool calls -----------------------------------------------------------------------------------

    def begin_call(
        self, session: Session, intent: Intent, report_exit: bool, confined: bool, held: Placement | None = None
    ) -> tuple[ToolCall, str]:
        """A declared call: its cgroup, and a one-time token for the process that will join it; or, given a
        held process (sender pid, pid to place), that process placed at once and no token. A placement that
        fails leaves nothing behind."""
        call = self._new_call(session, intent, report_exit, confined, implicit=False)
        if held is not None:
            try:
                self._place(call, *held)
            except BaseException:
                self._discard(call)
                raise
            self._register_call(session, call)
            self._start(call, held[1])
            return call, ""
        token = secrets.token_urlsafe(24)
        self._join_tokens[token] = call.id
        call.timers.append(self.loop.call_later(self.config.join_timeout_seconds, self._join_expired, call))
        self._register_call(session, call)
        return call, token

    def capture(self, session: Session, pid: int, intent: Intent, rule: str, exec_ns: int) -> ToolCall | None:
        """An implicit call for a process the kernel saw exec in the session's agent/ leaf: placed at once, no
        join token (nothing to confine: the process is the session's own). Children it forked before the move
        follow it. None if the process left agent/ or ended before it could be moved."""
        if cgroupfs.cgroup_of_pid(self.tree.mount, pid) != session.agent_path:
            return None
        call = self._new_call(session, intent, report_exit=False, confined=False, implicit=True)
        try:
            cgroupfs.move(call.path, pid)
        except cgroupfs.CgroupError:
            self._discard(call)
            return None
        latency = (time.monotonic_ns() - exec_ns) / 1e9
        if not cgroupfs.populated(call.path) and cgroupfs.read_stats(call.path, ()).cpu_usage_usec == 0:
            # Never ran in the call: it was exiting, and the kernel skips such a process without an error.
            # (One that ran and ended since has CPU time here, and its populated notifications are queued.)
            self._discard(call)
            return None
        self._move_children(session, call, pid)
        call.capture = Capture(rule, latency, procs.anon_resident_bytes(pid))
        self._register_call(session, call)
        self._start(call, pid)
        return call

    def _move_children(self, session: Session, call: ToolCall, pid: int) -> None:
        """Move the descendants a captured process forked before its move (parents first, so that what they
        fork meanwhile lands in the call)."""
        pending = procs.children(pid)
        while pending:
            child = pending.pop()
            if cgroupfs.cgroup_of_pid(self.tree.mount, child) == session.agent_path:
                with contextlib.suppress(cgroupfs.CgroupError):  # it ended meanwhile
                    cgroupfs.move(call.path, child)
                pending.extend(procs.children(child))

    def _new_call(
        self, session: Session, intent: Intent, report_exit: bool, confined: bool, implicit: bool
    ) -> ToolCall:
        """Validate, derive limits, create the labelled cgroup with its knobs, watch and track it."""
        validate_intent(intent, self.config)
        active = sum(1 for c in session.calls.values() if c.state != CallState.FINISHED)
        if active >= self.config.max_active_calls_per_session:
            raise ResourceExhausted(
                f"session {session.id!r} has {active} unfinished calls "
                f"([sessions] max_active_calls_per_session = {self.config.max_active_calls_per_session})"
            )
        limits = derive_limits(intent, self.config, session.spec.memory_budget)
        call_id, path, cgroup_id = self.spares.take(session)
        self._arm_housekeeping()
        call = ToolCall(
            id=call_id,
            session_id=session.id,
            intent=intent,
            limits=limits,
            path=path,
            cgroup_id=cgroup_id,
            created=time.time(),
            report_exit=report_exit,
            confined=confined,
            implicit=implicit,
        )
        try:
            call.not_enforced = tuple(cgroupfs.apply_knobs(call.path, limits.knobs(), self.caps.enforced))
            call.not_enforced = self.network.enforcement(call)
            cgroupfs.set_label(path, "call", call.label())
            self._watch(call)
            self.tracking.add_call(call)
        except BaseException:
            self._discard(call)
            raise
        return call

    def _register_call(self, session: Session, call: ToolCall) -> None:
        call.done = self.loop.create_future()
        self.calls[call.id] = call
        session.calls[call.id] = call
        for listener in self.on_begin:
            listener(call)

    def _discard(self, call: ToolCall) -> None:
        """Undo _new_call for a call that never became visible: no record, no metrics."""
        self._release(call, None)
        cgroupfs.remove_tree(call.path)

    def _release(self, call: ToolCall, counters: ProcessCounters | None) -> None:
        """Stop watching and tracking the call (`counters`: its last process counters, for the session)."""
        if call.events_fd is not None:
            self.watcher.unwatch(call.events_fd)
            call.events_fd = None
        self.network.release(call)
        self.tracking.remove_call(call, counters)

    def _watch(self, call: ToolCall) -> None:
        call.events_fd = self.watcher.watch(call.path / "cgroup.events", lambda fd: self._on_events(call, fd))

    def _populated(self, call: ToolCall) -> bool:
        """Whether the call's cgroup has processes, read through its watched cgroup.events when it has one."""
        if call.events_fd is None:
            return cgroupfs.populated(call.path)
        return cgroupfs.parse_flat_keyed(reread(call.events_fd)).get("populated", 0) == 1

    def join(self, token: str, sender: int, target: int | None = None) -> ToolCall:
        """Place a process into the call its join token belongs to. `sender` is the pid the kernel reports for
        the connecting process (SO_PEERCRED); `target` the pid of a pidfd it passed (None: itself). A call
        begun by a sandbox accepts only processes, and senders, inside that sandbox's session."""
        call_id = self._join_tokens.get(token)
        call = self.calls.get(call_id) if call_id else None
        if call is None or call.state != CallState.PENDING:
            raise PermissionDenied("unknown, expired or already used join token")
        pid = sender if target is None else target
        self._place(call, sender, pid)
        del self._join_tokens[token]
        self._start(call, pid)
        return call

    def _place(self, call: ToolCall, sender: int, pid: int) -> None:
        """Move `pid` into the call on behalf of `sender`, both checked against a confined call's session."""
        if pid == os.getpid() or pid <= 1:
            raise PermissionDenied(f"pid {pid} cannot join a tool call")
        if call.confined:
            session = self.sessions[call.session_id]
            for who in {sender, pid}:
                where = cgroupfs.cgroup_of_pid(self.tree.mount, who)
                if where is None or not where.is_relative_to(session.path):
                    raise PermissionDenied(
                        f"pid {who} is not in session {session.id!r}'s cgroups; only the session's own processes "
                        f"can join its calls"
                    )
        try:
            cgroupfs.move(call.path, pid)
        except cgroupfs.CgroupError as exc:
            raise FailedPrecondition(f"could not place pid {pid}: {exc}") from exc
        if not self._populated(call):  # the kernel skips an exiting process without an error
            raise FailedPrecondition(f"could not place pid {pid}: it has exited")

    def _start(self, call: ToolCall, pid: int) -> None:
        """The call's first process is in: RUNNING, timeout armed, start time labelled."""
        call.cancel_timers()
        call.pid = pid
        call.state = CallState.RUNNING
        call.started = time.time()
        call.timers.append(self.loop.call_later(call.limits.timeout_seconds, self._timed_out, call))
        with contextlib.suppress(OSError):
            cgroupfs.set_label(call.path, "started", f"{call.started!r} {pid}".encode())

    def _join_expired(self, call: ToolCall) -> None:
        if call.state == CallState.PENDING:
            log.info("join timed out", extra={"call": call.id})
            self._drop_join_token(call)
            call.kill_reason, call.kill_detail = KillReason.CANCELLED, "no process joined in time"
            self._finalise(call)

    def _timed_out(self, call: ToolCall) -> None:
        self._kill_nowait(call, KillReason.TIMEOUT, f"timeout of {call.limits.timeout_seconds:g} s")

    def _kill_nowait(self, call: ToolCall, reason: KillReason, detail: str) -> None:
        if call.state == CallState.FINISHED:
            return
        if call.kill_reason == KillReason.NONE:
            call.kill_reason, call.kill_detail = reason, detail
        if call.state == CallState.PENDING:
            self._drop_join_token(call)
            self._finalise(call)
            return
        try:
            cgroupfs.kill(call.path)
        except cgroupfs.CgroupError as exc:
            log.error("cgroup.kill failed", extra={"call": call.id, "error": str(exc)})

    async def _kill(self, call: ToolCall, reason: KillReason, detail: str) -> Result:
        self._kill_nowait(call, reason, detail)
        return await self._result_of(call)

    def _drop_join_token(self, call: ToolCall) -> None:
        for token, call_id in list(self._join_tokens.items()):
            if call_id == call.id:
                del self._join_tokens[token]

    def _on_events(self, call: ToolCall, fd: int) -> None:
        events = cgroupfs.parse_flat_keyed(reread(fd))
        if events.get("frozen", 0) == 1 and call.state == CallState.RUNNING:
            call.state = CallState.FROZEN
        elif events.get("frozen", 0) == 0 and call.state == CallState.FROZEN:
            call.state = CallState.RUNNING
        for waiter in call.freeze_waiters:
            if not waiter.done():
                waiter.set_result(None)
        call.freeze_waiters.clear()
        if events.get("populated", 1) == 0 and call.state in (CallState.RUNNING, CallState.FROZEN):
            self._emptied(call)

    def _emptied(self, call: ToolCall) -> None:
        if call.emptied:
            return
        call.emptied = True
        call.cancel_timers()
        waiting = call.report_exit and call.exit_status is None and not call.end_requested
        if waiting:
            self.tracking.drain()  # the lifecycle program may already say how the first process ended
            waiting = call.kernel_exit is None
        if waiting:
            call.timers.append(
                self.loop.call_later(self.config.exit_report_grace_seconds, self._finalise, call)
            )
        else:
            self._finalise(call)

    def _finalise(self, call: ToolCall) -> Result | None:
        """Read the accounting, build the result, answer waiters. The bookkeeping that the answer does not need
        (unwatch, untrack, the record's line, rmdir, metrics) is left to housekeeping. Idempotent."""
        if call.state == CallState.FINISHED:
            return None
        if call.exit_status is None:
            self.tracking.drain()  # the exit of the call's first process is in the ring buffer by now
        ran = call.state != CallState.PENDING
        call.state = CallState.FINISHED
        call.cancel_timers()
        stats = cgroupfs.read_stats(call.path, self.caps.enforced)
        counters = self.tracking.counters(call)
        result = self._result(call, stats, ran, self.network.denials(call), counters.forks if counters else -1)
        self.records.append(result)
        self.calls.pop(call.id, None)
        session = self.sessions.get(call.session_id)
        if session is not None:
            session.calls.pop(call.id, None)
            session.network_denials += result.network_denials
        if call.done is not None and not call.done.done():
            call.done.set_result(result)
        self._retiring.append((call, result, counters))
        self._arm_housekeeping()
        return result

    def _arm_housekeeping(self) -> None:
        if self._housekeeping_timer is None:
            self._housekeeping_timer = self.loop.call_later(HOUSEKEEPING_DELAY_SECONDS, self.housekeeping)

    def housekeeping(self) -> None:
        """The work answers do not wait for: retire finished calls, top up spare cgroups. Runs by itself shortly
        after answers; the API runs it earlier when it knows a client is busy (it just got its result)."""
        if self._housekeeping_timer is None:
            return
        self._housekeeping_timer.cancel()
        self._housekeeping_timer = None
        self._retire()
        self.spares.top_up(self.sessions)

    def _retire(self) -> None:
        """Finish off the calls finalised since the last run, in one batch: their record lines are written, then
        their cgroups removed (a daemon that dies in between finds a labelled, empty cgroup on its next start and
        finalises it, or sees its record and only removes it)."""
        retiring, self._retiring = self._retiring, []
        self.tracking.drain()  # keeps the ring buffer's batches small
        for call, _result, counters in retiring:
            self._release(call, counters)
        try:
            self.records.write_pending()
        except OSError as exc:  # e.g. a full disk: the cgroups stay, and the lines pending, until it works
            log.error("records not written; retrying", extra={"file": str(self.records.path), "error": str(exc)})
            self._retiring[:0] = retiring
            self.loop.call_later(RECORDS_RETRY_SECONDS, self._arm_housekeeping)
            return
        for call, result, _counters in retiring:
            try:
                if not cgroupfs.remove(call.path):
                    self.loop.create_task(self._remove_later(call.path))
            except cgroupfs.CgroupError as exc:
                log.error("cgroup not removed", extra={"call": call.id, "error": str(exc)})
            for listener in self.on_finish:
                try:
                    listener(result)
                except Exception:  # a bug there must not keep the other calls' cgroups
                    log.exception("finish listener failed", extra={"call": call.id})

    def _result(self, call: ToolCall, stats: cgroupfs.CgroupStats, ran: bool, denials: int, forks: int) -> Result:
        # The client's report first, then the kernel's word on the first process.
        exit_status = call.exit_status if call.exit_status is not None else call.kernel_exit
        outcome = classify(ran, stats, call.kill_reason, exit_status)
        ended = time.time()
        return Result(
            call_id=call.id,
            session_id=call.session_id,
            tool=call.intent.tool,
            argv=call.intent.argv,
            outcome=outcome,
            exit_status=exit_status,
            memory_peak=stats.memory_peak,
            memory_events=dict(stats.memory_events),
            cpu_user_seconds=stats.cpu_user_usec / 1e6,
            cpu_system_seconds=stats.cpu_system_usec / 1e6,
            cpu_throttled_usec=stats.cpu_throttled_usec,
            pids_peak=stats.pids_peak,
            duration_seconds=(ended - call.started) if call.started else 0.0,
            started_unix=call.started,
            ended_unix=ended,
            limits=call.limits,
            not_enforced=call.not_enforced,
            feedback=feedback(
                outcome, stats, call.limits, exit_status, call.not_enforced, call.kill_detail, denials
            ),
            retryable=retryable(outcome),
            implicit=call.implicit,
            labels=dict(call.intent.labels),
            kill_reason=call.kill_detail,
            network_denials=denials,
            forks=forks,
            capture=call.capture,
        )

    async def _remove_later(self, path: Path) -> None:
        """A cgroup that refused rmdir (a straggler raced in): kill and retry until it is gone."""
        for _ in range(100):
            with contextlib.suppress(cgroupfs.CgroupError):
                cgroupfs.kill(path)
            await asyncio.sleep(0.05)
            if cgroupfs.remove(path) or not path.exists():
                return
        log.error("cgroup could not be removed", extra={"cgroup": str(path)})

    def lookup(self, call_id: str, scope: Session | None) -> ToolCall | Result:
        """An active call or a recent result, visible to `scope` (None = admin)."""
        found: ToolCall | Result | None = self.calls.get(call_id) or self.records.get(call_id)
        if found is None:
            raise NotFound(f"no tool call {call_id!r}")
        if scope is not None and found.session_id != scope.id:
            raise PermissionDenied(f"tool call {call_id!r} belongs to another session")
        return found

    def active(self, call_id: str, scope: Session | None) -> ToolCall:
        found = self.lookup(call_id, scope)
        if isinstance(found, Result):
            raise FailedPrecondition(f"tool call {call_id!r} has finished")
        return found

    async def _result_of(self, call: ToolCall) -> Result:
        assert call.done is not None
        return await asyncio.shield(call.done)

    async def end_call(self, call_id: str, scope: Session | None, exit_status: ExitStatus | None) -> Result:
        """The caller is done: record its exit status, kill what is left in the cgroup, finalise."""
        found = self.lookup(call_id, scope)
        if isinstance(found, Result):
            return found
        call = found
        call.end_requested = True
        if exit_status is not None and call.exit_status is None:
            call.exit_status = exit_status
        if call.state == CallState.PENDING:
            self._kill_nowait(call, KillReason.CANCELLED, "ended before any process joined")
        elif not self._populated(call):
            self._finalise(call)
        elif exit_status is None:
            self._kill_nowait(call, KillReason.CANCELLED, "ended by the caller while running")
        else:
            cgroupfs.kill(call.path)  # stragglers the tool left behind; the outcome is the exit status
        assert call.done is not None
        if call.done.done():  # answered without a trip through the event loop
            return call.done.result()
        return await self._result_of(call)

    async def wait_call(self, call_id: str, scope: Session | None, timeout: float) -> Result:
        found = self.lookup(call_id, scope)
        if isinstance(found, Result):
            return found
        if timeout > 0:
            return await asyncio.wait_for(self._result_of(found), timeout)
        return await self._result_of(found)

    async def kill_call(self, call_id: str, reason: str) -> Result:
        found = self.lookup(call_id, None)
        if isinstance(found, Result):
            return found
        return await self._kill(found, KillReason.POLICY, reason or "killed by an operator")

    async def freeze_call(self, call_id: str, on: bool) -> ToolCall:
        call = self.active(call_id, None)
        if call.state == CallState.PENDING:
            raise FailedPrecondition(f"tool call {call_id!r} has not started")
        waiter: asyncio.Future[None] = self.loop.create_future()
        call.freeze_waiters.append(waiter)
        cgroupfs.freeze(call.path, on)
        deadline = self.loop.time() + FREEZE_WAIT_SECONDS
        while cgroupfs.frozen(call.path) != on and self.loop.time() < deadline:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiter), deadline - self.loop.time())
            waiter = self.loop.create_future()
            call.freeze_waiters.append(waiter)
        if call.state != CallState.FINISHED:
            call.state = CallState.FROZEN if cgroupfs.frozen(call.path) else CallState.RUNNING
        return call

    def update_call(
        self, call_id: str, scope: Session | None, memory_high: int, memory_max: int, cpu_max: int, pids_max: int
    ) -> Limits:
        """Renegotiate a running call's limits. memory.max is never set below current usage: such an update is
        refused, and memory.high is lowered to the requested value instead so the kernel reclaims toward it."""
        call = self.active(call_id, scope)
        ceiling = self.config.memory_ceiling
        check_size("memory_high_bytes", memory_high, ceiling)
        check_size("memory_max_bytes", memory_max, ceiling)
        if cpu_max < 0 or cpu_max > self.config.max_cpu_millicores:
            raise InvalidArgument("cpu_max_millicores", f"must be between 0 and {self.config.max_cpu_millicores}")
        if pids_max < 0 or pids_max > self.config.max_pids:
            raise InvalidArgument("pids_max", f"must be between 0 and {self.config.max_pids}")
        budget = self.sessions[call.session_id].spec.memory_budget
        new_max = memory_max or call.limits.memory_max
        new = replace(
            call.limits,
            # Lowering memory.max alone pulls memory.high down with it.
            memory_high=memory_high or min(call.limits.memory_high, new_max),
            memory_max=new_max,
            cpu_max_millicores=cpu_max or call.limits.cpu_max_millicores,
            pids_max=pids_max or call.limits.pids_max,
        )
        if budget and new.memory_max > budget:
            raise InvalidArgument("memory_max_bytes", f"exceeds the session budget of {budget} bytes")
        if new.memory_high > new.memory_max:
            raise InvalidArgument("memory_high_bytes", "larger than memory.max")
        usage = cgroupfs.memory_current(call.path)
        if memory_max and 0 <= new.memory_max < usage:
            throttle = replace(call.limits, memory_high=min(new.memory_max, call.limits.memory_high))
            self._write_limits(call, throttle)
            raise FailedPrecondition(
                f"memory_max_bytes {new.memory_max} is below current usage {usage}: lowering memory.max now "
                f"would OOM-kill the call. memory.high was lowered to {throttle.memory_high} so the kernel "
                f"reclaims toward it; retry once usage is below the new limit"
            )
        self._write_limits(call, new)
        return new

    def _write_limits(self, call: ToolCall, limits: Limits) -> None:
        # Raise memory.max before memory.high (and lower memory.high first) so high <= max at every step.
        knobs = limits.knobs()
        ordered = ["memory.high", "memory.max"] if limits.memory_max < call.limits.memory_max else [
            "memory.max",
            "memory.high",
        ]
        changes = {k: knobs[k] for k in ordered} | {k: knobs[k] for k in ("cpu.max", "pids.max")}
        cgroupfs.apply_knobs(call.path, changes, self.caps.enforced)
        call.limits = limits
        cgroupfs.set_label(call.path, "call", call.label())

    async def wait_empty(self, path: Path, timeout: float) -> None:
        """Wait until a cgroup has no processes, via its cgroup.events notification."""
        emptied: asyncio.Future[None] = self.loop.create_future()

        def check(fd: int) -> None:
            if cgroupfs.parse_flat_keyed(reread(fd)).get("populated") == 0 and not emptied.done():
                emptied.set_result(None)

        fd = self.watcher.watch(path / "cgroup.events", check)
        try:
            check(fd)
            await asyncio.wait_for(emptied, timeout)
        finally:
            self.watcher.unwatch(fd)

    # ----- restart ---------------------------------------------------------------------------------------

    def adopt_session(self, session: Session) -> None:
        self._configure_session(session)
        cgroupfs.ensure(session.agent_path)
        self._register_session(session)

    def adopt_call(self, call: ToolCall) -> None:
        """Take over a call found running after a restart: watch it, re-arm its timeout."""
        session = self.sessions[call.session_id]
        call.done = self.loop.create_future()
        self.calls[call.id] = call
        session.calls[call.id] = call
        self.tracking.add_call(call)  # its first process is unknown: no exit status from the kernel
        call.not_enforced = self.network.enforcement(call)
        if call.state == CallState.PENDING:
            # Its join token died with the old daemon: nothing can join any more.
            call.kill_reason, call.kill_detail = KillReason.CANCELLED, "daemon restarted before any process joined"
            self._finalise(call)
            return
        self._watch(call)
        remaining = call.started + call.limits.timeout_seconds - time.time()
        call.timers.append(self.loop.call_later(max(0.0, remaining), self._timed_out, call))
        if not cgroupfs.populated(call.path):
            self._emptied(call)

    # ----- shutdown --------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop watching; running calls and sessions stay in the kernel for the next start to adopt."""
        if self._housekeeping_timer is not None:
            self._housekeeping_timer.cancel()
            self._housekeeping_timer = None
        self._retire()
        self.spares.close()
        self.tracking.close()
        for call in self.calls.values():
            call.cancel_timers()
            if call.events_fd is not None:
                self.watcher.unwatch(call.events_fd)
                call.events_fd = None
            if call.done is not None and not call.done.done():
                call.done.cancel()
        self.records.close()
