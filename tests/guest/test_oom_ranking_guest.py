"""When the kernel must OOM-kill above the tool calls (here: sessions/ runs out), it takes the LOW session's call,
not the larger HIGH one, because agentd ranked their processes (oom_score_adj)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support import Daemon, create_session, wait_for

from agentd.api.gen import agentd_pb2 as pb

pytestmark = pytest.mark.guest
MIB = 1 << 20
HOLD = "import sys, time; b = b'x' * ({mib} << 20); open(sys.argv[1], 'w').write('held'); time.sleep(60)"


def test_an_ancestor_oom_takes_the_low_call_not_the_larger_high_one(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    """The kernel's own choice (the memory policy off: with it, the LOW call is killed by the policy first)."""
    daemon = daemon_factory(policy={"enabled": False}).start()
    sessions = daemon.cgroup_root / "sessions"
    with daemon.admin() as admin:
        high, _ = create_session(admin, "rank-high", priority=pb.PRIORITY_HIGH)
        low, _ = create_session(admin, "rank-low", priority=pb.PRIORITY_LOW)
        (sessions / "memory.max").write_text(str(400 * MIB))
        pids: list[int] = []
        try:
            ready = f"{tmp_path}/high-ready"
            big = admin.begin(pb.Intent(tool="big", argv=["big"]), high)
            pids.append(admin.spawn(big, [sys.executable, "-c", HOLD.format(mib=220), ready]))
            wait_for(lambda: os.path.exists(ready), timeout=120)
            small = admin.begin(pb.Intent(tool="small", argv=["small"]), low)
            pids.append(admin.spawn(small, [sys.executable, "-c", HOLD.format(mib=200), f"{tmp_path}/low"]))
            low_result = admin.wait(small.call_id, timeout=120)
            assert low_result.outcome == pb.OUTCOME_OOM_KILLED, low_result
            time.sleep(1)
            info = admin.call("GetToolCall", pb.ToolCallRequest(call_id=big.call_id))
            assert info.state == pb.CALL_STATE_RUNNING  # the HIGH call was not the victim
        finally:
            (sessions / "memory.max").write_text("max")
            for sid in (high, low):
                admin.call("DeleteSession", pb.DeleteSessionRequest(session_id=sid, force=True))
            for pid in pids:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)


def test_high_sessions_working_sets_are_protected_by_default(daemon: Daemon) -> None:
    with daemon.admin() as admin:
        high, _ = create_session(admin, "protected-high", priority=pb.PRIORITY_HIGH)
        normal, _ = create_session(admin, "protected-normal", priority=pb.PRIORITY_NORMAL)
        try:
            assert (daemon.session_path(high) / "memory.low").read_text().strip() == "max"
            assert (daemon.session_path(normal) / "memory.low").read_text().strip() == "0"
        finally:
            for sid in (high, normal):
                admin.call("DeleteSession", pb.DeleteSessionRequest(session_id=sid, force=True))
