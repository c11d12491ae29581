"""The watch's pace (policy/pace.py, pure) and the page-fault rate it is bounded by (kernel/fault_rate.py, on
this kernel)."""

from __future__ import annotations

from types import MappingProxyType

from hypothesis import given
from hypothesis import strategies as st

from agentd.kernel.fault_rate import page_fault_rate, usable_cpus
from agentd.policy.model import Assessment, Level
from agentd.policy.pace import WATCH_PACE_MAX_SECONDS, margin, max_growth, watch_delay, watch_onset, watch_trips
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
    if delay <= CONFIG.watch_seconds or watch_trips(a, usage, None, 0.0, CONFIG):
        return
    growth = bound * share
    for t in (delay / 4, delay / 2, delay):
        grown = usage + int(growth * t)
        assert not watch_trips(a, grown, (usage, 0.0), t, CONFIG), (t, grown, margin(a, grown))


def test_the_onset_is_where_the_projection_crossed_the_reserve_between_two_readings() -> None:
    a = last()
    # At the previous reading 100 MiB of margin; 1 GiB/s since: the projection (200 MiB of lookahead) was past
    # the reserve already then.
    before = LIMIT - RESERVE - 100 * M
    assert watch_onset(a, before + 100 * M, (before, 1.0), 1.1, CONFIG) == 1.0
    # 300 MiB of margin, 500 MiB/s: the projection had 200 MiB to go, crossed 0.4 s after the previous reading.
    before = LIMIT - RESERVE - 300 * M
    onset = watch_onset(a, before + 250 * M, (before, 1.0), 1.5, CONFIG)
    assert onset is not None and abs(onset - 1.4) < 1e-9
    assert watch_onset(a, before, (before, 1.0), 1.5, CONFIG) == 1.0  # no growth: what changed is not the usage
    assert watch_onset(a, before, None, 1.5, CONFIG) is None


def test_the_growth_bound_is_every_cpu_faulting_with_a_margin() -> None:
    assert max_growth(1 * G, 4) == 8 * G
    assert max_growth(1 * G, 0) == 2 * G


def test_this_kernel_faults_pages_in_at_a_plausible_rate() -> None:
    rate = page_fault_rate(4 * M, 1)
    assert 16 * M < rate < 1024 * G, rate  # even an emulator faults 16 MiB/s; no memory is a TiB/s
    assert usable_cpus() >= 1
