"""Capability probe: what this kernel lets agentd enforce, measured once at start."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SCHED_EXT_STATE = Path("/sys/kernel/sched_ext/state")


@dataclass
class Capabilities:
    """One value the rest of the daemon consults; `agentctl status` shows it."""

    cgroup_root: Path
    enforced: set[str]           # controllers enabled for tool-call cgroups
    missing: set[str]            # wanted controllers that are not available on cgroup v2 here
    psi_triggers: bool
    sched_ext: bool
    favordynmods: bool = False   # cgroup2 mounted with favordynmods: moving a process never waits for RCU
    warnings: list[str] = field(default_factory=list)
    bpf_lifecycle: bool = False  # the lifecycle BPF program is loaded and attached
    bpf_network: bool = False    # the network policy BPF program is attached
    bpf_errors: list[str] = field(default_factory=list)  # why a BPF program is not loaded

    def describe_missing(self) -> str:
        knobs = {
            "memory": "memory.high/memory.max/memory.low/memory.oom.group",
            "cpu": "cpu.weight/cpu.max",
            "pids": "pids.max",
        }
        return "; ".join(f"{c}: {knobs[c]} NOT enforced" for c in sorted(self.missing))


def probe_sched_ext() -> bool:
    return SCHED_EXT_STATE.exists()
