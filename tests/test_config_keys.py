"""The configuration declared once: documented defaults, the effective configuration (describe), and sizes that
derived limits can rely on."""

from __future__ import annotations

import json
import re
from typing import Any

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import REPO

from agentd.core.config import KEYS, ConfigError, default_toml, describe, load_config


def test_documented_block_is_the_printed_defaults() -> None:
    """docs/configuration.md shows exactly what `agentd --print-config` prints."""
    docs = (REPO / "docs" / "configuration.md").read_text()
    block = re.search(r"```toml\n(.*?)```", docs, re.DOTALL)
    assert block is not None
    assert block.group(1) == default_toml()


def test_describe_is_the_effective_configuration() -> None:
    """Every key once, JSON-friendly, with host-derived values resolved (not the 0 of the file)."""
    described = describe(load_config(None, {"api": {"admin_socket_mode": "0640"}}))
    assert list(described) == [f"{key.section}.{key.name}" for key in KEYS]
    assert json.loads(json.dumps(described)) == described
    assert described["limits.memory_ceiling"] == psutil.virtual_memory().total
    assert described["limits.max_cpu_millicores"] == (psutil.cpu_count() or 1) * 1000
    assert described["daemon.records_file"] == "/var/lib/agentd/records.jsonl"
    assert described["api.admin_socket_mode"] == "0640"
    assert described["api.admin_group"] == "root"
    assert described["capture.shells"] == ["bash", "dash", "sh", "zsh"]


VALUES: dict[str, st.SearchStrategy[Any]] = {
    "int": st.integers(0, 1 << 22),
    "float": st.floats(0, 1e6),
    "size": st.one_of(st.integers(0, 1 << 44), st.sampled_from(["0", "4K", "512M", "2G", "1.5GiB"])),
    "bool": st.booleans(),
    "names": st.lists(st.sampled_from(["make", "sh", "uv", "go"]), max_size=3),
    "mode": st.sampled_from(["0600", "0640", "0666", "0777"]),
    "group": st.sampled_from(["root", "nogroup"]),
    "path": st.sampled_from(["/run/x.sock", "/var/tmp/agentd"]),
    "level": st.sampled_from(["debug", "info", "warning", "error"]),
    "str": st.sampled_from(["", "auto", "/sys/fs/cgroup/a", "low", "high", "any", "none", "127.0.0.1:1"]),
}


@st.composite
def valid_overrides(draw: st.DrawFn) -> dict[str, dict[str, Any]]:
    """A few keys set to values of their type that load (whatever they are, the config must round-trip)."""
    overrides: dict[str, dict[str, Any]] = {}
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=6, unique=True)):
        candidate = {**overrides, key.section: {**overrides.get(key.section, {}), key.name: draw(VALUES[key.kind])}}
        try:
            load_config(None, candidate)
        except ConfigError:
            continue
        overrides = candidate
    return overrides


@settings(max_examples=200, deadline=None)
@given(overrides=valid_overrides())
def test_described_configuration_loads_back_to_itself(overrides: dict[str, dict[str, Any]]) -> None:
    """describe() is a complete configuration: fed back as the file, it yields the same Config."""
    config = load_config(None, overrides)
    file: dict[str, dict[str, Any]] = {}
    for name, value in describe(config).items():
        section, key = name.split(".")
        file.setdefault(section, {})[key] = value
    assert load_config(None, file) == config


@pytest.mark.parametrize("key", ["memory_class_low", "memory_class_medium", "memory_class_high"])
@pytest.mark.parametrize("size", ["0", "1K", 4095])
def test_memory_class_sizes_are_at_least_a_page(key: str, size: str | int) -> None:
    """A class size of 0 would mean 'no memory.high' for its intents, and memory.max = 0 x ratio = 'no limit'
    (issue 9: limits that make sense): refused at start, naming the key."""
    with pytest.raises(ConfigError, match=rf"^\[limits\] {key}: must be >= 4096"):
        load_config(None, {"limits": {key: size}})
