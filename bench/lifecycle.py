"""Tool-call lifecycle cost through agentd's real gRPC + join path, next to raw cgroup operations.

Per call, as agentd.client's run() does it: launch a child held before exec, BeginToolCall naming it (its
pidfd goes ahead on the join socket; agentd places it before answering), release it to exec /bin/true, wait
for it, END on the join connection (answered once the call's accounting is read and its result built; the
record and the cgroup's removal follow right after). The daemon's share = HOLD + BeginToolCall round trip +
END round trip; launching and the tool's own runtime are excluded.
Raw: mkdir, the child writes itself into cgroup.procs, exec /bin/true, rmdir.

    python bench/lifecycle.py [--calls 2000] [--clients 8] [--socket /run/agentd/admin.sock --session S]

Without --socket it starts its own daemon on a temporary socket and cgroup root, and removes them after.
Last line: p50_ms=<x> p99_ms=<y> calls_per_s=<z> raw_ratio=<r>
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

TRUE = "/bin/true"
T = TypeVar("T")
_F = struct.Struct("d")


def server_pid(socket_path: str) -> int:
    """The pid of the process listening on a Unix socket (SO_PEERCRED of a connection to it): agentd."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.connect(socket_path)
        return struct.unpack("3i", probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]


@dataclass(frozen=True)
class CpuPerCall:
    """CPU seconds per call: agentd's (all threads) in user space and in the kernel, and this process's."""

    user: float
    kernel: float
    client: float

    def row(self, name: str, with_client: bool = True) -> str:
        values = [self.user + self.kernel, self.user, self.kernel] + ([self.client] if with_client else [])
        return f"{name:<34}" + "".join(f" {v * 1e3:>9.3f}" for v in values)


class CpuMeter:
    """agentd's CPU time (from /proc/<pid>/stat) and this process's over a stretch of the bench."""

    def __init__(self, pid: int) -> None:
        self.stat = f"/proc/{pid}/stat"
        self.tick = os.sysconf("SC_CLK_TCK")

    def _read(self) -> tuple[float, float, float]:
        with open(self.stat) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return int(fields[11]) / self.tick, int(fields[12]) / self.tick, usage.ru_utime + usage.ru_stime

    def measure(self, calls: int, run: Callable[[], T]) -> tuple[T, CpuPerCall]:
        """run()'s result, and the CPU spent per call while it ran."""
        before = self._read()
        result = run()
        user, kernel, client = (b - a for a, b in zip(before, self._read(), strict=True))
        return result, CpuPerCall(user / calls, kernel / calls, client / calls)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def agentd_calls(socket_path: str, session: str, calls: int) -> tuple[list[float], list[float]]:
    """Run `calls` tool calls one after another, timing the steps of agentd.client's run() one by one; return
    (HOLD + BeginToolCall, END) of each, in seconds."""
    from agentd.api.gen import agentd_pb2 as pb
    from agentd.client import Client
    from agentd.launch import launch, release

    begins, ends = [], []
    intent = pb.Intent(tool="true", argv=[TRUE])
    with Client(socket_path) as client:
        for _ in range(calls):
            pid, go = launch([TRUE])
            t0 = time.perf_counter()
            begun = client.begin(intent, session, pid=pid)
            t1 = time.perf_counter()
            release(go)
            _, status = os.waitpid(pid, 0)
            t2 = time.perf_counter()
            result = client.end(begun.call_id, status)
            t3 = time.perf_counter()
            assert result.outcome == pb.OUTCOME_OK, result
            begins.append(t1 - t0)
            ends.append(t3 - t2)
    return begins, ends


def grpc_floor(socket_path: str, calls: int) -> list[float]:
    """Round trips of an empty gRPC request (Health.Check) on the same socket: the transport's floor."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    times = []
    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(calls):
            t0 = time.perf_counter()
            stub.Check(health_pb2.HealthCheckRequest())
            times.append(time.perf_counter() - t0)
    return times


def raw_calls(parent: Path, calls: int) -> list[float]:
    """The same sequence as bare cgroup operations: mkdir, write cgroup.procs (in the child), rmdir."""
    shares = []
    for i in range(calls):
        path = parent / f"raw-{i}"
        t0 = time.perf_counter()
        os.mkdir(path)
        t1 = time.perf_counter()
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            start = time.perf_counter()
            fd = os.open(path / "cgroup.procs", os.O_WRONLY)
            os.write(fd, b"0")
            os.close(fd)
            os.write(write_fd, _F.pack(time.perf_counter() - start))
            os.execv(TRUE, [TRUE])
        os.close(write_fd)
        moved = _F.unpack(os.read(read_fd, _F.size))[0]
        os.close(read_fd)
        os.waitpid(pid, 0)
        t2 = time.perf_counter()
        while True:
            try:
                os.rmdir(path)
                break
            except OSError:  # the exited child may not have left the cgroup yet
                time.sleep(0)
        t3 = time.perf_counter()
        shares.append((t1 - t0) + moved + (t3 - t2))
    return shares


def launches(calls: int) -> int:
    """The client's own part alone, without agentd: launch held, release, exec /bin/true, wait."""
    from agentd.launch import launch, release

    for _ in range(calls):
        pid, go = launch([TRUE])
        release(go)
        os.waitpid(pid, 0)
    return calls


def _worker(args: tuple[str, str, int]) -> list[float]:
    begins, ends = agentd_calls(*args)
    return [b + e for b, e in zip(begins, ends, strict=True)]


def concurrent(
    socket_path: str, session: str, calls: int, clients: int, meter: CpuMeter
) -> tuple[float, list[float], CpuPerCall, float]:
    """`clients` processes share `calls`; return (calls per second, all shares, CPU per call (the clients'
    own is not counted), launches per second without agentd: this machine's ceiling for the same clients)."""
    ctx = multiprocessing.get_context("spawn")
    per = max(1, calls // clients)
    with ctx.Pool(clients) as pool:
        pool.map(_worker, [(socket_path, session, 5)] * clients)  # warm-up: imports, channels
        start = time.perf_counter()
        work = [(socket_path, session, per)] * clients
        shares, cpu = meter.measure(per * clients, lambda: pool.map(_worker, work))
        elapsed = time.perf_counter() - start
        start = time.perf_counter()
        launched = sum(pool.map(launches, [per] * clients))
        ceiling = launched / (time.perf_counter() - start)
    flat = [s for chunk in shares for s in chunk]
    return len(flat) / elapsed, flat, cpu, ceiling


def row(name: str, values: list[float]) -> str:
    ms = [v * 1e3 for v in values]
    return (f"{name:<34} {len(ms):>6} {percentile(ms, 0.5):>9.3f} {percentile(ms, 0.99):>9.3f} "
            f"{max(ms):>9.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--socket", help="use a running agentd's admin socket instead of starting one")
    parser.add_argument("--session", default="", help="session to use with --socket (created if empty)")
    args = parser.parse_args()

    from support import Daemon, create_session

    from agentd.api.gen import agentd_pb2 as pb
    from agentd.client import Client
    from agentd.kernel import cgroupfs

    daemon = None
    workdir = tempfile.TemporaryDirectory(prefix="agentd-bench-")
    try:
        if args.socket:
            socket_path = args.socket
        else:
            daemon = Daemon(Path(workdir.name), metrics={"address": ""})
            daemon.start()
            socket_path = str(daemon.admin_socket)
        with Client(socket_path) as admin:
            session = args.session or create_session(admin, f"bench-{os.getpid()}")[0]
            sessions_root = Path(admin.call("GetSession", pb.GetSessionRequest(session_id=session)).cgroup)
        meter = CpuMeter(server_pid(socket_path))
        agentd_calls(socket_path, session, 50)  # warm-up
        (begins, ends), call_cpu = meter.measure(
            args.calls, lambda: agentd_calls(socket_path, session, args.calls))
        sequential = [b + e for b, e in zip(begins, ends, strict=True)]
        grpc_floor(socket_path, 50)
        floor, floor_cpu = meter.measure(args.calls, lambda: grpc_floor(socket_path, args.calls))
        raw_dir = sessions_root.parent.parent / f"bench-raw-{os.getpid()}"
        os.mkdir(raw_dir)
        try:
            raw_calls(raw_dir, 50)
            raw = raw_calls(raw_dir, args.calls)
        finally:
            cgroupfs.remove_tree(raw_dir)
        rate, loaded, loaded_cpu, ceiling = concurrent(socket_path, session, args.calls, args.clients, meter)
        if not args.session:
            with Client(socket_path) as admin:
                admin.call("DeleteSession", pb.DeleteSessionRequest(session_id=session))
    finally:
        if daemon is not None:
            daemon.stop()
            daemon.cleanup()
        workdir.cleanup()

    p50, p99 = percentile(sequential, 0.5) * 1e3, percentile(sequential, 0.99) * 1e3
    ratio = percentile(sequential, 0.5) / percentile(raw, 0.5)
    print(f"{'per-call share (ms)':<34} {'calls':>6} {'p50':>9} {'p99':>9} {'max':>9}")
    print(row("agentd, 1 client", sequential))
    print(row("  of which HOLD + BeginToolCall", begins))
    print(row("  of which END (result)", ends))
    print(row(f"agentd, {args.clients} clients", loaded))
    print(row("raw cgroup ops, 1 client", raw))
    print(row("empty gRPC round trip (floor)", floor))
    print(f"{'CPU per call (ms)':<34} {'agentd':>9} {'user':>9} {'kernel':>9} {'client':>9}")
    print(call_cpu.row("tool call, 1 client (+launch)"))
    print(loaded_cpu.row(f"tool call, {args.clients} clients", with_client=False))  # clients: other processes
    print(floor_cpu.row("empty gRPC request"))
    print(f"throughput with {args.clients} clients: {rate:.0f} calls/s (incl. fork+exec of {TRUE}); "
          f"the same clients launching {TRUE} without agentd: {ceiling:.0f}/s")
    print(f"agentd/raw p50 ratio: {ratio:.1f}x; agentd/empty gRPC round trip p50 ratio: "
          f"{percentile(sequential, 0.5) / percentile(floor, 0.5):.1f}x")
    print(f"p50_ms={p50:.3f} p99_ms={p99:.3f} calls_per_s={rate:.0f} raw_ratio={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
