"""Times written for people: a moment in UTC, a duration, how long ago.

One wording everywhere a user reads a time (refusals of certificates and
tokens, ``meshd status``): ``2026-03-01 12:00:00 UTC``, ``90 s``, ``5 min``,
``3 h``, ``4 days``, ``5 min ago``, ``never``.
"""

from __future__ import annotations

import time


def utc(seconds: float) -> str:
    """A Unix time as ``YYYY-MM-DD HH:MM:SS UTC`` (in Unix seconds when out of range)."""
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))
    except (OverflowError, OSError, ValueError):
        return f"{seconds} (unix seconds)"


def duration(seconds: float) -> str:
    """``seconds`` rounded down to the largest unit that keeps two digits of sense."""
    whole = max(0, int(seconds))
    if whole < 120:
        return f"{whole} s"
    if whole < 7200:
        return f"{whole // 60} min"
    if whole < 172800:
        return f"{whole // 3600} h"
    return f"{whole // 86400} days"


def ago(timestamp: float | None, now: float | None = None) -> str:
    """How long before ``now`` the Unix time ``timestamp`` was; ``never`` for none (0 or None)."""
    if not timestamp:
        return "never"
    return f"{duration((time.time() if now is None else now) - timestamp)} ago"
