"""The ladder's projection of a domain's growth is measured over at least the lookahead, so that tick-to-tick
jitter does not read as a burst (pure; found by the guest tests: 2 MiB of jitter over 20 ms projected 20 MiB)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from support import LADDER_TEST_TUNING

from agentd.core.sessions import Priority
from agentd.policy.ladder import decide
from agentd.policy.model import CallView, DomainState, LadderMemory, Level
from agentd.policy.settings import PolicyConfig
from agentd.policy.snapshot import AT_HIGH_SECONDS, HighMeter

MIB = 1 << 20
LIMIT = 1024 * MIB


def test_jitter_between_ticks_is_not_a_burst() -> None:
    config = PolicyConfig(**LADDER_TEST_TUNING)  # type: ignore[arg-type]
    # Steady just above the freeze reserve's projection margin: 100 MiB of headroom, usage wobbling by 6 MiB.
    calls = (CallView("low", "s-low", Priority.LOW, 300 * MIB, 300 * MIB, 0, 0),)
    memory, now, levels = LadderMemory(), 0.0, []
    for step in range(60):
        usage = LIMIT - 100 * MIB + (6 * MIB if step % 2 else 0)
        decision = decide(DomainState("sessions", LIMIT, usage), calls, config, now, memory)
        memory, now = decision.memory, now + 0.02
        levels.append(decision.assessment.level)
    assert Level.FREEZE not in levels and Level.KILL not in levels


def test_a_real_burst_is_still_projected() -> None:
    config = PolicyConfig(**LADDER_TEST_TUNING)  # type: ignore[arg-type]
    calls = (CallView("low", "s-low", Priority.LOW, 300 * MIB, 300 * MIB, 0, 0),)
    memory, now, projected = LadderMemory(), 0.0, []
    for step in range(30):  # 1 GiB/s from 400 MiB of headroom
        usage = LIMIT - 400 * MIB + int(step * 0.02 * 1024 * MIB)
        decision = decide(DomainState("sessions", LIMIT, usage), calls, config, now, memory)
        memory, now = decision.memory, now + 0.02
        projected.append(decision.assessment.projected_headroom)
        if decision.actions:
            break
    assert decision.actions and decision.actions[0].kind.value == "throttle"
    assert min(projected) < LIMIT - usage  # the projection ran ahead of the headroom itself


def test_a_victim_frozen_too_long_under_lasting_pressure_is_killed() -> None:
    """Freezing frees nothing: when the pressure lasts, the frozen victim gives way for good after
    max_freeze_seconds instead of waiting for its own timeout (found in the guest: two calls of a budgeted
    session that together exceed its budget stayed frozen)."""
    config = PolicyConfig(**LADDER_TEST_TUNING)  # type: ignore[arg-type]
    low = CallView("low", "s-low", Priority.LOW, 400 * MIB, 100 * MIB, 0, 0)
    memory, now, kinds = LadderMemory(), 0.0, []
    while now < config.max_throttle_seconds + config.max_freeze_seconds + 5:
        # Headroom just under the throttle reserve, steady: pressure without an OOM in sight.
        state = DomainState("s", LIMIT, LIMIT - 100 * MIB)
        decision = decide(state, (low,), config, now, memory)
        kinds += [a.kind.value for a in decision.actions]
        memory, now = decision.memory, now + 0.5
        if "freeze" in kinds and not low.frozen:
            low = CallView(low.id, low.session_id, low.priority, low.usage, low.expected, 0, 0, frozen=True)
        if "kill" in kinds:
            break
    assert kinds.index("freeze") < kinds.index("kill")
    frozen_at = memory.calls["low"].frozen_since
    assert frozen_at is not None and now - 0.5 - frozen_at >= config.max_freeze_seconds


def test_a_bounded_call_projects_no_more_than_its_room() -> None:
    """A call catching up to its memory.high (here 40 MiB below it, growing 1 GiB/s) adds at most those 40 MiB
    to the projection; the same growth of an unbounded call is projected in full."""
    config = PolicyConfig(**LADDER_TEST_TUNING)  # type: ignore[arg-type]
    projections = {}
    for high in (340 * MIB, 0):
        calls = (CallView("low", "s-low", Priority.LOW, 300 * MIB, 300 * MIB, high, 0),)
        memory, now = LadderMemory(), 0.0
        for step in range(6):  # 100 ms at 1 GiB/s, sampled every 20 ms
            usage = 300 * MIB + int(step * 0.02 * 1024 * MIB)
            calls = (CallView("low", "s-low", Priority.LOW, usage, 300 * MIB, high, 0),)
            decision = decide(DomainState("sessions", LIMIT, 500 * MIB + usage), calls, config, now, memory)
            memory, now = decision.memory, now + 0.02
        a = decision.assessment
        projections[high] = a.headroom - a.projected_headroom
    plain = int(1024 * MIB * config.lookahead_seconds)
    assert projections[0] >= plain * 0.9  # unbounded: the growth extrapolated
    assert projections[340 * MIB] <= 40 * MIB < projections[0]  # bounded: its room at most


def test_the_high_meter_says_a_call_hit_its_memory_high_lately(tmp_path: Path) -> None:
    """Recovery's "wants more": memory.events `high` rose within AT_HIGH_SECONDS, whoever read it last."""
    events = tmp_path / "memory.events"
    call = SimpleNamespace(id="c1", path=tmp_path)
    meter = HighMeter()
    events.write_text("low 0\nhigh 5\nmax 0\noom 0\noom_kill 0\n")
    assert not meter.at_high(call, 10.0)  # the first reading is the baseline
    events.write_text("low 0\nhigh 9\nmax 0\noom 0\noom_kill 0\n")
    assert meter.at_high(call, 10.5) and meter.at_high(call, 11.0)  # a second reader gets the same answer
    assert not meter.at_high(call, 10.5 + AT_HIGH_SECONDS + 0.1)  # no rise since: it stopped pressing
    meter.retain(set())
    assert not meter.at_high(call, 20.0)  # forgotten: a baseline again
