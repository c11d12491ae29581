"""What a declared tool call costs through the fast path (issue 11): the static launcher, the shim, the SDK.

From inside a session's agent/ leaf (as a sandbox would; the session's auto-capture off, so that a bare
command is really bare), rounds interleaved so that every path sees the same machine:
- bare `bash -c true` and bare `true` (posix_spawn + wait: no agentd);
- the shim `agentd-shell -c true` (agentd-run under that name: launcher/shell.c; and the sh script
  agentd/data/agentd-shell, through agentd-run) and `agentd-run -- true`: their overhead is their wall time minus
  the bare command's (`bash -c true` for the shims, `true` for the launcher), per round;
- `agentctl run -- true` (Python + gRPC; fewer calls), and `systemd-run --scope true` where systemd is PID 1;
- the SDK's fast path (agentd.client over the join socket): BEGIN + END round trips, launching excluded;
- agentd's CPU per call (user + kernel, all threads, over the launcher's calls);
- calls/s of 8 clients, each running `agentd-run -- true` in a loop, as a ratio to the same 8 clients
  launching `true` without agentd, in the same run (and the same against the native floor and the null server);
- the floor (bench/launch_floor.py): `agentd-run -- true` against a minimal Python server that makes the kernel do
  what agentd makes it do for the call and nothing else, in the same rounds: its wall time and its CPU per call;
  and the native floor (bench/launch_floor.c, the same server in C, built here with cc and protobuf-c as for the
  launcher): about what the kernel work alone costs, the least any daemon placing calls this way can spend;
  and the same binary as a null server (answers, no kernel work): the launcher's own cost, no daemon's.

    python bench/launch.py [--calls 300] [--clients 8]

It starts its own daemon on a temporary socket and cgroup root (and removes them after). Needs
launcher/build/agentd-run (make -C launcher). Last line:
shim_overhead_p50_ms=… shim_overhead_p99_ms=… sdk_p50_ms=… sdk_p99_ms=… agentd_cpu_ms=… throughput_ratio=…
(the shim's keys are the native shim's; then launcher_overhead_p50_ms, launcher_overhead_p99_ms,
shim_script_overhead_p50_ms, floor_cpu_ms, agentd_floor_ratio, floor_overhead_p50_ms, native_floor_cpu_ms,
native_floor_overhead_p50_ms, native_floor_throughput_ratio, null_server_overhead_p50_ms,
null_server_throughput_ratio)
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from lifecycle import CpuMeter, percentile, server_pid  # noqa: E402

LAUNCHER = REPO / "launcher" / "build" / "agentd-run"
SHIM = LAUNCHER.parent / "agentd-shell"  # the launcher under that name
SHIM_SCRIPT = REPO / "agentd" / "data" / "agentd-shell"
TRUE = shutil.which("true") or "/bin/true"
BASH = shutil.which("bash") or "/bin/bash"
AGENTCTL_CALLS = 20  # a Python start-up each: ~150 ms


def spawn_wait(argv: list[str], env: dict[str, str]) -> float:
    """Wall time of one command, posix_spawn to reaped; it must exit 0."""
    start = time.perf_counter()
    pid = os.posix_spawnp(argv[0], argv, env)
    _, status = os.waitpid(pid, 0)
    elapsed = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"{argv} ended with wait status {status}")
    return elapsed


def rounds(paths: dict[str, list[str]], calls: int, envs: dict[str, dict[str, str]]) -> dict[str, list[float]]:
    """Each path once per round (with its environment), `calls` rounds (after a few warm-up rounds)."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    for n in range(calls + 5):
        for name, argv in paths.items():
            try:
                elapsed = spawn_wait(argv, envs[name])
            except RuntimeError as exc:
                raise RuntimeError(f"{name}, round {n}: {exc}") from None
            if n >= 5:
                times[name].append(elapsed)
    return times


def overheads(with_agentd: list[float], bare: list[float]) -> list[float]:
    return [a - b for a, b in zip(with_agentd, bare, strict=True)]


def sdk_calls(env: dict[str, str], calls: int, transport: str = "join") -> list[float]:
    """BEGIN + END of agentd.client per call (launching and the tool's runtime excluded): the fast path, or the
    same calls over gRPC (BeginToolCall + END on the join connection) for comparison."""
    from agentd.api.gen import agentd_pb2 as pb
    from agentd.client import Client
    from agentd.launch import launch, release

    shares = []
    client = Client(env["AGENTD_SOCKET"], env["AGENTD_SESSION_TOKEN"], join_socket=env["AGENTD_JOIN_SOCKET"],
                    transport=transport)
    with client:
        for n in range(calls + 5):
            pid, go = launch([TRUE])
            t0 = time.perf_counter()
            begun = client.begin(pb.Intent(tool="true", argv=[TRUE]), pid=pid)
            t1 = time.perf_counter()
            release(go)
            _, status = os.waitpid(pid, 0)
            t2 = time.perf_counter()
            result = client.end(begun.call_id, status)
            t3 = time.perf_counter()
            assert result.outcome == pb.OUTCOME_OK, result
            assert (client._framed is not None) == (transport == "join"), "the SDK's transport is not the one asked"
            if n >= 5:
                shares.append((t1 - t0) + (t3 - t2))
    return shares


def _loop(args: tuple[list[str], int, dict[str, str]]) -> int:
    argv, calls, env = args
    for _ in range(calls):
        spawn_wait(argv, env)
    return calls


def throughput(argv: list[str], clients: int, calls: int, env: dict[str, str]) -> float:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(clients) as pool:
        pool.map(_loop, [(argv, 3, env)] * clients)  # warm-up
        start = time.perf_counter()
        done = sum(pool.map(_loop, [(argv, calls, env)] * clients))
        return done / (time.perf_counter() - start)


def systemd_scope(env: dict[str, str]) -> tuple[list[float] | None, str]:
    pid1 = Path("/proc/1/comm").read_text().strip()
    if pid1 != "systemd" or not shutil.which("systemd-run"):
        return None, f"not measured: PID 1 is {pid1!r}, not systemd"
    argv = ["systemd-run", "--quiet", "--scope", TRUE]
    return [spawn_wait(argv, env) for _ in range(AGENTCTL_CALLS)], ""


def line(name: str, ms: list[float], note: str = "") -> str:
    if not ms:
        return f"{name:<40} {note}"
    p50, p99 = percentile(ms, 0.5), percentile(ms, 0.99)
    return f"{name:<40} {len(ms):>6} {p50:>9.3f} {p99:>9.3f} {statistics.fmean(ms):>9.3f}  {note}"


def build_native_floor(workdir: Path) -> Path:
    """bench/launch_floor.c compiled against the launcher's generated protobuf-c code and libprotobuf-c."""
    pb_c = LAUNCHER.parent / "agentd.pb-c.c"
    out = workdir / "launch-floor-native"
    subprocess.run(["cc", "-O2", "-Wall", "-Werror", f"-I{pb_c.parent}", "-o", str(out),
                    str(REPO / "bench" / "launch_floor.c"), str(pb_c), "-lprotobuf-c"], check=True)
    return out


@contextmanager
def floor_server(workdir: Path, mount: Path, native: Path | None = None, null: bool = False
                 ) -> Iterator[tuple[str, int]]:
    """bench/launch_floor.py (or, given its binary, the native floor; `null`: answering without the kernel work)
    serving on a socket of its own, its calls under a cgroup of its own: (socket, pid)."""
    from agentd.kernel import cgroupfs

    name = "null-server" if null else "native-floor" if native else "floor"
    sock, cgroup = workdir / f"{name}.sock", mount / f"agentd-bench-{name}-{os.getpid()}"
    records = workdir / f"{name}-records"
    cgroup.mkdir()
    argv = ([str(native), str(sock), str(cgroup), str(records), *(["null"] if null else [])] if native else
            [sys.executable, str(REPO / "bench" / "launch_floor.py"), "--socket", str(sock), "--cgroup", str(cgroup),
             "--records", str(records)])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", "the floor server did not start"
        yield str(sock), proc.pid
    finally:
        proc.terminate()
        proc.wait(10)
        cgroupfs.remove_tree(cgroup)


def measure(env: dict[str, str], calls: int, clients: int, meter: CpuMeter, floor: tuple[str, int],
            native: tuple[str, int], null: tuple[str, int]) -> None:
    launcher = [str(LAUNCHER), "--", TRUE]
    shim = [str(SHIM), "-c", "true"]
    paths = {"bare bash -c true": [BASH, "-c", "true"], "bare true": [TRUE], "shim": shim,
             "shim script": [str(SHIM_SCRIPT), "-c", "true"], "launcher": launcher, "floor": launcher,
             "native floor": launcher, "null server": launcher}
    envs = {name: env for name in paths} | {"floor": env | {"AGENTD_JOIN_SOCKET": floor[0]},
                                            "native floor": env | {"AGENTD_JOIN_SOCKET": native[0]},
                                            "null server": env | {"AGENTD_JOIN_SOCKET": null[0]}}
    ((timed, cpu), floor_cpu), native_cpu = CpuMeter(native[1]).measure(calls, lambda: CpuMeter(floor[1]).measure(
        calls, lambda: meter.measure(calls * 3, lambda: rounds(paths, calls, envs))))
    ms: Callable[[list[float]], list[float]] = lambda values: [v * 1e3 for v in values]  # noqa: E731
    shim_over = ms(overheads(timed["shim"], timed["bare bash -c true"]))
    script_over = ms(overheads(timed["shim script"], timed["bare bash -c true"]))
    launcher_over = ms(overheads(timed["launcher"], timed["bare true"]))
    floor_over = ms(overheads(timed["floor"], timed["bare true"]))
    native_over = ms(overheads(timed["native floor"], timed["bare true"]))
    null_over = ms(overheads(timed["null server"], timed["bare true"]))
    agentctl = [spawn_wait([sys.executable, "-m", "agentd.cli.agentctl", "run", "--", TRUE], env)
                for _ in range(AGENTCTL_CALLS)]
    scope, scope_note = systemd_scope(env)
    sdk = ms(sdk_calls(env, calls))
    sdk_grpc = ms(sdk_calls(env, calls, "grpc"))
    with_agentd = throughput(launcher, clients, max(20, calls // clients), env)
    without = throughput([TRUE], clients, max(20, calls // clients), env)
    native_rate = throughput(launcher, clients, max(20, calls // clients), envs["native floor"])
    null_rate = throughput(launcher, clients, max(20, calls // clients), envs["null server"])
    print(f"{'per call (ms)':<40} {'calls':>6} {'p50':>9} {'p99':>9} {'mean':>9}")
    print(line("bare bash -c true", ms(timed["bare bash -c true"])))
    print(line("bare true", ms(timed["bare true"])))
    print(line("agentd-shell -c true", ms(timed["shim"]), "(agentd-run as agentd-shell)"))
    print(line("agentd-shell -c true, sh script", ms(timed["shim script"]), "(agentd/data/agentd-shell)"))
    print(line("agentd-run -- true", ms(timed["launcher"])))
    print(line("agentd-run -- true, floor server", ms(timed["floor"]), "(bench/launch_floor.py)"))
    print(line("agentd-run -- true, native floor", ms(timed["native floor"]), "(bench/launch_floor.c)"))
    print(line("agentd-run -- true, null server", ms(timed["null server"]), "(launch_floor.c null: no kernel work)"))
    print(line("agentctl run -- true", ms(agentctl)))
    print(line("systemd-run --scope true", ms(scope or []), scope_note))
    print(line("shim overhead over bash -c true", shim_over, "(per round)"))
    print(line("  the sh script's", script_over, "(per round)"))
    print(line("launcher overhead over true", launcher_over, "(per round)"))
    print(line("  the same against the floor server", floor_over, "(per round)"))
    print(line("  the same against the native floor", native_over, "(per round)"))
    print(line("  the same against the null server", null_over, "(per round)"))
    print(line("SDK fast path (BEGIN + END)", sdk, "(launch excluded)"))
    print(line("SDK over gRPC (BeginToolCall + END)", sdk_grpc, "(launch excluded)"))
    agentd_cpu = (cpu.user + cpu.kernel) * 1e3  # over the shims' and the launcher's calls (3 per round)
    print(f"agentd CPU per call: {agentd_cpu:.3f} ms (user {cpu.user * 1e3:.3f}, kernel {cpu.kernel * 1e3:.3f})")
    floor_ms = (floor_cpu.user + floor_cpu.kernel) * 1e3
    print(f"floor server CPU per call: {floor_ms:.3f} ms (user {floor_cpu.user * 1e3:.3f}, "
          f"kernel {floor_cpu.kernel * 1e3:.3f}); agentd / floor: {agentd_cpu / floor_ms:.2f}x "
          "(both measured over the same rounds: steadier than either on a noisy host)")
    native_ms = (native_cpu.user + native_cpu.kernel) * 1e3
    print(f"native floor CPU per call: {native_ms:.3f} ms (user {native_cpu.user * 1e3:.3f}, "
          f"kernel {native_cpu.kernel * 1e3:.3f}): about what the kernel work alone costs")
    print(f"{clients} clients: {with_agentd:.0f} calls/s through agentd-run; {without:.0f}/s launching true "
          f"without agentd; {native_rate:.0f}/s through agentd-run against the native floor "
          f"({native_rate / without:.2f}x: the most any daemon doing this kernel work could reach here); "
          f"{null_rate:.0f}/s against the null server ({null_rate / without:.2f}x: the launcher alone)")
    print(f"shim_overhead_p50_ms={percentile(shim_over, 0.5):.3f} "
          f"shim_overhead_p99_ms={percentile(shim_over, 0.99):.3f} "
          f"sdk_p50_ms={percentile(sdk, 0.5):.3f} sdk_p99_ms={percentile(sdk, 0.99):.3f} "
          f"agentd_cpu_ms={agentd_cpu:.3f} throughput_ratio={with_agentd / without:.2f} "
          f"launcher_overhead_p50_ms={percentile(launcher_over, 0.5):.3f} "
          f"launcher_overhead_p99_ms={percentile(launcher_over, 0.99):.3f} "
          f"shim_script_overhead_p50_ms={percentile(script_over, 0.5):.3f} floor_cpu_ms={floor_ms:.3f} "
          f"agentd_floor_ratio={agentd_cpu / floor_ms:.2f} "
          f"floor_overhead_p50_ms={percentile(floor_over, 0.5):.3f} native_floor_cpu_ms={native_ms:.3f} "
          f"native_floor_overhead_p50_ms={percentile(native_over, 0.5):.3f} "
          f"native_floor_throughput_ratio={native_rate / without:.2f} "
          f"null_server_overhead_p50_ms={percentile(null_over, 0.5):.3f} "
          f"null_server_throughput_ratio={null_rate / without:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    if not LAUNCHER.exists() or not SHIM.exists():
        raise SystemExit(f"{LAUNCHER} or {SHIM} not built: make -C launcher")
    from support import Daemon, create_session

    from agentd.api.gen import agentd_pb2 as pb

    home = Path("/proc/self/cgroup").read_text().strip().split("::", 1)[1]
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(Path(tmp), daemon={"log_level": "info"})  # the default level, as an operator runs it
        try:
            daemon.start()
            with daemon.admin() as admin:
                sid, token = create_session(admin, capture=pb.CAPTURE_OFF)
            env = daemon.env(token) | {"AGENTD_JOIN_SOCKET": str(daemon.join_socket), "AGENTD_RUN": str(LAUNCHER)}
            meter = CpuMeter(server_pid(str(daemon.admin_socket)))
            (daemon.session_path(sid) / "agent" / "cgroup.procs").write_text(str(os.getpid()))
            try:
                mount = daemon.cgroup_root.parent
                native_floor = build_native_floor(Path(tmp))
                with floor_server(Path(tmp), mount) as floor, floor_server(Path(tmp), mount, native_floor) as native, \
                        floor_server(Path(tmp), mount, native_floor, null=True) as null:
                    measure(env, args.calls, args.clients, meter, floor, native, null)
            finally:
                mount = daemon.cgroup_root.parent
                (mount / home.lstrip("/") / "cgroup.procs").write_text(str(os.getpid()))
        finally:
            daemon.cleanup()


if __name__ == "__main__":
    main()
