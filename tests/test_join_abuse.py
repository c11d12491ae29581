"""Issue 9 §1: the join socket under attack from one session while another session runs tool calls, on a real
daemon. The attacker (in session A's agent/ leaf) piles up descriptors (one-byte messages with a pidfd and no
newline, 40 connections x 510, kept) and fills HOLD slots (64 connections x 16 HOLDs of random references with its
own pidfd, renewed). Session B's calls must all succeed, at their usual latency, and agentd's descriptor count
must stay bounded."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from support import AGENTCTL, SLOW, Daemon, create_session, spawn_in

from agentd.api import join
from agentd.api.gen import agentd_pb2 as pb

ATTACK = r"""
import os, secrets, socket, sys, time
path, me = sys.argv[1], os.pidfd_open(os.getpid())
piles, holds = [], []


def connect():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(2)
    sock.connect(path)
    return sock


def flood(sockets, count, message):
    for _ in range(count):
        try:
            sock = connect()
        except OSError:
            return
        sockets.append(sock)
        for _ in range(message[1]):
            try:
                socket.send_fds(sock, [message[0]()], [me])
            except OSError:
                break


def closed(sock):
    sock.settimeout(0)
    try:
        while sock.recv(4096):
            pass
    except BlockingIOError:
        return False
    except OSError:
        pass
    sock.close()
    return True


rounds = 0
while True:  # the piles are kept (those agentd closed are made again), the HOLDs renewed
    piles = [sock for sock in piles if not closed(sock)]
    flood(piles, 40 - len(piles), (lambda: b"x", 510))
    for sock in holds:
        sock.close()
    holds = []
    flood(holds, 64, (lambda: f"HOLD {secrets.token_hex(8)}\n".encode(), 16))
    rounds += 1
    print("round", rounds, flush=True)
    time.sleep(0.5)
"""

VICTIM = r"""
import json, sys, time
from agentd.client import Client
latencies, failures = [], []
with Client.from_env() as client:
    for _ in range(int(sys.argv[1])):
        start = time.perf_counter()
        try:
            outcome = client.run(["/bin/true"])
            if outcome.exit_code != 0 or not outcome.ok:
                failures.append(f"exit {outcome.exit_code}, {outcome.result.outcome}: {outcome.result.feedback}")
        except Exception as exc:
            failures.append(repr(exc))
        latencies.append(time.perf_counter() - start)
print(json.dumps({"latencies": latencies, "failures": failures}))
"""
CALLS = 60


def _run_in(daemon: Daemon, sid: str, token: str, argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    proc = spawn_in(daemon.session_path(sid) / "agent", argv, env=daemon.env(token), stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=300 * SLOW)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _calls(daemon: Daemon, sid: str, token: str) -> tuple[list[float], list[str]]:
    done = _run_in(daemon, sid, token, [sys.executable, "-c", VICTIM, str(CALLS)])
    assert done.returncode == 0, done.stderr.decode()
    report = json.loads(done.stdout)
    return report["latencies"], report["failures"]


def _sample(count: Callable[[], int], stop: threading.Event, seen: list[int]) -> None:
    while not stop.wait(0.01):
        seen.append(count())


def test_one_session_attacking_the_join_socket_does_not_stall_another(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = daemon_factory().start()
    assert daemon.proc is not None
    fds = Path(f"/proc/{daemon.proc.pid}/fd")
    with daemon.admin() as admin:
        attacker, attacker_token = create_session(admin, "abuse-a")
        victim, victim_token = create_session(admin, "abuse-b")
    baseline, failures = _calls(daemon, victim, victim_token)
    assert not failures
    idle_fds = len(list(fds.iterdir()))

    attack = spawn_in(daemon.session_path(attacker) / "agent",
                      [sys.executable, "-c", ATTACK, str(daemon.join_socket)],
                      env=daemon.env(attacker_token), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stop, seen = threading.Event(), [idle_fds]
    sampler = threading.Thread(target=_sample, args=(lambda: len(list(fds.iterdir())), stop, seen))
    try:
        assert attack.stdout is not None
        assert attack.stdout.readline().startswith(b"round 1")  # both attacks made once before B starts
        sampler.start()
        latencies, failures = _calls(daemon, victim, victim_token)
        runs = [_run_in(daemon, victim, victim_token, [*AGENTCTL, "run", "--", "/bin/true"]) for _ in range(3)]
        assert attack.stdout.readline().startswith(b"round")  # still attacking all along
        assert attack.poll() is None
    finally:
        stop.set()
        if sampler.is_alive():
            sampler.join()
        attack.kill()
        attack.wait()
        for stream in (attack.stdout, attack.stderr):
            if stream is not None:
                stream.close()

    assert not failures, failures[:5]
    assert [run.returncode for run in runs] == [0, 0, 0], [run.stderr.decode()[-500:] for run in runs]
    before, during = statistics.median(baseline), statistics.median(latencies)
    assert during < 3 * before + 0.020, (before, during)
    # The attacker's share: its quota of connections and of unclaimed HOLDs, beyond what agentd had open.
    bound = idle_fds + join.MAX_CONNECTIONS_PER_OWNER + join.MAX_HELD_PER_OWNER + 16
    assert max(seen) <= bound, (max(seen), bound)
    refusals = daemon.log.read_text()
    assert '"owner": "session:abuse-a"' in refusals and "HOLD refused" in refusals
    with daemon.admin() as admin:
        listed = admin.call("ListToolCalls", pb.ListToolCallsRequest(session_id=victim, limit=1000))
    assert len(listed.finished) == 2 * CALLS + 3
    print(f"B's median call: {before * 1000:.2f} ms alone, {during * 1000:.2f} ms under attack; "
          f"agentd descriptors: {idle_fds} idle, at most {max(seen)} under attack")
