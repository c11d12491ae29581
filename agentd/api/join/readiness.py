"""One epoll for the reads of every join connection, registered with the event loop once: a connection's
descriptor is added and removed with one system call each, where the loop's add_reader()/remove_reader() cost
a handle and a selector key apiece (about 12 us here), for connections that mostly live for one tool call."""

from __future__ import annotations

import asyncio
import select
from collections.abc import Callable

READY_PER_WAKEUP = 64  # connections read per wakeup; the rest stay ready (level-triggered) for the next


class Readiness:
    """Calls each registered reader when its descriptor is readable (or hung up), on the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.epoll = select.epoll()
        self.readers: dict[int, Callable[[], None]] = {}
        loop.add_reader(self.epoll.fileno(), self._ready)

    def add(self, fd: int, reader: Callable[[], None]) -> None:
        self.epoll.register(fd, select.EPOLLIN)
        self.readers[fd] = reader

    def remove(self, fd: int) -> None:
        """Stop calling the reader of `fd` (before it is closed); nothing if none is registered."""
        if self.readers.pop(fd, None) is not None:
            self.epoll.unregister(fd)

    def _ready(self) -> None:
        for fd, _events in self.epoll.poll(0, READY_PER_WAKEUP):
            reader = self.readers.get(fd)
            if reader is not None:  # not removed by a reader before it in this round
                reader()

    def close(self) -> None:
        self.loop.remove_reader(self.epoll.fileno())
        self.epoll.close()
