"""Test support for agentd-run (launcher/): the built binary, its environment, and running it in a session."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from support import IN_GUEST, REPO, Daemon, spawn_in

LAUNCHER = REPO / "launcher" / "build" / "agentd-run"


def built_launcher() -> Path:
    """The launcher, built first if needed (make -C launcher: protoc-c and a static libprotobuf-c from Debian).
    The testbed guest has no protoc-c: it runs the static binary the host built (the tree is shared)."""
    if IN_GUEST:
        assert LAUNCHER.exists(), f"{LAUNCHER} not built on the host (make -C launcher)"
        return LAUNCHER
    subprocess.run(["make", "-s", "-C", str(REPO / "launcher")], check=True, capture_output=True, timeout=300)
    return LAUNCHER


def launcher_env(daemon: Daemon, token: str | None) -> dict[str, str]:
    env = daemon.env(token)
    env["AGENTD_JOIN_SOCKET"] = str(daemon.join_socket)
    return env


def run_in_session(
    daemon: Daemon, sid: str, token: str | None, args: list[str], **kwargs: Any
) -> subprocess.Popen[bytes]:
    """agentd-run ARGS started from the session's agent/ leaf (as inside a sandbox), token in its environment."""
    kwargs.setdefault("env", launcher_env(daemon, token))
    return spawn_in(daemon.session_path(sid) / "agent", [str(LAUNCHER), *args], **kwargs)


def finished(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
