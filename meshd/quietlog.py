"""Logging that a flood cannot amplify: one warning per source and interval.

Anyone holding the gossip key can send garbage events; each node logging a
warning per event would turn 500 events into 500 lines on every node.
:class:`Throttle` logs the first occurrence per key at WARNING, the rest of
that interval at DEBUG, and says how many were folded when the next one
reaches WARNING again.
"""

from __future__ import annotations

import logging
import time
from typing import Any

INTERVAL = 60.0
MAX_KEYS = 1024


class Throttle:
    def __init__(self, logger: logging.Logger, interval: float = INTERVAL) -> None:
        self._log = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._folded: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._folded[key] = self._folded.get(key, 0) + 1
            self._log.debug(message, *args)
            return
        if len(self._last) >= MAX_KEYS and key not in self._last:
            oldest = min(self._last, key=self._last.__getitem__)
            self._last.pop(oldest)
            self._folded.pop(oldest, None)
        self._last[key] = now
        folded = self._folded.pop(key, 0)
        if folded:
            self._log.warning(message + " (and %d more like it)", *args, folded)
        else:
            self._log.warning(message, *args)
