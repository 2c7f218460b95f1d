"""Tasks with deadlines: cancelling a set of asyncio tasks without waiting forever.

A task that swallows its cancellation (or awaits something that ignores it) must
not keep a daemon from stopping: :func:`cancel_and_wait` cancels, waits up to a
deadline, and names the tasks that are still running instead of awaiting them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterable
from typing import Any

log = logging.getLogger(__name__)


async def cancel_and_wait(tasks: Iterable[asyncio.Task[object]], timeout: float) -> list[str]:
    """Cancel ``tasks`` and wait at most ``timeout`` seconds; the names of those left running."""
    pending = [t for t in tasks if not t.done()]
    for task in pending:
        task.cancel()
    if not pending:
        return []
    _, still = await asyncio.wait(pending, timeout=timeout)
    names = sorted(t.get_name() for t in still)
    if names:
        log.warning("abandoned task(s) that ignored cancellation: %s", ", ".join(names))
    return names


def run_until_stopped(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on a new event loop and return as soon as it returns.

    Unlike :func:`asyncio.run`, tasks still pending afterwards (abandoned by a bounded
    shutdown) are not awaited, nor are executor threads joined: a daemon asked to stop
    must stop, whatever one of its tasks does.
    """
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main)
    finally:
        leftover = [t for t in asyncio.all_tasks(loop) if not t.done()]
        if leftover:
            log.warning("exiting with %d task(s) still pending", len(leftover))
        loop.close()
