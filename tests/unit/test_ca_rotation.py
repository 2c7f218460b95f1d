"""CA rotation, the pure parts: cross-signatures, renewed chains, roots and retirement."""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshd.agent.rotation import is_renewal
from meshd.b64 import encode_b64
from meshd.errors import IdentityError, StateError
from meshd.identity import WireGuardKeyPair, encode_key
from meshd.node import NodeStore
from meshd.pki.ca import CROSS_LIFETIME, NetworkCA
from meshd.pki.certificate import CertChain, Roots, verify_chain
from meshd.pki.revocation import RevocationList
from meshd.pki.trust import ROOTS_FILE, Trust
from meshd.state import read_secret, write_secret
from meshd.types import NodeRecord

NOW = int(time.time()) - 1000  # learning a CA key checks the cross-signature now
ADDRESS = ipaddress.ip_address("100.80.0.9")


@pytest.fixture
def old() -> NetworkCA:
    return NetworkCA.generate("lab")


@pytest.fixture
def new() -> NetworkCA:
    return NetworkCA.generate("lab")


def member(ca: NetworkCA, name: str = "n9") -> tuple[CertChain, NodeRecord]:
    keys = WireGuardKeyPair.generate()
    chain = CertChain(ca.issue_node_cert(name, keys.public_key, [ADDRESS], now=NOW))
    record = NodeRecord(
        public_key=keys.public_key, addresses=(ADDRESS,), port=51820, cert=chain.ref
    )
    return chain, record


def renewed(old: NetworkCA, new: NetworkCA, chain: CertChain) -> CertChain:
    return CertChain(new.renew(chain.node, now=NOW + 10), (old.cross_sign(new, now=NOW + 5),))


def test_a_renewed_chain_keeps_name_key_addresses_and_end_and_changes_the_issuer(
    old: NetworkCA, new: NetworkCA
) -> None:
    chain, _ = member(old)
    again = renewed(old, new, chain)
    for field in ("name", "public_key", "addresses", "not_after"):
        assert getattr(again.node, field) == getattr(chain.node, field)
    assert again.node.network_id == new.network_id != chain.node.network_id
    assert again.node.serial != chain.node.serial


def test_the_old_ca_alone_accepts_a_renewed_chain_through_its_cross_signature(
    old: NetworkCA, new: NetworkCA
) -> None:
    chain, _ = member(old)
    again = renewed(old, new, chain)
    assert again.verify(old.public_key, NOW + 20) == new.public_key
    assert again.verify(new.public_key, NOW + 20) == new.public_key
    # Without the cross-signature the old CA alone knows nothing of the new key.
    with pytest.raises(IdentityError, match="belongs to network"):
        verify_chain(again.node, (), old.public_key, NOW + 20)
    # A cross-signature by a key nobody trusts proves nothing.
    stranger = NetworkCA.generate("lab")
    forged = CertChain(again.node, (stranger.cross_sign(new, now=NOW),))
    with pytest.raises(IdentityError, match="belongs to network"):
        forged.verify(old.public_key, NOW + 20)


def test_a_new_token_chain_verifies_under_the_old_ca_with_the_cross_signature(
    old: NetworkCA, new: NetworkCA
) -> None:
    enrolment = new.issue_enrolment_key(lifetime=3600, now=NOW)
    keys = WireGuardKeyPair.generate()
    node = enrolment.sign_node_cert("n7", keys.public_key, [ADDRESS], now=NOW + 1)
    cross = old.cross_sign(new, now=NOW)
    assert CertChain(node, (enrolment.cert, cross)).verify(old.public_key, NOW + 2)
    with pytest.raises(IdentityError):
        CertChain(node, (enrolment.cert,)).verify(old.public_key, NOW + 2)


@pytest.mark.parametrize("shape", ["cross first", "two crosses", "cross as signer"])
def test_a_chain_of_any_other_shape_is_refused(old: NetworkCA, new: NetworkCA, shape: str) -> None:
    enrolment = new.issue_enrolment_key(lifetime=3600, now=NOW)
    keys = WireGuardKeyPair.generate()
    node = enrolment.sign_node_cert("n7", keys.public_key, [ADDRESS], now=NOW + 1)
    cross = old.cross_sign(new, now=NOW)
    issuers = {
        "cross first": (cross, enrolment.cert),
        "two crosses": (enrolment.cert, cross, cross),
        "cross as signer": (cross,),
    }[shape]
    with pytest.raises(IdentityError):
        verify_chain(node, issuers, Roots((old.public_key, new.public_key)), NOW + 2)


def test_a_revocation_by_the_new_ca_covers_the_old_certificate_of_the_same_key(
    old: NetworkCA, new: NetworkCA
) -> None:
    chain, _ = member(old)
    roots = Roots((old.public_key, new.public_key))
    revoked = RevocationList()
    revoked.add(new.revoke_key("n9", chain.node.public_key, now=NOW + 30), roots)
    with pytest.raises(IdentityError, match="revoked"):
        chain.verify(roots, NOW + 40, revoked=revoked)
    with pytest.raises(IdentityError, match="revoked"):
        renewed(old, new, chain).verify(roots, NOW + 40, revoked=revoked)


def retirement(old: NetworkCA, new: NetworkCA) -> bytes:
    return new.revoke_key("lab", encode_key(old.public_key), now=NOW + 100).encode()


def test_a_member_learns_the_new_ca_from_a_chain_and_keeps_it_across_a_restart(
    tmp_path: Path, old: NetworkCA, new: NetworkCA
) -> None:
    trust = Trust(old.public_key, tmp_path)
    chain, _ = member(old)
    again = renewed(old, new, chain)
    trust.add_chain(again.encode(), again.ref)
    assert trust.roots.keys == (old.public_key, new.public_key)
    assert trust.rotating
    restarted = Trust(old.public_key, tmp_path)
    assert restarted.roots.keys == (old.public_key, new.public_key)
    fresh, fresh_record = member(new, "n5")  # no cross-signature: trusted directly now
    restarted.add_chain(fresh.encode(), fresh.ref)
    assert restarted.verdict("n5", fresh_record, NOW + 20).certified


def test_retiring_the_old_ca_refuses_its_chains_everywhere_and_for_good(
    tmp_path: Path, old: NetworkCA, new: NetworkCA
) -> None:
    trust = Trust(old.public_key, tmp_path)
    stale, stale_record = member(old, "n3")
    chain, record = member(old)
    again = renewed(old, new, chain)
    moved = dataclass_replace_cert(record, again.ref)
    for each in (stale, again):
        trust.add_chain(each.encode(), each.ref)
    trust.add(old.revoke_key("n1", WireGuardKeyPair.generate().public_key, now=NOW + 50))
    assert trust.verdict("n3", stale_record, NOW + 60).certified
    assert trust.add_revocation(retirement(old, new)) is not None
    assert trust.roots.keys == (new.public_key,)
    assert not trust.rotating
    assert "belongs to network" in (trust.verdict("n3", stale_record, NOW + 60).error or "")
    assert trust.verdict("n9", moved, NOW + 60).certified
    assert len(trust.revoked) == 1  # the old CA's own revocation went with it
    restarted = Trust(old.public_key, tmp_path)
    assert restarted.roots.keys == (new.public_key,)
    # The old key can vouch for nothing any more.
    with pytest.raises(IdentityError, match="not signed by a trusted CA key"):
        restarted.learn_root(old.cross_sign(NetworkCA.generate("lab"), now=NOW))


def test_a_key_retired_two_rotations_ago_stays_retired_after_a_restart(
    tmp_path: Path, old: NetworkCA, new: NetworkCA
) -> None:
    newer = NetworkCA.generate("lab")
    trust = Trust(old.public_key, tmp_path)
    trust.learn_root(old.cross_sign(new, now=NOW), NOW)
    trust.add_revocation(retirement(old, new))
    trust.learn_root(new.cross_sign(newer, now=NOW), NOW)
    trust.add_revocation(newer.revoke_key("lab", encode_key(new.public_key), now=NOW).encode())
    assert trust.roots.keys == (newer.public_key,)
    assert Trust(old.public_key, tmp_path).roots.keys == (newer.public_key,)


def test_a_ca_cannot_retire_itself(tmp_path: Path, old: NetworkCA) -> None:
    trust = Trust(old.public_key, tmp_path)
    trust.add_revocation(old.revoke_key("lab", encode_key(old.public_key), now=NOW).encode())
    assert trust.roots.keys == (old.public_key,)


def dataclass_replace_cert(record: NodeRecord, ref: str) -> NodeRecord:
    return NodeRecord(
        public_key=record.public_key, addresses=record.addresses, port=record.port, cert=ref
    )


def test_a_member_installs_only_its_own_renewal_by_the_ca_that_issued_it(
    old: NetworkCA, new: NetworkCA
) -> None:
    now = int(time.time())
    own, _ = member(old)
    identity = (own.node.name, own.node.public_key)
    roots = Roots((old.public_key,))
    again = renewed(old, new, own)
    assert is_renewal(own, again, identity, roots, now)
    assert not is_renewal(again, again, identity, roots, now)  # already installed
    someone_else, _ = member(old, "n4")
    assert not is_renewal(own, renewed(old, new, someone_else), identity, roots, now)
    # Valid, but cross-signed by another trusted CA than the one that issued ours.
    other = NetworkCA.generate("lab")
    theirs = CertChain(new.renew(own.node, now=NOW + 10), (other.cross_sign(new, now=NOW),))
    both = Roots((old.public_key, other.public_key))
    assert theirs.verify(both, now) == new.public_key
    assert not is_renewal(own, theirs, identity, both, now)
    # Without the cross-signature, nothing says the new CA succeeds ours.
    bare = CertChain(again.node)
    assert not is_renewal(own, bare, identity, Roots((old.public_key, new.public_key)), now)
    # A renewal that does not verify (its cross-signature expired) is refused.
    late = CertChain(again.node, (old.cross_sign(new, now=NOW - CROSS_LIFETIME - 10),))
    assert not is_renewal(own, late, identity, roots, now)


def test_the_next_ca_secret_is_staged_then_committed_and_the_old_one_kept(
    tmp_path: Path, old: NetworkCA, new: NetworkCA
) -> None:
    store = NodeStore(tmp_path)
    with pytest.raises(StateError, match="no CA key to rotate here"):
        store.stage_ca_secret(new.secret)
    write_secret(store.path("ca.key"), encode_b64(old.secret) + "\n")
    store.stage_ca_secret(new.secret)
    # A crash here leaves ca.key as it was, and the next one to be judged by the agent.
    assert store.ca_secret() == old.secret
    assert store.staged_ca_secret() == new.secret
    store.commit_ca_secret()
    assert store.ca_secret() == new.secret
    assert store.staged_ca_secret() is None
    assert read_secret(store.path("ca.key.old")).decode().strip() == encode_b64(old.secret)
    store.discard_ca_secret("old")
    assert not store.path("ca.key.old").exists()


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(max_size=400), flip=st.integers(min_value=0))
def test_a_damaged_roots_file_leaves_the_key_joined_under_and_never_raises(
    tmp_path_factory: pytest.TempPathFactory, garbage: bytes, flip: int
) -> None:
    state = tmp_path_factory.mktemp("state")
    old, new = NetworkCA.generate("lab"), NetworkCA.generate("lab")
    Trust(old.public_key, state).learn_root(old.cross_sign(new))
    good = (state / ROOTS_FILE).read_bytes()
    damaged = bytearray(good)
    damaged[flip % len(damaged)] ^= 0xFF
    for content in (garbage, bytes(damaged)):
        (state / ROOTS_FILE).write_bytes(content)
        roots = Trust(old.public_key, state).roots.keys
        assert roots[0] == old.public_key
        assert roots in ((old.public_key,), (old.public_key, new.public_key))
