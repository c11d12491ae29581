"""The network policy programs on this host's kernel. Connections only ever go to listeners this test opens
on 127.0.0.1 / ::1; the one non-loopback destination (TEST-NET-1) is tried from a fresh network namespace
that has no interface up, so nothing can leave the host."""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from bpf_support import Cgroups, requires_root, run_in_cgroup

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
    policy: NetworkPolicy, sessions_root: Path, cgroups: Cgroups, attempts: dict[str, Attempt]
) -> None:
    call, sibling = cgroups.make(sessions_root), cgroups.make(sessions_root)
    policy.set_policy(cgroup_id(call), allow_loopback=True)
    assert outcomes(call, attempts) == dict.fromkeys(attempts, 0)
    assert policy.denials(cgroup_id(call)) == 0

    def test_net() -> int:
        return connect(socket.AF_INET, socket.SOCK_STREAM, ("192.0.2.1", 9))

    assert run_in_cgroup(call, test_net, new_netns=True) == errno.EPERM
    assert run_in_cgroup(sibling, test_net, new_netns=True) == errno.ENETUNREACH  # the routing verdict
    assert policy.denials(cgroup_id(call)) == 1


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
