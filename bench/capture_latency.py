"""Auto-capture latency: how long an undeclared command runs in the session's agent/ leaf before agentd has
moved it into its own implicit tool call, and how much memory it charged there meanwhile.

Starts its own daemon (temporary sockets and cgroup root, removed after), creates a session and runs N
undeclared `bash -c SCRIPT` commands in its agent/ leaf, one after another (or --parallel at a time). The
script spins on /proc/self/cgroup until it sees itself in a tc- leaf, then exits. Two views of each capture:

  daemon:  the exec's kernel timestamp (lifecycle BPF event) -> cgroup.procs write returned, as recorded in the
           call's result (capture.latency_seconds);
  command: bash's first statement -> it reads its new cgroup (excludes exec and bash start-up, includes the
           reader's own polling interval of a few microseconds).

    python bench/capture_latency.py [--commands 200] [--parallel 1]

The commands spin while they wait to be moved: with --parallel at or beyond the CPU count they compete with
the daemon for CPU, and the numbers measure that contention too.

Needs root, a cgroup2 mount and the BPF objects (make -C bpf). Last line:
capture_p50_ms=<x> capture_p99_ms=<y>   (the daemon's view)
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

SCRIPT = (
    "s=$EPOCHREALTIME; i=0\n"
    'while mapfile -t c </proc/self/cgroup; [[ ${c[*]} != *"/tc-"* ]] && (( i++ < 200000 )); do :; done\n'
    'echo "$s $EPOCHREALTIME ${c[*]}"\n'
)
CALL_ID = re.compile(r"/tc-([0-9a-f]+)")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def row(name: str, values: list[float], unit: str = "ms") -> str:
    return (f"{name:<44} {len(values):>5} {percentile(values, 0.5):>9.3f} {percentile(values, 0.9):>9.3f} "
            f"{percentile(values, 0.99):>9.3f} {max(values):>9.3f}  {unit}")


def run_commands(agent_leaf: Path, count: int, parallel: int) -> dict[str, float]:
    """Run the commands; returns the command's own view (ms) by call id."""
    from support import spawn_in

    seen: dict[str, float] = {}
    for start in range(0, count, parallel):
        batch = [spawn_in(agent_leaf, ["bash", "-c", SCRIPT], stdout=-1) for _ in range(min(parallel, count - start))]
        for process in batch:
            out, _ = process.communicate(timeout=60)
            fields = out.decode().split(" ", 2)
            match = CALL_ID.search(fields[-1])
            if process.returncode != 0 or match is None:
                raise RuntimeError(f"a command was not captured (exit status {process.returncode}): {out!r}")
            seen[match.group(1)] = (float(fields[1]) - float(fields[0])) * 1e3
    return seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commands", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=1, help="commands started at once")
    args = parser.parse_args()

    from support import Daemon, call_cgroups, create_session, wait_for

    from agentd.api.gen import agentd_pb2 as pb

    workdir = tempfile.TemporaryDirectory(prefix="agentd-bench-")
    daemon = Daemon(Path(workdir.name), metrics={"address": ""}, daemon={"log_level": "info"})
    try:
        daemon.start()
        with daemon.admin() as admin:
            status = admin.call("GetStatus", pb.GetStatusRequest())
            if not status.auto_capture:
                raise SystemExit(f"auto-capture is off: {list(status.bpf_errors)}")
            session, _ = create_session(admin, "capture-bench")
            agent_leaf = daemon.session_path(session) / "agent"
            run_commands(agent_leaf, 10, 1)  # warm-up
            inside = run_commands(agent_leaf, args.commands, args.parallel)
            results = {}
            for call_id in inside:
                results[call_id] = admin.wait(call_id, timeout=30)
            wait_for(lambda: call_cgroups(daemon.session_path(session)) == [])
            admin.call("DeleteSession", pb.DeleteSessionRequest(session_id=session))
    finally:
        daemon.stop()
        daemon.cleanup()
        workdir.cleanup()

    latency = [r.capture.latency_seconds * 1e3 for r in results.values()]
    memory = [r.capture.memory_before_move_bytes / 1024 for r in results.values()]
    assert all(r.implicit and r.outcome == pb.OUTCOME_OK for r in results.values())
    print(f"{args.commands} undeclared `bash -c` commands in agent/, {args.parallel} at a time")
    print(f"{'':<44} {'n':>5} {'p50':>9} {'p90':>9} {'p99':>9} {'max':>9}")
    print(row("daemon: exec -> moved into its call", latency))
    print(row("command: first statement -> sees itself moved", list(inside.values())))
    print(row("anonymous memory left in agent/ (RssAnon)", memory, "KiB"))
    print(f"capture_p50_ms={percentile(latency, 0.5):.3f} capture_p99_ms={percentile(latency, 0.99):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
