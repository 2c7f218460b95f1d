"""The Noise handshake of enrolment (meshd.pki.noise) and its encrypted frames."""

from __future__ import annotations

import asyncio
import json
from ipaddress import IPv4Address
from pathlib import Path
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.b64 import encode_b64
from meshd.errors import IdentityError
from meshd.node import NodeStore
from meshd.pki.ca import NetworkCA
from meshd.pki.certificate import CertChain
from meshd.pki.enrol import (
    HANDSHAKE_REFUSAL,
    NOISE_PATTERN,
    SecureChannel,
    SeedIdentity,
    enrolment_psk,
    respond_handshake,
    seal_frame,
)
from meshd.pki.enrol_server import ReplayGuard
from meshd.pki.noise import (
    MAX_MESSAGE,
    CipherState,
    Handshake,
    HandshakeError,
    generate_private_key,
    public_key,
)

PSK = bytes(range(32))


def k(byte: int) -> bytes:
    return bytes([byte]) * 32


# Produced by noiseprotocol 0.3.1 (an independent implementation) for these fixed keys:
# initiator ephemeral k(1), responder ephemeral k(2), initiator static k(3) (XX only),
# responder static k(4), psk k(7), prologue b"meshd test prologue", payloads
# b"one", b"two", b"three", then transport messages: b"after" and b"again" to the
# responder (nonces 0 and 1), b"back" to the initiator.
VECTORS = {
    "XXpsk0": (
        [
            "a4e09292b651c278b9772c569f5fa9bb13d906b46ab68c9df9dc2b4409f8a209539d14d47e1a7daf"
            "2103bcdd2bdebc149d0980",
            "ce8d3ad1ccb633ec7b70c17814a5c76ecd029685050d344745ba05870e587d5953fb5c1de2226578"
            "d0297dea2244bddddc2d2830b3db6791d35d3811fb7b3c93eb017b0035070e917a19b6101edfb20c"
            "1cb581d096854b1b12289078dcef9f21a6c249",
            "4658000ef475bdf7c86b688caca59fe942c46dc3c445a98d4954aee1518ba00c3386f1071276769a"
            "1defd4ea92c16be83760243699f4e64f54bb59e8f39d3786d9a0d68649",
        ],
        (
            "23e3403f40ac1fdeeedd872a24d8136a4846410f1d",
            "84dfbfbeebfdee05d600e5b60de6ec531835896b36",
        ),
        "7ffc2f3ccce5904c9589a3c05a544b9b9db906de",
        "f8c5febe5a68922f1f2f650426da927aa5fd70212c52c49f275b3a131aea4d276144b1e3328bb842"
        "46224a287a03e53c4f8fb275b886a8fb03210b0a861c1337",
    ),
    "NXpsk0": (
        [
            "a4e09292b651c278b9772c569f5fa9bb13d906b46ab68c9df9dc2b4409f8a209791b64f290cd6792"
            "896793b8a454417ffca92d",
            "ce8d3ad1ccb633ec7b70c17814a5c76ecd029685050d344745ba05870e587d592cd344a264d3cecb"
            "e4391ebe937937c5076170a92f85110f362f14f9dfe68b02d7f110b00db8e9daa1f431221c010de5"
            "58fa9968612ec37d67de8a5ca2cf627fa3fae9",
        ],
        (
            "5f30d5a16302df3613d38fb07a0e01ec7614a6013d",
            "57dba444c0d28007cade937e487ed6c182558a4cfc",
        ),
        "33e919dea05816e1b4c2616c5899f056960bba57",
        "d24335d49aad31f714c98614dbad759e511ca72bae4109285c98a35371eba18a05129bb835e446d9"
        "2536746838907d7cd7f41dea4e6278e43fc88ac46b925f90",
    ),
}


def pair(
    pattern: str = NOISE_PATTERN,
    *,
    psk: bytes = PSK,
    responder_psk: bytes | None = None,
    prologue: bytes = b"hello",
    responder_prologue: bytes | None = None,
) -> tuple[Handshake, Handshake]:
    initiator = Handshake(
        pattern,
        initiator=True,
        prologue=prologue,
        psk=psk,
        static_key=generate_private_key() if pattern.startswith("X") else None,
    )
    responder = Handshake(
        pattern,
        initiator=False,
        prologue=prologue if responder_prologue is None else responder_prologue,
        psk=psk if responder_psk is None else responder_psk,
        static_key=generate_private_key(),
    )
    return initiator, responder


def run_handshake(initiator: Handshake, responder: Handshake, payloads: list[bytes]) -> None:
    sides = [initiator, responder]
    for turn, payload in enumerate(payloads):
        writer, reader = sides[turn % 2], sides[(turn + 1) % 2]
        assert reader.read_message(writer.write_message(payload)) == payload


@pytest.mark.parametrize("pattern", sorted(VECTORS))
def test_messages_match_an_independent_implementation(pattern: str) -> None:
    messages, to_responder, to_initiator, handshake_hash = VECTORS[pattern]
    initiator = Handshake(
        pattern,
        initiator=True,
        prologue=b"meshd test prologue",
        psk=k(7),
        ephemeral_key=k(1),
        static_key=k(3) if pattern == "XXpsk0" else None,
    )
    responder = Handshake(
        pattern,
        initiator=False,
        prologue=b"meshd test prologue",
        psk=k(7),
        ephemeral_key=k(2),
        static_key=k(4),
    )
    sides = [initiator, responder]
    payloads = [b"one", b"two", b"three"][: len(messages)]
    for turn, (expected, payload) in enumerate(zip(messages, payloads, strict=True)):
        message = sides[turn % 2].write_message(payload)
        assert message.hex() == expected
        assert sides[(turn + 1) % 2].read_message(message) == payload
    assert initiator.complete
    assert responder.complete
    assert initiator.handshake_hash.hex() == handshake_hash
    assert responder.handshake_hash == initiator.handshake_hash
    assert initiator.remote_static == public_key(k(4))
    i_send, i_receive = initiator.split()
    r_send, r_receive = responder.split()
    for plaintext, expected in zip((b"after", b"again"), to_responder, strict=True):
        sealed = i_send.encrypt(plaintext)
        assert sealed.hex() == expected
        assert r_receive.decrypt(sealed) == plaintext
    sealed = r_send.encrypt(b"back")
    assert sealed.hex() == to_initiator
    assert i_receive.decrypt(sealed) == b"back"


@settings(max_examples=50, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=2000), min_size=2, max_size=2),
    prologue=st.binary(max_size=100),
)
def test_any_payloads_go_through_and_both_sides_agree(
    payloads: list[bytes], prologue: bytes
) -> None:
    initiator, responder = pair(prologue=prologue)
    run_handshake(initiator, responder, payloads)
    assert initiator.handshake_hash == responder.handshake_hash
    assert initiator.remote_static is not None
    send, _ = initiator.split()
    _, receive = responder.split()
    assert receive.decrypt(send.encrypt(b"x", b"ad"), b"ad") == b"x"


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_a_tampered_handshake_message_fails(data: st.DataObject) -> None:
    initiator, responder = pair()
    turn = data.draw(st.sampled_from([0, 1]), label="message")
    message = initiator.write_message(b"request")
    if turn == 1:
        responder.read_message(message)
        message = responder.write_message(b"seed chain")
    tampered = bytearray(message)
    position = data.draw(st.integers(0, len(tampered) - 1), label="byte")
    tampered[position] ^= data.draw(st.integers(1, 255), label="xor")
    reader = responder if turn == 0 else initiator
    with pytest.raises(HandshakeError):
        reader.read_message(bytes(tampered))
    # A failed handshake stays failed.
    with pytest.raises(HandshakeError):
        reader.read_message(message)


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_as_message_one_fail_cleanly(garbage: bytes) -> None:
    _, responder = pair()
    with pytest.raises(HandshakeError):
        responder.read_message(garbage)


def test_a_wrong_psk_fails_at_the_first_message() -> None:
    initiator, responder = pair(responder_psk=bytes(32))
    with pytest.raises(HandshakeError):
        responder.read_message(initiator.write_message())


def test_a_changed_prologue_fails_the_handshake() -> None:
    # The prologue is the seed's clear hello: a man in the middle who edits it is caught.
    initiator, responder = pair(prologue=b"hello v2", responder_prologue=b"hello v1")
    with pytest.raises(HandshakeError):
        responder.read_message(initiator.write_message())


def test_every_handshake_has_its_own_hash() -> None:
    # The joiner's proof signs the hash: it cannot be moved to another handshake.
    first, first_responder = pair()
    second, second_responder = pair()
    run_handshake(first, first_responder, [b"", b""])
    run_handshake(second, second_responder, [b"", b""])
    assert first.handshake_hash == first_responder.handshake_hash
    assert first.handshake_hash != second.handshake_hash


def test_a_replayed_first_message_gets_nowhere() -> None:
    initiator, responder = pair()
    message1 = initiator.write_message()
    responder.read_message(message1)
    initiator.read_message(responder.write_message(b"chain"))
    # Replayed to a fresh responder: it verifies, but the answer is sealed to the
    # original ephemeral key, which the replayer does not hold.
    replayer = Handshake(NOISE_PATTERN, initiator=True, prologue=b"hello", psk=PSK)
    replayer.write_message()  # a state with the psk but another ephemeral key
    _, fresh = pair()
    fresh.read_message(message1)
    with pytest.raises(HandshakeError):
        replayer.read_message(fresh.write_message(b"chain"))


def seed_identity(gossip_keys: tuple[bytes, ...] = (k(9),)) -> SeedIdentity:
    private = generate_private_key()
    ca = NetworkCA.generate("lab")
    cert = ca.issue_node_cert("seed", encode_b64(public_key(private)), [IPv4Address("100.80.0.1")])
    return SeedIdentity(private, CertChain(cert), gossip_keys, ca.public_key)


def joiner_first_message(identity: SeedIdentity, gossip_key: bytes) -> tuple[Handshake, bytes]:
    joiner = Handshake(
        NOISE_PATTERN,
        initiator=True,
        prologue=b"hello",
        psk=enrolment_psk(gossip_key, identity.ca_public_key),
    )
    return joiner, joiner.write_message()


def test_the_seed_refuses_a_replayed_first_message_with_the_fixed_reason() -> None:
    identity = seed_identity()
    guard = ReplayGuard()
    joiner, message1 = joiner_first_message(identity, k(9))
    _, message2 = respond_handshake(b"hello", message1, identity, guard.seen)
    assert joiner.read_message(message2) == identity.chain.encode()
    with pytest.raises(HandshakeError) as info:
        respond_handshake(b"hello", message1, identity, guard.seen)
    assert str(info.value) == HANDSHAKE_REFUSAL


def test_the_seed_accepts_every_key_of_its_keyring_and_no_other() -> None:
    # During a gossip key rotation a token may carry the old key or the new one.
    identity = seed_identity(gossip_keys=(k(10), k(9)))
    for key in (k(9), k(10)):
        joiner, message1 = joiner_first_message(identity, key)
        _, message2 = respond_handshake(b"hello", message1, identity, ReplayGuard().seen)
        joiner.read_message(message2)
        assert joiner.remote_static == public_key(identity.private_key)
    _, wrong = joiner_first_message(identity, k(11))
    with pytest.raises(HandshakeError) as info:
        respond_handshake(b"hello", wrong, identity, ReplayGuard().seen)
    # The same words as for a replay: nothing tells one cause from another.
    assert str(info.value) == HANDSHAKE_REFUSAL


def test_the_psk_depends_on_the_network_and_the_gossip_key() -> None:
    assert enrolment_psk(k(1), k(2)) != enrolment_psk(k(1), k(3))
    assert enrolment_psk(k(1), k(2)) != enrolment_psk(k(4), k(2))
    assert enrolment_psk(k(1), k(2)) != k(1)  # the gossip key itself is never a cipher key


def test_messages_out_of_turn_are_refused() -> None:
    initiator, responder = pair()
    with pytest.raises(HandshakeError, match="out of turn"):
        responder.write_message()
    message = initiator.write_message()
    with pytest.raises(HandshakeError, match="out of turn"):
        initiator.write_message()
    responder.read_message(message)
    initiator.read_message(responder.write_message())
    with pytest.raises(HandshakeError, match="complete"):
        initiator.write_message()


def test_a_low_order_ephemeral_key_fails_cleanly() -> None:
    # An all-zero point makes X25519 output zeros; libsodium refuses it.
    initiator, responder = pair()
    responder.read_message(initiator.write_message())
    forged = bytes(32) + responder.write_message()[32:]
    with pytest.raises(HandshakeError):
        initiator.read_message(forged)


# --- encrypted frames -------------------------------------------------------------------


def channel_pair() -> tuple[CipherState, Handshake]:
    """The joiner's sending cipher and the seed's finished handshake."""
    initiator, responder = pair()
    run_handshake(initiator, responder, [b"", b""])
    send, _ = initiator.split()
    return send, responder


async def read_sealed(wire: bytes, receive: Handshake, limit: int) -> bytes:
    """What the seed's SecureChannel.read_frame makes of ``wire``."""
    reader = asyncio.StreamReader()
    reader.feed_data(wire)
    reader.feed_eof()
    channel = SecureChannel(reader, cast(asyncio.StreamWriter, None), receive)
    return await channel.read_frame(limit)


@settings(max_examples=20, deadline=None)
@given(size=st.sampled_from([0, 1, MAX_MESSAGE - 16, MAX_MESSAGE - 15, 3 * MAX_MESSAGE + 7]))
def test_frames_of_any_size_go_through_in_noise_sized_messages(size: int) -> None:
    send, receive = channel_pair()
    body = bytes(i % 251 for i in range(size))
    wire = seal_frame(send, body)
    assert asyncio.run(read_sealed(wire, receive, 1 << 20)) == body


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_a_tampered_frame_does_not_decrypt(data: st.DataObject) -> None:
    send, receive = channel_pair()
    wire = bytearray(seal_frame(send, b"welcome " * 10000))  # two Noise messages
    position = data.draw(st.integers(4, len(wire) - 1))
    wire[position] ^= data.draw(st.integers(1, 255))
    with pytest.raises((HandshakeError, asyncio.IncompleteReadError)):
        asyncio.run(read_sealed(bytes(wire), receive, 1 << 20))


def test_a_cut_frame_with_a_forged_length_does_not_decrypt() -> None:
    # Dropping the last message of a frame and shortening its length: every message
    # is authenticated with the frame's length, so the first one no longer decrypts.
    send, receive = channel_pair()
    body = b"x" * (MAX_MESSAGE + 100)
    wire = seal_frame(send, body)
    first_chunk = MAX_MESSAGE - 16
    cut = first_chunk.to_bytes(4, "big") + wire[4 : 4 + MAX_MESSAGE]
    with pytest.raises(HandshakeError):
        asyncio.run(read_sealed(cut, receive, 1 << 20))


def test_the_frame_limit_is_checked_before_reading() -> None:
    send, receive = channel_pair()
    wire = seal_frame(send, b"y" * 5000)
    with pytest.raises(IdentityError, match="larger than 4096"):
        asyncio.run(read_sealed(wire[:4], receive, 4096))


def test_a_seed_takes_its_psks_from_every_key_in_serfs_keyring(tmp_path: Path) -> None:
    store = NodeStore(tmp_path)
    assert store.gossip_keys() == ()  # before Serf first ran: the agent uses its own
    store.serf_dir.mkdir()
    keyring = [encode_b64(k(1)), "not base64 !", encode_b64(k(2))]
    (store.serf_dir / "keyring.json").write_text(json.dumps(keyring))
    assert store.gossip_keys() == (k(1), k(2))
    (store.serf_dir / "keyring.json").write_text("{broken")
    assert store.gossip_keys() == ()
