"""Reading a pressure domain for the ladder: the kernel's numbers (usage, PSI stall, memory.events.local) and
the core's calls, turned into the immutable snapshots of model.py. Reads only; no decision here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from agentd.core.config import Config
from agentd.core.intents import class_bytes
from agentd.core.sessions import Priority, Session
from agentd.core.toolcalls import CallState, ToolCall
from agentd.kernel import cgroupfs, psi
from agentd.policy.model import CallView, DomainState, MemoryEvents, SessionPressure

log = logging.getLogger(__name__)

SESSIONS_DOMAIN = "sessions"
# A task the kernel throttled at memory.high sleeps up to 2 s per penalty (MEMCG_MAX_HIGH_DELAY_JIFFIES), stalling
# on, after memory.high was raised: this long after the ladder lets go of a session, its stall is that echo.
RELEASE_ECHO_SECONDS = 2.0


def session_domain(session_id: str) -> str:
    return f"session:{session_id}"


@dataclass(eq=False)
class StallMeter:
    """PSI 'some' memory stall in % between two readings of a cgroup's cumulative counter (read once per decision
    time: a cgroup in two domains gets the same value)."""

    enabled: bool
    files: cgroupfs.KeptFiles = cgroupfs.UNKEPT
    _last: dict[Path, tuple[float, int, float]] = field(default_factory=dict)  # time, total µs, pct
    _muted: dict[Path, float] = field(default_factory=dict)  # until when a cgroup's stall is not reported

    def read(self, path: Path, now: float) -> float | None:
        if not self.enabled:
            return None
        last = self._last.get(path)
        if last is not None and last[0] == now:
            return None if self._is_muted(path, now) else last[2]
        total = psi.some_stall_us(path, files=self.files)
        if total is None:
            return None
        pct = 0.0 if last is None or now <= last[0] else min(100.0, (total - last[1]) / ((now - last[0]) * 1e4))
        self._last[path] = (now, total, pct)  # read while muted too: the first reading after covers only after
        return None if self._is_muted(path, now) else pct

    def mute(self, path: Path, until: float) -> None:
        """Report no stall for this cgroup until then (its stall is known not to be pressure)."""
        self._muted[path] = until

    def _is_muted(self, path: Path, now: float) -> bool:
        until = self._muted.get(path)
        if until is not None and now >= until:
            del self._muted[path]
            return False
        return until is not None

    def last(self, path: Path) -> float | None:
        """The last reading's stall, without reading."""
        last = self._last.get(path)
        return last[2] if last is not None and self.enabled else None

    def forget(self, path: Path) -> None:
        self._last.pop(path, None)
        self._muted.pop(path, None)


@dataclass(eq=False)
class EventsMeter:
    """The rise of a cgroup's memory.events counters since the previous reading: `memory.events.local` (a domain's
    own: a call at its own memory.high is no pressure on the domain) or `memory.events` (a session and its calls)."""

    file: str = "memory.events.local"
    files: cgroupfs.KeptFiles = cgroupfs.UNKEPT
    _last: dict[Path, dict[str, int]] = field(default_factory=dict)

    def read(self, path: Path) -> MemoryEvents:
        now = cgroupfs.parse_flat_keyed(self.files.read(path, self.file))
        last = self._last.get(path, now)
        self._last[path] = now

        def rise(key: str) -> int:
            return max(now.get(key, 0) - last.get(key, 0), 0)

        return MemoryEvents(high=rise("high"), max=rise("max"), oom=rise("oom"), oom_kill=rise("oom_kill"))

    def forget(self, path: Path) -> None:
        self._last.pop(path, None)


# A call whose memory.events `high` rose this recently still presses against its memory.high.
AT_HIGH_SECONDS = 1.0


@dataclass
class HighMeter:
    """When each call the ladder holds last hit its memory.high. Unlike EventsMeter's rise since the previous
    reading, the answer does not depend on who read last (admission and every domain build views)."""

    files: cgroupfs.KeptFiles = cgroupfs.UNKEPT
    _last: dict[str, tuple[int, float | None]] = field(default_factory=dict)

    def at_high(self, call: ToolCall, now: float) -> bool:
        count = cgroupfs.parse_flat_keyed(self.files.read(call.path, "memory.events")).get("high", 0)
        last_count, last_rise = self._last.get(call.id, (count, None))
        if count > last_count:
            last_rise = now
        self._last[call.id] = (count, last_rise)
        return last_rise is not None and now - last_rise <= AT_HIGH_SECONDS

    def retain(self, call_ids: set[str]) -> None:
        for call_id in set(self._last) - call_ids:
            del self._last[call_id]


def limit_above(path: Path, mount: Path, host_reserve: int, files: cgroupfs.KeptFiles = cgroupfs.UNKEPT) -> int:
    """The memory a cgroup can have: the smallest memory.max on it or above it inside the mount, or physical memory
    minus the host's reserve."""
    return smallest_limit(limit_chain(path, mount), host_reserve, files)


def limit_chain(path: Path, mount: Path) -> tuple[str, ...]:
    """The cgroup and its ancestors inside the mount: where a memory.max can bound it (walked once per domain)."""
    chain, here = [], path
    while here.is_relative_to(mount) and here != mount:
        chain.append(str(here))
        here = here.parent
    return tuple(chain)


def smallest_limit(chain: tuple[str, ...], host_reserve: int, files: cgroupfs.KeptFiles = cgroupfs.UNKEPT) -> int:
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") - host_reserve
    for cgroup in chain:
        text = files.read(cgroup, "memory.max")
        if text is not None and text.strip() != "max":
            limit = min(limit, int(text))
    return max(limit, 1)


def call_view(call: ToolCall, session: Session, config: Config, high_meter: HighMeter | None = None,
              now: float = 0.0, files: cgroupfs.KeptFiles = cgroupfs.UNKEPT) -> CallView | None:
    """A running call as the ladder sees it; None if it is not running (pending, finished) or gone. With a
    meter, whether it hit its memory.high lately."""
    if call.state not in (CallState.RUNNING, CallState.FROZEN):
        return None
    usage = cgroupfs.memory_current(call.path, files)
    if usage < 0:
        return None
    intent = call.intent
    return CallView(
        id=call.id,
        session_id=call.session_id,
        priority=session.spec.priority or Priority.NORMAL,
        usage=usage,
        expected=intent.expected_memory_bytes or class_bytes(intent.memory_class, config),
        memory_high=call.limits.memory_high,
        memory_max=call.limits.memory_max,
        frozen=(files.read(call.path, "cgroup.freeze") or "0").strip() == "1",
        at_high=high_meter.at_high(call, now) if high_meter is not None else False,
        peak=max(cgroupfs.memory_peak(call.path, files), 0),
    )


def domain_state(
    name: str, path: Path, limit: int, sessions: list[Session], stall: StallMeter, events: EventsMeter, now: float,
    own_limits: EventsMeter | None = None, files: cgroupfs.KeptFiles = cgroupfs.UNKEPT,
) -> DomainState:
    """The domain now. With `own_limits` (a meter of memory.events), a session whose calls hit their own
    memory.high since the previous reading stalls by its own limits, not from contention: its stall is muted for
    RELEASE_ECHO_SECONDS (the kernel's longest penalty sleep), and so is the domain's own, which includes it (the
    other sessions' stall still tells contention)."""
    if own_limits is not None:
        for session in sessions:
            if own_limits.read(session.path).high:
                stall.mute(session.path, now + RELEASE_ECHO_SECONDS)
                stall.mute(path, now + RELEASE_ECHO_SECONDS)
    return DomainState(
        name=name,
        limit=limit,
        usage=max(cgroupfs.memory_current(path, files), 0),
        stall_pct=stall.read(path, now),
        sessions=tuple(SessionPressure(s.id, s.spec.priority or Priority.NORMAL, stall.read(s.path, now))
                       for s in sessions),
        events=events.read(path),
    )
