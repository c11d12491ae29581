"""Prometheus metrics: event counters updated by the engine's listeners, gauges read from core state at scrape.

No high-cardinality labels: outcome, priority, method, code and controller only (never call or session ids).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from agentd.core.results import Outcome, Result
from agentd.core.sessions import Priority
from agentd.core.toolcalls import ToolCall
from agentd.kernel import cgroupfs

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from agentd.core.engine import Engine

DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
MEMORY_BUCKETS = tuple(float(1 << n) for n in range(20, 37))  # 1 MiB .. 64 GiB
API_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5)


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
            buckets=API_BUCKETS, registry=r,
        )
        for implicit in ("false", "true"):
            self.started.labels(implicit)
        for outcome in Outcome:
            if outcome != Outcome.UNSPECIFIED:
                self.finished.labels(outcome.name.lower())
        r.register(_StateCollector(engine))
        engine.on_begin.append(self._began)
        engine.on_finish.append(self._finished)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def _began(self, call: ToolCall) -> None:
        self.started.labels(str(call.implicit).lower()).inc()

    def _finished(self, result: Result) -> None:
        self.finished.labels(result.outcome.name.lower()).inc()
        self.oom_kills.inc(result.memory_events.get("oom_kill", 0))
        if result.started_unix:
            self.duration.observe(result.duration_seconds)
        if result.memory_peak >= 0:
            self.peak.observe(result.memory_peak)

    def serve(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self._server, self._thread = start_http_server(int(port), host.strip("[]"), registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class _StateCollector(Collector):
    """Gauges computed from the engine's state at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
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
        # supervisor/ + sessions/ + per session (itself + agent/) + one per call
        yield GaugeMetricFamily(
            "agentd_cgroups_alive", "cgroups agentd manages", value=2 + 2 * len(sessions) + len(calls)
        )
        enforced = GaugeMetricFamily(
            "agentd_controller_enforced", "1 if the controller is enforced for tool calls", labels=["controller"]
        )
        for controller in cgroupfs.CONTROLLERS:
            enforced.add_metric([controller], 1 if controller in engine.caps.enforced else 0)
        yield enforced
