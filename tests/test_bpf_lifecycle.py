"""The lifecycle programs on this host's kernel: exec events of managed agent leaves and exit events of managed
tool calls arrive with the right pids, parents, cgroup and exit status (forks, execs in tool calls and exits in
agent leaves are only counted); other cgroups are filtered in the kernel; an exec in an agent leaf of a file whose
basename is a wake name (any file until wake names are set) wakes the ring buffer's epoll fd at once, other events
(other execs in agent leaves included, still counted and reported) only once a backlog builds up."""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bpf_support import Cgroups, popen_in_cgroup, requires_root

from agentd.core.intents import Intent, Limits
from agentd.core.sessions import Session, SessionSpec
from agentd.core.toolcalls import ToolCall
from agentd.core.tracking import Tracking
from agentd.kernel.bpf import cgroup_id
from agentd.kernel.bpf.lifecycle import (
    CgroupKind,
    EventType,
    LifecycleTracker,
    ProcessCounters,
    ProcessEvent,
    wake_name_key,
)

pytestmark = requires_root

EXIT_3 = ["/bin/sh", "-c", "/bin/true; exit 3"]  # the shell forks and execs /bin/true, then exits 3
KILLED = ["/bin/sh", "-c", "kill -USR1 $$"]


@pytest.fixture
def tracker() -> Iterator[LifecycleTracker]:
    with LifecycleTracker() as lifecycle:
        yield lifecycle


@pytest.fixture
def cgroups() -> Iterator[Cgroups]:
    with Cgroups() as made:
        yield made


def run(cgroup: Path, argv: list[str]) -> int:
    """Run argv in cgroup to completion; its events are all in the ring buffer when this returns."""
    process = popen_in_cgroup(cgroup, argv)
    process.wait(timeout=10)
    return process.pid


def readable(tracker: LifecycleTracker, timeout: float = 0.0) -> bool:
    return bool(select.select([tracker.epoll_fd()], [], [], timeout)[0])


def test_managed_events_arrive_and_unmanaged_are_filtered(
    tracker: LifecycleTracker, cgroups: Cgroups
) -> None:
    """Execs are reported from agent leaves, exits from tool calls; the rest is counted, not reported."""
    leaf, call, unmanaged = cgroups.make(), cgroups.make(), cgroups.make()
    leaf_id, call_id = cgroup_id(leaf), cgroup_id(call)
    tracker.add_cgroup(leaf_id, CgroupKind.AGENT_LEAF)
    tracker.add_cgroup(call_id, CgroupKind.TOOL_CALL)
    tracker.set_wake_names([])  # no exec wakes the consumer
    started_ns = time.monotonic_ns()

    quiet = {run(unmanaged, EXIT_3), run(unmanaged, KILLED)}
    shell, killed = run(leaf, EXIT_3), run(leaf, KILLED)
    call_shell, call_killed = run(call, EXIT_3), run(call, KILLED)
    assert not readable(tracker)  # batched
    events = tracker.consume()

    assert not quiet & {e.pid for e in events} and not quiet & {e.ppid for e in events}
    assert all(started_ns <= e.timestamp_ns <= time.monotonic_ns() for e in events)
    execs = {e.pid: e for e in events if e.type is EventType.EXEC}
    exits = {e.pid: e for e in events if e.type is EventType.EXIT}
    assert len(execs) + len(exits) == len(events) == 6  # forks are counted, not reported
    assert {(e.cgroup_id, e.cgroup_kind) for e in execs.values()} == {(leaf_id, CgroupKind.AGENT_LEAF)}
    assert {(e.cgroup_id, e.cgroup_kind) for e in exits.values()} == {(call_id, CgroupKind.TOOL_CALL)}

    (true,) = [pid for pid, e in execs.items() if e.comm == "true"]
    shell_exec = execs[shell]
    assert (shell_exec.ppid, shell_exec.comm, shell_exec.filename) == (os.getpid(), "sh", "/bin/sh")
    assert shell_exec.argv == tuple(EXIT_3) and not shell_exec.argv_truncated
    true_exec = execs[true]
    assert (true_exec.ppid, true_exec.parent_comm, true_exec.comm, true_exec.argv) == (
        shell,
        "sh",
        "true",
        ("/bin/true",),
    )
    assert shell_exec.timestamp_ns < true_exec.timestamp_ns
    assert execs[killed].argv == tuple(KILLED)

    (call_true,) = set(exits) - {call_shell, call_killed}
    assert (exits[call_true].exit_code, exits[call_true].signal, exits[call_true].ppid) == (0, None, call_shell)
    assert (exits[call_shell].exit_code, exits[call_shell].signal, exits[call_shell].ppid) == (3, None, os.getpid())
    assert (exits[call_killed].exit_code, exits[call_killed].signal) == (None, signal.SIGUSR1)

    for managed in (leaf_id, call_id):
        assert tracker.counters(managed) == ProcessCounters(forks=1, execs=3, exits=3)
    assert tracker.counters(cgroup_id(unmanaged)) is None
    assert tracker.lost() == 0


def exec_while_running(
    tracker: LifecycleTracker, cgroup: Path, argv: list[str], wakes: bool
) -> tuple[ProcessEvent, int]:
    """Start argv (a long sleep) in cgroup; whether its exec makes the epoll fd readable while the process
    still runs must be `wakes`. Returns its exec event (read by consume()) and pid."""
    tracker.consume()  # what earlier processes left
    counted = tracker.counters(cgroup_id(cgroup))
    assert counted is not None
    sleeper = popen_in_cgroup(cgroup, argv)
    try:
        if wakes:
            assert readable(tracker, timeout=5)
        else:
            deadline = time.monotonic() + 5
            while tracker.counters(cgroup_id(cgroup)) == counted:
                assert time.monotonic() < deadline, "exec not counted"
                time.sleep(0.01)
            assert not readable(tracker, timeout=0.3)  # exec'd and counted, but batched
        (execed,) = tracker.consume()
        assert not readable(tracker)  # as the event loop polls after reading: nothing is left
    finally:
        sleeper.kill()
        sleeper.wait()
    assert (execed.type, execed.pid, execed.argv) == (EventType.EXEC, sleeper.pid, tuple(argv))
    return execed, sleeper.pid


def test_exec_of_a_wake_name_in_agent_leaf_wakes_the_consumer(tracker: LifecycleTracker, cgroups: Cgroups) -> None:
    leaf = cgroups.make()
    tracker.add_cgroup(cgroup_id(leaf), CgroupKind.AGENT_LEAF)
    tracker.set_wake_names(["bash", "sleep", "make"])
    argv = ["/bin/sleep", "30"]
    execed, _ = exec_while_running(tracker, leaf, argv, wakes=True)
    assert (execed.comm, execed.filename, execed.cgroup_kind) == ("sleep", argv[0], CgroupKind.AGENT_LEAF)


def test_other_execs_in_agent_leaf_are_counted_but_batched(tracker: LifecycleTracker, cgroups: Cgroups) -> None:
    leaf = cgroups.make()
    tracker.add_cgroup(cgroup_id(leaf), CgroupKind.AGENT_LEAF)
    exec_while_running(tracker, leaf, ["/bin/sleep", "30"], wakes=True)  # every one until names are set
    tracker.set_wake_names(["bin", "slee", "sleeper"])  # a directory, a prefix, a longer name
    exec_while_running(tracker, leaf, ["/bin/sleep", "30"], wakes=False)
    assert tracker.counters(cgroup_id(leaf)) == ProcessCounters(forks=0, execs=2, exits=2)

    tracker.set_wake_names(["sleep"])  # replaces the names
    exec_while_running(tracker, leaf, ["/bin/sleep", "30"], wakes=True)
    tracker.set_wake_names([])  # none
    exec_while_running(tracker, leaf, ["/bin/sleep", "30"], wakes=False)


def test_wake_names_compare_the_first_15_bytes(
    tracker: LifecycleTracker, cgroups: Cgroups, tmp_path: Path
) -> None:
    leaf = cgroups.make()
    tracker.add_cgroup(cgroup_id(leaf), CgroupKind.AGENT_LEAF)
    assert wake_name_key("a-very-long-command") == b"a-very-long-com\0"
    long_name, other = tmp_path / "a-very-long-command", tmp_path / "a-very-long-comm"
    long_name.symlink_to("/bin/sleep")
    other.symlink_to("/bin/sleep")
    tracker.set_wake_names(["a-very-long-command"])
    execed, _ = exec_while_running(tracker, leaf, [str(long_name), "30"], wakes=True)
    assert execed.filename == str(long_name)
    exec_while_running(tracker, leaf, [str(other), "30"], wakes=True)  # the same first 15 bytes: spurious


def test_execs_in_a_tool_call_are_counted_not_reported(tracker: LifecycleTracker, cgroups: Cgroups) -> None:
    call = cgroups.make()
    tracker.add_cgroup(cgroup_id(call), CgroupKind.TOOL_CALL)
    tracker.set_wake_names(["sleep"])  # a wake name, but not in an agent leaf
    pid = run(call, ["/bin/sleep", "0"])
    assert not readable(tracker)
    assert [(e.type, e.pid) for e in tracker.consume()] == [(EventType.EXIT, pid)]
    assert tracker.counters(cgroup_id(call)) == ProcessCounters(forks=0, execs=1, exits=1)


def test_a_backlog_wakes_the_consumer(tracker: LifecycleTracker, cgroups: Cgroups) -> None:
    call = cgroups.make()
    tracker.add_cgroup(cgroup_id(call), CgroupKind.TOOL_CALL)
    run(call, ["/bin/sh", "-c", 'i=0; while [ "$i" -lt 1000 ]; do (exit 0); i=$((i + 1)); done'])
    assert readable(tracker)  # 1,000 exit events of 80 bytes passed the 64 KiB mark (forks, execs only counted)
    events = tracker.consume()
    assert len(events) == 1000 + 1 and tracker.lost() == 0
    assert tracker.counters(cgroup_id(call)) == ProcessCounters(forks=1000, execs=1, exits=1001)


def test_threads_are_not_processes(tracker: LifecycleTracker, cgroups: Cgroups) -> None:
    """Thread creation is no fork; a process ended by exit_group from another thread is one exit of the
    leader, with the status passed to exit_group."""
    cgroup = cgroups.make()
    tracker.add_cgroup(cgroup_id(cgroup), CgroupKind.TOOL_CALL)
    script = (
        "import os, threading; threading.Thread(target=os._exit, args=(7,)).start(); threading.Event().wait()"
    )
    pid = run(cgroup, [sys.executable, "-c", script])
    events = tracker.consume()

    assert [(e.type, e.pid) for e in events] == [(EventType.EXIT, pid)]
    assert events[0].exit_code == 7
    assert tracker.counters(cgroup_id(cgroup)) == ProcessCounters(forks=0, execs=1, exits=1)


def test_long_argv_is_truncated(tracker: LifecycleTracker, cgroups: Cgroups) -> None:
    cgroup = cgroups.make()
    tracker.add_cgroup(cgroup_id(cgroup), CgroupKind.AGENT_LEAF)
    run(cgroup, ["/bin/true", *(["x" * 50] * 10)])
    (execed,) = [e for e in tracker.consume() if e.type is EventType.EXEC]
    assert execed.argv_truncated and execed.argv[0] == "/bin/true" and execed.argv[1] == "x" * 50


def test_removed_cgroups_are_no_longer_reported(tracker: LifecycleTracker, cgroups: Cgroups) -> None:
    first, second = cgroups.make(), cgroups.make()
    tracker.add_cgroup(cgroup_id(first), CgroupKind.AGENT_LEAF)
    tracker.add_cgroup(cgroup_id(second), CgroupKind.TOOL_CALL)
    assert set(tracker.all_counters()) == {cgroup_id(first), cgroup_id(second)}

    assert tracker.remove_cgroup(cgroup_id(first))
    assert not tracker.remove_cgroup(cgroup_id(first))
    assert tracker.counters(cgroup_id(first)) is None
    silent, reported = run(first, ["/bin/true"]), run(second, ["/bin/true"])
    assert {e.pid for e in tracker.consume()} == {reported} != {silent}
    assert tracker.all_counters() == {cgroup_id(second): ProcessCounters(forks=0, execs=1, exits=1)}


def test_a_sessions_agent_leaf_reports_execs_only_when_they_are_wanted(
    tracker: LifecycleTracker, cgroups: Cgroups
) -> None:
    """Auto-capture off for a session: its agent leaf's execs are counted in the kernel, never sent to agentd."""
    loop = asyncio.new_event_loop()
    tracking = Tracking(tracker, loop)
    seen: list[tuple[str, int]] = []
    tracking.on_agent_exec = lambda session, event: seen.append((session.id, event.pid))
    tracking.wants_execs = lambda session: session.id == "on"
    sessions = [Session(SessionSpec(id=name), cgroups.make(), "0" * 64, 0.0) for name in ("on", "off")]
    try:
        for session in sessions:
            session.agent_path.mkdir()
            tracking.add_session(session)
        on, _off = (run(session.agent_path, ["/bin/true"]) for session in sessions)
        tracking.drain()
        assert seen == [("on", on)]
        counters = tracking.session_counters()
        assert counters["on"].execs == counters["off"].execs == 1
    finally:
        tracking.close()
        loop.close()
        for session in sessions:
            session.agent_path.rmdir()


def _call(cgroup: int) -> ToolCall:
    limits = Limits(0, 0, 100, 0, 0, 60.0, 0)
    return ToolCall(f"c{cgroup}", "s", Intent(tool="t"), limits, Path("/nonexistent"), cgroup, 0.0, False, False)


def test_full_map_is_reported_once_and_counted(tracker: LifecycleTracker, caplog: pytest.LogCaptureFixture) -> None:
    """Entries and capacity as the map has them; adds beyond it fail with one error logged (until one succeeds)."""
    loop = asyncio.new_event_loop()
    tracking = Tracking(tracker, loop)
    try:
        entries, capacity = tracking.map_use() or (-1, -1)
        assert (entries, capacity) == (0, 8192)
        base = 1 << 40  # ids no cgroup has: the map is keyed by any u64
        for offset in range(capacity):
            tracker.add_cgroup(base + offset, CgroupKind.TOOL_CALL)
        assert tracking.map_use() == (capacity, capacity)
        with caplog.at_level(logging.ERROR, logger="agentd.core.tracking"):
            for offset in range(3):
                tracking.add_call(_call(base + capacity + offset))
        full = [r for r in caplog.records if "full" in r.getMessage()]
        assert len(full) == 1 and (full[0].entries, full[0].capacity) == (capacity, capacity)  # type: ignore[attr-defined]
        assert tracking.counters(_call(base + capacity)) is None  # runs untracked
        tracker.remove_cgroup(base)
        tracking.add_call(_call(base))  # there is room again: re-arms the error
        assert tracking.map_use() == (capacity, capacity)
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="agentd.core.tracking"):
            tracking.add_call(_call(base + 2 * capacity))
        assert len([r for r in caplog.records if "full" in r.getMessage()]) == 1
    finally:
        tracking.close()
        loop.close()
