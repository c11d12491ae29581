"""The BPF programs loaded at start: process lifecycle (tracing) and network policy (attached once at the
sessions root). Each is optional: a missing object or a failed load is logged as an error, recorded in the
Capabilities (GetStatus, metrics) and the daemon runs without that feature. close() detaches both.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from agentd.core.tree import Tree
from agentd.kernel.bpf.libbpf import BpfError
from agentd.kernel.bpf.lifecycle import LifecycleTracker
from agentd.kernel.bpf.netpolicy import NetworkPolicy
from agentd.kernel.capabilities import Capabilities

log = logging.getLogger(__name__)


@dataclass
class Programs:
    lifecycle: LifecycleTracker | None = None
    network: NetworkPolicy | None = None

    def close(self) -> None:
        """Detach and free the programs. Idempotent."""
        for program in (self.lifecycle, self.network):
            if program is not None:
                program.close()
        self.lifecycle = self.network = None


def load_programs(tree: Tree, caps: Capabilities) -> Programs:
    """Load what loads; note in caps what is on and why anything is off."""
    programs = Programs()
    began = time.monotonic()
    try:
        programs.lifecycle = LifecycleTracker()
    except (BpfError, OSError) as exc:
        _unavailable(caps, "lifecycle", "exit status from the kernel, process counters and auto-capture", exc)
    try:
        programs.network = NetworkPolicy(tree.sessions)
    except (BpfError, OSError) as exc:
        _unavailable(caps, "netpolicy", "network intent NONE is not enforced", exc)
    caps.bpf_lifecycle = programs.lifecycle is not None
    caps.bpf_network = programs.network is not None
    log.info("BPF programs loaded", extra={"lifecycle": caps.bpf_lifecycle, "network": caps.bpf_network,
                                           "seconds": round(time.monotonic() - began, 4)})
    return programs


def _unavailable(caps: Capabilities, name: str, lost: str, exc: Exception) -> None:
    """The status gets the first and last lines (the failure, and libbpf's last word or the hint); the log
    everything (e.g. a verifier log)."""
    error = f"BPF program {name} not loaded ({lost}): {exc}"
    lines = error.splitlines()
    caps.bpf_errors.append(lines[0] if len(lines) == 1 else f"{lines[0]}; {lines[-1]}")
    log.error("%s", error)
