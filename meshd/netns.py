"""Making a socket inside a named network namespace (``ip netns add NAME``).

A socket belongs for good to the namespace it was made in, whichever thread
later uses it. ``setns`` switches only the calling thread, so
:func:`call_in_netns` runs the call in a fresh thread that enters the namespace
and then ends there: nothing else ever runs in it, and the caller's own thread
(the event loop's) never leaves its namespace. pyroute2's own ``netns=`` forks a
child instead, which can hang a multi-threaded process.

    sock = call_in_netns("lab-n1", lambda: socket.create_connection(("127.0.0.1", 7373)))

A namespace that does not exist is an OSError (it is never created); the call's
own exceptions pass through unchanged. The caller converts them.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

NETNS_DIR = "/run/netns"  # where `ip netns add` mounts a namespace
_CLONE_NEWNET = 0x40000000  # linux/sched.h; the os module does not name it

T = TypeVar("T")


def call_in_netns(netns: str, make: Callable[[], T]) -> T:
    """What ``make()`` returns (or raises), called from inside network namespace ``netns``."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def enter_and_make() -> None:
        try:
            _enter(netns)
            outcome.append(make())
        except BaseException as exc:  # handed over to the caller's thread
            failure.append(exc)

    # A fresh thread, never a pool's: it ends inside the namespace and nothing reuses it.
    worker = threading.Thread(target=enter_and_make, name=f"netns-{netns}", daemon=True)
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return outcome[0]


def _enter(netns: str) -> None:
    path = os.path.join(NETNS_DIR, netns)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), path)
    finally:
        os.close(fd)
