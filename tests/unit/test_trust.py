"""The trust store: verdicts on records, revocation pages, and garbage from gossip."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshd.agent.pipeline import certify
from meshd.errors import IdentityError
from meshd.identity import WireGuardKeyPair
from meshd.pki.ca import NetworkCA
from meshd.pki.certificate import CertChain
from meshd.pki.trust import PENDING, REVOCATIONS_FILE, REVOCATIONS_PER_PAGE, Trust
from meshd.state import DeferredWrites
from meshd.types import Member, MemberState, NodeRecord

CA = NetworkCA.generate("lab")
ADDRESS = ipaddress.ip_address("100.80.0.9")


def node(name: str = "n9") -> tuple[CertChain, NodeRecord]:
    keys = WireGuardKeyPair.generate()
    chain = CertChain(CA.issue_node_cert(name, keys.public_key, [ADDRESS]))
    record = NodeRecord(
        public_key=keys.public_key, addresses=(ADDRESS,), port=51820, cert=chain.ref
    )
    return chain, record


def test_a_record_is_certified_only_with_its_own_valid_chain(tmp_path: Path) -> None:
    trust = Trust(CA.public_key, tmp_path)
    chain, record = node()
    assert trust.verdict("n9", record).error == PENDING
    trust.add_chain(chain.encode(), chain.ref)
    verdict = trust.verdict("n9", record)
    assert verdict.certified
    assert verdict.addresses == (ADDRESS,)
    assert "is for 'n9', not 'n7'" in (trust.verdict("n7", record).error or "")
    other_key = NodeRecord(
        public_key=WireGuardKeyPair.generate().public_key,
        addresses=(ADDRESS,),
        port=51820,
        cert=chain.ref,
    )
    assert "another WireGuard key" in (trust.verdict("n9", other_key).error or "")


def test_a_chain_of_another_network_is_refused(tmp_path: Path) -> None:
    trust = Trust(NetworkCA.generate("other").public_key, tmp_path)
    chain, record = node()
    with pytest.raises(IdentityError):
        trust.add_chain(chain.encode(), chain.ref)
    assert trust.verdict("n9", record).error == PENDING


def test_revocation_applies_at_once_and_survives_a_restart(tmp_path: Path) -> None:
    trust = Trust(CA.public_key, tmp_path)
    chain, record = node()
    trust.add_chain(chain.encode(), chain.ref)
    assert trust.verdict("n9", record).certified
    assert trust.add_revocation(CA.revoke(chain.node).encode()) is not None
    assert "revoked" in (trust.verdict("n9", record).error or "")
    again = Trust(CA.public_key, tmp_path)
    assert len(again.revoked) == 1
    again.add_chain(chain.encode(), chain.ref)
    assert not again.verdict("n9", record).certified


def test_revocation_pages_carry_everything_between_two_stores(tmp_path: Path) -> None:
    source = Trust(CA.public_key, tmp_path / "a")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for _ in range(REVOCATIONS_PER_PAGE * 2 + 1):
        source.add(CA.revoke(node()[0].node))
    sink = Trust(CA.public_key, tmp_path / "b")
    page, total = 0, 1
    while page * REVOCATIONS_PER_PAGE < total:
        data = source.page(page)
        assert len(data) <= 1024  # a Serf query answer
        _, total = sink.merge_page(data)
        page += 1
    assert len(sink.revoked) == len(source.revoked) == REVOCATIONS_PER_PAGE * 2 + 1


def test_a_forged_revocation_is_refused(tmp_path: Path) -> None:
    trust = Trust(CA.public_key, tmp_path)
    forged = NetworkCA.generate("lab").revoke(node()[0].node)
    with pytest.raises(IdentityError):
        trust.add_revocation(forged.encode())
    assert len(trust.revoked) == 0


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=2000)
@given(st.binary(max_size=1200))
def test_garbage_pages_and_chains_raise_only_identity_errors(tmp_path: Path, data: bytes) -> None:
    trust = Trust(CA.public_key, tmp_path)
    with pytest.raises(IdentityError):
        trust.add_chain(data, "nope")
    with contextlib.suppress(IdentityError):
        trust.merge_page(data)


def test_a_revocation_the_disk_refuses_is_in_force_and_saved_once_there_is_room(
    tmp_path: Path,
) -> None:
    writes = DeferredWrites()
    trust = Trust(CA.public_key, tmp_path, writes=writes)
    chain, record = node()
    trust.add_chain(chain.encode(), chain.ref)
    in_the_way = tmp_path / REVOCATIONS_FILE / "in-the-way"  # as a full disk would be
    in_the_way.mkdir(parents=True)

    # Taken (the caller reconciles at once), not an error: the node goes on serving.
    assert trust.add_revocation(CA.revoke(chain.node).encode()) is not None
    assert "revoked" in (trust.verdict("n9", record).error or "")
    assert writes.waiting == (tmp_path / REVOCATIONS_FILE,)

    in_the_way.rmdir()
    (tmp_path / REVOCATIONS_FILE).rmdir()
    assert writes.flush()
    assert len(Trust(CA.public_key, tmp_path).revoked) == 1


def test_a_record_naming_a_chain_not_fetched_yet_is_judged_by_the_chain_before_it(
    tmp_path: Path,
) -> None:
    """A CA rotation renews a member's certificate; its new record can arrive before the
    new chain. Meanwhile the member keeps the verdict of the chain that certified it
    (not for another name, other addresses, or a revoked old chain)."""
    trust = Trust(CA.public_key, tmp_path)
    chain, record = node()
    trust.add_chain(chain.encode(), chain.ref)
    renewed = CertChain(CA.renew(chain.node))
    assert renewed.ref != chain.ref
    member = Member("n9", "fd00::9", MemberState.ALIVE, record, serf_name="n9.a")
    moved = dataclasses.replace(member, record=dataclasses.replace(record, cert=renewed.ref))
    held = {"n9.a": chain.ref}

    (alone,) = certify([moved], trust, "n1", {})
    assert (alone.certified, alone.certificate_error) == (False, PENDING)
    (kept,) = certify([moved], trust, "n1", {}, held)
    assert kept.certified
    assert kept.certified_addresses == (ADDRESS,)

    elsewhere = dataclasses.replace(
        moved,
        record=dataclasses.replace(moved.record, addresses=(ipaddress.ip_address("100.80.0.99"),)),
    )
    assert not certify([elsewhere], trust, "n1", {}, held)[0].certified
    assert not certify([moved], trust, "n1", {}, {"n9.b": chain.ref})[0].certified
    trust.add_chain(renewed.encode(), renewed.ref)
    (fetched,) = certify([moved], trust, "n1", {}, held)
    assert fetched.certified
    assert fetched.certificate_error is None
