"""The isolation benchmark (issue 10): HIGH and LOW agent sessions replay real memory traces under a shared memory
limit; does the HIGH session survive, and does it notice its neighbours?

Runs inside the testbed guest as root (cgroup v2 with the memory controller, swap off): `make bench-isolation`.
Each session runs bench/replay.py (base + the trace's memory curve, sped up, every allocation step timed).

Setups
  A  the AgentCgroup paper's: HIGH replays dask__dask-11628, two LOW sessions sigmavirus24__github3.py-673, each
     with a 100 MiB base, under a shared limit of 1100 MiB (tight) and 1300 MiB (moderate).
  B  1 HIGH + 4 LOW: the five traces with the largest peaks among the others (HIGH: the largest), limit
     0.75 x the sum of their peaks + bases.
Configurations (pluggable: CONFIGURATIONS)
  none               plain cgroups, one per session, under one parent with memory.max = the limit
  static             the same, each session's memory.max = limit / sessions
  agentd-policy-off  a real agentd (its own cgroup root): sessions/ memory.max = the limit, sessions with
                     priority HIGH / LOW, each replayer run as a tool call through agentd.client;
                     `[policy] enabled = false` when this agentd knows a [policy] section
  agentd-policy-on   the same with `[policy] enabled = true`; reported unavailable while agentd has no [policy]
Every round (one run of each limit) of a configuration starts with the setup's traces solo (alone, no limit): the
denominators of that round's ratios, measured minutes apart at most on a host whose speed drifts.

Per setup, limit and configuration: survival (runs in which every session completed), sessions completed, HIGH
completed, HIGH duration / solo, HIGH P95 and P99 allocation latency / solo, LOW duration / solo (medians over
runs; a duration counts a late start only as far as admission made the session wait, not the replayers' own
start-up: charge_wait), kills and their kind, and the policy's reaction p50/p99 when agentd logs it (a
`reaction_ms` field).
A timeline PNG per setup, limit and configuration (its first run): memory per session, limit, kills and policy
actions. Results in --out (results.json, the raw replays, the PNGs). The last line, for setup A with the best
agentd configuration that ran (policy-on, else policy-off, else static, else none):

  all_survive_1100=<k>/<n> high_survive=<k>/<n> high_ratio=<median> high_p95_ratio=<x> low_ratio=<median>
  reaction_p99_ms=<x or nan>

high_survive counts every run of every setup and limit; the ratios take the worse of setup A's two limits.

    python3 bench/isolation.py [--setup A,B] [--configs none,static,agentd-policy-off,agentd-policy-on]
        [--runs 1] [--speedup 10] [--traces DIR] [--out DIR] [--limits 1100,...]
        [--variant NAME:key=value,...]... [--summarize RESULTS_JSON]

--variant adds a configuration agentd-policy-on-NAME with those [policy] values, interleaved with the others:
a tuning is compared within one run (e.g. `--limits 1100 --configs agentd-policy-on --variant
slow:recover_dwell_seconds=2.0`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]

import replay  # noqa: E402  (a sibling script, found through sys.path)
import timeline_png  # noqa: E402

from agentd.kernel import cgroupfs  # noqa: E402
from agentd.kernel.mounts import cgroup2_mount  # noqa: E402

MIB = 1 << 20
BASE = 100 * MIB
SETUP_A_HIGH = "dask__dask-11628"
SETUP_A_LOW = "sigmavirus24__github3.py-673"
SETUP_A_LIMITS = (1100 * MIB, 1300 * MIB)
SETUP_B_SESSIONS = 5
SETUP_B_LIMIT_RATIO = 0.75
# Under TCG one 64 MiB step takes ~0.1-0.35 s in the guest (the host: ~0.01-0.04 s): at the paper's 50x a trace
# sample is due every 21 ms, so the replay would be paced by the emulator's page faults, not by the trace.
# 10x keeps the step shorter than about one sample interval, as 50x does on real hardware (docs/benchmarks.md).
DEFAULT_SPEEDUP = 10.0
# Replayers start their schedules together this long after launch (python3 start + base allocation under TCG).
START_LEAD_SECONDS = 6.0
KIND_WIDTH = 60  # how much of an outcome's kind (e.g. an error message) the table shows
SAMPLE_SECONDS = 0.1  # memory.current of each session for the timeline
# A run is stopped (and counted as timed out) after lead + this many times its schedule + RUN_GRACE_SECONDS.
RUN_TIMEOUT_FACTOR = 10.0
RUN_GRACE_SECONDS = 120.0
# Declared memory of a replay tool call above base + the trace's peak: the interpreter's own memory.
INTERPRETER_SLACK = 32 * MIB
DAEMON_START_SECONDS = 180.0  # agentd imports grpc & co. in ~5-7 s under TCG; BPF loading adds more
VENV_PYTHON = Path("/opt/agentd-venv/bin/python")  # the guest image's interpreter with grpc (agentd's deps)
TRACE_DIRS = (REPO / "build" / "bench-isolation" / "traces", REPO.parent / "shared" / "traces" / "haiku")
DEFAULT_OUT = REPO / "build" / "bench-isolation"
SUMMARY_PREFERENCE = ("agentd-policy-on", "agentd-policy-off", "static", "none")


# ------------------------------------------------------------------------------------------------ setups


@dataclass(frozen=True)
class Member:
    name: str  # high, low1, ...
    role: str  # HIGH or LOW
    trace: Path
    peak: int


@dataclass(frozen=True)
class Setup:
    name: str
    members: tuple[Member, ...]
    limits: tuple[int, ...]


def member(name: str, role: str, folder: Path) -> Member:
    return Member(name, role, folder, replay.load_trace(folder).peak)


def setup_a(traces: Path) -> Setup:
    members = (member("high", "HIGH", traces / SETUP_A_HIGH), member("low1", "LOW", traces / SETUP_A_LOW),
               member("low2", "LOW", traces / SETUP_A_LOW))
    return Setup("A", members, SETUP_A_LIMITS)


def pick_setup_b(peaks: dict[str, int], base: int) -> tuple[list[str], int]:
    """The five largest peaks among the traces not in setup A (the largest is HIGH) and the limit, 0.75 x the
    sum of their peaks + bases, whole MiB."""
    others = sorted((n for n in peaks if n not in (SETUP_A_HIGH, SETUP_A_LOW)), key=lambda n: (-peaks[n], n))
    chosen = others[:SETUP_B_SESSIONS]
    limit = int(SETUP_B_LIMIT_RATIO * sum(peaks[n] + base for n in chosen)) // MIB * MIB
    return chosen, limit


def setup_b(traces: Path) -> Setup:
    peaks = {p.name: replay.load_trace(p).peak for p in sorted(traces.iterdir()) if (p / "resources.json").exists()}
    chosen, limit = pick_setup_b(peaks, BASE)
    members = tuple(Member("high" if i == 0 else f"low{i}", "HIGH" if i == 0 else "LOW", traces / n, peaks[n])
                    for i, n in enumerate(chosen))
    return Setup("B", members, (limit,))


# ------------------------------------------------------------------------------------------------ one run


@dataclass
class Outcome:
    """How one session's replay ended."""

    member: Member
    survived: bool = False
    kind: str = ""  # empty when it survived: OOM(own), OOM(parent), OUTCOME_*..., refused CODE, timeout, exit N
    ended: float = math.nan  # seconds from the run's start
    replay: dict[str, Any] | None = None
    retries: int = 0  # Begins refused (retryable) and tried again after the hint
    refused_for: float = 0.0  # seconds from the first Begin to the last one, when Begins were refused


@dataclass
class RunRecord:
    setup: str
    limit: int  # 0 = none (solo)
    config: str
    index: int
    outcomes: list[Outcome]
    timeline: dict[str, list[tuple[float, int]]]
    actions: list[tuple[float, str]] = field(default_factory=list)  # policy actions (seconds, label)
    reactions_ms: list[float] = field(default_factory=list)
    baseline: dict[str, dict[str, float]] = field(default_factory=dict)  # solo numbers of the same round, by trace
    agentd_cpu: float = math.nan  # agentd's CPU time over the run, in CPUs (seconds of CPU per second)


def replay_argv(m: Member, speedup: float, start_at: float, out: Path) -> list[str]:
    python = shutil.which("python3") or sys.executable  # Debian's python3: the replayer needs nothing else
    return [python, str(HERE / "replay.py"), str(m.trace), "--base", str(BASE), "--speedup", str(speedup),
            "--start-at", f"{start_at:.6f}", "--out", str(out)]


def load_replay(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data


def sample_until(done: Callable[[], bool], cgroups: dict[str, Path], t0: float, deadline: float
                 ) -> tuple[dict[str, list[tuple[float, int]]], bool]:
    """memory.current of each session every SAMPLE_SECONDS until done() or the deadline; (timeline, timed out)."""
    timeline: dict[str, list[tuple[float, int]]] = {name: [] for name in cgroups}
    while not done():
        if time.monotonic() > deadline:
            return timeline, True
        now = time.monotonic() - t0
        for name, path in cgroups.items():
            with contextlib.suppress(OSError, ValueError):
                timeline[name].append((round(now, 3), cgroupfs.memory_current(path)))
        time.sleep(SAMPLE_SECONDS)
    return timeline, False


def run_timeout(members: Sequence[Member], speedup: float) -> float:
    longest = max(replay.load_trace(m.trace).span for m in members) / speedup
    return START_LEAD_SECONDS + RUN_TIMEOUT_FACTOR * longest + RUN_GRACE_SECONDS


# ------------------------------------------------------------------------------------------------ plain cgroups


def plain_kind(leaf_events: dict[str, int], status: int) -> str:
    """Why a replayer in a plain cgroup died: its own limit's OOM killer, its parent's, or something else."""
    if leaf_events.get("oom_kill", 0) > 0:
        return "OOM(own)" if leaf_events.get("oom", 0) > 0 else "OOM(parent)"
    return f"signal {-status}" if status < 0 else f"exit {status}"


def run_plain(setup: str, members: Sequence[Member], limit: int, per_member: int, config: str, index: int,
              speedup: float, rundir: Path) -> RunRecord:
    """Replay each member in its own leaf under one parent (memory.max = limit, 0 = none; each leaf per_member)."""
    root = cgroup2_mount().path / f"agentd-bench-{os.getpid()}"
    cgroupfs.make(root)
    try:
        cgroupfs.enable_controllers(root, ["memory"])
        cgroupfs.write_file(f"{root}/memory.max", str(limit) if limit else "max")
        with contextlib.suppress(OSError):
            cgroupfs.write_file(f"{root}/memory.swap.max", "0")
        leaves = {m.name: root / m.name for m in members}
        for m in members:
            cgroupfs.make(leaves[m.name])
            if per_member:
                cgroupfs.write_file(f"{leaves[m.name]}/memory.max", str(per_member))
        return _run_plain_in(setup, members, limit, config, index, speedup, rundir, root, leaves)
    finally:
        cgroupfs.remove_tree(root)


def _run_plain_in(setup: str, members: Sequence[Member], limit: int, config: str, index: int, speedup: float,
                  rundir: Path, root: Path, leaves: dict[str, Path]) -> RunRecord:
    t0 = time.monotonic()
    start_at = t0 + START_LEAD_SECONDS
    procs: dict[str, subprocess.Popen[bytes]] = {}
    outcomes = {m.name: Outcome(m) for m in members}
    for m in members:
        with (rundir / f"{m.name}.log").open("wb") as log:
            # The shell moves itself into the leaf, then execs the replayer: it runs there from its first byte.
            procs[m.name] = subprocess.Popen(
                ["/bin/sh", "-c", 'echo 0 > "$0" && exec "$@"', f"{leaves[m.name]}/cgroup.procs",
                 *replay_argv(m, speedup, start_at, rundir / f"{m.name}.json")], stdout=log, stderr=log)

    def done() -> bool:
        for name, proc in procs.items():
            if proc.poll() is not None and math.isnan(outcomes[name].ended):
                outcomes[name].ended = time.monotonic() - start_at
        return all(p.poll() is not None for p in procs.values())

    timeline, timed_out = sample_until(done, leaves, start_at, t0 + run_timeout(members, speedup))
    if timed_out:
        cgroupfs.kill(root)
    for m in members:
        status = procs[m.name].wait()
        out = outcomes[m.name]
        out.replay = charge_wait(load_replay(rundir / f"{m.name}.json"), 0.0)
        out.survived = status == 0 and out.replay is not None
        if not out.survived:
            events = cgroupfs.parse_flat_keyed(cgroupfs.read_text(f"{leaves[m.name]}/memory.events"))
            out.kind = "timeout" if timed_out else plain_kind(events, status)
    return RunRecord(setup, limit, config, index, list(outcomes.values()), timeline)


# ------------------------------------------------------------------------------------------------ agentd


@dataclass(frozen=True)
class Isolation:
    """A configuration: plain cgroups (static: each session limit / n) or a real agentd with config overrides
    (a function of whether this agentd knows `[policy]`; None = this configuration cannot run here)."""

    name: str
    agentd: bool = False
    static: bool = False
    overrides: Callable[[bool], dict[str, dict[str, Any]] | None] = lambda _policy: {}


CONFIGURATIONS: dict[str, Isolation] = {
    "none": Isolation("none"),
    "static": Isolation("static", static=True),
    "agentd-policy-off": Isolation(
        "agentd-policy-off", agentd=True, overrides=lambda policy: {"policy": {"enabled": False}} if policy else {}),
    "agentd-policy-on": Isolation(
        "agentd-policy-on", agentd=True, overrides=lambda policy: {"policy": {"enabled": True}} if policy else None),
}


def add_variant(spec: str) -> str:
    """Register agentd-policy-on-NAME from "NAME:key=value,key=value" (values: JSON numbers/booleans/strings)."""
    name, sep, pairs = spec.partition(":")
    if not sep or not name or not pairs:
        raise ValueError("expected NAME:KEY=VALUE[,KEY=VALUE]")
    values: dict[str, Any] = {"enabled": True}
    for pair in pairs.split(","):
        key, eq, raw = pair.partition("=")
        if not eq:
            raise ValueError(f"{pair!r} is not KEY=VALUE")
        try:
            values[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            values[key.strip()] = raw
    config = f"agentd-policy-on-{name}"
    CONFIGURATIONS[config] = Isolation(
        config, agentd=True, overrides=lambda policy: {"policy": dict(values)} if policy else None)
    return config


def agentd_knows_policy() -> bool:
    """Whether this agentd's configuration accepts a [policy] section."""
    from agentd.core.config import ConfigError, load_config

    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write("[policy]\nenabled = false\n")
        f.flush()
        try:
            load_config(Path(f.name))
        except ConfigError:
            return False
    return True


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def toml_value(value: Any) -> str:
    return json.dumps(value)  # strings, numbers, booleans and lists are valid TOML this way too


class Agentd:
    """A real agentd on its own cgroup root, sockets and state, started with the configuration's overrides."""

    def __init__(self, workdir: Path, overrides: dict[str, dict[str, Any]], profile: Path | None = None) -> None:
        self.workdir = workdir
        self.profile = profile  # cProfile's statistics of the daemon, written when it stops
        self.cgroup_root = cgroup2_mount().path / f"agentd-bench-{os.getpid()}-agentd"
        self.admin_socket = workdir / "admin.sock"
        self.log = workdir / "agentd.log"
        sections: dict[str, dict[str, Any]] = {
            "daemon": {"cgroup_root": str(self.cgroup_root), "state_dir": str(workdir / "state"),
                       "log_level": "info"},
            "api": {"admin_socket": str(self.admin_socket), "sandbox_socket": str(workdir / "sandbox.sock"),
                    "join_socket": str(workdir / "join.sock")},
            "metrics": {"address": ""},
        }
        for section, values in overrides.items():
            sections.setdefault(section, {}).update(values)
        self.config = workdir / "agentd.toml"
        self.config.write_text("".join(f"[{s}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in kv.items())
                                       for s, kv in sections.items()))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            profiler = ["-m", "cProfile", "-o", str(self.profile)] if self.profile else []
            self.proc = subprocess.Popen([sys.executable, *profiler, "-m", "agentd.daemon", "--config",
                                          str(self.config)], stdout=log, stderr=log, env=child_env(), cwd=REPO)
        deadline = time.monotonic() + DAEMON_START_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agentd exited with {self.proc.returncode}: {self.last_log_line()}")
            if b'"agentd ready"' in self.log.read_bytes():
                return
            time.sleep(0.1)
        raise RuntimeError(f"agentd not ready in {DAEMON_START_SECONDS:.0f} s: {self.last_log_line()}")

    def last_log_line(self) -> str:
        lines = self.log.read_text(errors="replace").strip().splitlines() if self.log.exists() else []
        return lines[-1][-300:] if lines else "(no output)"

    def log_lines(self, since: float) -> list[dict[str, Any]]:
        """agentd's structured log lines (JSON) logged at or after `since` (Unix time)."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                data = json.loads(line)
                if isinstance(data, dict) and float(data.get("ts", 0)) >= since:
                    found.append(data)
        return found

    def cpu_seconds(self) -> float:
        """agentd's CPU time so far (user + system), from /proc: what the daemon takes from the replayers."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(60)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            cgroupfs.remove_tree(self.cgroup_root)


def agentd_kind(result: Any) -> str:
    """A tool call's outcome as a kill kind: OUTCOME_OOM_KILLED/OOM_SCOPE_SESSIONS, OUTCOME_KILLED_BY_POLICY..."""
    from agentd.api.gen import agentd_pb2 as pb

    kind = str(pb.Outcome.Name(result.outcome))
    if result.outcome == pb.OUTCOME_OOM_KILLED:
        kind += "/" + str(pb.OomScope.Name(result.oom_scope))
    return kind


def policy_marks(lines: Sequence[dict[str, Any]], since: float, names: dict[str, str]
                 ) -> tuple[list[tuple[float, str]], list[float]]:
    """Policy actions (a log line of an agentd.policy logger with an `action`) and reaction times (`reaction_ms`,
    or `reaction_seconds`) from agentd's log, times relative to `since`; sessions by their member names."""
    actions, reactions = [], []
    for line in lines:
        if str(line.get("logger", "")).startswith("agentd.policy") and line.get("action"):
            victim = str(line.get("session", line.get("victim", "")))
            label = f"{line['action']} {names.get(victim, victim)}".strip()
            actions.append((float(line["ts"]) - since, label))
        if isinstance(line.get("reaction_ms"), int | float):
            reactions.append(float(line["reaction_ms"]))
        elif isinstance(line.get("reaction_seconds"), int | float):
            reactions.append(1000.0 * float(line["reaction_seconds"]))
    return actions, reactions


def run_agentd(daemon: Agentd, setup: str, members: Sequence[Member], limit: int, config: str, index: int,
               speedup: float, rundir: Path) -> RunRecord:
    """Sessions HIGH/LOW under sessions/ memory.max = limit; each replayer runs as a tool call of its session."""
    from agentd.api.gen import agentd_pb2 as pb
    from agentd.client import Client

    sessions_dir = daemon.cgroup_root / "sessions"
    cgroupfs.write_file(f"{sessions_dir}/memory.max", str(limit))
    with contextlib.suppress(OSError):
        cgroupfs.write_file(f"{sessions_dir}/memory.swap.max", "0")
    admin = Client(str(daemon.admin_socket), timeout=120)
    ids: dict[str, str] = {}
    try:
        cgroups: dict[str, Path] = {}
        for m in members:
            priority = pb.PRIORITY_HIGH if m.role == "HIGH" else pb.PRIORITY_LOW
            reply = admin.call("CreateSession", pb.CreateSessionRequest(spec=pb.SessionSpec(priority=priority)))
            ids[m.name] = reply.session.spec.id
            cgroups[m.name] = Path(reply.session.cgroup)
        return _run_calls(daemon, setup, members, limit, config, index, speedup, rundir, ids, cgroups)
    finally:
        for sid in ids.values():
            with contextlib.suppress(Exception):
                admin.call("DeleteSession", pb.DeleteSessionRequest(session_id=sid, force=True))
        admin.close()
        with contextlib.suppress(OSError):
            cgroupfs.write_file(f"{sessions_dir}/memory.max", "max")


def retry_after(exc: Any) -> float | None:
    """The retry-after hint of a retryable RESOURCE_EXHAUSTED refusal (admission), None for any other error."""
    import grpc

    if exc.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    found = re.search(r"retry after ([0-9.]+) s", exc.details() or "")
    return float(found.group(1)) if found else None


def _run_calls(daemon: Agentd, setup: str, members: Sequence[Member], limit: int, config: str, index: int,
               speedup: float, rundir: Path, ids: dict[str, str], cgroups: dict[str, Path]) -> RunRecord:
    import grpc

    from agentd.client import Client, RunError

    since_unix = time.time()
    t0 = time.monotonic()
    cpu0 = daemon.cpu_seconds()
    start_at = t0 + START_LEAD_SECONDS
    outcomes = {m.name: Outcome(m) for m in members}
    finished: dict[str, Any] = {}

    def call(m: Member) -> None:
        client = Client(str(daemon.admin_socket), timeout=120)
        deadline = start_at + run_timeout(members, speedup)
        try:
            argv = replay_argv(m, speedup, start_at, rundir / f"{m.name}.json")
            while True:
                try:
                    done = client.run(argv, session_id=ids[m.name], tool="replay",
                                      expected_memory_bytes=BASE + m.peak + INTERPRETER_SLACK,
                                      timeout_seconds=max(deadline - time.monotonic(), 1.0))
                    break
                except grpc.RpcError as exc:
                    # As an agent would: a retryable refusal (admission) is retried after its hint; the wait
                    # counts against the session's duration (the replay starts late).
                    wait = retry_after(exc)
                    if wait is None or time.monotonic() + wait >= deadline:
                        raise
                    outcomes[m.name].retries += 1
                    time.sleep(wait)
                    outcomes[m.name].refused_for = time.monotonic() - t0
            finished[m.name] = done.result
        except grpc.RpcError as exc:  # refused for good: this session's outcome, not the harness's
            finished[m.name] = f"refused {exc.code().name}"
        except (RunError, OSError) as exc:
            finished[m.name] = f"not started: {exc}"  # in full in results.json; the table shortens it
        finally:
            outcomes[m.name].ended = time.monotonic() - start_at
            client.close()

    threads = [threading.Thread(target=call, args=(m,), daemon=True) for m in members]
    for thread in threads:
        thread.start()
    timeline, timed_out = sample_until(lambda: not any(t.is_alive() for t in threads), cgroups, start_at,
                                       t0 + run_timeout(members, speedup))
    if timed_out:
        for path in cgroups.values():
            with contextlib.suppress(OSError):
                cgroupfs.kill(path)
        for thread in threads:
            thread.join(60)
    lines = daemon.log_lines(since_unix)
    queued = {line.get("session"): float(line.get("waited_s", 0.0)) for line in lines
              if line.get("msg") == "admitted after waiting"}
    for m in members:
        out = outcomes[m.name]
        out.replay = charge_wait(load_replay(rundir / f"{m.name}.json"),
                                 out.refused_for + queued.get(ids[m.name], 0.0))
        result = finished.get(m.name)
        kind = "no result" if result is None else result if isinstance(result, str) else agentd_kind(result)
        out.survived = kind == "OUTCOME_OK" and out.replay is not None
        if not out.survived:
            out.kind = "timeout" if timed_out else kind.replace("\n", " ")
    cpu = (daemon.cpu_seconds() - cpu0) / (time.monotonic() - t0)
    start_unix = since_unix + START_LEAD_SECONDS
    names = {sid: name for name, sid in ids.items()}
    # The daemon's story of this run, for what the table can only summarise (a refusal, a kill, a failure).
    (rundir / "agentd.log").write_text("".join(json.dumps(line) + "\n" for line in lines))
    actions, reactions = policy_marks(lines, start_unix, names)
    return RunRecord(setup, limit, config, index, list(outcomes.values()), timeline, actions, reactions,
                     agentd_cpu=cpu)


# ------------------------------------------------------------------------------------------------ statistics


def charge_wait(replay: dict[str, Any] | None, waited: float) -> dict[str, Any] | None:
    """The replay with `start_wait`: how much of its late start the isolation caused, at most what admission
    made it wait (`waited`: Begins refused and retried, a Begin queued; 0 when the harness started the process
    itself). The rest of a late start is the harness's: the replayers' start-up (the interpreter, the trace, the
    base) and, through agentd, the harness's client threads' Begins (1-6 s for three at once under TCG, ~2 ms
    natively: bench/launch.py measures that cost)."""
    if replay is not None:
        replay["start_wait"] = round(min(float(replay.get("late_start", 0.0)), max(waited, 0.0)), 6)
    return replay


def task_duration(replay: dict[str, Any]) -> float:
    """A session's time from the common start to its end: the replay plus the part of its late start the
    isolation caused (charge_wait: an admission queue or a retried refusal counts against it, as it would against
    an agent's task). Not the replayers' own start-up beyond the lead: three of them starting at once on the
    emulator's two vCPUs took 0-11 s more than the solo's in every configuration alike, none included, and one
    replay's late start moved HIGH's ratio by up to 0.8. Results from before start_wait existed count all of
    late_start."""
    wait = replay.get("start_wait")
    return float(replay["duration"]) + float(replay.get("late_start", 0.0) if wait is None else wait)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def solo_baselines(solos: Sequence[RunRecord]) -> dict[str, dict[str, float]]:
    """Per trace: the solo duration and grow-step P95/P99 (medians over the solo runs given that completed)."""
    by_trace: dict[str, list[dict[str, Any]]] = {}
    for run in solos:
        for out in run.outcomes:
            if out.survived and out.replay:
                by_trace.setdefault(out.member.trace.name, []).append(out.replay)
    return {name: {"duration": median([task_duration(r) for r in rs]),
                   "p95": median([r["summary"]["grow_p95"] for r in rs]),
                   "p99": median([r["summary"]["grow_p99"] for r in rs])} for name, rs in by_trace.items()}


def ratio(value: float, base: float | None) -> float:
    return value / base if base and not math.isnan(base) and base > 0 else math.nan


def group_stats(runs: Sequence[RunRecord]) -> dict[str, Any]:
    """The numbers of one setup, limit and configuration over its runs; each ratio against the solo runs of the
    same round (the same minutes of a noisy host)."""
    high_dur, high_p95, high_p99, low_dur, kills, reactions = [], [], [], [], [], []
    for run in runs:
        reactions += run.reactions_ms
        for out in run.outcomes:
            base = run.baseline.get(out.member.trace.name, {})
            if not out.survived:
                kills.append(f"{out.member.name}:{out.kind[:KIND_WIDTH]}")
                continue
            assert out.replay is not None
            summary = out.replay["summary"]
            if out.member.role == "HIGH":
                high_dur.append(ratio(task_duration(out.replay), base.get("duration")))
                high_p95.append(ratio(summary["grow_p95"], base.get("p95")))
                high_p99.append(ratio(summary["grow_p99"], base.get("p99")))
            else:
                low_dur.append(ratio(task_duration(out.replay), base.get("duration")))
    return {
        "runs": len(runs), "all_survive": sum(all(o.survived for o in r.outcomes) for r in runs),
        "sessions": sum(len(r.outcomes) for r in runs), "survived": sum(o.survived for r in runs for o in r.outcomes),
        "high_runs": sum(o.member.role == "HIGH" for r in runs for o in r.outcomes),
        "high_survived": sum(o.survived for r in runs for o in r.outcomes if o.member.role == "HIGH"),
        "high_ratio": median(high_dur), "high_p95_ratio": median(high_p95), "high_p99_ratio": median(high_p99),
        "low_ratio": median(low_dur), "kills": kills,
        "reaction_p50_ms": replay.percentile(reactions, 50), "reaction_p99_ms": replay.percentile(reactions, 99),
        "agentd_cpu": median([r.agentd_cpu for r in runs if not math.isnan(r.agentd_cpu)]),
    }


def fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.2f}"


def cpu_pct(cpus: float) -> str:
    return "-" if math.isnan(cpus) else f"{100 * cpus:.0f}%"


def table(rows: Sequence[tuple[str, int, str, dict[str, Any] | str]]) -> list[str]:
    head = (f"{'setup':5} {'limit':>6} {'configuration':18} {'survive':>7} {'sessions':>8} {'HIGH ok':>7} "
            f"{'HIGH dur':>8} {'HIGH p95':>8} {'HIGH p99':>8} {'LOW dur':>7} {'react p50/p99 ms':>16} {'agentd':>6}"
            "  kills")
    lines = [head, "-" * len(head)]
    for setup, limit, config, st in rows:
        lead = f"{setup:5} {limit // MIB:>5}M {config:18}"
        if isinstance(st, str):
            lines.append(f"{lead} {st}")
            continue
        kills: dict[str, int] = {}
        for k in st["kills"]:
            kills[k] = kills.get(k, 0) + 1
        lines.append(
            f"{lead} {st['all_survive']:>3}/{st['runs']:<3} {st['survived']:>4}/{st['sessions']:<3} "
            f"{st['high_survived']:>3}/{st['high_runs']:<3} {fmt(st['high_ratio']):>8} {fmt(st['high_p95_ratio']):>8} "
            f"{fmt(st['high_p99_ratio']):>8} {fmt(st['low_ratio']):>7} "
            f"{fmt(st['reaction_p50_ms']) + '/' + fmt(st['reaction_p99_ms']):>16} {cpu_pct(st['agentd_cpu']):>6}  "
            + (", ".join(f"{k} x{n}" for k, n in sorted(kills.items())) or "-"))
    return lines


def last_line(stats: dict[tuple[str, int, str], dict[str, Any]], config: str) -> str:
    """The summary line for one configuration: setup A at 1100 MiB for all_survive, every setup and limit for
    high_survive, the worse of setup A's limits for the ratios."""
    mine = {key: st for key, st in stats.items() if key[2] == config}
    tight = mine.get(("A", SETUP_A_LIMITS[0], config))
    a = [st for (s, _, _), st in mine.items() if s == "A"]

    def worst(key: str) -> float:
        values = [st[key] for st in a if not math.isnan(st[key])]
        return max(values) if values else math.nan

    high_ok = sum(st["high_survived"] for st in mine.values())
    high_n = sum(st["high_runs"] for st in mine.values())
    all_ok = f"{tight['all_survive']}/{tight['runs']}" if tight else "0/0"
    return (f"all_survive_1100={all_ok} high_survive={high_ok}/{high_n} high_ratio={fmt(worst('high_ratio'))} "
            f"high_p95_ratio={fmt(worst('high_p95_ratio'))} low_ratio={fmt(worst('low_ratio'))} "
            f"reaction_p99_ms={fmt(worst('reaction_p99_ms'))}")


# ------------------------------------------------------------------------------------------------ output


def timeline_chart(run: RunRecord) -> timeline_png.Chart:
    names = {o.member.name: f"{o.member.name} {o.member.trace.name[:18]}" for o in run.outcomes}
    series = [timeline_png.Series(names[n], [(t, float(b)) for t, b in pts if t >= 0])
              for n, pts in run.timeline.items()]
    marks = [timeline_png.Mark(max(0.0, o.ended), f"kill {o.member.name} {o.kind[:24]}") for o in run.outcomes
             if not o.survived and not math.isnan(o.ended)]
    marks += [timeline_png.Mark(max(0.0, t), label, timeline_png.ORANGE) for t, label in run.actions]
    marks.sort(key=lambda mark: mark.at)
    title = f"setup {run.setup} limit {run.limit // MIB}M {run.config} run {run.index + 1}"
    return timeline_png.Chart(title, series, marks, float(run.limit) if run.limit else None)


def record_json(run: RunRecord) -> dict[str, Any]:
    return {"setup": run.setup, "limit": run.limit, "config": run.config, "run": run.index,
            "baseline": run.baseline, "actions": run.actions, "reactions_ms": run.reactions_ms,
            "agentd_cpu": None if math.isnan(run.agentd_cpu) else run.agentd_cpu,
            "outcomes": [{"member": o.member.name, "role": o.member.role, "trace": o.member.trace.name,
                          "survived": o.survived, "kind": o.kind, "ended": o.ended,
                          "duration": task_duration(o.replay) if o.replay else None,
                          "late_start": o.replay.get("late_start") if o.replay else None,
                          "start_wait": o.replay.get("start_wait") if o.replay else None, "retries": o.retries,
                          "refused_for": round(o.refused_for, 3),
                          "summary": o.replay["summary"] if o.replay else None} for o in run.outcomes]}


# ------------------------------------------------------------------------------------------------ main


def find_traces(given: str | None) -> Path:
    for candidate in ([Path(given)] if given else list(TRACE_DIRS)):
        if (candidate / SETUP_A_HIGH / "resources.json").exists():
            return candidate
    raise SystemExit("isolation: no traces (../shared/traces/haiku, or staged into build/bench-isolation/traces "
                     "by `make bench-isolation`)")


def preflight(configs: Sequence[str]) -> None:
    if os.geteuid() != 0:
        raise SystemExit("isolation: needs root (cgroups)")
    if "memory" not in cgroupfs.controllers(cgroup2_mount().path):
        raise SystemExit("isolation: no memory controller on cgroup v2 here: run it in the guest "
                         "(make bench-isolation)")
    with open("/proc/swaps") as swaps:
        if len(swaps.read().strip().splitlines()) > 1:
            raise SystemExit("isolation: swap is on: turn it off (swapoff -a); the limits must hold in memory")
    if any(CONFIGURATIONS[c].agentd for c in configs):
        try:
            import grpc  # noqa: F401
        except ImportError:
            if VENV_PYTHON.exists() and Path(sys.executable) != VENV_PYTHON:
                os.execv(VENV_PYTHON, [str(VENV_PYTHON), *sys.argv])  # agentd's interpreter, with grpc
            raise SystemExit("isolation: the agentd configurations need agentd's dependencies (grpc)") from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="isolation benchmark (issue 10); run in the testbed guest")
    parser.add_argument("--setup", default="A", help="comma-separated: A, B (default A)")
    parser.add_argument("--configs", default=",".join(CONFIGURATIONS), help="comma-separated configurations")
    parser.add_argument("--runs", type=int, default=1, help="runs per setup, limit and configuration (default 1)")
    parser.add_argument("--speedup", type=float, default=DEFAULT_SPEEDUP, help="times real time (default 10)")
    parser.add_argument("--traces", default=None, help="trace folder (default: staged copy, else ../shared)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="results, raw replays and PNGs")
    parser.add_argument("--summarize", metavar="RESULTS_JSON", default=None,
                        help="print the tables of an earlier (or interrupted) run's results.json; runs nothing")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                        help="an extra configuration agentd-policy-on-NAME with these [policy] values (sizes in "
                             "bytes), run interleaved with the others: to compare a tuning within one run")
    parser.add_argument("--profile-daemon", action="store_true", help="run each agentd under cProfile; its "
                        "statistics in OUT/agentd-<setup>-<configuration>-<round>.prof (where its CPU goes)")
    parser.add_argument("--limits", default=None, help="comma-separated MiB: only these limits (default: the "
                        "setup's own)")
    args = parser.parse_args(argv)
    for spec in args.variant:
        try:
            name = add_variant(spec)
        except ValueError as exc:
            parser.error(f"--variant {spec}: {exc}")
        if name not in args.configs.split(","):
            args.configs += f",{name}"
    unknown = [c for c in args.configs.split(",") if c not in CONFIGURATIONS]
    if unknown or args.runs < 1 or any(s not in ("A", "B") for s in args.setup.split(",")):
        parser.error(f"configurations: {', '.join(CONFIGURATIONS)}; setups: A, B; runs >= 1")
    return args


@contextlib.contextmanager
def daemon_for(iso: Isolation, workroot: Path, knows_policy: bool, profile: Path | None = None
               ) -> Iterator[Agentd | str]:
    """A started agentd for an agentd configuration, or why it cannot run (a string, reported in the table)."""
    overrides = iso.overrides(knows_policy)
    if overrides is None:
        yield "unavailable: this agentd has no [policy] section"
        return
    workdir = Path(tempfile.mkdtemp(prefix=f"{iso.name}-", dir=workroot))
    daemon = Agentd(workdir, overrides, profile)
    try:
        daemon.start()
    except RuntimeError as exc:
        daemon.stop()
        yield f"agentd did not start: {exc}"
        return
    try:
        yield daemon
    finally:
        daemon.stop()


def load_records(path: Path) -> list[RunRecord]:
    """RunRecords back from results.json (what the tables need: outcomes, durations, percentiles, reactions)."""
    records = []
    for r in json.loads(path.read_text()):
        outcomes = []
        for o in r["outcomes"]:
            member = Member(o["member"], o["role"], Path(o["trace"]), 0)
            replayed = None if o["duration"] is None else {"duration": o["duration"], "summary": o["summary"]}
            outcomes.append(Outcome(member, o["survived"], o["kind"], o["ended"], replayed, o.get("retries", 0)))
        records.append(RunRecord(r["setup"], r["limit"], r["config"], r["run"], outcomes, {},
                                 [tuple(a) for a in r["actions"]], r["reactions_ms"], r["baseline"],
                                 r.get("agentd_cpu") or math.nan))
    return records


def summarize(path: Path) -> int:
    records = [r for r in load_records(path) if r.config != "solo"]
    groups: dict[tuple[str, int, str], list[RunRecord]] = {}
    for record in records:
        groups.setdefault((record.setup, record.limit, record.config), []).append(record)
    order = {name: i for i, name in enumerate(CONFIGURATIONS)}
    stats = {key: group_stats(runs) for key, runs in sorted(groups.items(), key=lambda kv: (
        order.get(kv[0][2], 99), kv[0][0], kv[0][1]))}
    rows: list[tuple[str, int, str, dict[str, Any] | str]] = [(k[0], k[1], k[2], v) for k, v in stats.items()]
    return print_tables(rows, stats, f"from {path}")


def print_tables(rows: Sequence[tuple[str, int, str, dict[str, Any] | str]],
                 stats: dict[tuple[str, int, str], dict[str, Any]], where: str) -> int:
    """The table, then the machine-readable last line (1 when no configuration ran)."""
    for line in table(rows):
        print(line)
    ran = [c for c in SUMMARY_PREFERENCE if any(k[2] == c for k in stats)]
    if not ran:
        return 1
    print(f"# last line: configuration {ran[0]}; {where}")
    print(last_line(stats, ran[0]))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarize:
        return summarize(Path(args.summarize))
    configs = args.configs.split(",")
    preflight(configs)
    traces = find_traces(args.traces)
    out = Path(args.out)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    setups = [setup_a(traces) if s == "A" else setup_b(traces) for s in args.setup.split(",")]
    if args.limits:
        setups = [replace(s, limits=tuple(int(x) * MIB for x in args.limits.split(","))) for s in setups]
    print(f"isolation: setups {', '.join(s.name for s in setups)}; configurations {', '.join(configs)}; "
          f"{args.runs} run(s) each; speed-up {args.speedup:g}x; base {BASE // MIB} MiB; traces {traces}", flush=True)
    for s in setups:
        print(f"  setup {s.name}: limits {', '.join(f'{x // MIB}M' for x in s.limits)}; " + ", ".join(
            f"{m.role} {m.trace.name} (peak {m.peak / 1e6:.0f} MB)" for m in s.members), flush=True)
    records: list[RunRecord] = []
    rows: list[tuple[str, int, str, dict[str, Any] | str]] = []
    stats: dict[tuple[str, int, str], dict[str, Any]] = {}
    knows_policy = any(CONFIGURATIONS[c].agentd for c in configs) and agentd_knows_policy()
    with tempfile.TemporaryDirectory(prefix="agentd-bench-") as work:
        runs = run_rounds(configs, setups, args, out, Path(work), knows_policy, records)
    for config in configs:
        for s in setups:
            for limit in s.limits:
                done = runs.get((s.name, limit, config))
                if isinstance(done, str):
                    rows.append((s.name, limit, config, done))
                    continue
                if not done:
                    continue
                (out / f"timeline-{s.name}-{limit // MIB}M-{config}.png").write_bytes(
                    timeline_png.render(timeline_chart(done[0])))
                stats[(s.name, limit, config)] = group_stats(done)
                rows.append((s.name, limit, config, stats[(s.name, limit, config)]))
    (out / "results.json").write_text(json.dumps([record_json(r) for r in records], indent=1))
    print()
    return print_tables(rows, stats, f"PNGs and results.json in {out}")


def run_solos(s: Setup, index: int, args: argparse.Namespace, out: Path, records: list[RunRecord]
              ) -> dict[str, dict[str, float]]:
    """Each distinct trace of a setup alone (no limit, nothing else running): the round's denominators."""
    solos = []
    seen: dict[str, Member] = {}
    for m in s.members:
        seen.setdefault(m.trace.name, Member("solo", m.role, m.trace, m.peak))
    for name, m in seen.items():
        rundir = out / "raw" / f"{s.name}-solo-{name}-r{index + 1}"
        rundir.mkdir(parents=True, exist_ok=True)
        run = run_plain(s.name, [m], 0, 0, "solo", index, args.speedup, rundir)
        solos.append(run)
        records.append(run)
    baseline = solo_baselines(solos)
    print(f"{s.name} solo (round {index + 1}): " + "; ".join(
        f"{n} {b['duration']:.2f} s, p95 {1000 * b['p95']:.0f} ms, p99 {1000 * b['p99']:.0f} ms"
        for n, b in baseline.items()), flush=True)
    return baseline


Runs = dict[tuple[str, int, str], "list[RunRecord] | str"]


def run_rounds(configs: Sequence[str], setups: Sequence[Setup], args: argparse.Namespace, out: Path, work: Path,
               knows_policy: bool, records: list[RunRecord]) -> Runs:
    """Round after round: per setup, its traces solo, then every configuration at every limit (interleaved, so
    each ratio divides by solos of the same minutes, and drift of a noisy host hits every configuration alike).
    An agentd configuration gets a fresh daemon per round. A configuration that cannot run is reported once."""
    runs: Runs = {}
    for index in range(args.runs):
        for s in setups:
            baseline = run_solos(s, index, args, out, records)
            for config in configs:
                iso = CONFIGURATIONS[config]
                if isinstance(runs.get((s.name, s.limits[0], config)), str):
                    continue
                with contextlib.ExitStack() as stack:
                    profile = out / f"agentd-{s.name}-{config}-{index + 1}.prof" if args.profile_daemon else None
                    daemon = stack.enter_context(daemon_for(iso, work, knows_policy, profile)) if iso.agentd else None
                    if isinstance(daemon, str):
                        print(f"{s.name} {config}: {daemon}", flush=True)
                        runs.update({(s.name, limit, config): daemon for limit in s.limits})
                        continue
                    for limit in s.limits:
                        run = run_one(iso, daemon, s, limit, index, args, out)
                        run.baseline = baseline
                        done = runs.setdefault((s.name, limit, config), [])
                        assert isinstance(done, list)
                        done.append(run)
                        records.append(run)
        # What is measured so far survives an interrupted benchmark.
        (out / "results.json").write_text(json.dumps([record_json(r) for r in records], indent=1))
    return runs


def run_one(iso: Isolation, daemon: Agentd | None, s: Setup, limit: int, index: int, args: argparse.Namespace,
            out: Path) -> RunRecord:
    rundir = out / "raw" / f"{s.name}-{limit // MIB}M-{iso.name}-r{index + 1}"
    rundir.mkdir(parents=True, exist_ok=True)
    if daemon is None:
        per = limit // len(s.members) if iso.static else 0
        run = run_plain(s.name, s.members, limit, per, iso.name, index, args.speedup, rundir)
    else:
        run = run_agentd(daemon, s.name, s.members, limit, iso.name, index, args.speedup, rundir)
    print(f"{s.name} {limit // MIB}M {iso.name} run {index + 1}: " + ", ".join(
        f"{o.member.name} " + (f"{task_duration(o.replay):.2f} s" if o.survived and o.replay else o.kind)
        + (f" ({o.retries} retries)" if o.retries else "")
        for o in run.outcomes), flush=True)
    return run


if __name__ == "__main__":
    sys.exit(main())
