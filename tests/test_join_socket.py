"""The join socket's connection handling, in-process on a real Unix socket. (What placement does to processes
and cgroups is tested through the daemon: test_auth, test_lifecycle.)"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import re
import resource
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentd.api import join
from agentd.api.gen import agentd_pb2 as pb
from agentd.api.join import limits, wire
from agentd.core.errors import PermissionDenied, ResourceExhausted


async def _never_ends(call_id: str, wait_status: int | None) -> pb.ToolCallResult:
    raise AssertionError("no END in these tests")


def _by_uid(pid: int, uid: int) -> str:
    return f"uid:{uid}"


def _serve(
    path: Path, body: Callable[[asyncio.AbstractEventLoop], Awaitable[None]], max_connections: int = 64,
    identify: join.Identify = _by_uid,
) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = join.JoinServer(
            loop, path, lambda token, sender, target: f"tc-{token}", _never_ends, lambda: None, max_connections,
            identify,
        )
        try:
            await body(loop)
        finally:
            server.close()

    asyncio.run(main())


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    sock.setblocking(False)
    return sock


@pytest.fixture(scope="module")
def descriptors() -> Iterator[dict[str, int]]:
    """Descriptors a client may attach: a live process's pidfd, an exited one's, something not a pidfd."""
    live = subprocess.Popen(["sleep", "600"])
    gone = subprocess.Popen(["true"])
    fds = {"live": os.pidfd_open(live.pid), "exited": os.pidfd_open(gone.pid)}
    gone.wait()
    fds["pipe"], write_end = os.pipe()
    try:
        yield fds
    finally:
        live.kill()
        live.wait()
        for fd in (*fds.values(), write_end):
            os.close(fd)


def test_idle_connections_are_closed_busy_ones_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "IDLE_TIMEOUT_SECONDS", 0.4)
    path = tmp_path / "join.sock"

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        with _connect(path) as idle, _connect(path) as busy:
            start = loop.time()
            for n in range(8):  # a request every 0.1 s for 0.8 s: twice the idle timeout
                await loop.sock_sendall(busy, f"JOIN {n}\n".encode())
                assert await asyncio.wait_for(loop.sock_recv(busy, 100), 5) == f"OK tc-{n}\n".encode()
                await asyncio.sleep(0.1)
            assert loop.time() - start > 0.8
            assert await asyncio.wait_for(loop.sock_recv(idle, 100), 5) == b""  # closed by agentd
            await loop.sock_sendall(busy, b"JOIN again\n")
            assert await asyncio.wait_for(loop.sock_recv(busy, 100), 5) == b"OK tc-again\n"
            quiet = loop.time()
            assert await asyncio.wait_for(loop.sock_recv(busy, 100), 5) == b""  # closed once it fell quiet
            assert loop.time() - quiet >= 0.35

    _serve(path, body)


def test_framed_connections_with_a_request_in_hand_or_a_call_placed_are_kept_past_the_idle_timeout(
    tmp_path: Path, descriptors: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "IDLE_TIMEOUT_SECONDS", 0.3)
    path = tmp_path / "join.sock"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        admitted = loop.create_future()

        async def beginner(request: pb.BeginToolCallRequest, token: str, sender: int, pidfd: int,
                           placed: Callable[[str], None]) -> pb.BeginToolCallResponse:
            await admitted  # admission makes it wait
            placed("tc-1")
            return pb.BeginToolCallResponse(call_id="tc-1")

        async def ender(call_id: str, wait_status: int | None) -> pb.ToolCallResult:
            return pb.ToolCallResult(call_id=call_id)

        async with _server(path, ender=ender) as server:
            server.beginner = beginner
            with _connect(path) as sock:
                hello = wire.frame(wire.HELLO, pb.JoinHello(version=wire.FRAME_VERSION, session_token="t"))
                begin = wire.frame(wire.BEGIN, pb.BeginToolCallRequest())
                pidfd = array.array("i", [descriptors["live"]])
                sock.sendmsg([hello + begin], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, pidfd)])
                await asyncio.sleep(1.5)  # busy with the BEGIN: kept
                admitted.set_result(None)
                assert _kinds(await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)) == [wire.BEGUN]
                await asyncio.sleep(1.5)  # the call awaits its END here: kept
                end = wire.frame(wire.END, pb.EndToolCallRequest(call_id="tc-1"))
                await loop.sock_sendall(sock, end)
                assert _kinds(await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)) == [wire.RESULT]
                quiet = loop.time()
                assert await _closed_by_agentd(sock)  # nothing in hand any more: closed once it fell quiet
                assert loop.time() - quiet >= 0.25

    asyncio.run(main())


def _kinds(data: bytes) -> list[int]:
    frames, rest = wire.split_frames(data)
    assert not rest
    return [kind for kind, _ in frames]


def test_requests_sent_before_agentd_accepts_are_read_at_accept_and_leave_nothing_behind(tmp_path: Path) -> None:
    """A client's first request is mostly there when agentd accepts it (read then, in the same turn): answered,
    and a connection closed by it (a framing error, an EOF) is counted out at once."""
    path = tmp_path / "join.sock"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with _server(path) as server:
            with _connect(path) as answered, _connect(path) as bad, _connect(path) as gone:
                answered.send(b"JOIN a\n")  # all sent before the loop runs the accept
                bad.send(b"\x00\x00\x00\x00")  # a frame of 0 bytes: a framing error, closed
                gone.shutdown(socket.SHUT_WR)
                assert await asyncio.wait_for(loop.sock_recv(answered, 100), 5) == b"OK tc-a\n"
                assert _kinds(await asyncio.wait_for(loop.sock_recv(bad, 4096), 5)) == [wire.ERROR]
                assert await _closed_by_agentd(bad) and await _closed_by_agentd(gone)
                (connection,) = server.connections
                assert server.usage == {connection.owner: limits.Usage(connections=1)}
            await asyncio.sleep(0.1)
            assert not server.connections and not server.usage

    asyncio.run(main())


def test_connections_beyond_the_cap_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "join.sock"

    async def joined(loop: asyncio.AbstractEventLoop, sock: socket.socket, token: str) -> bytes:
        await loop.sock_sendall(sock, f"JOIN {token}\n".encode())
        return await asyncio.wait_for(loop.sock_recv(sock, 100), 5)

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        first, second, third = _connect(path), _connect(path), _connect(path)
        try:
            for n, sock in enumerate((first, second, third)):
                assert await joined(loop, sock, str(n)) == f"OK tc-{n}\n".encode()
            with _connect(path) as fourth:
                assert await asyncio.wait_for(loop.sock_recv(fourth, 100), 5) == (
                    b"ERR RESOURCE_EXHAUSTED too many join connections\n"
                )
                assert await asyncio.wait_for(loop.sock_recv(fourth, 100), 5) == b""
            first.close()
            await asyncio.sleep(0.05)
            with _connect(path) as again:
                assert await joined(loop, again, "again") == b"OK tc-again\n"
        finally:
            for sock in (first, second, third):
                sock.close()

    _serve(path, body, max_connections=3)


def test_holds_beyond_the_total_cap_close_their_connection(
    tmp_path: Path, descriptors: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "MAX_HELD", 3)
    path = tmp_path / "join.sock"

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        with _connect(path) as first, _connect(path) as second:
            for n, sock in enumerate((first, first, second, second)):
                socket.send_fds(sock, [f"HOLD r{n}\n".encode()], [descriptors["live"]])
                await asyncio.sleep(0.05)
            assert await asyncio.wait_for(loop.sock_recv(second, 100), 5) == b""  # the 4th HOLD in all
            await loop.sock_sendall(first, b"JOIN still-open\n")
            assert await asyncio.wait_for(loop.sock_recv(first, 100), 5) == b"OK tc-still-open\n"

    _serve(path, body)


def test_out_of_descriptors_pauses_accepting_instead_of_spinning(tmp_path: Path) -> None:
    path = tmp_path / "join.sock"

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        fillers: list[int] = []
        waiting = _connect(path)  # accepted only once agentd has a descriptor to spare
        try:
            while not fillers or fillers[-1] < max(int(fd) for fd in os.listdir("/proc/self/fd")) - 1:
                fillers.append(os.open("/dev/null", os.O_RDONLY))  # no free slot left below the new limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (fillers[-1] + 2, hard))
            fillers.append(os.open("/dev/null", os.O_RDONLY))
            await loop.sock_sendall(waiting, b"JOIN w\n")
            cpu = time.process_time()
            await asyncio.sleep(0.5)
            assert time.process_time() - cpu < 0.2  # a listener readable for ever would keep the loop busy
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            for fd in fillers:
                os.close(fd)
        with waiting:
            assert await asyncio.wait_for(loop.sock_recv(waiting, 100), 5) == b"OK tc-w\n"

    _serve(path, body)


VALID_ANSWER = re.compile(rb"(OK \S.*|ERR [A-Z_]+ .*|RESULT [A-Za-z0-9+/=]*)")
words = st.one_of(
    st.sampled_from(["a", "b", "x", "tc-a", "tc-b", "-", ""]),  # JOIN a places tc-a; x is refused
    st.text(st.characters(codec="utf-8", exclude_characters="\n"), max_size=12),
)
statuses = st.one_of(st.integers(-(1 << 70), 1 << 70), st.sampled_from([0, 256, 9, 0x137F, 0xFFFF, 0x10000, -1]))
structured = st.tuples(
    st.sampled_from(["HOLD", "JOIN", "END", "hold", "JOIN\t", "END "]), words,
    st.one_of(st.just(""), words, statuses.map(str)),
).map(lambda parts: " ".join(parts).rstrip(" ").encode())
conversation = st.one_of(  # what a client really says, with any wait status
    st.sampled_from([b"JOIN a", b"JOIN b", b"JOIN x", b"HOLD r1", b"HOLD r2"]),
    st.tuples(st.sampled_from(["tc-a", "tc-b"]), statuses).map(lambda end: f"END {end[0]} {end[1]}".encode()),
)
lines = st.one_of(
    conversation,
    structured,
    st.binary(max_size=40),
    st.binary(min_size=500, max_size=700).filter(lambda b: b"\n" not in b),  # over MAX_LINE
)
attachments = st.sampled_from([None, "live", "exited", "pipe"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(st.tuples(st.lists(lines, min_size=1, max_size=3), attachments), max_size=8)
       .filter(lambda m: not m or not m[0][0][0].startswith(b"\0")))  # NUL first: frames (test_join_begin)
def test_fuzzed_lines_get_a_wellformed_answer_or_a_close(
    tmp_path: Path, descriptors: dict[str, int], messages: list[tuple[list[bytes], str | None]]
) -> None:
    """Whatever a client sends, agentd's join server answers well-formed lines or closes the connection; no
    exception escapes into the event loop, no descriptor stays behind, END passes on only real wait statuses."""
    path = tmp_path / f"fuzz-{len(list(tmp_path.iterdir()))}.sock"
    troubles: list[str] = []

    def placer(token: str, sender: int, target: int | None) -> str:
        if token.startswith("x"):
            raise PermissionDenied("refused")
        return f"tc-{token}"

    async def ender(call_id: str, wait_status: int | None) -> pb.ToolCallResult:
        if wait_status is not None and not (
            0 <= wait_status <= 0xFFFF and (os.WIFEXITED(wait_status) or os.WIFSIGNALED(wait_status))
        ):
            troubles.append(f"END passed on wait status {wait_status}")
        return pb.ToolCallResult(call_id=call_id)

    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: troubles.append(str(context.get("message"))))
        server = join.JoinServer(loop, path, placer, ender, lambda: None, 64, _by_uid)
        try:
            with _connect(path) as client:
                for sent, attached in messages:
                    data = b"".join(line + b"\n" for line in sent)
                    try:
                        if attached is None:
                            await loop.sock_sendall(client, data)
                        else:
                            socket.send_fds(client, [data], [descriptors[attached]])
                        await asyncio.sleep(0)
                    except OSError:  # closed by agentd (a malformed HOLD, a line too long)
                        break
                with contextlib.suppress(OSError):
                    client.shutdown(socket.SHUT_WR)
                received = b""
                with contextlib.suppress(ConnectionResetError):  # closed by agentd with lines unread
                    while chunk := await asyncio.wait_for(loop.sock_recv(client, 65536), 5):
                        received += chunk
            await asyncio.sleep(0.01)  # END answers still on their way are dropped
            assert not server.held
            return received
        finally:
            server.close()

    before = len(os.listdir("/proc/self/fd"))
    received = asyncio.run(main())
    assert len(os.listdir("/proc/self/fd")) == before
    assert not troubles
    for answer in received.split(b"\n")[:-1]:
        assert VALID_ANSWER.fullmatch(answer), answer


# ----- limits: descriptors, owners' quotas, answers to every request ------------------------------------------


@contextlib.asynccontextmanager
async def _server(
    path: Path,
    placer: join.Placer = lambda token, sender, target: f"tc-{token}",
    ender: join.Ender = _never_ends,
    identify: join.Identify = _by_uid,
) -> AsyncIterator[join.JoinServer]:
    server = join.JoinServer(asyncio.get_running_loop(), path, placer, ender, lambda: None, 64, identify)
    try:
        yield server
    finally:
        server.close()


async def _closed_by_agentd(sock: socket.socket) -> bool:
    """Whether agentd closed the connection (without an answer), waiting up to 5 s."""
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.sock_recv(sock, 100), 5) == b""
    except ConnectionResetError:
        return True


async def _ask(sock: socket.socket, line: str) -> bytes:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, line.encode() + b"\n")
    return await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize(
    ("data", "attached"),
    [
        (b"J", ["live"]),  # a descriptor with no complete line: the 510-descriptor pile-up of issue 9
        (b"JOIN a\n", ["live", "live"]),  # two in one message: the second is cut (MSG_CTRUNC)
        (b"END tc-a 0\n", ["live"]),  # a descriptor with a verb that takes none
        (b"JOIN a\nJOIN", ["live"]),  # the line after a complete one is not complete
    ],
)
def test_a_descriptor_not_alone_with_the_end_of_a_hold_or_join_closes_the_connection(
    tmp_path: Path, descriptors: dict[str, int], data: bytes, attached: list[str]
) -> None:
    path = tmp_path / "join.sock"

    async def main() -> None:
        async with _server(path) as server:
            before = _open_fds()
            with _connect(path) as sock:
                socket.send_fds(sock, [data], [descriptors[name] for name in attached])
                assert await _closed_by_agentd(sock)
                assert not server.connections
            assert _open_fds() == before  # agentd's end and the descriptors it received are gone too
            with _connect(path) as fine:  # others are not affected
                assert await _ask(fine, "JOIN b") == b"OK tc-b\n"

    asyncio.run(main())


def test_holds_are_limited_per_owner_and_one_owner_at_its_quota_leaves_others_alone(
    tmp_path: Path, descriptors: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two connections of owner A share its quota of unclaimed HOLDs; the HOLD beyond it closes its connection
    and its BeginToolCall is told at once; owner B holds and places as before."""
    monkeypatch.setattr(limits, "MAX_HELD_PER_OWNER", 3)
    path = tmp_path / "join.sock"
    owner = {"now": "session:a"}

    async def hold(sock: socket.socket, ref: str) -> None:
        socket.send_fds(sock, [f"HOLD {ref}\n".encode()], [descriptors["live"]])
        assert await _ask(sock, "JOIN sync") == b"OK tc-sync\n"  # the HOLD was handled before this answer

    async def main() -> None:
        async with _server(path, identify=lambda pid, uid: owner["now"]) as server:
            a1, a2 = _connect(path), _connect(path)
            with a1, a2:
                await hold(a1, "a0")
                await hold(a1, "a1")
                await hold(a2, "a2")
                socket.send_fds(a2, [b"HOLD a3\n"], [descriptors["live"]])
                assert await _closed_by_agentd(a2)
                assert set(server.held) == {"a0", "a1"}  # a2's HOLD went with its connection
                owner["now"] = "session:b"
                with _connect(path) as b:
                    await hold(b, "b0")
                    await hold(b, "b1")
                    await hold(b, "b2")
                    assert server.usage["session:a"].held == 2 and server.usage["session:b"].held == 3
                    start = time.monotonic()
                    with pytest.raises(join.HoldRefused, match="3 unclaimed HOLDs from session:a"):
                        async with server.take("a3"):
                            pass
                    assert time.monotonic() - start < 1  # not after HOLD_WAIT_SECONDS
                    async with server.take("b0") as (held, pid):
                        assert held.connection.owner == "session:b" and pid > 0
                    assert server.usage["session:b"].held == 2
            await asyncio.sleep(0.05)
            assert not server.held and not server.usage  # everything released with the connections

    asyncio.run(main())


def test_connections_are_limited_per_owner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "MAX_CONNECTIONS_PER_OWNER", 2)
    path = tmp_path / "join.sock"
    owner = {"now": "session:a"}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with _server(path, identify=lambda pid, uid: owner["now"]):
            a1, a2, a3 = _connect(path), _connect(path), _connect(path)
            with a1, a2, a3:
                assert await _ask(a1, "JOIN 1") == b"OK tc-1\n"
                assert await _ask(a2, "JOIN 2") == b"OK tc-2\n"
                assert await asyncio.wait_for(loop.sock_recv(a3, 200), 5) == (
                    b"ERR RESOURCE_EXHAUSTED too many join connections from session:a (2 open, at most 2)\n"
                )
                owner["now"] = "uid:1000"
                with _connect(path) as other:
                    assert await _ask(other, "JOIN 3") == b"OK tc-3\n"
            await asyncio.sleep(0.05)
            owner["now"] = "session:a"
            with _connect(path) as again:  # closing gives the quota back
                assert await _ask(again, "JOIN 4") == b"OK tc-4\n"

    asyncio.run(main())


def test_a_connection_whose_process_has_exited_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "join.sock"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with _server(path, identify=lambda pid, uid: None):
            with _connect(path) as sock:
                assert await asyncio.wait_for(loop.sock_recv(sock, 200), 5) == (
                    b"ERR FAILED_PRECONDITION the connecting process has exited\n"
                )

    asyncio.run(main())


@pytest.mark.parametrize(
    ("failure", "answer"),
    [
        (KeyError("tc-x"), b"ERR INTERNAL internal error: KeyError: 'tc-x'\n"),
        (OSError(5, "Input/output error"), b"ERR INTERNAL internal error: OSError: [Errno 5] Input/output error\n"),
        (ValueError("bad\nvalue"), b"ERR INTERNAL internal error: ValueError: bad value\n"),
        (ResourceExhausted("too many"), b"ERR RESOURCE_EXHAUSTED too many\n"),
    ],
)
def test_every_end_gets_an_answer(tmp_path: Path, failure: Exception, answer: bytes) -> None:
    """The engine's END can fail with anything (a CgroupError, an OSError, a KeyError): the client is answered,
    with the code of the one table (agentd.api.status), and the connection goes on."""
    path = tmp_path / "join.sock"

    async def ender(call_id: str, wait_status: int | None) -> pb.ToolCallResult:
        raise failure

    async def main() -> None:
        async with _server(path, ender=ender):
            with _connect(path) as sock:
                assert await _ask(sock, "JOIN x") == b"OK tc-x\n"
                assert await _ask(sock, "END tc-x 0") == answer
                assert await _ask(sock, "JOIN y") == b"OK tc-y\n"

    asyncio.run(main())


def test_join_refusals_use_the_one_status_table(tmp_path: Path) -> None:
    def placer(token: str, sender: int, target: int | None) -> str:
        raise {"full": ResourceExhausted("the session is full"), "gone": KeyError(token)}[token]

    path = tmp_path / "join.sock"

    async def main() -> None:
        async with _server(path, placer=placer):
            with _connect(path) as sock:
                assert await _ask(sock, "JOIN full") == b"ERR RESOURCE_EXHAUSTED the session is full\n"
                assert await _ask(sock, "JOIN gone") == b"ERR INTERNAL internal error: KeyError: 'gone'\n"

    asyncio.run(main())


def test_calls_placed_on_a_connection_are_forgotten_once_ended_and_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "MAX_PLACED_PER_CONNECTION", 8)
    path = tmp_path / "join.sock"

    async def ender(call_id: str, wait_status: int | None) -> pb.ToolCallResult:
        return pb.ToolCallResult(call_id=call_id)

    async def main() -> None:
        async with _server(path, ender=ender) as server:
            with _connect(path) as sock:
                for n in range(50):  # a long-lived connection, one call after the other
                    assert await _ask(sock, f"JOIN {n}") == f"OK tc-{n}\n".encode()
                    assert (await _ask(sock, f"END tc-{n} 0")).startswith(b"RESULT ")
                (connection,) = server.connections
                assert not connection.placed
                assert (await _ask(sock, "END tc-3 0")).startswith(b"ERR PERMISSION_DENIED")  # once only
                for n in range(20):  # placed and never ended here (e.g. ended through EndToolCall)
                    assert await _ask(sock, f"JOIN p{n}") == f"OK tc-p{n}\n".encode()
                assert list(connection.placed) == [f"tc-p{n}" for n in range(12, 20)]
                assert (await _ask(sock, "END tc-p0 0")).startswith(b"ERR PERMISSION_DENIED")
                assert (await _ask(sock, "END tc-p19 0")).startswith(b"RESULT ")

    asyncio.run(main())
