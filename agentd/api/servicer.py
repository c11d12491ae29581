"""gRPC servicers: validate -> authorize -> core. One implementation serves both services.

Admin (admin socket, protected by file mode and group) may act on any session. Sandbox requests carry the
session token in metadata `x-agentd-session-token` and are confined to that session.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from agentd import __version__
from agentd.api import convert, status
from agentd.api.gen import agentd_pb2 as pb
from agentd.api.join import HoldRefused, JoinServer, PlacementRefused, pidfd_pid
from agentd.api.metrics import Metrics
from agentd.core import errors, observe
from agentd.core.engine import Engine
from agentd.core.intents import validate_intent
from agentd.core.results import ExitStatus, Result
from agentd.core.sessions import Session
from agentd.core.toolcalls import ToolCall
from agentd.policy.loop import PolicyLoop
from agentd.policy.snapshot import SESSIONS_DOMAIN, session_domain
from agentd.wire import PLACEMENT_METADATA, TOKEN_METADATA

log = logging.getLogger(__name__)

DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 10000

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]


def rpc(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Map errors to status codes (agentd.api.status) and time every request, under the code it was answered
    with: anything unexpected is INTERNAL, logged with its traceback."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self: Service, request: Req, context: grpc.aio.ServicerContext[Req, Resp]) -> Resp:
        start = time.perf_counter()
        code = grpc.StatusCode.UNKNOWN  # until answered
        try:
            response = await method(self, request, context)
            code = grpc.StatusCode.OK
            return response
        except asyncio.CancelledError:  # the client went away or the server is stopping
            code = grpc.StatusCode.CANCELLED
            raise
        except grpc.aio.AbortError:  # the method answered with a code of its own
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except errors.AgentdError as exc:
            code = status.status_code(exc)
            await context.abort(code, status.message(exc))
        except Exception as exc:
            code = status.status_code(exc)
            log.error("request failed unexpectedly", exc_info=exc,
                      extra={"method": name, "code": code.name, "error": status.message(exc)})
            await context.abort(code, status.message(exc))
        finally:
            self.metrics.observe_request(name, code.name, time.perf_counter() - start)
        raise AssertionError("unreachable: abort raises")

    return wrapper


class Service:
    """Implements every verb of agentd.v1.Admin; the Sandbox service is the subset that is session-scoped."""

    def __init__(self, engine: Engine, policy: PolicyLoop, metrics: Metrics, joins: JoinServer, sandbox: bool) -> None:
        self.engine = engine
        self.policy = policy
        self.metrics = metrics
        self.joins = joins
        self.sandbox = sandbox

    def _scope(self, context: grpc.aio.ServicerContext[Any, Any]) -> Session | None:
        """None for admin callers; the token's session for sandbox callers."""
        if not self.sandbox:
            return None
        for key, value in context.invocation_metadata() or ():
            if key == TOKEN_METADATA:
                return self.engine.session_for_token(str(value))
        raise errors.PermissionDenied(f"missing session token (metadata {TOKEN_METADATA!r})")

    def _session(self, session_id: str, scope: Session | None) -> Session:
        if scope is None:
            if not session_id:
                raise errors.InvalidArgument("session_id", "required")
            return self.engine.session(session_id)
        if session_id and session_id != scope.id:
            raise errors.PermissionDenied(f"this token belongs to session {scope.id!r}, not {session_id!r}")
        return scope

    def _session_pb(self, session: Session) -> pb.Session:
        msg = convert.session_to_pb(
            session,
            observe.agent_processes(session),
            observe.session_memory(session),
            session.cpu_weight(self.engine.config),
        )
        domain, stall, held = self.policy.session_status(session)
        if domain is not None:
            msg.pressure.CopyFrom(convert.domain_to_pb(domain))
        msg.memory_stall_pct = stall if stall is not None else -1.0
        msg.calls_held = held
        return msg

    # ----- sessions (admin) ------------------------------------------------------------------------------

    @rpc
    async def CreateSession(self, request: pb.CreateSessionRequest, context: Any) -> pb.CreateSessionResponse:
        session, token = self.engine.create_session(convert.spec_from_pb(request.spec))
        return pb.CreateSessionResponse(session=self._session_pb(session), token=token)

    @rpc
    async def GetSession(self, request: pb.GetSessionRequest, context: Any) -> pb.Session:
        return self._session_pb(self._session(request.session_id, self._scope(context)))

    @rpc
    async def ListSessions(self, request: pb.ListSessionsRequest, context: Any) -> pb.ListSessionsResponse:
        return pb.ListSessionsResponse(sessions=[self._session_pb(s) for s in self.engine.sessions.values()])

    @rpc
    async def DeleteSession(self, request: pb.DeleteSessionRequest, context: Any) -> pb.DeleteSessionResponse:
        results = await self.engine.delete_session(request.session_id, request.force)
        return pb.DeleteSessionResponse(finished=[convert.result_to_pb(r) for r in results])

    @rpc
    async def PlaceAgent(self, request: pb.PlaceAgentRequest, context: Any) -> pb.PlaceAgentResponse:
        moved = self.engine.place_agent(request.session_id, request.pid, request.include_descendants)
        return pb.PlaceAgentResponse(moved=moved)

    @rpc
    async def GetStatus(self, request: pb.GetStatusRequest, context: Any) -> pb.Status:
        scope = self._scope(context)
        engine, caps = self.engine, self.engine.caps
        # A sandbox sees the shared domain and its own, never another session's.
        domains = [d for d in self.policy.status()
                   if scope is None or d.name in (SESSIONS_DOMAIN, session_domain(scope.id))]
        pressure = observe.pressure(engine.tree.root)
        return pb.Status(
            version=__version__,
            cgroup_root=str(engine.tree.root),
            controllers_enforced=sorted(caps.enforced),
            controllers_missing=sorted(caps.missing),
            psi_available=caps.psi_triggers,
            sched_ext_available=caps.sched_ext,
            sessions=len(engine.sessions),
            active_calls=len(engine.calls),
            pressure=[pb.Pressure(resource=p.resource, some_avg10=p.some_avg10, full_avg10=p.full_avg10)
                      for p in pressure],
            warnings=caps.warnings,
            join_socket=str(engine.config.join_socket),
            bpf_lifecycle=caps.bpf_lifecycle,
            bpf_network=caps.bpf_network,
            bpf_errors=caps.bpf_errors,
            auto_capture=caps.bpf_lifecycle and engine.config.capture_enabled,
            policy=pb.PolicyStatus(enabled=self.policy.config.enabled, signals=self.policy.signals,
                                   domains=[convert.domain_to_pb(d) for d in domains]),
        )

    # ----- tool calls --------------------------------------------------------------------------------------

    @rpc
    async def BeginToolCall(self, request: pb.BeginToolCallRequest, context: Any) -> pb.BeginToolCallResponse:
        scope = self._scope(context)
        placing = self._held_by_ref(request.held_process) if request.held_process else None
        try:
            return await self.begin_tool_call(request, scope, placing)
        except PlacementRefused as exc:
            context.set_trailing_metadata(((PLACEMENT_METADATA, "refused"),))
            raise exc.cause from None

    async def begin_on_join(
        self, request: pb.BeginToolCallRequest, token: str, sender: int, pidfd: int, placed: Callable[[str], None]
    ) -> pb.BeginToolCallResponse:
        """BEGIN on the join socket: BeginToolCall of the Sandbox service (the token authorizes it), placing the
        process the attached pidfd refers to, sent by `sender` (SO_PEERCRED); timed as a request."""
        start, code = time.perf_counter(), "INTERNAL"
        try:
            if request.held_process:
                raise errors.InvalidArgument("held_process", "must be empty on the join socket (the pidfd is attached)")
            if not token:
                raise errors.PermissionDenied("missing session token (JoinHello.session_token)")
            response = await self.begin_tool_call(
                request, self.engine.session_for_token(token), _HeldHere(sender, pidfd, placed)
            )
            code = "OK"
            return response
        except BaseException as exc:
            code = status.status_code(exc.cause if isinstance(exc, PlacementRefused) else exc).name
            raise
        finally:
            self.metrics.observe_request("JoinBegin", code, time.perf_counter() - start)

    async def begin_tool_call(
        self, request: pb.BeginToolCallRequest, scope: Session | None, placing: Placing | None
    ) -> pb.BeginToolCallResponse:
        """BeginToolCall for both transports: authorize, validate, admit, create the call and, given `placing`,
        place its held process before answering (a refusal there raises PlacementRefused: it never ran). The held
        process is claimed before admission, which may queue the Begin for longer than an unclaimed HOLD lives."""
        session = self._session(request.session_id, scope)
        intent = convert.intent_from_pb(request.intent)
        validate_intent(intent, self.engine.config)
        confined = scope is not None
        if placing is not None:
            try:
                async with placing as (sender, pid, placed):
                    await self.policy.admit(session, intent)
                    call, token = self.engine.begin_call(session, intent, request.report_exit, confined, (sender, pid))
                    placed(call.id)
            except (errors.PermissionDenied, errors.FailedPrecondition, HoldRefused) as exc:
                raise PlacementRefused(exc) from exc
        else:
            await self.policy.admit(session, intent)
            call, token = self.engine.begin_call(session, intent, request.report_exit, confined)
        return pb.BeginToolCallResponse(
            call_id=call.id,
            join_token=token,
            limits=convert.limits_to_pb(call.limits, call.not_enforced),
            join_socket=str(self.engine.config.join_socket),
        )

    @contextlib.asynccontextmanager
    async def _held_by_ref(self, ref: str) -> AsyncIterator[tuple[int, int, Callable[[str], None]]]:
        async with self.joins.take(ref) as (held, pid):
            yield held.sender, pid, held.placed

    @rpc
    async def EndToolCall(self, request: pb.EndToolCallRequest, context: Any) -> pb.ToolCallResult:
        status = ExitStatus(request.exit_code, request.exit_signal) if request.has_exit_status else None
        if status is not None and (status.signal < 0 or status.signal > 64 or not 0 <= status.code <= 255):
            raise errors.InvalidArgument("exit_code", "exit code must be 0-255 and signal 0-64")
        result = await self.engine.end_call(request.call_id, self._scope(context), status)
        return convert.result_to_pb(result)

    @rpc
    async def WaitToolCall(self, request: pb.WaitToolCallRequest, context: Any) -> pb.ToolCallResult:
        if not 0 <= request.timeout_seconds < float("inf"):  # NaN too: it would mean "wait forever"
            raise errors.InvalidArgument("timeout_seconds", "must be a finite number >= 0 (0 = until it ends)")
        try:
            result = await self.engine.wait_call(request.call_id, self._scope(context), request.timeout_seconds)
        except TimeoutError:
            raise status.DeadlineExceeded("the tool call did not finish within the requested wait") from None
        return convert.result_to_pb(result)

    @rpc
    async def GetToolCall(self, request: pb.ToolCallRequest, context: Any) -> pb.ToolCallInfo:
        call = self.engine.active(request.call_id, self._scope(context))
        return _call_pb(call)

    @rpc
    async def UpdateToolCall(self, request: pb.UpdateToolCallRequest, context: Any) -> pb.Limits:
        limits = self.engine.update_call(
            request.call_id,
            self._scope(context),
            request.memory_high_bytes,
            request.memory_max_bytes,
            request.cpu_max_millicores,
            request.pids_max,
        )
        call = self.engine.calls[request.call_id]
        return convert.limits_to_pb(limits, call.not_enforced)

    async def _freeze(self, request: pb.ToolCallRequest, on: bool) -> pb.ToolCallInfo:
        call = await self.engine.freeze_call(request.call_id, on)
        return _call_pb(call)

    @rpc
    async def FreezeToolCall(self, request: pb.ToolCallRequest, context: Any) -> pb.ToolCallInfo:
        return await self._freeze(request, True)

    @rpc
    async def ThawToolCall(self, request: pb.ToolCallRequest, context: Any) -> pb.ToolCallInfo:
        return await self._freeze(request, False)

    @rpc
    async def KillToolCall(self, request: pb.KillToolCallRequest, context: Any) -> pb.ToolCallResult:
        return convert.result_to_pb(await self.engine.kill_call(request.call_id, request.reason))

    @rpc
    async def ListToolCalls(self, request: pb.ListToolCallsRequest, context: Any) -> pb.ListToolCallsResponse:
        scope = self._scope(context)
        session_id = self._session(request.session_id, scope).id if scope else (request.session_id or None)
        if request.limit < 0 or request.limit > MAX_LIST_LIMIT:
            raise errors.InvalidArgument("limit", f"must be between 0 and {MAX_LIST_LIMIT}")
        finished: list[Result] = self.engine.records.recent(session_id, request.limit or DEFAULT_LIST_LIMIT)
        active = []
        if request.include_active:
            active = [
                _call_pb(c)
                for c in self.engine.calls.values()
                if session_id is None or c.session_id == session_id
            ]
        return pb.ListToolCallsResponse(finished=[convert.result_to_pb(r) for r in finished], active=active)


    async def WatchPolicy(self, request: pb.WatchPolicyRequest, context: Any) -> AsyncIterator[pb.PolicyEvent]:
        """The memory policy's events as they happen: one session's (and its domains'), or every one (admin)."""
        try:
            scope = self._scope(context)
            session_id = self._session(request.session_id, scope).id if scope or request.session_id else None
        except errors.AgentdError as exc:
            await context.abort(status.status_code(exc), status.message(exc))
        async for event in self.policy.hub.watch(session_id):
            yield convert.policy_event_to_pb(event)


# The held process to place: an async context yielding (sender pid, its pid, called with the call id once placed).
Placing = contextlib.AbstractAsyncContextManager[tuple[int, int, Callable[[str], None]]]


class _HeldHere(contextlib.AbstractAsyncContextManager[tuple[int, int, Callable[[str], None]]]):
    """The process a join-socket BEGIN's pidfd refers to, to place (a class: an asynccontextmanager's generator
    costs more than the rest of it, on every BEGIN)."""

    def __init__(self, sender: int, pidfd: int, placed: Callable[[str], None]) -> None:
        self.sender, self.pidfd, self.placed = sender, pidfd, placed

    async def __aenter__(self) -> tuple[int, int, Callable[[str], None]]:
        pid = pidfd_pid(self.pidfd)
        if pid == -1:
            raise errors.FailedPrecondition("the held process has already exited")
        return self.sender, pid, self.placed

    async def __aexit__(self, *exc_info: object) -> None:
        return None


def _call_pb(call: ToolCall) -> pb.ToolCallInfo:
    usage = observe.call_usage(call)
    return convert.call_to_pb(call, usage.memory_current, list(usage.procs))
