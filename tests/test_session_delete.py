"""DeleteSession racing other requests: calls cannot be born in a session being deleted, and a second delete
waits for the first and answers as it does. Real daemon, real cgroups."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import grpc
from support import Daemon, create_session

from agentd.api.gen import agentd_pb2 as pb
from agentd.client import Client


@contextlib.contextmanager
def sleeping_call(admin: Client, sid: str) -> Iterator[tuple[str, int]]:
    begun = admin.begin(pb.Intent(tool="sleep", argv=["sleep", "60"]), sid)
    pid = admin.spawn(begun, ["sleep", "60"])
    try:
        yield begun.call_id, pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def test_two_concurrent_deletes_answer_alike(daemon: Daemon) -> None:
    with daemon.admin() as admin:
        for attempt in range(5):
            sid, _ = create_session(admin, f"twice-{attempt}")
            with sleeping_call(admin, sid):
                request = pb.DeleteSessionRequest(session_id=sid, force=True)
                first = admin.admin.DeleteSession.future(request, timeout=30)
                second = admin.admin.DeleteSession.future(request, timeout=30)
                answers = []
                for future in (first, second):
                    try:
                        answers.append(("OK", [r.call_id for r in future.result().finished]))
                    except grpc.RpcError as exc:
                        answers.append((exc.code().name, exc.details()))
            assert answers[0][0] == "OK", answers
            assert answers[1] == answers[0] or answers[1][0] == "NOT_FOUND", answers
            assert not daemon.session_path(sid).exists()


def test_no_call_is_born_in_a_session_being_deleted(daemon: Daemon) -> None:
    with daemon.admin() as admin:
        for attempt in range(5):
            sid, _ = create_session(admin, f"dying-{attempt}")
            with sleeping_call(admin, sid) as (sleeper, _pid):
                deleting = admin.admin.DeleteSession.future(
                    pb.DeleteSessionRequest(session_id=sid, force=True), timeout=30)
                begins = [admin.admin.BeginToolCall.future(
                    pb.BeginToolCallRequest(session_id=sid, intent=pb.Intent(tool="t", argv=["t"])), timeout=30)
                    for _ in range(3)]
                deleted = deleting.result()  # the delete itself never fails because of the begins
                begun_before = set()
                for begin in begins:
                    try:
                        begun_before.add(begin.result().call_id)  # begun before the delete started
                    except grpc.RpcError as exc:
                        assert exc.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND), exc
                cancelled = {r.call_id for r in deleted.finished}
                assert sleeper in cancelled and cancelled - {sleeper} == begun_before
            assert not daemon.session_path(sid).exists()
