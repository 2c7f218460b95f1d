"""A flood of the same warning is logged once per key and interval."""

from __future__ import annotations

import logging

import pytest

from meshd.quietlog import Throttle


def test_a_flood_is_one_warning_per_key(caplog: pytest.LogCaptureFixture) -> None:
    throttle = Throttle(logging.getLogger("t"), interval=3600)
    with caplog.at_level(logging.DEBUG, logger="t"):
        for i in range(500):
            throttle.warning("gossip", "ignored event %d", i)
        throttle.warning("other", "ignored event %d", 0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["ignored event 0", "ignored event 0"]
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 499


def test_after_the_interval_it_says_how_many_were_folded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    throttle = Throttle(logging.getLogger("t"), interval=0.0)
    throttle._interval = 3600
    with caplog.at_level(logging.WARNING, logger="t"):
        throttle.warning("k", "bad %s", "a")
        throttle.warning("k", "bad %s", "b")
        throttle._interval = 0.0
        throttle.warning("k", "bad %s", "c")
    assert [r.getMessage() for r in caplog.records] == ["bad a", "bad c (and 1 more like it)"]
