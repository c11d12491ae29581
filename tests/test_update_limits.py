"""UpdateToolCall is validated like an intent and applied all-or-nothing. Host part: validation through a real
daemon; tests/guest/test_update_limits_guest.py checks the kernel's knobs where the controllers exist."""

from __future__ import annotations

import os

import grpc
from support import Daemon, rpc_error

from agentd.api.gen import agentd_pb2 as pb


def test_update_below_the_cpu_minimum_is_refused_naming_the_field(daemon: Daemon, session: tuple[str, str]) -> None:
    sid, _ = session
    with daemon.admin() as admin:
        begun = admin.begin(pb.Intent(tool="sleep", argv=["sleep", "30"]), sid)
        pid = admin.spawn(begun, ["sleep", "30"])
        try:
            for millicores in (1, 5, 9):
                err = rpc_error(admin.call, "UpdateToolCall", pb.UpdateToolCallRequest(
                    call_id=begun.call_id, memory_high_bytes=64 << 20, cpu_max_millicores=millicores))
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "cpu_max_millicores" in (err.details() or "")
            info = admin.call("GetToolCall", pb.ToolCallRequest(call_id=begun.call_id))
            assert info.limits.memory_high_bytes == begun.limits.memory_high_bytes  # nothing was applied
        finally:
            admin.end(begun.call_id, None)
            os.waitpid(pid, 0)
