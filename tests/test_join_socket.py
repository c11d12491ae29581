"""The join socket's connection handling, in-process on a real Unix socket. (What placement does to processes
and cgroups is tested through the daemon: test_auth, test_lifecycle.)"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from agentd.api import join
from agentd.api.gen import agentd_pb2 as pb


async def _never_ends(call_id: str, wait_status: int | None) -> pb.ToolCallResult:
    raise AssertionError("no END in these tests")


def _serve(path: Path, body: Callable[[asyncio.AbstractEventLoop], Awaitable[None]]) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = join.JoinServer(loop, path, lambda token, sender, target: f"tc-{token}", _never_ends, lambda: None)
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
