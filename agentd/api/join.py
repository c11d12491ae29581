"""The join socket: processes are placed into tool calls here, identified by the kernel, never by a claimed pid.

One line per request and per answer, on a Unix stream socket:

    JOIN <token>                    place the connecting process itself (pid from SO_PEERCRED)
    JOIN <token>   + SCM_RIGHTS fd  place the process the attached pidfd refers to (e.g. a forked child that
                                    waits for the answer before it execs); the sender must be allowed too
      -> OK <call id> | ERR <CODE> <message>
    END <call id> <wait status|->   only for a call placed on this connection: the tool's wait status;
      -> RESULT <base64 ToolCallResult> | ERR <CODE> <message>     (answered once the call is finalised)

The pidfd form lets a launcher place its child before exec without running code in the child, and keeps the
connection for END, so a tool call costs one gRPC round trip (BeginToolCall) plus two on this socket.
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
from collections.abc import Awaitable, Callable
from pathlib import Path

from agentd.api.gen import agentd_pb2 as pb
from agentd.core.errors import AgentdError, FailedPrecondition, NotFound, PermissionDenied

log = logging.getLogger(__name__)

MAX_LINE = 512
IDLE_TIMEOUT_SECONDS = 30.0
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
        self.placed: set[str] = set()
        self.sender = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[0]
        self.idle = server.loop.call_later(IDLE_TIMEOUT_SECONDS, self.close)
        server.loop.add_reader(sock.fileno(), self.readable)

    def readable(self) -> None:
        fds = array.array("i")
        try:
            data, ancdata, _flags, _addr = self.sock.recvmsg(MAX_LINE, _FD_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        try:
            if not data:
                self.close()
                return
            self.buffer += data
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                self.handle(line.decode(errors="replace"), fds)
                fds = array.array("i")
            if len(self.buffer) > MAX_LINE:
                self.reply("ERR INVALID_ARGUMENT line too long")
                self.close()
        finally:
            for fd in fds:
                os.close(fd)

    def handle(self, line: str, fds: array.array[int]) -> None:
        verb, _, rest = line.partition(" ")
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
                wait_status = None if status.strip() in ("", "-") else int(status)
                self.server.loop.create_task(self.end(call_id, wait_status))
            else:
                raise AgentdError("expected 'JOIN <token>' or 'END <call id> <wait status>'")
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

    def reply(self, line: str) -> None:
        self.idle.cancel()
        self.idle = self.server.loop.call_later(IDLE_TIMEOUT_SECONDS, self.close)
        try:
            self.sock.sendall(line.encode() + b"\n")
        except OSError:
            self.close()

    def close(self) -> None:
        self.idle.cancel()
        if self.sock.fileno() >= 0:
            self.server.loop.remove_reader(self.sock.fileno())
            self.sock.close()
        self.server.connections.discard(self)


class JoinServer:
    """Accepts join connections on the asyncio loop (raw sockets: ancillary data carries pidfds)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, path: Path, placer: Placer, ender: Ender) -> None:
        self.loop = loop
        self.placer = placer
        self.ender = ender
        self.connections: set[_Connection] = set()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        self.listener.bind(str(path))
        self.listener.listen(256)
        loop.add_reader(self.listener.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    log.error("join socket: out of file descriptors")
                    return
                raise
            sock.setblocking(False)
            self.connections.add(_Connection(self, sock))

    def close(self) -> None:
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
