"""How wireguard-go's output reaches the agent's log (no process started)."""

from __future__ import annotations

import logging

import pytest

from meshd.wireguard.userspace import UserspaceBackend


@pytest.mark.parametrize(
    ("line", "level"),
    [
        ("DEBUG: (mw1) 2026/12/02 15:49:01 peer(e/El…SRgY) - Sending keepalive packet", "DEBUG"),
        ("│   Running wireguard-go is not required because this  │", "DEBUG"),
        ("ERROR: (mw1) 2026/12/02 15:49:01 Failed to send data packet", "INFO"),
    ],
)
def test_verbose_lines_and_the_banner_stay_at_debug_and_the_rest_at_info(
    caplog: pytest.LogCaptureFixture, line: str, level: str
) -> None:
    backend = UserspaceBackend("mw1")
    with caplog.at_level(logging.DEBUG, logger="meshd.wireguard.userspace"):
        backend._child_line(line)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (level, f"wireguard-go[mw1]: {line}")
    ]
