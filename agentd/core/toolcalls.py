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
    timers: list[asyncio.TimerHandle] = field(default_factory=list)
    done: asyncio.Future[Result] | None = None
    freeze_waiters: list[asyncio.Future[None]] = field(default_factory=list)

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
        if data.get("v") != 1:
            raise ValueError(f"unknown call label version {data.get('v')!r}")
        call = ToolCall(
            id=data["id"],
            session_id=data["session"],
            intent=Intent.from_json(data["intent"]),
            limits=Limits(**data["limits"]),
            path=path,
            cgroup_id=cgroup_id,
            created=float(data["created"]),
            report_exit=bool(data["report_exit"]),
            confined=bool(data["confined"]),
            implicit=bool(data["implicit"]),
            not_enforced=tuple(data["not_enforced"]),
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
