"""Test support: run a real agentd as a subprocess on a private cgroup root and sockets, and clean up after it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from agentd.api.gen import agentd_pb2 as pb
from agentd.client import Client
from agentd.kernel import cgroupfs
from agentd.kernel.mounts import cgroup2_mount

IN_GUEST = os.environ.get("AGENTD_IN_GUEST") == "1"
SLOW = 10.0 if IN_GUEST else 1.0  # TCG guests run Python 10-15x slower
REPO = Path(__file__).resolve().parent.parent
AGENTCTL = [sys.executable, "-m", "agentd.cli.agentctl"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_root_name() -> str:
    return f"agentd-test-{uuid.uuid4().hex[:8]}"


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Daemon:
    """A real agentd process with its own config, cgroup root, sockets and records."""

    def __init__(self, workdir: Path, cgroup_root: Path | None = None, **overrides: dict[str, Any]) -> None:
        self.workdir = workdir
        self.cgroup_root = cgroup_root or cgroup2_mount().path / test_root_name()
        self.admin_socket = workdir / "admin.sock"
        self.sandbox_socket = workdir / "sandbox.sock"
        self.join_socket = workdir / "join.sock"
        self.records = workdir / "state" / "records.jsonl"
        self.metrics_port = free_port()
        self.log = workdir / "agentd.log"
        self.config = workdir / "agentd.toml"
        sections: dict[str, dict[str, Any]] = {
            "daemon": {"cgroup_root": str(self.cgroup_root), "state_dir": str(workdir / "state"),
                       "log_level": "debug"},
            "api": {"admin_socket": str(self.admin_socket), "sandbox_socket": str(self.sandbox_socket),
                    "join_socket": str(self.join_socket)},
            "metrics": {"address": f"127.0.0.1:{self.metrics_port}"},
        }
        for section, values in overrides.items():
            sections.setdefault(section, {}).update(values)
        lines = []
        for section, values in sections.items():
            lines.append(f"[{section}]")
            for key, value in values.items():
                lines.append(f"{key} = {json.dumps(value)}")  # a TOML value too: strings, numbers, bools, lists
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0 * SLOW) -> Daemon:
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agentd.daemon", "--config", str(self.config)],
                stdout=log, stderr=log, env=child_env(), cwd=REPO,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agentd exited with {self.proc.returncode}:\n{self.log.read_text()}")
            if b'"agentd ready"' in self.log.read_bytes()[offset:]:
                return self
            time.sleep(0.02)
        self.proc.kill()
        self.proc.wait()
        raise RuntimeError(f"agentd did not become ready in {timeout} s:\n{self.log.read_text()}")

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(10 * SLOW)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def cleanup(self) -> None:
        """Stop the daemon and remove its whole cgroup tree (killing anything left)."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        finally:
            cgroupfs.remove_tree(self.cgroup_root)

    def admin(self) -> Client:
        return Client(str(self.admin_socket), timeout=30 * SLOW)

    def sandbox(self, token: str) -> Client:
        return Client(str(self.sandbox_socket), token=token, timeout=30 * SLOW)

    def env(self, token: str | None = None) -> dict[str, str]:
        env = child_env()
        env.pop("AGENTD_SESSION_TOKEN", None)
        env["AGENTD_SOCKET"] = str(self.sandbox_socket if token else self.admin_socket)
        if token:
            env["AGENTD_SESSION_TOKEN"] = token
        return env

    def session_path(self, session_id: str) -> Path:
        return self.cgroup_root / "sessions" / session_id

    def records_lines(self) -> list[str]:
        """The complete lines of the records file: agentd may be in the middle of writing the last one (a test
        that parsed the half-written line failed now and then under load)."""
        if not self.records.exists():
            return []
        return self.records.read_text().split("\n")[:-1]

    def record(self, call_id: str) -> dict[str, Any]:
        """A finished call's record, once its line is written (a few milliseconds after the result)."""
        found: list[dict[str, Any]] = []

        def written() -> bool:
            found[:] = [json.loads(line) for line in self.records_lines() if call_id in line]
            return bool(found)

        wait_for(written)
        assert len(found) == 1, f"call {call_id} recorded {len(found)} times"
        return found[0]


def call_cgroups(session: Path) -> list[str]:
    """Names of a session's tool-call cgroups (labelled; the unlabelled spares agentd makes ahead don't count)."""
    return [p.name for p in cgroupfs.children(session)
            if p.name.startswith("tc-") and cgroupfs.get_label(p, "call") is not None]


def spawn_in(cgroup: Path, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start a process that moves itself into `cgroup` before it execs argv (as a container runtime would).
    A shell makes the move, in place, so no Python runs in the forked child: a child forked by a process
    that uses gRPC and then running Python can abort in gRPC's fork handlers."""
    enter = 'echo 0 > "$0" && exec "$@"'
    return subprocess.Popen(["/bin/sh", "-c", enter, str(cgroup / "cgroup.procs"), *argv], **kwargs)


def rpc_error(fn: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    """Call an RPC that must fail; return the error."""
    try:
        fn(*args, **kwargs)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError("the call succeeded but was expected to fail")


def create_session(client: Client, session_id: str = "", **spec: Any) -> tuple[str, str]:
    reply = client.call("CreateSession", pb.CreateSessionRequest(spec=pb.SessionSpec(id=session_id, **spec)))
    return reply.session.spec.id, reply.token


def wait_for(predicate: Any, timeout: float = 5.0 * SLOW, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def scrape(daemon: Daemon) -> str:
    """The daemon's /metrics page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def value(text: str, sample: str) -> float:
    """The value of one sample (name with labels, as exposed) in a scraped page."""
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    assert match, f"{sample} not in metrics"
    return float(match.group(1))


# The ladder's unit tests run at these fixed reserves and recovery timings (the defaults until December 2026), so
# that they test its logic rather than today's tuning; docs/policy.md has the defaults.
MIB_ = 1 << 20
LADDER_TEST_TUNING: dict[str, float | int] = {
    "throttle_reserve_ratio": 0.10, "throttle_reserve_min": 128 * MIB_,
    "freeze_reserve_ratio": 0.05, "freeze_reserve_min": 64 * MIB_,
    "kill_reserve_ratio": 0.02, "kill_reserve_min": 32 * MIB_,
    "emergency_reserve_ratio": 0.01, "emergency_reserve_min": 16 * MIB_,
    "recover_reserve_ratio": 0.15, "recover_reserve_min": 192 * MIB_,
    "recover_dwell_seconds": 2.0, "recover_step_seconds": 0.25,
}
