"""The record of finished tool calls: one JSON line each, found again by call id through an index file.

A record is written (write(2), so it survives a daemon crash or restart) right after the call's result is
answered and before its cgroup is removed: a daemon that dies in between finds the labelled, empty cgroup on its
next start and finalises it, so no call goes unrecorded. A background thread fdatasyncs behind the writes, at
most every SYNC_INTERVAL_SECONDS (50 ms), so the disk flush stays off the event loop and the hot path; on a host
crash at most the records of the last interval can be lost. Rotation only renames and opens: the lines written
to the old file are flushed by that thread too.

Start-up reads no history. Next to each records file, `<file>.idx` holds one 16-byte entry per line (a hash of
the call id, the line's offset), appended with the line; at start it is checked against its file (header,
first and last entries) and only the lines it does not cover yet are indexed, normally none. `get()` finds a
call in the memory-mapped index (a C-speed scan, about 4 ms per million records) and reads one line, so
reconcile and GetToolCall / WaitToolCall on an old id are exact and bounded on the loop; `recent()` reads the
files backwards, through the newest `keep` records at most. Parsed results stay in a cache of `keep` entries.
An index that is missing or does not match its file (a first start after an upgrade, a file replaced by hand)
is rebuilt from the file at start, once: about 1.5 s per million records.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import mmap
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from agentd.core.results import Result

log = logging.getLogger(__name__)
SYNC_INTERVAL_SECONDS = 0.05
FILE_MODE = 0o640
INDEX_SUFFIX = ".idx"
# Index file: a header naming the records file it describes (by inode), then fixed-size entries in line order.
INDEX_HEADER = struct.Struct("<8sQ")  # magic, inode of the records file
INDEX_MAGIC = b"agentdx1"
KEY_BYTES = 8  # blake2b digest of the call id: a false match costs one line read, verified by its id
ENTRY_BYTES = KEY_BYTES + 8  # key, little-endian offset of the line
# Index entries that no longer match their file (a host crash lost the tail of the records, not of the index)
# are dropped from the end at start; more than this many means the index describes another file: rebuilt.
MAX_STALE_ENTRIES = 4096
READ_CHUNK_BYTES = 64 * 1024  # backward scans of recent()
INDEX_CHUNK_BYTES = 4 * 1024 * 1024  # indexing at start
# Entries appended since the index was mapped stay in memory; beyond this they are mapped again from the file.
REMAP_BYTES = 1024 * 1024
MAX_DAMAGED_REMEMBERED = 10_000  # damaged lines logged once each, up to this many
_FAST_ID_PREFIX = b'{"call_id":"'  # how to_json() lines begin: the id read without parsing the line


def _key(call_id: str) -> bytes:
    return hashlib.blake2b(call_id.encode("utf-8", "surrogatepass"), digest_size=KEY_BYTES).digest()


def _line_id(line: bytes) -> str | None:
    """The call id of a record line, or None if the line has none."""
    if line.startswith(_FAST_ID_PREFIX):
        end = line.find(b'"', len(_FAST_ID_PREFIX))
        raw = line[len(_FAST_ID_PREFIX):end]
        if end > 0 and b"\\" not in raw:
            with contextlib.suppress(UnicodeDecodeError):
                return raw.decode()
    try:
        data = json.loads(line)
    except (ValueError, RecursionError):
        return None
    call_id = data.get("call_id") if isinstance(data, dict) else None
    return call_id if isinstance(call_id, str) else None


def encode_result(result: Result) -> bytes:
    """A result as its record line holds it (without the newline) and as the result label keeps it."""
    return json.dumps(result.to_json(), separators=(",", ":")).encode()


def _index_path(path: Path) -> Path:
    return path.with_name(path.name + INDEX_SUFFIX)


def _write_all(fd: int, data: bytes) -> None:
    """Append data whole or not at all (a short write is taken back); raises OSError."""
    written = os.write(fd, data)
    if written != len(data):
        os.ftruncate(fd, os.fstat(fd).st_size - written)
        raise OSError(errno.ENOSPC, "short write")


def _matches(buf: bytes | bytearray | mmap.mmap, key: bytes, base: int) -> Iterator[int]:
    """Offsets stored in the entries of `buf` (from `base`) whose key is `key`, last entry first."""
    end = len(buf)
    while (pos := buf.rfind(key, base, end)) >= 0:
        if (pos - base) % ENTRY_BYTES == 0:
            yield int.from_bytes(buf[pos + KEY_BYTES:pos + ENTRY_BYTES], "little")
        end = pos + KEY_BYTES - 1


class _Segment:
    """One records file and its index, both open. Lines are read back by offset; entries found by key."""

    def __init__(self, path: Path, fd: int, index_fd: int) -> None:
        self.path = path
        self.fd = fd
        self.index_fd = index_fd
        self.ino = os.fstat(fd).st_ino
        self.indexed_at_open = 0  # lines the index did not cover at open
        self._mapped: mmap.mmap | None = None  # the index file as it was when last mapped
        self._added = bytearray()  # entries appended since
        self._index_behind = False  # an index write failed: entries kept in memory only, the rest at next start

    @staticmethod
    def open(path: Path, create: bool, truncate: bool = False) -> _Segment | None:
        """Open a records file and its index, repairing the index to cover every complete line."""
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
        flags |= (os.O_CREAT if create else 0) | (os.O_TRUNC if truncate else 0)
        try:
            fd = os.open(path, flags, FILE_MODE)
        except FileNotFoundError:
            return None
        try:
            index_fd = os.open(_index_path(path), flags | os.O_CREAT, FILE_MODE)
        except OSError:
            os.close(fd)
            raise
        segment = _Segment(path, fd, index_fd)
        try:
            segment._prepare(terminate=create)
        except OSError:
            segment.close()
            raise
        return segment

    def _prepare(self, terminate: bool) -> None:
        size = os.fstat(self.fd).st_size
        if terminate and size and os.pread(self.fd, 1, size - 1) != b"\n":
            # A line cut by a host crash stays a line of its own (skipped as unreadable), not the start of the next.
            _write_all(self.fd, b"\n")
            size += 1
        entries, covered = self._valid_entries(size)
        os.ftruncate(self.index_fd, INDEX_HEADER.size + entries * ENTRY_BYTES)
        if entries == 0:
            os.ftruncate(self.index_fd, 0)
            _write_all(self.index_fd, INDEX_HEADER.pack(INDEX_MAGIC, self.ino))
        self._map()
        self.indexed_at_open = self._index_lines(covered, size)
        self.settle()

    def _valid_entries(self, size: int) -> tuple[int, int]:
        """How many leading index entries describe this file's lines, and where the last one's line ends."""
        index_size = os.fstat(self.index_fd).st_size
        if os.pread(self.index_fd, INDEX_HEADER.size, 0) != INDEX_HEADER.pack(INDEX_MAGIC, self.ino):
            return 0, 0
        count = (index_size - INDEX_HEADER.size) // ENTRY_BYTES
        if count and self._line_end(0, size) is None:
            return 0, 0
        for dropped in range(min(count, MAX_STALE_ENTRIES + 1)):
            end = self._line_end(count - 1 - dropped, size)
            if end is not None:
                return count - dropped, end
        return 0, 0

    def _line_end(self, entry: int, size: int) -> int | None:
        """Where the line of an index entry ends, if the entry matches a whole line of the file."""
        raw = os.pread(self.index_fd, ENTRY_BYTES, INDEX_HEADER.size + entry * ENTRY_BYTES)
        if len(raw) != ENTRY_BYTES:
            return None
        offset = int.from_bytes(raw[KEY_BYTES:], "little")
        if offset >= size:
            return None
        if offset and os.pread(self.fd, 1, offset - 1) != b"\n":
            return None
        line = self.line_at(offset)
        call_id = _line_id(line) if line is not None else None
        if line is None or call_id is None or _key(call_id) != raw[:KEY_BYTES]:
            return None
        return offset + len(line) + 1

    def _index_lines(self, start: int, end: int) -> int:
        """Add entries for the complete lines in [start, end); returns how many lines were indexed."""
        count = 0
        carry = b""
        pos = start
        while pos < end:
            chunk = os.pread(self.fd, min(INDEX_CHUNK_BYTES, end - pos), pos)
            if not chunk:
                break
            offset = pos - len(carry)
            pos += len(chunk)
            lines = (carry + chunk).split(b"\n")
            carry = lines.pop()  # no newline yet: incomplete
            entries = bytearray()
            for line in lines:
                call_id = _line_id(line) if line else None
                if call_id is not None:
                    entries += _key(call_id) + offset.to_bytes(8, "little")
                    count += 1
                elif line:
                    log.warning("skipping unreadable record", extra={"file": str(self.path), "offset": offset})
                offset += len(line) + 1
            self.add_entries(bytes(entries))
        return count

    def _map(self) -> None:
        if self._mapped is not None:
            self._mapped.close()
        self._mapped = mmap.mmap(self.index_fd, 0, prot=mmap.PROT_READ)
        self._added = bytearray()

    def add_entries(self, entries: bytes) -> None:
        """Index lines just written. A failed index write loses nothing: the next start indexes those lines."""
        self._added += entries
        if self._index_behind:
            return
        try:
            _write_all(self.index_fd, entries)
        except OSError as exc:
            self._index_behind = True
            log.error("records index not written; the next start indexes the rest",
                      extra={"file": str(self.path), "error": str(exc)})
            return
        if len(self._added) > REMAP_BYTES:
            self._map()

    def offsets(self, call_id: str) -> Iterator[int]:
        """Offsets of the lines indexed under call_id's key, newest first."""
        key = _key(call_id)
        yield from _matches(self._added, key, 0)
        if self._mapped is not None:
            yield from _matches(self._mapped, key, INDEX_HEADER.size)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def entries(self) -> int:
        mapped = len(self._mapped) - INDEX_HEADER.size if self._mapped is not None else 0
        return (mapped + len(self._added)) // ENTRY_BYTES

    def line_at(self, offset: int) -> bytes | None:
        """The line starting at offset (without its newline), or None if it is not complete."""
        data = b""
        while True:
            chunk = os.pread(self.fd, max(4096, len(data)), offset + len(data))
            if not chunk:
                return None
            end = chunk.find(b"\n")
            if end >= 0:
                return data + chunk[:end]
            data += chunk

    def lines_backwards(self) -> Iterator[tuple[int, bytes]]:
        """(offset, line) of the complete, non-empty lines, newest first."""
        pos = self.size()
        carry: bytes | None = None  # the end of a line begun in an earlier chunk; None: after the last newline
        while pos > 0:
            step = min(READ_CHUNK_BYTES, pos)
            pos -= step
            parts = os.pread(self.fd, step, pos).split(b"\n")
            if len(parts) == 1:
                carry = parts[0] + carry if carry is not None else None
                continue
            lines = parts[1:-1] if carry is None else [*parts[1:-1], parts[-1] + carry]
            carry = parts[0]
            offset = pos + len(carry) + 1
            found = []
            for line in lines:
                found.append((offset, line))
                offset += len(line) + 1
            yield from ((start, line) for start, line in reversed(found) if line)
        if carry:
            yield 0, carry

    def append(self, items: list[tuple[str, bytes]]) -> None:
        """Append whole lines and index them; OSError (e.g. a full disk) leaves the file as it was."""
        start = os.fstat(self.fd).st_size
        _write_all(self.fd, b"".join(line for _, line in items))
        entries = bytearray()
        offset = start
        for call_id, line in items:
            entries += _key(call_id) + offset.to_bytes(8, "little")
            offset += len(line)
        self.add_entries(bytes(entries))

    def move_to(self, path: Path) -> None:
        os.replace(self.path, path)
        os.replace(_index_path(self.path), _index_path(path))
        self.path = path

    def settle(self) -> None:
        """No more lines will come: map the whole index, freeing the entries held in memory."""
        if not self._index_behind:
            self._map()

    def dup_fd(self) -> int:
        """A descriptor of the records file for the syncer (the index needs no flush: it is checked and
        completed from the records at start)."""
        return os.dup(self.fd)

    def close(self) -> None:
        if self._mapped is not None:
            self._mapped.close()
            self._mapped = None
        os.close(self.fd)
        os.close(self.index_fd)


class RecordStore:
    """The records files of one daemon: appended on the loop, flushed by a thread, read back by id or newest
    first. `keep` bounds both the parsed results held in memory and how far back recent() looks."""

    def __init__(self, path: Path, max_bytes: int, keep: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self._cache: OrderedDict[str, Result] = OrderedDict()  # parsed results, least recently used first
        self._pending: list[Result] = []
        # encode_result() of pending results, by call id, when the caller had it (with the result it encodes)
        self._encoded: dict[str, tuple[Result, bytes]] = {}
        self._damaged: set[tuple[int, int]] = set()  # (inode, offset) of unreadable lines already logged
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in (self._fresh_path, _index_path(self._fresh_path)):  # a crash in the middle of a rotation
            stale.unlink(missing_ok=True)
        began = time.monotonic()
        self._rotated = _Segment.open(self._rotated_path, create=False)
        current = _Segment.open(path, create=True)
        assert current is not None  # created
        self._current = current
        self._log_opened(time.monotonic() - began)
        self._lock = threading.Lock()  # guards _current and _flush, which the syncer reads
        self._flush: list[int] = []  # descriptors of rotated files, flushed once by the syncer, then closed
        self._dirty = threading.Event()
        self._closing = threading.Event()
        self._syncer = threading.Thread(target=self._sync_loop, name="records-sync", daemon=True)
        self._syncer.start()

    @property
    def _rotated_path(self) -> Path:
        return self.path.with_name(self.path.name + ".1")

    @property
    def _fresh_path(self) -> Path:
        """Where the next file is made, complete with its index, before rotation renames it into place."""
        return self.path.with_name(self.path.name + ".new")

    def _segments(self) -> list[_Segment]:
        """Newest first."""
        return [self._current] if self._rotated is None else [self._current, self._rotated]

    def _log_opened(self, seconds: float) -> None:
        segments = self._segments()
        log.info("records opened", extra={
            "file": str(self.path),
            "bytes": sum(s.size() for s in segments),
            "records_indexed": sum(s.entries() for s in segments),
            "indexed_at_open": sum(s.indexed_at_open for s in segments),
            "seconds": round(seconds, 4),
        })

    def _remember(self, result: Result) -> None:
        self._cache[result.call_id] = result
        self._cache.move_to_end(result.call_id)
        while len(self._cache) > self.keep:
            self._cache.popitem(last=False)

    def append(self, result: Result, encoded: bytes | None = None) -> None:
        """Take a finished call's result: listed at once, its line written by the next write_pending().
        `encoded`: encode_result(result), when the caller made it already (the reaper, for the result label)."""
        self._pending.append(result)
        if encoded is not None:
            self._encoded[result.call_id] = (result, encoded)
        self._remember(result)

    def write_pending(self) -> None:
        """Write the lines of the results appended since the last call, rotating the file where a line would
        take it beyond max_bytes. On OSError the lines not written stay pending."""
        while self._pending:
            size = self._current.size()
            items: list[tuple[str, bytes]] = []
            total = 0
            for result in self._pending:
                known = self._encoded.get(result.call_id)
                line = (known[1] if known is not None and known[0] is result else encode_result(result)) + b"\n"
                if size + total + len(line) > self.max_bytes and size + total > 0:
                    break
                items.append((result.call_id, line))
                total += len(line)
            if not items:
                self._rotate()
                continue
            self._current.append(items)
            if not self._dirty.is_set():  # set() takes the event's lock and notifies, even when it is set
                self._dirty.set()
            for result in self._pending[: len(items)]:
                known = self._encoded.get(result.call_id)
                if known is not None and known[0] is result:
                    del self._encoded[result.call_id]
            del self._pending[: len(items)]

    def _sync_loop(self) -> None:
        while True:
            self._dirty.wait()
            # Group commit: one flush per interval, and one wakeup of this thread, whose GIL hand-offs
            # otherwise land in the middle of the next request on the event loop.
            self._closing.wait(SYNC_INTERVAL_SECONDS)
            self._dirty.clear()
            with self._lock:  # only long enough to take copies: the loop never waits for a flush
                fds, self._flush = self._flush, []
                try:
                    fds.append(self._current.dup_fd())
                except OSError as exc:  # out of descriptors: the next round tries again
                    log.error("records not flushed", extra={"file": str(self.path), "error": str(exc)})
                    self._dirty.set()
            self._flush_and_close(fds)
            if self._closing.is_set():
                return

    def _flush_and_close(self, fds: list[int]) -> None:
        for fd in fds:
            try:
                os.fdatasync(fd)
            except OSError as exc:
                log.error("records not flushed", extra={"file": str(self.path), "error": str(exc)})
            finally:
                os.close(fd)

    def _rotate(self) -> None:
        """The current file becomes <path>.1 (the previous .1 is dropped) and an empty one takes its place.
        Nothing is flushed here: the syncer flushes the old file's last lines within SYNC_INTERVAL_SECONDS."""
        fresh = _Segment.open(self._fresh_path, create=True, truncate=True)
        assert fresh is not None  # created
        retired = self._current
        try:
            retired.move_to(self._rotated_path)
            fresh.move_to(self.path)
        except OSError:
            fresh.close()
            raise
        with self._lock:
            self._current = fresh
            self._flush.append(retired.dup_fd())
        self._dirty.set()
        dropped, self._rotated = self._rotated, retired
        retired.settle()
        if dropped is not None:
            dropped.close()
        log.info("records rotated", extra={"file": str(self.path), "rotated_bytes": retired.size(),
                                           "rotated_records": retired.entries()})

    def get(self, call_id: str) -> Result | None:
        """The record of call_id, from any file still kept: from memory, else one index scan per file and a
        read of the matching line (bounded: no file is read through)."""
        cached = self._cache.get(call_id)
        if cached is not None:
            return cached
        unwritten = [r for r in self._pending if r.call_id == call_id]  # e.g. a full disk, a long while
        if unwritten:
            return unwritten[-1]
        for segment in self._segments():
            for offset in segment.offsets(call_id):
                line = segment.line_at(offset)
                found = self._parse(segment, offset, line) if line is not None else None
                if found is not None and found.call_id == call_id:
                    self._remember(found)
                    return found
        return None

    def recent(self, session_id: str | None, limit: int) -> list[Result]:
        """Newest first, among the newest `keep` records (pending ones, then the files read backwards)."""
        out: list[Result] = []
        seen: set[str] = set()
        for result in self._newest(session_id):
            if len(out) >= limit:
                break
            if result.call_id not in seen and (session_id is None or result.session_id == session_id):
                seen.add(result.call_id)
                out.append(result)
        return out

    def _newest(self, session_id: str | None) -> Iterator[Result]:
        """The newest `keep` records, newest first; lines that cannot be of session_id are not parsed."""
        examined = 0
        for unwritten in reversed(self._pending):
            examined += 1
            yield unwritten
        needles = _session_needles(session_id)
        for segment in self._segments():
            for offset, line in segment.lines_backwards():
                if examined >= self.keep:
                    return
                examined += 1
                if needles and not any(needle in line for needle in needles):
                    continue
                result = self._read(segment, offset, line)
                if result is not None:
                    yield result

    def _read(self, segment: _Segment, offset: int, line: bytes) -> Result | None:
        call_id = _line_id(line)
        cached = self._cache.get(call_id) if call_id is not None else None
        if cached is not None:
            return cached
        result = self._parse(segment, offset, line)
        if result is not None:
            self._remember(result)
        return result

    def _parse(self, segment: _Segment, offset: int, line: bytes) -> Result | None:
        try:
            return Result.from_json(json.loads(line))
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            where = (segment.ino, offset)
            if where not in self._damaged:
                if len(self._damaged) >= MAX_DAMAGED_REMEMBERED:
                    self._damaged.clear()
                self._damaged.add(where)
                log.warning("skipping unreadable record",
                            extra={"file": str(segment.path), "offset": offset, "error": str(exc)})
            return None

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
        self._flush_and_close([self._current.dup_fd(), *self._flush])
        self._flush = []
        for segment in self._segments():
            segment.close()


def _session_needles(session_id: str | None) -> tuple[bytes, ...]:
    """Byte strings one of which a line of that session contains (as JSON writes it, escaped or not): lines
    without are skipped unparsed."""
    if session_id is None:
        return ()
    return (json.dumps(session_id).encode(), json.dumps(session_id, ensure_ascii=False).encode())
