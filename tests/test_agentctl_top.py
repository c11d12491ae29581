"""`agentctl top` against a real daemon: the plain snapshot when stdout is a pipe, the live view driven in a
pseudo-terminal (the screen read back from what top draws, refreshed in place, q and Ctrl-C quit), and the
sandbox socket's view confined to its own session."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import termios
import time
from collections.abc import Iterator

import pytest
from support import AGENTCTL, SLOW, Daemon, create_session, wait_for

from agentd.api.gen import agentd_pb2 as pb
from agentd.cli import top

ROWS, COLUMNS = 40, 150
CSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def agentctl(daemon: Daemon, *args: str, token: str | None = None) -> str:
    done = subprocess.run([*AGENTCTL, *args], env=daemon.env(token), capture_output=True, text=True,
                          timeout=60 * SLOW)
    assert done.returncode == 0, done.stderr
    return done.stdout


def section(text: str, title: str) -> list[dict[str, str]]:
    """The rows of one section of a frame (after its title, up to the blank line), cut into cells where the
    column header puts them."""
    lines = text.splitlines()
    header = lines[lines.index(title) + 1]
    starts = [m.start() for m in re.finditer(r"(?<=  )\S+(?: \S+)?", header)]
    names = [header[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
    rows = []
    for line in lines[lines.index(title) + 2:]:
        if not line.strip():
            break
        rows.append({n: line[a:b].strip() for n, a, b in zip(names, starts, [*starts[1:], None], strict=True)})
    return rows


@pytest.fixture
def running(daemon: Daemon) -> Iterator[tuple[str, str, str, str]]:
    """A HIGH session with a 1 GiB budget and a LOW one, each with a finished OK and FAILED call, and a `sleep`
    running in the HIGH one: (high id, high token, low id, running call id). Cleaned up after the test."""
    with daemon.admin() as admin:
        high, token = create_session(admin, priority=pb.PRIORITY_HIGH, memory_budget_bytes=1 << 30)
        low, _ = create_session(admin, priority=pb.PRIORITY_LOW)
        for sid in (high, low):
            admin.run(["true"], sid, tool="pass")
            admin.run(["sh", "-c", "exit 3"], sid, tool="fails")
    sleeper = subprocess.Popen([*AGENTCTL, "run", "--session", high, "--tool", "sleeper", "--memory", "64M", "--",
                                "sleep", "600"], env=daemon.env())
    try:
        with daemon.admin() as admin:
            def active() -> list[pb.ToolCallInfo]:
                reply = admin.call("ListToolCalls", pb.ListToolCallsRequest(session_id=high, include_active=True))
                return [c for c in reply.active if c.state == pb.CALL_STATE_RUNNING]

            wait_for(lambda: bool(active()))
            yield high, token, low, active()[0].call_id
    finally:
        sleeper.kill()
        sleeper.wait()
        with daemon.admin() as admin:
            for sid in (high, low):
                admin.call("DeleteSession", pb.DeleteSessionRequest(session_id=sid, force=True))


def test_snapshot_when_stdout_is_not_a_terminal(daemon: Daemon, running: tuple[str, str, str, str]) -> None:
    high, _, low, call_id = running
    text = agentctl(daemon, "top")
    assert "\x1b" not in text, "no terminal sequences in a snapshot"
    assert text.splitlines()[0].startswith("agentd top: admin, ")
    sessions = {row["SESSION"]: row for row in section(text, "SESSIONS")}
    assert (sessions[high]["PRIO"], sessions[high]["BUDGET"], sessions[high]["CALLS"]) == ("high", "1.0 GiB", "1")
    assert (sessions[low]["PRIO"], sessions[low]["BUDGET"], sessions[low]["CALLS"]) == ("low", "-", "0")
    assert sessions[high]["LEVEL"] == "none", "a budgeted session is a pressure domain of its own"
    assert sessions[low]["LEVEL"] == "-"
    assert list(sessions).index(high) < list(sessions).index(low), "most protected first"
    mine = [row for row in section(text, "ACTIVE CALLS") if row["CALL"] == call_id[:12]]
    assert len(mine) == 1, text
    assert (mine[0]["SESSION"], mine[0]["TOOL"], mine[0]["STATE"], mine[0]["DECLARED"]) == (
        high, "sleeper", "running", "64.0 MiB")
    assert re.fullmatch(r"\d+s", mine[0]["AGE"]), mine[0]
    outcomes = {(row["SESSION"], row["TOOL"]): row["OUTCOME"] for row in section(text, "RECENT OUTCOMES")}
    assert outcomes[(high, "pass")] == "ok (0)"
    assert outcomes[(high, "fails")] == "failed (3)"
    assert outcomes[(low, "fails")] == "failed (3)"
    domains = [line.split(": ")[0].strip() for line in text.splitlines()[: text.splitlines().index("SESSIONS")]
               if " free" in line]
    assert domains == ["sessions", f"session:{high}"], "sessions/ and the budgeted session are the domains"


def test_sandbox_sees_only_its_session(daemon: Daemon, running: tuple[str, str, str, str]) -> None:
    high, token, low, call_id = running
    text = agentctl(daemon, "top", token=token)
    assert text.splitlines()[0].startswith(f"agentd top: session {high}, 1 sessions, 1 active calls")
    assert [row["SESSION"] for row in section(text, "SESSIONS")] == [high]
    assert [row["CALL"] for row in section(text, "ACTIVE CALLS")] == [call_id[:12]]
    assert {row["SESSION"] for row in section(text, "RECENT OUTCOMES")} == {high}
    assert low not in text
    done = subprocess.run([*AGENTCTL, "top", "--session", low], env=daemon.env(token), capture_output=True,
                          text=True, timeout=60 * SLOW)
    assert done.returncode != 0 and "PERMISSION_DENIED" in done.stderr


class Terminal:
    """agentctl top on a pseudo-terminal of ROWS x COLUMNS that is its controlling terminal (setsid -c), so that
    Ctrl-C typed on it signals top as a shell's terminal would."""

    def __init__(self, daemon: Daemon, *args: str, rows: int = ROWS) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, COLUMNS, 0, 0))
        env = daemon.env() | {"TERM": "xterm"}
        self.proc = subprocess.Popen(["setsid", "-c", *AGENTCTL, "top", *args], stdin=slave, stdout=slave,
                                     stderr=slave, env=env)
        os.close(slave)
        self.output = b""

    def read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            try:
                self.output += os.read(self.master, 1 << 16)
            except OSError:  # EIO: every slave end closed (top exited)
                time.sleep(timeout)

    def screen(self) -> str:
        """The last complete frame as text: what follows the last cursor-home, escape sequences removed."""
        text = self.output.decode(errors="replace")
        frames = text.split("\x1b[H")
        complete = [f for f in frames[1:] if "\x1b[J" in f]
        return CSI.sub("", complete[-1].split("\x1b[J")[0]).replace("\r", "") if complete else ""

    def wait_screen(self, predicate: object, timeout: float = 10 * SLOW) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.read(0.1)
            if callable(predicate) and predicate(self.screen()):
                return self.screen()
        raise AssertionError(f"screen never matched; last:\n{self.screen()}")

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


@pytest.fixture
def terminal(daemon: Daemon) -> Iterator[list[Terminal]]:
    made: list[Terminal] = []
    try:
        yield made
    finally:
        for t in made:
            t.close()


def exits(t: Terminal, timeout: float = 10 * SLOW) -> int:
    deadline = time.monotonic() + timeout
    while t.proc.poll() is None and time.monotonic() < deadline:
        t.read(0.05)
    assert t.proc.poll() is not None, "top did not quit"
    return t.proc.returncode


def test_live_view_refreshes_in_place_and_quits_on_q(daemon: Daemon, running: tuple[str, str, str, str],
                                                     terminal: list[Terminal]) -> None:
    high, _, _, call_id = running
    t = Terminal(daemon, "--interval", "0.2")
    terminal.append(t)
    first = t.wait_screen(lambda s: call_id[:12] in s)
    assert "(q quits)" in first.splitlines()[0]
    assert [row["STATE"] for row in section(first, "ACTIVE CALLS") if row["CALL"] == call_id[:12]] == ["running"]
    assert b"\x1b[?1049h" in t.output, "drawn on the alternate screen"
    assert len(first.splitlines()) <= ROWS and max(map(len, first.splitlines())) < COLUMNS
    with daemon.admin() as admin:
        admin.call("FreezeToolCall", pb.ToolCallRequest(call_id=call_id))
    frozen = t.wait_screen(lambda s: any(row["CALL"] == call_id[:12] and row["STATE"] == "frozen"
                                         for row in section(s, "ACTIVE CALLS")))
    assert high in frozen
    with daemon.admin() as admin:
        admin.call("ThawToolCall", pb.ToolCallRequest(call_id=call_id))
    t.type(b"q")
    assert exits(t) == 0
    assert t.output.rstrip().endswith(b"\x1b[?25h\x1b[?1049l"), "the screen and cursor are given back"


def test_live_view_quits_on_ctrl_c(daemon: Daemon, running: tuple[str, str, str, str],
                                   terminal: list[Terminal]) -> None:
    t = Terminal(daemon, "--interval", "5")
    terminal.append(t)
    t.wait_screen(lambda s: "SESSIONS" in s)
    t.type(b"\x03")  # the terminal turns it into SIGINT for its foreground process group
    assert exits(t) == 0
    assert b"\x1b[?1049l" in t.output
    assert b"Traceback" not in t.output


def test_live_view_small_terminal_is_clipped(daemon: Daemon, running: tuple[str, str, str, str],
                                             terminal: list[Terminal]) -> None:
    """Rows beyond the terminal are cut with a marker, never wrapped or scrolled."""
    t = Terminal(daemon, "--interval", "0.2", rows=12)
    terminal.append(t)
    screen = t.wait_screen(lambda s: "more lines" in s)
    assert len(screen.splitlines()) <= 11
    assert screen.splitlines()[0].startswith("agentd top: admin")
    t.type(b"q")
    assert exits(t) == 0


def test_render_marks_throttled_calls_and_fits_the_terminal() -> None:
    """What the frame says of a call the memory policy holds (ToolCallInfo.throttled needs the memory controller:
    the policy never throttles on the development hosts), and clipping to the terminal's size."""
    running = pb.ToolCallInfo(call_id="c" * 16, session_id="s-1", state=pb.CALL_STATE_RUNNING,
                              intent=pb.Intent(tool="pytest", expected_memory_bytes=1 << 30),
                              memory_current_bytes=3 << 29, started_unix=100.0)
    held = pb.ToolCallInfo()
    held.CopyFrom(running)
    held.throttled = True
    frozen = pb.ToolCallInfo(state=pb.CALL_STATE_FROZEN, throttled=True)
    assert [top.call_state(c) for c in (running, held, frozen)] == ["running", "throttled", "frozen"]
    snap = top.Snapshot(now=175.0, scope="admin", policy=pb.PolicyStatus(enabled=True), sessions=[],
                        active=[held], finished=[])
    lines = top.render(snap)
    row = section("\n".join(lines), "ACTIVE CALLS")[0]
    assert (row["STATE"], row["MEMORY"], row["DECLARED"], row["USE"], row["AGE"]) == (
        "throttled", "1.5 GiB", "1.0 GiB", "150%", "1m15s")
    clipped = top.clip(lines, 30, 5)
    assert len(clipped) == 5 and clipped[-1].startswith("  ... ") and all(len(line) < 30 for line in clipped)
