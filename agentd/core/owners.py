"""Who a process belongs to, for the quotas of shared resources (join connections, held processes): the
session whose cgroups hold it, or, for a process outside every session, its uid."""

from __future__ import annotations

from agentd.core.tree import Tree
from agentd.kernel import cgroupfs

SESSION_PREFIX = "session:"
UID_PREFIX = "uid:"


def owner_key(tree: Tree, cgroup: str, uid: int) -> str:
    """"session:<id>" for a cgroup inside a session's subtree (agent/ or one of its calls), else "uid:<uid>"."""
    sessions = f"{tree.sessions}/"
    if cgroup.startswith(sessions) and len(cgroup) > len(sessions):
        return SESSION_PREFIX + cgroup[len(sessions):].split("/", 1)[0]
    return f"{UID_PREFIX}{uid}"


def owner_of(tree: Tree, pid: int, uid: int) -> str | None:
    """The owner of process `pid` (running as `uid`) as the kernel places it now; None once it has exited.
    Strings, not paths: asked once per join connection."""
    where = cgroupfs.cgroup_path_of_pid(str(tree.mount), pid)
    return None if where is None else owner_key(tree, where, uid)
