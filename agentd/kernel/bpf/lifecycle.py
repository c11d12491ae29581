"""Process lifecycle (fork, exec, exit) of managed cgroups, reported by bpf/lifecycle.bpf.c.

The kernel side drops events of cgroups not added with add_cgroup(). Execs in AGENT_LEAF cgroups and exits
in TOOL_CALL cgroups are reported as events; forks (new processes, not threads), execs in tool calls and exits
in agent leaves are only counted (nobody reads them). Exits are thread-group leaders' (a leader that ends
with pthread_exit while other threads run is reported then). Exec events carry what a capture
rule needs: the new comm, the exec'd filename, the start of argv and the parent's pid and comm. Timestamps
are CLOCK_MONOTONIC ns (time.monotonic_ns()).

Wakeups: only an exec in an AGENT_LEAF cgroup of a file whose basename was given to set_wake_names()
makes epoll_fd() readable at once (until it is first called, every exec in an AGENT_LEAF does). Other
events, other execs in agent leaves included, are batched, since a wakeup costs more than the tracing
itself: they make it readable once 64 KiB are pending, and otherwise wait for the next consume(). The
kernel compares the first 15 bytes of the basename (WAKE_NAME_LEN - 1), so a longer basename also wakes
when a name sharing those was given: a spurious wakeup at worst, never a missed one. Every event is in
the buffer before the process that caused it moves on (a parent's wait() for an exit returns after the
exit event, and so does a cgroup becoming unpopulated), so call consume() before acting on such a state
change.

The `managed` map holds at most MANAGED_MAX_ENTRIES cgroups (bpf/lifecycle.bpf.c; managed_use() reads the
loaded map's capacity); add_cgroup() beyond that raises BpfError with errno E2BIG.
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from agentd.kernel.bpf import object_path
from agentd.kernel.bpf.libbpf import BpfObject, Closing

_PROGRAMS = ("on_fork", "on_exec", "on_exit")
_KEY = struct.Struct("<Q")  # cgroup id
_MANAGED = struct.Struct("<I4xQQQ")  # struct managed_cgroup: flags, forks, execs, exits
_LOST = struct.Struct("<Q")
_HEADER = struct.Struct("<B3xIQQIIII16s16s")  # struct event
_EXEC = struct.Struct("<I4x256s256s")  # rest of struct exec_event: args_size, filename, args
WAKE_NAME_LEN = 16  # key of wake_names: up to 15 bytes of a basename, zero padded
_WAKE_NAMES_MAX = 1024  # max_entries of wake_names


class EventType(enum.IntEnum):
    EXEC = 2
    EXIT = 3


class CgroupKind(enum.IntFlag):
    AGENT_LEAF = 1  # execs here are reported; those of set_wake_names() basenames wake the consumer at once
    TOOL_CALL = 2  # exits here are reported


# Enum(value) and Enum.MEMBER are slow and this is the hot path (several events per tool call): looked up once.
_TYPES = {int(kind): kind for kind in EventType}
_KINDS = {int(kind): kind for kind in CgroupKind}
_EXEC_EVENT, _EXIT_EVENT = EventType.EXEC, EventType.EXIT


class ProcessCounters(NamedTuple):
    forks: int
    execs: int
    exits: int


@dataclass(frozen=True, slots=True)
class ProcessEvent:
    type: EventType
    timestamp_ns: int
    cgroup_id: int
    cgroup_kind: CgroupKind
    pid: int
    tgid: int
    ppid: int  # the parent process (real_parent's tgid)
    comm: str  # EXEC: the new comm
    parent_comm: str
    wait_status: int = 0  # EXIT: the kernel's exit_code, a wait(2) status
    filename: str = ""  # EXEC: the path given to execve
    argv: tuple[str, ...] = ()  # EXEC: the first 256 bytes of argv
    argv_truncated: bool = False

    @property
    def exit_code(self) -> int | None:
        """EXIT by exit(2): the status; otherwise None."""
        if self.type is EventType.EXIT and os.WIFEXITED(self.wait_status):
            return os.WEXITSTATUS(self.wait_status)
        return None

    @property
    def signal(self) -> int | None:
        """EXIT by a signal: its number; otherwise None."""
        if self.type is EventType.EXIT and os.WIFSIGNALED(self.wait_status):
            return os.WTERMSIG(self.wait_status)
        return None


def decode_event(record: bytes) -> ProcessEvent:
    """Decode one ring buffer record (struct event, or struct exec_event for EXEC)."""
    kind, flags, ts_ns, cgroup_id, pid, tgid, ppid, status, comm, parent_comm = _HEADER.unpack_from(record)
    event_type = _TYPES.get(kind) or EventType(kind)
    cgroup_kind = _KINDS.get(flags) or CgroupKind(flags)
    if event_type is not _EXEC_EVENT:
        return ProcessEvent(
            event_type, ts_ns, cgroup_id, cgroup_kind, pid, tgid, ppid, _text(comm), _text(parent_comm),
            wait_status=status if event_type is _EXIT_EVENT else 0,
        )
    args_size, filename, args = _EXEC.unpack_from(record, _HEADER.size)
    argv = args[: min(args_size, len(args))].split(b"\0")
    if argv and not argv[-1]:
        argv.pop()  # the terminating NUL of the last argument
    return ProcessEvent(
        event_type, ts_ns, cgroup_id, cgroup_kind, pid, tgid, ppid, _text(comm), _text(parent_comm),
        filename=_text(filename),
        argv=tuple(arg.decode(errors="replace") for arg in argv),
        argv_truncated=args_size > len(args),
    )


class LifecycleTracker(Closing):
    """Loads bpf/lifecycle.bpf.o, attaches its tracepoints and consumes its events. Register epoll_fd()
    with the event loop and call consume() when it is readable. BpfError if the object is missing or does
    not load."""

    def __init__(self, path: Path | None = None) -> None:
        self._obj = BpfObject(path or object_path("lifecycle"))
        self._pending: list[ProcessEvent] = []
        self._managed_ids: set[int] = set()  # the keys of `managed`: this object is its only writer
        self._wake_keys: set[bytes] = set()
        try:
            self._managed = self._obj.map("managed", _KEY.size, _MANAGED.size)
            self._wake_names = self._obj.map("wake_names", WAKE_NAME_LEN, 1)
            self._wake_filter = self._obj.map("wake_filter", 4, 4)
            self._lost = self._obj.map("lost_events", 4, _LOST.size)
            self._ring = self._obj.ring_buffer("events", self._on_record)
            for program in _PROGRAMS:
                self._obj.attach(program)
        except BaseException:
            self._obj.close()
            raise

    def add_cgroup(self, cgroup_id: int, kind: CgroupKind) -> None:
        """Report this cgroup's processes from now on (its counters start at zero)."""
        self._managed.update(_KEY.pack(cgroup_id), _MANAGED.pack(kind, 0, 0, 0))
        self._managed_ids.add(cgroup_id)

    def remove_cgroup(self, cgroup_id: int) -> bool:
        """Stop reporting the cgroup and drop its counters; False if it was not managed."""
        self._managed_ids.discard(cgroup_id)
        return self._managed.delete(_KEY.pack(cgroup_id))

    def managed_use(self) -> tuple[int, int]:
        """Entries in the `managed` map, and its capacity."""
        return len(self._managed_ids), self._managed.max_entries

    def set_wake_names(self, names: Iterable[str]) -> None:
        """From now on, an exec in an agent leaf wakes the consumer at once only when the basename of the
        exec'd file is one of names (compared on their first WAKE_NAME_LEN - 1 bytes); replaces the previous names.
        ValueError beyond 1024 distinct keys (nothing changed then)."""
        keys = {wake_name_key(name) for name in names}
        if len(keys) > _WAKE_NAMES_MAX:
            raise ValueError(f"{len(keys)} wake names, at most {_WAKE_NAMES_MAX}")
        for key in self._wake_keys - keys:
            self._wake_names.delete(key)
        for key in keys - self._wake_keys:
            self._wake_names.update(key, b"\1")
        self._wake_keys = keys
        self._wake_filter.update(bytes(4), struct.pack("<I", 1))

    def counters(self, cgroup_id: int) -> ProcessCounters | None:
        """Forks, execs and exits seen in a managed cgroup since add_cgroup(); None if not managed."""
        value = self._managed.lookup(_KEY.pack(cgroup_id))
        return None if value is None else ProcessCounters(*_MANAGED.unpack(value)[1:])

    def all_counters(self) -> dict[int, ProcessCounters]:
        """counters() of every managed cgroup, by cgroup id."""
        return {
            _KEY.unpack(key)[0]: ProcessCounters(*_MANAGED.unpack(value)[1:])
            for key, value in self._managed.items()
        }

    def lost(self) -> int:
        """Events dropped because the ring buffer was full (the counters still include them)."""
        value = self._lost.lookup(bytes(4))
        return _LOST.unpack(value)[0] if value is not None else 0

    def epoll_fd(self) -> int:
        """Readable when an exec in an agent leaf of a set_wake_names() basename, or a 64 KiB backlog of
        events, is waiting."""
        return self._ring.epoll_fd()

    def consume(self) -> list[ProcessEvent]:
        """The events waiting now, oldest first; never blocks."""
        self._ring.consume()
        events, self._pending = self._pending, []
        return events

    def close(self) -> None:
        """Detach the programs and free everything. Idempotent."""
        self._obj.close()

    def _on_record(self, record: bytes) -> None:
        self._pending.append(decode_event(record))


def wake_name_key(name: str) -> bytes:
    """The wake_names key of a basename: its first WAKE_NAME_LEN - 1 bytes, zero padded (as the kernel
    side reads it, NUL-terminated)."""
    return os.fsencode(name)[: WAKE_NAME_LEN - 1].ljust(WAKE_NAME_LEN, b"\0")


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")
