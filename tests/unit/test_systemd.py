"""The systemd notify protocol, against a real datagram socket."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from pathlib import Path

import pytest

from meshd import systemd


def test_notify_sends_the_message_to_notify_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert systemd.notify("READY=1")
        assert server.recv(64) == b"READY=1"


def test_without_systemd_notify_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False


def test_watchdog_interval_is_half_of_watchdog_sec_for_this_process() -> None:
    pid = str(os.getpid())
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}) == 15.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert systemd.watchdog_interval({}) is None


def test_a_wedged_loop_stops_the_watchdog_pings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pings come from the event loop: while a blocking call holds the loop, none is sent
    (a pinger in a thread of its own would keep the wedged agent alive), and they resume
    once the loop is free. The quiet window is ten ping intervals."""
    interval = 0.05
    path = tmp_path / "notify"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    wedged, release = threading.Event(), threading.Event()

    def wedge() -> None:  # runs on the loop and blocks it, as a stuck sync call would
        wedged.set()
        release.wait()

    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever)
    runner.start()
    pinger = asyncio.run_coroutine_threadsafe(systemd.watchdog(interval), loop)
    try:
        server.settimeout(5)
        assert [server.recv(64) for _ in range(3)] == [b"WATCHDOG=1"] * 3
        loop.call_soon_threadsafe(wedge)
        assert wedged.wait(5)
        server.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:  # pings sent before the wedge
                server.recv(64)
        server.settimeout(10 * interval)
        with pytest.raises(TimeoutError):
            server.recv(64)
        release.set()
        server.settimeout(5)
        assert server.recv(64) == b"WATCHDOG=1"
    finally:
        release.set()
        pinger.cancel()
        for _ in range(3):  # let the loop deliver the cancellation before it stops
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        runner.join(5)
        loop.close()
        server.close()
