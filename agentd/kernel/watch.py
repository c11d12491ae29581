"""One epoll for kernfs notifications (cgroup.events, memory.events), driven by asyncio.

kernfs files signal a change with EPOLLPRI (plus EPOLLERR); the epoll fd itself becomes readable, so the
asyncio loop watches that single fd and dispatches to per-file callbacks. A callback must re-read its file
through the fd it was given (kernfs re-arms per open file, so reading another fd does not clear it).
"""

from __future__ import annotations

import asyncio
import os
import select
from collections.abc import Callable
from pathlib import Path

Callback = Callable[[int], None]


class Watcher:
    """Dispatches kernfs change notifications to callbacks on the asyncio loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callback] = {}
        loop.add_reader(self._epoll.fileno(), self._dispatch)

    def watch(self, path: str | Path, callback: Callback) -> int:
        """Register a file for its change notifications (EPOLLPRI); return its fd, the handle for unwatch()."""
        return self.watch_fd(os.open(path, os.O_RDONLY | os.O_CLOEXEC), callback)

    def watch_fd(self, fd: int, callback: Callback) -> int:
        """Register an fd opened elsewhere (a PSI trigger: cgroupfs.pressure_trigger); the watcher owns it now."""
        try:
            self._epoll.register(fd, select.EPOLLPRI)
        except OSError:
            os.close(fd)
            raise
        self._callbacks[fd] = callback
        return fd

    def unwatch(self, fd: int) -> None:
        if self._callbacks.pop(fd, None) is not None:
            self._epoll.unregister(fd)
            os.close(fd)

    def _dispatch(self) -> None:
        for fd, _events in self._epoll.poll(0):
            callback = self._callbacks.get(fd)
            if callback is not None:
                callback(fd)

    def close(self) -> None:
        self._loop.remove_reader(self._epoll.fileno())
        for fd in list(self._callbacks):
            self.unwatch(fd)
        self._epoll.close()

    def __len__(self) -> int:
        return len(self._callbacks)


def reread(fd: int) -> str:
    """Read a watched kernfs file from its start through the watched fd, re-arming its notification."""
    return os.pread(fd, 4096, 0).decode()
