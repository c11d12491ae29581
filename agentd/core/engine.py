"""The engine: wires the parts of the core together and is the one face the API sees.

Every state change happens on the asyncio loop thread. Where each job lives:

    registry.py      what is live: sessions, calls, tokens; lookups scoped to a caller
    session_ops.py   sessions: create, place the agent, delete, adopt
    begin.py         a call is born: intent -> limits -> labelled cgroup; held, joined or captured process
    placement.py     a process placed into a call (checked against the call's session)
    running.py       the state machine: cgroup.events, timers, kills
    control.py       end, wait, kill, freeze/thaw, update limits (from the API)
    reap.py          a call ends: accounting -> result -> answer
    housekeeping.py  after the answer: record line, rmdir, metrics, spare cgroups
    reconcile.py     at start: adopt, record or remove what a previous daemon left
"""

from __future__ import annotations

import asyncio
import logging

from agentd.core.begin import Births, Held
from agentd.core.config import Config
from agentd.core.control import Control
from agentd.core.housekeeping import Housekeeping
from agentd.core.intents import Intent, Limits
from agentd.core.network import NetworkIntent
from agentd.core.placement import Placement
from agentd.core.programs import Programs
from agentd.core.reap import Reaper
from agentd.core.records import RecordStore
from agentd.core.registry import Registry
from agentd.core.results import ExitStatus, Result
from agentd.core.running import Running
from agentd.core.session_ops import SessionOps
from agentd.core.sessions import Session, SessionSpec
from agentd.core.spares import Spares
from agentd.core.toolcalls import ToolCall
from agentd.core.tracking import Tracking
from agentd.core.tree import Tree
from agentd.kernel.capabilities import Capabilities
from agentd.kernel.watch import Watcher

log = logging.getLogger(__name__)


class Engine:
    def __init__(
        self,
        config: Config,
        tree: Tree,
        caps: Capabilities,
        records: RecordStore,
        watcher: Watcher,
        loop: asyncio.AbstractEventLoop,
        programs: Programs,
    ) -> None:
        self.config = config
        self.tree = tree
        self.caps = caps
        self.records = records
        self.watcher = watcher
        self.loop = loop
        self.registry = Registry(records)
        self.spares = Spares()
        self.tracking = Tracking(programs.lifecycle, loop)
        self.network = NetworkIntent(programs.network, config.network_none_allows_loopback)
        self.housekeeping = Housekeeping(loop, self.registry, records, watcher, self.tracking, self.network,
                                         self.spares)
        self.reaper = Reaper(caps, self.registry, records, self.tracking, self.network, self.housekeeping)
        self.running = Running(loop, config, self.registry, watcher, self.tracking, self.reaper)
        self.placement = Placement(config, tree, self.registry, self.running)
        self.births = Births(config, tree, caps, self.registry, self.spares, self.tracking, self.network,
                             self.running, self.placement, self.housekeeping)
        self.control = Control(config, caps, self.registry, self.running, self.reaper)
        self.session_ops = SessionOps(config, tree, caps, self.registry, watcher, self.tracking, self.spares,
                                      self.running, self.housekeeping)
        self.on_begin = self.births.on_begin
        self.on_begin.append(self.reaper.oom_witness.began)
        self.on_finish = self.housekeeping.on_finish

    @property
    def sessions(self) -> dict[str, Session]:
        return self.registry.sessions

    @property
    def calls(self) -> dict[str, ToolCall]:
        return self.registry.calls

    # ----- sessions -----

    def create_session(self, spec: SessionSpec) -> tuple[Session, str]:
        return self.session_ops.create(spec)

    async def delete_session(self, session_id: str, force: bool) -> list[Result]:
        return await self.session_ops.delete(session_id, force)

    def place_agent(self, session_id: str, pid: int, include_descendants: bool) -> list[int]:
        return self.session_ops.place_agent(session_id, pid, include_descendants)

    def session(self, session_id: str) -> Session:
        return self.registry.session(session_id)

    def session_for_token(self, token: str) -> Session:
        return self.registry.session_for_token(token)

    # ----- tool calls -----

    def begin_call(
        self, session: Session, intent: Intent, report_exit: bool, confined: bool, held: Held | None = None
    ) -> tuple[ToolCall, str]:
        """`intent` must have passed validate_intent (the API's check, made before admission)."""
        return self.births.begin(session, intent, report_exit, confined, held)

    def capture(self, session: Session, pid: int, intent: Intent, rule: str, exec_ns: int) -> ToolCall | None:
        return self.births.capture(session, pid, intent, rule, exec_ns)

    def join(self, token: str, sender: int, target: int | None = None) -> ToolCall:
        return self.placement.join(token, sender, target)

    def lookup(self, call_id: str, scope: Session | None) -> ToolCall | Result:
        return self.registry.lookup(call_id, scope)

    def active(self, call_id: str, scope: Session | None) -> ToolCall:
        return self.registry.active(call_id, scope)

    async def end_call(self, call_id: str, scope: Session | None, exit_status: ExitStatus | None) -> Result:
        return await self.control.end(call_id, scope, exit_status)

    async def wait_call(self, call_id: str, scope: Session | None, timeout: float) -> Result:
        return await self.control.wait(call_id, scope, timeout)

    async def kill_call(self, call_id: str, reason: str) -> Result:
        return await self.control.kill(call_id, reason)

    async def freeze_call(self, call_id: str, on: bool) -> ToolCall:
        return await self.control.freeze(call_id, on)

    def update_call(
        self, call_id: str, scope: Session | None, memory_high: int, memory_max: int, cpu_max: int, pids_max: int
    ) -> Limits:
        return self.control.update(call_id, scope, memory_high, memory_max, cpu_max, pids_max)

    def housekeeping_now(self) -> None:
        """A client is busy with its answer: a good moment for the deferred work."""
        self.housekeeping.run()

    # ----- shutdown -----

    def close(self) -> None:
        """Stop watching; running calls and sessions stay in the kernel for the next start to adopt."""
        self.housekeeping.close()
        self.spares.close()
        self.tracking.close()
        for call in self.registry.calls.values():
            call.cancel_timers()
            if call.events_fd is not None:
                self.watcher.unwatch(call.events_fd)
                call.events_fd = None
            if call.done is not None and not call.done.done():
                call.done.cancel()
        self.running.deadlines.close()
        self.records.close()
