"""The watch between episodes, as pure functions: whether a reading of a domain's usage calls for a decision,
when to read it next, and when the pressure it found began.

No kernel signal warns of anonymous memory nearing a limit (see loop.py), so the loop reads the usage of a
domain that runs calls. It reads no more often than it must: the next reading comes before a domain growing at
`max_growth` from now could bring the decision's projection (headroom less `lookahead_seconds` of growth) to the
throttle reserve, within [watch_seconds, WATCH_PACE_MAX_SECONDS]. `max_growth` is how fast the machine can hand out
memory at all (kernel/fault_rate.py, or `[policy] watch_max_growth`), so a domain far from its reserve is read a
few times a second, one near it every watch_seconds, and no growth the machine can produce slips between readings.
A reading is judged by the decision's own growth and the growth over a window as long as the decision's (at least
half the lookahead), not over the 20 ms since the previous reading: the watch must count at least what the decision
will project to miss nothing it would call pressure, and one allocation step between two readings is no GiB/s.
"""

from __future__ import annotations

from agentd.policy.assess import domain_growth
from agentd.policy.model import Assessment, LadderMemory
from agentd.policy.settings import PolicyConfig

# The longest the watch waits between two readings of a domain that runs calls, however far from its reserve:
# a bound on how stale the usage in GetStatus and the metrics gets, and a reading that finds a cleared claim or a
# lowered limit soon enough.
WATCH_PACE_MAX_SECONDS = 0.25
# The watch assumes a domain can grow this many times faster than one CPU per usable CPU faults pages in:
# allocators and THP can beat the probe's 4 KiB faults.
GROWTH_SAFETY = 2.0


def max_growth(fault_rate: float, cpus: int) -> float:
    """The fastest (bytes/s) a domain is taken to grow: every CPU faulting at the measured rate, with a margin."""
    return GROWTH_SAFETY * fault_rate * max(cpus, 1)


def margin(last: Assessment, usage: int) -> int:
    """What a domain at `usage` may still grow before its headroom (less what is claimed) is at the throttle
    reserve, by the previous decision's limit, claims and reserves."""
    return last.limit - usage - last.claimed - last.reserves["throttle"]


Reading = tuple[int, float]  # a domain's usage, when (monotonic)


def remember(readings: tuple[Reading, ...], usage: int, now: float, config: PolicyConfig) -> tuple[Reading, ...]:
    """The watch's readings with this one added, less those no growth window needs any more (the newest reading
    at least half the lookahead old is the oldest kept)."""
    kept = (*readings, (usage, now))
    window = config.lookahead_seconds / 2
    while len(kept) > 1 and now - kept[1][1] >= window:
        kept = kept[1:]
    return kept


def watch_growth(memory: LadderMemory, readings: tuple[Reading, ...], usage: int, now: float,
                 config: PolicyConfig) -> float:
    """The growth a reading is judged by: the faster of the decision's own (since its growth sample) and the
    usage's over the last half lookahead at least (from the newest earlier reading that old, the oldest while
    none is). Between two readings 20 ms apart one allocation step reads as a GiB/s; over a window as long as
    the decision's it does not, and the decision would find no pressure in it either."""
    base = next((r for r in reversed(readings) if now - r[1] >= config.lookahead_seconds / 2),
                readings[0] if readings else None)
    return max(domain_growth(memory, usage, now, config), _growth(usage, base, now))


def watch_trips(last: Assessment, usage: int, growth: float, config: PolicyConfig) -> bool:
    """Whether a reading calls for a decision: the headroom it reads, minus the lookahead at `growth`
    (watch_growth) and the claim of the previous decision, is below the throttle reserve. The decision's own
    projection counts no more growth than its plain growth, which watch_growth includes, so nothing that would
    be pressure is missed."""
    return margin(last, usage) - growth * config.lookahead_seconds < 0


def watch_delay(last: Assessment, usage: int, growth_bound: float, config: PolicyConfig) -> float:
    """Seconds until the next reading: before growth at `growth_bound` from `usage` could trip watch_trips (its
    lookahead included). A bound of 0 or less reads every watch_seconds."""
    if growth_bound <= 0:
        return config.watch_seconds
    delay = margin(last, usage) / growth_bound - config.lookahead_seconds
    return min(max(delay, config.watch_seconds), WATCH_PACE_MAX_SECONDS)


def watch_onset(last: Assessment, usage: int, growth: float, previous: Reading | None, now: float,
                config: PolicyConfig) -> float | None:
    """When the pressure a tripping reading found began: where the projection (at `growth`) crossed the throttle
    reserve, the usage taken to grow linearly between the previous reading and this one. The previous reading's
    time when it was already past it then, or when the usage did not grow (what changed is not the usage); None
    without a previous reading."""
    if previous is None:
        return None
    before, at = previous
    above = margin(last, before) - growth * config.lookahead_seconds
    if above <= 0 or usage <= before or now <= at:
        return at
    return min(at + above * (now - at) / (usage - before), now)


def _growth(usage: int, previous: Reading | None, now: float) -> float:
    if previous is None or now <= previous[1]:
        return 0.0
    return max((usage - previous[0]) / (now - previous[1]), 0.0)
