"""Network intent NONE in the daemon (netpolicy program attached at the sessions root), through real tool
calls: a NONE call gets EPERM connecting to a real non-loopback peer (the far end of a veth pair into a private
network namespace, tests/netns_peer.py), which never sees the connection, while an ANY call reaches it; the
same for a 127.0.0.1 listener unless the config allows loopback; denials are counted in the result; a restarted
daemon polices adopted calls again. Connections only ever go to listeners the test opened: on 127.0.0.1, or on
the peer (traffic only between the two ends of that veth)."""

from __future__ import annotations

import errno
import os
import socket
import sys
from collections.abc import Callable, Iterator

import pytest
from bpf_support import requires_root
from netns_peer import Peer
from support import SLOW, Daemon, create_session, scrape, value

from agentd.api.gen import agentd_pb2 as pb
from agentd.client import Client

pytestmark = requires_root


@pytest.fixture
def listener() -> Iterator[int]:
    """A TCP listener on 127.0.0.1; its port. Connections wait in its backlog."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[1]


@pytest.fixture
def peer() -> Iterator[Peer]:
    with Peer() as made:
        yield made


def connector(port: int, wait_fd: int | None = None, host: str = "127.0.0.1", send: bytes = b"") -> list[str]:
    """A command that (after a byte on wait_fd, if given) connects to host:port and sends `send`; exits with the
    errno."""
    wait = f"os.read({wait_fd}, 1)\n" if wait_fd is not None else ""
    code = (
        f"import os, socket, sys\n{wait}"
        f"try:\n    socket.create_connection(({host!r}, {port}), timeout=5).sendall({send!r})\n"
        "except OSError as exc:\n    sys.exit(exc.errno)\n"
    )
    return [sys.executable, "-c", code]


def held_connector(admin: Client, sid: str, network: int, port: int) -> tuple[pb.BeginToolCallResponse, int, int]:
    """A call whose process waits for a byte before it connects: (begun, pid, fd to release it with)."""
    read_fd, write_fd = os.pipe()
    os.set_inheritable(read_fd, True)
    begun = admin.begin(pb.Intent(tool="connect", network=network), sid, report_exit=False)
    pid = admin.spawn(begun, connector(port, read_fd))
    os.close(read_fd)
    return begun, pid, write_fd


def release(pid: int, go: int) -> int:
    """Let a held connector connect; its exit status (the errno, 0 if connected)."""
    os.write(go, b"x")
    os.close(go)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_none_is_denied_next_to_any(daemon: Daemon, session: tuple[str, str], listener: int) -> None:
    sid, _ = session
    with daemon.admin() as admin:
        denied, denied_pid, go = held_connector(admin, sid, pb.NETWORK_NONE, listener)
        assert "network" not in denied.limits.not_enforced
        # While the NONE call runs (policed), a call with network ANY in the same session connects.
        allowed = admin.run(connector(listener), sid, network=pb.NETWORK_ANY)
        assert (allowed.exit_code, allowed.result.network_denials) == (0, 0)
        assert release(denied_pid, go) == errno.EPERM
        result = admin.wait(denied.call_id, timeout=10)
    assert (result.outcome, result.exit_code, result.network_denials) == (pb.OUTCOME_FAILED, errno.EPERM, 1)
    assert "network access denied 1 time " in result.feedback
    assert "network" not in result.limits.not_enforced
    with daemon.admin() as admin:  # counted per session too
        assert admin.call("GetSession", pb.GetSessionRequest(session_id=sid)).network_denials == 1
    assert value(scrape(daemon), f'agentd_session_network_denials_total{{session="{sid}"}}') == 1


def test_none_is_refused_by_a_real_peer_that_any_reaches(
    daemon: Daemon, session: tuple[str, str], peer: Peer
) -> None:
    sid, _ = session
    with daemon.admin() as admin:
        denied = admin.run(connector(peer.port, host=peer.address, send=b"none"), sid, network=pb.NETWORK_NONE)
        assert not peer.pending(), "the peer saw a connection from the NONE call"
        allowed = admin.run(connector(peer.port, host=peer.address, send=b"any"), sid, network=pb.NETWORK_ANY)
    assert (denied.exit_code, denied.result.outcome, denied.result.network_denials) == (
        errno.EPERM, pb.OUTCOME_FAILED, 1)
    assert "network access denied 1 time " in denied.result.feedback
    assert "network" not in denied.result.limits.not_enforced
    assert (allowed.exit_code, allowed.result.outcome, allowed.result.network_denials) == (0, pb.OUTCOME_OK, 0)
    assert peer.accept(timeout=10 * SLOW) == (peer.host_address, b"any")


def test_loopback_allowed_by_config(daemon_factory: Callable[..., Daemon], listener: int, peer: Peer) -> None:
    d = daemon_factory(limits={"network_none_allows_loopback": True}).start()
    with d.admin() as admin:
        sid, _ = create_session(admin)
        ran = admin.run(connector(listener), sid, network=pb.NETWORK_NONE)
        beyond = admin.run(connector(peer.port, host=peer.address), sid, network=pb.NETWORK_NONE)
    assert (ran.exit_code, ran.result.outcome, ran.result.network_denials) == (0, pb.OUTCOME_OK, 0)
    assert "network" not in ran.result.limits.not_enforced and "denied" not in ran.result.feedback
    # Loopback only: the non-loopback peer stays out of reach.
    assert (beyond.exit_code, beyond.result.network_denials) == (errno.EPERM, 1)
    assert not peer.pending()


def test_adopted_call_is_policed_again(daemon_factory: Callable[..., Daemon], listener: int) -> None:
    d = daemon_factory().start()
    with d.admin() as admin:
        sid, _ = create_session(admin)
        begun, pid, go = held_connector(admin, sid, pb.NETWORK_NONE, listener)
    d.kill9()  # its BPF links die with it: nothing is policed until the next start
    d.start()
    with d.admin() as admin:
        assert pid in admin.call("GetToolCall", pb.ToolCallRequest(call_id=begun.call_id)).pids  # adopted
        assert release(pid, go) == errno.EPERM
        result = admin.wait(begun.call_id, timeout=10)
    assert result.network_denials == 1 and "network" not in result.limits.not_enforced
