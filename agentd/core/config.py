"""Daemon configuration: a TOML file whose every key is declared here once, as a field of `Config` that carries
its section, name, type, default, meaning and range (`KEYS` is derived from those fields).

`load_config` validates the whole file at start; every error names the offending key. `default_toml()`
renders the documented defaults (`agentd --print-config`, docs/configuration.md); `describe()` the effective
configuration (one structured log line at start).
"""

from __future__ import annotations

import grp
import json
import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import psutil

from agentd.core.units import parse_size

DEFAULT_PATH = Path("/etc/agentd/agentd.toml")
# Sections whose keys are declared and validated by another module (which the core must not import):
# [policy] by agentd/policy/settings.py; the daemon validates it at start like the rest.
DELEGATED_SECTIONS = ("policy",)
_METADATA = "agentd.key"  # the dataclasses.field metadata entry holding a Config field's Key


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


Check = Callable[[Any], str | None]  # a converted value -> what is wrong with it, or None


@dataclass(frozen=True)
class Key:
    section: str
    name: str
    kind: str  # str, path, size, int, float, mode, group, bool, level, names (a list of file names)
    default: Any
    doc: str
    minimum: float | None = None
    maximum: float | None = None
    check: Check | None = None  # further rules for the value alone


def _key(
    section: str, name: str, kind: str, default: Any, doc: str, minimum: float | None = None,
    maximum: float | None = None, check: Check | None = None,
) -> dict[str, Key]:
    """The metadata of a Config field: its configuration key (the field's only declaration)."""
    return {_METADATA: Key(section, name, kind, default, doc, minimum, maximum, check)}


def _one_of(*choices: str) -> Check:
    allowed = ", ".join(choices[:-1]) + f" or {choices[-1]}"
    return lambda value: None if value in choices else f"must be {allowed}, got {value!r}"


def _auto_or_absolute(value: str) -> str | None:
    return None if value == "auto" or value.startswith("/") else f"must be 'auto' or an absolute path, got {value!r}"


def _empty_or_absolute(value: str) -> str | None:
    return None if not value or value.startswith("/") else f"must be an absolute path, got {value!r}"


def _host_port_or_empty(value: str) -> str | None:
    if not value or (":" in value and value.rsplit(":", 1)[1].isdigit()):
        return None
    return f"expected host:port or empty, got {value!r}"


@dataclass(frozen=True)
class Config:
    """The effective configuration. Each field is one key of the file; "0 = the host's" and "empty = derived"
    values are resolved (memory_ceiling, max_cpu_millicores, records_file), admin_group is its gid."""

    # [daemon]
    cgroup_root: str = field(metadata=_key(
        "daemon", "cgroup_root", "str", "auto",
        "agentd's cgroup, as an absolute filesystem path inside the cgroup2 mount, or 'auto': the unit's "
        "delegated cgroup under systemd (Delegate=yes), otherwise <cgroup2 mount>/agentd",
        check=_auto_or_absolute))
    state_dir: Path = field(metadata=_key(
        "daemon", "state_dir", "path", "/var/lib/agentd", "where records are kept"))
    records_file: Path = field(metadata=_key(
        "daemon", "records_file", "str", "", "tool-call records (JSON lines); empty = <state_dir>/records.jsonl",
        check=_empty_or_absolute))
    records_max_bytes: int = field(metadata=_key(
        "daemon", "records_max_bytes", "size", "256M",
        "rotate the records file to <records_file>.1 beyond this size", 4096))
    records_kept_in_memory: int = field(metadata=_key(
        "daemon", "records_kept_in_memory", "int", 10000,
        "how far back ListToolCalls looks (newest records), and parsed records kept in memory", 100, 10_000_000))
    log_level: str = field(metadata=_key(
        "daemon", "log_level", "level", "info", "debug, info, warning or error",
        check=_one_of("debug", "info", "warning", "error")))
    # [api]
    admin_socket: Path = field(metadata=_key(
        "api", "admin_socket", "path", "/run/agentd/admin.sock",
        "gRPC Admin service (all verbs); restricted by admin_socket_mode and admin_group"))
    admin_socket_mode: int = field(metadata=_key(
        "api", "admin_socket_mode", "mode", "0660", "file mode of the admin socket (octal string)"))
    admin_gid: int = field(metadata=_key(
        "api", "admin_group", "group", "root", "group owning the admin socket: its members may use admin verbs"))
    sandbox_socket: Path = field(metadata=_key(
        "api", "sandbox_socket", "path", "/run/agentd/sandbox.sock",
        "gRPC Sandbox service, bind-mounted into sandboxes; every call needs a session token"))
    sandbox_socket_mode: int = field(metadata=_key(
        "api", "sandbox_socket_mode", "mode", "0666", "file mode of the sandbox socket"))
    join_socket: Path = field(metadata=_key(
        "api", "join_socket", "path", "/run/agentd/join.sock",
        "Unix socket where launchers place the processes of tool calls (HOLD, JOIN) and report their end (END)"))
    join_timeout_seconds: float = field(metadata=_key(
        "api", "join_timeout_seconds", "float", 30.0,
        "a call whose process has not joined by then is cancelled and its cgroup removed", 0.1, 3600))
    exit_report_grace_seconds: float = field(metadata=_key(
        "api", "exit_report_grace_seconds", "float", 2.0,
        "with report_exit, how long an emptied call waits for EndToolCall's exit status", 0.0, 60))
    max_connections: int = field(metadata=_key(
        "api", "max_connections", "int", 4096,
        "connections open at once on each socket (admin, sandbox, join); beyond, new ones are refused: each "
        "costs agentd a file descriptor (the unit's LimitNOFILE is 65536)", 16, 16384))
    # [metrics]
    metrics_address: str = field(metadata=_key(
        "metrics", "address", "str", "127.0.0.1:9464", "host:port for Prometheus /metrics; empty = disabled",
        check=_host_port_or_empty))
    # [limits]
    memory_class_low: int = field(metadata=_key(
        "limits", "memory_class_low", "size", "256M", "memory.high for intents of memory class LOW", 4096))
    memory_class_medium: int = field(metadata=_key(
        "limits", "memory_class_medium", "size", "1G", "memory.high for intents of memory class MEDIUM", 4096))
    memory_class_high: int = field(metadata=_key(
        "limits", "memory_class_high", "size", "4G", "memory.high for intents of memory class HIGH", 4096))
    default_memory_class: str = field(metadata=_key(
        "limits", "default_memory_class", "str", "medium",
        "class used when an intent declares neither bytes nor a class: low, medium or high",
        check=_one_of("low", "medium", "high")))
    memory_max_ratio: float = field(metadata=_key(
        "limits", "memory_max_ratio", "float", 1.5,
        "default memory.max = expected memory x this ratio (then capped by the session budget)", 1.0, 100))
    memory_ceiling: int = field(metadata=_key(
        "limits", "memory_ceiling", "size", "0",
        "largest memory a single intent may declare; 0 = the host's physical memory"))
    default_timeout_seconds: float = field(metadata=_key(
        "limits", "default_timeout_seconds", "float", 600.0, "timeout of intents that declare none", 1, 604800))
    max_timeout_seconds: float = field(metadata=_key(
        "limits", "max_timeout_seconds", "float", 86400.0, "largest timeout an intent may declare", 1, 604800))
    default_pids_max: int = field(metadata=_key(
        "limits", "default_pids_max", "int", 4096, "pids.max of tool calls that declare none", 1, 4194304))
    max_pids: int = field(metadata=_key(
        "limits", "max_pids", "int", 65536, "largest pids limit an intent may declare", 1, 4194304))
    max_cpu_millicores: int = field(metadata=_key(
        "limits", "max_cpu_millicores", "int", 0,
        "largest CPU cap an intent may declare (1000 = one CPU); 0 = the host's CPU count", 0, 1 << 20))
    cpu_weight_background: int = field(metadata=_key(
        "limits", "cpu_weight_background", "int", 25, "cpu.weight of BACKGROUND tool calls", 1, 10000))
    cpu_weight_normal: int = field(metadata=_key(
        "limits", "cpu_weight_normal", "int", 100, "cpu.weight of NORMAL tool calls", 1, 10000))
    cpu_weight_interactive: int = field(metadata=_key(
        "limits", "cpu_weight_interactive", "int", 400, "cpu.weight of INTERACTIVE tool calls", 1, 10000))
    network_none_allows_loopback: bool = field(metadata=_key(
        "limits", "network_none_allows_loopback", "bool", False,
        "calls with network intent NONE may still connect to loopback (127.0.0.0/8, ::1); enforced by the "
        "netpolicy BPF program"))
    # [sessions]
    cpu_weight_high: int = field(metadata=_key(
        "sessions", "cpu_weight_high", "int", 400, "cpu.weight of HIGH priority sessions", 1, 10000))
    cpu_weight_session_normal: int = field(metadata=_key(
        "sessions", "cpu_weight_normal", "int", 100, "cpu.weight of NORMAL priority sessions", 1, 10000))
    cpu_weight_low: int = field(metadata=_key(
        "sessions", "cpu_weight_low", "int", 25, "cpu.weight of LOW priority sessions", 1, 10000))
    default_pids_budget: int = field(metadata=_key(
        "sessions", "default_pids_budget", "int", 16384, "session pids.max when none is given", 1, 4194304))
    default_memory_protected_high: int = field(metadata=_key(
        "sessions", "default_memory_protected_high", "size", "0",
        "memory.low of HIGH sessions that declare no protected memory; 0 = their whole working set (memory.low "
        "max): reclaim under sessions/'s limit takes from lower priorities first"))
    oom_score_adj_high: int = field(metadata=_key(
        "sessions", "oom_score_adj_high", "int", 0,
        "oom_score_adj given to the tool-call processes of HIGH sessions (their children inherit it): when the "
        "kernel must OOM-kill above a call (session budget, sessions/, host), it prefers higher values", -1000,
        1000))
    oom_score_adj_normal: int = field(metadata=_key(
        "sessions", "oom_score_adj_normal", "int", 400, "oom_score_adj of NORMAL sessions' tool calls", -1000, 1000))
    oom_score_adj_low: int = field(metadata=_key(
        "sessions", "oom_score_adj_low", "int", 800, "oom_score_adj of LOW sessions' tool calls", -1000, 1000))
    max_sessions: int = field(metadata=_key(
        "sessions", "max_sessions", "int", 1024, "CreateSession beyond this many sessions is refused", 1, 1 << 20))
    max_active_calls_per_session: int = field(metadata=_key(
        "sessions", "max_active_calls_per_session", "int", 256,
        "BeginToolCall beyond this many unfinished calls in one session is refused", 1, 1 << 20))
    # [capture]
    capture_enabled: bool = field(metadata=_key(
        "capture", "enabled", "bool", True,
        "auto-capture: a matching command exec'd in a session's agent/ leaf becomes an implicit tool call "
        "(needs the lifecycle BPF program; a session's spec can override this)"))
    capture_shells: frozenset[str] = field(metadata=_key(
        "capture", "shells", "names", ("sh", "bash", "dash", "zsh"),
        "shells captured when they run a command string: first argument -c, or an option cluster with c "
        "such as -lc (the agent's shell tool); [] = none"))
    capture_commands: frozenset[str] = field(metadata=_key(
        "capture", "commands", "names",
        ("pytest", "pip", "pip3", "npm", "npx", "yarn", "make", "cargo", "go", "mvn", "gradle", "tox", "uv"),
        "heavy commands captured by the basename of the exec'd file"))
    capture_network: str = field(metadata=_key(
        "capture", "network", "str", "any", "network intent of captured calls: any or none",
        check=_one_of("any", "none")))
    capture_timeout_seconds: float = field(metadata=_key(
        "capture", "timeout_seconds", "float", 0.0,
        "timeout of captured calls; 0 = [limits] default_timeout_seconds", 0, 604800))


def _key_of(config_field: Any) -> Key:
    key: Key = config_field.metadata[_METADATA]
    return key


KEYS: tuple[Key, ...] = tuple(_key_of(f) for f in fields(Config))
_FIELDS: tuple[tuple[str, Key], ...] = tuple((f.name, _key_of(f)) for f in fields(Config))


def _convert_raw(key: Key, raw: Any) -> Any:
    """The raw TOML value as the key's type (ConfigError or ValueError if it is not one)."""
    where = f"[{key.section}] {key.name}"
    if key.kind in ("str", "path", "level", "group"):
        if not isinstance(raw, str):
            raise ConfigError(f"{where}: expected a string, got {type(raw).__name__}")
        if key.kind == "path":
            if not raw.startswith("/"):
                raise ConfigError(f"{where}: must be an absolute path, got {raw!r}")
            return Path(raw)
        if key.kind == "group":
            try:
                return grp.getgrnam(raw).gr_gid
            except KeyError:
                raise ConfigError(f"{where}: no such group {raw!r}") from None
        return raw
    if key.kind == "size":
        if not isinstance(raw, str | int) or isinstance(raw, bool):
            raise ConfigError(f"{where}: expected a size such as 512M or 2G, got {raw!r}")
        return parse_size(raw)
    if key.kind == "int":
        if not isinstance(raw, int) or isinstance(raw, bool):
            raise ConfigError(f"{where}: expected an integer, got {raw!r}")
        return raw
    if key.kind == "float":
        if not isinstance(raw, int | float) or isinstance(raw, bool) or not math.isfinite(raw):
            raise ConfigError(f"{where}: expected a number, got {raw!r}")
        return float(raw)
    if key.kind == "bool":
        if not isinstance(raw, bool):
            raise ConfigError(f"{where}: expected true or false, got {raw!r}")
        return raw
    if key.kind == "names":
        if not isinstance(raw, list | tuple) or not all(
            isinstance(name, str) and name and "/" not in name for name in raw
        ):
            raise ConfigError(f"{where}: expected a list of file names such as [\"make\"], got {raw!r}")
        return frozenset(raw)
    if key.kind == "mode":
        if not isinstance(raw, str):
            raise ConfigError(f"{where}: expected an octal string such as \"0660\", got {raw!r}")
        mode = int(raw, 8)
        if not 0 <= mode <= 0o777:
            raise ConfigError(f"{where}: mode out of range: {raw!r}")
        return mode
    raise AssertionError(key.kind)


def _convert(key: Key, raw: Any) -> Any:
    """The value of one key, checked by itself: type, range and the key's own rules."""
    where = f"[{key.section}] {key.name}"
    try:
        value = _convert_raw(key, raw)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    if key.minimum is not None and value < key.minimum:
        raise ConfigError(f"{where}: must be >= {key.minimum:g}, got {raw!r}")
    if key.maximum is not None and value > key.maximum:
        raise ConfigError(f"{where}: must be <= {key.maximum:g}, got {raw!r}")
    problem = key.check(value) if key.check is not None else None
    if problem:
        raise ConfigError(f"{where}: {problem}")
    return value


def _check_unknown(data: dict[str, Any]) -> None:
    known = {(k.section, k.name) for k in KEYS}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}]: expected a table")
        if section in DELEGATED_SECTIONS:
            continue
        if section not in {k.section for k in KEYS}:
            raise ConfigError(f"[{section}]: unknown section")
        for name in table:
            if (section, name) not in known:
                raise ConfigError(f"[{section}] {name}: unknown key")


def _check_together(config: Config) -> None:
    """Rules between keys (each key is valid by itself by now)."""
    if config.default_timeout_seconds > config.max_timeout_seconds:
        raise ConfigError("[limits] default_timeout_seconds: larger than max_timeout_seconds")
    if config.default_pids_max > config.max_pids:
        raise ConfigError("[limits] default_pids_max: larger than max_pids")
    if config.capture_timeout_seconds > config.max_timeout_seconds:
        raise ConfigError("[capture] timeout_seconds: larger than [limits] max_timeout_seconds")


def _resolve(values: dict[str, Any]) -> None:
    """The values whose default is the host's or derived from another key."""
    values["records_file"] = Path(values["records_file"] or values["state_dir"] / "records.jsonl")
    values["memory_ceiling"] = values["memory_ceiling"] or psutil.virtual_memory().total
    values["max_cpu_millicores"] = values["max_cpu_millicores"] or (psutil.cpu_count() or 1) * 1000


def read_toml(path: Path | None, overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The config file's tables (a missing default file means none), with overrides applied."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            if path != DEFAULT_PATH:
                raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update(values)
    return data


def delegated_table(path: Path | None, section: str) -> dict[str, Any]:
    """A section validated elsewhere (DELEGATED_SECTIONS), as the raw table; {} when absent."""
    table = read_toml(path).get(section, {})
    if not isinstance(table, dict):
        raise ConfigError(f"[{section}]: expected a table")
    return table


def load_config(path: Path | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Read and validate the config file (a missing default file means all defaults)."""
    data = read_toml(path, overrides)
    _check_unknown(data)
    values = {name: _convert(key, data.get(key.section, {}).get(key.name, key.default)) for name, key in _FIELDS}
    _resolve(values)
    config = Config(**values)
    _check_together(config)
    return config


def describe(config: Config) -> dict[str, object]:
    """The effective configuration, JSON-friendly, by key ("limits.memory_ceiling": 8589934592, ...): what the
    daemon runs with after defaults and host-derived values (one structured log line at start)."""
    return {f"{key.section}.{key.name}": _plain(key, getattr(config, name)) for name, key in _FIELDS}


def _plain(key: Key, value: Any) -> object:
    if key.kind == "mode":
        return f"{value:04o}"
    if key.kind == "group":
        try:
            return grp.getgrgid(value).gr_name
        except KeyError:
            return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, frozenset):
        return sorted(value)
    return value


def default_toml() -> str:
    """The documented default configuration, as TOML."""
    lines = ["# agentd configuration (/etc/agentd/agentd.toml). Every key, with its default.", ""]
    section = ""
    for key in KEYS:
        if key.section != section:
            if section:
                lines.append("")
            section = key.section
            lines.append(f"[{section}]")
        lines.append(f"# {key.doc}")
        lines.append(f"{key.name} = {_toml_value(key.default)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool | tuple):
        return json.dumps(value)  # true/false, ["a", "b"]
    return repr(value)
