"""Outbound network policy per cgroup id, enforced by bpf/netpolicy.bpf.c.

The connect4/connect6/sendmsg4/sendmsg6 programs are attached once, multi-attach, at a cgroup (the
daemon's sessions root); a policed cgroup then costs one map update. A task whose own cgroup has a policy
gets EPERM from connect(2) and from sendmsg(2) with a destination, except to loopback (127.0.0.0/8, ::1,
::ffff:127.0.0.0/104) when allowed. Cgroups without a policy are untouched. Only sockets created inside
the attach cgroup's subtree are seen: a socket created before its process moved in is not policed.
"""

from __future__ import annotations

import enum
import struct
from pathlib import Path

from agentd.kernel.bpf import object_path
from agentd.kernel.bpf.libbpf import BpfObject, Closing

_PROGRAMS = ("connect4", "connect6", "sendmsg4", "sendmsg6")
_KEY = struct.Struct("<Q")  # cgroup id
_POLICY = struct.Struct("<I")
_COUNT = struct.Struct("<Q")


class Policy(enum.IntEnum):
    DENY_ALL = 1
    DENY_EXCEPT_LOOPBACK = 2


class NetworkPolicy(Closing):
    """Loads bpf/netpolicy.bpf.o and attaches it at cgroup_dir. BpfError if the object is missing, does
    not load or cannot attach."""

    def __init__(self, cgroup_dir: Path, path: Path | None = None) -> None:
        self._obj = BpfObject(path or object_path("netpolicy"))
        try:
            self._policies = self._obj.map("policies", _KEY.size, _POLICY.size)
            self._denials = self._obj.map("denials", _KEY.size, _COUNT.size)
            for program in _PROGRAMS:
                self._obj.attach_cgroup(program, cgroup_dir)
        except BaseException:
            self._obj.close()
            raise

    def set_policy(self, cgroup_id: int, allow_loopback: bool) -> None:
        """Deny the cgroup's tasks outbound traffic (loopback too unless allowed); keeps the denial count."""
        key = _KEY.pack(cgroup_id)
        self._denials.insert(key, _COUNT.pack(0))  # before the policy, so every denial finds its counter
        policy = Policy.DENY_EXCEPT_LOOPBACK if allow_loopback else Policy.DENY_ALL
        self._policies.update(key, _POLICY.pack(policy))

    def clear(self, cgroup_id: int) -> None:
        """Remove the cgroup's policy and its denial count."""
        key = _KEY.pack(cgroup_id)
        self._policies.delete(key)
        self._denials.delete(key)

    def denials(self, cgroup_id: int) -> int:
        """Connects/sends denied to the cgroup since its first set_policy(); 0 if none."""
        value = self._denials.lookup(_KEY.pack(cgroup_id))
        return _COUNT.unpack(value)[0] if value is not None else 0

    def close(self) -> None:
        """Detach the programs (all traffic is allowed again) and free everything. Idempotent."""
        self._obj.close()
