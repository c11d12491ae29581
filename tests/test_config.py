"""Configuration: defaults, errors that name the key, and documentation of every key."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import REPO, child_env

from agentd.core.config import KEYS, ConfigError, Key, default_toml, load_config


def test_defaults_are_valid_and_documented() -> None:
    config = load_config(None)
    assert config.admin_socket == Path("/run/agentd/admin.sock")
    assert config.records_file == Path("/var/lib/agentd/records.jsonl")
    assert config.metrics_address == "127.0.0.1:9464"
    rendered = tomllib.loads(default_toml())
    assert {(s, k) for s, t in rendered.items() for k in t} == {(k.section, k.name) for k in KEYS}
    assert load_config(None, rendered) == config
    docs = (REPO / "docs" / "configuration.md").read_text()
    for key in KEYS:
        assert f"{key.name} =" in docs, f"[{key.section}] {key.name} is not in docs/configuration.md"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[daemon]\nnope = 1\n", "[daemon] nope: unknown key"),
        ("[nope]\n", "[nope]: unknown section"),
        ("[limits]\nmemory_class_low = \"lots\"\n", "[limits] memory_class_low: not a size"),
        ("[limits]\ndefault_pids_max = \"12\"\n", "[limits] default_pids_max: expected an integer"),
        ("[limits]\ncpu_weight_normal = 0\n", "[limits] cpu_weight_normal: must be >= 1"),
        ("[api]\nadmin_socket = \"relative.sock\"\n", "[api] admin_socket: must be an absolute path"),
        ("[api]\nadmin_socket_mode = \"999\"\n", "[api] admin_socket_mode"),
        ("[api]\nadmin_group = \"no-such-group-xyz\"\n", "[api] admin_group: no such group"),
        ("[daemon]\nlog_level = \"loud\"\n", "[daemon] log_level"),
        ("[daemon]\ncgroup_root = \"relative\"\n", "[daemon] cgroup_root"),
        ("[metrics]\naddress = \"localhost\"\n", "[metrics] address"),
        ("[capture]\nenabled = 1\n", "[capture] enabled: expected true or false"),
        ("[capture]\ncommands = [\"bin/make\"]\n", "[capture] commands: expected a list of file names"),
        ("[capture]\nnetwork = \"some\"\n", "[capture] network: must be any or none"),
        ("[limits]\ndefault_timeout_seconds = 100000.0\nmax_timeout_seconds = 10.0\n", "default_timeout_seconds"),
        ("not toml [", "not valid TOML"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "agentd.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value)


def test_daemon_refuses_bad_config_at_start(tmp_path: Path) -> None:
    path = tmp_path / "agentd.toml"
    path.write_text("[limits]\nmax_pids = -1\n")
    run = subprocess.run([sys.executable, "-m", "agentd.daemon", "--config", str(path)], capture_output=True,
                         text=True, env=child_env(), timeout=60)
    assert run.returncode == 2 and "[limits] max_pids" in run.stderr
    missing = subprocess.run([sys.executable, "-m", "agentd.daemon", "--config", str(tmp_path / "nope.toml")],
                             capture_output=True, text=True, env=child_env(), timeout=60)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    printed = subprocess.run([sys.executable, "-m", "agentd.daemon", "--print-config"], capture_output=True,
                             text=True, env=child_env(), timeout=60)
    assert tomllib.loads(printed.stdout)["limits"]["default_pids_max"] == 4096


toml_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.integers(0, 100_000), st.floats(),
              st.floats(0, 1e6), st.text(max_size=12),
              st.sampled_from(["0", "1G", "64K", "0755", "999", "root", "nobody", "auto", "debug", "/tmp/x", "-1"])),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=6), children,
                                                                              max_size=2)),
    max_leaves=4,
)


SECTIONS = sorted({k.section for k in KEYS})
STRINGS = st.sampled_from(["", "0", "1G", "0755", "999", "root", "nobody", "no-such-group-xyz", "auto", "debug",
                           "/tmp/x", "relative", "-1", "any", "none", "low", "127.0.0.1:1", "localhost"])


def _typed(key: Key) -> st.SearchStrategy[Any]:
    """Values of the key's own type, on and just beyond its bounds: these get past the type checks to the range
    checks and to the checks between keys."""
    if key.kind in ("int", "float") and key.minimum is not None and key.maximum is not None:
        edges = st.sampled_from([key.minimum - 1, key.minimum, key.maximum, key.maximum + 1]).map(
            int if key.kind == "int" else float)
        inside = (st.integers(int(key.minimum), int(key.maximum)) if key.kind == "int"
                  else st.floats(key.minimum, key.maximum))
        return st.one_of(edges, inside)
    if key.kind == "size":
        return st.sampled_from(["0", "4095", "4K", "1G", "-1", "1Q", 0, 4096])
    if key.kind == "bool":
        return st.booleans()
    if key.kind == "names":
        return st.lists(st.sampled_from(["make", "sh", "", "a/b"]), max_size=3)
    return STRINGS


def _one_in_ten(rare: st.SearchStrategy[Any], usual: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.integers(0, 9).flatmap(lambda i: rare if i == 0 else usual)


def _table(section: str) -> st.SearchStrategy[tuple[str, dict[str, Any]]]:
    """(section, table): mostly keys of that section with values of their type (an unknown key is reported
    before any value is looked at, so one in ten only)."""
    keys = [k for k in KEYS if k.section == section]
    unknown = st.tuples(st.text(max_size=8), toml_values)
    entry = _one_in_ten(unknown, st.sampled_from(keys).flatmap(
        lambda k: st.tuples(st.just(k.name), _one_in_ten(toml_values, _typed(k))))) if keys else unknown
    return st.tuples(st.just(section), st.lists(entry, max_size=3).map(dict))


config_overrides = st.lists(
    _one_in_ten(st.just("nosuch"), st.sampled_from(SECTIONS)).flatmap(_table), max_size=3,
    unique_by=lambda table: table[0],
).map(dict)


def _error(overrides: dict[str, dict[str, Any]]) -> str | None:
    """load_config's error for these overrides, or None when they load."""
    try:
        load_config(None, overrides)
    except ConfigError as exc:
        return str(exc)
    return None


def _names_wrong_key(message: str, overrides: dict[str, dict[str, Any]]) -> bool:
    """Whether `message` blames what is really wrong in `overrides` (checked one or two entries at a time):
    - "[S]: ..." - section S was given and is wrong by itself (unknown, or not a table);
    - "[S] K: ..." - key K was given and its value is wrong by itself (unknown key, bad type, out of range);
    - "[S] K: ... N ..." - K (given, or at its default) conflicts with a key N that was given: the two together
      fail with this message, K alone does not, and the message names N."""
    for section, table in overrides.items():
        if message.startswith(f"[{section}]:") and _error({section: table}) == message:
            return True
    given = [(section, name, raw) for section, table in overrides.items() for name, raw in table.items()]
    for section, name in {(s, n) for s, n, _ in given} | {(k.section, k.name) for k in KEYS}:
        prefix = f"[{section}] {name}:"
        if not message.startswith(prefix):
            continue
        own = {section: {name: overrides[section][name]}} if name in overrides.get(section, {}) else {}
        if own and (_error(own) or "").startswith(prefix):
            return True
        for other_section, other, raw in given:
            if (other_section, other) == (section, name) or other not in message[len(prefix):]:
                continue
            pair: dict[str, dict[str, Any]] = {other_section: {other: raw}}
            pair.setdefault(section, {}).update(own.get(section, {}))
            if (_error(pair) or "").startswith(prefix):
                return True
    return False


@settings(max_examples=1000, deadline=None)
@given(overrides=config_overrides)
def test_fuzzed_config_loads_or_names_the_key(overrides: dict[str, dict[str, Any]]) -> None:
    """Any values for any keys: a valid configuration, or a ConfigError that names the key (or section) at
    fault - not just any key."""
    overrides = {section: {k: v for k, v in table.items() if v is not None} for section, table in overrides.items()}
    message = _error(overrides)
    assert message is None or _names_wrong_key(message, overrides), (message, overrides)


TIMEOUT_CONFLICT = "[limits] default_timeout_seconds: larger than max_timeout_seconds"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"limits": {"max_timeout_seconds": 10.0}}, TIMEOUT_CONFLICT),
        ({"limits": {"max_pids": 8, "cpu_weight_normal": 5}}, "[limits] default_pids_max: larger than max_pids"),
        ({"limits": {"max_timeout_seconds": 10.0}, "capture": {"timeout_seconds": 20.0}}, TIMEOUT_CONFLICT),
    ],
)
def test_conflicts_name_both_keys(overrides: dict[str, dict[str, Any]], message: str) -> None:
    assert _error(overrides) == message
    assert _names_wrong_key(message, overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"limits": {"cpu_weight_normal": 0, "max_pids": 10}}, "[limits] max_pids: must be >= 1, got 0"),
        ({"limits": {"cpu_weight_normal": 0, "max_pids": 10000}}, "[limits] default_pids_max: larger than max_pids"),
        ({"limits": {"cpu_weight_normal": 5, "memory_class_low": "lots"}}, "[limits] cpu_weight_normal: must be >= 1"),
        ({"limits": {"max_pids": 10}}, TIMEOUT_CONFLICT),
        ({"api": {"admin_group": "root"}, "nope": {}}, "[api] admin_group: no such group 'root'"),
        ({"api": {"admin_group": "root"}, "nope": {}}, "[capture]: unknown section"),
    ],
)
def test_the_fuzz_oracle_rejects_a_wrong_key(overrides: dict[str, dict[str, Any]], message: str) -> None:
    """The check above is not satisfied by an error that names some other (valid, given or known) key."""
    assert not _names_wrong_key(message, overrides)
