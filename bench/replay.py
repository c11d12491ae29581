"""Trace replayer: keep a base allocation plus an agent trace's memory curve resident, sped up, and time every
allocation step. Standard library only: it runs in the testbed guest under Debian's python3 (no numpy).

A trace is a folder of ../shared/traces (resources.json: container memory samples, about one per second;
tool_calls.json: the agent's tool calls); see that folder's README. The replayer walks the samples at
`speedup` times real time; at each sample it grows or shrinks its resident memory to base + the sample's memory
(whole pages), in steps of at most one chunk (64 MiB by default, as the AgentCgroup paper's replayer), each step
timed. Growing writes every new page (anonymous private memory: charged to the process's cgroup at once);
shrinking gives pages back with MADV_DONTNEED. The gap between two samples (divided by the speed-up) is the
agent's own time and starts when the previous sample's steps are done: a slow step (memory.high throttling,
reclaim, CPU) delays everything after it, as a slow tool call delays an agent. Solo, the duration is the
trace's span / speed-up plus the time of its steps; any slowdown adds to it.

    python3 bench/replay.py ../shared/traces/haiku/dask__dask-11628 --base 100M --speedup 10 [--out FILE]
        [--start-at MONOTONIC_SECONDS] [--chunk 64M]

Output: one JSON document (stdout, or --out written atomically at the end): the schedule's parameters, every
step (`at`: seconds from the replay's start, `kind` grow|shrink|base, `bytes`, `latency`, `lag`: how far its
sample started behind the trace's own clock, `sample`, `call`: index of the tool call whose window holds the
sample or -1), each tool call's memory curve, the total `duration` and the grow steps' latency percentiles.
--start-at (CLOCK_MONOTONIC, shared by every process of the machine) lets several replayers start their
schedules at the same moment once their base is resident; the base allocation itself is timed apart (kind
"base") and not part of the duration.
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

MIB = 1 << 20
PAGE = mmap.PAGESIZE
DEFAULT_CHUNK = 64 * MIB  # the AgentCgroup paper's allocation unit
DEFAULT_BASE = 100 * MIB  # the paper's base allocation per session
FILL_BYTES = 1 * MIB  # the pattern written into new pages, one slice at a time (no large temporary buffer)
# Decimal units as podman prints them (go-units HumanSize); binary ones accepted too.
UNITS = {
    "B": 1, "kB": 1000, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
    "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40,
}
SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")
# podman reports "0B / 0B" once the container has stopped (no limit either): no measurement, not an empty container.
STOPPED = "0B / 0B"


class TraceError(ValueError):
    """The trace folder or one of its values cannot be read; the message says which."""


@dataclass(frozen=True)
class Sample:
    epoch: float
    memory: int  # bytes


@dataclass(frozen=True)
class ToolCall:
    id: str
    tool: str
    start: float  # epoch seconds
    end: float


@dataclass(frozen=True)
class Trace:
    name: str
    samples: tuple[Sample, ...]
    calls: tuple[ToolCall, ...]

    @property
    def span(self) -> float:
        return self.samples[-1].epoch - self.samples[0].epoch

    @property
    def peak(self) -> int:
        return max(s.memory for s in self.samples)


@dataclass(frozen=True)
class CallCurve:
    """One tool call's share of the memory curve: the samples inside its window (or, for a call shorter than the
    sampling interval, the last sample before it), offsets in trace seconds from the first sample."""

    index: int
    tool: str
    start: float  # trace seconds
    end: float
    samples: tuple[int, ...]  # indexes into Trace.samples
    start_memory: int
    peak: int

    @property
    def growth(self) -> int:
        return self.peak - self.start_memory


@dataclass(frozen=True)
class Target:
    at: float  # replay seconds from the start (trace offset / speedup)
    resident: int  # bytes to hold: base + the sample's memory, whole pages
    sample: int
    call: int  # the tool call whose window holds the sample, -1 when none


# ------------------------------------------------------------------------------------------------ parsing


def parse_size(text: str) -> int:
    """'185.5MB / 134.5GB' (podman's usage / limit) or '185.5MB' -> bytes of the first value."""
    value = text.split("/", 1)[0]
    match = SIZE_RE.match(value)
    if not match or match.group(2) not in UNITS:
        raise TraceError(f"not a size: {text!r}")
    return round(float(match.group(1)) * UNITS[match.group(2)])


def parse_utc(text: str) -> float:
    """An ISO-8601 UTC timestamp ('2026-02-07T01:47:17.879Z') -> Unix seconds."""
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError) as exc:
        raise TraceError(f"not an ISO-8601 timestamp: {text!r}") from exc


def parse_samples(document: Any) -> tuple[Sample, ...]:
    """resources.json's samples, by epoch (the local-time `timestamp` carries no zone and is ignored); samples of
    a stopped container are left out."""
    try:
        raw = document["samples"]
        samples = [Sample(float(s["epoch"]), parse_size(s["mem_usage"])) for s in raw
                   if s["mem_usage"].strip() != STOPPED]
    except (KeyError, TypeError) as exc:
        raise TraceError(f"resources.json: missing field {exc}") from exc
    if len(samples) < 2:
        raise TraceError("resources.json: fewer than two memory samples")
    return tuple(sorted(samples, key=lambda s: s.epoch))


def parse_calls(document: Any) -> tuple[ToolCall, ...]:
    """tool_calls.json -> calls by start time; a call without an end lasts an instant."""
    try:
        calls = []
        for raw in document:
            start = parse_utc(raw["timestamp"])
            end = parse_utc(raw["end_timestamp"]) if raw.get("end_timestamp") else start
            calls.append(ToolCall(str(raw.get("id", "")), str(raw.get("tool", "")), start, max(start, end)))
    except (KeyError, TypeError) as exc:
        raise TraceError(f"tool_calls.json: missing field {exc}") from exc
    return tuple(sorted(calls, key=lambda c: c.start))


def load_trace(folder: str | Path) -> Trace:
    path = Path(folder)
    try:
        resources = json.loads((path / "resources.json").read_text())
        calls_path = path / "tool_calls.json"
        calls = json.loads(calls_path.read_text()) if calls_path.exists() else []
    except (OSError, json.JSONDecodeError) as exc:
        raise TraceError(f"{path}: {exc}") from exc
    return Trace(path.name, parse_samples(resources), parse_calls(calls))


# ------------------------------------------------------------------------------------------------ the curve


def call_curves(trace: Trace) -> list[CallCurve]:
    """Each tool call's window joined with the samples by epoch."""
    t0 = trace.samples[0].epoch
    curves = []
    for index, call in enumerate(trace.calls):
        inside = tuple(i for i, s in enumerate(trace.samples) if call.start <= s.epoch <= call.end)
        before = [i for i, s in enumerate(trace.samples) if s.epoch < call.start]
        held = inside or ((before[-1],) if before else (0,))
        start_memory = trace.samples[before[-1] if before else held[0]].memory
        peak = max(start_memory, *(trace.samples[i].memory for i in held))
        curves.append(CallCurve(index, call.tool, call.start - t0, call.end - t0, inside, start_memory, peak))
    return curves


def call_at(trace: Trace, epoch: float) -> int:
    """Index of the latest-starting tool call whose window holds `epoch`, -1 when none."""
    found = -1
    for index, call in enumerate(trace.calls):
        if call.start <= epoch <= call.end:
            found = index
    return found


def page_round(n: int) -> int:
    return n // PAGE * PAGE


def schedule(trace: Trace, base: int, speedup: float) -> list[Target]:
    """The replay's targets: base + each sample's memory, at the sample's trace offset divided by the speed-up."""
    if speedup <= 0:
        raise ValueError("speedup must be positive")
    t0 = trace.samples[0].epoch
    return [Target((s.epoch - t0) / speedup, page_round(base + s.memory), i, call_at(trace, s.epoch))
            for i, s in enumerate(trace.samples)]


def plan_steps(current: int, target: int, chunk: int) -> list[int]:
    """Signed byte counts (+ grow, - shrink) that take `current` to `target`, none larger than a chunk."""
    if chunk <= 0:
        raise ValueError("chunk must be positive")
    delta = target - current
    sign = 1 if delta > 0 else -1
    full, rest = divmod(abs(delta), chunk)
    return [sign * chunk] * full + ([sign * rest] if rest else [])


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the closest ranks; nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


# ------------------------------------------------------------------------------------------------ memory


class Resident:
    """Anonymous private memory held in mappings of one chunk each; only a prefix of the last one is resident."""

    def __init__(self, chunk: int) -> None:
        if chunk % PAGE:
            raise ValueError(f"chunk must be a multiple of the page size ({PAGE})")
        self.chunk = chunk
        self.maps: list[mmap.mmap] = []
        self.top = 0  # resident bytes of the last mapping
        self.pattern = memoryview(b"\xa5" * FILL_BYTES)  # not zero: a write that really dirties each page

    @property
    def size(self) -> int:
        return (len(self.maps) - 1) * self.chunk + self.top if self.maps else 0

    def grow(self, n: int) -> None:
        while n > 0:
            if not self.maps or self.top == self.chunk:
                self.maps.append(mmap.mmap(-1, self.chunk, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                           prot=mmap.PROT_READ | mmap.PROT_WRITE))
                self.top = 0
            k = min(n, self.chunk - self.top)
            self._fill(self.maps[-1], self.top, k)
            self.top += k
            n -= k

    def shrink(self, n: int) -> None:
        while n > 0 and self.maps:
            k = min(n, self.top)
            self.maps[-1].madvise(mmap.MADV_DONTNEED, self.top - k, k)
            self.top -= k
            n -= k
            if self.top == 0:
                self.maps.pop().close()
                self.top = self.chunk if self.maps else 0

    def _fill(self, buf: mmap.mmap, start: int, n: int) -> None:
        end = start + n
        for off in range(start, end, FILL_BYTES):
            k = min(FILL_BYTES, end - off)
            buf[off:off + k] = self.pattern[:k]

    def close(self) -> None:
        while self.maps:
            self.maps.pop().close()
        self.top = 0


# ------------------------------------------------------------------------------------------------ replay


def step_record(at: float, kind: str, nbytes: int, latency: float, lag: float, target: Target | None) -> dict[str, Any]:
    return {"at": round(at, 6), "kind": kind, "bytes": nbytes, "latency": round(latency, 6), "lag": round(lag, 6),
            "sample": target.sample if target else -1, "call": target.call if target else -1}


def grow_latencies(steps: Sequence[dict[str, Any]]) -> list[float]:
    return [float(s["latency"]) for s in steps if s["kind"] == "grow"]


def summarize(steps: Sequence[dict[str, Any]]) -> dict[str, float | int]:
    lat = grow_latencies(steps)
    return {"grow_steps": len(lat), "grow_p50": percentile(lat, 50), "grow_p95": percentile(lat, 95),
            "grow_p99": percentile(lat, 99), "grow_max": max(lat) if lat else math.nan}


def replay(trace: Trace, base: int, speedup: float, chunk: int, start_at: float | None = None) -> dict[str, Any]:
    targets = schedule(trace, base, speedup)
    memory = Resident(chunk)
    steps: list[dict[str, Any]] = []
    try:
        for n in plan_steps(0, page_round(base), chunk):
            began = time.monotonic()
            memory.grow(n)
            steps.append(step_record(0.0, "base", n, time.monotonic() - began, 0.0, None))
        late_start = 0.0
        if start_at is not None:
            late_start = max(0.0, time.monotonic() - start_at)
            time.sleep(max(0.0, start_at - time.monotonic()))
        t0 = time.monotonic()
        started_unix = time.time()
        due = t0
        for i, target in enumerate(targets):
            # The gap since the previous sample is the agent's own time (thinking, waiting for its model): it
            # starts once the previous sample's steps are done, so every slow step delays the rest of the replay.
            due += target.at - (targets[i - 1].at if i else 0.0)
            time.sleep(max(0.0, due - time.monotonic()))
            due = max(due, time.monotonic())
            lag = due - (t0 + target.at)
            for n in plan_steps(memory.size, target.resident, chunk):
                began = time.monotonic()
                if n > 0:
                    memory.grow(n)
                else:
                    memory.shrink(-n)
                steps.append(step_record(began - t0, "grow" if n > 0 else "shrink", abs(n),
                                         time.monotonic() - began, lag, target))
            due = time.monotonic()
        duration = time.monotonic() - t0
    finally:
        memory.close()
    return {
        "trace": trace.name, "base": base, "speedup": speedup, "chunk": chunk, "page": PAGE,
        "scheduled": targets[-1].at, "duration": round(duration, 6), "start_monotonic": t0,
        "started_unix": started_unix, "late_start": round(late_start, 6), "peak": max(t.resident for t in targets),
        "summary": summarize(steps), "steps": steps,
        "calls": [asdict(c) | {"growth": c.growth} for c in call_curves(trace)],
    }


def write_json(document: dict[str, Any], out: str | None) -> None:
    text = json.dumps(document, separators=(",", ":"))
    if out is None:
        sys.stdout.write(text + "\n")
        return
    tmp = f"{out}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, out)


def size_arg(text: str) -> int:
    """'100M', '64MiB', '1G', or bytes (binary multiples: the replayer allocates pages, not podman units)."""
    match = re.match(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:i?B)?\s*$", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    power = "BKMGT".index(match.group(2).upper() or "B")
    return int(float(match.group(1)) * (1 << (10 * power)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("trace", help="a trace folder (resources.json, tool_calls.json)")
    parser.add_argument("--base", type=size_arg, default=DEFAULT_BASE, help="base allocation (default 100M)")
    parser.add_argument("--speedup", type=float, default=50.0, help="times real time (default 50)")
    parser.add_argument("--chunk", type=size_arg, default=DEFAULT_CHUNK, help="largest step (default 64M)")
    parser.add_argument("--start-at", type=float, default=None,
                        help="CLOCK_MONOTONIC time at which the schedule starts (after the base is resident)")
    parser.add_argument("--out", default=None, help="write the JSON here instead of stdout")
    args = parser.parse_args(argv)
    try:
        trace = load_trace(args.trace)
    except TraceError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    write_json(replay(trace, args.base, args.speedup, args.chunk, args.start_at), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
