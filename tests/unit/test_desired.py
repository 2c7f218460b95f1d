"""The pure desired-state computation."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.desired import STATIC_ROLE, KnownEntry, compute, current_incarnations
from meshd.identity import WireGuardKeyPair
from meshd.node import KnownPeer
from meshd.types import (
    Admission,
    IPNetwork,
    Member,
    MemberState,
    NodeRecord,
    PathChoice,
    PeerConfig,
)
from meshd.wireguard.backend import PeerState
from meshd.wireguard.reconcile import plan_peers


@dataclass
class AdmitAll:
    refuse: frozenset[str] = frozenset()
    relay_via: dict[str, str] | None = None
    refuse_keys: frozenset[str] = frozenset()

    def admit(self, member: Member) -> Admission | None:
        if member.record and member.record.public_key in self.refuse_keys:
            return Admission(admit=False, reason="uncertified")
        if member.name in self.refuse:
            return Admission(admit=False, reason="test refusal")
        return Admission(admit=True)

    def select_path(self, member: Member) -> PathChoice:
        return PathChoice(via=(self.relay_via or {}).get(member.name))

    def shape(self, member: Member, peer: PeerConfig) -> PeerConfig:
        return peer

    def routes(self, members: Sequence[Member]) -> dict[str, list[IPNetwork]]:
        return {}

    def extra_peers(self) -> list[PeerConfig]:
        return []


KEYS = [WireGuardKeyPair.generate().public_key for _ in range(8)]


def record(i: int, address: str, *, static: bool = False) -> NodeRecord:
    return NodeRecord(
        public_key=KEYS[i],
        addresses=(ipaddress.ip_address(address),),
        port=51820,
        endpoints=(f"198.18.0.{i + 1}:51820",),
        roles=frozenset({STATIC_ROLE}) if static else frozenset(),
    )


def member(i: int, address: str, state: MemberState = MemberState.ALIVE, **kw: bool) -> Member:
    return Member(name=f"n{i}", gossip_addr=address, state=state, record=record(i, address, **kw))


def test_every_other_admitted_member_is_a_peer_with_its_host_prefix() -> None:
    members = [member(i, f"100.80.0.{i + 1}") for i in range(4)]
    state = compute(
        own_name="n0",
        own_record=record(0, "100.80.0.1"),
        members=members,
        policy=AdmitAll(),
        keepalive=25,
    )
    assert sorted(p.public_key for p in state.peers) == sorted(KEYS[1:4])
    peer = next(p for p in state.peers if p.public_key == KEYS[2])
    assert peer.allowed_ips == (ipaddress.ip_network("100.80.0.3/32"),)
    assert peer.endpoint == "198.18.0.3:51820"
    assert peer.keepalive == 25


def test_failed_members_stay_and_left_or_reaped_go() -> None:
    members = [
        member(1, "100.80.0.2", MemberState.FAILED),
        member(2, "100.80.0.3", MemberState.LEFT),
        member(3, "100.80.0.4", MemberState.REAPED),
    ]
    state = compute(
        own_name="n0", own_record=record(0, "100.80.0.1"), members=members, policy=AdmitAll()
    )
    assert [p.public_key for p in state.peers] == [KEYS[1]]


def test_unadmitted_and_recordless_members_are_excluded_with_a_reason() -> None:
    members = [
        member(1, "100.80.0.2"),
        Member(
            name="ghost", gossip_addr="100.80.0.9", state=MemberState.ALIVE, record_error="bad tag"
        ),
    ]
    state = compute(
        own_name="n0",
        own_record=record(0, "100.80.0.1"),
        members=members,
        policy=AdmitAll(refuse=frozenset({"n1"})),
    )
    assert state.peers == ()
    assert state.excluded == {
        "n1": "not admitted: test refusal",
        "ghost": "no valid record: bad tag",
    }


def test_static_address_beats_derived_and_lower_key_breaks_ties() -> None:
    clash = "100.80.0.7"
    members = [member(1, clash), member(2, clash, static=True)]
    state = compute(
        own_name="n0", own_record=record(0, "100.80.0.1"), members=members, policy=AdmitAll()
    )
    assert [p.public_key for p in state.peers] == [KEYS[2]]
    assert "address conflict" in state.excluded["n1"]


def test_relayed_member_is_reached_through_the_relays_entry() -> None:
    members = [member(1, "100.80.0.2"), member(2, "100.80.0.3")]
    policy = AdmitAll(relay_via={"n2": "n1"})
    state = compute(
        own_name="n0", own_record=record(0, "100.80.0.1"), members=members, policy=policy
    )
    assert len(state.peers) == 1
    assert set(state.peers[0].allowed_ips) == {
        ipaddress.ip_network("100.80.0.2/32"),
        ipaddress.ip_network("100.80.0.3/32"),
    }
    assert state.relayed == {"n2": "n1"}


@given(
    st.lists(
        st.tuples(
            st.integers(1, 7), st.integers(1, 4), st.booleans(), st.sampled_from(list(MemberState))
        ),
        max_size=12,
        unique_by=lambda row: row[0],
    ),
    st.randoms(use_true_random=False),
)
def test_no_prefix_is_ever_given_to_two_peers_and_order_does_not_matter(rows, rnd) -> None:
    members = [member(i, f"100.80.0.{a}", state, static=static) for i, a, static, state in rows]
    own = record(0, "100.80.0.1")
    first = compute(own_name="n0", own_record=own, members=members, policy=AdmitAll())
    shuffled = list(members)
    rnd.shuffle(shuffled)
    second = compute(own_name="n0", own_record=own, members=shuffled, policy=AdmitAll())
    prefixes = [p for peer in first.peers for p in peer.allowed_ips]
    assert len(prefixes) == len(set(prefixes))
    assert {p.public_key: set(p.allowed_ips) for p in first.peers} == {
        p.public_key: set(p.allowed_ips) for p in second.peers
    }


# --- known peers and idempotence ---------------------------------------------------


def known(i: int, address: str, age: float = 1.0) -> KnownEntry:
    peer = KnownPeer(
        name=f"k{i}",
        public_key=KEYS[i],
        allowed_ips=(ipaddress.ip_network(address),),
        endpoint=f"198.18.1.{i + 1}:51820",
    )
    return KnownEntry(peer, age)


def test_a_known_peer_fills_in_until_gossip_speaks_for_it() -> None:
    own = record(0, "100.80.0.1")
    state = compute(
        own_name="n0", own_record=own, members=[], policy=AdmitAll(), known=[known(1, "100.80.0.2")]
    )
    assert [p.public_key for p in state.peers] == [KEYS[1]]
    assert state.unconfirmed == (KEYS[1],)
    # Gossip now describes it: the gossip peer wins and the known entry is forgotten.
    state = compute(
        own_name="n0",
        own_record=own,
        members=[member(1, "100.80.0.2")],
        policy=AdmitAll(),
        known=[known(1, "100.80.0.2")],
    )
    assert state.forget == (KEYS[1],)
    assert state.unconfirmed == ()


def test_a_known_peer_keeps_only_the_prefixes_nobody_else_holds() -> None:
    entry = KnownEntry(
        KnownPeer(
            "k2",
            KEYS[2],
            (ipaddress.ip_network("100.80.0.3/32"), ipaddress.ip_network("fd00::3/128")),
            None,
        ),
        1.0,
    )
    state = compute(
        own_name="n0",
        own_record=record(0, "100.80.0.1"),
        members=[member(1, "100.80.0.3")],  # gossip says n1 holds 100.80.0.3
        policy=AdmitAll(),
        known=[entry],
    )
    by_key = {p.public_key: p for p in state.peers}
    assert by_key[KEYS[2]].allowed_ips == (ipaddress.ip_network("fd00::3/128"),)


def test_a_known_peer_unseen_too_long_is_forgotten_once_others_are_alive() -> None:
    args = {"own_name": "n0", "own_record": record(0, "100.80.0.1"), "policy": AdmitAll()}
    old = known(3, "100.80.0.4", age=500.0)
    alone = compute(members=[], known=[old], known_grace=120.0, **args)  # type: ignore[arg-type]
    assert alone.forget == ()  # nobody else alive: it may be the only way back
    seen = compute(
        members=[member(1, "100.80.0.2")],
        known=[old],
        known_grace=120.0,
        **args,  # type: ignore[arg-type]
    )
    assert seen.forget == (KEYS[3],)


def as_live(peers: tuple[PeerConfig, ...]) -> list[PeerState]:
    """What the interface reports after the desired peers were applied."""
    return [
        PeerState(
            public_key=p.public_key,
            endpoint=p.endpoint,
            allowed_ips=p.allowed_ips,
            keepalive=p.keepalive,
        )
        for p in peers
    ]


@st.composite
def meshes(draw: st.DrawFn) -> tuple[list[Member], list[KnownEntry]]:
    members = []
    for i in draw(st.sets(st.integers(1, 7), max_size=7)):
        address = f"100.80.0.{draw(st.integers(2, 6))}"  # small range: conflicts happen
        state = draw(st.sampled_from(list(MemberState)))
        members.append(member(i, address, state, static=draw(st.booleans())))
    entries = [
        known(i, f"100.80.0.{draw(st.integers(2, 6))}", age=draw(st.floats(0, 300)))
        for i in draw(st.sets(st.integers(1, 7), max_size=4))
    ]
    return members, entries


@given(mesh=meshes(), relay=st.booleans())
def test_a_pass_is_idempotent(mesh: tuple[list[Member], list[KnownEntry]], relay: bool) -> None:
    """Compute, apply (as WireGuard would report it), compute again: no operation left."""
    members, entries = mesh
    policy = AdmitAll(relay_via={"n3": "n1"} if relay else None)
    args = {
        "own_name": "n0",
        "own_record": record(0, "100.80.0.1"),
        "members": members,
        "policy": policy,
        "keepalive": 25,
        "known": entries,
    }
    first = compute(**args)  # type: ignore[arg-type]
    live = as_live(first.peers)
    kept = [e for e in entries if e.peer.public_key not in first.forget]
    second = compute(**{**args, "known": kept})  # type: ignore[arg-type]
    assert not plan_peers(live, second.peers)
    assert second.peers == first.peers


def incarnation(i: int, key: int, state: MemberState, version: int) -> Member:
    """Node n{i} under key KEYS[key]: a wiped machine comes back with a new key."""
    address = f"100.80.0.{key + 1}"
    rec = dataclasses.replace(record(key, address), version=version)
    return Member(name=f"n{i}", gossip_addr=address, state=state, record=rec)


@pytest.mark.parametrize("order", [1, -1])
def test_of_two_incarnations_of_a_name_the_alive_one_is_the_peer(order: int) -> None:
    old = incarnation(3, 3, MemberState.FAILED, version=9)  # even with a newer record
    new = incarnation(3, 4, MemberState.ALIVE, version=5)
    state = compute(
        own_name="n0",
        own_record=record(0, "100.80.0.1"),
        members=[member(1, "100.80.0.2"), old, new][::order],
        policy=AdmitAll(),
    )
    assert sorted(p.public_key for p in state.peers) == sorted([KEYS[1], KEYS[4]])
    assert state.excluded == {}


@pytest.mark.parametrize("order", [1, -1])
def test_of_two_failed_incarnations_the_newer_record_is_the_peer(order: int) -> None:
    old = incarnation(3, 3, MemberState.FAILED, version=5)
    new = incarnation(3, 4, MemberState.FAILED, version=9)
    state = compute(
        own_name="n0",
        own_record=record(0, "100.80.0.1"),
        members=[old, new][::order],
        policy=AdmitAll(),
    )
    assert [p.public_key for p in state.peers] == [KEYS[4]]


def test_an_unadmitted_newcomer_does_not_displace_the_member_it_claims_to_replace() -> None:
    real = incarnation(3, 3, MemberState.FAILED, version=5)
    rogue = incarnation(3, 4, MemberState.ALIVE, version=9)
    policy = AdmitAll(refuse_keys=frozenset({KEYS[4]}))
    state = compute(
        own_name="n0", own_record=record(0, "100.80.0.1"), members=[real, rogue], policy=policy
    )
    assert [p.public_key for p in state.peers] == [KEYS[3]]


def test_current_incarnations_keep_one_member_per_name_in_first_seen_order() -> None:
    members = [
        incarnation(3, 3, MemberState.LEFT, version=1),
        member(1, "100.80.0.2"),
        incarnation(3, 4, MemberState.ALIVE, version=2),
    ]
    assert [(m.name, m.record and m.record.public_key) for m in current_incarnations(members)] == [
        ("n3", KEYS[4]),
        ("n1", KEYS[1]),
    ]


def test_a_certified_incarnation_wins_over_an_uncertified_alive_one() -> None:
    real = dataclasses.replace(incarnation(3, 3, MemberState.FAILED, version=5), certified=True)
    rogue = incarnation(3, 4, MemberState.ALIVE, version=9)
    assert current_incarnations([rogue, real]) == [real]
    assert current_incarnations([real, rogue]) == [real]


@given(
    st.lists(
        st.tuples(st.integers(1, 3), st.sampled_from(list(MemberState)), st.integers(0, 99)),
        max_size=7,
        unique_by=lambda row: row[2],  # distinct record versions: no ties to break by order
    ),
    st.randoms(use_true_random=False),
)
def test_one_peer_per_name_whatever_the_incarnations_and_their_order(rows, rnd) -> None:
    # Row k is an incarnation of n{name} under its own key KEYS[k + 1].
    members = [incarnation(i, k + 1, state, v) for k, (i, state, v) in enumerate(rows)]
    own = record(0, "100.80.0.1")
    first = compute(own_name="n0", own_record=own, members=members, policy=AdmitAll())
    shuffled = list(members)
    rnd.shuffle(shuffled)
    second = compute(own_name="n0", own_record=own, members=shuffled, policy=AdmitAll())
    assert set(first.peers) == set(second.peers)
    name_of = {m.record.public_key: m.name for m in members if m.record}
    names = [name_of[p.public_key] for p in first.peers]
    assert len(names) == len(set(names))
    # Each name that has an alive or failed incarnation has a peer: the best-ranked one.
    for name in {m.name for m in members if m.state in (MemberState.ALIVE, MemberState.FAILED)}:
        best = max(
            (
                m
                for m in members
                if m.name == name and m.state in (MemberState.ALIVE, MemberState.FAILED)
            ),
            key=lambda m: (m.state is MemberState.ALIVE, m.record.version if m.record else -1),
        )
        assert best.record is not None
        assert best.record.public_key in {p.public_key for p in first.peers}


@dataclass
class Routing(AdmitAll):
    extra: dict[str, list[IPNetwork]] | None = None

    def routes(self, members: Sequence[Member]) -> dict[str, list[IPNetwork]]:
        return self.extra or {}


def test_policy_routes_join_the_allowed_ips_of_their_member_or_its_routed_relay() -> None:
    lan = ipaddress.ip_network("192.168.50.0/24")
    far = ipaddress.ip_network("10.20.0.0/16")
    members = [member(i, f"100.80.0.{i + 1}") for i in range(4)]
    state = compute(
        own_name="n0",
        own_record=record(0, "100.80.0.1"),
        members=members,
        policy=Routing(relay_via={"n3": "n1"}, extra={"n2": [lan], "n3": [far], "nobody": [lan]}),
    )
    allowed = {p.public_key: set(p.allowed_ips) for p in state.peers}
    assert lan in allowed[KEYS[2]]
    assert far in allowed[KEYS[1]]  # n3 rides n1's peer, and so does its route
    assert sum(lan in ips for ips in allowed.values()) == 1


def test_an_endpoint_inside_a_network_routed_into_the_mesh_is_passed_over() -> None:
    lan = ipaddress.ip_network("192.168.77.0/24")
    gateway = member(1, "100.80.0.2")
    behind = dataclasses.replace(
        member(2, "100.80.0.3"),
        record=dataclasses.replace(
            record(2, "100.80.0.3"), endpoints=("192.168.77.3:51820", "198.18.0.3:51820")
        ),
    )
    only_lan = dataclasses.replace(
        member(3, "100.80.0.4"),
        record=dataclasses.replace(record(3, "100.80.0.4"), endpoints=("192.168.77.4:51820",)),
    )

    def endpoints(routes: dict[str, list[IPNetwork]]) -> dict[str, str | None]:
        state = compute(
            own_name="n0",
            own_record=record(0, "100.80.0.1"),
            members=[gateway, behind, only_lan],
            policy=Routing(extra=routes),
        )
        return {p.public_key: p.endpoint for p in state.peers}

    # Through the gateway's tunnel the member's WireGuard packets would die with n1.
    routed = endpoints({"n1": [lan]})
    assert routed[KEYS[2]] == "198.18.0.3:51820"
    assert routed[KEYS[3]] == "192.168.77.4:51820"  # nothing else published: kept
    # No route into the mesh, or only a default route (exit nodes: policy routing).
    assert endpoints({})[KEYS[2]] == "192.168.77.3:51820"
    assert endpoints({"n1": [ipaddress.ip_network("0.0.0.0/0")]})[KEYS[2]] == "192.168.77.3:51820"


@dataclass
class LanChoice(Routing):
    """A policy that picks a member's second endpoint (as the NAT plugin's LAN rule does)."""

    def select_path(self, member: Member) -> PathChoice:
        assert member.record is not None
        return PathChoice(endpoint=member.record.endpoints[-1], label="direct (LAN)")


def test_a_policy_chosen_endpoint_routed_into_the_mesh_is_replaced() -> None:
    lan = ipaddress.ip_network("192.168.77.0/24")
    behind = dataclasses.replace(
        member(2, "100.80.0.3"),
        record=dataclasses.replace(
            record(2, "100.80.0.3"), endpoints=("198.18.0.3:51820", "192.168.77.3:51820")
        ),
    )
    state = compute(
        own_name="n0",
        own_record=record(0, "100.80.0.1"),
        members=[member(1, "100.80.0.2"), behind],
        policy=LanChoice(extra={"n1": [lan]}),
    )
    assert {p.public_key: p.endpoint for p in state.peers}[KEYS[2]] == "198.18.0.3:51820"
