"""Network intent NONE through the netpolicy BPF program: a call that declares it gets a deny policy on its
cgroup id (loopback allowed or not, by config) from creation or adoption until it is finalised; the
connects and sends refused meanwhile are counted and end up in its result. Without the program the
intent is stored and reported as not enforced.
"""

from __future__ import annotations

import logging

from agentd.core.intents import Network
from agentd.core.toolcalls import ToolCall
from agentd.kernel.bpf.libbpf import BpfError
from agentd.kernel.bpf.netpolicy import NetworkPolicy

log = logging.getLogger(__name__)

NOT_ENFORCED = "network"


class NetworkIntent:
    def __init__(self, policy: NetworkPolicy | None, allow_loopback: bool) -> None:
        self._policy = policy
        self._allow_loopback = allow_loopback

    def enforcement(self, call: ToolCall) -> tuple[str, ...]:
        """Apply the call's network intent; returns its not_enforced list with "network" set accordingly."""
        others = tuple(knob for knob in call.not_enforced if knob != NOT_ENFORCED)
        return others if self._apply(call) else (*others, NOT_ENFORCED)

    def _apply(self, call: ToolCall) -> bool:
        """Police a call whose intent is NONE; False if it declared NONE but cannot be policed."""
        if call.limits.network != Network.NONE:
            return True
        if self._policy is None:
            return False
        try:
            self._policy.set_policy(call.cgroup_id, self._allow_loopback)
        except BpfError as exc:  # e.g. the map is full
            log.error("network policy not applied", extra={"call": call.id, "error": str(exc)})
            return False
        return True

    def denials(self, call: ToolCall) -> int:
        """How many connects/sends the call was refused so far."""
        if self._policy is None or call.limits.network != Network.NONE:
            return 0
        try:
            return self._policy.denials(call.cgroup_id)
        except BpfError as exc:
            log.error("network denials not read", extra={"call": call.id, "error": str(exc)})
            return 0

    def release(self, call: ToolCall) -> None:
        """Remove the call's policy (it has ended)."""
        if self._policy is None or call.limits.network != Network.NONE:
            return
        try:
            self._policy.clear(call.cgroup_id)
        except BpfError as exc:
            log.error("network policy not cleared", extra={"call": call.id, "error": str(exc)})
