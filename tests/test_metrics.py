"""Prometheus /metrics: the documented families, snake_case with unit suffixes, no call ids, session ids only on
the per-session families (agentd_session_*)."""

from __future__ import annotations

import re
from collections.abc import Callable

from support import Daemon, create_session, scrape, value, wait_for

from agentd.api.gen import agentd_pb2 as pb


def test_metrics_follow_calls(daemon: Daemon, session: tuple[str, str]) -> None:
    sid, _ = session
    before = scrape(daemon)
    with daemon.admin() as admin:
        failed = admin.run(["sh", "-c", "exit 1"], sid)
        admin.run(["true"], sid)
    ok = 'agentd_tool_calls_finished_total{outcome="ok"}'
    wait_for(lambda: value(scrape(daemon), ok) == value(before, ok) + 1)  # counted right after the answer
    after = scrape(daemon)
    for family in ("agentd_tool_calls_started_total", "agentd_tool_calls_finished_total",
                   "agentd_tool_call_duration_seconds", "agentd_tool_call_memory_peak_bytes",
                   "agentd_tool_calls_oom_killed_total", "agentd_oom_killed_processes_total",
                   "agentd_api_request_duration_seconds", "agentd_sessions", "agentd_tool_calls_active",
                   "agentd_cgroups_alive", "agentd_controller_enforced", "agentd_bpf_enabled",
                   "agentd_bpf_events_lost_total", "agentd_session_process_events_total",
                   "agentd_capture_latency_seconds", "agentd_network_denials_total"):
        assert f"# TYPE {family.removesuffix('_total')}" in after, family
    finished = 'agentd_tool_calls_finished_total{outcome="failed"}'
    assert value(after, finished) == value(before, finished) + 1
    assert value(after, ok) == value(before, ok) + 1
    started = 'agentd_tool_calls_started_total{implicit="false"}'
    assert value(after, started) == value(before, started) + 2
    assert value(after, 'agentd_sessions{priority="normal"}') >= 1
    assert value(after, "agentd_api_request_duration_seconds_count"
                        '{code="OK",method="BeginToolCall"}') >= 2
    assert failed.result.call_id not in after
    assert sid not in "\n".join(line for line in after.splitlines() if not line.startswith("agentd_session_"))
    for name in re.findall(r"^# TYPE (\S+) ", after, re.MULTILINE):
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
    enforced = value(after, 'agentd_controller_enforced{controller="memory"}')
    with daemon.admin() as admin:
        status = admin.call("GetStatus", pb.GetStatusRequest())
    assert enforced == (1.0 if "memory" in status.controllers_enforced else 0.0)


def test_bpf_map_use_and_capacity(daemon_factory: Callable[..., Daemon]) -> None:
    """The lifecycle program's map of tracked cgroups: one entry per session (its agent/ leaf) and per running
    call, out of the capacity the loaded map has (MANAGED_MAX_ENTRIES in bpf/lifecycle.bpf.c)."""
    daemon = daemon_factory().start()
    entries, capacity = 'agentd_bpf_map_entries{map="managed"}', 'agentd_bpf_map_capacity{map="managed"}'
    first = scrape(daemon)
    assert value(first, 'agentd_bpf_enabled{program="lifecycle"}') == 1
    assert (value(first, entries), value(first, capacity)) == (0, 8192)
    with daemon.admin() as admin:
        one, _ = create_session(admin)
        create_session(admin)
        assert value(scrape(daemon), entries) == 2
        begun = admin.begin(pb.Intent(tool="held"), one)
        assert value(scrape(daemon), entries) == 3
        admin.end(begun.call_id, None)
        wait_for(lambda: value(scrape(daemon), entries) == 2)
        admin.call("DeleteSession", pb.DeleteSessionRequest(session_id=one, force=True))
    assert value(scrape(daemon), entries) == 1
