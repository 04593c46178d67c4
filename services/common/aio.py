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


async def cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (if there is one) and wait until it has ended."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
