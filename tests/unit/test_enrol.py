"""The enrolment protocol over real loopback sockets: admission, refusals, garbage, limits."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.b64 import decode_b64, encode_b64
from meshd.errors import EnrolError, EnrolRefused, IdentityError
from meshd.identity import WireGuardKeyPair
from meshd.pki.ca import NetworkCA
from meshd.pki.certificate import CertChain, Certificate, check_binding
from meshd.pki.enrol import (
    MAX_REQUEST,
    EnrolRequest,
    EnrolResult,
    PeerInfo,
    enrol,
    proof_message,
    verify_proof,
)
from meshd.pki.enrol_server import EnrolServer, RateLimiter, chain_verifier
from meshd.pki.revocation import RevocationList
from meshd.pki.token import Seed, Token, create_token, parse_token

LOOPBACK = "127.0.0.1"
DEADLINE = 30.0  # generous: a loaded 2-core machine must not make these flaky


class Network:
    """A CA, a seed with a CA-signed certificate, a member and a token, as `meshd init` makes."""

    def __init__(self, name: str = "lab", ttl: int = 3600, now: int | None = None) -> None:
        self.ca = NetworkCA.generate(name)
        self.seed_key = WireGuardKeyPair.generate().public_key
        self.seed_chain = CertChain(
            self.ca.issue_node_cert("seed", self.seed_key, [IPv4Address("100.80.0.1")], now=now)
        )
        self.member_chain = CertChain(
            self.ca.issue_node_cert(
                "member", WireGuardKeyPair.generate().public_key, [IPv4Address("100.80.0.2")]
            )
        )
        self.token = create_token(
            self.ca,
            gossip_key=os.urandom(32),
            cidr4=IPv4Network("100.80.0.0/16"),
            seeds=[Seed("127.0.0.1:51820", 7947, self.seed_key, IPv4Address("100.80.0.1"))],
            ttl=ttl,
            now=now,
        )
        self.revoked = RevocationList()
        self.enrolled: list[EnrolRequest] = []

    def welcome(self, request: EnrolRequest) -> EnrolResult:
        self.enrolled.append(request)
        return EnrolResult(
            seed=PeerInfo(self.seed_chain, "127.0.0.1:51820"),
            members=(PeerInfo(self.member_chain, "127.0.0.2:51820"),),
        )

    def server(
        self, on_enrolled: Callable[[EnrolRequest], Any] | None = None, **options: Any
    ) -> EnrolServer:
        return EnrolServer(
            LOOPBACK,
            0,
            chain_verifier(self.ca.public_key, revoked=lambda: self.revoked),
            on_enrolled or self.welcome,
            **options,
        )


def joiner_cert(token: Token, name: str = "laptop", now: int | None = None) -> Any:
    key = WireGuardKeyPair.generate().public_key
    return token.enrolment.sign_node_cert(name, key, [IPv4Address("100.80.7.7")], now=now)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(scenario(), DEADLINE)

    asyncio.run(bounded())


async def raw_exchange(port: int, payload: bytes) -> list[dict[str, Any]]:
    """Speak to the server byte by byte; the frames it sends back until it closes."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write(payload)
    await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()
    frames = []
    while True:
        try:
            header = await reader.readexactly(4)
        except asyncio.IncompleteReadError:
            break
        frames.append(json.loads(await reader.readexactly(struct.unpack(">I", header)[0])))
    writer.close()
    return frames


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


# --- success --------------------------------------------------------------------------


def test_enrolment_succeeds_over_loopback() -> None:
    net = Network()

    async def scenario() -> None:
        async with net.server() as server:
            cert = joiner_cert(net.token)
            result = await enrol(LOOPBACK, server.port, net.token, cert, "192.0.2.50:51820")
            assert result.seed.public_key == net.seed_key
            assert result.seed.addresses == (IPv4Address("100.80.0.1"),)
            assert result.seed.endpoint == "127.0.0.1:51820"
            assert [m.name for m in result.members] == ["member"]
            [request] = net.enrolled
            assert request.name == "laptop"
            assert request.public_key == cert.public_key
            assert request.endpoint == "192.0.2.50:51820"
            assert request.source == LOOPBACK

    run(scenario)


def test_async_callback_is_awaited() -> None:
    net = Network()

    async def add_peer(request: EnrolRequest) -> EnrolResult:
        await asyncio.sleep(0)
        return net.welcome(request)

    async def scenario() -> None:
        async with net.server(add_peer) as server:
            await enrol(LOOPBACK, server.port, net.token, joiner_cert(net.token), "192.0.2.1:1")
        assert len(net.enrolled) == 1

    run(scenario)


def test_members_that_do_not_verify_are_dropped() -> None:
    net = Network()
    stranger = Network()

    def welcome(request: EnrolRequest) -> EnrolResult:
        return EnrolResult(
            seed=PeerInfo(net.seed_chain, None),
            members=(PeerInfo(net.member_chain), PeerInfo(stranger.member_chain)),
        )

    async def scenario() -> None:
        async with net.server(welcome) as server:
            result = await enrol(
                LOOPBACK, server.port, net.token, joiner_cert(net.token), "192.0.2.1:1"
            )
        assert [m.public_key for m in result.members] == [net.member_chain.node.public_key]

    run(scenario)


def test_a_seed_from_another_network_is_an_error() -> None:
    net = Network()
    impostor = Network()

    def welcome(request: EnrolRequest) -> EnrolResult:
        return EnrolResult(seed=PeerInfo(impostor.seed_chain, None))

    async def scenario() -> None:
        async with net.server(welcome) as server:
            with pytest.raises(EnrolError, match="is not a member of network"):
                await enrol(LOOPBACK, server.port, net.token, joiner_cert(net.token), "192.0.2.1:1")

    run(scenario)


# --- refusals with a reason -------------------------------------------------------------


def test_token_of_another_network_is_refused_with_reason() -> None:
    net = Network()
    other = Network()

    async def scenario() -> None:
        async with net.server() as server:
            with pytest.raises(EnrolRefused, match=r"refused enrolment: .*belongs to network"):
                await enrol(
                    LOOPBACK, server.port, other.token, joiner_cert(other.token), "192.0.2.1:1"
                )
        assert net.enrolled == []

    run(scenario)


def test_revoked_token_is_refused_with_reason() -> None:
    net = Network()
    net.revoked.add(net.ca.revoke(net.token.enrolment.cert), net.ca.public_key)

    async def scenario() -> None:
        async with net.server() as server:
            with pytest.raises(EnrolRefused, match="revoked") as info:
                await enrol(LOOPBACK, server.port, net.token, joiner_cert(net.token), "192.0.2.1:1")
        assert info.value.seed == f"{LOOPBACK}:{server.port}"
        assert net.enrolled == []

    run(scenario)


def expired_network() -> tuple[Network, Certificate]:
    """A network whose token was made two hours ago with a one-hour life, and a joiner's cert."""
    then = int(time.time()) - 7200
    net = Network(ttl=3600, now=then)
    return net, joiner_cert(net.token, now=then + 10)


def test_expired_token_is_refused_by_the_seed() -> None:
    # The client would refuse it itself, so speak the protocol by hand, as a modified
    # client would.
    net, cert = expired_network()

    async def scenario() -> None:
        async with net.server() as server:
            answers = await signed_exchange(
                server.port, net.token, CertChain(cert, (net.token.enrolment.cert,))
            )
        assert answers[-1]["type"] == "refused"
        assert "expired" in answers[-1]["reason"]
        assert net.enrolled == []

    run(scenario)


def test_expired_token_is_refused_by_the_client_before_connecting() -> None:
    net, cert = expired_network()

    async def scenario() -> None:
        with pytest.raises(IdentityError, match="expired"):
            await enrol(LOOPBACK, 9, net.token, cert, "192.0.2.1:1")

    run(scenario)


def test_callback_refusal_reaches_the_joiner() -> None:
    net = Network()

    def name_taken(request: EnrolRequest) -> EnrolResult:
        raise EnrolRefused(f"name {request.name!r} is taken by another key")

    async def scenario() -> None:
        async with net.server(name_taken) as server:
            with pytest.raises(EnrolRefused, match="name 'laptop' is taken") as info:
                await enrol(LOOPBACK, server.port, net.token, joiner_cert(net.token), "192.0.2.1:1")
        assert info.value.reason == "name 'laptop' is taken by another key"

    run(scenario)


async def signed_exchange(
    port: int,
    token: Token,
    chain: CertChain,
    *,
    endpoint: str = "192.0.2.1:1",
    nonce_override: bytes | None = None,
) -> list[dict[str, Any]]:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        header = await reader.readexactly(4)
        hello = json.loads(await reader.readexactly(struct.unpack(">I", header)[0]))
        nonce = nonce_override or decode_b64(hello["nonce"])
        proof = token.enrolment.sign(proof_message(nonce, chain.encode(), endpoint))
        request = EnrolRequest(chain=chain, endpoint=endpoint, proof=proof)
        writer.write(frame(request.encode()))
        await writer.drain()
        header = await reader.readexactly(4)
        return [hello, json.loads(await reader.readexactly(struct.unpack(">I", header)[0]))]
    finally:
        writer.close()


def test_replayed_proof_is_refused() -> None:
    net = Network()
    cert = joiner_cert(net.token)
    chain = CertChain(cert, (net.token.enrolment.cert,))

    async def scenario() -> None:
        async with net.server() as server:
            answers = await signed_exchange(server.port, net.token, chain, nonce_override=bytes(32))
        assert answers[-1] == {
            "type": "refused",
            "v": 1,
            "reason": "the proof of holding the token does not verify",
        }
        assert net.enrolled == []

    run(scenario)


def test_certificate_without_enrolment_key_is_refused() -> None:
    # A CA-signed member certificate proves nothing about holding a token.
    net = Network()

    async def scenario() -> None:
        async with net.server() as server:
            answers = await signed_exchange(server.port, net.token, net.member_chain)
        assert "enrolment key" in answers[-1]["reason"]

    run(scenario)


# --- garbage, timeouts, limits ----------------------------------------------------------

GARBAGE = [
    b"",
    b"\x00",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    struct.pack(">I", 0xFFFFFFFF) + b"x" * 100,
    struct.pack(">I", MAX_REQUEST + 1),
    frame(b"not json"),
    frame(b"[1, 2, 3]"),
    frame(b"[" * 5000 + b"]" * 5000),
    frame(json.dumps({"type": "enrol", "v": 1}).encode()),
    frame(
        json.dumps({"type": "enrol", "v": 1, "chain": "!!", "endpoint": 5, "proof": ""}).encode()
    ),
    frame(json.dumps({"type": "refused", "v": 1, "reason": "\x1b[31mhi"}).encode()),
    frame(b"\xff\xfe\xfd") + b"trailing",
    os.urandom(3000),
]


def test_garbage_does_not_kill_the_server(caplog: pytest.LogCaptureFixture) -> None:
    net = Network()

    async def scenario() -> None:
        async with net.server(burst=100) as server:
            for payload in GARBAGE:
                frames = await raw_exchange(server.port, payload)
                assert frames, payload[:40]
                assert frames[0]["type"] == "hello"
                # Anything past the hello is a refusal, never a welcome.
                assert all(f["type"] == "refused" for f in frames[1:]), payload[:40]
            result = await enrol(
                LOOPBACK, server.port, net.token, joiner_cert(net.token), "192.0.2.1:1"
            )
            assert result.seed.name == "seed"
        assert len(net.enrolled) == 1
        # Garbage is a client's problem, not a failure of the seed: no error, no traceback.
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []

    run(scenario)


def test_malformed_request_is_answered_with_a_reason() -> None:
    net = Network()

    async def scenario() -> None:
        async with net.server() as server:
            frames = await raw_exchange(server.port, frame(b"{}"))
        assert frames[-1]["type"] == "refused"
        assert "version" in frames[-1]["reason"]

    run(scenario)


def test_silent_client_is_cut_off_and_server_goes_on() -> None:
    net = Network()

    async def scenario() -> None:
        async with net.server(timeout=0.5) as server:
            reader, writer = await asyncio.open_connection(LOOPBACK, server.port)
            await reader.readexactly(4)  # the hello's header: the server is talking
            # Send nothing: the server's deadline closes the connection.
            rest = await asyncio.wait_for(reader.read(), DEADLINE / 2)
            assert b"hello" in rest
            assert reader.at_eof()
            writer.close()
            await enrol(LOOPBACK, server.port, net.token, joiner_cert(net.token), "192.0.2.1:1")

    run(scenario)


def test_an_honest_joiner_gets_in_while_300_idle_connections_are_held() -> None:
    """The attack from the security review: 295 idle connections from 59 addresses
    locked honest joiners out for 10 s. Loopback has a whole /8 to connect from."""
    net = Network()

    async def scenario() -> None:
        async with net.server() as server:
            held = []
            for i in range(300):
                source = f"127.0.{1 + i // 5 // 250}.{1 + (i // 5) % 250}"  # 60 sources, 5 each
                reader, writer = await asyncio.open_connection(
                    LOOPBACK, server.port, local_addr=(source, 0)
                )
                held.append((reader, writer))
            started = asyncio.get_running_loop().time()
            result = await enrol(
                LOOPBACK, server.port, net.token, joiner_cert(net.token), "192.0.2.9:1"
            )
            took = asyncio.get_running_loop().time() - started
            assert result.seed.public_key == net.seed_key
            assert took < 3.0  # before any idle connection's own deadline freed a place
            refused = 0
            for reader, writer in held:
                with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                    header = await asyncio.wait_for(reader.readexactly(4), 1)
                    body = await reader.readexactly(struct.unpack(">I", header)[0])
                    refused += b"refused" in body
                writer.close()
            # Past the caps the rest were turned away at once, with a reason.
            assert refused >= 60

    run(scenario)


def test_crashing_callback_is_refused_not_fatal() -> None:
    net = Network()
    calls = []

    def broken(request: EnrolRequest) -> EnrolResult:
        calls.append(request)
        if len(calls) == 1:
            raise RuntimeError("bug in the agent")
        return net.welcome(request)

    async def scenario() -> None:
        async with net.server(broken) as server:
            with pytest.raises(EnrolRefused, match="failed to add you; see its log"):
                await enrol(LOOPBACK, server.port, net.token, joiner_cert(net.token), "192.0.2.1:1")
            await enrol(LOOPBACK, server.port, net.token, joiner_cert(net.token), "192.0.2.1:1")
        assert len(calls) == 2

    run(scenario)


def test_rate_limit_kicks_in() -> None:
    net = Network()

    async def scenario() -> None:
        async with net.server(burst=3, refill_per_second=0.001) as server:
            for _ in range(3):
                await enrol(LOOPBACK, server.port, net.token, joiner_cert(net.token), "192.0.2.1:1")
            with pytest.raises(EnrolRefused, match="rate limited"):
                await enrol(LOOPBACK, server.port, net.token, joiner_cert(net.token), "192.0.2.1:1")
        assert len(net.enrolled) == 3

    run(scenario)


def test_connection_refused_is_clear() -> None:
    net = Network()
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port = probe.getsockname()[1]
    # The port was free a moment ago and nothing listens on it now.

    async def scenario() -> None:
        with pytest.raises(EnrolError, match="connection refused"):
            await enrol(LOOPBACK, port, net.token, joiner_cert(net.token), "192.0.2.1:1")

    run(scenario)


def test_silent_seed_times_out() -> None:
    net = Network()

    async def scenario() -> None:
        async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()
            writer.close()

        server = await asyncio.start_server(mute, LOOPBACK, 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(EnrolError, match=r"did not answer within 0\.5 s"):
                await enrol(
                    LOOPBACK, port, net.token, joiner_cert(net.token), "192.0.2.1:1", timeout=0.5
                )
        finally:
            server.close()

    run(scenario)


def test_stop_closes_open_conversations() -> None:
    net = Network()

    async def scenario() -> None:
        server = net.server(timeout=DEADLINE * 10)
        await server.start()
        reader, writer = await asyncio.open_connection(LOOPBACK, server.port)
        await reader.readexactly(4)
        await asyncio.wait_for(server.stop(), DEADLINE / 2)
        await asyncio.wait_for(reader.read(), DEADLINE / 2)
        assert reader.at_eof()
        writer.close()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(LOOPBACK, server.port)

    run(scenario)


def test_rate_limiter_refills_and_groups_ipv6() -> None:
    now = [0.0]
    limiter = RateLimiter(2, 1.0, clock=lambda: now[0])
    assert limiter.allow("192.0.2.1")
    assert limiter.allow("192.0.2.1")
    assert not limiter.allow("192.0.2.1")
    assert limiter.allow("192.0.2.2")  # another source has its own bucket
    now[0] = 1.0
    assert limiter.allow("192.0.2.1")
    assert not limiter.allow("192.0.2.1")
    assert limiter.allow("2001:db8::1")
    assert limiter.allow("2001:db8::2")
    assert not limiter.allow("2001:db8::ffff")  # same /64
    assert limiter.allow("2001:db8:0:1::1")


def test_rate_limiter_memory_is_bounded() -> None:
    limiter = RateLimiter(1, 0.0, max_sources=10)
    for i in range(100):
        limiter.allow(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter._buckets) <= 10


# --- the request decoder: only IdentityError, whatever the bytes ------------------------


@settings(max_examples=400, deadline=5000)
@given(st.binary(max_size=MAX_REQUEST))
def test_random_request_bytes_only_raise_identity_error(data: bytes) -> None:
    with pytest.raises(IdentityError):
        EnrolRequest.decode(data)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=400, deadline=5000)
@given(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["enrol", "refused", "x"]), "v": st.sampled_from([1, 2, "1"])},
        optional={
            "chain": JSON | st.binary().map(lambda b: encode_b64(b)),
            "endpoint": JSON,
            "proof": JSON,
        },
    )
)
def test_random_request_objects_only_raise_identity_error(message: dict[str, Any]) -> None:
    with pytest.raises(IdentityError):
        EnrolRequest.decode(json.dumps(message).encode())


_NET = Network("fuzz")
_CHAIN = CertChain(joiner_cert(_NET.token), (_NET.token.enrolment.cert,))


@settings(max_examples=300, deadline=5000)
@given(data=st.data())
def test_mutated_requests_decode_or_fail_cleanly(data: st.DataObject) -> None:
    nonce = bytes(32)
    proof = _NET.token.enrolment.sign(proof_message(nonce, _CHAIN.encode(), "192.0.2.1:1"))
    original = EnrolRequest(_CHAIN, "192.0.2.1:1", proof).encode()
    mutated = bytearray(original)
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, len(mutated) - 1))
        mutated[pos] = data.draw(st.integers(0, 255))
    try:
        request = EnrolRequest.decode(bytes(mutated), nonce=nonce)
    except IdentityError:
        return
    # What decodes must still fail the proof unless only JSON whitespace/escapes changed.
    try:
        verify_proof(request)
        request.chain.verify(_NET.ca.public_key, _CHAIN.node.not_before)
    except IdentityError:
        return
    assert request.chain == _CHAIN
    assert request.endpoint == "192.0.2.1:1"


def test_reasons_are_printable_and_short() -> None:
    net = Network()

    def hostile(request: EnrolRequest) -> EnrolResult:
        raise EnrolRefused("\x1b[2J\x1b]0;owned\x07" + "x" * 5000)

    async def scenario() -> None:
        async with net.server(hostile) as server:
            with pytest.raises(EnrolRefused) as info:
                await enrol(LOOPBACK, server.port, net.token, joiner_cert(net.token), "192.0.2.1:1")
        assert info.value.reason.isprintable()
        assert info.value.reason.startswith("?[2J?]0;owned?x")
        assert len(info.value.reason) <= 300

    run(scenario)


def test_admission_story_with_the_ca_machine_offline() -> None:
    """init -> token text -> (CA gone) -> join -> a third member admits the joiner from gossip."""
    ca = NetworkCA.generate("home")
    ca_key = ca.public_key
    seed_wg = WireGuardKeyPair.generate().public_key
    seed_chain = CertChain(ca.issue_node_cert("first", seed_wg, [IPv4Address("100.64.0.1")]))
    text = create_token(
        ca,
        gossip_key=os.urandom(32),
        cidr4=IPv4Network("100.64.0.0/16"),
        seeds=[Seed("127.0.0.1:51820", 7947, seed_wg, IPv4Address("100.64.0.1"))],
        ttl=600,
    ).encode()
    del ca  # from here on, nobody holds the CA's secret
    peers_added: list[tuple[str, str]] = []

    def add_peer(request: EnrolRequest) -> EnrolResult:
        peers_added.append((request.public_key, request.endpoint))
        return EnrolResult(seed=PeerInfo(seed_chain, "127.0.0.1:51820"))

    async def scenario() -> None:
        token = parse_token(text, int(time.time()))
        me = WireGuardKeyPair.generate()
        cert = token.enrolment.sign_node_cert(
            "newcomer", me.public_key, [IPv4Address("100.64.9.9")]
        )
        verify = chain_verifier(ca_key)
        async with EnrolServer(LOOPBACK, 0, verify, add_peer) as server:
            result = await enrol(LOOPBACK, server.port, token, cert, "192.0.2.9:51820")
        assert result.seed.public_key == token.seeds[0].public_key
        assert peers_added == [(me.public_key, "192.0.2.9:51820")]
        # A third member fetches the newcomer's chain by its cert_ref and admits it.
        fetched = CertChain.decode(CertChain(cert, (token.enrolment.cert,)).encode())
        fetched.verify(ca_key, int(time.time()))
        check_binding(
            fetched.node,
            name="newcomer",
            public_key=me.public_key,
            addresses=[IPv4Address("100.64.9.9")],
        )

    run(scenario)
