"""The record of finished tool calls: one JSON line each.

A record is written (write(2), so it survives a daemon crash or restart) right after the call's result is
answered and before its cgroup is removed: a daemon that dies in between finds the labelled, empty cgroup on its
next start and finalises it, so no call goes unrecorded. A background thread fdatasyncs behind the writes, at
most every SYNC_INTERVAL_SECONDS (50 ms), so the disk flush stays off the event loop and the hot path; on a host
crash at most the records of the last interval can be lost. Recent records stay in memory for ListToolCalls and
for reconciling after a restart (a call whose record exists is not recorded twice).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

from agentd.core.results import Result

log = logging.getLogger(__name__)
TAIL_READ_BYTES = 64 * 1024 * 1024
SYNC_INTERVAL_SECONDS = 0.05


class RecordStore:
    def __init__(self, path: Path, max_bytes: int, keep: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self._recent: OrderedDict[str, Result] = OrderedDict()
        self._pending: list[Result] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        self._load()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._lock = threading.Lock()  # guards _fd against rotation while the syncer flushes it
        self._dirty = threading.Event()
        self._closing = threading.Event()
        self._syncer = threading.Thread(target=self._sync_loop, name="records-sync", daemon=True)
        self._syncer.start()

    def _load(self) -> None:
        """Read the newest records (the tail of the rotated file, then the current one)."""
        for path in (self.path.with_name(self.path.name + ".1"), self.path):
            try:
                with path.open("rb") as f:
                    size = f.seek(0, os.SEEK_END)
                    f.seek(max(0, size - TAIL_READ_BYTES))
                    data = f.read()
            except FileNotFoundError:
                continue
            lines = data.splitlines()
            if size > TAIL_READ_BYTES:
                lines = lines[1:]  # the first line may be cut
            for line in lines:
                try:
                    self._remember(Result.from_json(json.loads(line)))
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning("skipping unreadable record in %s: %s", path, exc)

    def _remember(self, result: Result) -> None:
        self._recent[result.call_id] = result
        self._recent.move_to_end(result.call_id)
        while len(self._recent) > self.keep:
            self._recent.popitem(last=False)

    def append(self, result: Result) -> None:
        """Take a finished call's result: listed at once, its line written by the next write_pending()."""
        self._pending.append(result)
        self._remember(result)

    def write_pending(self) -> None:
        """Write the lines of the results appended since the last call, rotating the file where a line would
        take it beyond max_bytes. On OSError the lines not written stay pending."""
        while self._pending:
            size = os.fstat(self._fd).st_size
            lines: list[bytes] = []
            total = 0
            for result in self._pending:
                line = json.dumps(result.to_json(), separators=(",", ":")).encode() + b"\n"
                if size + total + len(line) > self.max_bytes and size + total > 0:
                    break
                lines.append(line)
                total += len(line)
            if not lines:
                self._rotate()
                continue
            self._write(b"".join(lines))
            del self._pending[: len(lines)]

    def _write(self, data: bytes) -> None:
        """Append whole lines; OSError (e.g. a full disk) leaves the file as it was."""
        written = os.write(self._fd, data)
        if written != len(data):  # a short write: take the partial line back
            os.ftruncate(self._fd, os.fstat(self._fd).st_size - written)
            raise OSError(errno.ENOSPC, f"short write to {self.path}")
        self._dirty.set()

    def _sync_loop(self) -> None:
        while True:
            self._dirty.wait()
            # Group commit: one flush per interval, and one wakeup of this thread, whose GIL hand-offs
            # otherwise land in the middle of the next request on the event loop.
            self._closing.wait(SYNC_INTERVAL_SECONDS)
            self._dirty.clear()
            with self._lock:
                if self._fd < 0:
                    return
                os.fdatasync(self._fd)
            if self._closing.is_set():
                return

    def _rotate(self) -> None:
        with self._lock:
            os.fdatasync(self._fd)
            os.close(self._fd)
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def get(self, call_id: str) -> Result | None:
        return self._recent.get(call_id)

    def recent(self, session_id: str | None, limit: int) -> list[Result]:
        """Newest first."""
        out: list[Result] = []
        for result in reversed(self._recent.values()):
            if session_id is None or result.session_id == session_id:
                out.append(result)
                if len(out) >= limit:
                    break
        return out

    def close(self) -> None:
        """Write what is pending, flush and close; waits for the syncer. Lines that cannot be written now are
        lost here, but not their calls: their cgroups are still there for the next start to record."""
        try:
            self.write_pending()
        except OSError as exc:
            log.error("records not written at close", extra={"file": str(self.path), "error": str(exc)})
        self._closing.set()
        self._dirty.set()
        self._syncer.join()
        with self._lock:
            os.fdatasync(self._fd)
            os.close(self._fd)
            self._fd = -1
