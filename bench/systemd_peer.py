"""Per-call wall time of a one-off command under its own cgroup: agentd vs systemd's transient scope (issue 12).

Run on a host with systemd as PID 1 and agentd installed as its service (the testbed's systemd flavour):

    AGENTD_TESTBED_FLAVOUR=systemd AGENTD_TESTBED_EXEC='python3 bench/systemd_peer.py --install' \
        bash vagrant/run-tests.sh

Ways to run `/bin/true`, interleaved round-robin so that they share the machine's noise:
  bare          posix_spawn + wait: no cgroup of its own (the floor)
  systemd-run   `systemd-run --scope --quiet -p MemoryMax=256M -- true`: a transient scope with a memory limit
  agentctl      `agentctl run --memory-max 256M -- true` from a sandbox (token, sandbox socket): a whole CLI start
  client        agentd.client.Client.run(["true"], memory_max_bytes=256M) in this process: what a harness pays
  agentd-run    the native launcher (launcher/build/agentd-run or /usr/local/bin/agentd-run), when it exists
Prints a Markdown table: median and p90 in ms and the median relative to bare. Under TCG, absolute times are
10-15x a real host's: compare rows within one run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agentd.api.gen import agentd_pb2 as pb  # noqa: E402
from agentd.client import Client  # noqa: E402

ADMIN_SOCKET = "/run/agentd/admin.sock"
SANDBOX_SOCKET = "/run/agentd/sandbox.sock"
MEMORY_MAX = 256 << 20
WHEELHOUSE = "/opt/agentd-wheelhouse"


def spawn_wait(argv: list[str], env: dict[str, str] | None = None) -> None:
    pid = os.posix_spawnp(argv[0], argv, env if env is not None else dict(os.environ))
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{argv} failed: wait status {status}")


def launcher() -> str | None:
    for candidate in (REPO / "launcher" / "build" / "agentd-run", Path("/usr/local/bin/agentd-run")):
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def ways(token: str) -> dict[str, Callable[[], None]]:
    sandbox_env = dict(os.environ, AGENTD_SOCKET=SANDBOX_SOCKET, AGENTD_SESSION_TOKEN=token)
    sandbox_env.pop("PYTHONPATH", None)
    agentctl = shutil.which("agentctl") or "/usr/local/bin/agentctl"
    client = Client(SANDBOX_SOCKET, token=token)
    found: dict[str, Callable[[], None]] = {
        "bare": lambda: spawn_wait(["true"]),
        "systemd-run": lambda: spawn_wait(["systemd-run", "--scope", "--quiet", "-p", f"MemoryMax={MEMORY_MAX}",
                                           "--", "true"]),
        "agentctl": lambda: spawn_wait([agentctl, "run", "--memory-max", str(MEMORY_MAX), "--", "true"], sandbox_env),
        "client": lambda: _client_run(client),
    }
    native = launcher()
    if native:
        found["agentd-run"] = lambda: spawn_wait([native, "--", "true"], sandbox_env)
    return found


def _client_run(client: Client) -> None:
    outcome = client.run(["true"], memory_max_bytes=MEMORY_MAX)
    if outcome.exit_code != 0:
        raise RuntimeError(f"client run failed: {outcome.result}")


def measure(runs: dict[str, Callable[[], None]], rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in runs}
    for once in runs.values():  # warm-up: page cache, first connections
        once()
    for _ in range(rounds):
        for name, once in runs.items():
            start = time.perf_counter()
            once()
            times[name].append((time.perf_counter() - start) * 1000)
    return times


def table(times: dict[str, list[float]]) -> str:
    floor = statistics.median(times["bare"])
    rows = ["| way | median ms | p90 ms | median / bare |", "|---|---|---|---|"]
    for name, ms in times.items():
        p90 = statistics.quantiles(ms, n=10)[-1] if len(ms) > 1 else ms[0]
        rows.append(f"| {name} | {statistics.median(ms):.1f} | {p90:.1f} | {statistics.median(ms) / floor:.1f}x |")
    return "\n".join(rows)


def measure_inside(session_id: str, token: str, rounds: int) -> str:
    """Measure from a child placed into the session's agent/ leaf, as an agent in its sandbox would (only the
    session's own processes may run its calls); this process stays outside, so deleting the session spares it."""
    child = subprocess.Popen([sys.executable, __file__, "--inside", token, "--rounds", str(rounds)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    with Client(ADMIN_SOCKET) as admin:
        admin.call("PlaceAgent", pb.PlaceAgentRequest(session_id=session_id, pid=child.pid))
    out, _ = child.communicate("go\n")
    if child.returncode != 0:
        raise RuntimeError(f"the measuring child failed ({child.returncode})")
    return out.strip()


def active() -> bool:
    return subprocess.run(["systemctl", "-q", "is-active", "agentd"]).returncode == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--inside", metavar="TOKEN", help=argparse.SUPPRESS)  # the measuring child
    parser.add_argument("--install", action="store_true",
                        help=f"install and start agentd first if it is not running (offline from {WHEELHOUSE} "
                             "when it exists), and uninstall it afterwards")
    args = parser.parse_args()
    if args.inside:
        sys.stdin.readline()  # released once placed into the session's agent/ leaf
        print(table(measure(ways(args.inside), args.rounds)), flush=True)
        return 0
    installed_here = False
    if not active():
        if not args.install:
            print("agentd.service is not active (use --install)", file=sys.stderr)
            return 2
        wheels = ["--wheels", WHEELHOUSE] if Path(WHEELHOUSE).is_dir() else []
        subprocess.run(["bash", str(REPO / "systemd/install.sh"), *wheels], check=True)
        subprocess.run(["systemctl", "start", "agentd"], check=True)
        installed_here = True
    try:
        with Client(ADMIN_SOCKET) as admin:
            reply = admin.call("CreateSession", pb.CreateSessionRequest(spec=pb.SessionSpec(
                priority=pb.PRIORITY_NORMAL, capture=pb.CAPTURE_OFF)))
        try:
            table_text = measure_inside(reply.session.spec.id, reply.token, args.rounds)
        finally:
            with Client(ADMIN_SOCKET) as admin:
                admin.call("DeleteSession", pb.DeleteSessionRequest(session_id=reply.session.spec.id, force=True))
        kernel = os.uname().release
        systemd = subprocess.run(["systemctl", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
        print(f"\n{args.rounds} rounds, kernel {kernel}, {systemd}, {os.cpu_count()} CPUs\n")
        print(table_text)
    finally:
        if installed_here:
            subprocess.run(["bash", str(REPO / "systemd/install.sh"), "--uninstall", "--force"], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
