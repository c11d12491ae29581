"""agentd's cgroup tree: choose the root, set up supervisor/ and sessions/, enable controllers, probe the kernel.

    <root>/supervisor/                 agentd itself
    <root>/sessions/<id>/agent/        the agent's own processes
    <root>/sessions/<id>/tc-<call>/    one leaf per tool call

Only leaves hold processes (cgroup v2's "no internal processes" rule), so controllers can be enabled on
<root>, sessions/ and every session.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from agentd.kernel import cgroupfs, psi
from agentd.kernel.capabilities import Capabilities, probe_sched_ext
from agentd.kernel.mounts import cgroup2_mount, own_cgroup

log = logging.getLogger(__name__)

SUPERVISOR = "supervisor"
SESSIONS = "sessions"


@dataclass(frozen=True)
class Tree:
    mount: Path
    root: Path

    @property
    def supervisor(self) -> Path:
        return self.root / SUPERVISOR

    @property
    def sessions(self) -> Path:
        return self.root / SESSIONS

    def session_path(self, session_id: str) -> Path:
        return self.sessions / session_id


def choose_root(setting: str, mount: Path) -> tuple[Path, bool]:
    """Return (root, delegated). 'auto': under systemd the unit's delegated cgroup (its parent when systemd
    already put us in supervisor/ via DelegateSubgroup=), otherwise <mount>/agentd. An explicit path must
    lie inside the mount."""
    if setting != "auto":
        root = Path(setting)
        if not root.is_relative_to(mount) or root == mount:
            raise ValueError(f"[daemon] cgroup_root {root} is not a cgroup below the cgroup2 mount {mount}")
        return root, False
    if os.environ.get("INVOCATION_ID") and own_cgroup() != "/":
        here = mount / own_cgroup().lstrip("/")
        return (here.parent if here.name == SUPERVISOR else here), True
    return mount / "agentd", False


def set_up(setting: str) -> tuple[Tree, Capabilities]:
    """Create the layout, move this process into supervisor/, enable controllers, probe capabilities."""
    mount, options = cgroup2_mount()
    root, delegated = choose_root(setting, mount)
    tree = Tree(mount, root)
    if not delegated:
        cgroupfs.ensure(root, parents=True)
        _enable_parent_chain(mount, root)
    cgroupfs.ensure(tree.supervisor)
    cgroupfs.move(tree.supervisor, os.getpid())
    enabled = set(cgroupfs.CONTROLLERS)
    for level in (root, tree.sessions):
        cgroupfs.ensure(level)
        enabled = cgroupfs.enable_controllers(level, enabled)
    missing = set(cgroupfs.CONTROLLERS) - enabled
    caps = Capabilities(
        cgroup_root=root,
        enforced=enabled,
        missing=missing,
        psi_triggers=psi.triggers_supported(root),
        sched_ext=probe_sched_ext(),
        favordynmods="favordynmods" in options,
    )
    if missing:
        caps.warnings.append(
            f"cgroup v2 controllers not available here: {', '.join(sorted(missing))} "
            f"({caps.describe_missing()}); tracking, freeze, kill and records still work"
        )
    if not caps.psi_triggers:
        caps.warnings.append("PSI triggers unavailable (pressure files disabled or read-only)")
    if not caps.favordynmods:
        caps.warnings.append(
            f"cgroup2 at {mount} is mounted without favordynmods: placing a process into a tool call can wait for "
            f"an RCU grace period (milliseconds); remount with it (mount -o remount,favordynmods {mount}) or "
            f"boot with cgroup_favordynmods=true"
        )
    for warning in caps.warnings:
        log.warning("%s", warning)
    return tree, caps


def _enable_parent_chain(mount: Path, root: Path) -> None:
    """Make the wanted controllers available in `root` by enabling them in each ancestor that has them (not
    under systemd, which owns the ancestors of a delegated cgroup). An ancestor that holds processes refuses
    (EBUSY): then the controller stays unavailable and is reported."""
    chain = [p for p in reversed(root.parents) if p.is_relative_to(mount)]
    for ancestor in chain:
        try:
            cgroupfs.enable_controllers(ancestor, cgroupfs.CONTROLLERS)
        except cgroupfs.CgroupError as exc:
            log.info("cannot enable controllers in %s: %s", ancestor, exc)
            return
