"""Bounded waiting on asyncio tasks: shutdown that ends, whatever a task does.

Cancelling a task asks it to stop; it does not make it stop. A task that catches
``CancelledError`` (or whose cancellation is lost, as Python 3.11's ``wait_for``
loses one when the awaited future finishes at the same moment) runs on, and an
``await`` on it, or a ``gather`` of it, never returns. A daemon stopped by
systemd has a few seconds, so every wait here has a deadline, and a task that
outlives it is logged by name with its stack and abandoned.

Public API::

    pending = await cancel_and_wait(tasks, timeout=1.0)   # names of abandoned tasks
    budget = ShutdownBudget(2.5)                          # a stepwise shutdown
    await budget.step("stopping serf", serf.stop(), limit=1.0)
    budget.abandoned                                      # everything left behind
    log_tasks()                                           # every task of the loop and its stack
    result = run(main(), cleanup_timeout=0.5)             # asyncio.run with a bounded clean-up
    run(main(), loop_factory=event_loop_factory("uvloop"))  # on another loop
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Callable, Coroutine, Iterable
from types import FrameType
from typing import Any, TypeVar

from meshd.errors import ConfigError

T = TypeVar("T")

log = logging.getLogger(__name__)

# After the first cancel, pending tasks are cancelled again at this fraction of the
# deadline: a cancellation lost in a race is delivered; a task that refuses twice is stuck.
_RECANCEL_AT = 0.5
# The environment variable that picks the agent's event loop (see event_loop_factory).
ENV_LOOP = "MESHD_LOOP"
DEFAULT_LOOP = "asyncio"


def task_stack(task: asyncio.Task[Any]) -> str:
    """Where ``task`` is suspended now: its chain of awaited coroutines, outermost first,
    down to the future it waits for. (``Task.print_stack`` shows only the outermost frame,
    which hides the ``wait_for`` or lock a task is really stuck in.)"""
    frames: list[tuple[FrameType, int]] = []
    awaited: object = task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is None:
            break
        frames.append((frame, frame.f_lineno))
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    text = "".join(traceback.StackSummary.extract(iter(frames)).format()).rstrip()
    if awaited is not None:
        text += f"\n  awaiting {awaited!r}"
    return text or f"  {task!r}"


def _retrieve(task: asyncio.Task[Any]) -> None:
    # A finished task's exception is read here, so asyncio does not report it as
    # "never retrieved" long after the shutdown that ignored it.
    if task.done() and not task.cancelled():
        exc = task.exception()
        if exc is not None:
            log.debug("%s ended with %r while stopping", task.get_name(), exc)


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[Any]], timeout: float, *, what: str = "task"
) -> list[str]:
    """Cancel ``tasks`` and wait at most ``timeout`` seconds for them to end.

    Returns the names of the tasks still running at the deadline, each logged at
    WARNING with its stack; they are abandoned, never awaited. ``what`` names the
    tasks in that log line ("plugin task", "shutdown step"). The calling task's own
    cancellation is not swallowed: it propagates as usual.
    """
    chosen = [t for t in tasks if t is not asyncio.current_task()]
    for task in chosen:
        task.cancel()
    pending = {t for t in chosen if not t.done()}
    deadline = time.monotonic() + max(timeout, 0.0)
    recancel_at = time.monotonic() + max(timeout, 0.0) * _RECANCEL_AT
    recancelled = False
    while pending:
        now = time.monotonic()
        if now >= deadline:
            break
        until = deadline if recancelled else recancel_at
        _, pending = await asyncio.wait(pending, timeout=max(until - now, 0.0))
        if pending and not recancelled and time.monotonic() >= recancel_at:
            recancelled = True
            for task in pending:
                task.cancel()
    for task in chosen:
        if task not in pending:
            _retrieve(task)
    stuck = sorted(pending, key=lambda t: t.get_name())
    for task in stuck:
        log.warning(
            "%s %s did not stop within %.1f s of being cancelled; abandoning it. It waits in:\n%s",
            what,
            task.get_name(),
            timeout,
            task_stack(task),
        )
    return [t.get_name() for t in stuck]


class ShutdownBudget:
    """A total time for a stepwise shutdown; each step gets what is left (or less).

    :meth:`step` runs one awaitable as a task of its own, so a step that hangs is
    cancelled at its limit and, if it ignores that, abandoned: the next step starts
    on time either way. Names of everything abandoned collect in :attr:`abandoned`.
    """

    def __init__(self, total: float) -> None:
        self.total = total
        self._end = time.monotonic() + total
        self.abandoned: list[str] = []

    def remaining(self) -> float:
        """Seconds left of the budget (never negative)."""
        return max(self._end - time.monotonic(), 0.0)

    def share(self, limit: float | None = None) -> float:
        """What a step may take: ``limit``, or less when the budget has less left."""
        left = self.remaining()
        return left if limit is None else min(limit, left)

    async def step(
        self, name: str, step: Coroutine[Any, Any, Any], *, limit: float | None = None
    ) -> bool:
        """Run coroutine ``step`` for at most ``share(limit)`` seconds; True if it completed.

        A step that fails is logged and counts as done (shutdown goes on); one that
        runs out of time is cancelled, and abandoned if it does not stop within a
        tenth of its time (at least 50 ms, at most what the budget has left).
        """
        allowed = self.share(limit)
        task = asyncio.create_task(step, name=name)
        try:
            done, _ = await asyncio.wait({task}, timeout=allowed)
        except asyncio.CancelledError:
            # Our caller is being cancelled: do not leave the step running behind it.
            task.cancel()
            raise
        if task in done:
            if task.cancelled():
                log.warning("shutdown step %r was cancelled", name)
                return False
            exc = task.exception()
            if exc is not None:
                log.warning("shutdown step %r failed: %s", name, exc, exc_info=exc)
                return False
            return True
        log.warning("shutdown step %r did not finish within %.2f s; cancelling it", name, allowed)
        grace = min(max(allowed / 10, 0.05), self.remaining() or 0.05)
        self.abandoned += await cancel_and_wait([task], grace, what="shutdown step")
        return False

    async def cancel_tasks(
        self, tasks: Iterable[asyncio.Task[Any]], *, limit: float | None = None
    ) -> list[str]:
        """:func:`cancel_and_wait` within this budget; the abandoned names are also kept."""
        stuck = await cancel_and_wait(tasks, self.share(limit))
        self.abandoned += stuck
        return stuck


def log_tasks(level: int = logging.WARNING, loop: asyncio.AbstractEventLoop | None = None) -> int:
    """Log every unfinished task of ``loop`` (the running one) with its stack; how many.

    For diagnosis (a SIGUSR1 handler, a shutdown that overran): which task waits where.
    """
    found = asyncio.all_tasks(loop)
    for task in sorted(found, key=lambda t: t.get_name()):
        log.log(level, "task %s waits in:\n%s", task.get_name(), task_stack(task))
    return len(found)


def event_loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The loop the agent runs on: ``"asyncio"`` (the standard selector loop) or
    ``"uvloop"``; ConfigError for another name or a uvloop that is not installed."""
    if name == "asyncio":
        return asyncio.new_event_loop
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise ConfigError(
                "uvloop is not installed (pip install uvloop)", key=ENV_LOOP
            ) from None
        return uvloop.new_event_loop
    raise ConfigError(f"must be 'asyncio' or 'uvloop', not {name!r}", key=ENV_LOOP)


def run(
    main: Coroutine[Any, Any, T],
    *,
    cleanup_timeout: float = 0.5,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
) -> T:
    """``asyncio.run(main)``, but its clean-up is bounded too.

    After ``main`` returns, ``asyncio.run`` cancels the tasks still running and
    awaits them with no limit, then waits for the default executor's threads with
    no limit: one abandoned task that swallows its cancellation keeps the process
    alive forever. Here each of those waits ends after ``cleanup_timeout``; what is
    left is logged (see :func:`cancel_and_wait`) and dropped with the loop.
    """
    loop = loop_factory()
    try:
        return loop.run_until_complete(main)
    finally:
        try:
            left = asyncio.all_tasks(loop)
            if left:
                loop.run_until_complete(
                    cancel_and_wait(left, cleanup_timeout, what="task left at exit")
                )
            for name, cleanup in (
                ("closing async generators", loop.shutdown_asyncgens()),
                ("joining executor threads", loop.shutdown_default_executor()),
            ):
                done = loop.run_until_complete(ShutdownBudget(cleanup_timeout).step(name, cleanup))
                if not done:
                    log.warning(
                        "%s did not finish in %.1f s; exiting anyway", name, cleanup_timeout
                    )
        finally:
            loop.close()
