"""The memory policy on a kernel with the memory controller and PSI (make test-kernel): HIGH and LOW sessions
share a tight sessions/ limit; the ladder throttles, freezes and (last) kills the LOW call, never the HIGH one,
gives everything back when pressure clears, does not flap, and says so in results, the event stream and the log.

Each test asserts what the kernel saw (memory.high and cgroup.freeze of the call while it ran, memory.pressure
of the HIGH session, processes alive) and what agentd reported (results, WatchPolicy events, log lines).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from support import Daemon, create_session, rpc_error, spawn_in, wait_for

from agentd.api.gen import agentd_pb2 as pb
from agentd.client import Client

pytestmark = pytest.mark.guest
MIB = 1 << 20
LIMIT = 512 * MIB  # sessions/ memory.max: reserves throttle 64 MiB, freeze 40, kill 24, emergency 16, recover 96
OWN = 432  # MiB the LOW call declares (its own memory.high): it fits the empty domain, and it never reaches it
TIMEOUT = 240.0  # generous: Python under TCG is ~10x slower

# Allocates `total` MiB in `chunk` MiB steps (bytes * n writes every page), a pause after each, reports progress
# in a file, then holds it until the release file appears (or `hold` seconds pass).
GROW = """
import os, sys, time
total, chunk, pause, progress, release, hold = sys.argv[1:7]
total, chunk, pause, hold = int(total), int(chunk), float(pause), float(hold)
kept = []
while len(kept) * chunk < total:
    kept.append(b"x" * (chunk << 20))
    with open(progress + ".tmp", "w") as f:
        f.write(str(len(kept) * chunk))
    os.replace(progress + ".tmp", progress)
    time.sleep(pause)
end = time.monotonic() + hold
while time.monotonic() < end and not os.path.exists(release):
    time.sleep(0.05)
"""

# Grows by `chunk` MiB every `pause` s up to `cap` MiB until <ctl>.stop exists; on <ctl>.drop frees `drop` MiB; on
# <ctl>.regrow grows again up to `cap`; holds until <ctl>.release. Anonymous mmaps, so a free returns the memory
# to the kernel at once (a malloc'd heap may keep it).
STEPS = """
import mmap, os, sys, time
chunk, pause, cap, drop, ctl = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
block, kept = b"x" * (1 << 20), []
def grow(until):
    while len(kept) * chunk < cap and not os.path.exists(until):
        m = mmap.mmap(-1, chunk << 20)
        for off in range(0, chunk << 20, 1 << 20):
            m[off:off + (1 << 20)] = block
        kept.append(m)
        time.sleep(pause)
def wait(flag):
    while not os.path.exists(flag):
        time.sleep(0.02)
grow(ctl + ".stop")
wait(ctl + ".drop")
for _ in range(drop // chunk):
    kept.pop().close()
wait(ctl + ".regrow")
grow(ctl + ".release")
wait(ctl + ".release")
"""


@pytest.fixture(scope="module")
def pdaemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("agentd-policy"), policy={"sessions_memory_max": LIMIT})
    try:
        yield d.start()
    finally:
        d.cleanup()


@pytest.fixture
def pair(pdaemon: Daemon) -> Iterator[tuple[str, str, str]]:
    """A HIGH and a LOW session (ids, and the LOW one's token) on a quiet domain; deleted afterwards."""
    with pdaemon.admin() as admin:
        wait_for(lambda: _quiet(admin), timeout=60)
        high, _ = create_session(admin, priority=pb.PRIORITY_HIGH)
        low, token = create_session(admin, priority=pb.PRIORITY_LOW)
    try:
        yield high, low, token
    finally:
        with pdaemon.admin() as admin:
            for sid in (high, low):
                admin.call("DeleteSession", pb.DeleteSessionRequest(session_id=sid, force=True))


def _quiet(admin: Client) -> bool:
    domain = admin.call("GetStatus", pb.GetStatusRequest()).policy.domains[0]
    return domain.level == "none" and domain.calls_held == 0


@dataclass
class Grower:
    """A tool call whose process grows to a size, then holds it until let go."""

    admin: Client
    begun: pb.BeginToolCallResponse
    path: Path
    pid: int
    progress: Path
    release: Path

    def allocated(self) -> int:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int(self.progress.read_text())
        return 0

    def knob(self, name: str) -> str:
        return (self.path / name).read_text().strip()

    def let_go(self) -> None:
        self.release.write_text("go")

    def result(self) -> pb.ToolCallResult:
        try:
            return self.admin.wait(self.begun.call_id, timeout=TIMEOUT)
        finally:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)


def begin(admin: Client, daemon: Daemon, session: str, expected_mib: int, max_mib: int = 0
          ) -> pb.BeginToolCallResponse:
    intent = pb.Intent(tool="grow", argv=["grow"], expected_memory_bytes=expected_mib * MIB,
                       memory_max_bytes=max_mib * MIB)
    return admin.begin(intent, session)


def start(admin: Client, daemon: Daemon, session: str, begun: pb.BeginToolCallResponse, tmp: Path, mib: int, *,
          chunk: int = 16, pause: float = 0.2, hold: float = TIMEOUT) -> Grower:
    progress, release = tmp / f"{begun.call_id}.progress", tmp / f"{begun.call_id}.release"
    argv = [sys.executable, "-c", GROW, str(mib), str(chunk), str(pause), str(progress), str(release), str(hold)]
    path = daemon.session_path(session) / f"tc-{begun.call_id}"
    return Grower(admin, begun, path, admin.spawn(begun, argv), progress, release)


@dataclass
class Watch:
    """A WatchPolicy stream read in a thread; `on_event` runs for each event as it arrives."""

    stream: Any
    events: list[pb.PolicyEvent] = field(default_factory=list)
    on_event: Callable[[pb.PolicyEvent], None] | None = None

    def __post_init__(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        with contextlib.suppress(grpc.RpcError):
            for event in self.stream:
                if self.on_event is not None:
                    self.on_event(event)
                self.events.append(event)

    def kinds(self, call_id: str = "") -> list[str]:
        return [e.kind for e in list(self.events) if not call_id or e.call_id == call_id]

    def stop(self) -> None:
        self.stream.cancel()


def some_stall_us(cgroup: Path) -> int:
    """Total µs some task of the cgroup stalled on memory (PSI)."""
    first = (cgroup / "memory.pressure").read_text().splitlines()[0]
    return int(first.rsplit("total=", 1)[1])


def log_actions(daemon: Daemon, call_id: str) -> list[dict[str, Any]]:
    """The daemon's `policy <action>` log lines about a call."""
    lines = []
    for line in daemon.log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if str(record.get("msg", "")).startswith("policy ") and record.get("call") == call_id:
                lines.append(record)
    return lines


def test_a_growing_low_call_is_throttled_first_and_gets_its_limit_back(
    pdaemon: Daemon, pair: tuple[str, str, str], tmp_path: Path
) -> None:
    """Issue 10 tests 1, 4 and 8: throttled before the HIGH session stalls; the HIGH call is untouched; once
    pressure clears memory.high is back at the call's own limit and stays there (no echo of the throttle's
    stall re-throttles it); the first action's reaction time is logged."""
    high, low, _ = pair
    stall_at_throttle: list[int] = []
    with pdaemon.admin() as admin:
        watch = Watch(admin.watch_policy())

        def note(event: pb.PolicyEvent) -> None:
            if event.kind == "throttle" and not stall_at_throttle:
                stall_at_throttle.append(some_stall_us(pdaemon.session_path(high)))

        watch.on_event = note
        low_call = begin(admin, pdaemon, low, OWN)  # declared, and its own memory.high
        hi = start(admin, pdaemon, high, begin(admin, pdaemon, high, 192), tmp_path, 160)
        wait_for(lambda: hi.allocated() >= 160, timeout=TIMEOUT)
        lo = start(admin, pdaemon, low, low_call, tmp_path, 352, chunk=8)
        try:
            wait_for(lambda: {"throttle", "freeze"} & set(watch.kinds(low_call.call_id)), timeout=TIMEOUT)
            assert watch.kinds(low_call.call_id)[0] == "throttle", watch.kinds()
            lowered = int(lo.knob("memory.high"))
            assert lowered < OWN * MIB  # the kernel holds the call below its own limit now
            time.sleep(1)
            hi.let_go()
            high_result = hi.result()
            # Recovery: memory.high back at the call's own limit, step by step, while the call still runs.
            wait_for(lambda: lo.knob("memory.high") == str(OWN * MIB), timeout=60)
            steady_since = time.monotonic()
            while time.monotonic() - steady_since < 4:  # longer than the kernel's 2 s penalty sleeps
                assert lo.knob("memory.high") == str(OWN * MIB), "re-throttled after recovery"
                time.sleep(0.05)
            wait_for(lambda: lo.allocated() >= 352, timeout=TIMEOUT)
            lo.let_go()
            low_result = lo.result()
        finally:
            hi.let_go()
            lo.let_go()
            watch.stop()
    assert high_result.outcome == pb.OUTCOME_OK and list(high_result.policy_actions) == []
    assert stall_at_throttle and stall_at_throttle[0] < 50_000  # the HIGH session had not stalled 50 ms yet
    assert low_result.outcome == pb.OUTCOME_OK, low_result.feedback
    assert low_result.policy_actions[0] == "throttle" and low_result.policy_actions[-1] == "restore"
    assert low_result.throttled_seconds > 0
    assert lowered < OWN * MIB
    lines = log_actions(pdaemon, low_call.call_id)
    first = lines[0]
    assert first["action"] == "throttle" and first["reaction_ms"] is not None and first["reaction_ms"] >= 0
    print(f"\nreaction to the first action under TCG: {first['reaction_ms']} ms ({first['reason']})")
    # Only an escalation measures a reaction; recovery steps carry none.
    assert all(line["reaction_ms"] is None for line in lines if line["action"] in ("thaw", "restore"))


def test_persistent_pressure_freezes_then_thaws_and_the_stream_tells_both_sides(
    pdaemon: Daemon, pair: tuple[str, str, str], tmp_path: Path
) -> None:
    """Issue 10 tests 2 and 7: a LOW call throttled while the pressure lasts is frozen (cgroup.freeze 1 while
    it ran), thawed once the HIGH call frees its memory, and ends OK; the admin watcher and the LOW session's
    sandbox watcher get the events, the sandbox only its own session's."""
    high, low, token = pair
    with pdaemon.admin() as admin, pdaemon.sandbox(token) as sandbox:
        watch = Watch(admin.watch_policy())
        own = Watch(sandbox.watch_policy())
        low_call = begin(admin, pdaemon, low, OWN)
        hi = start(admin, pdaemon, high, begin(admin, pdaemon, high, 192), tmp_path, 160)
        wait_for(lambda: hi.allocated() >= 160, timeout=TIMEOUT)
        lo = start(admin, pdaemon, low, low_call, tmp_path, 352)
        try:
            wait_for(lambda: "freeze" in watch.kinds(low_call.call_id), timeout=TIMEOUT)
            assert lo.knob("cgroup.freeze") == "1"
            hi.let_go()
            wait_for(lambda: "thaw" in watch.kinds(low_call.call_id), timeout=60)
            assert lo.knob("cgroup.freeze") == "0"
            wait_for(lambda: lo.allocated() >= 352, timeout=TIMEOUT)
            lo.let_go()
            low_result, high_result = lo.result(), hi.result()
            wait_for(lambda: "restore" in own.kinds(low_call.call_id), timeout=30)
        finally:
            hi.let_go()
            lo.let_go()
            watch.stop()
            own.stop()
    assert high_result.outcome == pb.OUTCOME_OK and list(high_result.policy_actions) == []
    assert low_result.outcome == pb.OUTCOME_OK, low_result.feedback
    actions = list(low_result.policy_actions)
    assert actions.index("throttle") < actions.index("freeze") < actions.index("thaw")
    assert low_result.frozen_seconds > 0 and low_result.throttled_seconds > 0
    assert {"pressure", "throttle", "freeze", "thaw", "restore"} <= set(watch.kinds())
    mine = own.kinds(low_call.call_id)
    assert mine.index("throttle") < mine.index("freeze") < mine.index("thaw")
    assert "pressure" in own.kinds()
    assert {e.session_id for e in own.events} <= {"", low}  # nothing of the HIGH session


def test_the_ladder_kills_the_low_call_only_as_a_last_resort(
    pdaemon: Daemon, pair: tuple[str, str, str], tmp_path: Path
) -> None:
    """Issue 10 test 3: the HIGH call keeps growing towards the limit; the LOW call, throttled and frozen first,
    is killed (KILLED_BY_POLICY, retryable, the feedback says why with the memory numbers) before the kernel's
    OOM killer acts; the LOW session's agent process and the HIGH call are untouched."""
    high, low, _ = pair
    agent = spawn_in(pdaemon.session_path(low) / "agent", ["sleep", "600"])
    try:
        with pdaemon.admin() as admin:
            lo = start(admin, pdaemon, low, begin(admin, pdaemon, low, 256), tmp_path, 224, chunk=32, pause=0.05)
            wait_for(lambda: lo.allocated() >= 224, timeout=TIMEOUT)
            hi = start(admin, pdaemon, high, begin(admin, pdaemon, high, 320), tmp_path, 304, chunk=8, pause=0.1)
            try:
                low_result = lo.result()
                wait_for(lambda: hi.allocated() >= 304, timeout=TIMEOUT)
                hi.let_go()
                high_result = hi.result()
            finally:
                hi.let_go()
                lo.let_go()
        assert agent.poll() is None  # the agent's own process lives on
    finally:
        agent.kill()
        agent.wait()
    assert low_result.outcome == pb.OUTCOME_KILLED_BY_POLICY, low_result.feedback
    assert low_result.retryable and low_result.memory_events.oom_kill == 0
    assert list(low_result.policy_actions)[-1] == "kill" and "freeze" in low_result.policy_actions
    assert "yielded to higher-priority sessions" in low_result.feedback and "MiB" in low_result.feedback
    assert "declared 256 MiB" in low_result.feedback
    assert high_result.outcome == pb.OUTCOME_OK and list(high_result.policy_actions) == []


def test_a_low_call_is_held_out_of_memory_a_high_call_declared_and_not_used_yet(
    pdaemon: Daemon, pair: tuple[str, str, str], tmp_path: Path
) -> None:
    """reserve_declared: the HIGH call declared 288 MiB and uses 16; the LOW call grows toward 320 MiB, which
    the domain could hold on its own but not together with what HIGH said it will need. The LOW call is throttled
    (only throttled: a claim never freezes or kills) with the domain far from its limit; once HIGH ends, the LOW
    call gets its limit back and completes."""
    high, low, _ = pair
    with pdaemon.admin() as admin:
        low_call = begin(admin, pdaemon, low, OWN)  # admitted into the empty domain, then HIGH comes
        hi = start(admin, pdaemon, high, begin(admin, pdaemon, high, 288), tmp_path, 16)
        wait_for(lambda: hi.allocated() >= 16, timeout=TIMEOUT)
        lo = start(admin, pdaemon, low, low_call, tmp_path, 320, chunk=8)
        try:
            wait_for(lambda: bool(log_actions(pdaemon, low_call.call_id)), timeout=TIMEOUT)
            first = log_actions(pdaemon, low_call.call_id)[0]
            held_at = lo.allocated()
            time.sleep(3)
            assert lo.allocated() < 320 and lo.knob("cgroup.freeze") == "0"
            hi.let_go()
            assert hi.result().outcome == pb.OUTCOME_OK
            wait_for(lambda: lo.allocated() >= 320, timeout=TIMEOUT)
            lo.let_go()
            low_result = lo.result()
        finally:
            hi.let_go()
            lo.let_go()
    assert first["action"] == "throttle" and "declared by higher-priority calls" in first["reason"], first
    assert first["headroom"] > first["throttle_reserve"] + 64 * MIB, first  # physically, room to spare
    assert first["claimed"] > 128 * MIB, first
    assert held_at < 320
    assert low_result.outcome == pb.OUTCOME_OK, low_result.feedback
    assert set(low_result.policy_actions) <= {"throttle", "restore"}, list(low_result.policy_actions)
    assert list(low_result.policy_actions)[-1] == "restore"


def test_no_flapping_under_a_steady_load(pdaemon: Daemon, pair: tuple[str, str, str], tmp_path: Path) -> None:
    """Issue 10 test 5: a LOW call that grows into pressure (it wants 320 MiB, which would leave less than the
    freeze reserve) is held, and then not flapped while the load stays as it is: no escalation after a recovery
    step, no pressure/clear toggling. At most a step or two of recovery up to the recover mark (it was throttled
    on its growth, with more headroom than the recover reserve left) and nothing after them. Before the fix: it was
    restored in full, grew into pressure, and was throttled and frozen again."""
    high, low, _ = pair
    with pdaemon.admin() as admin:
        watch = Watch(admin.watch_policy())
        low_call = begin(admin, pdaemon, low, OWN)
        hi = start(admin, pdaemon, high, begin(admin, pdaemon, high, 192), tmp_path, 160)
        wait_for(lambda: hi.allocated() >= 160, timeout=TIMEOUT)
        lo = start(admin, pdaemon, low, low_call, tmp_path, 320, chunk=16, pause=0.05)
        try:
            wait_for(lambda: "throttle" in watch.kinds(low_call.call_id), timeout=TIMEOUT)
            time.sleep(1)
            before = len(watch.events)
            time.sleep(6)  # shorter than max_throttle_seconds: a steady load is not frozen within it
            later = [(e.kind, e.call_id) for e in watch.events[before:]]
        finally:
            hi.let_go()
            lo.let_go()
            watch.stop()
        hi.result()
        lo.result()
    story = [(line["action"], line["memory_high"] >> 20, line["headroom"] >> 20, line["projected_headroom"] >> 20,
              line["reason"]) for line in log_actions(pdaemon, low_call.call_id)]
    assert len(watch.kinds(low_call.call_id)[:before]) <= 4, story
    escalated = [kind for kind, _ in later if kind not in ("restore", "thaw", "clear")]
    assert escalated == [], f"still acting on a steady load: {later}; the call's story: {story}"
    assert len(later) <= 3, f"recovery did not settle: {later}; the call's story: {story}"


def test_a_call_over_its_own_declaration_is_no_pressure_on_others(
    pdaemon: Daemon, pair: tuple[str, str, str], tmp_path: Path
) -> None:
    """A HIGH call that outgrows what it declared stalls at its own memory.high (the kernel throttles it); with
    the domain far from its limit that is not contention, so the LOW call next to it is left alone."""
    high, low, _ = pair
    with pdaemon.admin() as admin:
        lo = start(admin, pdaemon, low, begin(admin, pdaemon, low, 128), tmp_path, 96)
        wait_for(lambda: lo.allocated() >= 96, timeout=TIMEOUT)
        hi = start(admin, pdaemon, high, begin(admin, pdaemon, high, 32, max_mib=160), tmp_path, 48, chunk=8,
                   pause=0.05, hold=0)
        try:
            high_result = hi.result()
            time.sleep(1)
        finally:
            lo.let_go()
        low_result = lo.result()
    assert high_result.outcome == pb.OUTCOME_OK and high_result.memory_events.high > 0  # it did stall
    # Before the fix: throttle, restore, throttle, restore... (25 actions) from the HIGH session's own stall.
    assert list(low_result.policy_actions).count("throttle") <= 1, [
        (line["action"], line["reason"], line["stall_pct"]) for line in log_actions(pdaemon, lo.begun.call_id)][:4]


def test_admission_queues_refuses_and_admits_by_priority(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    """Issue 10 test 6: with the domain nearly full, a NORMAL Begin declaring more than is free waits, then is
    refused (RESOURCE_EXHAUSTED, retry after); LOW (admission_low = "refuse") is refused at once; HIGH is
    admitted."""
    d = daemon_factory(policy={"sessions_memory_max": LIMIT, "admission_low": "refuse",
                               "admission_max_wait_seconds": 3.0}).start()
    with d.admin() as admin:
        high, _ = create_session(admin, priority=pb.PRIORITY_HIGH)
        normal, _ = create_session(admin, priority=pb.PRIORITY_NORMAL)
        low, _ = create_session(admin, priority=pb.PRIORITY_LOW)
        watch = Watch(admin.watch_policy())
        hold = start(admin, d, high, begin(admin, d, high, 320), tmp_path, 288, chunk=32, pause=0)
        try:
            wait_for(lambda: hold.allocated() >= 288, timeout=TIMEOUT)
            t0 = time.monotonic()
            queued = rpc_error(begin, admin, d, normal, 200)
            waited = time.monotonic() - t0
            t0 = time.monotonic()
            refused = rpc_error(begin, admin, d, low, 200)
            at_once = time.monotonic() - t0
            admitted = begin(admin, d, high, 200)
            admin.end(admitted.call_id, None)
        finally:
            hold.let_go()
            watch.stop()
        hold.result()
    assert queued.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry after" in queued.details()
    assert "after waiting" in queued.details() and waited >= 3.0
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry after" in refused.details()
    assert "after waiting" not in refused.details() and at_once < waited
    kinds = [(e.session_id, e.kind) for e in watch.events]
    assert (normal, "queue") in kinds and (normal, "refuse") in kinds and (low, "refuse") in kinds
    assert (low, "queue") not in kinds


def test_the_shared_domain_follows_a_memory_max_set_after_start(daemon_factory: Callable[..., Daemon]) -> None:
    """Anyone may change the limit above the calls (an operator, a unit's MemoryMax=): the policy's sessions/
    domain takes the new limit at its next look, not only the one it saw at start."""
    d = daemon_factory().start()
    sessions = d.cgroup_root / "sessions"
    with d.admin() as admin:
        before = admin.call("GetStatus", pb.GetStatusRequest()).policy.domains[0]
        assert before.domain == "sessions" and before.limit_bytes > 700 * MIB
        sid, _ = create_session(admin, "follow")  # the loop watches domains with sessions
        (sessions / "memory.max").write_text(str(700 * MIB))
        try:
            wait_for(lambda: admin.call("GetStatus", pb.GetStatusRequest()).policy.domains[0].limit_bytes
                     == 700 * MIB, timeout=20)
        finally:
            (sessions / "memory.max").write_text("max")
            admin.call("DeleteSession", pb.DeleteSessionRequest(session_id=sid, force=True))


def test_a_run_queued_by_admission_longer_than_a_hold_lives_still_starts(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A command launched held (Client.run over gRPC: HOLD on the join socket, then BeginToolCall naming it) whose
    Begin waits in the admission queue for longer than an unclaimed HOLD lives is still placed once admitted.
    Found by the isolation benchmark: before the fix the held process had been dropped while the Begin waited,
    and the admitted call failed with FAILED_PRECONDITION ("could not place the tool call's process")."""
    from agentd.api.join import HOLD_WAIT_SECONDS

    d = daemon_factory(policy={"sessions_memory_max": LIMIT, "admission_max_wait_seconds": 60.0}).start()
    outcome: dict[str, Any] = {}
    with d.admin() as admin:
        high, _ = create_session(admin, priority=pb.PRIORITY_HIGH)
        normal, _ = create_session(admin, priority=pb.PRIORITY_NORMAL)
        hold = start(admin, d, high, begin(admin, d, high, 320), tmp_path, 288, chunk=32, pause=0)

        def run() -> None:
            with Client(str(d.admin_socket), timeout=TIMEOUT) as client:
                try:
                    outcome["done"] = client.run(["true"], normal, expected_memory_bytes=200 * MIB)
                except Exception as exc:  # the assertion below says what it was
                    outcome["error"] = exc

        runner = threading.Thread(target=run)
        try:
            wait_for(lambda: hold.allocated() >= 288, timeout=TIMEOUT)
            runner.start()
            time.sleep(HOLD_WAIT_SECONDS + 3)
            queued = runner.is_alive()
        finally:
            hold.let_go()
            runner.join(TIMEOUT)
        hold.result()
    assert queued, outcome  # it really waited in the queue past the HOLD's life
    assert "error" not in outcome, outcome["error"]
    assert outcome["done"].result.outcome == pb.OUTCOME_OK and outcome["done"].exit_code == 0


def test_an_episode_the_held_calls_already_answer_measures_no_reaction(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    """Reaction time is from an episode's onset to the ladder's answer. A LOW call frozen in a first episode is
    still held (a long recover dwell) when pressure clears and comes back: the second episode's first decision
    ends with the call held, which is its answer, so the kill that comes later carries no reaction time. Found by
    setup B: a kill 2 s into such an episode was logged as a 2006 ms reaction."""
    d = daemon_factory(policy={"sessions_memory_max": LIMIT, "recover_dwell_seconds": 600.0,
                               "max_throttle_seconds": 0.5, "max_freeze_seconds": 600.0,
                               "reserve_declared": False}).start()
    ctl = str(tmp_path / "high")
    with d.admin() as admin:
        high, _ = create_session(admin, priority=pb.PRIORITY_HIGH)
        low, _ = create_session(admin, priority=pb.PRIORITY_LOW)
        watch = Watch(admin.watch_policy())
        lo = start(admin, d, low, begin(admin, d, low, 256), tmp_path, 192, chunk=16, pause=0.05)
        high_call = begin(admin, d, high, 320)
        hi_pid = -1
        try:
            wait_for(lambda: lo.allocated() >= 192, timeout=TIMEOUT)
            hi_pid = admin.spawn(high_call, [sys.executable, "-c", STEPS, "4", "0.15", "400", "96", ctl])
            wait_for(lambda: "freeze" in watch.kinds(lo.begun.call_id), timeout=TIMEOUT)
            Path(ctl + ".stop").touch()
            Path(ctl + ".drop").touch()
            wait_for(lambda: "clear" in watch.kinds(), timeout=TIMEOUT)
            assert lo.knob("cgroup.freeze") == "1"  # still held: the dwell is long
            Path(ctl + ".regrow").touch()
            low_result = lo.result()
            Path(ctl + ".release").touch()
            high_result = admin.wait(high_call.call_id, timeout=TIMEOUT)
        finally:
            for flag in ("stop", "drop", "regrow", "release"):
                Path(f"{ctl}.{flag}").touch()
            lo.let_go()
            watch.stop()
            if hi_pid > 0:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(hi_pid, 0)
    kinds = watch.kinds()
    assert kinds.count("pressure") >= 2 and kinds.index("clear") < len(kinds) - 1 - kinds[::-1].index("pressure")
    assert low_result.outcome == pb.OUTCOME_KILLED_BY_POLICY, low_result.feedback
    assert high_result.outcome == pb.OUTCOME_OK and list(high_result.policy_actions) == []
    lines = log_actions(d, lo.begun.call_id)
    assert lines[0]["action"] in ("throttle", "freeze") and lines[0]["reaction_ms"] is not None, lines[0]
    assert lines[-1]["action"] == "kill", lines[-1]
    assert all(line["reaction_ms"] is None for line in lines[1:]), [(x["action"], x["reaction_ms"]) for x in lines]
