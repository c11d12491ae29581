"""One join-socket connection's state machine: its reads (the descriptors that come with them), the line
protocol's requests and answers, the HOLDs and the calls placed on it, its idle timeout and its end. The framed
protocol's requests are agentd.api.join.framed's; the server (agentd.api.join.server) admits connections and keeps
what they share."""

from __future__ import annotations

import base64
import logging
import os
import socket
from collections import OrderedDict
from typing import TYPE_CHECKING

from agentd.api.join import limits
from agentd.api.join.framed import FramedRequests
from agentd.api.join.wire import (
    EXPECTED,
    FD_SPACE,
    FRAME_READ_SIZE,
    MAX_LINE,
    MAX_REF,
    READ_SIZE,
    descriptor_fault,
    descriptors,
    parse_wait_status,
    pidfd_pid,
)
from agentd.api.status import message, status_code
from agentd.core.errors import AgentdError, FailedPrecondition, InvalidArgument, PermissionDenied

if TYPE_CHECKING:
    from agentd.api.join.server import JoinServer

log = logging.getLogger("agentd.api.join")  # the package's: one logger name for the join socket


class Connection(FramedRequests):
    """One connection on the join socket: reads its requests (lines, or frames once its first byte is 0), answers
    them in order, and keeps what it holds (HOLDs, calls awaiting END) until it closes."""

    def __init__(self, server: JoinServer, sock: socket.socket, sender: int, owner: str) -> None:
        self.server = server
        self.sock = sock
        self.sender = sender  # pid of the connecting process (SO_PEERCRED)
        self.owner = owner
        self.open = True
        self.buffer = b""  # a line not complete yet (never with a descriptor)
        self.refs: set[str] = set()  # its unclaimed HOLDs
        self.placed: OrderedDict[str, None] = OrderedDict()  # calls placed here awaiting END, oldest first
        self.active = server.loop.time()  # of the last request or answer (the server's idle check reads it)
        self.framed: bool | None = None  # decided by the first byte
        self.token: str | None = None  # the HELLO's session token (framed)
        self.busy = False  # a framed request is being handled: nothing more is read meanwhile
        self.pending: list[tuple[int, bytes]] = []  # frames read but not handled yet (no descriptor)
        self.beginning = 0  # BEGINs being handled: their pidfds count as HOLDs
        self.reading = True  # registered with the loop for reads
        self.answered_end = False  # an END was answered in the read being handled
        server.readiness.add(sock.fileno(), self.readable)

    def readable(self) -> None:
        self._read()
        while self.answered_end and self.open and not self.busy:
            # A client mostly hangs up right after END's result (the launcher does): read that now, while here,
            # rather than in another turn of the loop.
            self._read()

    def _read(self) -> None:
        if self.busy:
            # Nothing more is read until the framed request being handled is answered (its descriptors with it):
            # the reader goes now that something came, not at every request (two epoll_ctl calls each).
            self.server.readiness.remove(self.sock.fileno())
            self.reading = False
            return
        self.answered_end = False
        try:
            size = READ_SIZE if self.framed is False else FRAME_READ_SIZE
            data, ancdata, flags, _addr = self.sock.recvmsg(size, FD_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        fds = descriptors(ancdata)
        try:
            self._received(data, flags, fds)
        finally:
            for fd in fds:  # all but a HOLD's, which it keeps (pops)
                os.close(fd)

    def _received(self, data: bytes, flags: int, fds: list[int]) -> None:
        if not data:
            self.close()
            return
        if self.framed is None:
            self.framed = data[0] == 0
        if self.framed:
            self._frames(data, flags, fds)
            return
        fault = descriptor_fault(len(fds), flags, data)
        if fault is not None:
            self.violation(fault)
            return
        self._touch()
        *lines, self.buffer = (self.buffer + data).split(b"\n")
        for n, line in enumerate(lines):
            if not self.open:
                return
            if len(line) > MAX_LINE:
                self.buffer = line
                break
            # A read ends with the message that carried a descriptor: it belongs to the read's last line.
            self.handle(line.decode(errors="replace"), fds if n == len(lines) - 1 else [])
        if len(self.buffer) > MAX_LINE and self.open:
            self.reply("ERR INVALID_ARGUMENT line too long")
            self.close()

    def handle(self, line: str, fds: list[int]) -> None:
        verb, _, rest = line.partition(" ")
        if fds and verb not in ("HOLD", "JOIN"):
            self.violation(f"a descriptor with {verb[:16]!r}, not with HOLD or JOIN")
            return
        if verb == "HOLD":
            self._hold(rest.strip(), fds)
            return
        try:
            if verb == "JOIN" and rest:
                target = pidfd_pid(fds[0]) if fds else None
                if target == -1:
                    raise FailedPrecondition("the process to place has already exited")
                call_id = self.server.placer(rest.strip(), self.sender, target)
                self.remember(call_id)
                self.reply(f"OK {call_id}")
            elif verb == "END" and rest:
                call_id, _, status = rest.partition(" ")
                if call_id not in self.placed:
                    raise PermissionDenied("END is accepted only on the connection that placed the call")
                wait_status = parse_wait_status(status.strip())
                del self.placed[call_id]  # one END per call: no pile of tasks waiting for the same result
                self.server.spawn(self.end(call_id, wait_status))
            else:
                raise InvalidArgument("request", EXPECTED)
        except ValueError as exc:
            self.reply(f"ERR INVALID_ARGUMENT {exc}")
        except Exception as exc:  # every request gets an answer
            self.failed(verb, exc)

    def _hold(self, ref: str, fds: list[int]) -> None:
        if len(fds) != 1 or not 0 < len(ref) <= MAX_REF or ref in self.server.held:
            self.violation("malformed HOLD")
            return
        refusal = self.server.hold_refusal(self)
        if refusal is not None:
            self.server.refuse(ref, self, refusal)
            self.close()
            return
        self.server.hold(ref, self, fds.pop())

    async def end(self, call_id: str, wait_status: int | None) -> None:
        try:
            result = await self.server.ender(call_id, wait_status)
        except Exception as exc:  # every END gets an answer
            self.failed("END", exc, call_id)
            return
        self.reply("RESULT " + base64.b64encode(result.SerializeToString()).decode())
        self.server.answered()  # the client is busy with the result now: a good moment for deferred work

    def failed(self, verb: str, exc: Exception, call_id: str = "") -> None:
        """Answer a request that failed: an AgentdError as its code; anything else INTERNAL, logged with its
        traceback."""
        code = status_code(exc).name
        if not isinstance(exc, AgentdError):
            log.error("join socket: %s failed unexpectedly", verb, exc_info=exc,
                      extra={"owner": self.owner, "pid": self.sender, "call": call_id, "code": code})
        self.reply(f"ERR {code} {message(exc)}")

    def remember(self, call_id: str) -> None:
        """A call placed on this connection: its END is accepted here (the newest MAX_PLACED_PER_CONNECTION)."""
        self.placed[call_id] = None
        while len(self.placed) > limits.MAX_PLACED_PER_CONNECTION:
            self.placed.popitem(last=False)

    def violation(self, why: str) -> None:
        """The peer broke the protocol's rules: closed at once, its descriptors with it."""
        self.server.note("protocol", self.owner, "join socket: protocol violation, connection closed",
                         why=why, pid=self.sender)
        self.close()

    def _touch(self) -> None:
        """The connection is in use: its idle timeout starts over (noted only: the server's idle check reads it,
        instead of a timer made and cancelled for every connection)."""
        self.active = self.server.loop.time()

    def idle_until(self, now: float) -> float | None:
        """When the connection may be idle for IDLE_TIMEOUT_SECONDS, or None: idle that long now, closed. A framed
        one with a request in hand or a call awaiting its END is in use: its timeout starts over."""
        until = self.active + limits.IDLE_TIMEOUT_SECONDS
        if until > now:
            return until
        if self.framed and (self.placed or self.busy):
            self.active = now
            return now + limits.IDLE_TIMEOUT_SECONDS
        self.close()
        return None

    def reply(self, line: str) -> None:
        if not self.open:  # closed meanwhile (an END answered after the client went away)
            return
        self._touch()
        try:
            self.sock.sendall(line.replace("\n", " ").encode() + b"\n")
        except OSError:
            self.close()

    def close(self) -> None:
        if not self.open:
            return
        self.open = False
        self.server.readiness.remove(self.sock.fileno())
        self.sock.close()
        self.server.closed(self)
