"""The relay forwarder on real UDP sockets on 127.0.0.1, with WireGuard-shaped datagrams.

The two ends are plain sockets that send what WireGuard would send: handshakes
with a real mac1 for the receiver's real X25519 public key, transport data of
WireGuard's sizes. mac1 is computed here from the whitepaper (5.4.4), not with
the module's helper, and checked against a datagram real wireguard-go sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import Awaitable, Callable
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd import MeshdError
from meshd.identity import WireGuardKeyPair
from meshd_nat import NatPlugin
from meshd_nat.relay import (
    Relay,
    RelayError,
    RelayFull,
    decode_public_key,
    mac1_key,
    valid_mac1,
)

HOST = "127.0.0.1"
KEY_A = WireGuardKeyPair.generate().public_key
KEY_B = WireGuardKeyPair.generate().public_key
KEY_C = WireGuardKeyPair.generate().public_key

# The first datagram wireguard-go 0.0.20230223 sent to a peer with public key
# RECORDED_RECEIVER (tests/integration/test_relay_forwarder.py captured it; the keys
# were made for that run only).
RECORDED_RECEIVER = "5qLNBh1wJpdd5w9gChMc/QajwTGkOWJ7UaGg72m8vS0="
RECORDED_INITIATION = bytes.fromhex(
    "01000000dafe92f072bddfb3571bfa922b784c5297da3bbddaa343e01878177469ff9fab0b469112"
    "9de71806ef860534343b06b0458c705580ca6a2ddaf1ba6f02ad367e3ec7d22529c3a843836f28e2"
    "3907494d6b865df4ebc83d31ae451f3e1902484be1a16f980bc6395489dfe03c3f321ced9b9fd446"
    "f71729b9fec97298bcadd9c600000000000000000000000000000000"
)


def whitepaper_mac1(receiver_public_key: str, covered: bytes) -> bytes:
    """mac1 = MAC(HASH(LABEL_MAC1 || receiver's static public key), msg_alpha)."""
    key = hashlib.blake2s(b"mac1----" + decode_public_key(receiver_public_key)).digest()
    return hashlib.blake2s(covered, key=key, digest_size=16).digest()


def initiation(receiver: str, body: bytes | None = None) -> bytes:
    """A handshake initiation (148 bytes) with a valid mac1 for ``receiver`` and mac2 zero."""
    covered = b"\x01\x00\x00\x00" + (body if body is not None else os.urandom(112))
    return covered + whitepaper_mac1(receiver, covered) + bytes(16)


def response(receiver: str) -> bytes:
    """A handshake response (92 bytes) with a valid mac1 for ``receiver``."""
    covered = b"\x02\x00\x00\x00" + os.urandom(56)
    return covered + whitepaper_mac1(receiver, covered) + bytes(16)


def data(payload_blocks: int = 2, tag: bytes = b"") -> bytes:
    """Transport data: header (type, receiver index, counter) and 16-byte blocks."""
    body = (tag + os.urandom(16 * payload_blocks))[: 16 * payload_blocks]
    return b"\x04\x00\x00\x00" + os.urandom(12) + body


def cookie_reply() -> bytes:
    return b"\x03\x00\x00\x00" + os.urandom(60)


class End:
    """A member's UDP socket: what it receives, in order, with the source."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.sock.setblocking(False)

    def send(self, datagram: bytes, port: int) -> None:
        self.sock.sendto(datagram, (HOST, port))

    async def receive(self, timeout: float = 5) -> tuple[bytes, int]:
        """The next datagram and the port it came from."""
        async with asyncio.timeout(timeout):
            datagram, source = await asyncio.get_running_loop().sock_recvfrom(self.sock, 4096)
        return datagram, source[1]

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.sock.close()


def run(scenario: Callable[[Relay], Awaitable[None]], **relay_options: object) -> None:
    relay_options.setdefault("host", HOST)

    async def main() -> None:
        relay = Relay(**relay_options)  # type: ignore[arg-type]
        try:
            await scenario(relay)
        finally:
            relay.close()

    asyncio.run(main())


async def settled(relay: Relay, check: Callable[[Relay], bool]) -> None:
    """Let the loop deliver what was sent until ``check(relay)`` holds (loopback: at once)."""
    async with asyncio.timeout(5):
        # The condition is the relay's counters; nothing to wait on but the loop's turns.
        while not check(relay):  # noqa: ASYNC110
            await asyncio.sleep(0.001)


def side(relay: Relay, key: str):  # -> SideInfo
    (allocation,) = [a for a in relay.allocations() if key in {s.public_key for s in a.sides}]
    return next(s for s in allocation.sides if s.public_key == key)


def test_forwards_both_ways_from_the_port_each_end_has_configured():
    async def scenario(relay: Relay) -> None:
        a, b = End(), End()
        port_a = await relay.allocate(KEY_A, KEY_B)
        port_b = await relay.allocate(KEY_B, KEY_A)
        assert port_a != port_b

        first = initiation(KEY_B)
        a.send(first, port_a)  # B unknown yet: dropped
        await settled(relay, lambda r: side(r, KEY_A).dropped["unknown"] == 1)
        assert side(relay, KEY_A).address == f"{HOST}:{a.port}"

        answer = response(KEY_A)
        b.send(answer, port_b)
        assert await a.receive() == (answer, port_a)  # from the endpoint A has for B
        retry = initiation(KEY_B)
        a.send(retry, port_a)
        # The first thing B gets is the retry: the dropped initiation never came.
        assert await b.receive() == (retry, port_b)
        # A keepalive, a 16-padded packet, and a full one through the default MTU 1420,
        # which WireGuard pads only up to the MTU: 16 + 1420 + 16 bytes.
        for packet in (data(1), data(4), data(90)[:-4]):
            a.send(packet, port_a)
            assert await b.receive() == (packet, port_b)
            b.send(packet, port_b)
            assert await a.receive() == (packet, port_a)

        info_a, info_b = side(relay, KEY_A), side(relay, KEY_B)
        assert (info_a.packets, info_b.packets) == (4, 4)
        assert info_a.bytes == 148 + 32 + 80 + 1452
        assert info_b.address == f"{HOST}:{b.port}"
        assert info_b.dropped == {"junk": 0, "mac1": 0, "stranger": 0, "unknown": 0, "unsent": 0}
        a.close()
        b.close()

    run(scenario)


async def paired(relay: Relay) -> tuple[End, End, int, int]:
    """Two ends both learnt by the relay (each has sent a handshake)."""
    a, b = End(), End()
    port_a, port_b = await relay.allocate(KEY_A, KEY_B), await relay.allocate(KEY_B, KEY_A)
    a.send(initiation(KEY_B), port_a)
    await settled(relay, lambda r: side(r, KEY_A).address is not None)
    hello = response(KEY_A)
    b.send(hello, port_b)
    assert await a.receive() == (hello, port_a)
    return a, b, port_a, port_b


def test_a_handshake_without_mac1_for_the_receiver_is_dropped_and_teaches_nothing():
    async def scenario(relay: Relay) -> None:
        a, b, port_a, port_b = await paired(relay)
        thief = End()
        # mac1 for the sender's own key, for a third key, and a broken one: all refused.
        forged = bytearray(initiation(KEY_B))
        forged[120] ^= 1
        for datagram in (initiation(KEY_A), initiation(KEY_C), bytes(forged), response(KEY_C)):
            thief.send(datagram, port_a)
        await settled(relay, lambda r: side(r, KEY_A).dropped["mac1"] == 4)
        assert side(relay, KEY_A).address == f"{HOST}:{a.port}"
        packet = data()
        b.send(packet, port_b)
        assert await a.receive() == (packet, port_a)  # still to A, not to the thief
        assert side(relay, KEY_B).packets == 2  # the handshake and this one
        thief.close()

    run(scenario)


JUNK = [
    b"",
    b"\x04",
    b"\x04\x00\x00\x00" + bytes(15),  # data shorter than 32
    b"\x04\x01\x00\x00" + bytes(28),  # reserved byte set
    b"\x05\x00\x00\x00" + bytes(28),  # no such type
    b"\x00\x00\x00\x00" + bytes(28),
    initiation(KEY_B)[:-1],  # one byte short
    initiation(KEY_B) + b"\x00",
    response(KEY_B) + bytes(16),
    cookie_reply() + b"\x00",
    b"GET / HTTP/1.0\r\n\r\n",
]


def test_junk_is_dropped_and_counted_never_forwarded():
    async def scenario(relay: Relay) -> None:
        a, b, port_a, port_b = await paired(relay)
        for junk in JUNK:
            a.send(junk, port_a)
            b.send(junk, port_b)
        await settled(relay, lambda r: side(r, KEY_B).dropped["junk"] == len(JUNK))
        assert side(relay, KEY_A).dropped["junk"] == len(JUNK)
        marker = data(tag=b"after the junk")
        a.send(marker, port_a)
        assert await b.receive() == (marker, port_b)  # the first thing after the handshake

    run(scenario)


def test_roaming_on_transport_data_moves_the_mapping():
    async def scenario(relay: Relay) -> None:
        _, b, port_a, port_b = await paired(relay)
        moved = End()  # A after its NAT rebound: a new source port, sending only data
        packet = data()
        moved.send(packet, port_a)
        assert await b.receive() == (packet, port_b)
        assert side(relay, KEY_A).address == f"{HOST}:{moved.port}"
        back = data()
        b.send(back, port_b)
        assert await moved.receive() == (back, port_a)
        moved.close()

    run(scenario)


def test_a_cookie_reply_passes_only_from_the_learnt_address():
    async def scenario(relay: Relay) -> None:
        a, b, port_a, port_b = await paired(relay)
        stranger = End()
        stranger.send(cookie_reply(), port_b)
        await settled(relay, lambda r: side(r, KEY_B).dropped["stranger"] == 1)
        assert side(relay, KEY_B).address == f"{HOST}:{b.port}"
        cookie = cookie_reply()
        b.send(cookie, port_b)
        assert await a.receive() == (cookie, port_a)

    run(scenario)


def test_one_allocation_per_unordered_pair():
    async def scenario(relay: Relay) -> None:
        port_a = await relay.allocate(KEY_A, KEY_B)
        port_b = await relay.allocate(KEY_B, KEY_A)
        assert await relay.allocate(KEY_A, KEY_B) == port_a
        assert await relay.allocate(KEY_B, KEY_A) == port_b
        assert len(relay.allocations()) == 1
        # Concurrent first requests for a new pair make one allocation too.
        ports = await asyncio.gather(relay.allocate(KEY_A, KEY_C), relay.allocate(KEY_C, KEY_A))
        assert len(set(ports)) == 2
        assert len(relay.allocations()) == 2
        (info,) = [a for a in relay.allocations() if KEY_C in {s.public_key for s in a.sides}]
        assert {(s.public_key, s.port) for s in info.sides} == {
            (KEY_A, ports[0]),
            (KEY_C, ports[1]),
        }

    run(scenario)


def test_bad_requests_are_named():
    async def scenario(relay: Relay) -> None:
        with pytest.raises(RelayError, match=r"not a WireGuard public key.*'nope'"):
            await relay.allocate("nope", KEY_B)
        short = "AAAA"
        with pytest.raises(RelayError, match="not a WireGuard public key"):
            await relay.allocate(KEY_A, short)
        with pytest.raises(RelayError, match="cannot be relayed to itself"):
            await relay.allocate(KEY_A, KEY_A)
        assert relay.allocations() == []

    run(scenario)


def test_the_cap_refuses_new_pairs_but_serves_existing_ones():
    async def scenario(relay: Relay) -> None:
        await relay.allocate(KEY_A, KEY_B)
        await relay.allocate(KEY_A, KEY_C)
        with pytest.raises(RelayFull, match="relay full: 2 pairs") as refused:
            await relay.allocate(KEY_B, KEY_C)
        assert isinstance(refused.value, MeshdError)
        await relay.allocate(KEY_B, KEY_A)  # an existing pair is not a new one
        assert len(relay.allocations()) == 2

    run(scenario, max_allocations=2)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
        return True


def test_idle_allocations_expire_and_their_ports_close():
    clock = Clock()

    async def scenario(relay: Relay) -> None:
        a, _, port_a, port_b = await paired(relay)  # at t=0
        clock.now = 100
        assert relay.expire() == []  # traffic since the last look: active now (t=100)
        clock.now = 200
        assert relay.expire() == []  # idle for 100 s
        await relay.allocate(KEY_B, KEY_A)  # asking again refreshes it (t=200)
        clock.now = 319
        assert relay.expire() == []
        a.send(data(), port_a)
        await settled(relay, lambda r: side(r, KEY_A).packets == 1)  # its handshake was dropped
        clock.now = 330
        assert relay.expire() == []  # the packet counts: active at 330
        clock.now = 450
        assert relay.expire() == []  # 120 s is not more than idle_timeout
        a.send(b"junk", port_a)  # dropped datagrams do not keep it alive
        await settled(relay, lambda r: side(r, KEY_A).dropped["junk"] == 1)
        assert not port_is_free(port_a)
        # B's handshake response (92 bytes) and A's transport data (48): junk is no traffic.
        assert relay.forwarded() == (2, 92 + 48)
        clock.now = 451
        (gone,) = relay.expire()
        assert {s.port for s in gone.sides} == {port_a, port_b}
        assert gone.idle == 121
        assert relay.allocations() == []
        assert relay.forwarded() == (2, 92 + 48)  # a counter: closing a pair keeps its count
        assert port_is_free(port_a)
        assert port_is_free(port_b)

    run(scenario, clock=clock, idle_timeout=120)


def test_mac1_of_a_real_wireguard_go_initiation():
    receiver = decode_public_key(RECORDED_RECEIVER)
    assert valid_mac1(RECORDED_INITIATION, mac1_key(receiver))
    assert not valid_mac1(RECORDED_INITIATION, mac1_key(decode_public_key(KEY_A)))


def forwarded_by_the_rules(datagram: bytes, receiver: str) -> bool:
    """The module docstring's rules, written again from the whitepaper for a learnt sender."""
    kind, reserved, size = datagram[:1], datagram[1:4], len(datagram)
    if reserved != bytes(3):
        return False
    if kind == b"\x04":
        # Padded to 16 but never past the sender's MTU, which may be any number.
        return size >= 32
    if kind == b"\x03":
        return size == 64
    mac_at = {b"\x01": 116, b"\x02": 60}.get(kind)
    if mac_at is None or size != mac_at + 32:
        return False
    return datagram[mac_at : mac_at + 16] == whitepaper_mac1(receiver, datagram[:mac_at])


def shaped(kind: int, size: int, mac_for: str | None, body: bytes) -> bytes:
    """A datagram of the given type byte and size; with ``mac_for``, mac1 set for that key."""
    datagram = bytes([kind]) + bytes(3) + (body * (size // max(len(body), 1) + 1))[: size - 4]
    if mac_for is not None and size in (148, 92):
        at = size - 32
        datagram = datagram[:at] + whitepaper_mac1(mac_for, datagram[:at]) + datagram[at + 16 :]
    return datagram[:size]


datagrams = st.one_of(
    st.binary(max_size=300),
    st.builds(
        shaped,
        kind=st.integers(0, 6),
        size=st.one_of(st.sampled_from([32, 48, 64, 92, 148, 1440]), st.integers(4, 300)),
        mac_for=st.sampled_from([None, KEY_A, KEY_B]),
        body=st.binary(min_size=1, max_size=40),
    ),
)


def test_what_is_forwarded_follows_the_rules_for_any_datagram():
    loop = asyncio.new_event_loop()
    relay = Relay(host=HOST)
    a, b, port_a, _ = loop.run_until_complete(paired(relay))

    def handled(r: Relay) -> int:
        info = side(r, KEY_A)
        return info.packets + sum(info.dropped.values())

    @settings(max_examples=400, deadline=None)
    @given(datagrams)
    def check(datagram: bytes) -> None:
        before = handled(relay)
        a.send(datagram, port_a)
        loop.run_until_complete(settled(relay, lambda r: handled(r) == before + 1))
        # The relay's sendto ran inside datagram_received: on loopback, what was
        # forwarded is in b's buffer already.
        try:
            got: bytes | None = b.sock.recv(4096)
        except BlockingIOError:
            got = None
        assert got == (datagram if forwarded_by_the_rules(datagram, KEY_B) else None)

    try:
        check()
    finally:
        relay.close()
        a.close()
        b.close()
        loop.close()


def test_a_dual_stack_relay_forwards_for_ipv4_members():
    async def scenario(relay: Relay) -> None:
        a, b, port_a, port_b = await paired(relay)
        packet = data()
        a.send(packet, port_a)
        assert await b.receive() == (packet, port_b)
        assert side(relay, KEY_A).address == f"[::ffff:{HOST}]:{a.port}"

    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    run(scenario, host="::")


def test_the_nat_plugin_reports_what_its_relay_forwarded():
    plugin = NatPlugin()
    assert plugin.meshd_metrics(agent=None) is None  # not started: nothing to report

    async def scenario(relay: Relay) -> None:
        plugin.traversal = SimpleNamespace(relay_server=relay)  # type: ignore[assignment]
        await paired(relay)  # one handshake response forwarded, 92 bytes
        figures = {s.name: (s.kind, s.value) for s in plugin.meshd_metrics(agent=None)}
        assert figures == {
            "meshd_relay_forwarded_bytes": ("counter", 92),
            "meshd_relay_forwarded_packets": ("counter", 1),
            "meshd_relay_pairs": ("gauge", 1),
        }

    run(scenario)
