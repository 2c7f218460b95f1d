"""systemd's notify protocol: a datagram to $NOTIFY_SOCKET, no library needed.

Does nothing when meshd was not started by systemd with ``Type=notify``. The
watchdog (``WatchdogSec=`` in the unit) is pinged from the agent's event loop, so
it measures the loop's health, not merely the process's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

from meshd.quietlog import Throttle

log = logging.getLogger(__name__)
_quiet = Throttle(log)


def notify(message: str) -> bool:
    """Send ``message`` (e.g. ``READY=1``); False when there is no notify socket."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        # Once a minute at most: the watchdog pings every few seconds.
        _quiet.warning(address, "cannot notify systemd (%s): %s", address, exc)
        return False
    return True


def watchdog_interval(environ: Mapping[str, str] = os.environ) -> float | None:
    """How often to ping systemd's watchdog (half of ``WatchdogSec``), or None when
    systemd does not watch this process (no ``WATCHDOG_USEC``, or it names another pid)."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = environ.get("WATCHDOG_PID")
    if usec <= 0 or (pid is not None and pid != str(os.getpid())):
        return None
    return usec / 1e6 / 2


async def watchdog(interval: float) -> None:
    """Send ``WATCHDOG=1`` every ``interval`` seconds, from the event loop itself: a loop
    wedged by a blocking call sends nothing, and systemd restarts the agent. Run as a task."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
