"""`agentctl top`: a live view of sessions, active tool calls and recent outcomes, redrawn in place.

Data comes from GetStatus (the memory policy's domains), ListSessions or GetSession (memory, budget, pressure)
and ListToolCalls(include_active). Over the sandbox socket the view is confined to the token's session (its
own session, its calls, the shared `sessions` domain and its own). When stdout is not a terminal, or with
--once, one plain snapshot is printed. The live view redraws the whole screen with ANSI sequences on the
alternate screen and quits on q or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shutil
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import grpc

from agentd.api.gen import agentd_pb2 as pb
from agentd.core.units import format_size

DEFAULT_INTERVAL_SECONDS = 1.0  # live refresh period
DEFAULT_RECENT = 10  # finished calls shown
SHARED_DOMAIN = "sessions"  # the policy domain every session is part of (proto DomainPressure.domain)
QUIT_KEYS = frozenset("qQ")
# ANSI: alternate screen on/off, cursor hidden/shown, cursor home, erase to end of line / of screen.
ENTER, LEAVE = "\x1b[?1049h\x1b[?25l", "\x1b[?25h\x1b[?1049l"
HOME, EOL, EOS = "\x1b[H", "\x1b[K", "\x1b[J"
PRIORITY = {pb.PRIORITY_HIGH: "high", pb.PRIORITY_NORMAL: "normal", pb.PRIORITY_LOW: "low"}
STATE = {pb.CALL_STATE_PENDING: "pending", pb.CALL_STATE_RUNNING: "running", pb.CALL_STATE_FROZEN: "frozen",
         pb.CALL_STATE_FINISHED: "finished"}


@dataclass(frozen=True)
class Snapshot:
    """Everything one frame shows, fetched in one go."""

    now: float
    scope: str  # "admin" or "session <id>"
    policy: pb.PolicyStatus
    sessions: list[pb.Session]
    active: list[pb.ToolCallInfo]
    finished: list[pb.ToolCallResult]


def fetch(client: Any, session_id: str = "", recent: int = DEFAULT_RECENT) -> Snapshot:
    """One snapshot over the client's socket; a sandbox client (with a token) sees only its own session."""
    status = client.call("GetStatus", pb.GetStatusRequest())
    if client.token or session_id:
        sessions = [client.call("GetSession", pb.GetSessionRequest(session_id=session_id))]
    else:
        sessions = list(client.call("ListSessions", pb.ListSessionsRequest()).sessions)
    scoped = bool(client.token or session_id)
    calls = client.call("ListToolCalls", pb.ListToolCallsRequest(
        session_id=sessions[0].spec.id if scoped else "", limit=recent, include_active=True))
    policy = pb.PolicyStatus()
    policy.CopyFrom(status.policy)
    if scoped:
        visible = {SHARED_DOMAIN, f"session:{sessions[0].spec.id}"}
        del policy.domains[:]
        policy.domains.extend(d for d in status.policy.domains if d.domain in visible)
    return Snapshot(
        now=time.time(), scope=f"session {sessions[0].spec.id}" if scoped else "admin", policy=policy,
        sessions=sorted(sessions, key=lambda s: (-_rank(s.spec.priority), s.spec.id)),
        active=sorted(calls.active, key=lambda c: c.created_unix), finished=list(calls.finished)[:recent],
    )


RANK = {int(pb.PRIORITY_HIGH): 2, int(pb.PRIORITY_LOW): 0}  # sessions listed most protected first


def _rank(priority: int) -> int:
    return RANK.get(priority, 1)


# ----- rendering (pure: a snapshot in, lines out) ------------------------------------------------------------


def render(snap: Snapshot, live: bool = False) -> list[str]:
    """The frame's lines, unclipped."""
    when = time.strftime("%H:%M:%S", time.localtime(snap.now))
    policy = snap.policy
    head = (f"agentd top: {snap.scope}, {len(snap.sessions)} sessions, {len(snap.active)} active calls   {when}"
            + ("   (q quits)" if live else ""))
    lines = [head, f"memory policy {'on' if policy.enabled else 'off'} ({policy.signals or 'no signals'})"]
    lines += [f"  {_domain(d)}" for d in policy.domains]
    lines += ["", "SESSIONS", _row(SESSION_COLUMNS, [c[0] for c in SESSION_COLUMNS])]
    lines += [_row(SESSION_COLUMNS, _session_cells(s)) for s in snap.sessions] or ["  (none)"]
    lines += ["", "ACTIVE CALLS", _row(CALL_COLUMNS, [c[0] for c in CALL_COLUMNS])]
    lines += [_row(CALL_COLUMNS, _call_cells(c, snap.now)) for c in snap.active] or ["  (none)"]
    lines += ["", "RECENT OUTCOMES", _row(RESULT_COLUMNS, [c[0] for c in RESULT_COLUMNS])]
    lines += [_row(RESULT_COLUMNS, _result_cells(r, snap.now)) for r in snap.finished] or ["  (none)"]
    return lines


# (header, width): headers at least two spaces apart; the last column takes the rest of the line.
SESSION_COLUMNS = (("SESSION", 20), ("PRIO", 8), ("MEMORY", 10), ("BUDGET", 10), ("USE", 6), ("STALL", 8),
                   ("LEVEL", 10), ("HELD", 6), ("CALLS", 7), ("AGENT PROCS", 0))
CALL_COLUMNS = (("CALL", 14), ("SESSION", 16), ("TOOL", 14), ("STATE", 10), ("MEMORY", 10), ("DECLARED", 10),
                ("USE", 5), ("AGE", 0))
RESULT_COLUMNS = (("CALL", 14), ("SESSION", 16), ("TOOL", 14), ("OUTCOME", 17), ("PEAK", 10), ("TIME", 9),
                  ("ENDED", 0))


def _row(columns: Sequence[tuple[str, int]], cells: Sequence[str]) -> str:
    parts = [cell[: width - 1].ljust(width) if width else cell for (_, width), cell in zip(columns, cells, strict=True)]
    return ("  " + "".join(parts)).rstrip()


def _domain(d: pb.DomainPressure) -> str:
    stall = f", stall {d.stall_pct:.1f}%" if d.stall_pct >= 0 else ""
    return (f"{d.domain}: {format_size(d.usage_bytes)} of {format_size(d.limit_bytes)} "
            f"({format_size(max(d.headroom_bytes, 0))} free{stall}), ladder {d.level}, {d.calls_held} calls held")


def _share(used: int, of: int) -> str:
    return f"{100 * used / of:.0f}%" if used >= 0 and of > 0 else "-"


def _session_cells(s: pb.Session) -> list[str]:
    budget = s.spec.memory_budget_bytes
    return [
        s.spec.id, PRIORITY.get(s.spec.priority, "normal"), format_size(s.memory_current_bytes),
        format_size(budget) if budget else "-", _share(s.memory_current_bytes, budget),
        f"{s.memory_stall_pct:.1f}%" if s.memory_stall_pct >= 0 else "-",
        s.pressure.level if s.HasField("pressure") else "-", str(s.calls_held), str(s.active_calls),
        str(s.agent_processes),
    ]


def call_state(c: pb.ToolCallInfo) -> str:
    """running, throttled (the policy holds its memory.high down), frozen or pending."""
    state = STATE.get(c.state, "?")
    return "throttled" if state == "running" and c.throttled else state


def declared(c: pb.ToolCallInfo) -> int:
    """What the call declared it needs: its expected memory, else the memory.high its class was given."""
    return c.intent.expected_memory_bytes or c.limits.memory_high_bytes


def _call_cells(c: pb.ToolCallInfo, now: float) -> list[str]:
    want = declared(c)
    return [
        c.call_id[:12], c.session_id, c.intent.tool + (" (implicit)" if c.implicit else ""), call_state(c),
        format_size(c.memory_current_bytes), format_size(want) if want else "-", _share(c.memory_current_bytes, want),
        _age(now - (c.started_unix or c.created_unix)),
    ]


def _result_cells(r: pb.ToolCallResult, now: float) -> list[str]:
    outcome = pb.Outcome.Name(r.outcome).removeprefix("OUTCOME_").lower()
    if r.has_exit_status and outcome in ("ok", "failed"):
        outcome += f" ({r.exit_code})" if not r.exit_signal else f" (signal {r.exit_signal})"
    return [r.call_id[:12], r.session_id, r.tool, outcome, format_size(r.memory_peak_bytes),
            f"{r.duration_seconds:.2f}s", f"{_age(now - r.ended_unix)} ago" if r.ended_unix else "-"]


def _age(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"


def clip(lines: list[str], columns: int, rows: int) -> list[str]:
    """Fit a frame to the terminal: lines cut at the right edge (no wrapping), the tail cut with a marker."""
    lines = [line[: max(columns - 1, 1)] for line in lines]
    if len(lines) > rows:
        hidden = len(lines) - rows + 1
        lines = [*lines[: rows - 1], f"  ... {hidden} more lines (enlarge the terminal)"[: max(columns - 1, 1)]]
    return lines


# ----- terminal I/O ----------------------------------------------------------------------------------------


def snapshot(client: Any, out: TextIO, session_id: str = "", recent: int = DEFAULT_RECENT) -> int:
    out.write("\n".join(render(fetch(client, session_id, recent))) + "\n")
    return 0


def live(client: Any, out: TextIO, session_id: str = "", recent: int = DEFAULT_RECENT,
         interval: float = DEFAULT_INTERVAL_SECONDS) -> int:
    """Redraw every `interval` seconds until q or Ctrl-C; an unreachable agentd is shown and retried."""
    with _screen(out), _keys(sys.stdin) as pressed:
        try:
            while True:
                _draw(out, _frame(client, session_id, recent))
                if pressed(interval) & QUIT_KEYS:
                    return 0
        except KeyboardInterrupt:
            return 0


def _frame(client: Any, session_id: str, recent: int) -> list[str]:
    try:
        return render(fetch(client, session_id, recent), live=True)
    except grpc.RpcError as exc:
        when = time.strftime("%H:%M:%S")
        return [f"agentd top   {when}   (q quits)", "", f"agentd: {exc.code().name}: {exc.details()} (retrying)"]


def _draw(out: TextIO, lines: list[str]) -> None:
    size = shutil.get_terminal_size()
    out.write(HOME + "".join(line + EOL + "\n" for line in clip(lines, size.columns, size.lines - 1)) + EOS)
    out.flush()


@contextlib.contextmanager
def _screen(out: TextIO) -> Iterator[None]:
    out.write(ENTER)
    try:
        yield
    finally:
        out.write(LEAVE)
        out.flush()


@contextlib.contextmanager
def _keys(stdin: TextIO) -> Iterator[Callable[[float], set[str]]]:
    """pressed(timeout): the keys typed within timeout seconds (returns at the first). Keys are read unbuffered
    and unechoed while the view runs (Ctrl-C still interrupts); without a terminal on stdin it only waits."""
    fd = stdin.fileno() if stdin is not None and stdin.isatty() else -1
    if fd < 0:
        yield _wait
        return
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def pressed(timeout: float) -> set[str]:
        ready, _, _ = select.select([fd], [], [], timeout)
        return set(os.read(fd, 64).decode(errors="replace")) if ready else set()

    try:
        yield pressed
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _wait(timeout: float) -> set[str]:
    time.sleep(timeout)
    return set()


def main(client: Any, session_id: str = "", recent: int = DEFAULT_RECENT, interval: float = DEFAULT_INTERVAL_SECONDS,
         once: bool = False) -> int:
    if once or not sys.stdout.isatty():
        return snapshot(client, sys.stdout, session_id, recent)
    return live(client, sys.stdout, session_id, recent, interval)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--session", default="", help="one session (a sandbox sees only its own)")
    parser.add_argument("--limit", type=int, default=DEFAULT_RECENT, help="recent outcomes shown")
    parser.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_SECONDS, help="refresh period, seconds")
    parser.add_argument("--once", action="store_true", help="print one snapshot (also when stdout is no terminal)")
