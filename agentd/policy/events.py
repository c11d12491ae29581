"""What the memory policy is doing, pushed to whoever watches: an agent (its own session's events) sees pressure
and throttling before anything is killed and can end or shrink its call; an operator sees every domain.

Watchers get bounded queues: a watcher that does not keep up loses the oldest events (counted), never slows the
loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

QUEUE_EVENTS = 256  # per watcher; beyond, the oldest event is dropped


@dataclass(frozen=True)
class PolicyEvent:
    domain: str
    kind: str  # pressure, clear, throttle, freeze, kill, thaw, restore, admit, queue, refuse
    session_id: str = ""  # empty: a domain event, for every watcher of the domain's sessions
    call_id: str = ""
    call_usage: int = 0
    call_expected: int = 0
    memory_high: int = 0
    domain_usage: int = 0
    domain_limit: int = 0
    headroom: int = 0
    stall_pct: float | None = None
    reason: str = ""
    time: float = field(default_factory=time.time)


@dataclass(eq=False)
class _Watcher:
    session_id: str | None  # None: every event
    queue: asyncio.Queue[PolicyEvent] = field(default_factory=lambda: asyncio.Queue(QUEUE_EVENTS))
    dropped: int = 0


@dataclass(eq=False)
class Hub:
    _watchers: set[_Watcher] = field(default_factory=set)

    def publish(self, event: PolicyEvent) -> None:
        for watcher in self._watchers:
            if watcher.session_id is not None and event.session_id not in ("", watcher.session_id):
                continue
            if watcher.queue.full():
                watcher.queue.get_nowait()
                watcher.dropped += 1
            watcher.queue.put_nowait(event)

    async def watch(self, session_id: str | None) -> AsyncIterator[PolicyEvent]:
        """The events of one session (with its domains' events), or every event; until the caller stops."""
        watcher = _Watcher(session_id)
        self._watchers.add(watcher)
        try:
            while True:
                yield await watcher.queue.get()
        finally:
            self._watchers.discard(watcher)

    def __len__(self) -> int:
        return len(self._watchers)
