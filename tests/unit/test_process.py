"""The child supervisor, with real child processes (sh)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import pytest

from meshd.errors import SupervisorError
from meshd.process import ChildProcess


async def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def test_missing_binary_is_a_clear_error() -> None:
    with pytest.raises(SupervisorError, match="no-such-binary-xyz not found"):
        ChildProcess("x", ["no-such-binary-xyz"])


def test_lines_are_forwarded_and_a_killed_child_is_restarted(caplog) -> None:
    restarted: list[int] = []

    def started_lines() -> int:
        return [r.getMessage() for r in caplog.records if r.name == "meshd.child.sleeper"].count(
            "started"
        )

    async def scenario() -> None:
        child = ChildProcess(
            "sleeper",
            ["sh", "-c", "echo started; exec sleep 60"],
            backoff_initial=0.05,
        )

        async def on_restart() -> None:
            restarted.append(child.pid or 0)

        child._on_restart = on_restart
        await child.start()
        first = child.pid
        assert first is not None
        task = asyncio.create_task(child.supervise())
        # Each child's line before it is killed or stopped: under load a signal came before
        # the echo, and the test failed on a line the child never printed.
        await wait_for(lambda: started_lines() == 1)
        os.kill(first, signal.SIGKILL)
        await wait_for(lambda: child.pid not in (None, first))
        await wait_for(lambda: bool(restarted))
        assert child.restarts == 1
        await wait_for(lambda: started_lines() == 2)
        await child.stop()
        await asyncio.wait_for(task, 5)
        assert child.pid is None

    with caplog.at_level(logging.INFO):
        asyncio.run(scenario())
    assert restarted
    assert started_lines() == 2


def test_a_child_that_never_gets_ready_is_stopped_and_reported() -> None:
    async def never() -> None:
        await asyncio.sleep(3600)

    async def scenario() -> None:
        child = ChildProcess("stuck", ["sleep", "60"], ready=never, ready_timeout=0.3)
        with pytest.raises(SupervisorError, match="did not become ready"):
            await child.start()
        assert child.pid is None

    asyncio.run(scenario())


def test_a_child_that_exits_while_starting_is_reported() -> None:
    async def never() -> None:
        await asyncio.sleep(3600)

    async def scenario() -> None:
        child = ChildProcess("quitter", ["sh", "-c", "exit 3"], ready=never, ready_timeout=5)
        with pytest.raises(SupervisorError, match="exited with code 3 while starting"):
            await child.start()

    asyncio.run(scenario())


def test_children_do_not_inherit_our_environment() -> None:
    os.environ["MESHD_TEST_SECRET"] = "hunter2"
    lines: list[str] = []

    async def scenario() -> None:
        child = ChildProcess("env", ["sh", "-c", "env; echo done"], on_line=lines.append)
        await child.start()
        await wait_for(lambda: "done" in lines)
        await child.stop()

    try:
        asyncio.run(scenario())
    finally:
        del os.environ["MESHD_TEST_SECRET"]
    assert lines
    assert not any("hunter2" in line for line in lines)
