"""Restart with a large records history: fast (nothing parsed ahead), and every kept record still served."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
from history import session_of, write_history
from support import SLOW, Daemon, create_session, rpc_error

from agentd.api.gen import agentd_pb2 as pb

HISTORY = 100_000  # ~120 MB: .1 full at records_max_bytes, the rest in the current file
MAX_BYTES = 64 << 20
SESSIONS = 16
# Generous: the daemon is ready in ~0.25 s on the development VM with any history (bench/restart.py); before
# the history was indexed it parsed up to 64 MiB per file at start, ~30 s for this one.
START_BOUND_SECONDS = 3.0 * SLOW


def test_restart_with_a_large_history_is_fast_and_serves_old_records(
    daemon_factory: Callable[..., Daemon],
) -> None:
    d = daemon_factory(daemon={"records_max_bytes": MAX_BYTES})
    ids = write_history(d.records, HISTORY, MAX_BYTES, SESSIONS)
    assert d.records.with_name("records.jsonl.1").exists()
    d.start()  # the first start indexes the files (as after an upgrade)
    with d.admin() as admin:
        sid, _ = create_session(admin, "fresh")
        newest = admin.run(["true"], sid).result.call_id
    d.record(newest)
    d.kill9()

    began = time.monotonic()
    d.start()
    started = time.monotonic() - began
    assert started < START_BOUND_SECONDS, f"restart took {started:.2f} s"

    with d.admin() as admin:
        # Served from the files through the index: the oldest (in .1), one in the middle, the newest.
        for index in (0, HISTORY // 2, HISTORY - 1):
            found = admin.wait(ids[index], timeout=1)
            assert (found.call_id, found.session_id) == (ids[index], session_of(index, SESSIONS))
        assert admin.wait(newest, timeout=1).outcome == pb.OUTCOME_OK
        finished = rpc_error(admin.call, "GetToolCall", pb.ToolCallRequest(call_id=ids[1]))
        assert finished.code() == grpc.StatusCode.FAILED_PRECONDITION  # known, and finished
        unknown = rpc_error(admin.call, "GetToolCall", pb.ToolCallRequest(call_id="0" * 16))
        assert unknown.code() == grpc.StatusCode.NOT_FOUND
        listed = admin.call("ListToolCalls", pb.ListToolCallsRequest(session_id=session_of(7, SESSIONS), limit=5))
        assert [r.call_id for r in listed.finished] == [
            ids[i] for i in range(HISTORY - 1, -1, -1) if i % SESSIONS == 7][:5]
        everyone = admin.call("ListToolCalls", pb.ListToolCallsRequest(limit=3)).finished
        assert [r.call_id for r in everyone] == [newest, ids[-1], ids[-2]]
