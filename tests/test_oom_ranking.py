"""Tool-call processes get their session's oom_score_adj before they exec (children inherit it), so that an OOM
kill above the calls takes lower priorities first. Host: the values; guest: the kernel's choice."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from support import Daemon, create_session

from agentd.api.gen import agentd_pb2 as pb
from agentd.core.config import load_config
from agentd.core.sessions import Priority, Session, SessionSpec


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


def test_high_sessions_protect_their_working_set_unless_told_otherwise() -> None:
    config = load_config(None)
    def knobs(**spec: int) -> dict[str, str]:
        return Session(SessionSpec(id="s", **spec), Path("/cg/s"), "0" * 64, 0.0).knobs(config)
    assert knobs(priority=Priority.HIGH)["memory.low"] == "max"
    assert knobs(priority=Priority.HIGH, memory_protected=64 << 20)["memory.low"] == str(64 << 20)
    assert knobs(priority=Priority.NORMAL)["memory.low"] == "0"
    small = replace(config, default_memory_protected_high=32 << 20)
    assert Session(SessionSpec(id="s", priority=Priority.HIGH), Path("/cg/s"), "0" * 64, 0.0).knobs(small)[
        "memory.low"] == str(32 << 20)
