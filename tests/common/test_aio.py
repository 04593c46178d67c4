"""bastion_common.aio.cancel against a task that loses its first cancellation."""

from __future__ import annotations

import asyncio

import pytest

from bastion_common.aio import cancel


async def test_a_task_that_swallows_a_cancellation_is_cancelled_again():
    # What Python 3.11's wait_for does when the cancel lands as its inner
    # future finishes (CPython gh-86296): the task goes on as if not cancelled.
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            asyncio.current_task().uncancel()
            swallowed.set()
        await asyncio.sleep(3600)

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)  # let it reach its first sleep
    # Not wait_for(cancel(task)): its own cancel at the timeout would reach the task.
    ending = asyncio.create_task(cancel(task))
    await asyncio.wait({ending}, timeout=5)
    assert ending.done() and swallowed.is_set() and task.cancelled()


async def test_what_the_task_raised_comes_out():
    async def failing() -> None:
        raise ValueError("boom")

    task = asyncio.create_task(failing())
    await asyncio.sleep(0)
    with pytest.raises(ValueError, match="boom"):
        await cancel(task)


async def test_cancelling_the_caller_is_not_swallowed():
    giving_up = asyncio.Event()

    async def stubborn() -> None:
        while not giving_up.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if giving_up.is_set():
                    raise
                asyncio.current_task().uncancel()

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    caller = asyncio.create_task(cancel(task))
    await asyncio.sleep(0.1)  # it has cancelled at least twice by now
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert not task.done()
    giving_up.set()
    ending = asyncio.create_task(cancel(task))
    await asyncio.wait({ending}, timeout=5)
    assert ending.done() and task.cancelled()
