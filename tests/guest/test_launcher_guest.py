"""agentd-run where memory limits are enforced (testbed guest): an OOM-killed call exits 137 with its feedback."""

from __future__ import annotations

import subprocess
import sys

import pytest
from launcher_support import built_launcher, finished, run_in_session
from support import SLOW, Daemon

from agentd.api.gen import agentd_pb2 as pb

pytestmark = pytest.mark.guest

ALLOC_256_MIB = "b = b'x' * (256 << 20)"


def test_launcher_prints_oom_feedback_and_exits_137(daemon: Daemon, session: tuple[str, str]) -> None:
    built_launcher()
    sid, token = session
    args = ["--memory", "32M", "--memory-max", "64M", "--", sys.executable, "-c", ALLOC_256_MIB]
    status, _, err = finished(run_in_session(daemon, sid, token, args, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE), timeout=300 * SLOW)
    assert status == 137, err
    assert " OOM_KILLED (peak memory " in err and "memory.max" in err
    with daemon.sandbox(token) as sandbox:
        result = sandbox.call("ListToolCalls", pb.ListToolCallsRequest(limit=1)).finished[0]
    assert result.outcome == pb.OUTCOME_OOM_KILLED and result.exit_signal == 9
    assert result.feedback in err
