"""Who a process belongs to, for the quotas of shared resources (join connections, held processes): the
session whose cgroups hold it, or, for a process outside every session, its uid."""

from __future__ import annotations

from agentd.core.tree import Tree
from agentd.kernel import cgroupfs

SESSION_PREFIX = "session:"
UID_PREFIX = "uid:"


class Owners:
    """The owner of a connecting process: asked once per join connection, so the tree's paths are strings made
    once (no pathlib on the way)."""

    def __init__(self, tree: Tree) -> None:
        self.mount = str(tree.mount)
        self.sessions = f"{tree.sessions}/"

    def __call__(self, pid: int, uid: int) -> str | None:
        """The owner of process `pid` (running as `uid`) as the kernel places it now; None once it has exited."""
        where = cgroupfs.cgroup_path_of_pid(self.mount, pid)
        return None if where is None else self.key(where, uid)

    def key(self, cgroup: str, uid: int) -> str:
        """"session:<id>" for a cgroup inside a session's subtree (agent/ or one of its calls), else "uid:<uid>"."""
        if cgroup.startswith(self.sessions) and len(cgroup) > len(self.sessions):
            return SESSION_PREFIX + cgroup[len(self.sessions):].split("/", 1)[0]
        return f"{UID_PREFIX}{uid}"
