"""The framed protocol's half of a join-socket connection: HELLO, then BEGIN and END frames, handled one at a time
in order and answered with BEGUN, RESULT or ERROR (a framing error closes the connection). Mixed into
Connection (agentd.api.join.connection), whose state it uses."""

from __future__ import annotations

import logging
import os
import socket
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, cast

from agentd.api.gen import agentd_pb2 as pb
from agentd.api.join.contract import PlacementRefused
from agentd.api.join.eager import Resumed, first_step
from agentd.api.join.wire import (
    BEGIN,
    BEGUN,
    CTRUNC,
    END,
    ERROR,
    FRAME_VERSION,
    HELLO,
    RESULT,
    decode,
    frame,
    frame_descriptor_fault,
    split_frames,
    wait_status_of,
)
from agentd.api.status import message, status_code
from agentd.core.errors import AgentdError, bounded

if TYPE_CHECKING:
    from agentd.api.join.connection import Connection
    from agentd.api.join.server import JoinServer

log = logging.getLogger("agentd.api.join")  # the package's: one logger name for the join socket


class FramedRequests:
    """The framed protocol's requests and answers on a Connection (the only class this is mixed into)."""

    # The Connection's state and methods this half uses (set and defined there).
    server: JoinServer
    sock: socket.socket
    sender: int
    owner: str
    open: bool
    buffer: bytes
    placed: OrderedDict[str, None]
    token: str | None
    busy: bool
    reading: bool
    pending: list[tuple[int, bytes]]
    beginning: int
    answered_end: bool
    readable: Callable[[], None]
    remember: Callable[[str], None]
    violation: Callable[[str], None]
    close: Callable[[], None]
    _touch: Callable[[], None]

    def _frames(self, data: bytes, flags: int, fds: list[int]) -> None:
        if flags & CTRUNC:
            self.violation("more than one descriptor in a message")
            return
        self._touch()
        try:
            frames, self.buffer = split_frames(self.buffer + data)
        except ValueError as exc:
            self.fatal("INVALID_ARGUMENT", str(exc))
            return
        if fds:
            fault = frame_descriptor_fault(frames, self.buffer)
            if fault is not None:
                self.violation(fault)
                return
        self.pending.extend(frames)
        self._pump(fds)

    def _pump(self, fds: list[int]) -> None:
        """Handle pending frames in order until one keeps the connection busy (the descriptor goes with the
        last frame, the BEGIN it arrived with)."""
        while self.pending and self.open and not self.busy:
            kind, payload = self.pending.pop(0)
            self._frame(kind, payload, fds if not self.pending else [])
        if self.open and not self.busy and not self.reading:
            self.server.readiness.add(self.sock.fileno(), self.readable)
            self.reading = True

    def _frame(self, kind: int, payload: bytes, fds: list[int]) -> None:
        if self.token is None and kind != HELLO:
            self.fatal("FAILED_PRECONDITION", f"the first frame must be HELLO (kind {HELLO}), not kind {kind}")
        elif kind == HELLO:
            self._hello(payload)
        elif kind == BEGIN:
            self._begin(payload, fds)
        elif kind == END:
            self._end(payload)
        else:
            self.fatal("INVALID_ARGUMENT", f"unknown frame kind {kind} (HELLO {HELLO}, BEGIN {BEGIN}, END {END})")

    def _hello(self, payload: bytes) -> None:
        if self.token is not None:
            self.fatal("INVALID_ARGUMENT", "a second HELLO")
            return
        try:
            hello = decode(pb.JoinHello, payload)
        except ValueError as exc:
            self.fatal("INVALID_ARGUMENT", f"HELLO: {exc}")
            return
        if hello.version != FRAME_VERSION:
            self.fatal("FAILED_PRECONDITION", f"join protocol version {hello.version} is not supported "
                       f"(this agentd speaks version {FRAME_VERSION})")
            return
        self.token = hello.session_token

    def _begin(self, payload: bytes, fds: list[int]) -> None:
        try:
            request = decode(pb.BeginToolCallRequest, payload)
        except ValueError as exc:
            self.error("INVALID_ARGUMENT", f"BEGIN: {exc}")
            return
        if self.server.beginner is None:
            self.error("UNIMPLEMENTED", "BEGIN is not served on this socket")
            return
        if len(fds) != 1:
            self.error("INVALID_ARGUMENT", "BEGIN needs the pidfd of the process to place, attached (SCM_RIGHTS)")
            return
        refusal = self.server.hold_refusal(cast("Connection", self))  # the Connection this is mixed into
        if refusal is not None:
            self.server.note("hold", self.owner, "join socket: BEGIN refused, connection closed", why=refusal,
                             pid=self.sender, held=len(self.server.held))
            self.fatal("RESOURCE_EXHAUSTED", f"BEGIN refused: {refusal}")
            return
        self.beginning += 1  # counted at once: a BEGIN on another connection in this same read sees it
        self.server.count(self.owner, held=1)
        self._start(self._begun(request, fds.pop()))

    async def _begun(self, request: pb.BeginToolCallRequest, pidfd: int) -> None:
        try:
            assert self.server.beginner is not None and self.token is not None  # checked before it started
            response = await self.server.beginner(request, self.token, self.sender, pidfd, self.remember)
        except PlacementRefused as exc:
            self.error(status_code(exc.cause).name, message(exc.cause), placement_refused=True)
        except Exception as exc:  # every request gets an answer
            self.failed_frame("BEGIN", exc)
        else:
            self.send(frame(BEGUN, response))
        finally:
            os.close(pidfd)
            self.beginning -= 1
            self.server.count(self.owner, held=-1)

    def _end(self, payload: bytes) -> None:
        try:
            request = decode(pb.EndToolCallRequest, payload)
            wait_status = wait_status_of(request)
        except ValueError as exc:
            self.error("INVALID_ARGUMENT", f"END: {exc}")
            return
        if request.call_id not in self.placed:
            self.error("PERMISSION_DENIED", "END is accepted only on the connection that placed the call")
            return
        del self.placed[request.call_id]
        self._start(self._ended(request.call_id, wait_status))

    async def _ended(self, call_id: str, wait_status: int | None) -> None:
        try:
            result = await self.server.ender(call_id, wait_status)
        except Exception as exc:  # every request gets an answer
            self.failed_frame("END", exc, call_id)
            return
        self.send(frame(RESULT, result))
        self.server.answered()
        self.answered_end = True

    def _start(self, work: Coroutine[Any, Any, None]) -> None:
        """Handle a request, at once as far as it goes without waiting (agentd.api.join.eager); one that waits keeps
        the connection busy: nothing more is read until it is answered (readable() stops reading if more comes
        meanwhile), then the frames read before go on."""
        waiting = first_step(work)
        if waiting is not None:
            self.busy = True
            self.server.spawn(self._finish(work, waiting))

    async def _finish(self, work: Coroutine[Any, Any, None], waiting: Any) -> None:
        try:
            await Resumed(work, waiting)
        finally:
            self.busy = False
            self._pump([])

    def failed_frame(self, verb: str, exc: Exception, call_id: str = "") -> None:
        code = status_code(exc).name
        if not isinstance(exc, AgentdError):
            log.error("join socket: %s failed unexpectedly", verb, exc_info=exc,
                      extra={"owner": self.owner, "pid": self.sender, "call": call_id, "code": code})
        self.error(code, message(exc))

    def error(self, code: str, text: str, placement_refused: bool = False) -> None:
        self.send(frame(ERROR, pb.JoinError(code=code, message=bounded(text), placement_refused=placement_refused)))

    def fatal(self, code: str, text: str) -> None:
        """A framing error: answered, then the connection is closed."""
        self.server.note("protocol", self.owner, "join socket: framing error, connection closed", why=text,
                         pid=self.sender)
        self.error(code, text)
        self.close()

    def send(self, data: bytes) -> None:
        if not self.open:
            return
        self._touch()
        try:
            self.sock.sendall(data)
        except OSError:
            self.close()
