"""The watch's pace (policy/pace.py, pure) and the page-fault rate it is bounded by (kernel/fault_rate.py, on
this kernel)."""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

from hypothesis import given
from hypothesis import strategies as st

from agentd.kernel.fault_rate import page_fault_rate, usable_cpus
from agentd.policy.ladder import decide
from agentd.policy.model import Assessment, DomainState, LadderMemory, Level
from agentd.policy.pace import (
    WATCH_PACE_MAX_SECONDS,
    Reading,
    margin,
    max_growth,
    remember,
    watch_delay,
    watch_growth,
    watch_onset,
    watch_trips,
)
from agentd.policy.settings import PolicyConfig

M = 1 << 20
G = 1 << 30
CONFIG = PolicyConfig()  # watch_seconds 0.02, lookahead_seconds 0.2
LIMIT = 1100 * M
RESERVE = 64 * M


def last(claimed: int = 0) -> Assessment:
    reserves = MappingProxyType({"emergency": 16 * M, "kill": 24 * M, "freeze": 40 * M, "throttle": RESERVE,
                                 "recover": 96 * M})
    return Assessment("sessions", LIMIT, 500 * M, LIMIT - 500 * M, LIMIT - 500 * M, 0.0, None, Level.NONE, False,
                      True, reserves, claimed=claimed)


def test_far_from_the_reserve_the_watch_reads_seldom_and_near_it_every_watch_seconds() -> None:
    a = last()
    assert watch_delay(a, 300 * M, 1 * G, CONFIG) == WATCH_PACE_MAX_SECONDS  # 736 MiB of margin: 0.72 s - 0.2
    assert watch_delay(a, LIMIT - RESERVE - 100 * M, 1 * G, CONFIG) == CONFIG.watch_seconds  # 0.1 s - 0.2
    between = watch_delay(a, LIMIT - RESERVE - 300 * M, 1 * G, CONFIG)
    assert abs(between - (300 / 1024 - 0.2)) < 1e-9
    assert watch_delay(a, 300 * M, 0.0, CONFIG) == CONFIG.watch_seconds  # no bound: the fixed watch
    # What is claimed is margin the domain does not have.
    assert watch_delay(last(claimed=600 * M), 300 * M, 1 * G, CONFIG) == CONFIG.watch_seconds


@given(usage=st.integers(0, LIMIT), bound=st.floats(64 * M, 64 * G), share=st.floats(0.0, 0.999),
       claimed=st.integers(0, 200 * M))
def test_no_growth_within_the_bound_trips_the_watch_before_its_next_reading(
    usage: int, bound: float, share: float, claimed: int
) -> None:
    """The pace's promise: growing at any rate up to the bound from a reading, the domain would not have tripped
    the watch by the next reading (unless it is already read as often as watch_seconds allows)."""
    a = last(claimed)
    delay = watch_delay(a, usage, bound, CONFIG)
    if delay <= CONFIG.watch_seconds or watch_trips(a, usage, 0.0, CONFIG):
        return
    growth = bound * share
    for t in (delay / 4, delay / 2, delay):
        grown = usage + int(growth * t)
        judged = watch_growth(LadderMemory(), ((usage, 0.0),), grown, t, CONFIG)
        assert not watch_trips(a, grown, judged, CONFIG), (t, grown, margin(a, grown), judged)


def readings_every(step: float, until: float, usage_at: dict[float, int], base: int) -> tuple[Reading, ...]:
    """The watch's readings every `step` seconds up to `until` (excluded): `base`, or usage_at's value from its
    time on."""
    kept: tuple[Reading, ...] = ()
    t = 0.0
    while t < until - 1e-9:
        usage = base
        for since, value in sorted(usage_at.items()):
            if t >= since - 1e-9:
                usage = value
        kept = remember(kept, usage, t, CONFIG)
        t = round(t + step, 6)
    return kept


def test_one_allocation_step_between_two_readings_does_not_trip_the_watch_but_sustained_growth_does() -> None:
    """The watch judged a reading by the growth since the previous one, 20 ms before: one 10 MiB step read as
    500 MiB/s, 100 MiB within the lookahead, and bought a decision that found no pressure. Over the decision's
    window (half the lookahead) it is 100 MiB/s."""
    a = last()
    usage = LIMIT - RESERVE - 60 * M  # 60 MiB of margin
    memory = LadderMemory(last_usage=usage, last_seen=0.0)
    steady = readings_every(0.02, 0.5, {}, usage)
    stepped = usage + 10 * M
    assert (stepped - usage) / 0.02 * CONFIG.lookahead_seconds > 60 * M  # what the 20 ms growth projected
    growth = watch_growth(memory, steady, stepped, 0.5, CONFIG)
    assert growth <= 10 * M / (CONFIG.lookahead_seconds / 2) + 1
    assert not watch_trips(a, stepped, growth, CONFIG)
    # Growing at 1 GiB/s for 0.1 s: judged over 0.1-0.12 s, ~0.8 GiB/s, 170 MiB within the lookahead: it trips.
    ramp = {0.5 + i * 0.02: usage + int(G * i * 0.02) for i in range(1, 6)}
    climbing = readings_every(0.02, 0.6, ramp, usage)
    now_usage = usage + int(G * 0.1)
    growth = watch_growth(replace(memory, last_seen=0.45), climbing, now_usage, 0.6, CONFIG)
    assert growth >= 0.8 * G
    assert watch_trips(a, now_usage, growth, CONFIG)


def test_the_watch_keeps_only_the_readings_its_window_needs() -> None:
    kept = readings_every(0.02, 2.0, {}, 500 * M)
    window = CONFIG.lookahead_seconds / 2
    newest = kept[-1][1]
    assert newest - kept[0][1] >= window  # one reading at least the window old
    assert newest - kept[1][1] < window  # and only one
    assert len(kept) <= window / 0.02 + 2
    # Readings far apart: the previous one is old enough on its own.
    assert remember(((500 * M, 0.0),), 501 * M, 0.25, CONFIG) == ((500 * M, 0.0), (501 * M, 0.25))
    assert remember(((500 * M, 0.0), (501 * M, 0.25)), 502 * M, 0.5, CONFIG) == ((501 * M, 0.25), (502 * M, 0.5))


@given(sample=st.integers(0, LIMIT), sample_age=st.floats(0.0, 2.0), last_growth=st.floats(-G, 4 * G),
       earlier=st.lists(st.tuples(st.integers(0, LIMIT), st.floats(0.001, 1.0)), max_size=8),
       usage=st.integers(0, LIMIT))
def test_what_the_decision_calls_pressure_the_watch_never_lets_pass(
    sample: int, sample_age: float, last_growth: float, earlier: list[tuple[int, float]], usage: int
) -> None:
    """Whatever the readings, a reading at which the decision's projection is below the throttle reserve trips
    the watch (no calls: the projection is the plain one; no claim, stall or events)."""
    now = 10.0
    memory = LadderMemory(last_usage=sample, last_seen=now - sample_age, growth=last_growth)
    state = DomainState("sessions", LIMIT, usage)
    previous = decide(DomainState("sessions", LIMIT, sample), [], CONFIG, now - sample_age - 0.001,
                      LadderMemory()).assessment
    readings: tuple[Reading, ...] = ()
    for value, age in sorted(earlier, key=lambda r: -r[1]):
        readings = remember(readings, value, now - age, CONFIG)
    decided = decide(state, [], CONFIG, now, memory).assessment
    if decided.projected_headroom < decided.reserves["throttle"]:
        assert watch_trips(previous, usage, watch_growth(memory, readings, usage, now, CONFIG), CONFIG)


def test_the_onset_is_where_the_projection_crossed_the_reserve_between_two_readings() -> None:
    a = last()
    # At the previous reading 100 MiB of margin; 1 GiB/s since: the projection (200 MiB of lookahead) was past
    # the reserve already then.
    before = LIMIT - RESERVE - 100 * M
    assert watch_onset(a, before + 100 * M, G, (before, 1.0), 1.1, CONFIG) == 1.0
    # 300 MiB of margin, 500 MiB/s: the projection had 200 MiB to go, crossed 0.4 s after the previous reading.
    before = LIMIT - RESERVE - 300 * M
    half = 500 * M
    onset = watch_onset(a, before + 250 * M, half, (before, 1.0), 1.5, CONFIG)
    assert onset is not None and abs(onset - 1.4) < 1e-9
    # The growth judged over a longer window (250 MiB/s, 50 MiB of lookahead): 250 MiB to go of the 250 MiB read
    # since, crossed at this reading.
    onset = watch_onset(a, before + 250 * M, 250 * M, (before, 1.0), 1.5, CONFIG)
    assert onset is not None and abs(onset - 1.5) < 1e-9
    assert watch_onset(a, before, half, (before, 1.0), 1.5, CONFIG) == 1.0  # no growth: what changed is not usage
    assert watch_onset(a, before, half, None, 1.5, CONFIG) is None


def test_the_growth_bound_is_every_cpu_faulting_with_a_margin() -> None:
    assert max_growth(1 * G, 4) == 8 * G
    assert max_growth(1 * G, 0) == 2 * G


def test_this_kernel_faults_pages_in_at_a_plausible_rate() -> None:
    rate = page_fault_rate(4 * M, 1)
    assert 16 * M < rate < 1024 * G, rate  # even an emulator faults 16 MiB/s; no memory is a TiB/s
    assert usable_cpus() >= 1
