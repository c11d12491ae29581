"""The `[policy]` keys: every threshold, reserve, dwell time, step size and per-priority behaviour of the ladder
and of admission, with its default, meaning and range, declared once as the fields of `PolicyConfig`.

Reserves are headroom thresholds of a pressure domain (its limit minus its usage), each the larger of a share of
the limit and a floor in bytes (scaled down below FLOOR_FULL_LIMIT), so they grow with a large host, cover fast
growth on a middling one and leave a small session budget usable.
They must be ordered emergency < kill < freeze < throttle < recover; `PolicyConfig` refuses anything else, so an
invalid configuration cannot exist. `from_table` builds one from a TOML table, naming the key that is wrong.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

MIB = 1 << 20
# Reserve floors apply in full to domains this large or larger and proportionally less below, so a small session
# budget is not under pressure forever; one common scale keeps the reserves in order.
FLOOR_FULL_LIMIT = 1 << 30
ADMISSION_MODES = ("admit", "queue", "refuse")
RESERVED_FOR = ("all", "higher")
_METADATA = "agentd.policy.key"


class PolicyConfigError(ValueError):
    """A `[policy]` value is invalid; the message names the key."""


@dataclass(frozen=True)
class PolicyKey:
    kind: str  # bool, float, int, size (bytes), mode (one of `choices`)
    doc: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()


def _key(kind: str, doc: str, minimum: float | None = None, maximum: float | None = None,
         choices: tuple[str, ...] = ()) -> dict[str, PolicyKey]:
    return {_METADATA: PolicyKey(kind, doc, minimum, maximum, choices)}


@dataclass(frozen=True)
class PolicyConfig:
    """The effective `[policy]` configuration (defaults: docs/policy.md explains each)."""

    enabled: bool = field(default=True, metadata=_key(
        "bool", "run the pressure ladder and admission; off = static limits only, the kernel OOM killer decides"))
    # ----- the shared domain: sessions/ -----
    sessions_memory_max: int = field(default=0, metadata=_key(
        "size", "memory.max agentd writes on sessions/ (all agents together); 0 = none written: the domain's limit is "
        "then the smallest memory.max above sessions/ (e.g. the unit's MemoryMax) or physical memory minus "
        "host_reserve"))
    host_reserve: int = field(default=512 * MIB, metadata=_key(
        "size", "memory kept for the host and agentd when sessions/ has no memory.max of its own or above it"))
    # ----- signals (used by the loop's I/O side) -----
    tick_seconds: float = field(default=0.05, metadata=_key(
        "float", "while pressure is active (or calls are held) the loop decides this often", 0.005, 1.0))
    watch_seconds: float = field(default=0.02, metadata=_key(
        "float", "between episodes, a domain running tool calls near its throttle reserve has its memory.current "
        "read this often (less often further from it: watch_max_growth); a decision follows only when the reading "
        "nears the reserve (nothing polls a domain without calls)",
        0.005, 1.0))
    watch_max_growth: int = field(default=0, metadata=_key(
        "size", "the fastest (bytes/s) a domain is taken to grow: the watch reads again before growth at this rate "
        "could bring the headroom near the throttle reserve (every watch_seconds near it, at most every 0.25 s far "
        "from it); 0 = measured at start: the kernel's page-fault rate on one CPU x usable CPUs x 2"))
    psi_stall_us: int = field(default=50_000, metadata=_key(
        "int", "PSI trigger: stall (µs of 'some' memory stall) within the window that wakes the loop", 1000,
        10_000_000))
    psi_window_us: int = field(default=500_000, metadata=_key(
        "int", "PSI trigger window (µs); the kernel notifies at most once per window", 10_000, 10_000_000))
    # ----- pressure: when the ladder engages and when it is clear -----
    pressure_stall_pct: float = field(default=10.0, metadata=_key(
        "float", "a session not held by the ladder stalling this much (% 'some' over the window) is pressure",
        0.1, 100.0))
    freeze_stall_pct: float = field(default=10.0, metadata=_key(
        "float", "a higher-priority session still stalling this much after a victim's throttle grace freezes the "
        "victim", 0.1, 100.0))
    clear_stall_pct: float = field(default=2.0, metadata=_key(
        "float", "low-water mark: stall below this (and headroom above the recover reserve) is clear", 0.0, 100.0))
    lookahead_seconds: float = field(default=0.2, metadata=_key(
        "float", "throttle and freeze act on headroom minus this many seconds of the domain's growth", 0.0, 10.0))
    reserve_declared: bool = field(default=True, metadata=_key(
        "bool", "keep free what calls more important than the victims declared (expected_memory_bytes) and have not "
        "reached yet: the lower tier is throttled before it takes memory the higher one said it will need"))
    # ----- reserves (headroom thresholds): max(ratio x limit, floor) -----
    throttle_reserve_ratio: float = field(default=0.05, metadata=_key(
        "float", "headroom below this share of the limit is pressure: throttle", 0.0, 0.9))
    throttle_reserve_min: int = field(default=64 * MIB, metadata=_key(
        "size", "floor of the throttle reserve"))
    freeze_reserve_ratio: float = field(default=0.03, metadata=_key(
        "float", "headroom below this share of the limit freezes victims", 0.0, 0.9))
    freeze_reserve_min: int = field(default=40 * MIB, metadata=_key(
        "size", "floor of the freeze reserve"))
    kill_reserve_ratio: float = field(default=0.015, metadata=_key(
        "float", "last-resort reserve: headroom below it means an OOM is imminent; the ladder kills", 0.0, 0.9))
    kill_reserve_min: int = field(default=24 * MIB, metadata=_key(
        "size", "floor of the last-resort reserve"))
    emergency_reserve_ratio: float = field(default=0.01, metadata=_key(
        "float", "below this the victim is killed without being frozen first", 0.0, 0.9))
    emergency_reserve_min: int = field(default=16 * MIB, metadata=_key(
        "size", "floor of the emergency reserve"))
    recover_reserve_ratio: float = field(default=0.08, metadata=_key(
        "float", "headroom above this share of the limit (and low stall) for the dwell time starts recovery",
        0.0, 0.95))
    recover_reserve_min: int = field(default=96 * MIB, metadata=_key(
        "size", "floor of the recover reserve"))
    # ----- escalation in time -----
    freeze_grace_seconds: float = field(default=0.5, metadata=_key(
        "float", "how long a throttle may try to relieve a stalling higher-priority session before the victim is "
        "frozen", 0.0, 60.0))
    max_throttle_seconds: float = field(default=10.0, metadata=_key(
        "float", "a call throttled this long without relief is frozen (memory.high alone can throttle forever)",
        0.1, 3600.0))
    max_freeze_seconds: float = field(default=30.0, metadata=_key(
        "float", "a victim the ladder keeps frozen this long while pressure lasts is killed (freezing frees nothing: "
        "without a bound a frozen call could wait for its timeout)", 1.0, 3600.0))
    kill_settle_seconds: float = field(default=1.0, metadata=_key(
        "float", "after a kill, wait this long (or until the call is gone) for its memory before killing again",
        0.0, 60.0))
    # ----- recovery -----
    recover_dwell_seconds: float = field(default=0.5, metadata=_key(
        "float", "pressure must stay clear this long before anything is thawed or restored", 0.0, 600.0))
    recover_step_seconds: float = field(default=0.1, metadata=_key(
        "float", "at most one recovery step (a thaw, or one memory.high raise) per this interval", 0.0, 60.0))
    restore_step_ratio: float = field(default=0.5, metadata=_key(
        "float", "a restore step raises memory.high by at most this share of its current value", 0.01, 100.0))
    # ----- throttle steps -----
    throttle_step_ratio: float = field(default=0.5, metadata=_key(
        "float", "a throttle step lowers memory.high by at most this share of its current value", 0.01, 1.0))
    throttle_slack_ratio: float = field(default=0.02, metadata=_key(
        "float", "memory.high is lowered to usage plus this share of usage (never below usage)", 0.0, 1.0))
    throttle_slack_min: int = field(default=4 * MIB, metadata=_key(
        "size", "floor of that slack, so the write never makes the kernel reclaim synchronously"))
    # ----- bounds on actions -----
    call_actions_per_interval: int = field(default=4, metadata=_key(
        "int", "at most this many actions per call per interval (a kill is always allowed)", 1, 1000))
    call_action_interval_seconds: float = field(default=1.0, metadata=_key(
        "float", "the interval of call_actions_per_interval", 0.01, 3600.0))
    max_actions_per_tick: int = field(default=4, metadata=_key(
        "int", "at most this many actions per domain per decision", 1, 1000))
    min_victim_bytes: int = field(default=8 * MIB, metadata=_key(
        "size", "a call using less cannot give way: never a victim, and it does not shield higher priorities"))
    # ----- admission -----
    admission_high: str = field(default="admit", metadata=_key(
        "mode", "a HIGH session's Begin that does not fit the headroom: admit, queue or refuse",
        choices=ADMISSION_MODES))
    admission_normal: str = field(default="queue", metadata=_key(
        "mode", "a NORMAL session's Begin that does not fit: admit, queue or refuse", choices=ADMISSION_MODES))
    admission_low: str = field(default="queue", metadata=_key(
        "mode", "a LOW session's Begin that does not fit: admit, queue or refuse", choices=ADMISSION_MODES))
    admission_reserved_for: str = field(default="higher", metadata=_key(
        "mode", "whose declared but unused memory a Begin must leave free: 'higher' = running calls of higher "
        "priority than its own (calls of its own or lower priority give way through the ladder if they collide); "
        "'all' = every running call (no overcommit: the call waits for its declaration)", choices=RESERVED_FOR))
    admission_max_wait_seconds: float = field(default=10.0, metadata=_key(
        "float", "a queued Begin is refused after waiting this long", 0.0, 3600.0))
    admission_retry_after_seconds: float = field(default=5.0, metadata=_key(
        "float", "the retry-after hint of a refused Begin", 0.0, 3600.0))

    def __post_init__(self) -> None:
        for name, key in policy_keys():
            problem = _check_value(key, getattr(self, name))
            if problem:
                raise PolicyConfigError(f"[policy] {name}: {problem}")
        _check_order(self)


def policy_keys() -> Iterator[tuple[str, PolicyKey]]:
    """(field name, key) of every `[policy]` key, in declaration order."""
    for config_field in fields(PolicyConfig):
        yield config_field.name, config_field.metadata[_METADATA]


_TYPES: dict[str, type | tuple[type, ...]] = {"bool": bool, "float": (int, float), "int": int, "size": int,
                                               "mode": str}


def _check_value(key: PolicyKey, value: Any) -> str | None:
    expected = _TYPES[key.kind]
    if not isinstance(value, expected) or (key.kind != "bool" and isinstance(value, bool)):
        return f"expected a {key.kind}, got {value!r}"
    if key.kind == "mode":
        return None if value in key.choices else f"must be one of {', '.join(key.choices)}, got {value!r}"
    if not isinstance(value, int | float) or key.kind == "bool":
        return None
    number = float(value)
    if not math.isfinite(number):
        return f"must be finite, got {value}"
    if key.kind == "size" and number < 0:
        return f"must not be negative, got {value}"
    if key.minimum is not None and number < key.minimum:
        return f"must be at least {key.minimum:g}, got {value}"
    if key.maximum is not None and number > key.maximum:
        return f"must be at most {key.maximum:g}, got {value}"
    return None


_RESERVES = ("emergency", "kill", "freeze", "throttle", "recover")


def _check_order(config: PolicyConfig) -> None:
    """Each reserve (ratio and floor alike) strictly below the next: the ladder's bands must not overlap."""
    for lower, upper in itertools.pairwise(_RESERVES):
        for suffix in ("ratio", "min"):
            low, high = getattr(config, f"{lower}_reserve_{suffix}"), getattr(config, f"{upper}_reserve_{suffix}")
            if not low < high:
                raise PolicyConfigError(
                    f"[policy] {lower}_reserve_{suffix}: must be below {upper}_reserve_{suffix} ({high}), got {low}")
    if not config.clear_stall_pct < config.pressure_stall_pct:
        raise PolicyConfigError(f"[policy] clear_stall_pct: must be below pressure_stall_pct "
                                f"({config.pressure_stall_pct}), got {config.clear_stall_pct}")


def from_table(table: Mapping[str, Any]) -> PolicyConfig:
    """A PolicyConfig from a `[policy]` TOML table (missing keys take their defaults; sizes in bytes)."""
    known = dict(policy_keys())
    for name in table:
        if name not in known:
            raise PolicyConfigError(f"[policy] {name}: unknown key")
    values: dict[str, Any] = {name: float(value) if known[name].kind == "float" and type(value) is int else value
                              for name, value in table.items()}
    return PolicyConfig(**values)


def describe(config: PolicyConfig) -> dict[str, object]:
    """The effective values, `policy.<key>` -> value (the start log line)."""
    return {f"policy.{name}": getattr(config, name) for name, _ in policy_keys()}


def reserve(limit: int, ratio: float, floor: int) -> int:
    """A headroom threshold of a domain with this limit: the larger of a share of it and its floor (the floor
    scaled down for domains below FLOOR_FULL_LIMIT)."""
    scaled_floor = floor * min(limit, FLOOR_FULL_LIMIT) // FLOOR_FULL_LIMIT
    return max(int(limit * ratio), scaled_floor)


def default_toml() -> str:
    """The `[policy]` table with every key at its default, each after its meaning (agentd --print-config)."""
    lines = ["[policy]", "# the memory policy: docs/policy.md"]
    defaults = PolicyConfig()
    for name, key in policy_keys():
        value = getattr(defaults, name)
        lines.append(f"# {key.doc}")
        lines.append(f"{name} = {json.dumps(value)}")  # a TOML value too: true/false, numbers, strings
    return "\n".join(lines) + "\n"
