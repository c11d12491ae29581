"""Prometheus metrics: event counters updated by the engine's listeners, gauges read from core state at scrape.

No unbounded labels: outcome, priority, method, code, controller, program and event; session ids only on the
per-session families agentd_session_* (bounded by [sessions] max_sessions); never call ids.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agentd.core.results import Outcome, Result
from agentd.core.sessions import Priority
from agentd.core.toolcalls import ToolCall
from agentd.kernel import cgroupfs
from agentd.kernel.bpf.libbpf import BpfError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from agentd.core.engine import Engine

DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
MEMORY_BUCKETS = tuple(float(1 << n) for n in range(20, 37))  # 1 MiB .. 64 GiB
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5)
LOOP_TIMEOUT_SECONDS = 2.0  # a scrape waits this long for state only the event loop may read
T = TypeVar("T")


class Metrics:
    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.started = Counter("agentd_tool_calls_started", "Tool calls begun", ["implicit"], registry=r)
        self.finished = Counter("agentd_tool_calls_finished", "Tool calls finished", ["outcome"], registry=r)
        self.oom_kills = Counter("agentd_oom_kills", "Processes OOM-killed inside tool calls", registry=r)
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
        # Labelled children resolved once: labels() costs more than the increment on the per-call path.
        self._started = {implicit: self.started.labels(str(implicit).lower()) for implicit in (False, True)}
        self._finished_by: dict[Outcome, Counter] = {
            outcome: self.finished.labels(outcome.name.lower()) for outcome in Outcome if outcome != Outcome.UNSPECIFIED
        }
        self._api: dict[tuple[str, str], Histogram] = {}
        r.register(_StateCollector(engine))
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

    def _finished(self, result: Result) -> None:
        (self._finished_by.get(result.outcome) or self.finished.labels(result.outcome.name.lower())).inc()
        self.oom_kills.inc(result.memory_events.get("oom_kill", 0))
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


class _StateCollector(Collector):
    """Gauges computed from the engine's state at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self.engine
        sessions = list(engine.sessions.values())
        calls = list(engine.calls.values())
        by_priority = GaugeMetricFamily("agentd_sessions", "Sessions by priority", labels=["priority"])
        for priority in (Priority.HIGH, Priority.NORMAL, Priority.LOW):
            count = sum(
                1 for s in sessions if (s.spec.priority or Priority.NORMAL) == priority
            )
            by_priority.add_metric([priority.name.lower()], count)
        yield by_priority
        yield GaugeMetricFamily("agentd_tool_calls_active", "Unfinished tool calls", value=len(calls))
        # supervisor/ + sessions/ + per session (itself + agent/) + one per call + spares made ahead
        yield GaugeMetricFamily(
            "agentd_cgroups_alive", "cgroups agentd manages",
            value=2 + 2 * len(sessions) + len(calls) + len(engine.spares),
        )
        enforced = GaugeMetricFamily(
            "agentd_controller_enforced", "1 if the controller is enforced for tool calls", labels=["controller"]
        )
        for controller in cgroupfs.CONTROLLERS:
            enforced.add_metric([controller], 1 if controller in engine.caps.enforced else 0)
        yield enforced
        bpf = GaugeMetricFamily("agentd_bpf_enabled", "1 if the BPF program is loaded", labels=["program"])
        bpf.add_metric(["lifecycle"], 1 if engine.caps.bpf_lifecycle else 0)
        bpf.add_metric(["netpolicy"], 1 if engine.caps.bpf_network else 0)
        yield bpf
        if engine.caps.bpf_network:
            denials = CounterMetricFamily(
                "agentd_session_network_denials", "Connects/sends refused to a session's calls with network NONE",
                labels=["session"],
            )
            for session in sessions:
                denials.add_metric([session.id], session.network_denials)
            yield denials
        if engine.tracking.enabled:
            yield from self._process_counters()

    def _process_counters(self) -> Iterator[Metric]:
        """Counters the lifecycle program keeps in kernel maps, read on the event loop (which owns them)."""
        tracking = self.engine.tracking
        lost = self._on_loop(tracking.lost)
        per_session = self._on_loop(tracking.session_counters)
        if lost is None or per_session is None:
            return
        yield CounterMetricFamily(
            "agentd_bpf_events_lost", "Process events dropped because the ring buffer was full", value=lost
        )
        events = CounterMetricFamily(
            "agentd_session_process_events", "Forks, execs and exits in a session's cgroups",
            labels=["session", "event"],
        )
        for session_id, counters in per_session.items():
            for event, value in (("fork", counters.forks), ("exec", counters.execs), ("exit", counters.exits)):
                events.add_metric([session_id, event], value)
        yield events

    def _on_loop(self, read: Callable[[], T]) -> T | None:
        """read() run on the event loop; None if the loop does not answer in time (e.g. it is stopping)."""

        async def run() -> T:
            return read()

        try:
            return asyncio.run_coroutine_threadsafe(run(), self.engine.loop).result(LOOP_TIMEOUT_SECONDS)
        except (RuntimeError, TimeoutError, BpfError):
            return None
