"""Housekeeping: the work answers do not wait for. A finished call's record line, then its rmdir, its metrics
(finish listeners) and new spare cgroups for its session, batched and run right after answers.

The cgroup outlives its record line: a daemon that dies in between finds a labelled, empty cgroup (with its
result label) on its next start and records or removes it. While the records file cannot be written (a full
disk) finished calls keep their cgroups and are retried every RECORDS_RETRY_SECONDS: nothing removed, nothing
lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agentd.core.network import NetworkIntent
from agentd.core.records import RecordStore
from agentd.core.registry import Registry
from agentd.core.results import Result
from agentd.core.spares import Spares
from agentd.core.toolcalls import ToolCall
from agentd.core.tracking import Tracking
from agentd.kernel import cgroupfs
from agentd.kernel.bpf.lifecycle import ProcessCounters
from agentd.kernel.watch import Watcher

log = logging.getLogger(__name__)

# Work the answers do not wait for runs at most this long after them, batched with the work of other answers.
HOUSEKEEPING_DELAY_SECONDS = 0.005
RECORDS_RETRY_SECONDS = 1.0
# A cgroup that refused rmdir (a straggler raced in) is killed and retried this often, this many times.
REMOVE_RETRY_SECONDS = 0.05
REMOVE_ATTEMPTS = 100

FinishListener = Callable[[Result], None]
Retiring = tuple[ToolCall, Result, ProcessCounters | None]  # finalised, its record and rmdir to come


@dataclass(eq=False)
class Housekeeping:
    loop: asyncio.AbstractEventLoop
    registry: Registry
    records: RecordStore
    watcher: Watcher
    tracking: Tracking
    network: NetworkIntent
    spares: Spares
    on_finish: list[FinishListener] = field(default_factory=list)
    _retiring: list[Retiring] = field(default_factory=list, init=False, repr=False)
    _timer: asyncio.TimerHandle | None = field(default=None, init=False, repr=False)
    _removing: set[asyncio.Task[None]] = field(default_factory=set, init=False, repr=False)

    def retire_later(self, call: ToolCall, result: Result, counters: ProcessCounters | None) -> None:
        self._retiring.append((call, result, counters))
        self.arm()

    def arm(self) -> None:
        if self._timer is None:
            self._timer = self.loop.call_later(HOUSEKEEPING_DELAY_SECONDS, self.run)

    def run(self) -> None:
        """Runs by itself shortly after answers; the API runs it earlier when it knows a client is busy (it
        just got its result)."""
        if self._timer is not None:
            self.flush()

    def flush(self) -> None:
        """Run now, whether or not anything armed it."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._retire()
        self.spares.top_up(self.registry.sessions)

    def release(self, call: ToolCall, counters: ProcessCounters | None) -> None:
        """Stop watching and tracking the call (`counters`: its last process counters, for the session)."""
        if call.events_fd is not None:
            self.watcher.unwatch(call.events_fd)
            call.events_fd = None
        self.network.release(call)
        self.tracking.remove_call(call, counters)

    def _retire(self) -> None:
        retiring, self._retiring = self._retiring, []
        self.tracking.drain()  # keeps the ring buffer's batches small
        for call, _result, counters in retiring:
            self.release(call, counters)
        try:
            self.records.write_pending()
        except OSError as exc:
            log.error("records not written; retrying", extra={"file": str(self.records.path), "error": str(exc),
                                                             "calls": len(retiring)})
            self._retiring[:0] = retiring
            self.loop.call_later(RECORDS_RETRY_SECONDS, self.arm)
            return
        for call, result, _counters in retiring:
            self.remove(call.path)
            for listener in self.on_finish:
                try:
                    listener(result)
                except Exception:  # a bug there must not keep the other calls' cgroups
                    log.exception("finish listener failed", extra={"call": call.id})

    def remove(self, path: Path) -> None:
        """rmdir a cgroup now, or kill what raced into it and retry in the background (never on the loop)."""
        try:
            if cgroupfs.remove(path):
                return
        except cgroupfs.CgroupError as exc:
            log.error("cgroup not removed", extra={"cgroup": str(path), "error": str(exc)})
            return
        task = self.loop.create_task(self._remove_later(path))
        self._removing.add(task)
        task.add_done_callback(self._removing.discard)

    async def _remove_later(self, path: Path) -> None:
        for attempt in range(REMOVE_ATTEMPTS):
            with contextlib.suppress(cgroupfs.CgroupError):
                cgroupfs.kill(path)
            await asyncio.sleep(REMOVE_RETRY_SECONDS)
            if cgroupfs.remove(path) or not path.exists():
                log.info("straggler cgroup removed", extra={"cgroup": str(path), "attempts": attempt + 1})
                return
        log.error("cgroup could not be removed", extra={"cgroup": str(path), "attempts": REMOVE_ATTEMPTS})

    def close(self) -> None:
        """Write what is pending (at shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._retire()
        for task in self._removing:
            task.cancel()
