"""Tool calls: one ephemeral cgroup each, their state machine and the label that survives a daemon restart.

PENDING (cgroup created, waiting for the process to join) -> RUNNING (<-> FROZEN) -> FINISHED.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

from agentd.core.deadlines import Deadline
from agentd.core.decode import decode
from agentd.core.intents import Intent, Limits
from agentd.core.results import Capture, ExitStatus, KillReason, Result

CALL_PREFIX = "tc-"


class CallState(IntEnum):
    UNSPECIFIED = 0
    PENDING = 1
    RUNNING = 2
    FROZEN = 3
    FINISHED = 4


def new_call_id() -> str:
    return secrets.token_hex(8)


@dataclass(frozen=True)
class CallLabel:
    """The call cgroup's `call` label (ToolCall.label() writes it): what a restarted daemon adopts it from."""

    v: int
    id: str
    session: str
    intent: Intent
    limits: Limits
    created: float
    report_exit: bool
    confined: bool
    implicit: bool
    not_enforced: tuple[str, ...]


@dataclass
class PolicyMarks:
    """What the memory policy did to a call, for its result: time held throttled and frozen, and the actions."""

    throttled_since: float | None = None  # memory.high below its own limit since (None: not throttled)
    throttled_seconds: float = 0.0
    frozen_since: float | None = None
    frozen_seconds: float = 0.0
    actions: list[str] = field(default_factory=list)

    def throttled(self, on: bool, now: float) -> None:
        if on and self.throttled_since is None:
            self.throttled_since = now
        elif not on and self.throttled_since is not None:
            self.throttled_seconds += now - self.throttled_since
            self.throttled_since = None

    def frozen(self, on: bool, now: float) -> None:
        if on and self.frozen_since is None:
            self.frozen_since = now
        elif not on and self.frozen_since is not None:
            self.frozen_seconds += now - self.frozen_since
            self.frozen_since = None

    def totals(self, now: float) -> tuple[float, float]:
        """Seconds throttled and frozen so far, open intervals counted up to `now`."""
        throttled = self.throttled_seconds + (now - self.throttled_since if self.throttled_since is not None else 0)
        frozen = self.frozen_seconds + (now - self.frozen_since if self.frozen_since is not None else 0)
        return throttled, frozen


@dataclass(eq=False)
class ToolCall:
    id: str
    session_id: str
    intent: Intent
    limits: Limits
    path: Path
    cgroup_id: int
    created: float
    report_exit: bool
    # Sandbox-begun calls only accept processes from their own session's cgroups.
    confined: bool
    implicit: bool = False
    not_enforced: tuple[str, ...] = ()
    state: CallState = CallState.PENDING
    started: float = 0.0
    exit_status: ExitStatus | None = None  # as reported by the client (EndToolCall)
    pid: int = 0  # the first process, placed into the call (0: not placed yet)
    kernel_exit: ExitStatus | None = None  # how that process ended, from the lifecycle program
    capture: Capture | None = None  # implicit calls: how they were captured
    kill_reason: KillReason = KillReason.NONE
    kill_detail: str = ""
    emptied: bool = False
    end_requested: bool = False
    events_fd: int | None = None
    timers: list[Deadline] = field(default_factory=list)
    done: asyncio.Future[Result] | None = None
    freeze_waiters: list[asyncio.Future[None]] = field(default_factory=list)
    policy: PolicyMarks = field(default_factory=PolicyMarks)

    def label(self) -> bytes:
        """The call's identity and limits; the start time and first pid are a label of their own ("started"),
        written at join."""
        data: dict[str, Any] = {
            "v": 1,
            "id": self.id,
            "session": self.session_id,
            "intent": self.intent.to_json(),
            "limits": self.limits.to_json(),
            "created": self.created,
            "report_exit": self.report_exit,
            "confined": self.confined,
            "implicit": self.implicit,
            "not_enforced": list(self.not_enforced),
        }
        return json.dumps(data, separators=(",", ":")).encode()

    @staticmethod
    def from_label(raw: bytes, started: bytes | None, path: Path, cgroup_id: int) -> ToolCall:
        data = json.loads(raw)
        version = data.get("v") if isinstance(data, dict) else None
        if version != 1:
            raise ValueError(f"unknown call label version {version!r}")
        label = decode(CallLabel, data)
        if path.name != CALL_PREFIX + label.id or path.parent.name != label.session:
            raise ValueError(f"the label names call {label.id!r} of session {label.session!r}, not this cgroup")
        call = ToolCall(
            id=label.id,
            session_id=label.session,
            intent=label.intent,
            limits=label.limits,
            path=path,
            cgroup_id=cgroup_id,
            created=label.created,
            report_exit=label.report_exit,
            confined=label.confined,
            implicit=label.implicit,
            not_enforced=label.not_enforced,
        )
        if started:  # "<unix time> <first pid>"
            when, _, pid = started.decode().partition(" ")
            call.started, call.pid = float(when), int(pid or 0)
        call.state = CallState.RUNNING if call.started else CallState.PENDING
        return call

    def cancel_timers(self) -> None:
        for timer in self.timers:
            timer.cancel()
        self.timers.clear()
