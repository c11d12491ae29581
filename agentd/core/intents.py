"""Intents (what an agent declares before a tool call), their validation, and the limits derived from them.

Limits = intent ⊓ session budget ⊓ config. Validation rejects the whole intent with the first field that is
wrong and why; nothing is created for an invalid intent. UpdateToolCall's new limits are validated here too,
by the same rules.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import ClassVar

from agentd.core.config import Config
from agentd.core.decode import decode, int_ranges
from agentd.core.errors import InvalidArgument, quote
from agentd.core.units import format_size

MAX_TOOL_LEN = 128
MAX_ARGV_ITEMS = 4096
MAX_ARGV_BYTES = 128 * 1024
MAX_LABELS = 32
MAX_LABEL_KEY = 64
MAX_LABEL_VALUE = 256
MIN_CPU_MILLICORES = 10  # cpu.max quota of 1 ms per 100 ms period: the kernel refuses less (EINVAL)
# Unicode category Cc: C0 controls, DEL and C1 controls (U+0085 is a line break to some readers, U+009B an
# escape sequence introducer to some terminals).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


class MemoryClass(IntEnum):
    UNSPECIFIED = 0
    LOW = 1
    MEDIUM = 2
    HIGH = 3


class CpuClass(IntEnum):
    UNSPECIFIED = 0
    BACKGROUND = 1
    NORMAL = 2
    INTERACTIVE = 3


class Network(IntEnum):
    UNSPECIFIED = 0
    ANY = 1
    NONE = 2


@dataclass(frozen=True)
class Intent:
    tool: str = ""
    argv: tuple[str, ...] = ()
    expected_memory_bytes: int = 0
    memory_class: int = MemoryClass.UNSPECIFIED
    memory_max_bytes: int = 0
    cpu_class: int = CpuClass.UNSPECIFIED
    cpu_max_millicores: int = 0
    pids_max: int = 0
    timeout_seconds: float = 0.0
    network: int = Network.UNSPECIFIED
    labels: dict[str, str] = field(default_factory=dict)
    JSON_RANGES: ClassVar = int_ranges(memory_class=MemoryClass, cpu_class=CpuClass, network=Network)

    def to_json(self) -> dict[str, object]:
        data = dict(vars(self))
        data["argv"] = list(self.argv)
        data["labels"] = dict(self.labels)
        return data

    @staticmethod
    def from_json(data: object) -> Intent:
        return decode(Intent, data)


@dataclass(frozen=True)
class Limits:
    """What is written to the call's cgroup (0 = no limit) plus the timeout and network intent."""

    memory_high: int
    memory_max: int
    cpu_weight: int
    cpu_max_millicores: int
    pids_max: int
    timeout_seconds: float
    network: int
    JSON_RANGES: ClassVar = int_ranges(cpu_weight=(0, 10000), network=Network)

    def knobs(self) -> dict[str, str]:
        """cgroup files and the values to write, in a safe order (oom.group before the limits)."""
        knobs = {
            "memory.oom.group": "1",
            "memory.high": str(self.memory_high) if self.memory_high else "max",
            "memory.max": str(self.memory_max) if self.memory_max else "max",
            "cpu.weight": str(self.cpu_weight),
            "cpu.max": cpu_max_value(self.cpu_max_millicores),
            "pids.max": str(self.pids_max) if self.pids_max else "max",
        }
        return knobs

    def to_json(self) -> dict[str, object]:
        return dict(vars(self))


CPU_PERIOD_US = 100_000


def cpu_max_value(millicores: int) -> str:
    """cpu.max 'quota period' for a cap in millicores (1000 = one CPU)."""
    if not millicores:
        return f"max {CPU_PERIOD_US}"
    return f"{millicores * CPU_PERIOD_US // 1000} {CPU_PERIOD_US}"


def check_text(field_name: str, value: str, max_len: int, *, allow_empty: bool = True) -> None:
    """Reject control characters (C0, DEL, C1), overlong and (optionally) empty strings."""
    if not value and not allow_empty:
        raise InvalidArgument(field_name, "must not be empty")
    if len(value.encode()) > max_len:
        raise InvalidArgument(field_name, f"longer than {max_len} bytes")
    control = _CONTROL.search(value)
    if control:
        raise InvalidArgument(field_name, f"contains control character {control.group()!r}")


def check_labels(field_name: str, labels: dict[str, str]) -> None:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(field_name, f"more than {MAX_LABELS} labels")
    for key, value in labels.items():
        where = f"{field_name}[{quote(key)}]"
        check_text(where, key, MAX_LABEL_KEY, allow_empty=False)
        check_text(where, value, MAX_LABEL_VALUE)


def check_size(field_name: str, value: int, ceiling: int) -> None:
    if value < 0:
        raise InvalidArgument(field_name, f"must not be negative, got {value}")
    if value > ceiling:
        raise InvalidArgument(field_name, f"{format_size(value)} exceeds the ceiling of {format_size(ceiling)}")


def check_cpu_max(field_name: str, millicores: int, config: Config) -> None:
    """0 (no cap), or MIN_CPU_MILLICORES up to the configured maximum."""
    if millicores < 0 or millicores > config.max_cpu_millicores:
        raise InvalidArgument(field_name, f"must be between 0 and {config.max_cpu_millicores}, got {millicores}")
    if 0 < millicores < MIN_CPU_MILLICORES:
        raise InvalidArgument(field_name, f"below the {MIN_CPU_MILLICORES} millicore minimum, got {millicores}")


def check_pids(field_name: str, pids: int, config: Config) -> None:
    if pids < 0 or pids > config.max_pids:
        raise InvalidArgument(field_name, f"must be between 0 and {config.max_pids}, got {pids}")


def check_enum(field_name: str, value: int, enum: type[IntEnum]) -> None:
    if value not in enum._value2member_map_:  # what enum(value) looks up first, without its call (~1 us)
        raise InvalidArgument(field_name, f"unknown value {value}")


def validate_intent(intent: Intent, config: Config) -> None:
    """Raise InvalidArgument naming the first wrong field."""
    check_text("intent.tool", intent.tool, MAX_TOOL_LEN)
    if len(intent.argv) > MAX_ARGV_ITEMS:
        raise InvalidArgument("intent.argv", f"more than {MAX_ARGV_ITEMS} arguments")
    total = 0
    for i, arg in enumerate(intent.argv):
        total += len(arg.encode())
        if "\x00" in arg:
            raise InvalidArgument(f"intent.argv[{i}]", "contains a NUL byte")
    if total > MAX_ARGV_BYTES:
        raise InvalidArgument("intent.argv", f"longer than {MAX_ARGV_BYTES} bytes in total")
    check_size("intent.expected_memory_bytes", intent.expected_memory_bytes, config.memory_ceiling)
    check_enum("intent.memory_class", intent.memory_class, MemoryClass)
    check_size("intent.memory_max_bytes", intent.memory_max_bytes, config.memory_ceiling)
    if intent.memory_max_bytes and intent.memory_max_bytes < intent.expected_memory_bytes:
        raise InvalidArgument("intent.memory_max_bytes", "smaller than expected_memory_bytes")
    check_enum("intent.cpu_class", intent.cpu_class, CpuClass)
    check_cpu_max("intent.cpu_max_millicores", intent.cpu_max_millicores, config)
    check_pids("intent.pids_max", intent.pids_max, config)
    timeout = intent.timeout_seconds
    if not math.isfinite(timeout) or timeout < 0 or timeout > config.max_timeout_seconds:
        raise InvalidArgument(
            "intent.timeout_seconds", f"must be between 0 and {config.max_timeout_seconds:g}, got {timeout}"
        )
    check_enum("intent.network", intent.network, Network)
    check_labels("intent.labels", intent.labels)


def class_bytes(memory_class: int, config: Config) -> int:
    # An IntEnum member is found by its int (same hash, equal): no MemoryClass() call for a validated value.
    names: dict[int, str] = {MemoryClass.LOW: "low", MemoryClass.MEDIUM: "medium", MemoryClass.HIGH: "high"}
    name = names.get(memory_class, config.default_memory_class)
    return {
        "low": config.memory_class_low,
        "medium": config.memory_class_medium,
        "high": config.memory_class_high,
    }[name]


def derive_limits(intent: Intent, config: Config, session_budget: int) -> Limits:
    """memory.max = the declared hard limit, else expected x memory_max_ratio, capped by the session budget
    (0 = none) and the memory ceiling; memory.high = the expectation (declared, else the class size), never
    above memory.max: a call that declares only a hard limit below its class size gets high = max (it runs
    unthrottled up to the limit it asked for). CPU weight by class; pids and timeout from config."""
    expected = intent.expected_memory_bytes or class_bytes(intent.memory_class, config)
    hard = intent.memory_max_bytes or int(expected * config.memory_max_ratio)
    hard = min(hard, config.memory_ceiling)
    if session_budget:
        hard = min(hard, session_budget)
    expected = min(expected, hard)
    weights: dict[int, int] = {
        CpuClass.BACKGROUND: config.cpu_weight_background,
        CpuClass.INTERACTIVE: config.cpu_weight_interactive,
    }
    return Limits(
        memory_high=expected,
        memory_max=hard,
        cpu_weight=weights.get(intent.cpu_class, config.cpu_weight_normal),
        cpu_max_millicores=intent.cpu_max_millicores,
        pids_max=intent.pids_max or config.default_pids_max,
        timeout_seconds=intent.timeout_seconds or config.default_timeout_seconds,
        network=intent.network or Network.ANY,
    )


def validate_update(
    current: Limits, memory_high: int, memory_max: int, cpu_max_millicores: int, pids_max: int, budget: int,
    config: Config,
) -> Limits:
    """A running call's limits after UpdateToolCall (each 0 = unchanged), checked by the rules of intents; the
    first wrong request field is named. Lowering memory.max alone pulls memory.high down with it; memory.high
    <= memory.max <= session budget (0 = none) must hold. Pure: the caller writes the result (or nothing)."""
    check_size("memory_high_bytes", memory_high, config.memory_ceiling)
    check_size("memory_max_bytes", memory_max, config.memory_ceiling)
    check_cpu_max("cpu_max_millicores", cpu_max_millicores, config)
    check_pids("pids_max", pids_max, config)
    new_max = memory_max or current.memory_max
    if budget and memory_max > budget:
        raise InvalidArgument("memory_max_bytes", f"{memory_max} exceeds the session budget of {budget} bytes "
                                                  f"({format_size(budget)})")
    if memory_high and new_max and memory_high > new_max:
        raise InvalidArgument("memory_high_bytes", f"{memory_high} is above memory.max, {new_max} bytes "
                                                   f"({format_size(new_max)})")
    return replace(
        current,
        memory_high=memory_high or _lowest(current.memory_high, new_max),
        memory_max=new_max,
        cpu_max_millicores=cpu_max_millicores or current.cpu_max_millicores,
        pids_max=pids_max or current.pids_max,
    )


def _lowest(a: int, b: int) -> int:
    """The lower of two limits where 0 means none."""
    return min(a, b) if a and b else a or b
