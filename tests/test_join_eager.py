"""A join-socket request's coroutine run at once up to its first wait, then resumed in a task: it sees what it waits
on (a result, an error, a turn of the loop, a cancellation) exactly as if a task had run it from the start."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from agentd.api.join.eager import Resumed, first_step


def test_a_coroutine_that_never_waits_finishes_in_the_first_step() -> None:
    seen: list[str] = []

    async def work() -> None:
        seen.append("ran")

    assert first_step(work()) is None
    assert seen == ["ran"]


def test_a_waiting_coroutine_goes_on_in_a_task_from_where_it_stopped() -> None:
    async def main() -> list[object]:
        loop = asyncio.get_running_loop()
        seen: list[object] = []
        first, second = loop.create_future(), loop.create_future()

        async def work() -> None:
            seen.append("before")
            seen.append(await first)
            await asyncio.sleep(0)  # a bare turn of the loop
            try:
                await second
            except ValueError as exc:
                seen.append(str(exc))
            seen.append("after")

        coroutine = work()
        waiting = first_step(coroutine)
        assert waiting is not None and seen == ["before"]
        task = loop.create_task(_awaiting(coroutine, waiting))
        await asyncio.sleep(0)
        first.set_result(1)
        await asyncio.sleep(0.01)
        second.set_exception(ValueError("refused"))
        await task
        return seen

    assert asyncio.run(main()) == ["before", 1, "refused", "after"]


def test_a_coroutine_stopped_at_a_bare_yield_waits_one_turn() -> None:
    async def main() -> list[str]:
        seen: list[str] = []

        async def work() -> None:
            await asyncio.sleep(0)
            seen.append("resumed")

        coroutine = work()
        waiting = first_step(coroutine)
        assert waiting is not None and not seen
        await _awaiting(coroutine, waiting)
        return seen

    assert asyncio.run(main()) == ["resumed"]


def test_cancelling_the_task_cancels_the_coroutine_where_it_waits() -> None:
    async def main() -> list[str]:
        seen: list[str] = []
        never = asyncio.get_running_loop().create_future()

        async def work() -> None:
            try:
                await never
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise
            finally:
                seen.append("cleaned up")

        coroutine = work()
        task = asyncio.get_running_loop().create_task(_awaiting(coroutine, first_step(coroutine)))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert never.cancelled()
        return seen

    assert asyncio.run(main()) == ["cancelled", "cleaned up"]


async def _awaiting(coroutine: Coroutine[Any, Any, None], waiting: Any) -> None:
    await Resumed(coroutine, waiting)
