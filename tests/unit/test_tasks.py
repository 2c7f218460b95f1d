"""cancel_and_wait and ShutdownBudget return on time, whatever a task does."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import pytest

from meshd.errors import ConfigError
from meshd.tasks import ShutdownBudget, cancel_and_wait, event_loop_factory, log_tasks, run


async def obedient() -> None:
    await asyncio.sleep(3600)


async def stubborn(release: asyncio.Event) -> None:
    """Swallows every cancellation until ``release`` is set."""
    while not release.is_set():
        with contextlib.suppress(asyncio.CancelledError):
            await release.wait()


async def swallows_once() -> None:
    """Loses one cancellation (as 3.11's wait_for can in a race), then obeys."""
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(3600)
    await asyncio.sleep(3600)


def test_tasks_that_obey_are_all_awaited_and_none_is_reported() -> None:
    async def scenario() -> None:
        tasks = [asyncio.create_task(obedient(), name=f"t{i}") for i in range(3)]
        await asyncio.sleep(0)
        assert await cancel_and_wait(tasks, 1.0) == []
        assert all(t.cancelled() for t in tasks)

    asyncio.run(scenario())


def test_a_task_that_swallows_cancellation_is_named_logged_and_abandoned(caplog) -> None:
    async def scenario() -> None:
        release = asyncio.Event()
        stuck = asyncio.create_task(stubborn(release), name="stubborn-loop")
        fine = asyncio.create_task(obedient(), name="fine")
        await asyncio.sleep(0)
        started = time.monotonic()
        assert await cancel_and_wait([stuck, fine], 0.3) == ["stubborn-loop"]
        # It returned at its deadline, not when the task chose to end.
        assert time.monotonic() - started < 3
        assert fine.cancelled()
        assert not stuck.done()
        release.set()
        await stuck

    with caplog.at_level(logging.WARNING, logger="meshd.tasks"):
        asyncio.run(scenario())
    [record] = [r for r in caplog.records if "stubborn-loop" in r.getMessage()]
    # The log line shows where it hangs: its coroutine's frame.
    assert "in stubborn" in record.getMessage()


def test_a_lost_cancellation_is_delivered_again() -> None:
    async def scenario() -> None:
        task = asyncio.create_task(swallows_once(), name="lossy")
        await asyncio.sleep(0)
        assert await cancel_and_wait([task], 2.0) == []
        assert task.cancelled()

    asyncio.run(scenario())


def test_the_callers_own_cancellation_propagates() -> None:
    async def scenario() -> None:
        release = asyncio.Event()
        stuck = asyncio.create_task(stubborn(release), name="stuck")
        waiter = asyncio.create_task(cancel_and_wait([stuck], 60))
        await asyncio.sleep(0.05)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        release.set()
        await stuck

    asyncio.run(scenario())


def test_the_calling_task_is_never_cancelled_by_its_own_call() -> None:
    async def scenario() -> list[str]:
        me = asyncio.current_task()
        assert me is not None
        return await cancel_and_wait([me], 0.1)

    assert asyncio.run(scenario()) == []


def test_a_failed_task_is_not_reported_as_stuck() -> None:
    async def boom() -> None:
        raise RuntimeError("boom")

    async def scenario() -> None:
        task = asyncio.create_task(boom(), name="boom")
        await asyncio.sleep(0)
        assert await cancel_and_wait([task], 0.5) == []

    asyncio.run(scenario())


def test_budget_steps_run_in_order_and_a_hanging_step_does_not_delay_the_next(caplog) -> None:
    order: list[str] = []

    async def quick(name: str) -> None:
        order.append(name)

    async def hangs(release: asyncio.Event) -> None:
        order.append("hangs")
        await stubborn(release)

    async def scenario() -> list[str]:
        release = asyncio.Event()
        budget = ShutdownBudget(2.0)
        assert await budget.step("first", quick("first"))
        assert not await budget.step("stuck step", hangs(release), limit=0.2)
        assert await budget.step("last", quick("last"))
        assert budget.remaining() > 0
        release.set()
        return budget.abandoned

    with caplog.at_level(logging.WARNING, logger="meshd.tasks"):
        abandoned = asyncio.run(scenario())
    assert order == ["first", "hangs", "last"]
    assert abandoned == ["stuck step"]
    assert any("stuck step" in r.getMessage() for r in caplog.records)


def test_budget_a_failing_step_is_logged_and_shutdown_goes_on(caplog) -> None:
    async def fails() -> None:
        raise OSError("socket gone")

    async def scenario() -> tuple[bool, list[str]]:
        budget = ShutdownBudget(1.0)
        return await budget.step("closing", fails()), budget.abandoned

    with caplog.at_level(logging.WARNING, logger="meshd.tasks"):
        assert asyncio.run(scenario()) == (False, [])
    assert any("'closing' failed: socket gone" in r.getMessage() for r in caplog.records)


def test_budget_never_grants_more_than_it_has_left() -> None:
    async def scenario() -> None:
        budget = ShutdownBudget(0.3)
        assert budget.share(10) <= 0.3
        started = time.monotonic()
        assert not await budget.step("sleeps", asyncio.sleep(10), limit=10)
        assert time.monotonic() - started < 3
        assert budget.share(10) == pytest.approx(0, abs=0.05)
        # An exhausted budget still lets a step that is ready at once through.
        assert await budget.step("instant", asyncio.sleep(0))

    asyncio.run(scenario())


def test_budget_cancel_tasks_keeps_what_it_abandons() -> None:
    async def scenario() -> list[str]:
        release = asyncio.Event()
        stuck = asyncio.create_task(stubborn(release), name="stuck")
        await asyncio.sleep(0)
        budget = ShutdownBudget(1.0)
        assert await budget.cancel_tasks([stuck], limit=0.1) == ["stuck"]
        release.set()
        await stuck
        return budget.abandoned

    assert asyncio.run(scenario()) == ["stuck"]


def test_log_tasks_names_every_pending_task_with_its_stack(caplog) -> None:
    async def scenario() -> int:
        task = asyncio.create_task(obedient(), name="sleeper")
        await asyncio.sleep(0)
        count = log_tasks()
        task.cancel()
        return count

    with caplog.at_level(logging.WARNING, logger="meshd.tasks"):
        assert asyncio.run(scenario()) == 2  # the sleeper and the scenario itself
    [record] = [r for r in caplog.records if r.getMessage().startswith("task sleeper ")]
    assert "in obedient" in record.getMessage()


def test_run_returns_the_result_even_when_a_task_left_behind_swallows_cancellation(caplog) -> None:
    kept: list[asyncio.Task[None]] = []

    async def main() -> str:
        kept.append(asyncio.create_task(stubborn(asyncio.Event()), name="left-behind"))
        await asyncio.sleep(0)
        return "done"

    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="meshd.tasks"):
        assert run(main(), cleanup_timeout=0.2) == "done"
    # asyncio.run would still be waiting for "left-behind".
    assert time.monotonic() - started < 3
    assert any("task left at exit left-behind" in r.getMessage() for r in caplog.records)


def test_run_raises_what_main_raises_and_still_cleans_up() -> None:
    finished: list[str] = []
    kept: list[asyncio.Task[None]] = []

    async def tidy() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            finished.append("tidy")

    async def main() -> None:
        kept.append(asyncio.create_task(tidy()))
        await asyncio.sleep(0)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run(main())
    assert finished == ["tidy"]


@pytest.mark.parametrize("name", ["asyncio", "uvloop"])
def test_run_on_the_loop_named(name: str) -> None:
    pytest.importorskip(name)

    async def loop_type() -> str:
        return type(asyncio.get_running_loop()).__module__

    found = run(loop_type(), loop_factory=event_loop_factory(name))
    assert found.split(".")[0] == name


def test_an_unknown_loop_name_is_a_config_error_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"MESHD_LOOP: must be 'asyncio' or 'uvloop', not 'trio'"):
        event_loop_factory("trio")
