"""A request's coroutine run at once, up to its first real wait: most join-socket requests never wait (admission
admits at once, the call has ended by its END), and a task for each would cost two trips through the event loop
(its first step, its done callbacks). Only a coroutine that does wait goes on in a task, from where it stopped.

The first step runs in the caller's callback, outside any task: code on this path must not need
asyncio.current_task() (asyncio.timeout() does; asyncio.wait_for() does not)."""

from __future__ import annotations

from collections.abc import Coroutine, Generator
from typing import Any


def first_step(work: Coroutine[Any, Any, None]) -> Any | None:
    """Run `work` until it waits: None when it finished, else what it waits on (for Resumed)."""
    try:
        return work.send(None) or _BARE
    except StopIteration:
        return None


class Resumed:
    """Awaited in a task: `work`, stopped by first_step() at `waiting`, goes on as if the task had run it from the
    start (the task waits on what it waits on; a result, an exception or a cancellation reaches it)."""

    def __init__(self, work: Coroutine[Any, Any, None], waiting: Any) -> None:
        self.work = work
        self.waiting = None if waiting is _BARE else waiting

    def __await__(self) -> Generator[Any, None, None]:
        waiting = self.waiting
        while True:
            try:
                yield waiting
            except BaseException as exc:  # what the task throws in (the awaited future's error, a cancellation)
                try:
                    waiting = self.work.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    waiting = self.work.send(None)
                except StopIteration:
                    return


# A bare `yield` (asyncio.sleep(0)): the coroutine waits a turn of the loop, on nothing.
_BARE = object()
