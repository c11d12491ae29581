"""The join socket's connection handling, in-process on a real Unix socket. (What placement does to processes
and cgroups is tested through the daemon: test_auth, test_lifecycle.)"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentd.api import join
from agentd.api.gen import agentd_pb2 as pb
from agentd.core.errors import PermissionDenied


async def _never_ends(call_id: str, wait_status: int | None) -> pb.ToolCallResult:
    raise AssertionError("no END in these tests")


def _serve(
    path: Path, body: Callable[[asyncio.AbstractEventLoop], Awaitable[None]], max_connections: int = 64
) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = join.JoinServer(
            loop, path, lambda token, sender, target: f"tc-{token}", _never_ends, lambda: None, max_connections
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
    monkeypatch.setattr(join, "IDLE_TIMEOUT_SECONDS", 0.4)
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
    monkeypatch.setattr(join, "MAX_HELD", 3)
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
@given(messages=st.lists(st.tuples(st.lists(lines, min_size=1, max_size=3), attachments), max_size=8))
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
        server = join.JoinServer(loop, path, placer, ender, lambda: None, 64)
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
