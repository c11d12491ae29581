"""Client side of the join socket (protocol: agentd/api/join/__init__.py): place a process into a tool call, report its
end and get the result. Used by agentd.client and anything that places processes without gRPC.

`Framed` speaks the framed protocol (BEGIN/END carrying the API's protobuf messages: the fast path of a
declared call, no gRPC); `Placement` the line protocol (HOLD/JOIN/END)."""

from __future__ import annotations

import base64
import contextlib
import socket
import struct
from typing import Any

from agentd.api.gen import agentd_pb2 as pb


class JoinError(RuntimeError):
    def __init__(self, code: str, message: str, placement_refused: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.placement_refused = placement_refused  # BEGIN: the process could not be placed (it never ran)


# The framed protocol's layout (proto/agentd.proto, above JoinHello).
FRAME_VERSION = 1
MAX_FRAME = 64 * 1024
_HEADER = struct.Struct(">IB")
HELLO, BEGIN, END = 1, 2, 3
BEGUN, RESULT, ERROR = 129, 130, 255
# An intent's argv is for records only; beyond this many bytes it is cut, so that a BEGIN fits in a frame.
MAX_RECORDED_ARGV_BYTES = 32 * 1024


def recorded_argv(argv: list[str]) -> list[str]:
    """argv as sent for the record: the arguments that fit in MAX_RECORDED_ARGV_BYTES (the rest left out)."""
    kept: list[str] = []
    total = 0
    for arg in argv:
        total += len(arg.encode(errors="surrogateescape")) + 2
        if total > MAX_RECORDED_ARGV_BYTES:
            break
        kept.append(arg)
    return kept


class Framed:
    """A connection speaking the join socket's framed protocol, authorized by a session token: BEGIN places a
    held process into a new call, END reports its end and returns the result."""

    def __init__(self, socket_path: str, token: str, timeout: float | None = 30.0) -> None:
        self.sock = _connect(socket_path, timeout)
        self._hello: bytes | None = _frame(HELLO, pb.JoinHello(version=FRAME_VERSION, session_token=token))
        self._buffer = b""

    def begin(self, request: pb.BeginToolCallRequest, pidfd: int) -> pb.BeginToolCallResponse:
        """BeginToolCall placing the process `pidfd` refers to before the answer."""
        data = _frame(BEGIN, request)
        if self._hello is not None:  # goes with the first request: no round trip of its own
            data, self._hello = self._hello + data, None
        socket.send_fds(self.sock, [data], [pidfd])
        return pb.BeginToolCallResponse.FromString(self._answer(BEGUN))

    def end(self, call_id: str, wait_status: int | None) -> pb.ToolCallResult:
        request = pb.EndToolCallRequest(call_id=call_id)
        if wait_status is not None:
            request.has_exit_status = True
            if _signalled(wait_status):
                request.exit_signal = wait_status & 0x7F
            else:
                request.exit_code = (wait_status >> 8) & 0xFF
        self.sock.sendall(_frame(END, request))
        return pb.ToolCallResult.FromString(self._answer(RESULT))

    def _answer(self, expected: int) -> bytes:
        while True:
            if len(self._buffer) >= _HEADER.size:
                length, kind = _HEADER.unpack_from(self._buffer)
                if not 0 < length <= MAX_FRAME:
                    raise JoinError("INTERNAL", f"agentd sent a frame of {length} bytes")
                if len(self._buffer) >= 4 + length:
                    payload, self._buffer = self._buffer[_HEADER.size : 4 + length], self._buffer[4 + length :]
                    return self._payload(kind, expected, payload)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise JoinError("UNAVAILABLE", "agentd closed the join connection")
            self._buffer += chunk

    @staticmethod
    def _payload(kind: int, expected: int, payload: bytes) -> bytes:
        if kind == ERROR:
            error = pb.JoinError.FromString(payload)
            raise JoinError(error.code, error.message, error.placement_refused)
        if kind != expected:
            raise JoinError("INTERNAL", f"agentd answered with frame kind {kind}, not {expected}")
        return payload

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _frame(kind: int, message: Any) -> bytes:
    payload: bytes = message.SerializeToString()
    return _HEADER.pack(len(payload) + 1, kind) + payload


def _signalled(wait_status: int) -> bool:
    return 0 < wait_status & 0x7F < 0x7F


class Placement:
    """A client connection to the join socket: place a process, later report its end and get the result."""

    def __init__(self, socket_path: str, timeout: float | None = 30.0) -> None:
        self.sock = _connect(socket_path, timeout)
        self._buffer = b""

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


def _connect(socket_path: str, timeout: float | None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(socket_path)
    except OSError:
        sock.close()
        raise
    return sock
