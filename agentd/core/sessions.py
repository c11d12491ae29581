"""Sessions: one per agent sandbox, with a priority, budgets and a secret token; their cgroup knobs and label."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from agentd.core.config import Config
from agentd.core.decode import decode, int_ranges
from agentd.core.errors import InvalidArgument
from agentd.core.intents import check_enum, check_labels, check_size

if TYPE_CHECKING:
    from agentd.core.toolcalls import ToolCall

SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
AGENT_LEAF = "agent"
MAX_PIDS_BUDGET = 4194304  # the kernel's PID_MAX_LIMIT: no pids.max above it means anything


class CaptureMode(IntEnum):
    UNSPECIFIED = 0  # the config's [capture] enabled
    ON = 1
    OFF = 2


class Priority(IntEnum):
    UNSPECIFIED = 0
    HIGH = 1
    NORMAL = 2
    LOW = 3


@dataclass(frozen=True)
class SessionSpec:
    id: str = ""
    priority: int = Priority.UNSPECIFIED
    memory_budget: int = 0
    memory_protected: int = 0
    pids_budget: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    capture: int = CaptureMode.UNSPECIFIED
    JSON_RANGES: ClassVar = int_ranges(priority=Priority, capture=CaptureMode)


@dataclass(frozen=True)
class SessionLabel:
    """The session cgroup's `session` label: what a restarted daemon adopts it from."""

    v: int
    spec: SessionSpec
    token_sha256: str
    created: float


def validate_spec(spec: SessionSpec, config: Config) -> None:
    if spec.id and not SESSION_ID.match(spec.id):
        raise InvalidArgument("spec.id", "must be 1-64 characters of [A-Za-z0-9_.-], starting alphanumeric")
    check_enum("spec.priority", spec.priority, Priority)
    check_size("spec.memory_budget_bytes", spec.memory_budget, config.memory_ceiling)
    check_size("spec.memory_protected_bytes", spec.memory_protected, config.memory_ceiling)
    if spec.memory_protected and spec.priority != Priority.HIGH:
        raise InvalidArgument("spec.memory_protected_bytes", "only HIGH priority sessions get protected memory")
    if spec.memory_budget and spec.memory_protected > spec.memory_budget:
        raise InvalidArgument("spec.memory_protected_bytes", "larger than the memory budget")
    if spec.pids_budget < 0 or spec.pids_budget > MAX_PIDS_BUDGET:
        raise InvalidArgument("spec.pids_budget", f"must be between 0 and {MAX_PIDS_BUDGET}, got {spec.pids_budget}")
    check_labels("spec.labels", spec.labels)
    check_enum("spec.capture", spec.capture, CaptureMode)


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(eq=False)
class Session:
    spec: SessionSpec
    path: Path
    token_sha256: str
    created: float
    not_enforced: list[str] = field(default_factory=list)
    calls: dict[str, ToolCall] = field(default_factory=dict)
    deleting: bool = False  # DeleteSession is in progress: nothing new is captured
    network_denials: int = 0  # refused connects/sends of its finished calls, since this daemon started

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def agent_path(self) -> Path:
        return self.path / AGENT_LEAF

    def cpu_weight(self, config: Config) -> int:
        return {
            Priority.HIGH: config.cpu_weight_high,
            Priority.LOW: config.cpu_weight_low,
        }.get(Priority(self.spec.priority), config.cpu_weight_session_normal)

    def oom_score_adj(self, config: Config) -> int:
        """What its tool-call processes get: the kernel's OOM killer picks lower priorities first."""
        return {
            Priority.HIGH: config.oom_score_adj_high,
            Priority.LOW: config.oom_score_adj_low,
        }.get(Priority(self.spec.priority), config.oom_score_adj_normal)

    def knobs(self, config: Config) -> dict[str, str]:
        spec = self.spec
        low = str(spec.memory_protected)
        if spec.priority == Priority.HIGH and not spec.memory_protected:
            low = str(config.default_memory_protected_high or "max")
        return {
            "memory.max": str(spec.memory_budget) if spec.memory_budget else "max",
            "memory.low": low,
            "cpu.weight": str(self.cpu_weight(config)),
            "pids.max": str(spec.pids_budget or config.default_pids_budget),
        }

    def label(self) -> bytes:
        label = SessionLabel(1, self.spec, self.token_sha256, self.created)
        return json.dumps(asdict(label), separators=(",", ":")).encode()

    @staticmethod
    def from_label(raw: bytes, path: Path) -> Session:
        data = json.loads(raw)
        version = data.get("v") if isinstance(data, dict) else None
        if version != 1:
            raise ValueError(f"unknown session label version {version!r}")
        label = decode(SessionLabel, data)
        if label.spec.id != path.name:
            raise ValueError(f"the label names session {label.spec.id!r}, not this cgroup")
        return Session(label.spec, path, label.token_sha256, label.created)
