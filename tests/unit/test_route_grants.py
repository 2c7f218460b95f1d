"""Route grants: signed by the CA, verified by every node, synced with revocations."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.errors import IdentityError
from meshd.pki.ca import NetworkCA
from meshd.pki.grant import RouteGrant
from meshd.pki.trust import REVOCATIONS_PER_PAGE, Trust
from tests.unit.test_trust import node

CA = NetworkCA.generate("lab")
LAN = ipaddress.ip_network("192.168.50.0/24")


def test_a_grant_covers_its_prefix_and_what_is_inside_for_its_node_only(tmp_path: Path) -> None:
    trust = Trust(CA.public_key, tmp_path)
    assert trust.grants.approved("gw", [LAN]) == ()
    assert trust.add_grant(CA.grant_route("gw", LAN).encode()) is not None
    inside = ipaddress.ip_network("192.168.50.128/25")
    wider = ipaddress.ip_network("192.168.0.0/16")
    v6 = ipaddress.ip_network("fd00::/64")
    assert trust.grants.approved("gw", [LAN, inside, wider, v6]) == (LAN, inside)
    assert trust.grants.approved("other", [LAN]) == ()


def test_grants_survive_a_restart_and_a_second_copy_is_not_new(tmp_path: Path) -> None:
    trust = Trust(CA.public_key, tmp_path)
    data = CA.grant_route("gw", LAN).encode()
    trust.add_grant(data)
    assert trust.add_grant(data) is None
    again = Trust(CA.public_key, tmp_path)
    assert again.grants.approved("gw", [LAN]) == (LAN,)


def test_a_grant_signed_by_another_ca_or_tampered_is_refused(tmp_path: Path) -> None:
    trust = Trust(CA.public_key, tmp_path)
    with pytest.raises(IdentityError, match="network"):
        trust.add_grant(NetworkCA.generate("lab").grant_route("gw", LAN).encode())
    data = bytearray(CA.grant_route("gw", LAN).encode())
    data[-70] ^= 1  # inside the signed part: the prefix's last byte
    with pytest.raises(IdentityError, match="bad signature"):
        trust.add_grant(bytes(data))
    assert len(trust.grants) == 0


def test_pages_carry_grants_and_revocations_and_the_digest_covers_both(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    source = Trust(CA.public_key, tmp_path / "a")
    source.add(CA.revoke(node()[0].node))
    empty_digest = Trust(CA.public_key, tmp_path / "b").digest()
    with_revocation = source.digest()
    for i in range(REVOCATIONS_PER_PAGE + 1):
        source.add_grant(CA.grant_route(f"gw{i}", LAN).encode())
    assert source.digest() not in (empty_digest, with_revocation)
    sink = Trust(CA.public_key, tmp_path / "b")
    page, total = 0, 1
    while page * REVOCATIONS_PER_PAGE < total:
        _, total = sink.merge_page(source.page(page))
        page += 1
    assert len(sink.revoked) == 1
    assert len(sink.grants) == REVOCATIONS_PER_PAGE + 1
    assert sink.digest() == source.digest()


GOOD = CA.grant_route("gw", LAN, now=1).encode()


@given(st.integers(0, len(GOOD) - 1), st.binary(max_size=8))
def test_a_cut_or_padded_grant_is_an_identity_error(cut: int, extra: bytes) -> None:
    with pytest.raises(IdentityError):
        RouteGrant.decode(GOOD[:cut])
    with pytest.raises(IdentityError):
        RouteGrant.decode(GOOD + extra + b"x")


def test_a_grant_round_trips() -> None:
    grant = CA.grant_route("gw", ipaddress.ip_network("fd00:1::/48"), now=1234)
    back = RouteGrant.decode(grant.encode())
    assert back == grant
    assert back.covers("gw", ipaddress.ip_network("fd00:1:0:2::/64"))


def test_client_records_newest_wins_persist_and_a_revoked_key_is_out(tmp_path: Path) -> None:
    from meshd.identity import WireGuardKeyPair

    trust = Trust(CA.public_key, tmp_path)
    old, new = WireGuardKeyPair.generate(), WireGuardKeyPair.generate()
    address = ipaddress.ip_address("100.80.255.254")
    trust.add_client(CA.sign_client("phone", old.public_key, address, "gw1", now=10).encode())
    assert (
        trust.add_client(CA.sign_client("phone", old.public_key, address, "gw0", now=5).encode())
        is None
    )  # an older record never replaces a newer one
    trust.add_client(CA.sign_client("phone", new.public_key, address, "gw2", now=20).encode())
    (moved,) = Trust(CA.public_key, tmp_path).clients()
    assert (moved.public_key, moved.gateway) == (new.public_key, "gw2")
    trust.add(CA.revoke_key("phone", new.public_key))
    assert trust.clients() == ()
    with pytest.raises(IdentityError, match="network"):
        trust.add_client(
            NetworkCA.generate("lab").sign_client("x", old.public_key, address, "gw1").encode()
        )
