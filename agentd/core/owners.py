"""Who a process belongs to, for the quotas of shared resources (join connections, held processes): the
session whose cgroups hold it, or, for a process outside every session, its uid."""

from __future__ import annotations

from pathlib import Path

from agentd.core.tree import Tree
from agentd.kernel import cgroupfs

SESSION_PREFIX = "session:"
UID_PREFIX = "uid:"


def owner_key(tree: Tree, cgroup: Path, uid: int) -> str:
    """"session:<id>" for a cgroup inside a session's subtree (agent/ or one of its calls), else "uid:<uid>"."""
    if cgroup.is_relative_to(tree.sessions) and cgroup != tree.sessions:
        return SESSION_PREFIX + cgroup.relative_to(tree.sessions).parts[0]
    return f"{UID_PREFIX}{uid}"


def owner_of(tree: Tree, pid: int, uid: int) -> str | None:
    """The owner of process `pid` (running as `uid`) as the kernel places it now; None once it has exited."""
    where = cgroupfs.cgroup_of_pid(tree.mount, pid)
    return None if where is None else owner_key(tree, where, uid)
