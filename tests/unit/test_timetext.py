"""Times for people: one wording for a moment, a duration and how long ago."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.timetext import ago, duration, utc

NOW = 1_800_000_000


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0 s"),
        (119, "119 s"),
        (120, "2 min"),
        (7199, "119 min"),
        (7200, "2 h"),
        (172799, "47 h"),
        (172800, "2 days"),
        (-5, "0 s"),  # a clock a little behind says "0 s", never a negative time
        (59.9, "59 s"),
    ],
)
def test_duration_picks_the_unit(seconds: float, text: str) -> None:
    assert duration(seconds) == text


@given(st.integers(0, 10**9))
def test_duration_never_rounds_up(seconds: int) -> None:
    number, unit = duration(seconds).split()
    scale = {"s": 1, "min": 60, "h": 3600, "days": 86400}[unit]
    assert int(number) * scale <= seconds < (int(number) + 1) * scale


def test_ago_counts_back_from_now_and_knows_never() -> None:
    assert ago(NOW - 300, NOW) == "5 min ago"
    assert ago(NOW - 3 * 86400, NOW) == "3 days ago"
    assert ago(None, NOW) == "never"
    assert ago(0, NOW) == "never"  # WireGuard's "no handshake yet"


def test_utc_is_utc_with_seconds_and_survives_absurd_times() -> None:
    assert utc(0) == "1970-01-01 00:00:00 UTC"
    assert utc(NOW) == "2027-01-15 08:00:00 UTC"
    assert utc(2**62) == f"{2**62} (unix seconds)"
