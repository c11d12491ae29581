"""The join socket: processes are placed into tool calls here, identified by the kernel, never by a claimed pid.

One line per request and per answer, on a Unix stream socket:

    HOLD <ref>     + SCM_RIGHTS fd  offer the process the pidfd refers to (held before exec) for the
                                    BeginToolCall whose held_process is <ref>, sent right after; no answer here:
                                    that request places it or fails (a malformed HOLD closes the connection)
    JOIN <token>                    place the connecting process itself (pid from SO_PEERCRED)
    JOIN <token>   + SCM_RIGHTS fd  place the process the attached pidfd refers to (e.g. a forked child that
                                    waits for the answer before it execs); the sender must be allowed too
      -> OK <call id> | ERR <CODE> <message>
    END <call id> <wait status|->   only for a call placed on this connection: the tool's wait status;
      -> RESULT <base64 ToolCallResult> | ERR <CODE> <message>     (answered once the call is finalised)

HOLD lets a launcher place its child before exec without running code in the child and without a round trip
of its own, and keeps the connection for END: a tool call costs one gRPC round trip (BeginToolCall, which
places the child) plus one on this socket. The sender of a HOLD and its process are checked at placement
exactly as for JOIN.
"""

from __future__ import annotations

import array
import asyncio
import base64
import contextlib
import errno
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from agentd.api.gen import agentd_pb2 as pb
from agentd.core.errors import AgentdError, FailedPrecondition, NotFound, PermissionDenied

log = logging.getLogger(__name__)

MAX_LINE = 512
MAX_REF = 64
IDLE_TIMEOUT_SECONDS = 30.0
ACCEPT_PAUSE_SECONDS = 0.1  # out of descriptors: stop accepting for a moment instead of spinning on the listener
HOLD_WAIT_SECONDS = 5.0  # how long a BeginToolCall waits for the HOLD it names (sent just before it)
MAX_HELD_PER_CONNECTION = 16  # a HOLD keeps a pidfd open in agentd until claimed or expired
MAX_HELD = 1024  # in all: connections times their HOLDs must not use up agentd's descriptors
_UCRED = struct.Struct("3i")
_FD_SPACE = socket.CMSG_SPACE(struct.calcsize("i"))

# (token, sender pid, target pid or None for the sender itself) -> call id
Placer = Callable[[str, int, int | None], str]
# (call id, wait status or None) -> result
Ender = Callable[[str, int | None], Awaitable[pb.ToolCallResult]]


def error_code(exc: AgentdError) -> str:
    if isinstance(exc, PermissionDenied):
        return "PERMISSION_DENIED"
    if isinstance(exc, FailedPrecondition):
        return "FAILED_PRECONDITION"
    if isinstance(exc, NotFound):
        return "NOT_FOUND"
    return "INVALID_ARGUMENT"


def parse_wait_status(text: str) -> int | None:
    """END's wait status as waitpid() gave it: an exit or a killing signal; "-" or nothing for unknown."""
    if text in ("", "-"):
        return None
    status = int(text)
    if not (0 <= status <= 0xFFFF and (os.WIFEXITED(status) or os.WIFSIGNALED(status))):
        raise ValueError(f"not the wait status of an exited or killed process: {text}")
    return status


def pidfd_pid(fd: int) -> int:
    """The pid (in our namespace) a pidfd refers to; -1 once the process is gone."""
    info = os.open(f"/proc/self/fdinfo/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        text = os.read(info, 4096).decode()
    finally:
        os.close(info)
    for line in text.splitlines():
        if line.startswith("Pid:"):
            return int(line.split()[1])
    raise FailedPrecondition("the attached descriptor is not a pidfd")


class _Connection:
    def __init__(self, server: JoinServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.buffer = b""
        self.fds = array.array("i")  # received with a line not complete yet
        self.placed: set[str] = set()
        self.sender: int = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[0]
        self.active = server.loop.time()  # of the last request or answer
        self.idle = server.loop.call_later(IDLE_TIMEOUT_SECONDS, self._check_idle)
        server.loop.add_reader(sock.fileno(), self.readable)

    def readable(self) -> None:
        try:
            data, ancdata, _flags, _addr = self.sock.recvmsg(MAX_LINE, _FD_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                self.fds.frombytes(payload[: len(payload) - len(payload) % self.fds.itemsize])
        if not data:
            self.close()
            return
        self._touch()
        self.buffer += data
        while b"\n" in self.buffer and self.sock.fileno() >= 0:
            line, self.buffer = self.buffer.split(b"\n", 1)
            # A read ends with the message that carried descriptors: they belong to its last complete line.
            fds, self.fds = (self.fds, array.array("i")) if b"\n" not in self.buffer else (array.array("i"), self.fds)
            try:
                self.handle(line.decode(errors="replace"), fds)  # a HOLD keeps its pidfd (pops it)
            finally:
                for fd in fds:
                    os.close(fd)
        if len(self.buffer) > MAX_LINE and self.sock.fileno() >= 0:
            self.reply("ERR INVALID_ARGUMENT line too long")
            self.close()

    def handle(self, line: str, fds: array.array[int]) -> None:
        verb, _, rest = line.partition(" ")
        if verb == "HOLD":
            ref = rest.strip()
            held = sum(1 for h in self.server.held.values() if h.connection is self)
            malformed = len(fds) != 1 or not 0 < len(ref) <= MAX_REF or ref in self.server.held
            if malformed or held >= MAX_HELD_PER_CONNECTION or len(self.server.held) >= MAX_HELD:
                log.warning("join socket: malformed or excess HOLD, closing the connection",
                            extra={"pid": self.sender})
                self.close()
                return
            self.server.hold(ref, self, fds.pop())
            return
        try:
            if verb == "JOIN" and rest:
                target = pidfd_pid(fds[0]) if fds else None
                if target == -1:
                    raise FailedPrecondition("the process to place has already exited")
                call_id = self.server.placer(rest.strip(), self.sender, target)
                self.placed.add(call_id)
                self.reply(f"OK {call_id}")
            elif verb == "END" and rest:
                call_id, _, status = rest.partition(" ")
                if call_id not in self.placed:
                    raise PermissionDenied("END is accepted only on the connection that placed the call")
                wait_status = parse_wait_status(status.strip())
                self.server.loop.create_task(self.end(call_id, wait_status))
            else:
                raise AgentdError("expected 'HOLD <ref>', 'JOIN <token>' or 'END <call id> <wait status>'")
        except AgentdError as exc:
            self.reply(f"ERR {error_code(exc)} {exc}")
        except ValueError as exc:
            self.reply(f"ERR INVALID_ARGUMENT {exc}")

    async def end(self, call_id: str, wait_status: int | None) -> None:
        try:
            result = await self.server.ender(call_id, wait_status)
        except AgentdError as exc:
            self.reply(f"ERR {error_code(exc)} {exc}")
            return
        self.reply("RESULT " + base64.b64encode(result.SerializeToString()).decode())
        self.server.answered()  # the client is busy with the result now: a good moment for deferred work

    def _touch(self) -> None:
        """The connection is in use: its idle timeout starts over (noted only; the timer catches up when due,
        instead of a timer cancelled and made again for every line)."""
        self.active = self.server.loop.time()

    def _check_idle(self) -> None:
        left = self.active + IDLE_TIMEOUT_SECONDS - self.server.loop.time()
        if left > 0:
            self.idle = self.server.loop.call_later(left, self._check_idle)
        else:
            self.close()

    def reply(self, line: str) -> None:
        if self.sock.fileno() < 0:  # closed meanwhile (an END answered after the client went away)
            return
        self._touch()
        try:
            self.sock.sendall(line.encode() + b"\n")
        except OSError:
            self.close()

    def close(self) -> None:
        self.idle.cancel()
        if self.sock.fileno() >= 0:
            self.server.loop.remove_reader(self.sock.fileno())
            self.sock.close()
        for fd in self.fds:
            os.close(fd)
        self.fds = array.array("i")
        self.server.connections.discard(self)
        for ref, held in list(self.server.held.items()):
            if held.connection is self:
                self.server.drop(ref)


@dataclass
class Held:
    """A process offered with HOLD, waiting for its BeginToolCall."""

    connection: _Connection
    pidfd: int
    expiry: asyncio.TimerHandle

    @property
    def sender(self) -> int:
        return self.connection.sender

    def placed(self, call_id: str) -> None:
        """The process is in the call: END for it is accepted on the HOLD's connection."""
        self.connection.placed.add(call_id)


class JoinServer:
    """Accepts join connections on the asyncio loop (raw sockets: ancillary data carries pidfds)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, path: Path, placer: Placer, ender: Ender, answered: Callable[[], None],
        max_connections: int,
    ) -> None:
        self.loop = loop
        self.max_connections = max_connections  # open at once, from all sandboxes
        self.placer = placer
        self.ender = ender
        self.answered = answered  # called after each END's result went out
        self.connections: set[_Connection] = set()
        self.held: dict[str, Held] = {}
        self._awaited: dict[str, asyncio.Future[None]] = {}
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        self.listener.bind(str(path))
        self.listener.listen(256)
        self._resume: asyncio.TimerHandle | None = None
        self._refusals_logged = -1.0
        self._listen()

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    log.error("join socket: out of file descriptors; not accepting for a moment")
                    self.loop.remove_reader(self.listener.fileno())
                    self._resume = self.loop.call_later(ACCEPT_PAUSE_SECONDS, self._listen)
                    return
                raise
            if len(self.connections) >= self.max_connections:
                self._refuse(sock)
                continue
            sock.setblocking(False)
            self.connections.add(_Connection(self, sock))

    def _listen(self) -> None:
        self.loop.add_reader(self.listener.fileno(), self._accept)

    def _refuse(self, sock: socket.socket) -> None:
        """Too many connections: this one is told so and closed (logged once a second at most)."""
        with contextlib.suppress(OSError), sock:
            sock.setblocking(False)
            sock.send(b"ERR RESOURCE_EXHAUSTED too many join connections\n")
        if self.loop.time() >= self._refusals_logged + 1.0:
            self._refusals_logged = self.loop.time()
            log.warning("join socket: connection refused, %d open already", len(self.connections))

    def hold(self, ref: str, connection: _Connection, pidfd: int) -> None:
        self.held[ref] = Held(connection, pidfd, self.loop.call_later(HOLD_WAIT_SECONDS, self.drop, ref))
        waiter = self._awaited.pop(ref, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def drop(self, ref: str) -> None:
        """Forget a held process (expired, its connection closed)."""
        held = self.held.pop(ref, None)
        if held is not None:
            held.expiry.cancel()
            os.close(held.pidfd)

    @contextlib.asynccontextmanager
    async def take(self, ref: str) -> AsyncIterator[tuple[Held, int]]:
        """The process held under `ref` and its pid, for the duration of the block (waits a little for a HOLD
        still on its way); its pidfd is closed after."""
        if ref not in self.held:
            waiter = self._awaited.setdefault(ref, self.loop.create_future())
            try:
                await asyncio.wait_for(asyncio.shield(waiter), HOLD_WAIT_SECONDS)
            except TimeoutError:
                raise FailedPrecondition(f"no process held under {ref!r} on the join socket") from None
            finally:
                self._awaited.pop(ref, None)
        held = self.held.pop(ref, None)
        if held is None:  # taken by a concurrent request with the same reference
            raise FailedPrecondition(f"no process held under {ref!r} on the join socket")
        held.expiry.cancel()
        try:
            pid = pidfd_pid(held.pidfd)
            if pid == -1:
                raise FailedPrecondition("the held process has already exited")
            yield held, pid
        finally:
            os.close(held.pidfd)

    def close(self) -> None:
        if self._resume is not None:
            self._resume.cancel()
        self.loop.remove_reader(self.listener.fileno())
        self.listener.close()
        for connection in list(self.connections):
            connection.close()


# ----- client side -------------------------------------------------------------------------------------------


class JoinError(RuntimeError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class Placement:
    """A client connection to the join socket: place a process, later report its end and get the result."""

    def __init__(self, socket_path: str, timeout: float | None = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        self._buffer = b""
        try:
            self.sock.connect(socket_path)
        except OSError:
            self.sock.close()
            raise

    def _request(self, line: str, fds: list[int] | None = None) -> str:
        data = line.encode() + b"\n"
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.sendall(data)
        while b"\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise JoinError("UNAVAILABLE", "agentd closed the join connection")
            self._buffer += chunk
        answer, self._buffer = self._buffer.split(b"\n", 1)
        status, _, rest = answer.decode(errors="replace").partition(" ")
        if status == "ERR":
            code, _, message = rest.partition(" ")
            raise JoinError(code, message)
        return rest

    def hold(self, ref: str, pidfd: int) -> None:
        """Offer the process `pidfd` refers to for the BeginToolCall that names `ref` (no answer here)."""
        socket.send_fds(self.sock, [f"HOLD {ref}\n".encode()], [pidfd])

    def place(self, token: str, pidfd: int | None = None) -> str:
        """Place the process `pidfd` refers to (None: this process). Returns the call id."""
        return self._request(f"JOIN {token}", [pidfd] if pidfd is not None else None)

    def end(self, call_id: str, wait_status: int | None) -> pb.ToolCallResult:
        """Report the tool's wait status; returns the call's result once agentd has finalised it."""
        reply = self._request(f"END {call_id} {'-' if wait_status is None else wait_status}")
        return pb.ToolCallResult.FromString(base64.b64decode(reply))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def join(socket_path: str, token: str, timeout: float = 10.0) -> str:
    """Place the calling process itself (e.g. from a process about to exec the tool). Returns the call id."""
    placement = Placement(socket_path, timeout)
    try:
        return placement.place(token)
    finally:
        placement.close()
