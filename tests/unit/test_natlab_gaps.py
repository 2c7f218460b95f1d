"""The outage measurement of the NAT tests (tests/integration/natlab.py), on ping's text."""

from __future__ import annotations

import pytest

from tests.integration.natlab import longest_gap

PING = """\
PING 100.80.1.2 (100.80.1.2) 56(84) bytes of data.
[1000.100000] 64 bytes from 100.80.1.2: icmp_seq=1 ttl=64 time=0.3 ms
[1000.300000] 64 bytes from 100.80.1.2: icmp_seq=2 ttl=64 time=0.3 ms
[1000.700000] no answer yet for icmp_seq=3
[1000.900000] no answer yet for icmp_seq=4
[1001.700000] 64 bytes from 100.80.1.2: icmp_seq=8 ttl=64 time=0.4 ms
[1001.900000] 64 bytes from 100.80.1.2: icmp_seq=9 ttl=64 time=0.3 ms

--- 100.80.1.2 ping statistics ---
"""


def test_the_longest_gap_is_between_replies_not_at_unanswered_probes() -> None:
    assert longest_gap(PING, 1000.0, 1002.0) == pytest.approx(1.4)


def test_the_run_s_edges_count_as_gaps() -> None:
    # No reply in the first 2.1 s, or in the last 2.1 s.
    assert longest_gap(PING, 998.0, 1002.0) == pytest.approx(2.1)
    assert longest_gap(PING, 1000.0, 1004.0) == pytest.approx(2.1)


def test_no_reply_at_all_is_the_whole_run() -> None:
    silent = "[1000.5] no answer yet for icmp_seq=1\n[1000.7] no answer yet for icmp_seq=2\n"
    assert longest_gap(silent, 1000.0, 1003.0) == pytest.approx(3.0)
