"""Auto-capture: the rules; and in the daemon, an undeclared `bash -c …` or known heavy command exec'd in a
session's agent/ leaf runs in its own implicit call, finalised with a record and its exit status, nothing left
behind; agentd's own launcher, other commands, and sessions with capture off are not captured."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import support
from bpf_support import requires_root
from support import AGENTCTL, Daemon, create_session, scrape, spawn_in, value, wait_for

from agentd.api.gen import agentd_pb2 as pb
from agentd.core.capture import COMMAND, SHELL, Rules
from agentd.core.config import load_config
from agentd.kernel.bpf.lifecycle import wake_name_key
from agentd.launch import WAIT_THEN_EXEC

pytestmark = requires_root

# Waits (up to 5 s) until it runs in a tool-call cgroup, prints its cgroups and exits 5.
PROBE = (
    "import time\n"
    "for _ in range(500):\n"
    "    where = open('/proc/self/cgroup').read()\n"
    "    if '/tc-' in where:\n"
    "        break\n"
    "    time.sleep(0.01)\n"
    "print(where)\n"
    "raise SystemExit(5)\n"
)
IMPLICIT = 'agentd_tool_calls_started_total{implicit="true"}'


RULE_CASES: list[tuple[str, tuple[str, ...], str | None]] = [
    ("/usr/bin/bash", ("bash", "-c", "make -j8"), SHELL),
    ("/bin/sh", ("sh", "-lc", "ls"), SHELL),
    ("/bin/zsh", ("zsh", "-ec", "ls"), SHELL),
    ("/bin/bash", ("bash", "script.sh"), None),
    ("/bin/bash", ("bash",), None),
    ("/bin/bash", ("bash", "--norc"), None),
    ("/usr/bin/python3", ("python3", "-c", "print()"), None),
    ("/bin/sh", ("sh", "-c", WAIT_THEN_EXEC, "sh", "pytest"), None),  # agentd's launcher
    ("/home/a/.venv/bin/pytest", ("/usr/bin/python3", "/home/a/.venv/bin/pytest", "-x"), COMMAND),
    ("/usr/bin/make", ("make", "-j8"), COMMAND),
    ("/usr/bin/cat", ("cat", "-c"), None),
]


@pytest.mark.parametrize(("filename", "argv", "rule"), RULE_CASES)
def test_rules(filename: str, argv: tuple[str, ...], rule: str | None) -> None:
    config = load_config(None)
    assert Rules(config.capture_shells, config.capture_commands).match(filename, argv) == rule


def test_wake_names_cover_the_rules() -> None:
    """The kernel wakes the daemon at once for every exec a rule can match (by the basename's first 15 bytes)."""
    config = load_config(None)
    rules = Rules(config.capture_shells, config.capture_commands)
    assert rules.names() == config.capture_shells | config.capture_commands
    keys = {wake_name_key(name) for name in rules.names()}
    for filename, _, rule in RULE_CASES:
        if rule is not None:
            assert wake_name_key(os.path.basename(filename)) in keys, filename
    assert wake_name_key("true") not in keys and wake_name_key("python3") not in keys


def call_cgroups(daemon: Daemon, sid: str) -> list[str]:
    return support.call_cgroups(daemon.session_path(sid))


def run_in_agent(daemon: Daemon, sid: str, argv: list[str], **kwargs: object) -> tuple[int, str]:
    """Run argv in the session's agent/ leaf to completion: (exit status, stdout)."""
    proc = spawn_in(daemon.session_path(sid) / "agent", argv, stdout=subprocess.PIPE, **kwargs)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out.decode()


def captured_call(daemon: Daemon, sid: str, output: str) -> pb.ToolCallResult:
    """The finished call whose cgroup the probe printed."""
    match = re.search(rf"/sessions/{re.escape(sid)}/tc-([0-9a-f]+)\n", output)
    assert match, f"not captured: {output!r}"
    with daemon.admin() as admin:
        result: pb.ToolCallResult = admin.wait(match.group(1), timeout=10)
    return result


def recorded(daemon: Daemon, call_id: str) -> dict[str, object]:
    return daemon.record(call_id)


def test_shell_command_is_captured_and_finalised(daemon: Daemon, session: tuple[str, str]) -> None:
    sid, _ = session
    before = scrape(daemon)
    command = f"{shlex.quote(sys.executable)} -c {shlex.quote(PROBE)}"
    status, out = run_in_agent(daemon, sid, ["bash", "-c", command])
    assert status == 5
    result = captured_call(daemon, sid, out)

    assert result.implicit and result.tool == "bash" and list(result.argv) == ["bash", "-c", command]
    assert (result.outcome, result.has_exit_status, result.exit_code) == (pb.OUTCOME_FAILED, True, 5)
    assert result.capture.rule == "shell" and 0 < result.capture.latency_seconds < 1
    assert result.capture.memory_before_move_bytes >= -1  # -1: the process was gone when measured
    record = recorded(daemon, result.call_id)
    assert record["implicit"] is True and record["exit_status"] == {"code": 5, "signal": 0}
    assert record["capture"]["rule"] == "shell"  # type: ignore[index]
    wait_for(lambda: call_cgroups(daemon, sid) == [])

    after = scrape(daemon)
    assert value(after, IMPLICIT) == value(before, IMPLICIT) + 1
    latencies = "agentd_capture_latency_seconds_count"
    assert value(after, latencies) == value(before, latencies) + 1


def test_heavy_command_is_captured_by_name(daemon: Daemon, session: tuple[str, str], tmp_path: Path) -> None:
    sid, _ = session
    pytest_named = tmp_path / "pytest"  # stands in for the real one: captured by its basename
    pytest_named.write_text(f"#!{sys.executable}\n{PROBE.replace('SystemExit(5)', 'SystemExit(0)')}")
    pytest_named.chmod(0o755)
    status, out = run_in_agent(daemon, sid, [str(pytest_named), "-x"])
    assert status == 0
    result = captured_call(daemon, sid, out)
    assert result.implicit and result.tool == "pytest" and result.capture.rule == "command"
    assert (result.outcome, result.exit_code) == (pb.OUTCOME_OK, 0)
    wait_for(lambda: call_cgroups(daemon, sid) == [])


def test_agentctl_launcher_is_not_captured(daemon: Daemon, session: tuple[str, str]) -> None:
    """A declared `agentctl run` from the agent leaf is one call: neither the launcher (`sh -c` waiting to be
    placed) nor the command (`sh -c`, exec'd once placed) becomes an implicit one."""
    sid, token = session
    before = scrape(daemon)
    status, out = run_in_agent(daemon, sid, [*AGENTCTL, "run", "--", "sh", "-c", "cat /proc/self/cgroup; exit 4"],
                               env=daemon.env(token))
    assert status == 4 and f"/sessions/{sid}/tc-" in out
    with daemon.admin() as admin:
        finished = admin.call("ListToolCalls", pb.ListToolCallsRequest(session_id=sid)).finished
    assert [(r.implicit, r.tool, r.exit_code) for r in finished] == [(False, "sh", 4)]
    assert value(scrape(daemon), IMPLICIT) == value(before, IMPLICIT)


def test_other_commands_are_not_captured(daemon: Daemon, session: tuple[str, str], tmp_path: Path) -> None:
    sid, _ = session
    script = tmp_path / "script.sh"
    script.write_text("cat /proc/self/cgroup\n")
    python = [sys.executable, "-c", "print(open('/proc/self/cgroup').read())"]
    for argv in (["cat", "/proc/self/cgroup"], ["sh", str(script)], python):
        status, out = run_in_agent(daemon, sid, argv)
        assert status == 0 and f"/sessions/{sid}/agent\n" in out, argv
    with daemon.admin() as admin:
        assert not admin.call("ListToolCalls", pb.ListToolCallsRequest(session_id=sid)).finished


def test_capture_per_session_override(daemon_factory: Callable[..., Daemon]) -> None:
    """[capture] enabled = false: sessions capture only when their spec turns it on; and the other way round."""
    d = daemon_factory(capture={"enabled": False}).start()
    with d.admin() as admin:
        assert not admin.call("GetStatus", pb.GetStatusRequest()).auto_capture
        default, _ = create_session(admin, "default")
        on, _ = create_session(admin, "on", capture=pb.CAPTURE_ON)
        off, _ = create_session(admin, "off", capture=pb.CAPTURE_OFF)
    command = f"{shlex.quote(sys.executable)} -c {shlex.quote(PROBE.replace('range(500)', 'range(50)'))}"
    for sid, captured in ((default, False), (on, True), (off, False)):
        status, out = run_in_agent(d, sid, ["bash", "-c", command])
        assert status == 5
        assert ("/tc-" in out) == captured, sid
        if captured:
            assert captured_call(d, sid, out).implicit
