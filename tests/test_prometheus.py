"""A real Prometheus (Debian's `prometheus` and `promtool`, installed by `make setup`) against a real agentd: the
series arrive with the values the tool calls produced, and the shipped rules load, evaluate and pass their unit
tests; rules made wrong on purpose fail them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import SLOW, Daemon, create_session, free_port, scrape, wait_for

import agentd
from agentd.api.gen import agentd_pb2 as pb

RULES_DIR = Path(agentd.__file__).parent / "data" / "prometheus"
RULES = RULES_DIR / "agentd-rules.yml"
RULE_TESTS = RULES_DIR / "agentd-rules.test.yml"
DASHBOARD = RULES_DIR / "agentd-grafana-dashboard.json"
SCRAPE_SECONDS = 1


def tool(name: str) -> str:
    found = shutil.which(name)
    assert found, f"{name} is installed by `make setup` (Debian package prometheus)"
    return found


class Prometheus:
    """Debian's prometheus server on 127.0.0.1, a free port and a private storage dir, scraping one target."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.port = free_port()
        self.log = workdir / "prometheus.log"
        config = {
            "global": {"scrape_interval": f"{SCRAPE_SECONDS}s", "evaluation_interval": f"{SCRAPE_SECONDS}s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "agentd", "static_configs": [{"targets": [target]}]}],
        }
        self.config = workdir / "prometheus.yml"
        self.config.write_text(json.dumps(config))  # JSON is YAML
        self.storage = workdir / "tsdb"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [tool("prometheus"), f"--config.file={self.config}", f"--storage.tsdb.path={self.storage}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=log,
            )
        wait_for(self._ready, timeout=30 * SLOW, interval=0.1)
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as reply:
            body = json.loads(reply.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> dict[str, float]:
        """An instant query's vector, as {labels without the job/instance: value}."""
        result = self.api("query", query=expr)["result"]
        return {_labels(sample["metric"]): float(sample["value"][1]) for sample in result}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _labels(metric: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(metric.items()) if k not in ("job", "instance"))


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Callable[[Daemon], Prometheus]]:
    started: list[Prometheus] = []

    def start(daemon: Daemon) -> Prometheus:
        workdir = tmp_path / f"prometheus{len(started)}"
        workdir.mkdir()
        started.append(Prometheus(workdir, f"127.0.0.1:{daemon.metrics_port}"))
        return started[-1].start()

    try:
        yield start
    finally:
        for p in started:
            p.stop()


def eventually(prometheus: Prometheus, expr: str, expected: dict[str, float]) -> None:
    """Wait (a few scrape and evaluation rounds) until the query returns exactly `expected`."""
    seen: list[dict[str, float]] = []

    def matches() -> bool:
        seen.append(prometheus.query(expr))
        return seen[-1] == expected

    try:
        wait_for(matches, timeout=20 * SCRAPE_SECONDS * SLOW, interval=0.25)
    except AssertionError:
        raise AssertionError(f"{expr}: expected {expected}, last got {seen[-1] if seen else None}") from None


def test_prometheus_scrapes_agentd(daemon_factory: Callable[..., Daemon],
                                   prometheus_for: Callable[[Daemon], Prometheus]) -> None:
    daemon = daemon_factory().start()
    prometheus = prometheus_for(daemon)
    eventually(prometheus, 'up{job="agentd"}', {"__name__=up": 1})
    eventually(prometheus, "agentd_tool_calls_finished_total", {
        f"__name__=agentd_tool_calls_finished_total,outcome={o}": 0
        for o in ("ok", "failed", "oom_killed", "timeout", "killed_by_policy", "cancelled", "exited")
    })
    with daemon.admin() as admin:
        sid, _ = create_session(admin, priority=pb.PRIORITY_HIGH)
        create_session(admin, priority=pb.PRIORITY_LOW)
        for _ in range(3):
            assert admin.run(["true"], sid).result.outcome == pb.OUTCOME_OK
        for code in (1, 2):
            assert admin.run(["sh", "-c", f"exit {code}"], sid).result.outcome == pb.OUTCOME_FAILED
    by_outcome = "sum by (outcome) (agentd_tool_calls_finished_total{outcome=~\"ok|failed\"})"
    eventually(prometheus, by_outcome, {"outcome=ok": 3, "outcome=failed": 2})
    eventually(prometheus, 'agentd_tool_calls_started_total{implicit="false"}',
                {"__name__=agentd_tool_calls_started_total,implicit=false": 5})
    eventually(prometheus, "agentd_tool_call_duration_seconds_count",
                {"__name__=agentd_tool_call_duration_seconds_count": 5})
    eventually(prometheus, "agentd_sessions", {f"__name__=agentd_sessions,priority={p}": n
                                               for p, n in (("high", 1), ("normal", 0), ("low", 1))})
    eventually(prometheus, "agentd_tool_calls_active", {"__name__=agentd_tool_calls_active": 0})
    eventually(prometheus, 'sum(agentd_api_request_duration_seconds_count{method="BeginToolCall",code="OK"})',
                {"": 5})
    # The shipped rules run in this server: recorded from the same series, and no rule fails to evaluate.
    wait_for(lambda: prometheus.query('agentd:tool_calls_finished:rate5m{outcome="ok"} > 0') != {},
             timeout=20 * SCRAPE_SECONDS * SLOW, interval=0.25)
    groups = prometheus.api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == len(re.findall(r"^\s+- (?:record|alert): ", RULES.read_text(), re.MULTILINE))
    assert [(r["name"], r["lastError"]) for r in rules if r["health"] != "ok"] == []
    firing = [a["labels"]["alertname"] for a in prometheus.api("alerts")["alerts"]]
    assert firing == [], "a healthy, idle agentd raises no alert"
    daemon.stop()
    eventually(prometheus, 'up{job="agentd"}', {"__name__=up": 0})


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_rules_check_and_unit_tests_pass() -> None:
    checked = promtool("check", "rules", RULES.name, cwd=RULES_DIR)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert re.search(r"SUCCESS: \d+ rules found", checked.stdout), checked.stdout
    tested = promtool("test", "rules", RULE_TESTS.name, cwd=RULES_DIR)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


# Rules made wrong in ways review could miss: each must make `promtool test rules` fail, naming the alert or the
# recorded series whose expectation broke (one that must fire stops firing, or one that must not fires).
MUTATIONS = {
    "down alert on the wrong value": ('expr: up{job="agentd"} == 0', 'expr: up{job="agentd"} == 1', "AgentdDown"),
    "OOM alert counting calls' own limits": ('scope!="call"', 'scope=~".+"', "AgentdOomKillsAboveCalls"),
    "policy alert on every action": ('action="kill"', 'action=~".+"', "AgentdPolicyKills"),
    "pressure alert on level 0": ("agentd_policy_domain_level{job=\"agentd\"} >= 1",
                                  "agentd_policy_domain_level{job=\"agentd\"} >= 0", "AgentdMemoryPressureSustained"),
    "pressure alert without for": ("        for: 10m\n", "", "AgentdMemoryPressureSustained"),
    "events lost as a level": ('increase(agentd_bpf_events_lost_total{job="agentd"}[10m]) > 0',
                               'agentd_bpf_events_lost_total{job="agentd"} > 0', "AgentdBpfEventsLost"),
    "map ratio inverted": ('agentd_bpf_map_entries{job="agentd"} / (agentd_bpf_map_capacity{job="agentd"} > 0)',
                           'agentd_bpf_map_capacity{job="agentd"} / (agentd_bpf_map_entries{job="agentd"} > 0)',
                           "AgentdBpfMapNearCapacity"),
    "API alert on caller errors": ('code=~"INTERNAL|UNKNOWN"}[5m])) > 0', 'code!="OK"}[5m])) > 0',
                                   "AgentdApiServerErrors"),
    "not-ready alert missing its join": ("unless on (instance, job) agentd_tool_calls_active{job=\"agentd\"}", "",
                                         "AgentdStateUnavailable"),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_rule_unit_tests_catch_a_wrong_rule(name: str, tmp_path: Path) -> None:
    original, wrong, alert = MUTATIONS[name]
    text = RULES.read_text()
    assert text.count(original) == 1, f"mutation {name!r} no longer matches the rules file"
    (tmp_path / RULES.name).write_text(text.replace(original, wrong))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    assert promtool("check", "rules", RULES.name, cwd=tmp_path).returncode == 0, "still a valid rule"
    tested = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert tested.returncode != 0, f"the unit tests pass with {name}"
    assert f"alertname: {alert}," in tested.stdout + tested.stderr, tested.stdout + tested.stderr


def dashboard_metric_names(dashboard: dict[str, Any]) -> set[str]:
    """Every agentd_* series name in the dashboard's queries (recorded agentd:* series come from the rules)."""
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert exprs, "the dashboard has no queries"
    return {name for expr in exprs for name in re.findall(r"\bagentd_[a-z0-9_]+", expr)}


def exported_names(page: str) -> set[str]:
    """Sample names a scrape exposes, families without samples (e.g. stall without PSI) by their TYPE line."""
    names = set(re.findall(r"^(agentd_[a-z0-9_]+)[{ ]", page, re.MULTILINE))
    for family, kind in re.findall(r"^# TYPE (agentd_[a-z0-9_]+) (\w+)", page, re.MULTILINE):
        names.add(family)
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}.get(kind, ())
        names.update(family + s for s in suffixes)
    return names


def test_grafana_dashboard_uses_exported_metrics(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory().start()
    with daemon.admin() as admin:
        sid, _ = create_session(admin, memory_budget_bytes=1 << 30)  # a budgeted session: a policy domain
        admin.run(["true"], sid)
    page = scrape(daemon)
    used = dashboard_metric_names(json.loads(DASHBOARD.read_text()))
    assert {"agentd_tool_calls_started_total", "agentd_policy_domain_level"} <= used
    assert sorted(used - exported_names(page)) == []
    recorded = set(re.findall(r"^\s+- record: (\S+)", RULES.read_text(), re.MULTILINE))
    exprs = json.dumps(json.loads(DASHBOARD.read_text())["panels"])
    assert sorted(set(re.findall(r"\bagentd:[a-z0-9_:]+", exprs)) - recorded) == []
