"""The policy loop: wakes on the kernel's pressure signals, asks the ladder what to do, has it done.

Signals, event-driven through the core's one epoll (kernel/watch.py): a PSI trigger on the memory.pressure of
sessions/ and of every session (where the kernel has PSI), and memory.events.local of each pressure domain.
A signal runs a decision for every domain at once; while any domain is under pressure, or the ladder still
holds calls it must give back, a tick repeats it every `tick_seconds`. Between episodes a domain that runs tool
calls is watched: its memory.current is read every `watch_seconds` near the throttle reserve, less often further
from it (pace.py), a decision only when a reading comes near the reserve, and one at least every
WATCH_MAX_SECONDS. Otherwise nothing polls.

Pressure domains: sessions/ (every agent on the host; its limit is `sessions_memory_max`, or the smallest
memory.max above it, or physical memory minus `host_reserve`) and each session with a memory budget.
Decisions are ladder.decide() (pure); their actions are carried out by act.py. Admission of declared Begins
is admission.admit() against the same snapshots.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from agentd.core.engine import Engine
from agentd.core.errors import ResourceExhausted
from agentd.core.intents import Intent, derive_limits
from agentd.core.sessions import Priority, Session
from agentd.kernel import cgroupfs
from agentd.kernel.fault_rate import page_fault_rate, usable_cpus
from agentd.kernel.watch import reread
from agentd.policy import act
from agentd.policy.admission import AdmissionRequest, Verdict, admit
from agentd.policy.events import Hub, PolicyEvent
from agentd.policy.ladder import decide
from agentd.policy.model import Action, ActionKind, Assessment, CallView, LadderMemory
from agentd.policy.pace import Reading, max_growth, remember, watch_delay, watch_growth, watch_onset, watch_trips
from agentd.policy.reaction import ReactionClock
from agentd.policy.settings import PolicyConfig, reserve
from agentd.policy.snapshot import (
    RELEASE_ECHO_SECONDS,
    SESSIONS_DOMAIN,
    EventsMeter,
    HighMeter,
    StallMeter,
    call_view,
    domain_state,
    limit_above,
    limit_chain,
    session_domain,
    smallest_limit,
)

log = logging.getLogger(__name__)

# A queued Begin looks again at least this often (decisions also wake it): calls that end free memory silently.
ADMISSION_RECHECK_SECONDS = 0.1
# Between episodes no kernel signal says that a domain's headroom is shrinking towards the throttle reserve:
# cgroup v2 has no usage thresholds, and PSI reports stall only once the kernel reclaims, which for anonymous
# memory without swap starts at the limit itself, when only a kill is left. So a domain that runs calls is
# watched by reading its usage alone (watch_seconds), and fully decided on at least this often (growth samples,
# the band's timers):
WATCH_MAX_SECONDS = 1.0
ActionListener = Callable[[Action, float | None], None]  # the action, seconds since the pressure signal


@dataclass(frozen=True)
class DomainView:
    """A domain as the last decision saw it (GetStatus, GetSession, metrics)."""

    name: str
    limit: int
    usage: int
    headroom: int
    stall_pct: float | None
    level: str
    calls_held: int


@dataclass(eq=False)
class Domain:
    name: str
    path: Path
    limit: int
    session: Session | None  # None: sessions/
    memory: LadderMemory = field(default_factory=LadderMemory)
    last: Assessment | None = None
    events_fd: int | None = None
    psi_fd: int | None = None
    held: set[str] = field(default_factory=set)  # sessions the ladder held a call of at the previous decision
    announced: bool = False  # "pressure" was published and "clear" not yet
    watched: bool = False  # it runs calls and is not ticking: watched between decisions
    readings: tuple[Reading, ...] = ()  # the watch's and decisions' recent readings (pace.remember)
    limit_chain: tuple[str, ...] = ()  # sessions/: where a memory.max above it can bound it


@dataclass(eq=False)
class PolicyLoop:
    engine: Engine
    config: PolicyConfig
    hub: Hub = field(default_factory=Hub)
    on_action: list[ActionListener] = field(default_factory=list)
    domains: dict[str, Domain] = field(default_factory=dict)
    # The files each decision and look re-reads, kept open (swept after each decision): an open costs more than
    # the read, and under the emulator the loop's reads were most of agentd's CPU during an episode.
    _files: cgroupfs.KeptFiles = field(default_factory=cgroupfs.KeptFiles)
    _stall: StallMeter = field(init=False)
    _events: EventsMeter = field(init=False)
    _own_limits: EventsMeter = field(init=False)
    _at_high: HighMeter = field(init=False)
    _session_triggers: dict[str, int] = field(default_factory=dict)  # PSI trigger fds of sessions
    _tick: asyncio.TimerHandle | None = None
    _watch: asyncio.TimerHandle | None = None
    _scheduled: bool = False
    _signal_at: float | None = None  # the earliest pressure signal not yet acted on (monotonic)
    _decided_at: float | None = None  # the previous look at the domains, a decision or the watch's (monotonic)
    _reactions: ReactionClock = field(default_factory=ReactionClock)
    _max_growth: float = 0.0  # bytes/s: the watch's pace (pace.py)
    _decided: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._stall = StallMeter(self.engine.caps.psi_triggers, self._files)
        self._events = EventsMeter(files=self._files)
        self._own_limits = EventsMeter("memory.events", self._files)
        self._at_high = HighMeter(self._files)

    @property
    def signals(self) -> str:
        return "psi+memory.events" if self.engine.caps.psi_triggers else "memory.events"

    def start(self) -> None:
        engine, config = self.engine, self.config
        log.info("policy", extra={"enabled": config.enabled, "signals": self.signals,
                                  "memory_enforced": "memory" in engine.caps.enforced})
        if not config.enabled:
            return
        self._max_growth = self._growth_bound()
        sessions = engine.tree.sessions
        if config.sessions_memory_max and "memory" in engine.caps.enforced:
            cgroupfs.apply_knobs(sessions, {"memory.max": str(config.sessions_memory_max)}, engine.caps.enforced)
        limit = limit_above(sessions, engine.tree.mount, config.host_reserve)
        self._add_domain(Domain(SESSIONS_DOMAIN, sessions, limit, None))
        for session in engine.registry.sessions.values():
            self.session_added(session)
        engine.session_ops.on_created.append(self.session_added)
        engine.session_ops.on_deleted.append(self.session_removed)
        log.info("pressure domain", extra={"domain": SESSIONS_DOMAIN, "limit": limit,
                                           "sessions_memory_max": config.sessions_memory_max})
        self.wake("start")  # a first look: pressure may predate this start

    def _growth_bound(self) -> float:
        if self.config.watch_max_growth:
            log.info("policy watch pace", extra={"max_growth": self.config.watch_max_growth, "measured": False})
            return float(self.config.watch_max_growth)
        rate, cpus = page_fault_rate(), usable_cpus()
        bound = max_growth(rate, cpus)
        log.info("policy watch pace", extra={"max_growth": round(bound), "measured": True,
                                             "fault_rate": round(rate), "cpus": cpus})
        return bound

    def session_added(self, session: Session) -> None:
        if self.engine.caps.psi_triggers and session.spec.priority != Priority.LOW:
            fd = self._trigger(session.path, f"session:{session.id}")
            if fd is not None:
                self._session_triggers[session.id] = fd
        if session.spec.memory_budget:
            self._add_domain(Domain(session_domain(session.id), session.path, session.spec.memory_budget, session))
        self.wake("session")  # its agent and calls will use memory: the domains are watched from now on

    def session_removed(self, session: Session) -> None:
        fd = self._session_triggers.pop(session.id, None)
        if fd is not None:
            self.engine.watcher.unwatch(fd)
        domain = self.domains.pop(session_domain(session.id), None)
        if domain is not None:
            self._unwatch(domain)
        self._stall.forget(session.path)
        self._own_limits.forget(session.path)

    def _add_domain(self, domain: Domain) -> None:
        watcher = self.engine.watcher
        events = domain.path / "memory.events.local"
        if events.exists():
            domain.events_fd = watcher.watch(events, lambda fd: self._on_events(fd, domain.name))
        if self.engine.caps.psi_triggers:
            domain.psi_fd = self._trigger(domain.path, domain.name)
        self.domains[domain.name] = domain

    def _on_events(self, fd: int, name: str) -> None:
        reread(fd)  # re-arms the notification; unread, kernfs keeps the fd ready and epoll would spin
        self.wake(f"{name} memory.events")

    def _trigger(self, path: Path, name: str) -> int | None:
        trigger = f"some {self.config.psi_stall_us} {self.config.psi_window_us}"
        try:
            fd = cgroupfs.pressure_trigger(path, "memory", trigger)
        except cgroupfs.CgroupError as exc:
            log.error("PSI trigger not set", extra={"cgroup": str(path), "error": str(exc)})
            return None
        return self.engine.watcher.watch_fd(fd, lambda _fd: self.wake(f"{name} PSI"))

    def _unwatch(self, domain: Domain) -> None:
        for fd in (domain.events_fd, domain.psi_fd):
            if fd is not None:
                self.engine.watcher.unwatch(fd)
        self._events.forget(domain.path)
        self._stall.forget(domain.path)

    # ----- deciding -----

    def wake(self, source: str = "") -> None:
        """A pressure signal (or a change the ladder should see): decide for every domain, once, soon."""
        if self._signal_at is None:
            self._signal_at = time.monotonic()
        if not self._scheduled:
            log.debug("policy wake", extra={"source": source})
            self._scheduled = True
            self.engine.loop.call_soon(self._decide_all)

    def _decide_all(self, onset: float | None = None) -> None:
        """`onset`: when the pressure the watch found began (a signal's time comes first)."""
        self._scheduled = False
        for handle in (self._tick, self._watch):
            if handle is not None:
                handle.cancel()
        self._tick = self._watch = None
        now = time.monotonic()
        signal_at, self._signal_at = self._signal_at, None
        # Without a signal or the watch's estimate (a tick found it) pressure began at the latest since the previous
        # look.
        if signal_at is not None:
            onset = signal_at
        elif onset is None:
            onset = self._decided_at or now
        self._decided_at = now
        delays = []
        for domain in list(self.domains.values()):
            try:
                delays.append(self._decide(domain, now, onset))
            except Exception:  # one domain's trouble must not stop the others' protection
                log.exception("policy decision failed", extra={"domain": domain.name})
                delays.append(self.config.tick_seconds)
        self._files.sweep()
        self._decided.set()
        self._decided = asyncio.Event()
        due = [delay for delay in delays if delay is not None]
        if due:
            self._tick = self.engine.loop.call_later(min(due), self._decide_all)
        self._arm_watch()

    def _arm_watch(self) -> None:
        delays = [watch_delay(domain.last, domain.readings[-1][0] if domain.readings else domain.last.usage,
                              self._max_growth, self.config)
                  for domain in self.domains.values() if domain.watched and domain.last is not None]
        if delays:
            self._watch = self.engine.loop.call_later(min(delays), self._look)

    def _look(self) -> None:
        """The watch: one memory.current per watched domain; a decision for all when one comes near pressure."""
        self._watch = None
        now = time.monotonic()
        for domain in self.domains.values():
            if not domain.watched or domain.last is None:
                continue
            usage = max(cgroupfs.memory_current(domain.path, self._files), 0)
            growth = watch_growth(domain.memory, domain.readings, usage, now, self.config)
            previous = domain.readings[-1] if domain.readings else None
            domain.readings = remember(domain.readings, usage, now, self.config)
            if watch_trips(domain.last, usage, growth, self.config):
                onset = watch_onset(domain.last, usage, growth, previous, now, self.config)
                log.debug("policy watch", extra={"domain": domain.name, "usage": usage, "growth": round(growth),
                                                 "onset_s_ago": None if onset is None else round(now - onset, 4)})
                self._decide_all(onset)
                return
        self._decided_at = now
        self._arm_watch()

    def _decide(self, domain: Domain, now: float, onset: float) -> float | None:
        """One decision for one domain; when it wants the next one: a tick while it is under pressure or holds
        calls, at most WATCH_MAX_SECONDS while it has sessions (and the watch in between while it runs calls),
        None when it has none."""
        sessions = self._sessions_of(domain)
        if domain.session is None:  # anyone may change a memory.max above sessions/ (an operator, MemoryMax=)
            if not domain.limit_chain:
                domain.limit_chain = limit_chain(domain.path, self.engine.tree.mount)
            domain.limit = smallest_limit(domain.limit_chain, self.config.host_reserve, self._files)
        views = self._views(sessions, domain, now)
        # Held calls that ended or were killed since the previous decision: their sessions' echo starts now.
        self._mute_released(sessions, domain.held - held_sessions(domain.memory, views), now)
        state = domain_state(domain.name, domain.path, domain.limit, sessions, self._stall, self._events, now,
                             self._own_limits, self._files)
        decision = decide(state, views, self.config, now, domain.memory)
        domain.memory, domain.last = decision.memory, decision.assessment
        a = decision.assessment
        if a.active and not domain.announced:  # hysteresis: the band between active and clear changes nothing
            domain.announced = True
            self._reactions.began(domain.name, onset)
            self._publish(_event(a, "pressure", reason=_why(a)))
            log.info("pressure", extra=a.log_extra())
        elif a.clear and domain.announced:
            domain.announced = False
            self._reactions.cleared(domain.name)
            self._publish(_event(a, "clear"))
            log.info("pressure clear", extra=a.log_extra())
        others = act.holds({d.name: d.memory for d in self.domains.values()}, domain.name)
        for action in decision.actions:
            self._carry_out(domain, action, others, now)
        held = held_sessions(domain.memory, views)
        self._mute_released(sessions, domain.held - held, now)  # restored: their echo starts now
        domain.held = held
        holding = any(mem.held for mem in domain.memory.calls.values())
        self._reactions.decided(domain.name, holding)
        # Under pressure, or while the ladder holds calls (near the reserves, where the watch would trip a decision
        # at most looks anyway), a decision every tick; otherwise the watch.
        ticking = a.active or holding
        domain.watched = not ticking and bool(views)
        domain.readings = remember(domain.readings, a.usage, now, self.config)
        if ticking:
            return self.config.tick_seconds
        return WATCH_MAX_SECONDS if sessions else None

    def _carry_out(self, domain: Domain, action: Action, others: act.OtherHolds, now: float) -> None:
        if not act.apply(self.engine, action, others, now):
            return
        reaction = self._reactions.escalated(domain.name, now) if action.kind in ESCALATION else None
        log.info(f"policy {action.kind.value}", extra={
            **action.log_extra(), "reaction_ms": round(reaction * 1000, 3) if reaction is not None else None})
        self._publish(_event(action.assessment, action.kind.value, session_id=action.session_id,
                             call_id=action.call_id, call_usage=action.usage, call_expected=action.expected,
                             memory_high=action.memory_high, reason=action.reason))
        for listener in self.on_action:
            listener(action, reaction)

    def _mute_released(self, sessions: list[Session], released: set[str], now: float) -> None:
        """Sessions the ladder let go of since the previous decision (restored, or their held call ended or was
        killed) keep stalling for a while from what it did (memory.high penalty sleeps outlast the raise; a kill
        stalls its session): that stall is not new pressure, for RELEASE_ECHO_SECONDS."""
        for session in sessions:
            if session.id in released:
                self._stall.mute(session.path, now + RELEASE_ECHO_SECONDS)

    def _sessions_of(self, domain: Domain) -> list[Session]:
        if domain.session is not None:
            return [domain.session]
        return list(self.engine.registry.sessions.values())

    def _views(self, sessions: list[Session], domain: Domain, now: float | None = None) -> list[CallView]:
        """The domain's running calls; with `now`, those whose memory.high the ladder holds are asked whether
        they hit it lately (recovery gives a call that still wants more only the spare headroom)."""
        views = []
        held = {call_id for call_id, mem in domain.memory.calls.items() if mem.written_high is not None}
        for session in sessions:
            for call in list(session.calls.values()):
                meter = self._at_high if now is not None and call.id in held else None
                view = call_view(call, session, self.engine.config, meter, now or 0.0, self._files)
                if view is not None:
                    views.append(view)
        if now is not None:
            self._at_high.retain({call_id for d in self.domains.values() for call_id, mem in d.memory.calls.items()
                                  if mem.written_high is not None})
        return views

    def _publish(self, event: PolicyEvent) -> None:
        self.hub.publish(event)

    # ----- admission -----

    async def admit(self, session: Session, intent: Intent) -> None:
        """Whether a declared (valid) Begin may start now: returns when admitted (at once, or after a bounded wait
        in the queue); ResourceExhausted with a retry-after hint when refused."""
        if not self.config.enabled or "memory" not in self.engine.caps.enforced:
            return  # without the memory controller nothing holds a call to what it declared
        # What it will be held to: the declaration (or its class size), capped by the session's budget.
        expected = derive_limits(intent, self.engine.config, session.spec.memory_budget).memory_high
        names = [session_domain(session.id), SESSIONS_DOMAIN]
        if all(self._fits_quickly(self.domains.get(name), expected) for name in names):
            return
        request = AdmissionRequest("begin", session.id, session.spec.priority or Priority.NORMAL, expected)
        while True:
            now = time.monotonic()
            verdict, where = None, SESSIONS_DOMAIN
            for name in names:
                domain = self.domains.get(name)
                if domain is None:
                    continue
                sessions = self._sessions_of(domain)
                # Fresh meters: admission needs neither stall nor events, and must not take their rise from the
                # ladder's next reading.
                state = domain_state(domain.name, domain.path, domain.limit, sessions, StallMeter(False),
                                     EventsMeter(), now)
                verdict, where = admit(request, state, self._views(sessions, domain), self.config, now), name
                if verdict.verdict is not Verdict.ADMIT:
                    break
            if verdict is None or verdict.verdict is Verdict.ADMIT:
                if request.queued_since is not None and verdict is not None:
                    log.info("admitted after waiting", extra={**verdict.log_extra(), "domain": where,
                                                              "waited_s": round(now - request.queued_since, 3)})
                return
            if request.queued_since is None or verdict.verdict is Verdict.REFUSE:
                log.info(f"admission {verdict.verdict.value}", extra={**verdict.log_extra(), "domain": where})
                self._publish(PolicyEvent(where, verdict.verdict.value, session_id=session.id, call_expected=expected,
                                          headroom=verdict.headroom, reason=verdict.reason))
            if verdict.verdict is Verdict.REFUSE:
                raise ResourceExhausted(
                    f"admission refused: {verdict.reason}"
                    + (f"; retry after {verdict.retry_after_seconds:g} s" if verdict.retryable else ""))
            if request.queued_since is None:
                request = replace(request, queued_since=now)
            assert verdict.wait_until is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._decided.wait(),
                                       max(min(verdict.wait_until - now, ADMISSION_RECHECK_SECONDS), 0.0))

    def _fits_quickly(self, domain: Domain | None, expected: int) -> bool:
        """The hot path's check, one file read: the Begin fits even if every running call took all it declared
        (an upper bound of what they still owe) and the domain is not under pressure."""
        if domain is None:
            return True
        if domain.last is not None and domain.last.active:
            return False
        usage = max(cgroupfs.memory_current(domain.path), 0)
        calls = self._sessions_of(domain)
        owed = sum(call.limits.memory_high for s in calls for call in s.calls.values())
        margin = reserve(domain.limit, self.config.throttle_reserve_ratio, self.config.throttle_reserve_min)
        return domain.limit - usage - owed - margin >= expected

    # ----- status -----

    def status(self) -> list[DomainView]:
        return [self._view(domain) for domain in self.domains.values()]

    def session_status(self, session: Session) -> tuple[DomainView | None, float | None, int]:
        """Its own domain (a budget), its last stall reading, and how many of its calls the ladder holds."""
        domain = self.domains.get(session_domain(session.id))
        held = sum(1 for d in self.domains.values() for call_id, mem in d.memory.calls.items()
                   if mem.held and call_id in session.calls)
        return (self._view(domain) if domain is not None else None), self._stall.last(session.path), held

    def _view(self, domain: Domain) -> DomainView:
        held = sum(1 for mem in domain.memory.calls.values() if mem.held)
        a = domain.last
        if a is None:
            usage = max(cgroupfs.memory_current(domain.path), 0)
            return DomainView(domain.name, domain.limit, usage, domain.limit - usage, None, "none", held)
        return DomainView(a.domain, a.limit, a.usage, a.headroom, a.stall_pct, a.level.name.lower(), held)


    def close(self) -> None:
        for handle in (self._tick, self._watch):
            if handle is not None:
                handle.cancel()
        for domain in self.domains.values():
            self._unwatch(domain)
        for fd in self._session_triggers.values():
            self.engine.watcher.unwatch(fd)
        self.domains.clear()
        self._session_triggers.clear()
        self._files.close()


ESCALATION = (ActionKind.THROTTLE, ActionKind.FREEZE, ActionKind.KILL)


def held_sessions(memory: LadderMemory, views: list[CallView]) -> set[str]:
    """The sessions of which the ladder holds a call (throttled, frozen or killed)."""
    return {view.session_id for view in views if memory.call(view.id).held}


def _event(a: Assessment, kind: str, *, session_id: str = "", call_id: str = "", call_usage: int = 0,
           call_expected: int = 0, memory_high: int = 0, reason: str = "") -> PolicyEvent:
    return PolicyEvent(a.domain, kind, session_id, call_id, call_usage, call_expected, memory_high, a.usage, a.limit,
                       a.headroom, a.stall_pct, reason)


def _why(a: Assessment) -> str:
    if a.claim_only:
        return (f"projected headroom {a.projected_headroom} less {a.claimed} declared by higher-priority calls is "
                f"below the throttle reserve {a.reserves['throttle']}")
    if a.headroom < a.reserves["throttle"] or a.projected_headroom < a.reserves["throttle"]:
        return f"projected headroom {a.projected_headroom} below the throttle reserve {a.reserves['throttle']}"
    if a.stall_pct is not None:
        return f"memory stall {a.stall_pct:.1f}%"
    return "the domain's memory limit was hit (memory.events)"
