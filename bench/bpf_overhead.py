"""Cost of the lifecycle BPF programs on fork+exec, and the event rate the loader sustains.

Worker processes run blocks of posix_spawn(/bin/true) + waitpid on request: one outside any managed
cgroup, one in a managed tool-call cgroup (its events are batched) and one in a managed agent leaf (the
auto-capture path: the wakeup names are the daemon's default capture rules, [capture] shells and
commands, which /bin/true does not match, so its execs are batched too; a matching one would wake the
consumer). Each round runs, per place, a block with the lifecycle programs attached and one without,
back to back (both orders alternate between rounds). The ratio attached/detached of each pair cancels
the machine's drift; the reported ratios are medians over rounds, of wall time and of the CPU time the
worker and its children used. While attached, this process consumes the events through the ring buffer's
epoll fd as the daemon would; its CPU time per spawn is reported, and so is the programs' own run time
(BPF_ENABLE_STATS).

Then shell workers fork as fast as they can in the tool-call cgroup while the events are consumed (the
live rate, and whether any event was lost), and a burst left unconsumed until it ends shows how fast the
loader drains a full backlog.

usage: python3 bench/bpf_overhead.py [--n 5000] [--rounds 100] [--burst 20000] [--burst-workers 2]
Needs root, the objects from `make -C bpf` and a cgroup2 mount. The last line is machine-readable, with
the wall-time ratios (inside = the tool-call cgroup, agent_leaf = the agent leaf):
outside_ratio=<a> inside_ratio=<b> agent_leaf_ratio=<c> events_per_s=<d> lost=<n>
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import resource
import select
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from agentd.core.capture import Rules
from agentd.core.config import load_config
from agentd.kernel.bpf import cgroup_id
from agentd.kernel.bpf.lifecycle import CgroupKind, LifecycleTracker, ProcessEvent
from agentd.kernel.mounts import cgroup2_mount

SPAWN_WORKER = """
import os, resource, sys, time
def cpu():
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
for line in sys.stdin:
    wall, used = time.perf_counter(), cpu()
    for _ in range(int(line)):
        os.waitpid(os.posix_spawn("/bin/true", ["/bin/true"], {}), 0)
    print(time.perf_counter() - wall, cpu() - used, flush=True)
"""
FORK_WORKER = 'i=0; while [ "$i" -lt "$1" ]; do (exit 0); i=$((i + 1)); done'
KINDS = {"tool call": CgroupKind.TOOL_CALL, "agent leaf": CgroupKind.AGENT_LEAF}  # the managed places
PLACES = ("outside", *KINDS)
BACKLOG = 5000  # forks left unconsumed: 10,000 events of 80 bytes fit the 1 MiB ring buffer
SYS_BPF, BPF_ENABLE_STATS, BPF_STATS_RUN_TIME = 321, 32, 0  # x86-64
_DEFAULTS = load_config(None)
WAKE_NAMES = Rules(_DEFAULTS.capture_shells, _DEFAULTS.capture_commands).names()  # as the daemon sets them

Managed = dict[str, Path]  # cgroup by managed place
Workers = dict[str, subprocess.Popen[str]]  # spawn worker by place


@dataclass(frozen=True)
class Block:
    """Microseconds per spawn: wall time, CPU time of the worker and its children, CPU time consuming."""

    wall: float
    cpu: float
    consumer: float


@contextlib.contextmanager
def temp_cgroup() -> Iterator[Path]:
    path = cgroup2_mount().path / f"agentd-bench-{uuid.uuid4().hex[:10]}"
    path.mkdir()
    try:
        yield path
    finally:
        (path / "cgroup.kill").write_text("1")
        while "populated 1" in (path / "cgroup.events").read_text():
            time.sleep(0.01)
        path.rmdir()


@contextlib.contextmanager
def tracking(managed: Managed, attached: bool = True) -> Iterator[LifecycleTracker | None]:
    """The lifecycle programs attached with the managed cgroups added, or None when not attached."""
    if not attached:
        yield None
        return
    with LifecycleTracker() as tracker:
        tracker.set_wake_names(WAKE_NAMES)
        for place, cgroup in managed.items():
            tracker.add_cgroup(cgroup_id(cgroup), KINDS[place])
        yield tracker


def start(argv: list[str], cgroup: Path | None) -> subprocess.Popen[str]:
    """A worker moved into cgroup (if any) before it execs; stdin and stdout are pipes."""
    procs = cgroup / "cgroup.procs" if cgroup else None
    return subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=(lambda: procs.write_text(str(os.getpid()))) if procs else None,
    )


def consume_until_readable(pipes: list[IO[str]], tracker: LifecycleTracker | None) -> list[ProcessEvent]:
    """Consume events whenever the epoll fd is readable until every pipe is readable; returns the events
    (all of those the workers caused: an exit is reported before the pipe reaches EOF)."""
    waiting = {pipe.fileno() for pipe in pipes}
    events: list[ProcessEvent] = []
    while waiting:
        watched = [*waiting, *([tracker.epoll_fd()] if tracker else [])]
        waiting -= set(select.select(watched, [], [])[0])
        if tracker:
            events += tracker.consume()
    return events


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def spawn_block(worker: subprocess.Popen[str], count: int, tracker: LifecycleTracker | None) -> Block:
    """One block of `count` spawns run by a spawn worker, consuming events meanwhile."""
    assert worker.stdin and worker.stdout
    consumer_start = own_cpu_s()
    worker.stdin.write(f"{count}\n")
    worker.stdin.flush()
    consume_until_readable([worker.stdout], tracker)
    consumer_s = own_cpu_s() - consumer_start
    wall_s, cpu_s = (float(field) for field in worker.stdout.readline().split())
    return Block(wall_s * 1e6 / count, cpu_s * 1e6 / count, consumer_s * 1e6 / count)


def measure_overhead(
    workers: Workers, managed: Managed, rounds: int, per_round: int
) -> dict[tuple[str, bool], list[Block]]:
    """Blocks by (place, attached), one per round."""
    samples: dict[tuple[str, bool], list[Block]] = {(p, a): [] for p in PLACES for a in (False, True)}
    for round_number in range(rounds):
        places = PLACES[:: 1 if round_number % 2 == 0 else -1]
        for attached in (False, True)[:: 1 if round_number % 4 < 2 else -1]:
            for place in places:
                with tracking(managed, attached) as tracker:
                    samples[place, attached].append(spawn_block(workers[place], per_round, tracker))
    return samples


@contextlib.contextmanager
def bpf_stats() -> Iterator[None]:
    """Kernel accounting of BPF program run time, on while the fd BPF_ENABLE_STATS returns is open."""
    attr = ctypes.c_uint32(BPF_STATS_RUN_TIME)
    fd = ctypes.CDLL(None, use_errno=True).syscall(SYS_BPF, BPF_ENABLE_STATS, ctypes.byref(attr), 4)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "BPF_ENABLE_STATS")
    try:
        yield
    finally:
        os.close(fd)


def programs() -> dict[int, int]:
    """Run time in ns by id of every loaded BPF program, per bpftool."""
    listing = subprocess.run(["bpftool", "-j", "prog", "list"], check=True, capture_output=True, text=True)
    return {p["id"]: p.get("run_time_ns", 0) for p in json.loads(listing.stdout)}


def measure_direct_ns(workers: Workers, managed: Managed, count: int) -> dict[str, float]:
    """Nanoseconds the three programs run per spawn, by place."""
    before = programs()
    per_spawn: dict[str, float] = {}
    with tracking(managed) as tracker, bpf_stats():
        ours = programs().keys() - before.keys()
        for place in PLACES:
            start_ns = sum(programs()[i] for i in ours)
            spawn_block(workers[place], count, tracker)
            per_spawn[place] = (sum(programs()[i] for i in ours) - start_ns) / count
    return per_spawn


def fork_burst(
    managed: Managed, forks: int, workers: int, consume: bool
) -> tuple[list[ProcessEvent], int, float]:
    """Shell workers fork `forks` times each in the tool-call cgroup. Returns the events, the number lost
    and the seconds consume() took to drain what was left once the workers ended."""
    with tracking(managed) as tracker:
        assert tracker is not None
        call = managed["tool call"]
        burst = [start(["sh", "-c", FORK_WORKER, "sh", str(forks)], call) for _ in range(workers)]
        events = consume_until_readable([w.stdout for w in burst if w.stdout], tracker if consume else None)
        for worker in burst:
            worker.communicate()
        drain_start = time.perf_counter()
        events += tracker.consume()
        return events, tracker.lost(), time.perf_counter() - drain_start


def paired_ratio(
    samples: dict[tuple[str, bool], list[Block]], place: str, metric: Callable[[Block], float]
) -> float:
    pairs = zip(samples[place, True], samples[place, False], strict=True)
    return statistics.median(metric(on) / metric(off) for on, off in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=5000, help="spawns per condition (default 5000)")
    parser.add_argument(
        "--rounds", type=int, default=100, help="rounds the spawns are split in (default 100)"
    )
    parser.add_argument("--burst", type=int, default=20000, help="forks per burst worker (default 20000)")
    parser.add_argument("--burst-workers", type=int, default=2, help="parallel burst workers (default 2)")
    args = parser.parse_args()
    per_round = max(1, args.n // args.rounds)

    with temp_cgroup() as call, temp_cgroup() as leaf:
        managed = {"tool call": call, "agent leaf": leaf}
        workers = {place: start([sys.executable, "-c", SPAWN_WORKER], managed.get(place)) for place in PLACES}
        try:
            samples = measure_overhead(workers, managed, args.rounds, per_round)
            direct_ns = measure_direct_ns(workers, managed, per_round * 10)
        finally:
            for worker in workers.values():
                worker.communicate("")
        live, lost, _ = fork_burst(managed, args.burst, args.burst_workers, consume=True)
        backlog, backlog_lost, drain_s = fork_burst(
            managed, BACKLOG // args.burst_workers, args.burst_workers, consume=False
        )

    print(f"fork+exec of /bin/true: {args.rounds} rounds x {per_round} spawns per place and state")
    print(
        f"{'place':<10} {'detached us':>11} {'attached us':>11} {'wall ratio':>10} {'cpu ratio':>9}"
        f" {'BPF ns/spawn':>12} {'consumer us/spawn':>17}"
    )
    wall_ratio = {place: paired_ratio(samples, place, lambda b: b.wall) for place in PLACES}
    for place in PLACES:
        detached, attached = samples[place, False], samples[place, True]
        print(
            f"{place:<10} {statistics.median(b.wall for b in detached):>11.1f}"
            f" {statistics.median(b.wall for b in attached):>11.1f} {wall_ratio[place]:>10.4f}"
            f" {paired_ratio(samples, place, lambda b: b.cpu):>9.4f} {direct_ns[place]:>12.0f}"
            f" {statistics.median(b.consumer for b in attached):>17.1f}"
        )
    span_s = (live[-1].timestamp_ns - live[0].timestamp_ns) / 1e9 if len(live) > 1 else float("inf")
    rate = len(live) / span_s
    print(
        f"live burst: {args.burst_workers} x {args.burst} forks, {len(live)} events in {span_s:.2f} s"
        f" = {rate:.0f} events/s consumed, lost {lost}"
    )
    print(
        f"backlog: {len(backlog)} events drained in {drain_s * 1000:.1f} ms"
        f" = {len(backlog) / max(drain_s, 1e-9):.0f} events/s, lost {backlog_lost}"
    )
    print(
        f"outside_ratio={wall_ratio['outside']:.4f} inside_ratio={wall_ratio['tool call']:.4f}"
        f" agent_leaf_ratio={wall_ratio['agent leaf']:.4f} events_per_s={rate:.0f} lost={lost}"
    )


if __name__ == "__main__":
    main()
