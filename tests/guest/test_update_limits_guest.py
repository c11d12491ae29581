"""UpdateToolCall on a kernel with the memory and cpu controllers: a refused update leaves every knob as it was;
an accepted one writes them all."""

from __future__ import annotations

import os

import grpc
import pytest
from support import Daemon, rpc_error

from agentd.api.gen import agentd_pb2 as pb

pytestmark = pytest.mark.guest
MIB = 1 << 20
KNOBS = ("memory.high", "memory.max", "cpu.max", "pids.max")


def test_a_refused_update_changes_no_knob_and_an_accepted_one_all(daemon: Daemon, session: tuple[str, str]) -> None:
    sid, _ = session
    with daemon.admin() as admin:
        begun = admin.begin(pb.Intent(tool="sleep", argv=["sleep", "60"], expected_memory_bytes=100 * MIB,
                                      memory_max_bytes=200 * MIB), sid)
        pid = admin.spawn(begun, ["sleep", "60"])
        path = daemon.session_path(sid) / f"tc-{begun.call_id}"

        def knobs() -> dict[str, str]:
            return {name: (path / name).read_text().strip() for name in KNOBS}

        try:
            before = knobs()
            err = rpc_error(admin.call, "UpdateToolCall", pb.UpdateToolCallRequest(
                call_id=begun.call_id, memory_high_bytes=50 * MIB, cpu_max_millicores=5))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
            assert knobs() == before
            admin.call("UpdateToolCall", pb.UpdateToolCallRequest(
                call_id=begun.call_id, memory_high_bytes=50 * MIB, memory_max_bytes=150 * MIB,
                cpu_max_millicores=500, pids_max=40))
            assert knobs() == {"memory.high": str(50 * MIB), "memory.max": str(150 * MIB),
                               "cpu.max": "50000 100000", "pids.max": "40"}
        finally:
            admin.end(begun.call_id, None)
            os.waitpid(pid, 0)
