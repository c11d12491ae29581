"""The network policy programs on this host's kernel. Connections only ever go to listeners this test opens:
on 127.0.0.1 / ::1, and on the far end of a veth pair into a private network namespace (tests/netns_peer.py),
the real non-loopback peer: nothing leaves the host."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from bpf_support import Cgroups, requires_root, run_in_cgroup
from netns_peer import Peer
from pyroute2 import IPRoute
from support import wait_for

from agentd.kernel.bpf import cgroup_id
from agentd.kernel.bpf.netpolicy import NetworkPolicy

pytestmark = requires_root

Attempt = Callable[[], int]  # returns 0 or the errno of the failed connect/send


@pytest.fixture
def cgroups() -> Iterator[Cgroups]:
    with Cgroups() as made:
        yield made


@pytest.fixture
def sessions_root(cgroups: Cgroups) -> Path:
    return cgroups.make()


@pytest.fixture
def policy(sessions_root: Path) -> Iterator[NetworkPolicy]:
    with NetworkPolicy(sessions_root) as attached:
        yield attached


@pytest.fixture
def peer() -> Iterator[Peer]:
    with Peer() as made:
        yield made


@pytest.fixture
def attempts() -> Iterator[dict[str, Attempt]]:
    """Loopback attempts: TCP connect over IPv4, IPv6 and v4-mapped IPv6, and an unconnected UDP send."""
    with (
        socket.create_server(("127.0.0.1", 0)) as tcp4,
        socket.create_server(("::1", 0), family=socket.AF_INET6) as tcp6,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp4,
    ):
        udp4.bind(("127.0.0.1", 0))
        mapped = ("::ffff:127.0.0.1", tcp4.getsockname()[1])
        yield {
            "tcp4": lambda: connect(socket.AF_INET, socket.SOCK_STREAM, tcp4.getsockname()),
            "tcp6": lambda: connect(socket.AF_INET6, socket.SOCK_STREAM, tcp6.getsockname()[:2]),
            "tcp4-mapped": lambda: connect(socket.AF_INET6, socket.SOCK_STREAM, mapped),
            "udp4-sendto": lambda: send_to(udp4.getsockname()),
        }


def connect(family: int, kind: int, address: tuple[str, int]) -> int:
    with socket.socket(family, kind) as sock:
        try:
            sock.connect(address)
        except OSError as exc:
            return exc.errno or -1
    return 0


def send_to(address: tuple[str, int]) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(b"x", address)
        except OSError as exc:
            return exc.errno or -1
    return 0


def outcomes(cgroup: Path, attempts: dict[str, Attempt]) -> dict[str, int]:
    return {name: run_in_cgroup(cgroup, attempt) for name, attempt in attempts.items()}


def test_deny_all_refuses_loopback(
    policy: NetworkPolicy, sessions_root: Path, cgroups: Cgroups, attempts: dict[str, Attempt]
) -> None:
    call, sibling = cgroups.make(sessions_root), cgroups.make(sessions_root)
    policy.set_policy(cgroup_id(call), allow_loopback=False)

    assert outcomes(call, attempts) == dict.fromkeys(attempts, errno.EPERM)
    assert outcomes(sibling, attempts) == dict.fromkeys(attempts, 0)
    assert policy.denials(cgroup_id(call)) == len(attempts)
    assert policy.denials(cgroup_id(sibling)) == 0


def test_allowed_loopback_connects_but_nothing_else(
    policy: NetworkPolicy, sessions_root: Path, cgroups: Cgroups, attempts: dict[str, Attempt], peer: Peer
) -> None:
    call, sibling = cgroups.make(sessions_root), cgroups.make(sessions_root)
    policy.set_policy(cgroup_id(call), allow_loopback=True)
    assert outcomes(call, attempts) == dict.fromkeys(attempts, 0)
    assert policy.denials(cgroup_id(call)) == 0

    def to_peer() -> int:
        return connect(socket.AF_INET, socket.SOCK_STREAM, (peer.address, peer.port))

    assert run_in_cgroup(call, to_peer) == errno.EPERM
    assert not peer.pending()
    assert policy.denials(cgroup_id(call)) == 1
    assert run_in_cgroup(sibling, to_peer) == 0
    assert peer.accept(timeout=5) == (peer.host_address, b"")


def test_denied_call_never_reaches_the_peer(
    policy: NetworkPolicy, sessions_root: Path, cgroups: Cgroups, peer: Peer
) -> None:
    """TCP connect and an unconnected UDP send to the peer: refused for the policed call; its sibling's connect
    arrives and its datagram leaves."""
    call, sibling = cgroups.make(sessions_root), cgroups.make(sessions_root)
    policy.set_policy(cgroup_id(call), allow_loopback=False)
    tries: dict[str, Attempt] = {
        "tcp4": lambda: connect(socket.AF_INET, socket.SOCK_STREAM, (peer.address, peer.port)),
        "udp4-sendto": lambda: send_to((peer.address, peer.port)),
    }
    assert outcomes(call, tries) == dict.fromkeys(tries, errno.EPERM)
    assert not peer.pending()
    assert policy.denials(cgroup_id(call)) == len(tries)
    assert outcomes(sibling, tries) == dict.fromkeys(tries, 0)
    assert peer.accept(timeout=5) == (peer.host_address, b"")


def test_policy_changes_and_clear(
    policy: NetworkPolicy, sessions_root: Path, cgroups: Cgroups, attempts: dict[str, Attempt]
) -> None:
    call = cgroups.make(sessions_root)
    tcp4 = {"tcp4": attempts["tcp4"]}
    policy.set_policy(cgroup_id(call), allow_loopback=False)
    assert outcomes(call, tcp4) == {"tcp4": errno.EPERM}
    policy.set_policy(cgroup_id(call), allow_loopback=True)
    assert outcomes(call, tcp4) == {"tcp4": 0}
    assert policy.denials(cgroup_id(call)) == 1  # kept across policy changes

    policy.set_policy(cgroup_id(call), allow_loopback=False)
    policy.clear(cgroup_id(call))
    assert outcomes(call, tcp4) == {"tcp4": 0}
    assert policy.denials(cgroup_id(call)) == 0


def test_attaching_twice_keeps_both(
    policy: NetworkPolicy, sessions_root: Path, cgroups: Cgroups, attempts: dict[str, Attempt]
) -> None:
    """Multi-attach: a second attachment at the same cgroup adds to the first instead of replacing it."""
    call = cgroups.make(sessions_root)
    with NetworkPolicy(sessions_root) as second:
        policy.set_policy(cgroup_id(call), allow_loopback=False)
        assert outcomes(call, {"tcp4": attempts["tcp4"]}) == {"tcp4": errno.EPERM}
        assert (policy.denials(cgroup_id(call)), second.denials(cgroup_id(call))) == (1, 0)


def test_peer_goes_with_its_namespace() -> None:
    """Closed, or its process killed: the veth pair is gone (the kernel deletes it with the namespace)."""
    with Peer() as peer, IPRoute() as host:
        assert host.link_lookup(ifname=peer.host_ifname)
    with IPRoute() as host:
        assert not host.link_lookup(ifname=peer.host_ifname)
    code = "import sys, netns_peer; print(netns_peer.Peer().__enter__().host_ifname, flush=True); sys.stdin.read()"
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    try:
        assert holder.stdout is not None
        ifname = holder.stdout.readline().strip()
        with IPRoute() as host:
            assert host.link_lookup(ifname=ifname)
    finally:
        holder.kill()
        holder.wait()
    with IPRoute() as host:
        wait_for(lambda: not host.link_lookup(ifname=ifname))
