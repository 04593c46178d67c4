"""Small asyncio and Redis Streams pieces the services share."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

# A consumer group's entries: (entry id, fields); fields are None for an entry
# deleted from the stream after it was handed out.
Entries = list[tuple[str, dict[str, str] | None]]


def group_entries(reply: Any) -> Entries:
    """The entries of an XREADGROUP reply on one stream."""
    return [entry for _, entries in reply for entry in entries] if reply else []


# How long to wait for a cancelled task to end before cancelling it again.
RECANCEL_S = 0.05


async def cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (if there is one) and wait until it has ended.

    Cancels again for as long as it runs on. On Python 3.11 a cancellation
    that lands while an ``asyncio.wait_for`` in the task is finishing is lost
    (CPython gh-86296, fixed in 3.12), and redis-py sends every command
    through one: a reader cancelled at that moment would go on reading, and a
    single cancel would wait for it forever. A cancellation of the caller
    itself still propagates.
    """
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=RECANCEL_S)
    with contextlib.suppress(asyncio.CancelledError):
        await task  # done: re-raises what the task raised, if anything else
