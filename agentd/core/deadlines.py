"""Tool calls' deadlines: their timeouts, join deadlines and exit-report graces, one loop timer for all of them.

Every call arms one and nearly all are cancelled long before they are due (a 600 s timeout for a 5 ms `git status`).
As asyncio timers, each would be pushed into the loop's heap, compared there by a Python method (TimerHandle.__lt__),
and kept, cancelled, until cancelled timers are most of the heap: ~20 Python calls per tool call, and every other
timer of the daemon pays for the larger heap too. Here they are entries of a heap of tuples (compared in C) with a
single loop timer armed for the earliest; cancelled entries are dropped when they come up or, once they are most of
the heap, all at once.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# Cancelled entries are swept out once they are more than half of the heap and at least this many.
SWEEP_MIN_CANCELLED = 256


class Deadline:
    """A callback due at a time of the loop's clock, until cancelled (or run)."""

    __slots__ = ("_owner", "args", "callback", "done")

    def __init__(self, owner: Deadlines, callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._owner = owner
        self.callback = callback
        self.args = args
        self.done = False  # ran or cancelled

    def cancel(self) -> None:
        if not self.done:
            self.done = True
            self._owner.cancelled_one()


class Deadlines:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()  # ties in time run in the order they were added
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for = float("inf")
        self._cancelled = 0

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Deadline:
        """callback(*args) in `delay` seconds, unless the Deadline is cancelled first."""
        when = self._loop.time() + delay
        deadline = Deadline(self, callback, args)
        heapq.heappush(self._heap, (when, next(self._order), deadline))
        if when < self._armed_for:
            self._arm(when)
        return deadline

    def cancelled_one(self) -> None:
        self._cancelled += 1
        if self._cancelled >= SWEEP_MIN_CANCELLED and 2 * self._cancelled > len(self._heap):
            self._heap = [entry for entry in self._heap if not entry[2].done]
            heapq.heapify(self._heap)
            self._cancelled = 0

    def close(self) -> None:
        """Nothing more runs (shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._heap.clear()

    def __len__(self) -> int:
        """Entries held, cancelled ones not swept yet included."""
        return len(self._heap)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_for = when
        self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        # The loop runs a timer up to its clock resolution early: everything up to the armed time is due.
        due = max(self._armed_for, self._loop.time())
        self._timer, self._armed_for = None, float("inf")
        while self._heap and (self._heap[0][2].done or self._heap[0][0] <= due):
            # self._heap each time: a callback's cancel() may sweep it into a new list
            _when, _order, deadline = heapq.heappop(self._heap)
            if deadline.done:  # cancelled: no longer counted once it is out of the heap
                self._cancelled -= 1
                continue
            deadline.done = True
            try:
                deadline.callback(*deadline.args)
            except Exception:  # one callback's failure must not keep the others from running
                log.exception("deadline callback failed", extra={"callback": repr(deadline.callback)})
        if self._heap:
            self._arm(self._heap[0][0])
