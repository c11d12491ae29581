"""BEGIN/END on the join socket (the framed protocol): fuzzed framing against a real daemon (a clear error, the
daemon alive, nothing created), the SDK's fast path, authorization, and the per-owner quotas holding for BEGIN."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import Daemon, call_cgroups, spawn_in

from agentd.api import join
from agentd.api.gen import agentd_pb2 as pb
from agentd.joinclient import Framed, JoinError

HEADER = struct.Struct(">IB")
CODES = {"INVALID_ARGUMENT", "FAILED_PRECONDITION", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "NOT_FOUND",
         "UNIMPLEMENTED", "INTERNAL"}


def frame(kind: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload) + 1, kind) + payload


def hello(version: int = 1, token: str = "") -> bytes:
    return frame(join.HELLO, pb.JoinHello(version=version, session_token=token).SerializeToString())


def exchange(path: Path, data: bytes, fd: int | None = None) -> tuple[list[tuple[int, bytes]], bool]:
    """Send `data` (with `fd` attached), stop sending, read until agentd closes or goes quiet: the frames it
    answered with, and whether it closed the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        try:
            if fd is None:
                sock.sendall(data)
            else:
                socket.send_fds(sock, [data], [fd])
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # closed by agentd already
            pass
        received, closed = b"", False
        sock.settimeout(2)
        try:
            while chunk := sock.recv(65536):
                received += chunk
            closed = True
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            pass
    frames, rest = join.split_frames(received)
    assert rest == b"", received
    return frames, closed


def errors_of(frames: list[tuple[int, bytes]]) -> list[pb.JoinError]:
    found = []
    for kind, payload in frames:
        assert kind == join.ERROR, kind
        error = pb.JoinError.FromString(payload)
        assert error.code in CODES and 0 < len(error.message) <= 1024, error
        found.append(error)
    return found


@pytest.fixture(scope="module")
def live_pidfd() -> Iterator[int]:
    """The pidfd of a process outside every session (the test's own child)."""
    child = subprocess.Popen(["sleep", "600"])
    fd = os.pidfd_open(child.pid)
    try:
        yield fd
    finally:
        os.close(fd)
        child.kill()
        child.wait()


def _nothing_created(daemon: Daemon, sid: str) -> None:
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert not call_cgroups(daemon.session_path(sid))
    with daemon.admin() as admin:
        assert not admin.call("ListToolCalls", pb.ListToolCallsRequest(include_active=True)).active


def test_wrong_version_is_a_clear_error(daemon: Daemon, session: tuple[str, str]) -> None:
    sid, token = session
    frames, closed = exchange(daemon.join_socket, hello(version=2, token=token))
    [error] = errors_of(frames)
    assert closed and error.code == "FAILED_PRECONDITION"
    assert error.message == "join protocol version 2 is not supported (this agentd speaks version 1)"
    _nothing_created(daemon, sid)


@pytest.mark.parametrize(
    ("data", "code", "closes", "says"),
    [
        (HEADER.pack(join.MAX_FRAME + 1, join.HELLO), "INVALID_ARGUMENT", True, "a frame of 65537 bytes"),
        (b"\0\0\0\0", "INVALID_ARGUMENT", True, "a frame of 0 bytes"),
        (frame(join.BEGIN, b""), "FAILED_PRECONDITION", True, "the first frame must be HELLO"),
        (frame(join.HELLO, b"\xff\xff"), "INVALID_ARGUMENT", True, "HELLO: not a JoinHello"),
        (hello() + frame(9, b"x"), "INVALID_ARGUMENT", True, "unknown frame kind 9"),
        (hello() + hello(), "INVALID_ARGUMENT", True, "a second HELLO"),
        (hello() + frame(join.BEGIN, b"\x12\x03\x0a\x01\xff"), "INVALID_ARGUMENT", False,
         "BEGIN: BeginToolCallRequest.intent.tool: not valid UTF-8"),
        (hello() + frame(join.BEGIN, pb.BeginToolCallRequest().SerializeToString()), "INVALID_ARGUMENT", False,
         "BEGIN needs the pidfd"),
        (hello() + frame(join.END, pb.EndToolCallRequest(call_id="x").SerializeToString()), "PERMISSION_DENIED",
         False, "END is accepted only on the connection that placed the call"),
    ],
)
def test_framing_errors_are_answered(
    daemon: Daemon, session: tuple[str, str], data: bytes, code: str, closes: bool, says: str
) -> None:
    sid, _ = session
    frames, closed = exchange(daemon.join_socket, data)
    [error] = errors_of(frames)
    assert error.code == code and says in error.message, error
    if closes:
        assert closed
    _nothing_created(daemon, sid)


def test_a_bad_request_leaves_the_connection_usable(daemon: Daemon, session: tuple[str, str], live_pidfd: int) -> None:
    sid, token = session
    bad = frame(join.BEGIN, b"\x12\x03\x0a\x01\xff")
    good = frame(join.BEGIN, pb.BeginToolCallRequest(intent=pb.Intent(tool="t")).SerializeToString())
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(daemon.join_socket))
        sock.sendall(hello(token=token) + bad)
        first = errors_of(join.split_frames(sock.recv(4096))[0])
        socket.send_fds(sock, [good], [live_pidfd])
        second = errors_of(join.split_frames(sock.recv(4096))[0])
    assert [e.code for e in first] == ["INVALID_ARGUMENT"]
    # The second BEGIN was handled: this test's process is outside the session, so it cannot be placed.
    assert [(e.code, e.placement_refused) for e in second] == [("PERMISSION_DENIED", True)]
    _nothing_created(daemon, sid)


def test_begins_sent_before_the_first_is_answered_keep_their_descriptors(
    daemon: Daemon, session: tuple[str, str], live_pidfd: int
) -> None:
    """Frames that come while a BEGIN is handled wait in the socket, each with its pidfd, and are answered in order."""
    sid, token = session
    begin = frame(join.BEGIN, pb.BeginToolCallRequest(intent=pb.Intent(tool="t")).SerializeToString())
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(daemon.join_socket))
        sock.sendall(hello(token=token))
        for _ in range(3):
            socket.send_fds(sock, [begin], [live_pidfd])
        received: list[tuple[int, bytes]] = []
        rest = b""
        while len(received) < 3:
            chunk = sock.recv(4096)
            assert chunk, "closed before three answers"
            frames, rest = join.split_frames(rest + chunk)
            received += frames
    # Each BEGIN had its pidfd (without one: INVALID_ARGUMENT); this test's process is outside the session.
    assert [(e.code, e.placement_refused) for e in errors_of(received)] == [("PERMISSION_DENIED", True)] * 3
    _nothing_created(daemon, sid)


def test_a_descriptor_not_alone_with_the_end_of_a_begin_closes_the_connection(
    daemon: Daemon, session: tuple[str, str], live_pidfd: int
) -> None:
    sid, token = session
    begin = frame(join.BEGIN, pb.BeginToolCallRequest(intent=pb.Intent(tool="t")).SerializeToString())
    for data in (hello(token=token) + begin + begin, hello(token=token) + begin[:-1], hello(token=token)):
        assert exchange(daemon.join_socket, data, live_pidfd) == ([], True)
    _nothing_created(daemon, sid)


frames_strategy = st.lists(
    st.one_of(
        st.builds(frame, st.sampled_from([join.HELLO, join.BEGIN, join.END, 0, 7, 255]), st.binary(max_size=64)),
        st.builds(lambda token, version: hello(version, token), st.text(max_size=40), st.integers(0, 3)),
        st.binary(max_size=24),  # anything at all, including truncated and oversized headers
    ),
    max_size=5,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=frames_strategy, cut=st.integers(0, 8), attach=st.booleans())
def test_fuzzed_frames_get_clear_errors_and_create_nothing(
    daemon: Daemon, session: tuple[str, str], live_pidfd: int, parts: list[bytes], cut: int, attach: bool
) -> None:
    sid, token = session
    data = hello(token=token) + b"".join(parts) if parts and parts[0][:1] == b"\0" else b"\0" + b"".join(parts)
    data = data[: max(1, len(data) - cut)]  # truncated
    frames, _ = exchange(daemon.join_socket, data, live_pidfd if attach else None)
    errors_of(frames)  # only well-formed ERROR frames: nothing from outside the session was placed
    _nothing_created(daemon, sid)


def test_sdk_fast_path_and_grpc_give_the_same_result(daemon: Daemon, session: tuple[str, str]) -> None:
    sid, token = session
    code = (
        "import os\n"
        "from agentd.client import Client\n"
        "for transport in ('join', 'grpc'):\n"
        "    client = Client(os.environ['AGENTD_SOCKET'], os.environ['AGENTD_SESSION_TOKEN'], transport=transport,\n"
        "                    join_socket=os.environ['AGENTD_JOIN_SOCKET'])\n"
        "    outcome = client.run(['sh', '-c', 'exit 5'], tool='t', labels={'via': transport})\n"
        "    print(transport, outcome.exit_code, outcome.result.exit_code, outcome.result.outcome,\n"
        "          bool(client._framed_calls or client._framed), outcome.result.session_id)\n"
    )
    env = daemon.env(token) | {"AGENTD_JOIN_SOCKET": str(daemon.join_socket)}
    agent = spawn_in(daemon.session_path(sid) / "agent", [sys.executable, "-c", code], env=env,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = agent.communicate(timeout=60)
    assert agent.returncode == 0, err
    assert out.decode().splitlines() == [f"join 5 5 {pb.OUTCOME_FAILED} True {sid}",
                                         f"grpc 5 5 {pb.OUTCOME_FAILED} False {sid}"]


def test_framed_client_reports_agentd_errors(daemon: Daemon, live_pidfd: int) -> None:
    framed = Framed(str(daemon.join_socket), "not-a-token")
    try:
        with pytest.raises(JoinError) as refused:
            framed.begin(pb.BeginToolCallRequest(intent=pb.Intent(tool="t")), live_pidfd)
        assert (refused.value.code, refused.value.placement_refused) == ("PERMISSION_DENIED", False)
    finally:
        framed.close()


# ----- quotas: BEGIN counts as a HOLD while it is handled (in-process, a beginner that waits) ------------------


def test_begins_count_against_the_owners_hold_quota_and_other_owners_are_unaffected(
    tmp_path: Path, live_pidfd: int
) -> None:
    path = tmp_path / "join.sock"
    owners = iter(["session:a"] * (join.MAX_HELD_PER_OWNER + 1) + ["session:b"])
    release = asyncio.Event()

    async def beginner(request: pb.BeginToolCallRequest, token: str, sender: int, pidfd: int,
                       placed: object) -> pb.BeginToolCallResponse:
        await release.wait()
        return pb.BeginToolCallResponse(call_id="tc")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = join.JoinServer(loop, path, lambda *a: "tc", _never, lambda: None, 256,
                                 lambda pid, uid: next(owners), beginner)
        data = hello(token="t") + frame(join.BEGIN, pb.BeginToolCallRequest().SerializeToString())
        socks = []
        try:
            for _ in range(join.MAX_HELD_PER_OWNER + 2):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(str(path))
                sock.setblocking(False)
                socks.append(sock)
                await asyncio.sleep(0.01)  # accepted (and its owner taken) in this order
                socket.send_fds(sock, [data], [live_pidfd])
                await asyncio.sleep(0.01)
            assert server.usage["session:a"].held == join.MAX_HELD_PER_OWNER
            over = await asyncio.wait_for(loop.sock_recv(socks[join.MAX_HELD_PER_OWNER], 4096), 5)
            [(kind, payload)], _ = join.split_frames(over)
            error = pb.JoinError.FromString(payload)
            assert kind == join.ERROR and error.code == "RESOURCE_EXHAUSTED"
            assert f"unclaimed HOLDs from session:a (at most {join.MAX_HELD_PER_OWNER})" in error.message
            assert server.usage["session:b"].held == 1  # the other owner's BEGIN is being handled
            release.set()
            for sock in (*socks[: join.MAX_HELD_PER_OWNER], socks[-1]):
                answer = await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)
                [(kind, payload)], _ = join.split_frames(answer)
                assert kind == join.BEGUN and pb.BeginToolCallResponse.FromString(payload).call_id == "tc"
            await asyncio.sleep(0.01)
            assert all(usage.held == 0 for usage in server.usage.values())
        finally:
            for sock in socks:
                sock.close()
            server.close()

    gc.collect()  # sockets earlier tests left to the collector
    before = len(os.listdir("/proc/self/fd"))
    asyncio.run(main())
    assert len(os.listdir("/proc/self/fd")) == before


async def _never(call_id: str, wait_status: int | None) -> pb.ToolCallResult:
    raise AssertionError("no END here")
