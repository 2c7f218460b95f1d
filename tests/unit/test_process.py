"""The child supervisor, with real child processes (sh)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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

    def child_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "meshd.child.sleeper"]

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
        # A child killed before it printed its line has no line to forward.
        await wait_for(lambda: child_lines().count("started") == 1)
        os.kill(first, signal.SIGKILL)
        await wait_for(lambda: child.pid not in (None, first))
        await wait_for(lambda: bool(restarted))
        assert child.restarts == 1
        assert child.deaths == 1
        # Likewise the new child: stopped before it printed, it would have no line either.
        await wait_for(lambda: child_lines().count("started") == 2)
        await child.stop()
        await asyncio.wait_for(task, 5)
        assert child.pid is None

    with caplog.at_level(logging.INFO):
        asyncio.run(scenario())
    assert restarted
    assert child_lines().count("started") == 2


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


def gone(pid: int) -> bool:
    """No such process, or only its zombie (an orphan's reaper may be slow in a container)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def wait_gone(pid: int, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not gone(pid):
        assert time.monotonic() < deadline, f"pid {pid} still alive after {seconds:g} s"
        time.sleep(0.02)


# A child that ignores SIGTERM, with a grandchild in its process group.
STUBBORN = 'trap "" TERM; sleep 60 & echo "grandchild $!"; while :; do sleep 0.05; done'


def test_a_child_that_ignores_sigterm_is_killed_with_its_group_after_the_grace(caplog) -> None:
    lines: list[str] = []

    async def scenario() -> tuple[int, int]:
        child = ChildProcess(
            "stubborn", ["sh", "-c", STUBBORN], on_line=lines.append, stop_timeout=0.3
        )
        await child.start()
        pid = child.pid
        assert pid is not None
        await wait_for(lambda: any(line.startswith("grandchild ") for line in lines))
        grandchild = int(next(line for line in lines if line.startswith("grandchild ")).split()[1])
        await child.stop()
        assert child.pid is None
        return pid, grandchild

    with caplog.at_level(logging.WARNING, logger="meshd.process"):
        pid, grandchild = asyncio.run(scenario())
    assert gone(pid)
    wait_gone(grandchild)
    assert any("ignored SIGTERM for 0.3 s; killing it" in r.getMessage() for r in caplog.records)


def test_a_start_cancelled_while_waiting_for_ready_leaves_no_child() -> None:
    started = asyncio.Event()

    async def never() -> None:
        started.set()
        await asyncio.sleep(3600)

    async def scenario() -> int:
        child = ChildProcess(
            "cancelled", ["sh", "-c", STUBBORN], ready=never, ready_timeout=60, stop_timeout=0.3
        )
        starting = asyncio.create_task(child.start())
        await started.wait()
        pid = child.pid
        assert pid is not None
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        assert child.pid is None
        return pid

    assert gone(asyncio.run(scenario()))


def test_a_stop_that_is_itself_cancelled_still_kills_the_child() -> None:
    lines: list[str] = []

    async def scenario() -> int:
        child = ChildProcess(
            "stubborn", ["sh", "-c", STUBBORN], on_line=lines.append, stop_timeout=30
        )
        await child.start()
        pid = child.pid
        assert pid is not None
        await wait_for(lambda: bool(lines))  # its trap is set
        stopping = asyncio.create_task(child.stop())
        await asyncio.sleep(0.1)  # it is in its SIGTERM grace now (the child ignores it)
        stopping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopping
        # It was SIGKILLed on the way out: a second stop only reaps it.
        await asyncio.wait_for(child.stop(), 2)
        return pid

    wait_gone(asyncio.run(scenario()))


def test_stop_during_a_restart_backoff_returns_at_once_and_restarts_nothing() -> None:
    async def scenario() -> float:
        child = ChildProcess("dying", ["sh", "-c", "exit 1"], backoff_initial=60)
        await child.start()
        task = asyncio.create_task(child.supervise())
        await wait_for(lambda: child.pid is None)
        await asyncio.sleep(0.1)  # in its 60 s backoff now
        started = time.monotonic()
        await child.stop()
        await asyncio.wait_for(task, 5)
        assert child.restarts == 0
        assert child.deaths == 1  # it died; the stop came before its restart
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 5


PARENT = """
import asyncio, sys
from meshd.process import ChildProcess

async def main():
    child = ChildProcess("orphan", ["sleep", "60"])
    await child.start()
    print(child.pid, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_children_die_when_meshd_is_killed() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert not gone(child)
        parent.kill()
        parent.wait(5)
        wait_gone(child)
    finally:
        with contextlib.suppress(ProcessLookupError):
            parent.kill()
        parent.wait(5)
