"""Restart time vs the size of the records history: SIGKILL, start again, time until GetStatus answers.

For each history size a real daemon (tests/support.py `Daemon`: its own cgroup root, sockets, state dir) gets a
records file of that many generated records (the real `Result.to_json()` shape, ~1 KB a line, as measured in
production-like churn), as the daemon would have them: beyond `records_max_bytes` the older ones are in the
rotated `records.jsonl.1`. A first start indexes the files (the one-off cost after an upgrade: shown apart);
then it is SIGKILLed and restarted --restarts times. "Ready" = GetStatus answered on the admin socket (the
daemon has logged "agentd ready" by then), timed from the exec of the daemon; RSS read from /proc at that
moment. The phases come from the daemon's own log timestamps:

  start -> log    interpreter, imports, configuration (until the first log line)
  -> records      cgroup tree set up, records opened (index checked)
  -> BPF          BPF programs loaded and attached
  -> reconciled   engine built, cgroups reconciled
  -> ready        gRPC servers, join socket, metrics
  -> answered     GetStatus round trip from this process

    python bench/restart.py [--restarts 10] [--sizes 0,100000,1000000] [--max-bytes 640M]

The 1M row is ~1 GB of history: with the default records_max_bytes (256M) a daemon keeps at most 512 MiB, so
the bench raises records_max_bytes (--max-bytes, default 640M) for every row: .1 holds 640 MiB, the current
file the rest. Needs root and a cgroup2 mount; writes the files under --dir (default /var/tmp, a disk, not
tmpfs). Last line: ready_p99_s_0=... ready_p99_s_100k=... ready_p99_s_1m=... rss_mb_1m=...
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import grpc  # noqa: E402
from history import write_history  # noqa: E402
from support import Daemon, child_env  # noqa: E402

from agentd.api.gen import agentd_pb2 as pb  # noqa: E402
from agentd.api.gen import agentd_pb2_grpc as pb_grpc  # noqa: E402
from agentd.core.units import parse_size  # noqa: E402

PHASES = ("log", "records opened", "BPF programs loaded", "reconciled", "agentd ready")
SESSION = "session-03"  # one of the 16 sessions of the generated history, listed after the restarts
PROBES = 6  # old ids looked up after the restarts, spread over the history
UNKNOWN = "0" * 16  # and an id never recorded


@dataclass
class Start:
    ready_s: float
    rss_mb: float
    phases: dict[str, float]  # seconds since exec, by phase name


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """The resident set (VmRSS), or its file-backed part (RssFile: mapped pages, reclaimable page cache)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def connectable(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def start(daemon: Daemon, timeout: float = 600.0) -> Start:
    """Exec the daemon, wait until GetStatus answers; time it and read its RSS then."""
    offset = daemon.log.stat().st_size if daemon.log.exists() else 0
    with daemon.log.open("ab") as log:
        began_wall, began = time.time(), time.monotonic()
        daemon.proc = subprocess.Popen(
            [sys.executable, "-m", "agentd.daemon", "--config", str(daemon.config)],
            stdout=log, stderr=log, env=child_env(), cwd=REPO,
        )
    while time.monotonic() - began < timeout:
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"agentd exited with {daemon.proc.returncode}:\n{daemon.log.read_text()[-4000:]}")
        if connectable(daemon.admin_socket):
            with grpc.insecure_channel(f"unix:{daemon.admin_socket}") as channel:
                pb_grpc.AdminStub(channel).GetStatus(pb.GetStatusRequest(), timeout=30)  # type: ignore[no-untyped-call]
            ready = time.monotonic() - began
            return Start(ready, rss_mb(daemon.proc.pid), phases(daemon.log, offset, began_wall, ready))
        time.sleep(0.001)
    raise RuntimeError(f"agentd did not answer GetStatus in {timeout} s")


def phases(log: Path, offset: int, began_wall: float, ready: float) -> dict[str, float]:
    found: dict[str, float] = {}
    with log.open("rb") as f:
        f.seek(offset)
        for raw in f:
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            found.setdefault("log", entry["ts"] - began_wall)
            if entry.get("msg") in PHASES:
                found.setdefault(entry["msg"], entry["ts"] - began_wall)
    found["answered"] = ready
    return found


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def check_lookups(daemon: Daemon, probes: list[str]) -> float:
    """WaitToolCall on old ids is answered from the records (through the index), an unknown id is NOT_FOUND
    (every index scanned), ListToolCalls by session finds its records. Returns the slowest lookup (s)."""
    slowest = 0.0
    with grpc.insecure_channel(f"unix:{daemon.admin_socket}") as channel:
        stub = pb_grpc.AdminStub(channel)  # type: ignore[no-untyped-call]
        for call_id in [*probes, UNKNOWN]:
            began = time.monotonic()
            try:
                reply = stub.WaitToolCall(pb.WaitToolCallRequest(call_id=call_id, timeout_seconds=1), timeout=30)
            except grpc.RpcError as exc:
                if call_id != UNKNOWN or exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
            else:
                if reply.call_id != call_id:
                    raise RuntimeError(f"WaitToolCall({call_id}) answered {reply.call_id}")
            slowest = max(slowest, time.monotonic() - began)
        listed = stub.ListToolCalls(pb.ListToolCallsRequest(session_id=SESSION, limit=100), timeout=30)
        if probes and len(listed.finished) != 100:
            raise RuntimeError(f"ListToolCalls found {len(listed.finished)} of {SESSION}'s records")
    return slowest


@dataclass
class Row:
    history_bytes: int
    first: Start  # indexes the generated files (no index yet: as after an upgrade)
    runs: list[Start]
    slowest_lookup_s: float
    rss_after_mb: float  # after the lookups: mapped index pages count too
    rss_file_after_mb: float


def bench(count: int, restarts: int, max_bytes: int, base: Path) -> Row:
    with tempfile.TemporaryDirectory(prefix="agentd-restart-", dir=base) as workdir:
        daemon = Daemon(Path(workdir), metrics={"address": ""},
                        daemon={"log_level": "info", "records_max_bytes": max_bytes})
        ids = write_history(daemon.records, count, max_bytes)
        size = sum(p.stat().st_size for p in daemon.records.parent.glob("records.jsonl*"))
        probes = ids[:: max(1, count // PROBES)] + ids[-1:]
        try:
            first = start(daemon)
            daemon.kill9()
            runs = []
            for _ in range(restarts):
                runs.append(start(daemon))
                daemon.kill9()
            start(daemon)
            slowest = check_lookups(daemon, probes)
            assert daemon.proc is not None
            row = Row(size, first, runs, slowest, rss_mb(daemon.proc.pid), rss_mb(daemon.proc.pid, "RssFile"))
            daemon.stop()
        finally:
            daemon.cleanup()
    return row


def label(count: int) -> str:
    return "0" if count == 0 else f"{count // 1000}k" if count < 1_000_000 else f"{count // 1_000_000}m"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--restarts", type=int, default=10)
    parser.add_argument("--sizes", default="0,100000,1000000", help="records in the history, comma-separated")
    parser.add_argument("--max-bytes", default="640M", help="records_max_bytes of the daemon")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="where the records files are written")
    args = parser.parse_args()
    max_bytes = parse_size(args.max_bytes)
    print(f"{'records':>9} {'history':>10} {'first start':>12} {'ready p50':>10} {'ready p99':>10} {'RSS MB':>7} "
          f"{'lookup max':>11} {'RSS after (file)':>17}   phases p50 (s since exec: log/records/BPF/reconciled/ready)")
    summary: list[str] = []
    for count in (int(c) for c in args.sizes.split(",")):
        row = bench(count, args.restarts, max_bytes, args.dir)
        ready = [r.ready_s for r in row.runs]
        rss = max(r.rss_mb for r in row.runs)
        median = {name: percentile([r.phases.get(name, float("nan")) for r in row.runs], 0.5) for name in PHASES}
        print(f"{count:>9} {row.history_bytes / 2**20:>8.0f}Mi {row.first.ready_s:>11.3f}s "
              f"{percentile(ready, 0.5):>9.3f}s {percentile(ready, 0.99):>9.3f}s {rss:>7.1f} "
              f"{row.slowest_lookup_s * 1e3:>9.1f}ms {row.rss_after_mb:>8.1f} ({row.rss_file_after_mb:>5.1f})   "
              + " / ".join(f"{median[name]:.3f}" for name in PHASES), flush=True)
        summary += [f"ready_p99_s_{label(count)}={percentile(ready, 0.99):.3f}", f"rss_mb_{label(count)}={rss:.1f}"]
    print(" ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
