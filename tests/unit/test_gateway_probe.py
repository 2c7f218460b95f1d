"""The gateway prober's pure parts: the ICMP echo it sends and reads, and when a target is down."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from meshd_gateway.probe import DOWN_AFTER, Prober, checksum, echo_request, parse_reply


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_an_echo_request_checksums_to_zero(ident: int, seq: int) -> None:
    packet = echo_request(ident, seq)
    assert checksum(packet) == 0
    assert struct.unpack("!BBHHH", packet[:8])[3:] == (ident, seq)


def ip_header(length: int = 20) -> bytes:
    return bytes([0x40 | (length // 4)]) + bytes(length - 1)


def test_only_echo_replies_with_our_identifier_count() -> None:
    reply = bytearray(echo_request(7, 1))
    reply[0] = 0  # echo reply
    assert parse_reply(ip_header() + bytes(reply), 7)
    assert parse_reply(ip_header(24) + bytes(reply), 7)  # with IP options
    assert not parse_reply(ip_header() + bytes(reply), 8)
    assert not parse_reply(ip_header() + echo_request(7, 1), 7)  # a request, not a reply
    assert not parse_reply(ip_header() + bytes(reply[:4]), 7)


def test_a_silent_target_is_down_after_the_delay_and_back_on_an_answer() -> None:
    now = [0.0]
    changes: list[frozenset[str]] = []
    prober = Prober(lambda: changes.append(prober.down()), clock=lambda: now[0])
    prober.watch(["100.80.0.2", "100.80.0.3"])
    now[0] = DOWN_AFTER - 0.1
    prober._answered("100.80.0.3")
    prober._check()
    assert prober.down() == frozenset()
    now[0] = DOWN_AFTER + 0.1
    prober._check()
    assert prober.down() == {"100.80.0.2"}
    prober._answered("100.80.0.2")
    assert prober.down() == frozenset()
    assert changes == [frozenset({"100.80.0.2"}), frozenset()]
    prober.watch([])  # no longer a target: forgotten
    now[0] = 100.0
    prober._check()
    assert prober.down() == frozenset()
