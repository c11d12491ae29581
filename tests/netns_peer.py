"""A real network peer for the network-intent tests: a veth pair from this host's network namespace into a
private namespace the test creates, with a TCP listener on the far end.

Traffic only ever flows between the two ends of that veth: both addresses come from a /30 of TEST-NET-2
(198.51.100.0/24, RFC 5737: for documentation, never routed) that no address or route of the host overlaps,
and the kernel's route to the peer is checked to leave through the veth. The namespace has no other interface.

The namespace is made by unshare(CLONE_NEWNET) in a thread of its own and is held only by descriptors this
module keeps (no name under /run/netns, no mount, no fork in a process that talks gRPC); pyroute2 makes and
configures the links on both sides over netlink. When the peer is closed, or the test process dies, the
namespace goes and the kernel deletes the veth pair with it.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import random
import socket
import threading
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

from pyroute2 import IPRoute, netns

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
PEER_RANGE = ipaddress.IPv4Network("198.51.100.0/24")  # TEST-NET-2
PEER_IFNAME = "peer0"  # inside the private namespace: no clash possible


def _in_thread(action: Callable[[], T]) -> T:
    """Run action in a new thread (namespace changes made there stay with that thread); its result or error."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = action()
        except BaseException as exc:  # handed to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="netns-peer")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]  # type: ignore[no-any-return]


def _new_namespace() -> int:
    """In the calling (throw-away) thread: a fresh network namespace; a descriptor that keeps it alive."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
    return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


def _free_subnet(host: IPRoute) -> ipaddress.IPv4Network:
    """A /30 of PEER_RANGE that no address or route of this namespace overlaps (random: tests may run at once)."""
    used = [ipaddress.ip_network(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}", strict=False)
            for a in host.get_addr(family=socket.AF_INET)]
    used += [ipaddress.ip_network(f"{r.get('RTA_DST')}/{r['dst_len']}", strict=False)
             for r in host.get_routes(family=socket.AF_INET) if r.get("RTA_DST")]
    free = [net for net in PEER_RANGE.subnets(new_prefix=30) if not any(net.overlaps(u) for u in used)]
    assert free, f"every /30 of {PEER_RANGE} is in use on this host"
    return random.choice(free)


class Peer:
    """The far end of a veth in a private network namespace, listening on TCP `address`:`port`."""

    def __init__(self) -> None:
        self.host_ifname = f"agt{uuid.uuid4().hex[:10]}"
        self.host_address = self.address = ""
        self.port = 0
        self._namespace = -1
        self._listener: socket.socket | None = None

    def __enter__(self) -> Peer:
        try:
            self._set_up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _set_up(self) -> None:
        self._namespace = _in_thread(_new_namespace)
        with IPRoute() as host:
            subnet = _free_subnet(host)
            self.host_address, self.address = str(subnet[1]), str(subnet[2])
            host.link("add", ifname=self.host_ifname, kind="veth",
                      peer={"ifname": PEER_IFNAME, "net_ns_fd": self._namespace})
            index = host.link_lookup(ifname=self.host_ifname)[0]
            host.addr("add", index=index, address=self.host_address, prefixlen=subnet.prefixlen)
            host.link("set", index=index, state="up")
            self._listener = _in_thread(self._far_end)
            self.port = self._listener.getsockname()[1]
            route = host.route("get", dst=self.address)[0]
            assert route.get("RTA_OIF") == index, f"the route to {self.address} does not use {self.host_ifname}"

    def _far_end(self) -> socket.socket:
        """In a thread moved into the namespace: address the veth's far end, bring it up, listen on it."""
        netns.setns(self._namespace, flags=0, fork=False)
        with IPRoute() as inside:
            index = inside.link_lookup(ifname=PEER_IFNAME)[0]
            inside.addr("add", index=index, address=self.address, prefixlen=30)
            inside.link("set", index=index, state="up")
        listener = socket.create_server((self.address, 0))  # made here: it belongs to the namespace
        return listener

    def accept(self, timeout: float) -> tuple[str, bytes]:
        """Wait for one connection; (the address it came from, everything it sent until it closed)."""
        assert self._listener is not None
        self._listener.settimeout(timeout)
        conn, (source, _) = self._listener.accept()
        with conn:
            conn.settimeout(timeout)
            data = b""
            while chunk := conn.recv(4096):
                data += chunk
        return source, data

    def pending(self) -> bool:
        """Whether a connection waits to be accepted (without waiting for one)."""
        assert self._listener is not None
        self._listener.settimeout(0)
        try:
            conn, _ = self._listener.accept()
        except BlockingIOError:
            return False
        conn.close()
        return True

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        try:
            with IPRoute() as host:
                for index in host.link_lookup(ifname=self.host_ifname):
                    host.link("del", index=index)  # deletes both ends
        finally:
            if self._namespace >= 0:
                os.close(self._namespace)
                self._namespace = -1

