"""Prometheus metrics: event counters updated by the engine's listeners, gauges read from core state at scrape.

No unbounded labels: outcome, priority, method, code, controller, program and event; session ids only on the
per-session families agentd_session_* (bounded by [sessions] max_sessions); never call ids.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agentd.core.results import Outcome, Result
from agentd.core.sessions import Priority
from agentd.core.toolcalls import ToolCall
from agentd.kernel.bpf.libbpf import BpfError
from agentd.kernel.bpf.lifecycle import ProcessCounters
from agentd.policy.loop import DomainView, PolicyLoop
from agentd.policy.model import Action, priority_name

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from agentd.core.engine import Engine

DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
MEMORY_BUCKETS = tuple(float(1 << n) for n in range(20, 37))  # 1 MiB .. 64 GiB
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5)
REACTION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
LEVELS = {"none": 0, "throttle": 1, "freeze": 2, "kill": 3}
LOOP_TIMEOUT_SECONDS = 2.0  # a scrape waits this long for state only the event loop may read
T = TypeVar("T")


class Metrics:
    def __init__(self, engine: Engine, policy: PolicyLoop) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.started = Counter("agentd_tool_calls_started", "Tool calls begun", ["implicit"], registry=r)
        self.finished = Counter("agentd_tool_calls_finished", "Tool calls finished", ["outcome"], registry=r)
        self.oom_killed_calls = Counter(
            "agentd_tool_calls_oom_killed", "Tool calls the kernel OOM-killed, by whose limit (oom_scope)",
            ["scope"], registry=r,
        )
        self.oom_killed_processes = Counter(
            "agentd_oom_killed_processes", "Processes the kernel OOM-killed inside tool calls, each once", registry=r
        )
        self.duration = Histogram(
            "agentd_tool_call_duration_seconds", "Tool call duration (join to end)", buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.peak = Histogram(
            "agentd_tool_call_memory_peak_bytes", "Peak memory of finished tool calls", buckets=MEMORY_BUCKETS,
            registry=r,
        )
        self.api = Histogram(
            "agentd_api_request_duration_seconds", "gRPC request latency", ["method", "code"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.capture_latency = Histogram(
            "agentd_capture_latency_seconds", "Auto-capture: exec in an agent leaf to moved into its implicit call",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.network_denials = Counter(
            "agentd_network_denials", "Connects/sends refused to tool calls with network intent NONE", registry=r
        )
        self.policy_actions = Counter(
            "agentd_policy_actions", "Actions of the memory policy on tool calls", ["action", "priority"], registry=r
        )
        self.policy_reaction = Histogram(
            "agentd_policy_reaction_seconds", "Memory policy: pressure signal to the first action of its episode",
            buckets=REACTION_BUCKETS, registry=r,
        )
        # Labelled children resolved once: labels() costs more than the increment on the per-call path.
        self._started = {implicit: self.started.labels(str(implicit).lower()) for implicit in (False, True)}
        self._finished_by: dict[Outcome, Counter] = {
            outcome: self.finished.labels(outcome.name.lower()) for outcome in Outcome if outcome != Outcome.UNSPECIFIED
        }
        self._api: dict[tuple[str, str], Histogram] = {}
        r.register(_StateCollector(engine, policy))
        policy.on_action.append(self._acted)
        engine.on_begin.append(self._began)
        engine.on_finish.append(self._finished)
        self._server: WSGIServer | None = None

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        child = self._api.get((method, code))
        if child is None:
            child = self._api[(method, code)] = self.api.labels(method, code)
        child.observe(seconds)

    def _began(self, call: ToolCall) -> None:
        self._started[call.implicit].inc()
        if call.capture is not None:
            self.capture_latency.observe(call.capture.latency_seconds)

    def _acted(self, action: Action, reaction: float | None) -> None:
        self.policy_actions.labels(action.kind.value, priority_name(action.priority)).inc()
        if reaction is not None:
            self.policy_reaction.observe(reaction)

    def _finished(self, result: Result) -> None:
        (self._finished_by.get(result.outcome) or self.finished.labels(result.outcome.name.lower())).inc()
        if result.outcome == Outcome.OOM_KILLED:
            self.oom_killed_calls.labels(result.oom_scope.value).inc()
        if result.oom_killed_processes:  # an increment by 0 costs as much as any other, on every call
            self.oom_killed_processes.inc(result.oom_killed_processes)
        if result.network_denials:
            self.network_denials.inc(result.network_denials)
        if result.started_unix:
            self.duration.observe(result.duration_seconds)
        if result.memory_peak >= 0:
            self.peak.observe(result.memory_peak)

    def serve(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self._server, _thread = start_http_server(int(port), host.strip("[]"), registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@dataclass(frozen=True)
class _State:
    """What a scrape needs from loop-owned state, copied on the event loop in one go."""

    by_priority: dict[Priority, int]
    active_calls: int
    cgroups_alive: int
    network_denials: dict[str, int]  # per session
    process_counters: dict[str, ProcessCounters] | None  # per session; None without the lifecycle program
    events_lost: int
    map_use: tuple[int, int] | None  # the lifecycle program's `managed` map: entries, capacity
    domains: list[DomainView]  # the memory policy's pressure domains


def _state(engine: Engine, policy: PolicyLoop) -> _State:
    """Runs on the event loop, which owns the engine's dicts and the BPF maps."""
    sessions = list(engine.sessions.values())
    by_priority = dict.fromkeys((Priority.HIGH, Priority.NORMAL, Priority.LOW), 0)
    for session in sessions:
        by_priority[Priority(session.spec.priority or Priority.NORMAL)] += 1
    tracking = engine.tracking
    return _State(
        by_priority=by_priority,
        active_calls=len(engine.calls),
        # supervisor/ + sessions/ + per session (itself + agent/) + one per call + spares made ahead
        cgroups_alive=2 + 2 * len(sessions) + len(engine.calls) + len(engine.spares),
        network_denials={s.id: s.network_denials for s in sessions},
        process_counters=tracking.session_counters() if tracking.enabled else None,
        events_lost=tracking.lost(),
        map_use=tracking.map_use(),
        domains=policy.status(),
    )


class _StateCollector(Collector):
    """Gauges computed from the engine's state at scrape time: the capabilities (fixed at start) here, the rest
    from a copy made on the event loop (nothing of it if the loop does not answer in time)."""

    def __init__(self, engine: Engine, policy: PolicyLoop) -> None:
        self.engine = engine
        self.policy = policy

    def collect(self) -> Iterator[Metric]:
        caps = self.engine.caps
        enforced = GaugeMetricFamily(
            "agentd_controller_enforced", "1 if the controller is enforced for tool calls", labels=["controller"]
        )
        for controller in sorted(caps.enforced | caps.missing):
            enforced.add_metric([controller], 1 if controller in caps.enforced else 0)
        yield enforced
        bpf = GaugeMetricFamily("agentd_bpf_enabled", "1 if the BPF program is loaded", labels=["program"])
        bpf.add_metric(["lifecycle"], 1 if caps.bpf_lifecycle else 0)
        bpf.add_metric(["netpolicy"], 1 if caps.bpf_network else 0)
        yield bpf
        state = self._on_loop(functools.partial(_state, self.engine, self.policy))
        if state is not None:
            yield from self._engine_state(state)

    def _engine_state(self, state: _State) -> Iterator[Metric]:
        by_priority = GaugeMetricFamily("agentd_sessions", "Sessions by priority", labels=["priority"])
        for priority, count in state.by_priority.items():
            by_priority.add_metric([priority.name.lower()], count)
        yield by_priority
        yield GaugeMetricFamily("agentd_tool_calls_active", "Unfinished tool calls", value=state.active_calls)
        yield GaugeMetricFamily("agentd_cgroups_alive", "cgroups agentd manages", value=state.cgroups_alive)
        if self.engine.caps.bpf_network:
            denials = CounterMetricFamily(
                "agentd_session_network_denials", "Connects/sends refused to a session's calls with network NONE",
                labels=["session"],
            )
            for session_id, count in state.network_denials.items():
                denials.add_metric([session_id], count)
            yield denials
        if state.map_use is not None:
            yield from _map_use(*state.map_use)
        if state.process_counters is not None:
            yield from _process_counters(state)
        yield from _domains(state.domains)

    def _on_loop(self, read: Callable[[], T]) -> T | None:
        """read() run on the event loop; None if the loop does not answer in time (e.g. it is stopping)."""

        async def run() -> T:
            return read()

        try:
            return asyncio.run_coroutine_threadsafe(run(), self.engine.loop).result(LOOP_TIMEOUT_SECONDS)
        except (RuntimeError, TimeoutError, BpfError):
            return None


def _domains(domains: list[DomainView]) -> Iterator[Metric]:
    """The memory policy's pressure domains (sessions/, and sessions with a budget) as its last decision saw them."""
    families = {
        "limit": GaugeMetricFamily("agentd_policy_domain_limit_bytes", "Memory a pressure domain may use",
                                   labels=["domain"]),
        "usage": GaugeMetricFamily("agentd_policy_domain_usage_bytes", "Memory a pressure domain uses",
                                   labels=["domain"]),
        "stall": GaugeMetricFamily("agentd_policy_domain_stall_percent",
                                   "PSI memory 'some' stall of a domain over the last window (absent without PSI)",
                                   labels=["domain"]),
        "level": GaugeMetricFamily("agentd_policy_domain_level",
                                   "How far up the ladder: 0 none, 1 throttle, 2 freeze, 3 kill", labels=["domain"]),
        "held": GaugeMetricFamily("agentd_policy_calls_held", "Tool calls the memory policy holds (throttled or "
                                  "frozen)", labels=["domain"]),
    }
    for d in domains:
        families["limit"].add_metric([d.name], d.limit)
        families["usage"].add_metric([d.name], d.usage)
        if d.stall_pct is not None:
            families["stall"].add_metric([d.name], d.stall_pct)
        families["level"].add_metric([d.name], LEVELS.get(d.level, 0))
        families["held"].add_metric([d.name], d.calls_held)
    yield from families.values()


def _map_use(entries: int, capacity: int) -> Iterator[Metric]:
    """The lifecycle program's map of tracked cgroups (`managed`: agent/ leaves and running calls)."""
    used = GaugeMetricFamily("agentd_bpf_map_entries", "Entries in a BPF map", labels=["map"])
    used.add_metric(["managed"], entries)
    yield used
    size = GaugeMetricFamily("agentd_bpf_map_capacity", "Capacity of a BPF map (max_entries)", labels=["map"])
    size.add_metric(["managed"], capacity)
    yield size


def _process_counters(state: _State) -> Iterator[Metric]:
    """Counters the lifecycle program keeps in kernel maps."""
    assert state.process_counters is not None
    yield CounterMetricFamily(
        "agentd_bpf_events_lost", "Process events dropped because the ring buffer was full", value=state.events_lost
    )
    events = CounterMetricFamily(
        "agentd_session_process_events", "Forks, execs and exits in a session's cgroups", labels=["session", "event"],
    )
    for session_id, counters in state.process_counters.items():
        for event, value in (("fork", counters.forks), ("exec", counters.execs), ("exit", counters.exits)):
            events.add_metric([session_id, event], value)
    yield events
