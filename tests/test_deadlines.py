"""The calls' deadlines on a real event loop: run in time order, never early, cancelled ones never; an earlier one
added later re-arms the loop's single timer; cancelled entries are swept; one failing callback spares the others."""

from __future__ import annotations

import asyncio
import logging

import pytest

from agentd.core import deadlines
from agentd.core.deadlines import Deadlines


def run(body: object) -> None:
    asyncio.run(body)  # type: ignore[arg-type]


def test_due_ones_run_in_order_never_early_and_cancelled_ones_never() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        d = Deadlines(loop)
        ran: list[tuple[str, float]] = []
        start = loop.time()
        note = lambda name: ran.append((name, loop.time() - start))  # noqa: E731
        d.call_later(0.06, note, "c")
        d.call_later(0.02, note, "a")
        cancelled = d.call_later(0.03, note, "never")
        d.call_later(0.04, note, "b")
        d.call_later(0.04, note, "b2")  # the same time: in the order added
        cancelled.cancel()
        await asyncio.sleep(0.15)
        assert [name for name, _ in ran] == ["a", "b", "b2", "c"]
        for (_, at), due in zip(ran, (0.02, 0.04, 0.04, 0.06), strict=True):
            assert at >= due - 0.001  # the loop's clock resolution, no more
        assert len(d) == 0
        d.close()

    run(body())


def test_an_earlier_deadline_added_later_rearms() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        d = Deadlines(loop)
        ran: list[str] = []
        d.call_later(600.0, ran.append, "timeout")
        d.call_later(0.02, ran.append, "soon")
        await asyncio.sleep(0.08)
        assert ran == ["soon"]
        d.close()  # the 600 s one never runs and leaves no timer behind
        assert len(d) == 0

    run(body())


def test_cancelled_entries_are_swept_and_the_live_ones_still_run() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        d = Deadlines(loop)
        ran: list[int] = []
        live = [d.call_later(0.05, ran.append, n) for n in range(3)]
        doomed = [d.call_later(600.0, ran.append, -1) for _ in range(deadlines.SWEEP_MIN_CANCELLED * 2)]
        for deadline in doomed:
            deadline.cancel()
            deadline.cancel()  # twice: counted once
        assert len(d) < deadlines.SWEEP_MIN_CANCELLED * 2  # swept once cancelled ones were most of the heap
        await asyncio.sleep(0.12)
        assert ran == [0, 1, 2] and all(deadline.done for deadline in live)
        d.close()

    run(body())


def test_a_failing_callback_spares_the_others(caplog: pytest.LogCaptureFixture) -> None:
    def fail() -> None:
        raise RuntimeError("boom")

    async def body() -> None:
        loop = asyncio.get_running_loop()
        d = Deadlines(loop)
        ran: list[str] = []
        d.call_later(0.02, fail)
        d.call_later(0.02, ran.append, "after")
        d.call_later(0.04, ran.append, "later")
        await asyncio.sleep(0.1)
        assert ran == ["after", "later"]
        d.close()

    with caplog.at_level(logging.ERROR, logger="agentd.core.deadlines"):
        run(body())
    assert [r.getMessage() for r in caplog.records] == ["deadline callback failed"]


def test_a_callback_cancelling_others_while_they_are_due() -> None:
    """A timeout's kill may end other calls: the deadlines it cancels, due in the same turn, do not run."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        d = Deadlines(loop)
        ran: list[str] = []
        others: list[deadlines.Deadline] = []

        def first() -> None:
            ran.append("first")
            for deadline in others:
                deadline.cancel()  # due in this same turn; the cancels sweep the heap in the middle of it

        d.call_later(0.02, first)
        others.extend(d.call_later(0.02, ran.append, "other") for _ in range(deadlines.SWEEP_MIN_CANCELLED * 2))
        d.call_later(0.05, ran.append, "last")
        await asyncio.sleep(0.1)
        assert ran == ["first", "last"] and len(d) == 0
        d.close()

    run(body())
