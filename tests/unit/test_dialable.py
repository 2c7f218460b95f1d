"""What a seed hands a joiner to dial for each member (meshd.agent.seed.dialable)."""

from __future__ import annotations

import ipaddress

from meshd.agent.seed import dialable
from meshd.identity import WireGuardKeyPair
from meshd.types import NodeRecord, PathChoice

REFLEXIVE, LAN = "198.18.0.1:51820", "198.19.1.2:51820"


def record(*endpoints: str) -> NodeRecord:
    return NodeRecord(
        public_key=WireGuardKeyPair.generate().public_key,
        addresses=(ipaddress.ip_address("100.80.0.3"),),
        port=51820,
        endpoints=endpoints,
    )


def test_the_default_path_and_no_path_yet_give_the_first_endpoint() -> None:
    assert dialable(record(REFLEXIVE, LAN), PathChoice()) == REFLEXIVE
    assert dialable(record(REFLEXIVE, LAN), PathChoice(label="direct")) == REFLEXIVE
    assert dialable(record(REFLEXIVE, LAN), None) == REFLEXIVE
    assert dialable(record(), None) is None


def test_a_direct_endpoint_a_policy_found_is_given() -> None:
    # A LAN address heard by mDNS, a site-mate's LAN address behind one NAT.
    assert dialable(record(REFLEXIVE, LAN), PathChoice(endpoint=LAN)) == LAN


def test_nothing_is_given_that_opens_to_this_node_only() -> None:
    natted = record(REFLEXIVE, LAN)
    assert dialable(natted, PathChoice(learn=True, reason="it dials in")) is None
    assert dialable(natted, PathChoice(endpoint=REFLEXIVE, pair_only=True)) is None
    assert dialable(natted, PathChoice(via="n2", endpoint="198.18.0.102:40001")) is None
    assert dialable(natted, PathChoice(via="n2")) is None
    assert dialable(natted, PathChoice(via="n2", learn=True)) is None
