"""The join connections' one epoll: a reader is called while its descriptor is readable or hung up, never after
it was removed (even by another reader in the same round), and other readers go on meanwhile."""

from __future__ import annotations

import asyncio
import socket

from agentd.api.join.readiness import Readiness


def test_readers_are_called_while_readable_and_never_once_removed() -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        readiness = Readiness(loop)
        calls: list[str] = []
        (a, a_peer), (b, b_peer) = socket.socketpair(), socket.socketpair()
        try:
            def read_a() -> None:
                calls.append(f"a:{a.recv(10).decode()}")

            def read_b() -> None:  # removes a's reader: a is not called in this round even if it was ready
                calls.append(f"b:{b.recv(10).decode()}")
                readiness.remove(a.fileno())

            readiness.add(a.fileno(), read_a)
            a_peer.send(b"1")
            await asyncio.sleep(0.05)
            readiness.add(b.fileno(), read_b)
            a_peer.send(b"2")
            b_peer.send(b"x")
            await asyncio.sleep(0.05)
            a_peer.send(b"3")  # a is no longer read
            readiness.remove(a.fileno())  # twice: nothing
            b_peer.close()  # a hang-up is readable: the reader sees its end
            readiness.remove(b.fileno())

            def end_b() -> None:
                calls.append(f"b end:{b.recv(10)!r}")
                readiness.remove(b.fileno())

            readiness.add(b.fileno(), end_b)
            await asyncio.sleep(0.05)
        finally:
            readiness.close()
            for sock in (a, a_peer, b):
                sock.close()
        return calls

    calls = asyncio.run(main())
    # In the round where both were ready, a may have been read before b removed it, or not at all.
    assert calls in (["a:1", "a:2", "b:x", "b end:b''"], ["a:1", "b:x", "b end:b''"]), calls
