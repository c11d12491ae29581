"""The systemd unit verifies, and the shipped files are where the docs say."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from support import REPO


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is installed by `make setup` (package systemd)"
    unit = (REPO / "systemd" / "agentd.service").read_text()
    assert "Type=notify" in unit and "Delegate=yes" in unit and "KillMode=process" in unit
    local = tmp_path / "agentd.service"
    local.write_text(unit.replace("/usr/local/bin/agentd", sys.executable))
    run = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True, timeout=60)
    problems = [line for line in run.stderr.splitlines()
                if line.strip() and "DelegateSubgroup" not in line and "agentd.service" in line]
    assert run.returncode == 0 or not problems, run.stderr
    assert not problems, problems
