"""Prometheus /metrics: the documented families, snake_case with unit suffixes, no call or session ids."""

from __future__ import annotations

import re
import urllib.request

from support import Daemon

from agentd.api.gen import agentd_pb2 as pb


def scrape(daemon: Daemon) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def value(text: str, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    assert match, f"{sample} not in metrics"
    return float(match.group(1))


def test_metrics_follow_calls(daemon: Daemon, session: tuple[str, str]) -> None:
    sid, _ = session
    before = scrape(daemon)
    with daemon.admin() as admin:
        failed = admin.run(["sh", "-c", "exit 1"], sid)
        admin.run(["true"], sid)
    after = scrape(daemon)
    for family in ("agentd_tool_calls_started_total", "agentd_tool_calls_finished_total",
                   "agentd_tool_call_duration_seconds", "agentd_tool_call_memory_peak_bytes", "agentd_oom_kills_total",
                   "agentd_api_request_duration_seconds", "agentd_sessions", "agentd_tool_calls_active",
                   "agentd_cgroups_alive", "agentd_controller_enforced"):
        assert f"# TYPE {family.removesuffix('_total')}" in after, family
    finished = 'agentd_tool_calls_finished_total{outcome="failed"}'
    assert value(after, finished) == value(before, finished) + 1
    ok = 'agentd_tool_calls_finished_total{outcome="ok"}'
    assert value(after, ok) == value(before, ok) + 1
    started = 'agentd_tool_calls_started_total{implicit="false"}'
    assert value(after, started) == value(before, started) + 2
    assert value(after, 'agentd_sessions{priority="normal"}') >= 1
    assert value(after, "agentd_api_request_duration_seconds_count"
                        '{code="OK",method="BeginToolCall"}') >= 2
    assert failed.result.call_id not in after and sid not in after
    for name in re.findall(r"^# TYPE (\S+) ", after, re.MULTILINE):
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
    enforced = value(after, 'agentd_controller_enforced{controller="memory"}')
    with daemon.admin() as admin:
        status = admin.call("GetStatus", pb.GetStatusRequest())
    assert enforced == (1.0 if "memory" in status.controllers_enforced else 0.0)
