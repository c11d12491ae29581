"""The join socket: the process that will exec a tool presents its one-time token here.

Protocol (one line each way): client sends `JOIN <token>\\n`; agentd answers `OK <call id>\\n` after the
process has been moved into the call's cgroup, or `ERR <CODE> <message>\\n`. The process is identified by
SO_PEERCRED (the kernel's view, valid from inside any pid namespace), never by a pid the client claims.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable

from agentd.core.errors import AgentdError, FailedPrecondition, PermissionDenied

log = logging.getLogger(__name__)

MAX_LINE = 256
READ_TIMEOUT_SECONDS = 5.0
_UCRED = struct.Struct("3i")

Joiner = Callable[[str, int], str]  # (token, pid) -> call id


def peer_pid(sock: socket.socket) -> int:
    pid, _uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return int(pid)


def error_code(exc: AgentdError) -> str:
    if isinstance(exc, PermissionDenied):
        return "PERMISSION_DENIED"
    if isinstance(exc, FailedPrecondition):
        return "FAILED_PRECONDITION"
    return "INVALID_ARGUMENT"


class JoinProtocol(asyncio.Protocol):
    def __init__(self, joiner: Joiner) -> None:
        self._joiner = joiner
        self._buffer = b""
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_later(READ_TIMEOUT_SECONDS, transport.close)

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._buffer += data
        if b"\n" not in self._buffer:
            if len(self._buffer) > MAX_LINE:
                self._answer(b"ERR INVALID_ARGUMENT line too long\n")
            return
        line = self._buffer.split(b"\n", 1)[0].decode(errors="replace")
        verb, _, token = line.partition(" ")
        if verb != "JOIN" or not token:
            self._answer(b"ERR INVALID_ARGUMENT expected 'JOIN <token>'\n")
            return
        sock = self._transport.get_extra_info("socket")
        try:
            call_id = self._joiner(token.strip(), peer_pid(sock))
        except AgentdError as exc:
            self._answer(f"ERR {error_code(exc)} {exc}\n".encode())
            return
        self._answer(f"OK {call_id}\n".encode())

    def _answer(self, line: bytes) -> None:
        assert self._transport is not None
        if self._timer is not None:
            self._timer.cancel()
        self._transport.write(line)
        self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()


class JoinError(RuntimeError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


def join(socket_path: str, token: str, timeout: float = 10.0) -> str:
    """Client side, called by the process that is about to exec the tool. Returns the call id."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(f"JOIN {token}\n".encode())
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(512)
            if not chunk:
                break
            reply += chunk
    status, _, rest = reply.decode(errors="replace").strip().partition(" ")
    if status == "OK":
        return rest
    code, _, message = rest.partition(" ")
    raise JoinError(code or "UNAVAILABLE", message or "join socket closed without an answer")
