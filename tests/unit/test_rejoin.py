"""Re-join requests (meshd.pki.rejoin): only the holder of a member's certified WireGuard
key can ask to be taken back, once, recently; the answer comes from the member asked.

The server and the client run for real on loopback UDP sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.bindings import crypto_scalarmult_base

from meshd.b64 import encode_b64
from meshd.errors import EnrolRefused, IdentityError
from meshd.identity import WireGuardKeyPair, decode_key
from meshd.pki.ca import NetworkCA
from meshd.pki.certificate import CertChain
from meshd.pki.rejoin import (
    MAX_SKEW,
    RejoinRequest,
    RejoinServer,
    RejoinTarget,
    Welcome,
    ask_to_rejoin,
)

LOOPBACK = "127.0.0.1"
ENDPOINT = "192.0.2.9:51820"
NOW = 1_800_000_000


class Pair:
    """A CA, a member asked to take another back (the seed) and the member asking."""

    def __init__(self) -> None:
        self.ca = NetworkCA.generate("lab")
        self.seed = WireGuardKeyPair.generate()
        self.member = WireGuardKeyPair.generate()
        self.chain = CertChain(
            self.ca.issue_node_cert("m", self.member.public_key, [IPv4Address("100.80.0.9")])
        )
        self.taken: list[RejoinRequest] = []
        self.took = asyncio.Event()

    @property
    def seed_private(self) -> bytes:
        return decode_key(self.seed.private_key)

    @property
    def member_private(self) -> bytes:
        return decode_key(self.member.private_key)

    def request(self, *, now: int = NOW, private: bytes | None = None) -> RejoinRequest:
        return RejoinRequest.make(
            self.chain,
            private or self.member_private,
            decode_key(self.seed.public_key),
            ENDPOINT,
            now=now,
        )

    def server(self, *, clock: Callable[[], float] = lambda: NOW) -> RejoinServer:
        async def take_back(request: RejoinRequest) -> str:
            if request.chain.node.name == "refused":
                raise EnrolRefused("certificate refused: revoked")
            self.taken.append(request)
            self.took.set()
            return "absent"

        return RejoinServer(LOOPBACK, 0, self.seed_private, take_back, clock=clock, burst=50)

    def target(self, server: RejoinServer) -> RejoinTarget:
        return RejoinTarget(LOOPBACK, server.port, decode_key(self.seed.public_key))


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(20):
            await scenario()

    asyncio.run(bounded())


def test_a_request_verifies_only_with_the_key_its_chain_binds() -> None:
    pair = Pair()
    request = RejoinRequest.decode(pair.request().encode(), pair.seed_private)
    request.verify(pair.seed_private)
    assert request.chain.node.public_key == pair.member.public_key
    # Someone holding the member's (public) chain but another private key.
    forged = pair.request(private=decode_key(WireGuardKeyPair.generate().private_key))
    with pytest.raises(IdentityError, match="proof of holding the certified WireGuard key"):
        forged.verify(pair.seed_private)
    # The endpoint is covered: a man in the middle cannot point the peer elsewhere.
    moved = dataclasses.replace(request, endpoint="198.51.100.1:51820")
    with pytest.raises(IdentityError, match="does not verify"):
        moved.verify(pair.seed_private)


def test_a_request_shows_an_observer_neither_who_asks_nor_where() -> None:
    pair = Pair()
    datagram = pair.request().encode()
    for secret in (
        pair.chain.encode(),
        encode_b64(pair.chain.encode()).encode(),
        ENDPOINT.encode(),
        pair.member.public_key.encode(),
        b"100.80.0.9",
    ):
        assert secret not in datagram
    assert json.loads(datagram)["v"] == 2
    # Only the member it is sealed to opens it.
    other = decode_key(WireGuardKeyPair.generate().private_key)
    with pytest.raises(IdentityError, match="another member"):
        RejoinRequest.decode(datagram, other)
    swapped = dict(json.loads(datagram), to=encode_b64(bytes(crypto_scalarmult_base(other))))
    with pytest.raises(IdentityError, match="does not open"):
        RejoinRequest.decode(json.dumps(swapped).encode(), other)


def test_a_version_1_request_in_clear_is_still_taken() -> None:
    pair = Pair()
    request = pair.request()
    clear = {
        "type": "rejoin",
        "v": 1,
        "chain": encode_b64(request.chain.encode()),
        "endpoint": request.endpoint,
        "to": encode_b64(request.to),
        "time": request.time,
        "nonce": encode_b64(request.nonce),
        "mac": encode_b64(request.mac),
    }
    decoded = RejoinRequest.decode(json.dumps(clear).encode(), pair.seed_private)
    decoded.verify(pair.seed_private)
    assert decoded == request


def test_an_answer_verifies_only_from_the_member_asked() -> None:
    pair = Pair()
    request = pair.request()
    welcome = Welcome.decode(Welcome.make(request, pair.seed_private, "left").encode())
    welcome.verify(request, pair.member_private)
    assert welcome.known == "left"
    other = decode_key(WireGuardKeyPair.generate().private_key)
    with pytest.raises(IdentityError, match="another request"):
        Welcome.make(request, other, "left").verify(request, pair.member_private)
    # The state it reports is covered too.
    changed = dataclasses.replace(welcome, known="alive")
    with pytest.raises(IdentityError, match="does not verify"):
        changed.verify(request, pair.member_private)


def test_a_member_is_taken_back_and_an_impostor_a_replay_or_a_stale_request_is_not() -> None:
    pair = Pair()

    async def scenario() -> None:
        async with pair.server() as server:
            target = pair.target(server)

            async def ask(private: bytes) -> list[Welcome]:
                return await ask_to_rejoin(
                    [target], pair.chain, private, ENDPOINT, timeout=0.5, now=NOW
                )

            answers = await ask(pair.member_private)
            assert [a.known for a in answers] == ["absent"]
            assert [r.chain.node.name for r in pair.taken] == ["m"]

            impostor = decode_key(WireGuardKeyPair.generate().private_key)
            assert await ask(impostor) == []

            # The same request again (a capture replayed), and one from too long ago.
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(
                asyncio.DatagramProtocol, local_addr=(LOOPBACK, 0)
            )
            replayed = pair.request()
            transport.sendto(replayed.encode(), (LOOPBACK, server.port))
            transport.sendto(replayed.encode(), (LOOPBACK, server.port))
            stale = pair.request(now=NOW - MAX_SKEW - 1)
            transport.sendto(stale.encode(), (LOOPBACK, server.port))
            # A marker after them: once it is taken, the datagrams before it were handled.
            transport.sendto(pair.request().encode(), (LOOPBACK, server.port))
            async with asyncio.timeout(5):
                while len(pair.taken) < 3:
                    pair.took.clear()
                    await pair.took.wait()
            transport.close()
            assert [r.nonce for r in pair.taken[1:]] == [replayed.nonce, pair.taken[2].nonce]
            assert stale.nonce not in {r.nonce for r in pair.taken}
            assert len({r.nonce for r in pair.taken}) == 3

    run(scenario)


def test_a_refused_member_gets_no_answer() -> None:
    pair = Pair()
    pair.chain = CertChain(
        pair.ca.issue_node_cert("refused", pair.member.public_key, [IPv4Address("100.80.0.9")])
    )

    async def scenario() -> None:
        async with pair.server() as server:
            answers = await ask_to_rejoin(
                [pair.target(server)],
                pair.chain,
                pair.member_private,
                ENDPOINT,
                timeout=0.3,
                now=NOW,
            )
            assert answers == []

    run(scenario)


def test_a_request_to_another_member_is_not_taken() -> None:
    pair = Pair()

    async def scenario() -> None:
        async with pair.server() as server:
            other = RejoinTarget(
                LOOPBACK, server.port, decode_key(WireGuardKeyPair.generate().public_key)
            )
            answers = await ask_to_rejoin(
                [other], pair.chain, pair.member_private, ENDPOINT, timeout=0.3, now=NOW
            )
            assert answers == []
            assert pair.taken == []

    run(scenario)


_PAIR = Pair()
_GOOD = json.loads(_PAIR.request().encode())


@settings(deadline=None, max_examples=200)
@given(
    field=st.sampled_from(sorted(_GOOD)),
    value=st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.text(max_size=40),
        st.lists(st.integers(), max_size=3),
        st.binary(max_size=40).map(encode_b64),
    ),
)
def test_a_request_with_any_field_changed_is_refused_with_identity_error(
    field: str, value: object
) -> None:
    changed = dict(_GOOD, **{field: value})
    try:
        request = RejoinRequest.decode(json.dumps(changed).encode(), _PAIR.seed_private)
    except IdentityError:
        return
    # It decoded: then the MAC must catch the change (or nothing changed).
    if changed == _GOOD:
        request.verify(_PAIR.seed_private)
        return
    with pytest.raises(IdentityError):
        request.verify(_PAIR.seed_private)


@given(st.binary(max_size=300))
def test_any_datagram_decodes_or_raises_identity_error(data: bytes) -> None:
    with contextlib.suppress(IdentityError):
        RejoinRequest.decode(data, _PAIR.seed_private)
    with contextlib.suppress(IdentityError):
        Welcome.decode(data)
