"""A tool call starts as from a shell (default signal dispositions, empty mask), and the signals that should
stop `agentctl run` stop its tool: Ctrl-C on a terminal once, SIGTERM forwarded; agentctl stays to report."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from support import AGENTCTL, REPO, SLOW, Daemon, wait_for

from agentd.api.gen import agentd_pb2 as pb
from agentd.launch import SI_KERNEL, should_forward

EXIT_PROMPTLY = 5.0 * SLOW  # seconds an interrupted `sleep 30` may take to be reported
SI_USER = 0  # si_code of a signal sent with kill()


def run_argv(sid: str, *argv: str) -> list[str]:
    return [*AGENTCTL, "run", "--session", sid, "--", *argv]


def signal_masks(status: str) -> dict[str, int]:
    """SigIgn and SigBlk from a /proc/<pid>/status text."""
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if line.startswith(("SigIgn", "SigBlk")))
    return {key: int(value, 16) for key, value in fields.items()}


def descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *descendants(int(child))]
    return found


def running_tool(pid: int, comm: str) -> int:
    """The pid of the tool `comm` once it runs (exec'd) under process `pid`."""
    found: list[int] = []

    def execd() -> bool:
        try:
            found[:] = [c for c in descendants(pid) if Path(f"/proc/{c}/comm").read_text().strip() == comm]
        except (FileNotFoundError, ProcessLookupError):
            return False
        return bool(found)

    wait_for(execd, timeout=20 * SLOW)
    return found[0]


def last_record(daemon: Daemon, sid: str) -> dict[str, object]:
    with daemon.admin() as admin:
        call = admin.call("ListToolCalls", pb.ListToolCallsRequest(session_id=sid, limit=1)).finished[0]
    return daemon.record(call.call_id)


@contextmanager
def stopped_on_exit(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """Kill agentctl if the test failed while it ran (its tool dies with the session, deleted by the fixture)."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@contextmanager
def on_terminal(daemon: Daemon, argv: Sequence[str]) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Run argv with a pseudo-terminal as its controlling terminal (setsid --ctty); yields (process, master)."""
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(["setsid", "--ctty", "--wait", *argv], stdin=slave, stdout=slave, stderr=slave,
                                env=daemon.env(), cwd=REPO)
        os.close(slave)
        slave = -1
        with stopped_on_exit(proc):
            yield proc, master
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)


@contextmanager
def process_with_pid(pid: int, argv: Sequence[str]) -> Iterator[subprocess.Popen[bytes]]:
    """Start argv as process `pid` (free again): the kernel hands out ns_last_pid + 1 next, unless another
    process or thread of the host takes it first (then try again)."""
    for _ in range(50):
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        proc = subprocess.Popen(argv)
        with stopped_on_exit(proc):
            if proc.pid == pid:
                yield proc
                return
    raise AssertionError(f"pid {pid} was not handed out again")


def read_until(master: int, text: bytes, timeout: float) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while text not in seen and time.monotonic() < deadline:
        if select.select([master], [], [], 0.05)[0]:
            seen += os.read(master, 4096)
    assert text in seen, seen
    return seen


def test_agentctl_starts_the_tool_with_default_signals(daemon: Daemon, session: tuple[str, str]) -> None:
    """agentctl started with signals ignored (a background job of a shell ignores SIGINT/SIGQUIT), itself
    ignoring SIGPIPE/SIGXFSZ (Python) and blocking what it forwards: its tool sees none of that."""
    sid, _ = session
    ignoring = ["sh", "-c", 'trap "" HUP INT QUIT; exec "$@"', "sh", *run_argv(sid, "cat", "/proc/self/status")]
    done = subprocess.run(ignoring, capture_output=True, text=True, env=daemon.env(), cwd=REPO, timeout=60 * SLOW)
    assert done.returncode == 0, done.stderr
    assert signal_masks(done.stdout) == {"SigIgn": 0, "SigBlk": 0}


def test_client_starts_the_tool_with_default_signals(
    daemon: Daemon, session: tuple[str, str], tmp_path: Path
) -> None:
    sid, _ = session
    status = tmp_path / "status"
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        with daemon.admin() as admin:
            outcome = admin.run(["cp", "/proc/self/status", str(status)], sid)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
        signal.signal(signal.SIGINT, previous)
    assert outcome.exit_code == 0
    assert signal_masks(status.read_text()) == {"SigIgn": 0, "SigBlk": 0}


def test_a_pipe_closed_early_stops_its_writer_as_in_a_shell(daemon: Daemon, session: tuple[str, str]) -> None:
    """`yes | head -1`: yes dies of SIGPIPE (141), silently, instead of failing on EPIPE."""
    sid, _ = session
    argv = run_argv(sid, "sh", "-c", '(yes; echo "yes: $?" >&2) | head -1')
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, env=daemon.env(), cwd=REPO, timeout=60 * SLOW)
    assert (done.returncode, done.stdout, done.stderr) == (0, "y\n", "yes: 141\n")
    assert time.monotonic() - started < 10 * SLOW


def test_ctrl_c_on_a_terminal_stops_the_tool(daemon: Daemon, session: tuple[str, str]) -> None:
    sid, _ = session
    with on_terminal(daemon, run_argv(sid, "sleep", "30")) as (proc, master):
        running_tool(proc.pid, "sleep")
        os.write(master, b"\x03")
        assert proc.wait(EXIT_PROMPTLY) == 130
    record = last_record(daemon, sid)
    assert record["exit_status"] == {"code": 0, "signal": signal.SIGINT}


def test_ctrl_c_reaches_the_tool_once(daemon: Daemon, session: tuple[str, str], tmp_path: Path) -> None:
    """The terminal sends SIGINT to the whole foreground group, the tool included: agentctl must not send it
    again. The tool counts the SIGINTs it gets for a second, then dies of one."""
    sid, _ = session
    count = tmp_path / "sigints"
    script = ('trap \'echo INT >> "$0"\' INT; echo ready; sleep 1 & wait $!; wait $!; '
              'trap - INT; kill -INT $$')
    with on_terminal(daemon, run_argv(sid, "sh", "-c", script, str(count))) as (proc, master):
        read_until(master, b"ready", 20 * SLOW)
        os.write(master, b"\x03")
        assert proc.wait(EXIT_PROMPTLY) == 130
    assert count.read_text() == "INT\n"


def test_sigterm_to_agentctl_stops_the_tool(daemon: Daemon, session: tuple[str, str]) -> None:
    sid, _ = session
    proc = subprocess.Popen(run_argv(sid, "sleep", "30"), env=daemon.env(), cwd=REPO)
    with stopped_on_exit(proc):
        running_tool(proc.pid, "sleep")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(EXIT_PROMPTLY) == 143
    assert last_record(daemon, sid)["exit_status"] == {"code": 0, "signal": signal.SIGTERM}


def test_sigterm_after_the_tool_exited_spares_the_process_reusing_its_pid(
    daemon: Daemon, session: tuple[str, str]
) -> None:
    """SIGTERM once the tool has exited and been reaped, while agentd has not answered END yet (stopped), and
    its pid now names another process: that process is left alone (forwarding goes through the tool's pidfd);
    agentctl reports the end and exits 0."""
    sid, _ = session
    assert daemon.proc is not None
    proc = subprocess.Popen(run_argv(sid, "sleep", "0.5"), env=daemon.env(), cwd=REPO, stderr=subprocess.PIPE)
    with stopped_on_exit(proc):
        tool = running_tool(proc.pid, "sleep")
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: tool not in descendants(proc.pid))
            with process_with_pid(tool, ["sleep", "30"]) as bystander:
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.2 * SLOW)
                assert proc.poll() is None
                daemon.proc.send_signal(signal.SIGCONT)
                _, err = proc.communicate(timeout=60 * SLOW)
                assert bystander.poll() is None
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
    assert (proc.returncode, err) == (0, b"")
    assert last_record(daemon, sid)["exit_status"] == {"code": 0, "signal": 0}


def test_sigterm_before_the_tool_runs(daemon: Daemon, session: tuple[str, str]) -> None:
    """SIGTERM while agentctl waits for agentd (here: stopped), its child still held before exec: agentctl
    does not die on the spot; the held child gets the signal, and agentctl reports it when agentd answers."""
    sid, _ = session
    assert daemon.proc is not None
    proc = subprocess.Popen(run_argv(sid, "sleep", "30"), env=daemon.env(), cwd=REPO,
                            stderr=subprocess.PIPE)
    with stopped_on_exit(proc):
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            running_tool(proc.pid, "sh")  # the launcher's held shell
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2 * SLOW)
            assert proc.poll() is None
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=60 * SLOW)
    assert proc.returncode == 143, err
    with daemon.admin() as admin:
        assert not admin.call("ListToolCalls", pb.ListToolCallsRequest(session_id=sid)).active


def test_which_signals_are_passed_on() -> None:
    """Only a keyboard signal from the terminal (si_code SI_KERNEL) to a tool still in agentctl's process
    group is not sent again; kill() (SI_USER) and hangups are; anything outside FORWARDED never is."""
    keyboard_from_terminal = [(signum, SI_KERNEL, True) for signum in (signal.SIGINT, signal.SIGQUIT)]
    assert not any(should_forward(*case) for case in keyboard_from_terminal)
    sent = [(signal.SIGINT, SI_USER, True), (signal.SIGQUIT, SI_KERNEL, False), (signal.SIGTERM, SI_USER, True),
            (signal.SIGTERM, SI_KERNEL, True), (signal.SIGHUP, SI_KERNEL, True)]
    assert all(should_forward(*case) for case in sent)
    assert not should_forward(signal.SIGUSR1, SI_USER, False)
