"""The policy's reaction time: from the signal that began a domain's pressure episode to the ladder's answer.

The answer is the episode's first escalation (throttle, freeze or kill). An episode the ladder had already
answered has no reaction time: when a decision of the episode ends with calls of the domain held and nothing
escalated, those holds are the answer (an episode announced while the previous one's victims are still held or
being restored), and an escalation that comes later (say, the kill after every victim was frozen) is the ladder
going further, not its reaction. An episode that clears before any answer has none either.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ReactionClock:
    """The onset of each domain's unanswered episode (monotonic seconds)."""

    _onset: dict[str, float] = field(default_factory=dict)

    def began(self, domain: str, onset: float) -> None:
        """An episode was announced; a signal earlier in the same unanswered episode keeps its place."""
        self._onset.setdefault(domain, onset)

    def cleared(self, domain: str) -> None:
        self._onset.pop(domain, None)

    def escalated(self, domain: str, now: float) -> float | None:
        """The ladder escalated: the reaction in seconds when this answers the episode, else None."""
        onset = self._onset.pop(domain, None)
        return now - onset if onset is not None else None

    def decided(self, domain: str, holding: bool) -> None:
        """A decision of the domain ended; `holding`: the ladder holds calls of it."""
        if holding:
            self._onset.pop(domain, None)
