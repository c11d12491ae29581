"""UpdateToolCall on a running call, and the bash -c shim that routes commands through agentctl run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from support import REPO, Daemon, call_cgroups, rpc_error, spawn_in

from agentd.api.gen import agentd_pb2 as pb

SHIM = REPO / "agentd" / "data" / "agentd-shell"


def test_update_running_call(daemon: Daemon, session: tuple[str, str]) -> None:
    sid, token = session
    with daemon.sandbox(token) as sandbox, daemon.admin() as admin:
        begun = admin.begin(pb.Intent(tool="grow", expected_memory_bytes=256 << 20), sid, report_exit=False)
        pid = admin.spawn(begun, ["sleep", "100"])
        update = pb.UpdateToolCallRequest(call_id=begun.call_id, memory_max_bytes=1 << 30, pids_max=64)
        limits = sandbox.call("UpdateToolCall", update)
        assert limits.memory_max_bytes == 1 << 30 and limits.pids_max == 64
        assert limits.memory_high_bytes == 256 << 20
        label = json.loads(os.getxattr(daemon.session_path(sid) / f"tc-{begun.call_id}", "user.agentd.call"))
        assert label["limits"]["memory_max"] == 1 << 30  # survives a restart
        high_over_max = pb.UpdateToolCallRequest(call_id=begun.call_id, memory_high_bytes=2 << 30)
        assert rpc_error(sandbox.call, "UpdateToolCall", high_over_max).details().startswith("memory_high_bytes")
        assert sandbox.end(begun.call_id, None).outcome == pb.OUTCOME_CANCELLED
        os.waitpid(pid, 0)
        gone = rpc_error(sandbox.call, "UpdateToolCall", update)
        assert gone.code().name == "FAILED_PRECONDITION"


def test_shim_runs_bash_c_as_a_tool_call(daemon: Daemon, session: tuple[str, str], tmp_path: Path) -> None:
    sid, token = session
    agentctl = tmp_path / "agentctl"
    agentctl.write_text(f'#!/bin/sh\nexec {sys.executable} -m agentd.cli.agentctl "$@"\n')
    agentctl.chmod(0o755)
    env = daemon.env(token) | {"AGENTCTL": str(agentctl), "AGENTD_MEMORY": "low"}
    proc = spawn_in(daemon.session_path(sid) / "agent",
                    [str(SHIM), "-c", 'echo "$0 $1"; cat /proc/self/cgroup; exit 4', "zero", "one"],
                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 4, err
    text = out.decode()
    assert text.startswith("zero one\n")
    assert f"/sessions/{sid}/tc-" in text
    with daemon.sandbox(token) as sandbox:
        last = sandbox.call("ListToolCalls", pb.ListToolCallsRequest(limit=1)).finished[0]
    assert last.tool == "bash" and last.limits.memory_high_bytes == 256 << 20
    # Without a token (or nested inside a tool call) the shim is plain bash: no new call.
    plain = subprocess.run([str(SHIM), "-c", "cat /proc/self/cgroup"], capture_output=True, text=True,
                           env=daemon.env(), timeout=60)
    assert plain.returncode == 0 and "tc-" not in plain.stdout
    assert not call_cgroups(daemon.session_path(sid))
