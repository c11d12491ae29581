"""The trace replayer of the isolation benchmark (bench/replay.py): parsing the shared traces, units, the memory
curve per tool call, the schedule's speed-up and chunked steps, and that its memory is really resident (host
kernel: RssAnon of the process). Plus the harness's choice of setup B (bench/isolation.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import replay  # noqa: E402

MIB = 1 << 20
TRACES = REPO.parent / "shared" / "traces" / "haiku"
DASK = TRACES / "dask__dask-11628"
needs_traces = pytest.mark.skipif(not (DASK / "resources.json").exists(), reason="../shared/traces not present")


def write_trace(folder: Path, samples: list[tuple[float, str]], calls: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    raw = [{"timestamp": "2026-02-06T17:47:11.545465", "epoch": e, "mem_usage": m, "mem_percent": "0.01%",
            "cpu_percent": "50.00%"} for e, m in samples]
    (folder / "resources.json").write_text(json.dumps({"samples": raw}))
    (folder / "tool_calls.json").write_text(json.dumps(calls))
    return folder


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# ------------------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(("text", "expected"), [
    ("185.5MB / 134.5GB", 185_500_000),  # podman: decimal units, usage / limit
    ("11.96MB / 134.5GB", 11_960_000),
    ("1.862GB / 134.5GB", 1_862_000_000),
    ("512kB / 134.5GB", 512_000),
    ("0B / 0B", 0),
    ("2GiB", 2 << 30),
    (" 64MiB ", 64 * MIB),
])
def test_parse_size_units(text: str, expected: int) -> None:
    assert replay.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MB", "12 parsecs", "1.2.3MB", "-5MB"])
def test_parse_size_refuses_what_is_not_a_size(text: str) -> None:
    with pytest.raises(replay.TraceError):
        replay.parse_size(text)


def test_parse_utc_is_utc_whatever_the_local_zone() -> None:
    assert replay.parse_utc("2026-02-07T01:47:17.879Z") == datetime(2026, 2, 7, 1, 47, 17, 879000, UTC).timestamp()
    with pytest.raises(replay.TraceError):
        replay.parse_utc("yesterday")


def test_samples_by_epoch_without_a_stopped_container() -> None:
    doc = {"samples": [{"epoch": 3.0, "mem_usage": "0B / 0B"}, {"epoch": 2.0, "mem_usage": "20MB / 1GB"},
                       {"epoch": 1.0, "mem_usage": "10MB / 1GB"}]}
    assert replay.parse_samples(doc) == (replay.Sample(1.0, 10_000_000), replay.Sample(2.0, 20_000_000))
    with pytest.raises(replay.TraceError):
        replay.parse_samples({"samples": [{"epoch": 1.0, "mem_usage": "1MB / 1GB"}]})
    with pytest.raises(replay.TraceError):
        replay.parse_samples({"samples": [{"mem_usage": "1MB / 1GB"}, {"mem_usage": "1MB / 1GB"}]})


@needs_traces
def test_load_a_shared_trace() -> None:
    trace = replay.load_trace(DASK)
    assert len(trace.samples) == 95
    assert trace.peak == 320_900_000
    assert 98.0 < trace.span < 98.5
    assert len(trace.calls) == 26
    assert all(c.start <= c.end for c in trace.calls)
    # The tool calls (UTC) and the samples (epoch) describe the same 98 s: the zone is not off by hours.
    assert trace.samples[0].epoch <= trace.calls[0].start <= trace.calls[-1].end <= trace.samples[-1].epoch + 5


@needs_traces
def test_every_shared_trace_loads() -> None:
    folders = [p for p in TRACES.iterdir() if (p / "resources.json").exists()]
    assert folders
    for folder in folders:
        trace = replay.load_trace(folder)
        assert trace.peak > 0 and trace.span > 0, folder.name
        assert all(s.memory > 0 for s in trace.samples), folder.name  # the "0B / 0B" of a stopped container is gone


# ------------------------------------------------------------------------------------------------ the curve


def synthetic(tmp_path: Path) -> replay.Trace:
    t0 = 1_770_000_000.0
    samples = [(t0 + i, f"{m}MB / 100GB") for i, m in enumerate([10, 50, 120, 90, 40, 40])]
    calls = [
        {"timestamp": iso(t0 + 1.5), "end_timestamp": iso(t0 + 3.5), "tool": "Bash", "id": "a"},  # samples 2, 3
        {"timestamp": iso(t0 + 4.2), "end_timestamp": iso(t0 + 4.4), "tool": "Read", "id": "b"},  # between samples
        {"timestamp": iso(t0 + 0.2), "tool": "Edit", "id": "c"},  # no end: an instant
    ]
    return replay.load_trace(write_trace(tmp_path / "t", samples, calls))


def test_memory_curve_per_tool_call(tmp_path: Path) -> None:
    trace = synthetic(tmp_path)
    assert [c.tool for c in trace.calls] == ["Edit", "Bash", "Read"]  # by start time
    edit, bash, read = replay.call_curves(trace)
    assert bash.samples == (2, 3)
    assert bash.start_memory == 50_000_000 and bash.peak == 120_000_000 and bash.growth == 70_000_000
    assert bash.start == pytest.approx(1.5) and bash.end == pytest.approx(3.5)
    # A call shorter than the sampling interval holds the memory of the last sample before it.
    assert read.samples == () and read.start_memory == read.peak == 40_000_000 and read.growth == 0
    assert edit.samples == () and edit.end == edit.start and edit.peak == 10_000_000


@needs_traces
def test_the_dask_test_run_is_the_call_that_holds_the_peak() -> None:
    trace = replay.load_trace(DASK)
    curves = replay.call_curves(trace)
    top = max(curves, key=lambda c: c.growth)
    assert top.tool == "Bash" and top.peak == trace.peak
    assert top.growth == 320_900_000 - 198_500_000
    assert len(top.samples) == 11


def test_schedule_speedup_base_and_calls(tmp_path: Path) -> None:
    trace = synthetic(tmp_path)
    targets = replay.schedule(trace, 100 * MIB, 10.0)
    assert [t.at for t in targets] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    assert targets[2].resident == (100 * MIB + 120_000_000) // replay.PAGE * replay.PAGE
    assert all(t.resident % replay.PAGE == 0 for t in targets)
    assert [t.call for t in targets] == [-1, -1, 1, 1, -1, -1]
    assert [t.at for t in replay.schedule(trace, 0, 0.5)] == pytest.approx([0, 2, 4, 6, 8, 10])
    with pytest.raises(ValueError):
        replay.schedule(trace, 0, 0)


def test_steps_are_at_most_one_chunk() -> None:
    chunk = 64 * MIB
    assert replay.plan_steps(0, 150 * MIB, chunk) == [chunk, chunk, 22 * MIB]
    assert replay.plan_steps(150 * MIB, 20 * MIB, chunk) == [-chunk, -chunk, -2 * MIB]
    assert replay.plan_steps(5 * MIB, 5 * MIB, chunk) == []
    assert replay.plan_steps(0, chunk, chunk) == [chunk]


def test_percentile_interpolates_between_ranks() -> None:
    assert replay.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert replay.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)
    assert replay.percentile([7.0], 99) == 7.0
    assert math.isnan(replay.percentile([], 50))


# ------------------------------------------------------------------------------------------------ memory


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon")


def test_resident_memory_is_really_resident_and_given_back() -> None:
    """Growing touches every page (private anonymous memory, charged to the process); shrinking frees it, also
    in the middle of a chunk."""
    memory = replay.Resident(16 * MIB)
    try:
        before = rss_anon()
        memory.grow(40 * MIB)  # two full mappings and half of a third
        assert memory.size == 40 * MIB and len(memory.maps) == 3
        assert rss_anon() - before >= 39 * MIB
        memory.shrink(30 * MIB)  # into the middle of the first mapping
        assert memory.size == 10 * MIB and len(memory.maps) == 1
        assert rss_anon() - before <= 12 * MIB
        memory.grow(6 * MIB + replay.PAGE)
        assert memory.size == 16 * MIB + replay.PAGE and len(memory.maps) == 2
        assert rss_anon() - before >= 15 * MIB
    finally:
        memory.close()
    assert memory.size == 0


def test_replay_writes_steps_and_duration(tmp_path: Path) -> None:
    trace = synthetic(tmp_path)
    out = tmp_path / "out.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "replay.py"), str(tmp_path / "t"), "--base", "8M",
                           "--speedup", "20", "--chunk", "32M", "--out", str(out)], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["trace"] == "t" and result["speedup"] == 20.0 and result["base"] == 8 * MIB
    assert result["scheduled"] == pytest.approx(trace.span / 20)
    assert result["duration"] >= result["scheduled"]
    kinds = [s["kind"] for s in result["steps"]]
    assert kinds[0] == "base" and "grow" in kinds and "shrink" in kinds
    grown = sum(s["bytes"] for s in result["steps"] if s["kind"] in ("base", "grow"))
    shrunk = sum(s["bytes"] for s in result["steps"] if s["kind"] == "shrink")
    assert grown - shrunk == replay.schedule(trace, 8 * MIB, 20)[-1].resident
    assert all(s["bytes"] <= 32 * MIB for s in result["steps"])
    assert result["summary"]["grow_steps"] == kinds.count("grow")
    assert [c["tool"] for c in result["calls"]] == ["Edit", "Bash", "Read"]


def test_replay_reports_a_bad_trace(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "replay.py"), str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "replay:" in done.stderr


# ------------------------------------------------------------------------------------------------ the harness


def test_setup_b_takes_the_five_largest_other_peaks() -> None:
    import isolation

    peaks = {isolation.SETUP_A_HIGH: 900, isolation.SETUP_A_LOW: 800, "a": 50, "b": 500, "c": 400, "d": 300,
             "e": 200, "f": 100}
    chosen, limit = isolation.pick_setup_b({k: v * MIB for k, v in peaks.items()}, 100 * MIB)
    assert chosen == ["b", "c", "d", "e", "f"]  # HIGH first; setup A's traces excluded
    assert limit == int(0.75 * (1500 + 500)) * MIB


def test_plain_kill_kind() -> None:
    import isolation

    assert isolation.plain_kind({"oom": 1, "oom_kill": 1}, -9) == "OOM(own)"
    assert isolation.plain_kind({"oom": 0, "oom_kill": 1}, -9) == "OOM(parent)"
    assert isolation.plain_kind({}, -15) == "signal 15"
    assert isolation.plain_kind({}, 2) == "exit 2"


def test_a_late_start_counts_only_as_far_as_admission_made_the_session_wait() -> None:
    """A replayer that was late at the common start because its own start-up took longer than the lead is not
    charged for it; one that waited for admission is, up to its late start."""
    import isolation

    def replayed(late: float) -> dict[str, Any]:
        return {"duration": 12.0, "late_start": late}

    started_itself = isolation.charge_wait(replayed(3.0), 0.0)  # none/static: the harness started the process
    assert started_itself is not None and isolation.task_duration(started_itself) == 12.0
    queued = isolation.charge_wait(replayed(9.0), 14.0)  # queued 14 s by admission, ready 9 s late
    assert queued is not None and isolation.task_duration(queued) == 21.0
    begun_in_time = isolation.charge_wait(replayed(0.0), 0.4)  # a short queue that did not make it late
    assert begun_in_time is not None and isolation.task_duration(begun_in_time) == 12.0
    slow_begin = isolation.charge_wait(replayed(2.5), 1.0)  # late by 2.5 s, 1 s of it refused and retried
    assert slow_begin is not None and isolation.task_duration(slow_begin) == 13.0
    assert isolation.charge_wait(None, 1.0) is None
    assert isolation.task_duration(replayed(3.0)) == 15.0  # results from before start_wait: all of it counts


def test_an_admission_refusal_is_retried_after_its_hint_and_nothing_else_is() -> None:
    import grpc
    import isolation

    class Refusal(grpc.RpcError):
        def __init__(self, code: grpc.StatusCode, details: str) -> None:
            self._code, self._details = code, details

        def code(self) -> grpc.StatusCode:
            return self._code

        def details(self) -> str:
            return self._details

    hint = "admission refused: 453 MiB does not fit sessions: 210 MiB available; retry after 5 s"
    assert isolation.retry_after(Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, hint)) == 5.0
    never = "admission refused: 2 GiB can never fit sessions (1.1 GiB): declare less"
    assert isolation.retry_after(Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, never)) is None
    assert isolation.retry_after(Refusal(grpc.StatusCode.PERMISSION_DENIED, hint)) is None


def test_the_tables_come_back_from_results_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--summarize prints the tables of an interrupted benchmark from what results.json kept after each round."""
    import isolation

    summary = {"grow_p95": 0.2, "grow_p99": 0.3}
    base = {"dask": {"duration": 10.0, "p95": 0.1, "p99": 0.2}, "github3": {"duration": 5.0, "p95": 0.1, "p99": 0.1}}

    def outcome(member: str, role: str, trace: str, duration: float | None, kind: str = "") -> dict[str, Any]:
        return {"member": member, "role": role, "trace": trace, "survived": duration is not None, "kind": kind,
                "ended": 1.0, "duration": duration, "summary": summary if duration else None, "retries": 0}

    runs = [{"setup": "A", "limit": 1100 << 20, "config": "agentd-policy-on", "run": i, "baseline": base,
             "actions": [[0.5, "throttle low1"]], "reactions_ms": [40.0 + i], "agentd_cpu": 0.04 + 0.02 * i,
             "outcomes": [outcome("high", "HIGH", "dask", 11.0), outcome("low1", "LOW", "github3", 7.5),
                          outcome("low2", "LOW", "github3", None if i else 6.0, "KILLED" if i else "")]}
            for i in range(2)]
    (tmp_path / "results.json").write_text(json.dumps(runs))
    assert isolation.main(["--summarize", str(tmp_path / "results.json")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert any("agentd-policy-on" in line and " 5%  " in line for line in out)  # agentd's CPU share, median
    last = out[-1]
    assert last.startswith("all_survive_1100=1/2 high_survive=2/2 high_ratio=1.10 high_p95_ratio=2.00")
    assert "low_ratio=1.50" in last


def test_a_variant_is_a_policy_on_configuration_with_its_values_and_its_name() -> None:
    import isolation

    name = isolation.add_variant("slow:recover_dwell_seconds=2.0,throttle_reserve_min=134217728,enabled=true")
    try:
        assert name == "agentd-policy-on-slow"
        iso = isolation.CONFIGURATIONS[name]
        assert iso.agentd and iso.overrides(True) == {"policy": {
            "enabled": True, "recover_dwell_seconds": 2.0, "throttle_reserve_min": 134217728}}
        assert iso.overrides(False) is None  # an agentd without [policy] cannot run it
    finally:
        isolation.CONFIGURATIONS.pop(name, None)
    for wrong in ("slow", "slow:", ":a=1", "slow:a"):
        with pytest.raises(ValueError):
            isolation.add_variant(wrong)
