"""The policy's reaction time (agentd/policy/reaction.py): from an episode's onset to the ladder's answer."""

from agentd.policy.reaction import ReactionClock


def test_the_first_escalation_answers_the_episode_and_is_timed_from_its_onset() -> None:
    clock = ReactionClock()
    clock.began("sessions", 10.0)
    clock.began("sessions", 10.02)  # a later signal of the same episode does not move its onset
    reaction = clock.escalated("sessions", 10.05)
    assert reaction is not None and abs(reaction - 0.05) < 1e-9
    assert clock.escalated("sessions", 10.1) is None  # answered: a further escalation is no reaction
    clock.decided("sessions", holding=True)
    assert clock.escalated("sessions", 11.0) is None


def test_an_onset_the_ladder_cannot_answer_yet_keeps_counting_until_it_can() -> None:
    clock = ReactionClock()
    clock.began("sessions", 10.0)
    clock.decided("sessions", holding=False)  # no victim yet: nothing held, nothing escalated
    reaction = clock.escalated("sessions", 10.3)
    assert reaction is not None and abs(reaction - 0.3) < 1e-9


def test_an_episode_announced_while_calls_are_held_was_answered_before_it_began() -> None:
    """Setup B: every LOW call frozen, pressure announced again while they were being thawed; the kill 2 s later
    is the ladder going further, not a reaction of 2 s."""
    clock = ReactionClock()
    clock.began("sessions", 10.0)
    clock.decided("sessions", holding=True)
    assert clock.escalated("sessions", 12.0) is None


def test_an_episode_that_clears_unanswered_has_no_reaction_and_the_next_one_starts_afresh() -> None:
    clock = ReactionClock()
    clock.began("sessions", 10.0)
    clock.cleared("sessions")
    clock.began("sessions", 20.0)
    assert clock.escalated("sessions", 20.04) == 20.04 - 20.0


def test_domains_are_timed_apart() -> None:
    clock = ReactionClock()
    clock.began("sessions", 10.0)
    clock.began("s1", 11.0)
    clock.decided("sessions", holding=True)
    reaction = clock.escalated("s1", 11.5)
    assert reaction is not None and abs(reaction - 0.5) < 1e-9
