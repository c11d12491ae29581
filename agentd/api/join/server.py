"""The join socket's server: it listens, admits each connection under the quotas (identifying its owner),
counts what every owner holds, and keeps the processes offered with HOLD until their BeginToolCall takes them.
Each connection's requests are agentd.api.join.connection's."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentd.api.join import limits
from agentd.api.join.connection import Connection
from agentd.api.join.contract import Beginner, Ender, HoldRefused, Identify, Placer
from agentd.api.join.limits import Usage, connection_refusal, hold_refusal
from agentd.api.join.readiness import Readiness
from agentd.api.join.wire import UCRED, pidfd_pid
from agentd.core.errors import FailedPrecondition

log = logging.getLogger("agentd.api.join")  # the package's: one logger name for the join socket


@dataclass
class Held:
    """A process offered with HOLD, waiting for its BeginToolCall."""

    connection: Connection
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
        self.connections: set[Connection] = set()
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
        self.readiness = Readiness(loop)  # the connections' reads
        self._resume: asyncio.TimerHandle | None = None
        self._idle_check: asyncio.TimerHandle | None = None  # armed while connections are open
        self._listen()

    # ----- connections -----------------------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(limits.ACCEPTS_PER_WAKEUP):
            try:
                # accept() would make the new socket's family and type enum members (Python code) for nothing.
                fd, _addr = self.listener._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    log.error("join socket: out of file descriptors; not accepting for a moment",
                              extra={"connections": len(self.connections), "held": len(self.held)})
                    self.loop.remove_reader(self.listener.fileno())
                    self._resume = self.loop.call_later(limits.ACCEPT_PAUSE_SECONDS, self._listen)
                    return
                raise
            self._admit(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fd))

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        pid, uid, _gid = UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size))
        try:
            owner = self.identify(pid, uid)
        except OSError:  # its /proc entry went away in a way not reported as "gone"
            owner = None
        if owner is None:
            self._refuse(sock, "FAILED_PRECONDITION", "the connecting process has exited", f"pid:{pid}", pid)
            return
        usage = self.usage.get(owner) or Usage()
        refusal = connection_refusal(len(self.connections), self.max_connections, owner, usage)
        if refusal is not None:
            self._refuse(sock, "RESOURCE_EXHAUSTED", refusal, owner, pid)
            return
        self.count(owner, connections=1)
        connection = Connection(self, sock, pid, owner)
        self.connections.add(connection)
        if self._idle_check is None:
            self._idle_check = self.loop.call_later(limits.IDLE_TIMEOUT_SECONDS, self._close_idle)
        connection.readable()  # a client sends its first request as it connects: read now, not a loop turn later

    def _close_idle(self) -> None:
        """Close the connections idle for IDLE_TIMEOUT_SECONDS; check again when the next one may be (at most every
        IDLE_CHECK_SECONDS: one timer for all connections, not one per connection)."""
        now = self.loop.time()
        soonest: float | None = None
        for connection in list(self.connections):
            until = connection.idle_until(now)
            if until is not None and (soonest is None or until < soonest):
                soonest = until
        self._idle_check = None
        if soonest is not None:  # connections are left
            self._idle_check = self.loop.call_later(max(soonest - now, limits.IDLE_CHECK_SECONDS), self._close_idle)

    def _listen(self) -> None:
        self.loop.add_reader(self.listener.fileno(), self._accept)

    def _refuse(self, sock: socket.socket, code: str, why: str, owner: str, pid: int) -> None:
        """A connection not admitted: told why and closed."""
        with contextlib.suppress(OSError), sock:
            sock.send(f"ERR {code} {why}\n".encode())
        self.note("connection", owner, "join socket: connection refused", why=why, pid=pid,
                  open=len(self.connections), owner_open=self.usage.get(owner, Usage()).connections)

    def closed(self, connection: Connection) -> None:
        """A connection is gone: its unclaimed HOLDs with it."""
        self.connections.discard(connection)
        for ref in list(connection.refs):
            self.drop(ref)
        self.count(connection.owner, connections=-1)

    def count(self, owner: str, connections: int = 0, held: int = 0) -> None:
        usage = self.usage.get(owner)
        if usage is None:
            usage = self.usage[owner] = Usage()
        usage.connections += connections
        usage.held += held
        if not usage.connections and not usage.held:
            del self.usage[owner]

    def note(self, kind: str, owner: str, text: str, **numbers: Any) -> None:
        """Log a refusal, at most once per LOG_INTERVAL_SECONDS for a kind and an owner (a flood of them must
        not flood the journal); the next line says how many were left out."""
        key, now = (kind, owner), self.loop.time()
        if now < self._logged.get(key, -limits.LOG_INTERVAL_SECONDS) + limits.LOG_INTERVAL_SECONDS:
            self._unlogged[key] += 1
            return
        self._logged[key] = now
        log.warning(text, extra={"owner": owner, "not_logged_before": self._unlogged.pop(key, 0), **numbers})

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ----- held processes --------------------------------------------------------------------------------

    def hold_refusal(self, connection: Connection) -> str | None:
        usage = self.usage.get(connection.owner) or Usage()
        return hold_refusal(len(connection.refs) + connection.beginning, connection.owner, usage, len(self.held))

    def hold(self, ref: str, connection: Connection, pidfd: int) -> None:
        self.refused.pop(ref, None)
        self.held[ref] = Held(connection, pidfd, self.loop.call_later(limits.HOLD_WAIT_SECONDS, self.drop, ref))
        connection.refs.add(ref)
        self.count(connection.owner, held=1)
        self._wake(ref)

    def refuse(self, ref: str, connection: Connection, why: str) -> None:
        """A HOLD over a quota: its BeginToolCall is told at once (the newest MAX_REFUSED_REMEMBERED)."""
        self.refused[ref] = f"HOLD refused: {why}"
        while len(self.refused) > limits.MAX_REFUSED_REMEMBERED:
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
                await asyncio.wait_for(asyncio.shield(waiter), limits.HOLD_WAIT_SECONDS)
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
        for timer in (self._resume, self._idle_check):
            if timer is not None:
                timer.cancel()
        self.loop.remove_reader(self.listener.fileno())
        self.listener.close()
        for connection in list(self.connections):
            connection.close()
        self.readiness.close()
        for task in self._tasks:
            task.cancel()
