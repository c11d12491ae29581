"""Tool-call processes get their session's oom_score_adj before they exec (children inherit it), so that an OOM
kill above the calls takes lower priorities first. Host: the values; guest: the kernel's choice."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import Daemon, create_session

from agentd.api.gen import agentd_pb2 as pb


@pytest.mark.parametrize(("priority", "expected"), [
    (pb.PRIORITY_HIGH, 0), (pb.PRIORITY_NORMAL, 400), (pb.PRIORITY_LOW, 800)])
def test_tool_calls_inherit_their_sessions_oom_score_adj(
    daemon: Daemon, tmp_path: Path, priority: int, expected: int
) -> None:
    out = tmp_path / "adj"
    with daemon.admin() as admin:
        sid, _ = create_session(admin, priority=priority)
        try:
            # The child of the tool reads its own value: inherited through exec and fork.
            done = admin.run(["sh", "-c", f"sh -c 'cat /proc/self/oom_score_adj' > {out}"], sid)
            assert done.ok
            assert int(out.read_text()) == expected
        finally:
            admin.call("DeleteSession", pb.DeleteSessionRequest(session_id=sid, force=True))
