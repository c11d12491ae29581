"""Client side of the join socket (protocol: agentd/api/join.py): place a process into a tool call, report its
end and get the result. Used by agentd.client and anything that places processes without gRPC."""

from __future__ import annotations

import base64
import contextlib
import socket

from agentd.api.gen import agentd_pb2 as pb


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
