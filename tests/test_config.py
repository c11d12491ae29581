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

from agentd.core.config import KEYS, ConfigError, default_toml, load_config


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
section_names = st.sampled_from([*sorted({k.section for k in KEYS}), "nosuch"])
key_names = st.one_of(st.sampled_from([k.name for k in KEYS]), st.text(max_size=8))


@settings(max_examples=1000, deadline=None)
@given(overrides=st.dictionaries(section_names, st.dictionaries(key_names, toml_values, max_size=3), max_size=3))
def test_fuzzed_config_loads_or_names_the_key(overrides: dict[str, dict[str, Any]]) -> None:
    """Any values for any keys: a valid configuration, or ConfigError naming the key (or section) at fault: one
    it was given, or a known key whose value conflicts with one it was given."""
    overrides = {section: {k: v for k, v in table.items() if v is not None} for section, table in overrides.items()}
    try:
        load_config(None, overrides)
    except ConfigError as exc:
        given_keys = [f"[{section}] {name}:" for section, table in overrides.items() for name in table]
        known_keys = [f"[{key.section}] {key.name}:" for key in KEYS]
        sections = [f"[{section}]:" for section in overrides]
        assert any(str(exc).startswith(prefix) for prefix in given_keys + known_keys + sections), str(exc)
