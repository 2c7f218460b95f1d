"""The network CA: certificates, offline chains, expiry, tampering, revocation, decoders."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshd.errors import IdentityError
from meshd.identity import WireGuardKeyPair
from meshd.pki.ca import EnrolmentKey, NetworkCA
from meshd.pki.certificate import (
    CLOCK_SKEW,
    DAY,
    CertChain,
    Certificate,
    Role,
    cert_ref,
    check_binding,
    network_id_of,
    verify,
    verify_chain,
)
from meshd.pki.revocation import Revocation, RevocationList, verify_revocation

NOW = 1_790_000_000
ADDR4 = IPv4Address("100.80.0.7")
ADDR6 = IPv6Address("fd80::7")


@pytest.fixture(scope="module")
def ca() -> NetworkCA:
    return NetworkCA.generate("lab")


@pytest.fixture(scope="module")
def enrolment(ca: NetworkCA) -> EnrolmentKey:
    return ca.issue_enrolment_key(lifetime=DAY, node_lifetime=30 * DAY, now=NOW)


@pytest.fixture(scope="module")
def wg_key() -> str:
    return WireGuardKeyPair.generate().public_key


@pytest.fixture(scope="module")
def node_chain(enrolment: EnrolmentKey, wg_key: str) -> CertChain:
    cert = enrolment.sign_node_cert("node-1", wg_key, [ADDR4, ADDR6], now=NOW + 60)
    return CertChain(cert, (enrolment.cert,))


def test_network_id_is_short_stable_and_per_key(ca: NetworkCA) -> None:
    assert len(ca.network_id) == 16
    assert ca.network_id == network_id_of(ca.public_key)
    assert NetworkCA.from_secret("lab", ca.secret).network_id == ca.network_id
    assert NetworkCA.generate("lab").network_id != ca.network_id


def test_ca_secret_not_in_repr(ca: NetworkCA, enrolment: EnrolmentKey) -> None:
    assert ca.secret.hex() not in repr(ca)
    assert str(ca.secret) not in repr(ca)
    assert str(enrolment.secret) not in repr(enrolment)


def test_ca_signed_node_cert_round_trips_and_verifies(ca: NetworkCA, wg_key: str) -> None:
    cert = ca.issue_node_cert("first", wg_key, [ADDR4], lifetime=DAY, now=NOW)
    decoded = Certificate.decode(cert.encode())
    assert decoded == cert
    assert decoded.role is Role.NODE
    assert decoded.public_key == wg_key
    assert decoded.addresses == (ADDR4,)
    verify(decoded, ca.public_key, NOW + 10)
    verify_chain(decoded, (), ca.public_key, NOW + 10)


def test_chain_verifies_with_only_the_enrolment_key(
    ca: NetworkCA, enrolment: EnrolmentKey, wg_key: str
) -> None:
    # The CA machine is "offline": only the enrolment key's secret and certificate are used.
    offline = EnrolmentKey.from_secret(
        enrolment.secret, Certificate.decode(enrolment.cert.encode())
    )
    cert = offline.sign_node_cert("node-2", wg_key, [ADDR4], now=NOW + 100)
    chain = CertChain.decode(CertChain(cert, (offline.cert,)).encode())
    chain.verify(ca.public_key, NOW + 100, at_admission=True)
    # The node certificate outlives its enrolment key (the token) by design...
    chain.verify(ca.public_key, NOW + 20 * DAY)
    # ...but not its own expiry.
    with pytest.raises(IdentityError, match="expired"):
        chain.verify(ca.public_key, NOW + 100 + 30 * DAY + 1)


def test_admission_refuses_expired_enrolment_key(ca: NetworkCA, node_chain: CertChain) -> None:
    with pytest.raises(IdentityError, match="expired"):
        node_chain.verify(ca.public_key, NOW + DAY + 1, at_admission=True)


def test_admission_refuses_a_stale_node_cert(ca: NetworkCA, node_chain: CertChain) -> None:
    with pytest.raises(IdentityError, match="not made just now"):
        node_chain.verify(ca.public_key, NOW + 60 + CLOCK_SKEW + 1, at_admission=True)


def test_expired_enrolment_key_cannot_sign(enrolment: EnrolmentKey, wg_key: str) -> None:
    with pytest.raises(IdentityError, match="expired"):
        enrolment.sign_node_cert("late", wg_key, [ADDR4], now=NOW + DAY + 1)


def test_enrolment_key_limits_node_lifetime(enrolment: EnrolmentKey, wg_key: str) -> None:
    with pytest.raises(IdentityError, match="at most"):
        enrolment.sign_node_cert("greedy", wg_key, [ADDR4], lifetime=31 * DAY, now=NOW)


def test_backdated_cert_from_a_leaked_key_is_refused(
    ca: NetworkCA, enrolment: EnrolmentKey, wg_key: str
) -> None:
    # Sign with the raw key, bypassing EnrolmentKey's own checks: a node cert whose
    # not_before lies before the enrolment key's window.
    forged = dataclasses.replace(
        enrolment.sign_node_cert("early", wg_key, [ADDR4], now=NOW),
        not_before=NOW - 2 * CLOCK_SKEW,
    )
    forged = dataclasses.replace(forged, signature=enrolment.sign(forged.signed_part()))
    with pytest.raises(IdentityError, match="while its enrolment key was valid"):
        verify_chain(forged, (enrolment.cert,), ca.public_key, NOW)


def test_overlong_cert_from_the_enrolment_key_is_refused(
    ca: NetworkCA, enrolment: EnrolmentKey, wg_key: str
) -> None:
    # A holder of the enrolment key signs by hand a certificate living longer than allowed.
    honest = enrolment.sign_node_cert("greedy", wg_key, [ADDR4], now=NOW)
    greedy = dataclasses.replace(honest, not_after=honest.not_after + 1)
    greedy = dataclasses.replace(greedy, signature=enrolment.sign(greedy.signed_part()))
    verify_chain(honest, (enrolment.cert,), ca.public_key, NOW)
    with pytest.raises(IdentityError, match="lives longer than its enrolment key allows"):
        verify_chain(greedy, (enrolment.cert,), ca.public_key, NOW)


def test_foreign_ca_is_refused(node_chain: CertChain) -> None:
    other = NetworkCA.generate("lab")
    with pytest.raises(IdentityError, match="network"):
        node_chain.verify(other.public_key, NOW + 100)


def test_node_cert_cannot_sign_and_chain_is_bounded(
    ca: NetworkCA, enrolment: EnrolmentKey, wg_key: str, node_chain: CertChain
) -> None:
    with pytest.raises(IdentityError):
        verify_chain(node_chain.node, (node_chain.node,), ca.public_key, NOW + 100)
    with pytest.raises(IdentityError, match="longer"):
        verify_chain(node_chain.node, (enrolment.cert, enrolment.cert), ca.public_key, NOW + 100)
    with pytest.raises(IdentityError, match="not a node"):
        verify_chain(enrolment.cert, (), ca.public_key, NOW + 100)


def test_enrolment_cert_signed_by_another_key_is_refused(ca: NetworkCA, wg_key: str) -> None:
    rogue = NetworkCA.generate("lab").issue_enrolment_key(lifetime=DAY, now=NOW)
    # Relabel the rogue enrolment certificate as belonging to our network.
    relabelled = dataclasses.replace(rogue.cert, network_id=ca.network_id)
    cert = dataclasses.replace(
        rogue.sign_node_cert("intruder", wg_key, [ADDR4], now=NOW), network_id=ca.network_id
    )
    cert = dataclasses.replace(cert, signature=rogue.sign(cert.signed_part()))
    with pytest.raises(IdentityError, match="not issued by the network CA"):
        verify_chain(cert, (relabelled,), ca.public_key, NOW)


def test_not_yet_valid_is_refused(ca: NetworkCA, wg_key: str) -> None:
    cert = ca.issue_node_cert("future", wg_key, [ADDR4], now=NOW + 10 * CLOCK_SKEW)
    with pytest.raises(IdentityError, match="not valid before"):
        verify(cert, ca.public_key, NOW)
    verify(cert, ca.public_key, NOW + 10 * CLOCK_SKEW - CLOCK_SKEW)  # within the skew


def test_every_flipped_byte_is_refused(ca: NetworkCA, node_chain: CertChain) -> None:
    encoded = node_chain.encode()
    node_chain.verify(ca.public_key, NOW + 100)
    for index in range(len(encoded)):
        for bit in (0x01, 0x80):
            tampered = bytearray(encoded)
            tampered[index] ^= bit
            with pytest.raises(IdentityError):
                CertChain.decode(bytes(tampered)).verify(ca.public_key, NOW + 100)


def test_truncation_and_trailing_bytes_are_refused(node_chain: CertChain) -> None:
    encoded = node_chain.node.encode()
    for cut in range(len(encoded)):
        with pytest.raises(IdentityError):
            Certificate.decode(encoded[:cut])
    with pytest.raises(IdentityError, match="trailing"):
        Certificate.decode(encoded + b"\x00")


def test_sizes_fit_gossip_limits(node_chain: CertChain) -> None:
    # A Serf query answer is at most 1024 bytes; the chain must fit with room to spare.
    assert len(node_chain.encode()) <= 700
    assert len(node_chain.ref) == 16
    assert node_chain.ref == cert_ref(node_chain.node)


def test_cert_ref_differs_per_cert(enrolment: EnrolmentKey, wg_key: str) -> None:
    refs = {cert_ref(enrolment.sign_node_cert("same", wg_key, [ADDR4], now=NOW)) for _ in range(5)}
    assert len(refs) == 5


def test_check_binding(node_chain: CertChain, wg_key: str) -> None:
    cert = node_chain.node
    check_binding(cert, name="node-1", public_key=wg_key, addresses=[ADDR4])
    with pytest.raises(IdentityError, match="not 'node-2'"):
        check_binding(cert, name="node-2", public_key=wg_key, addresses=[ADDR4])
    with pytest.raises(IdentityError, match="another WireGuard key"):
        check_binding(
            cert, name="node-1", public_key=WireGuardKeyPair.generate().public_key, addresses=()
        )
    with pytest.raises(IdentityError, match=r"100\.80\.0\.8"):
        check_binding(cert, name="node-1", public_key=wg_key, addresses=[ip_address("100.80.0.8")])


def test_bad_names_are_refused(ca: NetworkCA, wg_key: str) -> None:
    for name in ("", "UPPER", "-dash", "dash-", "a" * 64, "dot.ted", "ünï", "node\n"):
        with pytest.raises(IdentityError, match="DNS label"):
            ca.issue_node_cert(name, wg_key, [ADDR4], now=NOW)
    with pytest.raises(IdentityError):
        NetworkCA.generate("Bad Name")


def test_revocation_round_trip(ca: NetworkCA, node_chain: CertChain) -> None:
    revocation = ca.revoke(node_chain.node, now=NOW + 500)
    decoded = Revocation.decode(revocation.encode())
    assert decoded == revocation
    verify_revocation(decoded, ca.public_key)
    revoked = RevocationList()
    assert revoked.add(decoded, ca.public_key)
    assert not revoked.add(decoded, ca.public_key)
    assert len(revoked) == 1
    with pytest.raises(IdentityError, match="revoked"):
        node_chain.verify(ca.public_key, NOW + 600, revoked=revoked)
    # An empty list changes nothing.
    node_chain.verify(ca.public_key, NOW + 600, revoked=RevocationList())


def test_revocation_list_persists(ca: NetworkCA, node_chain: CertChain) -> None:
    revoked = RevocationList()
    revoked.add(ca.revoke(node_chain.node, now=NOW), ca.public_key)
    revoked.add(ca.revoke(node_chain.issuers[0], now=NOW, include_key=False), ca.public_key)
    loaded = RevocationList.decode(revoked.encode(), ca.public_key)
    assert list(loaded) == list(revoked)
    assert loaded.find(node_chain.node) is not None
    # What no trusted key signed (a CA key retired since) is left out, not an error.
    assert not len(RevocationList.decode(revoked.encode(), NetworkCA.generate("lab").public_key))
    with pytest.raises(IdentityError):
        RevocationList.decode(revoked.encode()[:-1], ca.public_key)


def test_revoking_a_key_covers_its_new_certificates(
    ca: NetworkCA, enrolment: EnrolmentKey, node_chain: CertChain, wg_key: str
) -> None:
    revoked = RevocationList()
    revoked.add(ca.revoke(node_chain.node, now=NOW), ca.public_key)
    again = enrolment.sign_node_cert("node-1", wg_key, [ADDR4], now=NOW + 10)
    with pytest.raises(IdentityError, match="revoked"):
        verify_chain(again, (enrolment.cert,), ca.public_key, NOW + 10, revoked=revoked)
    serial_only = RevocationList()
    serial_only.add(ca.revoke(node_chain.node, now=NOW, include_key=False), ca.public_key)
    verify_chain(again, (enrolment.cert,), ca.public_key, NOW + 10, revoked=serial_only)


def test_revoking_the_enrolment_key_shuts_out_its_node_certs(
    ca: NetworkCA, enrolment: EnrolmentKey, node_chain: CertChain
) -> None:
    revoked = RevocationList()
    revoked.add(ca.revoke(enrolment.cert, now=NOW), ca.public_key)
    with pytest.raises(IdentityError, match=r"enrol certificate .* revoked"):
        node_chain.verify(ca.public_key, NOW + 100, revoked=revoked)


def test_a_revoked_enrolment_key_keeps_what_it_signed_before(
    ca: NetworkCA, enrolment: EnrolmentKey, node_chain: CertChain, wg_key: str
) -> None:
    """Revoking a token cuts off new joins only: machines admitted earlier stay."""
    revoked = RevocationList()
    revoked.add(ca.revoke(enrolment.cert, now=NOW + 100), ca.public_key)
    node_chain.verify(ca.public_key, NOW + 300, revoked=revoked)  # signed at NOW + 60
    later = enrolment.sign_node_cert("node-2", wg_key, [ADDR4], now=NOW + 200)
    with pytest.raises(IdentityError, match=r"enrol certificate .* revoked"):
        verify_chain(later, (enrolment.cert,), ca.public_key, NOW + 200, revoked=revoked)


def test_revoking_a_key_alone_covers_every_certificate_of_it(
    ca: NetworkCA, enrolment: EnrolmentKey, wg_key: str
) -> None:
    revoked = RevocationList()
    revocation = ca.revoke_key("node-1", wg_key, now=NOW)
    assert Revocation.decode(revocation.encode()) == revocation
    revoked.add(revocation, ca.public_key)
    any_cert = enrolment.sign_node_cert("node-1", wg_key, [ADDR4], now=NOW + 10)
    with pytest.raises(IdentityError, match="revoked"):
        verify_chain(any_cert, (enrolment.cert,), ca.public_key, NOW + 10, revoked=revoked)
    other = enrolment.sign_node_cert(
        "node-1", WireGuardKeyPair.generate().public_key, [ADDR4], now=NOW + 10
    )
    verify_chain(other, (enrolment.cert,), ca.public_key, NOW + 10, revoked=revoked)
    with pytest.raises(IdentityError):
        ca.revoke_key("node-1", "not a key")


def test_revocation_signed_by_another_ca_is_refused(ca: NetworkCA, node_chain: CertChain) -> None:
    other = NetworkCA.generate("lab")
    forged = other.revoke(node_chain.node, now=NOW)
    with pytest.raises(IdentityError):
        RevocationList().add(forged, ca.public_key)
    relabelled = dataclasses.replace(forged, network_id=ca.network_id)
    with pytest.raises(IdentityError):
        verify_revocation(relabelled, ca.public_key)


def test_every_flipped_revocation_byte_is_refused(ca: NetworkCA, node_chain: CertChain) -> None:
    encoded = ca.revoke(node_chain.node, now=NOW).encode()
    for index in range(len(encoded)):
        tampered = bytearray(encoded)
        tampered[index] ^= 0x01
        with pytest.raises(IdentityError):
            verify_revocation(Revocation.decode(bytes(tampered)), ca.public_key)


def test_issue_time_defaults_to_now(ca: NetworkCA, wg_key: str) -> None:
    cert = ca.issue_node_cert("clock", wg_key, [ADDR4])
    assert abs(cert.not_before - time.time()) < 60


# --- decoders of outside input: only IdentityError, whatever the bytes -------------------

FUZZ = settings(
    max_examples=300, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


_FUZZ_CA_KEY = NetworkCA.generate("fuzz").public_key
Decoder = Callable[[bytes], object]
DECODERS: dict[str, Decoder] = {
    "certificate": Certificate.decode,
    "chain": CertChain.decode,
    "revocation": Revocation.decode,
    "revocation list": lambda data: RevocationList.decode(data, _FUZZ_CA_KEY),
}


@pytest.mark.parametrize("decoder", DECODERS.values(), ids=DECODERS.keys())
@FUZZ
@given(st.binary(max_size=2048))
def test_decoders_only_raise_identity_error(decoder: Decoder, data: bytes) -> None:
    with pytest.raises(IdentityError):
        decoder(data)


@FUZZ
@given(data=st.data())
def test_mutated_chains_decode_or_fail_cleanly(
    ca: NetworkCA, node_chain: CertChain, data: st.DataObject
) -> None:
    # Random bytes rarely pass the magic; mutations of a real chain reach the deep fields.
    encoded = bytearray(node_chain.encode())
    for _ in range(data.draw(st.integers(1, 8))):
        op = data.draw(st.sampled_from(["set", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(len(encoded) - 1, 0)))
        if op == "set" and encoded:
            encoded[pos] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del encoded[pos : pos + data.draw(st.integers(1, 16))]
        else:
            encoded[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    try:
        chain = CertChain.decode(bytes(encoded))
        chain.verify(ca.public_key, NOW + 100)
    except IdentityError:
        return
    # Only an unchanged encoding may verify.
    assert bytes(encoded) == node_chain.encode()


@FUZZ
@given(data=st.data())
def test_mutated_revocations_decode_or_fail_cleanly(
    ca: NetworkCA, node_chain: CertChain, data: st.DataObject
) -> None:
    original = ca.revoke(node_chain.node, now=NOW).encode()
    encoded = bytearray(original)
    pos = data.draw(st.integers(0, len(encoded) - 1))
    encoded[pos] = data.draw(st.integers(0, 255))
    try:
        verify_revocation(Revocation.decode(bytes(encoded)), ca.public_key)
    except IdentityError:
        return
    assert bytes(encoded) == original
