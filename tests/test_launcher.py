"""agentd-run, the static launcher, end to end against a real daemon: placed before exec, exit codes, feedback,
signals (forwarded, Ctrl-C through a pty once), timeouts, background children, network NONE, its own errors, and
the shim using it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from launcher_support import LAUNCHER, built_launcher, finished, launcher_env, run_in_session
from support import REPO, SLOW, Daemon, call_cgroups, create_session, spawn_in, wait_for
from test_launcher_signals import descendants, last_record, read_until, running_tool, signal_masks

from agentd.api.gen import agentd_pb2 as pb

SHIM = REPO / "agentd" / "data" / "agentd-shell"
NATIVE_SHIM = LAUNCHER.parent / "agentd-shell"  # agentd-run under that name (launcher/shell.c)
EXIT_PROMPTLY = 5.0 * SLOW


@pytest.fixture(scope="module", autouse=True)
def launcher() -> Path:
    return built_launcher()


def test_the_launcher_is_one_static_file() -> None:
    assert "statically linked" in subprocess.run(["file", str(LAUNCHER)], capture_output=True, text=True).stdout
    ldd = subprocess.run(["ldd", str(LAUNCHER)], capture_output=True, text=True)
    assert "not a dynamic executable" in ldd.stdout + ldd.stderr


@pytest.mark.parametrize("code", [0, 1, 7])
def test_exit_code_placement_and_feedback(daemon: Daemon, session: tuple[str, str], code: int) -> None:
    sid, token = session
    args = ["--tool", "probe", "--label", "k=v", "--", "sh", "-c", f"cat /proc/self/cgroup; exit {code}"]
    status, out, err = finished(run_in_session(daemon, sid, token, args, stdout=subprocess.PIPE,
                                               stderr=subprocess.PIPE))
    assert status == code, err
    assert f"/sessions/{sid}/tc-" in out  # the command ran in its call's cgroup (placed before exec)
    with daemon.sandbox(token) as sandbox:
        result = sandbox.call("ListToolCalls", pb.ListToolCallsRequest(limit=1)).finished[0]
    assert (result.tool, dict(result.labels), result.exit_code, result.exit_signal) == ("probe", {"k": "v"}, code, 0)
    assert result.outcome == (pb.OUTCOME_OK if code == 0 else pb.OUTCOME_FAILED)
    if code == 0:
        assert err == ""
    else:
        assert err.startswith(f"agentd: tool call {result.call_id} FAILED (") and result.feedback in err
    wait_for(lambda: not call_cgroups(daemon.session_path(sid)))


def test_killed_by_a_signal_exits_128_plus_it(daemon: Daemon, session: tuple[str, str]) -> None:
    sid, token = session
    status, _, err = finished(run_in_session(daemon, sid, token, ["--", "sh", "-c", "kill -KILL $$"],
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    assert status == 137 and "FAILED" in err and "signal 9" in err


def test_the_command_starts_with_default_signals(daemon: Daemon, session: tuple[str, str]) -> None:
    """Started from a shell that ignores HUP/INT/QUIT, the launcher blocking what it forwards: the tool sees none."""
    sid, token = session
    argv = ["sh", "-c", 'trap "" HUP INT QUIT; exec "$@"', "sh", str(LAUNCHER), "--", "cat", "/proc/self/status"]
    proc = spawn_in(daemon.session_path(sid) / "agent", argv, env=launcher_env(daemon, token),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    status, out, err = finished(proc)
    assert status == 0, err
    assert signal_masks(out) == {"SigIgn": 0, "SigBlk": 0}


def test_sigterm_to_the_launcher_stops_the_tool(daemon: Daemon, session: tuple[str, str]) -> None:
    sid, token = session
    proc = run_in_session(daemon, sid, token, ["--", "sleep", "30"], stderr=subprocess.PIPE)
    try:
        running_tool(proc.pid, "sleep")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(EXIT_PROMPTLY) == 143
    finally:
        _stop(proc)
    assert last_record(daemon, sid)["exit_status"] == {"code": 0, "signal": signal.SIGTERM}


@contextmanager
def _on_terminal(
    daemon: Daemon, sid: str, token: str, args: list[str]
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """The launcher in the session's agent/ leaf with a pseudo-terminal as its controlling terminal."""
    master, slave = os.openpty()
    try:
        proc = spawn_in(daemon.session_path(sid) / "agent", ["setsid", "--ctty", "--wait", str(LAUNCHER), *args],
                        stdin=slave, stdout=slave, stderr=slave, env=launcher_env(daemon, token))
        os.close(slave)
        slave = -1
        try:
            yield proc, master
        finally:
            _stop(proc)
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)


def test_ctrl_c_on_a_terminal_reaches_the_tool_once(daemon: Daemon, session: tuple[str, str], tmp_path: Path) -> None:
    """The terminal sends SIGINT to the whole foreground group, the tool included: the launcher must not send it
    again. The tool counts the SIGINTs it gets for a second, then dies of one: 130."""
    sid, token = session
    count = tmp_path / "sigints"
    script = ('trap \'echo INT >> "$0"\' INT; echo ready; sleep 1 & wait $!; wait $!; '
              'trap - INT; kill -INT $$')
    with _on_terminal(daemon, sid, token, ["--", "sh", "-c", script, str(count)]) as (proc, master):
        read_until(master, b"ready", 20 * SLOW)
        os.write(master, b"\x03")
        assert proc.wait(EXIT_PROMPTLY) == 130
    assert count.read_text() == "INT\n"
    assert last_record(daemon, sid)["exit_status"] == {"code": 0, "signal": signal.SIGINT}


def test_timeout_kills_the_call(daemon: Daemon, session: tuple[str, str]) -> None:
    sid, token = session
    started = time.monotonic()
    status, _, err = finished(run_in_session(daemon, sid, token, ["--timeout", "1", "--", "sleep", "30"],
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    assert status == 137 and " TIMEOUT (" in err, err
    assert time.monotonic() - started < 15 * SLOW


def test_background_children_are_killed_with_the_call(daemon: Daemon, session: tuple[str, str]) -> None:
    sid, token = session
    status, out, err = finished(run_in_session(daemon, sid, token, ["--", "sh", "-c", "sleep 300 & echo $!"],
                                               stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    assert status == 0, err
    straggler = int(out.split()[0])

    def gone() -> bool:
        try:
            return Path(f"/proc/{straggler}/stat").read_text().split(") ")[1][0] == "Z"
        except (FileNotFoundError, ProcessLookupError):
            return True

    wait_for(gone)
    wait_for(lambda: not call_cgroups(daemon.session_path(sid)))


def test_network_none_is_enforced(daemon: Daemon, session: tuple[str, str]) -> None:
    with daemon.admin() as admin:
        if not admin.call("GetStatus", pb.GetStatusRequest()).bpf_network:
            pytest.fail("the network policy program is not attached on this host")
    sid, token = session
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        connect = [sys.executable, "-c", f"import socket; socket.create_connection(('127.0.0.1', {port}), 5)"]
        denied, _, err = finished(run_in_session(daemon, sid, token, ["--network", "none", "--", *connect],
                                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        allowed, _, _ = finished(run_in_session(daemon, sid, token, ["--network", "any", "--", *connect],
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    assert (denied, allowed) == (1, 0)
    assert "PermissionError" in err and "network access denied" in err


def test_its_own_errors_have_distinct_exit_codes(daemon: Daemon, session: tuple[str, str], tmp_path: Path) -> None:
    sid, token = session

    def run(args: list[str], env: dict[str, str], inside: bool = True) -> tuple[int, str]:
        if inside:
            status, _, err = finished(run_in_session(daemon, sid, token, args, env=env, stdout=subprocess.PIPE,
                                                     stderr=subprocess.PIPE))
        else:
            done = subprocess.run([str(LAUNCHER), *args], env=env, capture_output=True, text=True, timeout=60)
            status, err = done.returncode, done.stderr
        return status, err

    env = launcher_env(daemon, token)
    no_daemon = env | {"AGENTD_JOIN_SOCKET": str(tmp_path / "nobody.sock")}
    assert run(["--", "true"], no_daemon)[0] == 121
    assert run(["--", "true"], env | {"AGENTD_SESSION_TOKEN": "not-a-token"}) == (
        122, "agentd-run: PERMISSION_DENIED: unknown session token\n")
    assert run(["--", "true"], {k: v for k, v in env.items() if k != "AGENTD_SESSION_TOKEN"})[0] == 122
    status, err = run(["--timeout", "1e300", "--", "true"], env)
    assert status == 125 and "INVALID_ARGUMENT" in err
    status, err = run(["--", "true"], env, inside=False)  # a process outside the session cannot be placed
    assert status == 126 and "could not place" in err and "PERMISSION_DENIED" in err
    assert run(["--memory", "lots", "--", "true"], env)[0] == 2
    assert run(["--", "no-such-command-anywhere"], env)[0] == 127  # it ran (its call ended FAILED)
    wait_for(lambda: not call_cgroups(daemon.session_path(sid)))


@pytest.mark.parametrize("shim", [SHIM, NATIVE_SHIM], ids=["script", "native"])
def test_the_shim_runs_through_the_launcher(daemon: Daemon, session: tuple[str, str], shim: Path) -> None:
    """The script (through agentd-run) and agentd-run under the name agentd-shell do the same."""
    sid, token = session
    env = launcher_env(daemon, token) | {"AGENTD_RUN": str(LAUNCHER), "AGENTCTL": "/nonexistent/agentctl",
                                         "AGENTD_MEMORY": "low", "AGENTD_TIMEOUT": "30", "AGENTD_NETWORK": "none"}
    proc = spawn_in(daemon.session_path(sid) / "agent",
                    [str(shim), "-c", 'echo "$0 $1 $AGENTD_IN_TOOL_CALL"; cat /proc/self/cgroup; exit 4', "0", "1"],
                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    status, out, err = finished(proc)
    assert status == 4, err
    assert out.startswith("0 1 1\n") and f"/sessions/{sid}/tc-" in out
    with daemon.sandbox(token) as sandbox:
        last = sandbox.call("ListToolCalls", pb.ListToolCallsRequest(limit=1)).finished[0]
    assert last.tool == "bash" and last.limits.memory_high_bytes == 256 << 20
    assert last.limits.timeout_seconds == 30 and last.limits.network == pb.NETWORK_NONE
    assert list(last.argv) == ["/bin/bash", "-c", 'echo "$0 $1 $AGENTD_IN_TOOL_CALL"; cat /proc/self/cgroup; exit 4',
                               "0", "1"]
    # Without a token, or inside a tool call already, it is plain bash: no call (run from outside the session, where
    # no auto-capture would make one).
    for plain_env in (daemon.env(), env | {"AGENTD_IN_TOOL_CALL": "1"}):
        plain = subprocess.run([str(shim), "-c", 'cat /proc/self/cgroup; exit 3'], capture_output=True, text=True,
                               env=plain_env, timeout=60)
        assert plain.returncode == 3 and "tc-" not in plain.stdout, plain.stderr
    wait_for(lambda: not call_cgroups(daemon.session_path(sid)))


def test_the_native_shim_says_when_bash_is_missing(tmp_path: Path) -> None:
    """As a shell would: 127 for a bash that is not there, 126 for one that cannot run."""
    not_executable = tmp_path / "bash"
    not_executable.write_text("")
    for bash, code in (("/nonexistent/bash", 127), (str(not_executable), 126)):
        done = subprocess.run([str(NATIVE_SHIM), "-c", "true"], capture_output=True, text=True, timeout=30,
                              env={"AGENTD_BASH": bash, "PATH": os.environ["PATH"]})
        assert done.returncode == code and f"agentd-shell: {bash}: " in done.stderr


def test_another_sessions_token_cannot_place_this_sessions_process(daemon: Daemon, session: tuple[str, str]) -> None:
    """A process in session B holding A's token: A's call cannot take it (126), nothing is left in A or B."""
    sid_b, _ = session
    with daemon.admin() as admin:
        sid_a, token_a = create_session(admin)
    try:
        status, _, err = finished(run_in_session(daemon, sid_b, token_a, ["--", "true"], stdout=subprocess.PIPE,
                                                 stderr=subprocess.PIPE))
        assert status == 126 and "PERMISSION_DENIED" in err
        status, _, err = finished(run_in_session(daemon, sid_a, token_a, ["--session", sid_b, "--", "true"],
                                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        assert status == 122 and f"not {sid_b!r}" in err
        assert not call_cgroups(daemon.session_path(sid_a)) and not call_cgroups(daemon.session_path(sid_b))
    finally:
        with daemon.admin() as admin:
            admin.call("DeleteSession", pb.DeleteSessionRequest(session_id=sid_a, force=True))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        for pid in descendants(proc.pid):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()
