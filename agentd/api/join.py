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

Framed protocol (the hot path of a declared tool call; layout and kinds in proto/agentd.proto, above JoinHello):
a connection whose first byte is 0 speaks length-prefixed frames whose payloads are the API's protobuf messages.
HELLO (JoinHello: version, session token) first; BEGIN (BeginToolCallRequest + the pidfd of the held process)
-> BEGUN (BeginToolCallResponse) | ERROR (JoinError); END (EndToolCallRequest) -> RESULT (ToolCallResult) |
ERROR. BEGIN is the Sandbox service's BeginToolCall (agentd.api.servicer: the same authorization, validation,
admission and placement); its pidfd counts as a HOLD for the quotas below while it is handled. Requests are
handled one at a time, in order: while one is, nothing more is read. A frame's length outside 1..MAX_FRAME,
an undecodable HELLO, a wrong version, a first frame that is not HELLO or a descriptor not alone with the end of
a BEGIN frame gets an ERROR (a descriptor: none) and closes the connection; a bad BEGIN or END is answered
with an ERROR and the connection stays. A framed connection with calls awaiting their END is not closed
for idleness (their tools may run for hours); it holds no descriptor meanwhile.

HOLD lets a launcher place its child before exec without running code in the child and without a round trip
of its own, and keeps the connection for END: a tool call costs one gRPC round trip (BeginToolCall, which
places the child) plus one on this socket. The sender of a HOLD and its process are checked at placement
exactly as for JOIN. Every request gets its answer: an unexpected failure is `ERR INTERNAL <message>`. The
codes are those of gRPC (agentd.api.status).

Limits. The socket is world-connectable and bind-mounted into every sandbox: no peer may take more than a
bounded share of agentd's descriptors or HOLD slots, and one owner's abuse must not block another's calls.
A connection belongs to an owner, identified once when it is accepted: the session whose cgroups hold the
connecting process (SO_PEERCRED pid -> cgroup, agentd.core.owners), or "uid:<uid>" for a process outside every
session; a connection whose process has exited by then is refused.
- Descriptors travel with the line they belong to. A read accepts room for one descriptor (a message with more
  is cut, MSG_CTRUNC), and a message carrying one must end its line, a HOLD or a JOIN. Anything else closes the
  connection and the descriptors at once: no descriptor ever waits in agentd for a later read.
- Per owner: MAX_CONNECTIONS_PER_OWNER connections (beyond: `ERR RESOURCE_EXHAUSTED`, closed) and
  MAX_HELD_PER_OWNER unclaimed HOLDs; per connection MAX_HELD_PER_CONNECTION. A HOLD beyond a quota closes its
  connection, and the BeginToolCall naming it is refused at once with RESOURCE_EXHAUSTED.
- In all: [api] max_connections connections and MAX_HELD unclaimed HOLDs, backstops far above one owner's share.
- A connection remembers the calls placed on it until their END (an END forgets its call), the newest
  MAX_PLACED_PER_CONNECTION of them: for an older one END answers PERMISSION_DENIED (EndToolCall still works).
An owner therefore holds at most MAX_CONNECTIONS_PER_OWNER + MAX_HELD_PER_OWNER of agentd's descriptors, plus
one for the read being handled.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import logging
import os
import socket
import struct
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf.message import DecodeError, Message

from agentd.api.decoding import undecodable_field
from agentd.api.gen import agentd_pb2 as pb
from agentd.api.status import message, status_code
from agentd.core.errors import (
    AgentdError,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    bounded,
)

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)

MAX_LINE = 512
READ_SIZE = 4096  # bytes taken per read: several pipelined lines at once, never a descriptor more
MAX_REF = 64
IDLE_TIMEOUT_SECONDS = 30.0
ACCEPT_PAUSE_SECONDS = 0.1  # out of descriptors: stop accepting for a moment instead of spinning on the listener
ACCEPTS_PER_WAKEUP = 64  # then other work on the loop gets its turn
HOLD_WAIT_SECONDS = 5.0  # how long a BeginToolCall waits for the HOLD it names (sent just before it)
# Connections one owner may have open: one per running `agentctl run` (a session runs at most
# [sessions] max_active_calls_per_session calls, 256 by default, rarely more than a few at once) plus idle
# clients' (closed after IDLE_TIMEOUT_SECONDS). 32 owners at their quota fill [api] max_connections (4096).
MAX_CONNECTIONS_PER_OWNER = 128
# Unclaimed HOLDs (each keeps a pidfd open in agentd) per owner and per connection; a launcher's HOLD is claimed
# by its BeginToolCall a millisecond later, so only launches started at the very same moment count together.
MAX_HELD_PER_OWNER = 32
MAX_HELD_PER_CONNECTION = 16
MAX_HELD = 4096  # in all: 128 owners at their quota
MAX_PLACED_PER_CONNECTION = 256  # calls awaiting their END on one connection: as many as a session may run
MAX_REFUSED_REMEMBERED = 1024  # refused HOLDs whose BeginToolCall is told at once (older ones: after the wait)
LOG_INTERVAL_SECONDS = 1.0  # a refusal of one kind for one owner is logged at most this often
# Framed protocol: a frame is a 4-byte big-endian length of what follows (kind + payload), a kind, a payload.
FRAME_VERSION = 1
MAX_FRAME = 64 * 1024  # an intent's argv is for records only: clients cut it to fit
FRAME_HEADER = struct.Struct(">IB")
_LENGTH = struct.Struct(">I")
FRAME_READ_SIZE = MAX_FRAME + 1024  # a BEGIN frame (with the HELLO before it) arrives with its descriptor in one read
HELLO, BEGIN, END = 1, 2, 3
BEGUN, RESULT, ERROR = 129, 130, 255
EXPECTED = "expected 'HOLD <ref>', 'JOIN <token>' or 'END <call id> <wait status>'"
_UCRED = struct.Struct("3i")
# Room for exactly one descriptor (CMSG_SPACE would round up to room for two on 64-bit).
_FD_SPACE = socket.CMSG_LEN(struct.calcsize("i"))

# (token, sender pid, target pid or None for the sender itself) -> call id
Placer = Callable[[str, int, int | None], str]
# (call id, wait status or None) -> result
Ender = Callable[[str, int | None], Awaitable[pb.ToolCallResult]]
# (request, session token, sender pid, pidfd, called with the call id once placed) -> the answer; raises
# PlacementRefused when the process could not be placed
Beginner = Callable[[pb.BeginToolCallRequest, str, int, int, Callable[[str], None]],
                    Awaitable[pb.BeginToolCallResponse]]
# (pid, uid) of a connecting process -> its owner ("session:<id>", "uid:<uid>"); None once it has exited
Identify = Callable[[int, int], str | None]


class HoldRefused(ResourceExhausted):
    """The HOLD a BeginToolCall names was refused: its owner was at a quota."""


class PlacementRefused(Exception):
    """A BeginToolCall's held process could not be placed (`cause`): the command never ran, no call is left."""

    def __init__(self, cause: AgentdError) -> None:
        super().__init__(str(cause))
        self.cause = cause


@dataclass
class Usage:
    """What one owner holds now."""

    connections: int = 0
    held: int = 0


def connection_refusal(open_in_all: int, max_connections: int, owner: str, usage: Usage) -> str | None:
    """Why a new connection of `owner` is refused, or None."""
    if open_in_all >= max_connections:
        return "too many join connections"
    if usage.connections >= MAX_CONNECTIONS_PER_OWNER:
        return f"too many join connections from {owner} ({usage.connections} open, at most {MAX_CONNECTIONS_PER_OWNER})"
    return None


def hold_refusal(on_connection: int, owner: str, usage: Usage, held_in_all: int) -> str | None:
    """Why one more HOLD is refused, or None."""
    if on_connection >= MAX_HELD_PER_CONNECTION:
        return f"{on_connection} unclaimed HOLDs on this connection (at most {MAX_HELD_PER_CONNECTION})"
    if usage.held >= MAX_HELD_PER_OWNER:
        return f"{usage.held} unclaimed HOLDs from {owner} (at most {MAX_HELD_PER_OWNER})"
    if held_in_all >= MAX_HELD:
        return f"{held_in_all} unclaimed HOLDs in all (at most {MAX_HELD})"
    return None


def descriptor_fault(descriptors: int, flags: int, data: bytes) -> str | None:
    """Why a read breaks the rule that a descriptor comes alone with the end of its line, or None."""
    if flags & socket.MSG_CTRUNC:
        return "more than one descriptor in a message"
    if descriptors and not data.endswith(b"\n"):
        return "a descriptor without the end of its line"
    return None


def parse_wait_status(text: str) -> int | None:
    """END's wait status as waitpid() gave it: an exit or a killing signal; "-" or nothing for unknown."""
    if text in ("", "-"):
        return None
    status = int(text)
    if not (0 <= status <= 0xFFFF and (os.WIFEXITED(status) or os.WIFSIGNALED(status))):
        raise ValueError(f"not the wait status of an exited or killed process: {text}")
    return status


def wait_status_of(request: pb.EndToolCallRequest) -> int | None:
    """An EndToolCallRequest's exit status as the wait status END carries (None: unknown)."""
    if not request.has_exit_status:
        return None
    if request.exit_signal:
        if not 0 < request.exit_signal < 0x7F:
            raise ValueError(f"exit_signal: not a signal: {request.exit_signal}")
        return int(request.exit_signal)
    if not 0 <= request.exit_code <= 255:
        raise ValueError(f"exit_code: must be 0-255, not {request.exit_code}")
    return int(request.exit_code) << 8


def split_frames(buffer: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """The complete frames at the start of `buffer` as (kind, payload), and what is left; ValueError for a
    length outside 1..MAX_FRAME."""
    frames: list[tuple[int, bytes]] = []
    pos = 0
    while len(buffer) - pos >= _LENGTH.size:
        (length,) = _LENGTH.unpack_from(buffer, pos)
        if not 0 < length <= MAX_FRAME:
            raise ValueError(f"a frame of {length} bytes (1 to {MAX_FRAME})")
        end = pos + _LENGTH.size + length
        if end > len(buffer):
            break
        frames.append((buffer[pos + _LENGTH.size], buffer[pos + FRAME_HEADER.size : end]))
        pos = end
    return frames, buffer[pos:]


def decode(cls: type[M], payload: bytes) -> M:
    """A frame's payload as message `cls`; ValueError naming the field at fault and why when it does not decode."""
    try:
        return cls.FromString(payload)
    except DecodeError:
        descriptor: Any = cls.DESCRIPTOR
        field, why = undecodable_field(descriptor, payload)
        name = descriptor.name
        raise ValueError(f"{name}.{field}: {why}" if field != "request" else f"not a {name}: {why}") from None


def frame(kind: int, message: Any) -> bytes:
    """One frame holding a protobuf message."""
    payload: bytes = message.SerializeToString()
    return FRAME_HEADER.pack(len(payload) + 1, kind) + payload


def frame_descriptor_fault(frames: list[tuple[int, bytes]], rest: bytes) -> str | None:
    """Why frames read together with a descriptor break the rule that it comes alone with the end of a BEGIN
    frame (a HELLO may come first), or None."""
    kinds = [kind for kind, _ in frames]
    if rest or kinds not in ([BEGIN], [HELLO, BEGIN]):
        return "a descriptor not alone with the end of a BEGIN frame"
    return None


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


def _descriptors(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(struct.unpack(f"{usable // 4}i", payload[:usable]))
    return fds


class _Connection:
    def __init__(self, server: JoinServer, sock: socket.socket, sender: int, owner: str) -> None:
        self.server = server
        self.sock = sock
        self.sender = sender  # pid of the connecting process (SO_PEERCRED)
        self.owner = owner
        self.open = True
        self.buffer = b""  # a line not complete yet (never with a descriptor)
        self.refs: set[str] = set()  # its unclaimed HOLDs
        self.placed: OrderedDict[str, None] = OrderedDict()  # calls placed here awaiting END, oldest first
        self.active = server.loop.time()  # of the last request or answer
        self.idle = server.loop.call_later(IDLE_TIMEOUT_SECONDS, self._check_idle)
        self.framed: bool | None = None  # decided by the first byte
        self.token: str | None = None  # the HELLO's session token (framed)
        self.busy = False  # a framed request is being handled: nothing more is read meanwhile
        self.pending: list[tuple[int, bytes]] = []  # frames read but not handled yet (no descriptor)
        self.beginning = 0  # BEGINs being handled: their pidfds count as HOLDs
        server.loop.add_reader(sock.fileno(), self.readable)

    def readable(self) -> None:
        try:
            size = READ_SIZE if self.framed is False else FRAME_READ_SIZE
            data, ancdata, flags, _addr = self.sock.recvmsg(size, _FD_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        fds = _descriptors(ancdata)
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

    # ----- framed protocol ----------------------------------------------------------------------------------

    def _frames(self, data: bytes, flags: int, fds: list[int]) -> None:
        if flags & socket.MSG_CTRUNC:
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
        if self.open and not self.busy:
            self.server.loop.add_reader(self.sock.fileno(), self.readable)

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
        refusal = self.server.hold_refusal(self)
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

    def _start(self, work: Coroutine[Any, Any, None]) -> None:
        """Handle a request that waits: nothing more is read until it is answered."""
        self.busy = True
        self.server.loop.remove_reader(self.sock.fileno())

        async def then_next() -> None:
            try:
                await work
            finally:
                self.busy = False
                self._pump([])

        self.server.spawn(then_next())

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
        while len(self.placed) > MAX_PLACED_PER_CONNECTION:
            self.placed.popitem(last=False)

    def violation(self, why: str) -> None:
        """The peer broke the protocol's rules: closed at once, its descriptors with it."""
        self.server.note("protocol", self.owner, "join socket: protocol violation, connection closed",
                         why=why, pid=self.sender)
        self.close()

    def _touch(self) -> None:
        """The connection is in use: its idle timeout starts over (noted only; the timer catches up when due,
        instead of a timer cancelled and made again for every line)."""
        self.active = self.server.loop.time()

    def _check_idle(self) -> None:
        left = self.active + IDLE_TIMEOUT_SECONDS - self.server.loop.time()
        if left > 0 or (self.framed and (self.placed or self.busy)):
            left = max(left, IDLE_TIMEOUT_SECONDS)
            self.idle = self.server.loop.call_later(left, self._check_idle)
        else:
            self.close()

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
        self.idle.cancel()
        self.server.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self.server.closed(self)


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
        self.connection.remember(call_id)


class JoinServer:
    """Accepts join connections on the asyncio loop (raw sockets: ancillary data carries pidfds)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, path: Path, placer: Placer, ender: Ender, answered: Callable[[], None],
        max_connections: int, identify: Identify, beginner: Beginner | None = None,
    ) -> None:
        self.loop = loop
        self.max_connections = max_connections  # open at once, from all sandboxes
        self.placer = placer
        self.ender = ender
        self.answered = answered  # called after each END's result went out
        self.identify = identify
        self.beginner = beginner  # BEGIN on framed connections (None: answered UNIMPLEMENTED)
        self.connections: set[_Connection] = set()
        self.usage: dict[str, Usage] = {}  # by owner
        self.held: dict[str, Held] = {}
        self.refused: OrderedDict[str, str] = OrderedDict()  # HOLD ref -> why, for its BeginToolCall
        self._awaited: dict[str, asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._logged: dict[tuple[str, str], float] = {}
        self._unlogged: Counter[tuple[str, str]] = Counter()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        self.listener.bind(str(path))
        self.listener.listen(256)
        self._resume: asyncio.TimerHandle | None = None
        self._listen()

    # ----- connections -----------------------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    log.error("join socket: out of file descriptors; not accepting for a moment",
                              extra={"connections": len(self.connections), "held": len(self.held)})
                    self.loop.remove_reader(self.listener.fileno())
                    self._resume = self.loop.call_later(ACCEPT_PAUSE_SECONDS, self._listen)
                    return
                raise
            self._admit(sock)

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        try:
            owner = self.identify(pid, uid)
        except OSError:  # its /proc entry went away in a way not reported as "gone"
            owner = None
        if owner is None:
            self._refuse(sock, "FAILED_PRECONDITION", "the connecting process has exited", f"pid:{pid}", pid)
            return
        usage = self.usage.get(owner, Usage())
        refusal = connection_refusal(len(self.connections), self.max_connections, owner, usage)
        if refusal is not None:
            self._refuse(sock, "RESOURCE_EXHAUSTED", refusal, owner, pid)
            return
        self.count(owner, connections=1)
        self.connections.add(_Connection(self, sock, pid, owner))

    def _listen(self) -> None:
        self.loop.add_reader(self.listener.fileno(), self._accept)

    def _refuse(self, sock: socket.socket, code: str, why: str, owner: str, pid: int) -> None:
        """A connection not admitted: told why and closed."""
        with contextlib.suppress(OSError), sock:
            sock.send(f"ERR {code} {why}\n".encode())
        self.note("connection", owner, "join socket: connection refused", why=why, pid=pid,
                  open=len(self.connections), owner_open=self.usage.get(owner, Usage()).connections)

    def closed(self, connection: _Connection) -> None:
        """A connection is gone: its unclaimed HOLDs with it."""
        self.connections.discard(connection)
        for ref in list(connection.refs):
            self.drop(ref)
        self.count(connection.owner, connections=-1)

    def count(self, owner: str, connections: int = 0, held: int = 0) -> None:
        usage = self.usage.setdefault(owner, Usage())
        usage.connections += connections
        usage.held += held
        if not usage.connections and not usage.held:
            del self.usage[owner]

    def note(self, kind: str, owner: str, text: str, **numbers: Any) -> None:
        """Log a refusal, at most once per LOG_INTERVAL_SECONDS for a kind and an owner (a flood of them must
        not flood the journal); the next line says how many were left out."""
        key, now = (kind, owner), self.loop.time()
        if now < self._logged.get(key, -LOG_INTERVAL_SECONDS) + LOG_INTERVAL_SECONDS:
            self._unlogged[key] += 1
            return
        self._logged[key] = now
        log.warning(text, extra={"owner": owner, "not_logged_before": self._unlogged.pop(key, 0), **numbers})

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ----- held processes --------------------------------------------------------------------------------

    def hold_refusal(self, connection: _Connection) -> str | None:
        usage = self.usage.get(connection.owner, Usage())
        return hold_refusal(len(connection.refs) + connection.beginning, connection.owner, usage, len(self.held))

    def hold(self, ref: str, connection: _Connection, pidfd: int) -> None:
        self.refused.pop(ref, None)
        self.held[ref] = Held(connection, pidfd, self.loop.call_later(HOLD_WAIT_SECONDS, self.drop, ref))
        connection.refs.add(ref)
        self.count(connection.owner, held=1)
        self._wake(ref)

    def refuse(self, ref: str, connection: _Connection, why: str) -> None:
        """A HOLD over a quota: its BeginToolCall is told at once (the newest MAX_REFUSED_REMEMBERED)."""
        self.refused[ref] = f"HOLD refused: {why}"
        while len(self.refused) > MAX_REFUSED_REMEMBERED:
            self.refused.popitem(last=False)
        self._wake(ref)
        self.note("hold", connection.owner, "join socket: HOLD refused, connection closed", why=why,
                  pid=connection.sender, held=len(self.held),
                  owner_held=self.usage.get(connection.owner, Usage()).held)

    def _wake(self, ref: str) -> None:
        waiter = self._awaited.pop(ref, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _release(self, ref: str) -> Held | None:
        held = self.held.pop(ref, None)
        if held is not None:
            held.expiry.cancel()
            held.connection.refs.discard(ref)
            self.count(held.connection.owner, held=-1)
        return held

    def drop(self, ref: str) -> None:
        """Forget a held process (expired, its connection closed)."""
        held = self._release(ref)
        if held is not None:
            os.close(held.pidfd)

    @contextlib.asynccontextmanager
    async def take(self, ref: str) -> AsyncIterator[tuple[Held, int]]:
        """The process held under `ref` and its pid, for the duration of the block (waits a little for a HOLD
        still on its way); its pidfd is closed after."""
        if ref not in self.held and ref not in self.refused:
            waiter = self._awaited.setdefault(ref, self.loop.create_future())
            try:
                await asyncio.wait_for(asyncio.shield(waiter), HOLD_WAIT_SECONDS)
            except TimeoutError:
                raise FailedPrecondition(f"no process held under {ref!r} on the join socket") from None
            finally:
                self._awaited.pop(ref, None)
        why = self.refused.pop(ref, None)
        if why is not None:
            raise HoldRefused(why)
        held = self._release(ref)
        if held is None:  # taken by a concurrent request with the same reference
            raise FailedPrecondition(f"no process held under {ref!r} on the join socket")
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
        for task in self._tasks:
            task.cancel()
