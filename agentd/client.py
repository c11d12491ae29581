"""Python client for agent sandboxes and operators: run a command as a tool call, or use the API directly.

Sandbox mode (a session token is given, e.g. $AGENTD_SESSION_TOKEN): talks to the Sandbox service on the
sandbox socket, confined to that session. Admin mode (no token): talks to the Admin service.

Transport of a tool call's begin and end (run(), begin() with a pid): in sandbox mode the join socket's framed
protocol by default (BEGIN/END, no gRPC round trip: the fast path), or gRPC with transport="grpc" (or
$AGENTD_TRANSPORT=grpc). Everything else, and admin mode, is gRPC. If the join socket cannot be reached, the
call goes through gRPC (which waits for a restarting daemon).

    from agentd.client import Client
    with Client.from_env() as client:
        outcome = client.run(["pytest", "-x"], tool="pytest", expected_memory_bytes=2 << 30)
        if not outcome.ok:
            print(outcome.result.feedback)
"""

from __future__ import annotations

import os
import secrets
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NamedTuple, TypeGuard

import grpc

from agentd.api.gen import agentd_pb2 as pb
from agentd.api.gen import agentd_pb2_grpc as pb_grpc
from agentd.joinclient import Framed, JoinError, Placement, recorded_argv
from agentd.launch import launch, relay, release
from agentd.wire import PLACEMENT_METADATA, TOKEN_METADATA

ADMIN_SOCKET = "/run/agentd/admin.sock"
SANDBOX_SOCKET = "/run/agentd/sandbox.sock"
# Exit code of `agentctl run` when the command never ran (as a shell reports it).
EXIT_NOT_STARTED = 126
TRANSPORTS = ("join", "grpc")
DEFAULT_TIMEOUT = -1.0  # sentinel: the client's default deadline


@dataclass(frozen=True)
class RunOutcome:
    """The tool call's result and the exit code a shell would report (128 + signal when killed)."""

    result: pb.ToolCallResult
    exit_code: int

    @property
    def ok(self) -> bool:
        return self.result.outcome == pb.OUTCOME_OK


class Client:
    def __init__(
        self, socket_path: str | None = None, token: str | None = None, timeout: float = 30.0,
        transport: str = "join", join_socket: str | None = None,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, not {transport!r}")
        self.token = token
        self.transport = transport if token else "grpc"  # BEGIN on the join socket is authorized by a token
        path = socket_path or (SANDBOX_SOCKET if token else ADMIN_SOCKET)
        self.channel = grpc.insecure_channel(f"unix:{path}")
        # The generated stubs are untyped; responses are typed where this client returns them.
        self.admin: Any = pb_grpc.AdminStub(self.channel)  # type: ignore[no-untyped-call]
        self.stub: Any = pb_grpc.SandboxStub(self.channel) if token else self.admin  # type: ignore[no-untyped-call]
        self.timeout = timeout
        self._metadata = ((TOKEN_METADATA, token),) if token else ()
        self._join: Placement | None = None  # one join connection, reused for every call this client places
        self._join_path: str | None = join_socket
        self._placed: set[str] = set()
        self._framed: Framed | None = None  # the framed join connection (fast path), opened on first use
        self._framed_calls: set[str] = set()

    @staticmethod
    def from_env(socket_path: str | None = None) -> Client:
        """$AGENTD_SESSION_TOKEN selects sandbox mode; $AGENTD_SOCKET overrides the socket path,
        $AGENTD_JOIN_SOCKET the join socket's (default: as agentd reports it), $AGENTD_TRANSPORT the transport."""
        token = os.environ.get("AGENTD_SESSION_TOKEN") or None
        return Client(socket_path or os.environ.get("AGENTD_SOCKET") or None, token,
                      transport=os.environ.get("AGENTD_TRANSPORT") or "join",
                      join_socket=os.environ.get("AGENTD_JOIN_SOCKET") or None)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._drop_join()
        self.channel.close()

    def _drop_join(self) -> None:
        if self._join is not None:
            self._join.close()
            self._join = None
        self._placed.clear()
        self._drop_framed()

    def _drop_framed(self) -> None:
        if self._framed is not None:
            self._framed.close()
            self._framed = None
        self._framed_calls.clear()

    def call(self, method: str, request: Any, timeout: float | None = DEFAULT_TIMEOUT, admin: bool = False) -> Any:
        """Invoke an RPC by name with the session token attached; waits for a restarting daemon.
        timeout=None means no deadline."""
        stub = self.admin if admin else self.stub
        deadline = self.timeout if timeout == DEFAULT_TIMEOUT else timeout
        return getattr(stub, method)(request, timeout=deadline, metadata=self._metadata, wait_for_ready=True)

    def watch_policy(self, session_id: str = "") -> Any:
        """The memory policy's events as they happen (a stream: iterate it; cancel() ends it). A sandbox client
        gets its own session's events."""
        return self.stub.WatchPolicy(pb.WatchPolicyRequest(session_id=session_id), metadata=self._metadata)

    # ----- tool calls --------------------------------------------------------------------------------------

    def begin(
        self, intent: pb.Intent, session_id: str = "", report_exit: bool = True, pid: int | None = None
    ) -> pb.BeginToolCallResponse:
        """BeginToolCall. With `pid` (a process launched held before exec, agentd.launch) that process is
        placed into the call before the answer: its pidfd goes ahead on the join connection (HOLD). Without,
        a process joins later with the answer's join token (spawn(), place())."""
        request = pb.BeginToolCallRequest(session_id=session_id, intent=intent, report_exit=report_exit)
        if pid is not None and self.transport == "join":
            begun = self._begin_framed(request, pid)
            if begun is not None:
                return begun
        if pid is not None:
            request.held_process = self._hold(pid)
        response: pb.BeginToolCallResponse = self.call("BeginToolCall", request)
        if pid is not None:
            self._placed.add(response.call_id)
        return response

    def _begin_framed(self, request: pb.BeginToolCallRequest, pid: int) -> pb.BeginToolCallResponse | None:
        """BEGIN on the framed join connection (opened on first use, once more if agentd had closed it);
        None when the join socket cannot be reached (the caller falls back to gRPC). agentd's refusal raises
        JoinRefusal, a grpc.RpcError as BeginToolCall would have raised it."""
        request.intent.argv[:] = recorded_argv(list(request.intent.argv))
        pidfd = os.pidfd_open(pid)
        try:
            for attempt in (1, 2):
                if self._framed is None:
                    try:
                        self._framed = Framed(self._join_socket(), self.token or "", max(self.timeout, 120.0))
                    except OSError:
                        return None
                try:
                    begun = self._framed.begin(request, pidfd)
                except BrokenPipeError:  # closed by agentd while idle: the request never left
                    self._drop_framed()
                    if attempt == 2:
                        raise
                    continue
                except JoinError as exc:
                    if exc.code == "UNAVAILABLE":
                        self._drop_framed()
                    raise JoinRefusal(exc) from None
                self._framed_calls.add(begun.call_id)
                return begun
        finally:
            os.close(pidfd)
        raise AssertionError("unreachable")

    def _hold(self, pid: int) -> str:
        ref = secrets.token_urlsafe(18)
        pidfd = os.pidfd_open(pid)
        try:
            self._on_join(self._join_socket(), lambda join: join.hold(ref, pidfd))
        finally:
            os.close(pidfd)
        return ref

    def _join_socket(self) -> str:
        if self._join_path is None:
            self._join_path = str(self.call("GetStatus", pb.GetStatusRequest()).join_socket)
        return self._join_path

    def end(self, call_id: str, wait_status: int | None) -> pb.ToolCallResult:
        """Report the tool's wait status (None: unknown; a running call is then cancelled) and return the result.
        A call placed by this client is ended on the join connection; otherwise, or if that connection broke (a
        daemon restart), through EndToolCall."""
        if call_id in self._framed_calls and self._framed is not None:
            self._framed_calls.discard(call_id)
            try:
                return self._framed.end(call_id, wait_status)
            except (OSError, JoinError):
                self._drop_framed()
        if call_id in self._placed and self._join is not None:
            self._placed.discard(call_id)
            try:
                return self._join.end(call_id, wait_status)
            except (OSError, JoinError):
                self._drop_join()
        request = pb.EndToolCallRequest(call_id=call_id)
        if wait_status is not None:
            request.has_exit_status = True
            if os.WIFSIGNALED(wait_status):
                request.exit_signal = os.WTERMSIG(wait_status)
            else:
                request.exit_code = os.WEXITSTATUS(wait_status)
        result: pb.ToolCallResult = self.call("EndToolCall", request, timeout=max(self.timeout, 120.0))
        return result

    def wait(self, call_id: str, timeout: float = 0.0) -> pb.ToolCallResult:
        request = pb.WaitToolCallRequest(call_id=call_id, timeout_seconds=timeout)
        result: pb.ToolCallResult = self.call("WaitToolCall", request, timeout=timeout + 5 if timeout else None)
        return result

    def spawn(self, begun: pb.BeginToolCallResponse, argv: Sequence[str]) -> int:
        """Start argv as the call's process: launched waiting, placed into the call by agentd (pidfd on the join
        socket), then released to exec. Returns its pid."""
        pid, go = launch(argv)
        try:
            self.place(begun, pid)
        except BaseException:
            os.close(go)  # the waiting child reads EOF and exits 126 without running argv
            os.waitpid(pid, 0)
            raise
        release(go)
        return pid

    def place(self, begun: pb.BeginToolCallResponse, pid: int) -> None:
        """Have agentd move process `pid` into the call with the join token, over the client's join connection."""
        pidfd = os.pidfd_open(pid)
        try:
            self._on_join(begun.join_socket, lambda join: join.place(begun.join_token, pidfd))
        finally:
            os.close(pidfd)
        self._placed.add(begun.call_id)

    def _on_join(self, socket_path: str, action: Callable[[Placement], object]) -> None:
        """Run a request on the client's join connection (opened on first use, opened again once if agentd
        closed it while idle, e.g. across a restart)."""
        for attempt in (1, 2):
            if self._join is None:
                self._join = Placement(socket_path)
            try:
                action(self._join)
                return
            except (OSError, JoinError) as exc:
                stale = isinstance(exc, OSError) or exc.code == "UNAVAILABLE"
                if stale:
                    self._drop_join()
                if not stale or attempt == 2:
                    raise RunError(f"agentd: could not place the tool call's process: {exc}") from None

    def run(
        self,
        argv: Sequence[str],
        session_id: str = "",
        forward_signals: bool = False,
        **intent_fields: Any,
    ) -> RunOutcome:
        """Run argv as a tool call, passing stdio through; return the result and the shell exit code. The
        command starts as from a shell (default signal dispositions, empty mask). With `forward_signals`,
        SIGHUP/SIGINT/SIGQUIT/SIGTERM sent to this process go on to the command until it exits (a terminal's
        Ctrl-C reaches it once); the caller must have blocked them in every thread first
        (agentd.launch.block_forwarded(), before the first Client is made), as agentctl does."""
        intent = pb.Intent(argv=list(argv), **intent_fields)
        if not intent.tool:
            intent.tool = os.path.basename(argv[0])
        pid, go = launch(argv)
        try:
            if forward_signals:
                relay(pid)
            begun = self.begin(intent, session_id, pid=pid)
        except BaseException as exc:
            os.close(go)  # the waiting child reads EOF and exits 126 without running argv
            _, held = os.waitpid(pid, 0)
            code = EXIT_NOT_STARTED
            if _placement_refused(exc):
                message = f"agentd: could not place the tool call's process: {exc.code().name}: {exc.details()}"
            elif isinstance(exc, RunError):
                message = str(exc)
            else:
                raise
            if os.WIFSIGNALED(held):  # e.g. a forwarded SIGTERM while agentd had not answered yet
                message += f" (stopped by {signal.Signals(os.WTERMSIG(held)).name} before it ran)"
                code = shell_code(held)
            raise RunError(message, code) from None
        release(go)
        _, status = os.waitpid(pid, 0)
        result = self.end(begun.call_id, status)
        return RunOutcome(result, shell_code(status))


def shell_code(wait_status: int) -> int:
    """The exit code a shell reports for a wait status: 128 + signal when killed."""
    return 128 + os.WTERMSIG(wait_status) if os.WIFSIGNALED(wait_status) else os.WEXITSTATUS(wait_status)


def _placement_refused(exc: BaseException) -> TypeGuard[grpc.RpcError]:
    """A BeginToolCall refused because its held process could not be placed (not the request as such)."""
    if not isinstance(exc, grpc.RpcError):
        return False
    return any(m.key == PLACEMENT_METADATA for m in exc.trailing_metadata() or ())


class JoinRefusal(grpc.RpcError):
    """An ERROR answer on the join socket, raised as the gRPC error BeginToolCall would have raised: the same
    code, details and, for a process that could not be placed, the trailing metadata x-agentd-placement."""

    def __init__(self, error: JoinError) -> None:
        super().__init__(str(error))
        self.error = error

    def code(self) -> grpc.StatusCode:
        return getattr(grpc.StatusCode, self.error.code, grpc.StatusCode.UNKNOWN)

    def details(self) -> str:
        return str(self.error).split(": ", 1)[-1]

    def trailing_metadata(self) -> tuple[Any, ...]:  # of Metadatum (grpc-stubs name a private class)
        return (Metadatum(PLACEMENT_METADATA, "refused"),) if self.error.placement_refused else ()


class Metadatum(NamedTuple):
    """One item of trailing metadata, as gRPC gives it."""

    key: str
    value: str


class RunError(RuntimeError):
    """The command could not be started inside its tool call (it never ran). `exit_code` is what a shell would
    report: EXIT_NOT_STARTED, or 128 + signal when a signal stopped the held command first."""

    def __init__(self, message: str, exit_code: int = EXIT_NOT_STARTED) -> None:
        super().__init__(message)
        self.exit_code = exit_code
