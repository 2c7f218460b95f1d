"""Serf node names: a node's name plus a key suffix, and back."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.errors import IdentityError
from meshd.gossip.names import SUFFIX_LENGTH, display_name, key_suffix, serf_node_name
from meshd.identity import WireGuardKeyPair
from meshd.pki.certificate import check_name

# Every name check_name accepts: a DNS label (a-z, 0-9, inner '-', 1-63).
names = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
keys = st.binary(min_size=32, max_size=32).map(lambda b: base64.b64encode(b).decode())


@given(names, keys)
def test_the_display_name_of_a_serf_name_is_the_node_name(name: str, key: str) -> None:
    assert check_name(name) == name
    serf_name = serf_node_name(name, key)
    assert serf_name == f"{name}.{key_suffix(key)}"
    assert display_name(serf_name) == name


@given(names, keys, keys)
def test_a_new_key_is_a_new_serf_member_under_the_same_name(name: str, old: str, new: str) -> None:
    # Eight hex digits: two keys collide once in 2**32; hypothesis never draws such a pair.
    if old != new:
        assert serf_node_name(name, old) != serf_node_name(name, new)
    assert serf_node_name(name, old) == serf_node_name(name, old)


@given(names)
def test_a_serf_name_without_a_suffix_shows_as_it_is(name: str) -> None:
    # A bare Serf agent's name, or a member of an older meshd.
    assert display_name(name) == name


@given(st.text())
def test_any_serf_name_gossip_brings_has_a_display_name(serf_name: str) -> None:
    shown = display_name(serf_name)
    assert serf_name.startswith(shown)
    assert shown or not serf_name  # never empty, even for ".1f0c9a2e"
    if shown != serf_name:
        assert serf_name == f"{shown}.{serf_name[-SUFFIX_LENGTH:]}"


@pytest.mark.parametrize(
    ("serf_name", "shown"),
    [
        ("n3.1f0c9a2e", "n3"),
        ("n3.1F0C9A2E", "n3.1F0C9A2E"),  # not a suffix we make
        ("n3.1f0c9a2", "n3.1f0c9a2"),
        (".1f0c9a2e", ".1f0c9a2e"),
        ("a.b.1f0c9a2e", "a.b"),  # not a meshd name: its certificate check refuses it
        ("web-1", "web-1"),
    ],
)
def test_display_names_of_odd_serf_names(serf_name: str, shown: str) -> None:
    assert display_name(serf_name) == shown


def test_a_rogue_serf_name_gives_a_name_no_certificate_can_bind() -> None:
    with pytest.raises(IdentityError, match="must be a DNS label"):
        check_name(display_name("a.b.1f0c9a2e"))


def test_the_suffix_comes_from_the_key() -> None:
    key = WireGuardKeyPair.generate().public_key
    assert len(key_suffix(key)) == SUFFIX_LENGTH
    assert serf_node_name("n1", key).startswith("n1.")


@given(names, keys, st.integers(min_value=1, max_value=1000))
def test_a_later_generation_is_a_new_serf_member_with_the_same_display_name(
    name: str, key: str, generation: int
) -> None:
    # A member everybody dropped comes back as a fresh Serf member (meshd.pki.rejoin).
    fresh = serf_node_name(name, key, generation)
    assert fresh != serf_node_name(name, key)
    assert fresh != serf_node_name(name, key, generation + 1)
    assert display_name(fresh) == name
    assert serf_node_name(name, key, 0) == serf_node_name(name, key)
