"""Daemon configuration: a TOML file whose every key is declared here with its type, default and meaning.

`load_config` validates the whole file at start; every error names the offending key. `default_toml()`
renders the documented defaults (`agentd --print-config`, docs/configuration.md).
"""

from __future__ import annotations

import grp
import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from agentd.core.units import parse_size

DEFAULT_PATH = Path("/etc/agentd/agentd.toml")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


@dataclass(frozen=True)
class Key:
    section: str
    name: str
    kind: str  # str, path, size, int, float, mode, group, bool, level, names (a list of file names)
    default: Any
    doc: str
    minimum: float | None = None
    maximum: float | None = None


KEYS: tuple[Key, ...] = (
    Key("daemon", "cgroup_root", "str", "auto",
        "agentd's cgroup, as an absolute filesystem path inside the cgroup2 mount, or 'auto': the unit's "
        "delegated cgroup under systemd (Delegate=yes), otherwise <cgroup2 mount>/agentd"),
    Key("daemon", "state_dir", "path", "/var/lib/agentd", "where records are kept"),
    Key("daemon", "records_file", "str", "", "tool-call records (JSON lines); empty = <state_dir>/records.jsonl"),
    Key("daemon", "records_max_bytes", "size", "256M",
        "rotate the records file to <records_file>.1 beyond this size", 4096),
    Key("daemon", "records_kept_in_memory", "int", 10000,
        "recent records served by ListToolCalls and used to reconcile after a restart", 100, 10_000_000),
    Key("daemon", "log_level", "level", "info", "debug, info, warning or error"),
    Key("api", "admin_socket", "path", "/run/agentd/admin.sock",
        "gRPC Admin service (all verbs); restricted by admin_socket_mode and admin_group"),
    Key("api", "admin_socket_mode", "mode", "0660", "file mode of the admin socket (octal string)"),
    Key("api", "admin_group", "group", "root", "group owning the admin socket: its members may use admin verbs"),
    Key("api", "sandbox_socket", "path", "/run/agentd/sandbox.sock",
        "gRPC Sandbox service, bind-mounted into sandboxes; every call needs a session token"),
    Key("api", "sandbox_socket_mode", "mode", "0666", "file mode of the sandbox socket"),
    Key("api", "join_socket", "path", "/run/agentd/join.sock",
        "Unix socket where launchers place the processes of tool calls (HOLD, JOIN) and report their end (END)"),
    Key("api", "join_timeout_seconds", "float", 30.0,
        "a call whose process has not joined by then is cancelled and its cgroup removed", 0.1, 3600),
    Key("api", "exit_report_grace_seconds", "float", 2.0,
        "with report_exit, how long an emptied call waits for EndToolCall's exit status", 0.0, 60),
    Key("api", "max_connections", "int", 4096,
        "connections open at once on each socket (admin, sandbox, join); beyond, new ones are refused: each "
        "costs agentd a file descriptor (the unit's LimitNOFILE is 65536)", 16, 16384),
    Key("metrics", "address", "str", "127.0.0.1:9464", "host:port for Prometheus /metrics; empty = disabled"),
    Key("limits", "memory_class_low", "size", "256M", "memory.high for intents of memory class LOW"),
    Key("limits", "memory_class_medium", "size", "1G", "memory.high for intents of memory class MEDIUM"),
    Key("limits", "memory_class_high", "size", "4G", "memory.high for intents of memory class HIGH"),
    Key("limits", "default_memory_class", "str", "medium",
        "class used when an intent declares neither bytes nor a class: low, medium or high"),
    Key("limits", "memory_max_ratio", "float", 1.5,
        "default memory.max = expected memory x this ratio (then capped by the session budget)", 1.0, 100),
    Key("limits", "memory_ceiling", "size", "0",
        "largest memory a single intent may declare; 0 = the host's physical memory"),
    Key("limits", "default_timeout_seconds", "float", 600.0, "timeout of intents that declare none", 1, 604800),
    Key("limits", "max_timeout_seconds", "float", 86400.0, "largest timeout an intent may declare", 1, 604800),
    Key("limits", "default_pids_max", "int", 4096, "pids.max of tool calls that declare none", 1, 4194304),
    Key("limits", "max_pids", "int", 65536, "largest pids limit an intent may declare", 1, 4194304),
    Key("limits", "max_cpu_millicores", "int", 0,
        "largest CPU cap an intent may declare (1000 = one CPU); 0 = the host's CPU count", 0, 1 << 20),
    Key("limits", "cpu_weight_background", "int", 25, "cpu.weight of BACKGROUND tool calls", 1, 10000),
    Key("limits", "cpu_weight_normal", "int", 100, "cpu.weight of NORMAL tool calls", 1, 10000),
    Key("limits", "cpu_weight_interactive", "int", 400, "cpu.weight of INTERACTIVE tool calls", 1, 10000),
    Key("limits", "network_none_allows_loopback", "bool", False,
        "calls with network intent NONE may still connect to loopback (127.0.0.0/8, ::1); enforced by the "
        "netpolicy BPF program"),
    Key("sessions", "cpu_weight_high", "int", 400, "cpu.weight of HIGH priority sessions", 1, 10000),
    Key("sessions", "cpu_weight_normal", "int", 100, "cpu.weight of NORMAL priority sessions", 1, 10000),
    Key("sessions", "cpu_weight_low", "int", 25, "cpu.weight of LOW priority sessions", 1, 10000),
    Key("sessions", "default_pids_budget", "int", 16384, "session pids.max when none is given", 1, 4194304),
    Key("sessions", "default_memory_protected_high", "size", "0",
        "memory.low of HIGH sessions that declare no protected memory; 0 = none"),
    Key("sessions", "max_sessions", "int", 1024, "CreateSession beyond this many sessions is refused", 1, 1 << 20),
    Key("sessions", "max_active_calls_per_session", "int", 256,
        "BeginToolCall beyond this many unfinished calls in one session is refused", 1, 1 << 20),
    Key("capture", "enabled", "bool", True,
        "auto-capture: a matching command exec'd in a session's agent/ leaf becomes an implicit tool call "
        "(needs the lifecycle BPF program; a session's spec can override this)"),
    Key("capture", "shells", "names", ("sh", "bash", "dash", "zsh"),
        "shells captured when they run a command string: first argument -c, or an option cluster with c "
        "such as -lc (the agent's shell tool); [] = none"),
    Key("capture", "commands", "names",
        ("pytest", "pip", "pip3", "npm", "npx", "yarn", "make", "cargo", "go", "mvn", "gradle", "tox", "uv"),
        "heavy commands captured by the basename of the exec'd file"),
    Key("capture", "network", "str", "any", "network intent of captured calls: any or none"),
    Key("capture", "timeout_seconds", "float", 0.0,
        "timeout of captured calls; 0 = [limits] default_timeout_seconds", 0, 604800),
)


@dataclass(frozen=True)
class Config:
    cgroup_root: str
    state_dir: Path
    records_file: Path
    records_max_bytes: int
    records_kept_in_memory: int
    log_level: str
    admin_socket: Path
    admin_socket_mode: int
    admin_gid: int
    sandbox_socket: Path
    sandbox_socket_mode: int
    join_socket: Path
    join_timeout_seconds: float
    exit_report_grace_seconds: float
    max_connections: int
    metrics_address: str
    memory_class_low: int
    memory_class_medium: int
    memory_class_high: int
    default_memory_class: str
    memory_max_ratio: float
    memory_ceiling: int
    default_timeout_seconds: float
    max_timeout_seconds: float
    default_pids_max: int
    max_pids: int
    max_cpu_millicores: int
    cpu_weight_background: int
    cpu_weight_normal: int
    cpu_weight_interactive: int
    network_none_allows_loopback: bool
    cpu_weight_high: int
    cpu_weight_session_normal: int
    cpu_weight_low: int
    default_pids_budget: int
    default_memory_protected_high: int
    max_sessions: int
    max_active_calls_per_session: int
    capture_enabled: bool
    capture_shells: frozenset[str]
    capture_commands: frozenset[str]
    capture_network: str
    capture_timeout_seconds: float


def _convert(key: Key, raw: Any) -> Any:
    where = f"[{key.section}] {key.name}"
    try:
        value: Any
        if key.kind in ("str", "path", "level", "group"):
            if not isinstance(raw, str):
                raise ConfigError(f"{where}: expected a string, got {type(raw).__name__}")
            value = raw
            if key.kind == "path" and not raw.startswith("/"):
                raise ConfigError(f"{where}: must be an absolute path, got {raw!r}")
            if key.kind == "level" and raw not in ("debug", "info", "warning", "error"):
                raise ConfigError(f"{where}: must be debug, info, warning or error, got {raw!r}")
        elif key.kind == "size":
            if not isinstance(raw, str | int) or isinstance(raw, bool):
                raise ConfigError(f"{where}: expected a size such as 512M or 2G, got {raw!r}")
            value = parse_size(raw)
        elif key.kind == "int":
            if not isinstance(raw, int) or isinstance(raw, bool):
                raise ConfigError(f"{where}: expected an integer, got {raw!r}")
            value = raw
        elif key.kind == "float":
            if not isinstance(raw, int | float) or isinstance(raw, bool) or not math.isfinite(raw):
                raise ConfigError(f"{where}: expected a number, got {raw!r}")
            value = float(raw)
        elif key.kind == "bool":
            if not isinstance(raw, bool):
                raise ConfigError(f"{where}: expected true or false, got {raw!r}")
            value = raw
        elif key.kind == "names":
            if not isinstance(raw, list | tuple) or not all(
                isinstance(name, str) and name and "/" not in name for name in raw
            ):
                raise ConfigError(f"{where}: expected a list of file names such as [\"make\"], got {raw!r}")
            value = frozenset(raw)
        elif key.kind == "mode":
            if not isinstance(raw, str):
                raise ConfigError(f"{where}: expected an octal string such as \"0660\", got {raw!r}")
            value = int(raw, 8)
            if not 0 <= value <= 0o777:
                raise ConfigError(f"{where}: mode out of range: {raw!r}")
        else:
            raise AssertionError(key.kind)
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where}: {exc}") from exc
    if key.minimum is not None and value < key.minimum:
        raise ConfigError(f"{where}: must be >= {key.minimum:g}, got {raw!r}")
    if key.maximum is not None and value > key.maximum:
        raise ConfigError(f"{where}: must be <= {key.maximum:g}, got {raw!r}")
    return value


def load_config(path: Path | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Read and validate the config file (a missing default file means all defaults)."""
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
    known = {(k.section, k.name) for k in KEYS}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}]: expected a table")
        if section not in {k.section for k in KEYS}:
            raise ConfigError(f"[{section}]: unknown section")
        for name in table:
            if (section, name) not in known:
                raise ConfigError(f"[{section}] {name}: unknown key")
    converted: dict[str, Any] = {}
    for key in KEYS:
        raw = data.get(key.section, {}).get(key.name, key.default)
        converted[f"{key.section}.{key.name}"] = _convert(key, raw)
    return _build(converted)


def _build(v: dict[str, Any]) -> Config:
    try:
        admin_gid = grp.getgrnam(v["api.admin_group"]).gr_gid
    except KeyError:
        raise ConfigError(f"[api] admin_group: no such group {v['api.admin_group']!r}") from None
    if v["limits.default_memory_class"] not in ("low", "medium", "high"):
        raise ConfigError("[limits] default_memory_class: must be low, medium or high")
    if v["limits.default_timeout_seconds"] > v["limits.max_timeout_seconds"]:
        raise ConfigError("[limits] default_timeout_seconds: larger than max_timeout_seconds")
    if v["limits.default_pids_max"] > v["limits.max_pids"]:
        raise ConfigError("[limits] default_pids_max: larger than max_pids")
    ceiling = v["limits.memory_ceiling"] or psutil.virtual_memory().total
    cpus = psutil.cpu_count() or 1
    state_dir = Path(v["daemon.state_dir"])
    records = v["daemon.records_file"]
    if records and not records.startswith("/"):
        raise ConfigError(f"[daemon] records_file: must be an absolute path, got {records!r}")
    root = v["daemon.cgroup_root"]
    if root != "auto" and not root.startswith("/"):
        raise ConfigError(f"[daemon] cgroup_root: must be 'auto' or an absolute path, got {root!r}")
    if v["capture.network"] not in ("any", "none"):
        raise ConfigError(f"[capture] network: must be any or none, got {v['capture.network']!r}")
    if v["capture.timeout_seconds"] > v["limits.max_timeout_seconds"]:
        raise ConfigError("[capture] timeout_seconds: larger than [limits] max_timeout_seconds")
    address = v["metrics.address"]
    if address and (":" not in address or not address.rsplit(":", 1)[1].isdigit()):
        raise ConfigError(f"[metrics] address: expected host:port or empty, got {address!r}")
    return Config(
        cgroup_root=root,
        state_dir=state_dir,
        records_file=Path(records) if records else state_dir / "records.jsonl",
        records_max_bytes=v["daemon.records_max_bytes"],
        records_kept_in_memory=v["daemon.records_kept_in_memory"],
        log_level=v["daemon.log_level"],
        admin_socket=Path(v["api.admin_socket"]),
        admin_socket_mode=v["api.admin_socket_mode"],
        admin_gid=admin_gid,
        sandbox_socket=Path(v["api.sandbox_socket"]),
        sandbox_socket_mode=v["api.sandbox_socket_mode"],
        join_socket=Path(v["api.join_socket"]),
        join_timeout_seconds=v["api.join_timeout_seconds"],
        exit_report_grace_seconds=v["api.exit_report_grace_seconds"],
        max_connections=v["api.max_connections"],
        metrics_address=address,
        memory_class_low=v["limits.memory_class_low"],
        memory_class_medium=v["limits.memory_class_medium"],
        memory_class_high=v["limits.memory_class_high"],
        default_memory_class=v["limits.default_memory_class"],
        memory_max_ratio=v["limits.memory_max_ratio"],
        memory_ceiling=ceiling,
        default_timeout_seconds=v["limits.default_timeout_seconds"],
        max_timeout_seconds=v["limits.max_timeout_seconds"],
        default_pids_max=v["limits.default_pids_max"],
        max_pids=v["limits.max_pids"],
        max_cpu_millicores=v["limits.max_cpu_millicores"] or cpus * 1000,
        cpu_weight_background=v["limits.cpu_weight_background"],
        cpu_weight_normal=v["limits.cpu_weight_normal"],
        cpu_weight_interactive=v["limits.cpu_weight_interactive"],
        network_none_allows_loopback=v["limits.network_none_allows_loopback"],
        cpu_weight_high=v["sessions.cpu_weight_high"],
        cpu_weight_session_normal=v["sessions.cpu_weight_normal"],
        cpu_weight_low=v["sessions.cpu_weight_low"],
        default_pids_budget=v["sessions.default_pids_budget"],
        default_memory_protected_high=v["sessions.default_memory_protected_high"],
        max_sessions=v["sessions.max_sessions"],
        max_active_calls_per_session=v["sessions.max_active_calls_per_session"],
        capture_enabled=v["capture.enabled"],
        capture_shells=v["capture.shells"],
        capture_commands=v["capture.commands"],
        capture_network=v["capture.network"],
        capture_timeout_seconds=v["capture.timeout_seconds"],
    )


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
