"""Owners of processes for the join socket's quotas, read from the real cgroup tree: the session whose cgroups
hold a process, else its uid."""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import support
from support import spawn_in, wait_for

from agentd.core.owners import Owners
from agentd.core.tree import Tree
from agentd.kernel import cgroupfs
from agentd.kernel.mounts import cgroup2_mount


@pytest.fixture
def tree() -> Iterator[Tree]:
    mount = cgroup2_mount().path
    made = Tree(mount, mount / support.test_root_name())
    try:
        for leaf in ("sessions/s-1/agent", "sessions/s-1/tc-1", "sessions/s-2/agent", "supervisor"):
            (made.root / leaf).mkdir(parents=True)
        yield made
    finally:
        cgroupfs.remove_tree(made.root)


def _in(pid: int, leaf: Path) -> bool:
    return pid in cgroupfs.procs(leaf)


def test_owner_is_the_session_holding_the_process_else_its_uid(tree: Tree) -> None:
    places = {
        "sessions/s-1/agent": "session:s-1",
        "sessions/s-1/tc-1": "session:s-1",
        "sessions/s-2/agent": "session:s-2",
        "supervisor": "uid:1234",  # agentd's own tree, but no session
    }
    owner_of = Owners(tree)
    sleepers = [spawn_in(tree.root / place, ["sleep", "100"]) for place in places]
    try:
        for sleeper, (place, owner) in zip(sleepers, places.items(), strict=True):
            wait_for(functools.partial(_in, sleeper.pid, tree.root / place))  # the shell moves itself first
            assert owner_of(sleeper.pid, 1234) == owner, place
            assert cgroupfs.cgroup_path_of_pid(str(tree.mount), sleeper.pid) == str(tree.root / place)
            assert cgroupfs.cgroup_of_pid(tree.mount, sleeper.pid) == tree.root / place
        with subprocess.Popen(["sleep", "100"]) as outside:  # not in agentd's tree at all
            assert owner_of(outside.pid, 1234) == "uid:1234"
            outside.kill()
        gone = subprocess.Popen(["true"])
        gone.wait()
        assert owner_of(gone.pid, 1234) is None
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()


def test_within_a_cgroup_is_by_whole_path_components() -> None:
    """Placement's check that a process lives in a session: s-10 is not inside s-1."""
    assert cgroupfs.is_within("/m/sessions/s-1/agent", "/m/sessions/s-1")
    assert cgroupfs.is_within("/m/sessions/s-1", "/m/sessions/s-1")
    assert not cgroupfs.is_within("/m/sessions/s-10/agent", "/m/sessions/s-1")
    assert not cgroupfs.is_within("/m/sessions", "/m/sessions/s-1")


@pytest.mark.parametrize(("text", "path"), [
    ("0::/sessions/s-1/agent\n", "/sessions/s-1/agent"),  # a pure v2 host
    ("12:pids:/\n1:name=systemd:/init.scope\n0::/sessions/s 2/tc-1\n", "/sessions/s 2/tc-1"),  # hybrid: v2 last
    ("0::/\n", "/"),
    ("0::/x", "/x"),  # no final newline
    ("1:name=systemd:/\n", None),  # no v2 hierarchy
    ("", None),
])
def test_the_v2_line_is_found_among_v1_lines(text: str, path: str | None) -> None:
    assert cgroupfs.v2_path_in(text) == path
