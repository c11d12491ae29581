"""The systemd unit passes `systemd-analyze verify`.

`systemd-analyze verify` exits 0 after many problems it only warns about ("Failed to parse service type,
ignoring"), so the test requires both exit status 0 and no output besides the warnings listed in TOLERATED,
each with the reason it is expected. The development hosts run systemd 252 (Debian 12) without systemd as
PID 1; `verify` works there without a running manager and prints nothing else for a sound unit.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from support import REPO

# systemd learned DelegateSubgroup= in version 254; older versions warn about the key and ignore it, which the
# unit allows for (the comment above the key: agentd then moves itself into supervisor/).
DELEGATE_SUBGROUP_SINCE = 254
# Warnings verify may print for the shipped unit: (regular expression for the whole line, {unit} standing for the
# unit file's path; the systemd version from which on the warning is no longer tolerated).
TOLERATED: tuple[tuple[str, int], ...] = (
    (r"{unit}:\d+: Unknown key 'DelegateSubgroup' in section \[Service\], ignoring\.", DELEGATE_SUBGROUP_SINCE),
)


def systemd_version(analyze: str) -> int:
    """The major version from `systemd-analyze --version` ("systemd 252 (252.39-1~deb12u2)")."""
    first = subprocess.run([analyze, "--version"], capture_output=True, text=True, timeout=60).stdout
    match = re.match(r"systemd (\d+)", first)
    assert match, f"unexpected systemd-analyze --version output: {first!r}"
    return int(match.group(1))


def verify(analyze: str, unit_text: str, directory: Path) -> tuple[int, list[str]]:
    """Run `systemd-analyze verify` on unit_text installed as directory/agentd.service, with ExecStart= pointing
    at an existing executable; its exit status and every output line that is not a tolerated warning."""
    directory.mkdir(parents=True, exist_ok=True)
    unit = directory / "agentd.service"
    unit.write_text(unit_text.replace("/usr/local/bin/agentd", sys.executable))
    run = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    version = systemd_version(analyze)
    tolerated = [re.compile(pattern.format(unit=re.escape(str(unit)))) for pattern, before in TOLERATED
                 if version < before]
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    return run.returncode, [line for line in lines if not any(t.fullmatch(line) for t in tolerated)]


@pytest.fixture
def analyze() -> str:
    found = shutil.which("systemd-analyze")
    assert found, "systemd-analyze is installed by `make setup` (package systemd)"
    return found


def test_systemd_unit_verifies(analyze: str, tmp_path: Path) -> None:
    unit = (REPO / "systemd" / "agentd.service").read_text()
    assert "Type=notify" in unit and "Delegate=yes" in unit and "KillMode=process" in unit
    status, problems = verify(analyze, unit, tmp_path)
    assert (status, problems) == (0, [])


def _replace(old: str, new: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        assert old in text, f"{old!r} is not in the unit any more: update this test"
        return text.replace(old, new, 1)
    return edit


# Damage that verify reports: some make it fail, some only make it warn (and exit 0).
BROKEN_UNITS = {
    "bad Type= (warning, exit 0)": _replace("Type=notify", "Type=notifyy"),
    "bad KillMode= (warning, exit 0)": _replace("KillMode=process", "KillMode=proces"),
    "misspelt key (warning, exit 0)": _replace("Delegate=yes", "Delegat=yes"),
    "misspelt section (exit 1)": _replace("[Service]", "[Servce]"),
    "ExecStart= not executable (exit 1)": _replace("ExecStart=/usr/local/bin/agentd", "ExecStart=/nonexistent/agentd"),
    "second ExecStart= (exit 1)": _replace("Restart=on-failure", "Restart=on-failure\nExecStart=/bin/true"),
    # Only the one DelegateSubgroup warning is tolerated, not any line that mentions the word.
    "not executable, named like the tolerated key (exit 1)": _replace(
        "ExecStart=/usr/local/bin/agentd", "ExecStart=/nonexistent/DelegateSubgroup"),
}


@pytest.mark.parametrize("damage", BROKEN_UNITS.values(), ids=BROKEN_UNITS.keys())
def test_verify_check_catches_a_broken_unit(analyze: str, tmp_path: Path, damage: Callable[[str], str]) -> None:
    """The check above fails on a damaged copy of the unit: whether verify exits 1 or only warns."""
    status, problems = verify(analyze, damage((REPO / "systemd" / "agentd.service").read_text()), tmp_path)
    assert problems, f"verify exited {status} and printed nothing but tolerated warnings"
