"""The pure peer and route diff: minimal, idempotent, and correct under WireGuard's rules.

The oracle is a small interpreter of UAPI ``set=1`` text with WireGuard's semantics
(an allowed IP given to one peer is taken from any other; ``update_only`` never
creates; ``replace_allowed_ips`` clears first). Plans are encoded with the real
encoder, so the plan and the encoder are checked together.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.b64 import encode_b64
from meshd.errors import IdentityError, WireGuardError
from meshd.types import IPNetwork, PeerConfig
from meshd.wireguard.backend import ZERO_KEY, OpKind, PeerOp, PeerState
from meshd.wireguard.reconcile import (
    AppliedPeers,
    applied_peers,
    plan_peers,
    plan_routes,
    routed_prefixes,
)
from meshd.wireguard.uapi import encode_set

KEYS = [encode_b64(bytes([i + 1]) * 32) for i in range(6)]
PSKS = [encode_b64(bytes([0x80 + i]) * 32) for i in range(2)]
PREFIXES: list[IPNetwork] = [
    *(ipaddress.ip_network(f"100.64.0.{i}/32") for i in range(1, 7)),
    ipaddress.ip_network("100.64.0.0/16"),
    ipaddress.ip_network("10.9.0.0/24"),
    ipaddress.ip_network("fd00::1/128"),
    ipaddress.ip_network("fd00::/64"),
]
ENDPOINTS = ["198.18.0.1:51820", "198.18.0.2:51821", "[fd00::9]:51820"]


def net(text: str) -> IPNetwork:
    return ipaddress.ip_network(text)


@dataclass
class _ModelPeer:
    endpoint: str | None = None
    keepalive: int = 0
    psk: str = ZERO_KEY
    allowed: set[IPNetwork] = field(default_factory=set)


def interpret_set(peers: dict[str, _ModelPeer], text: str) -> None:
    """Apply UAPI ``set=1`` text to ``peers`` the way WireGuard does."""
    lines = text.split("\n")
    assert lines[0] == "set=1"
    assert text.endswith("\n\n")
    current: _ModelPeer | None = None
    current_key = ""
    created = False
    for line in lines[1:]:
        if not line:
            continue
        key, _, value = line.partition("=")
        assert key != "replace_peers", "a reconcile pass must never replace all peers"
        if key == "public_key":
            public = encode_b64(bytes.fromhex(value))
            current_key = public
            created = public not in peers
            current = peers.setdefault(public, _ModelPeer())
        elif key == "update_only":
            # WireGuard would skip this peer; the plan must only update existing peers.
            assert not created, "update_only on a peer that did not exist"

        elif key == "remove":
            peers.pop(current_key)
            current = None
        elif key == "endpoint":
            assert current is not None
            current.endpoint = value
        elif key == "persistent_keepalive_interval":
            assert current is not None
            current.keepalive = int(value)
        elif key == "preshared_key":
            assert current is not None
            current.psk = encode_b64(bytes.fromhex(value))
        elif key == "replace_allowed_ips":
            assert current is not None
            current.allowed.clear()
        elif key == "allowed_ip":
            assert current is not None
            prefix = ipaddress.ip_network(value)
            for other in peers.values():
                other.allowed.discard(prefix)
            current.allowed.add(prefix)
        else:
            raise AssertionError(f"unexpected UAPI key {key}")


def model_from_live(live: list[PeerState]) -> dict[str, _ModelPeer]:
    return {
        p.public_key: _ModelPeer(
            endpoint=p.endpoint,
            keepalive=p.keepalive or 0,
            psk=p.preshared_key or ZERO_KEY,
            allowed=set(p.allowed_ips),
        )
        for p in live
    }


def live_from_model(peers: dict[str, _ModelPeer]) -> list[PeerState]:
    return [
        PeerState(
            public_key=key,
            endpoint=p.endpoint,
            allowed_ips=tuple(sorted(p.allowed, key=str)),
            keepalive=p.keepalive or None,
            preshared_key=None if p.psk == ZERO_KEY else p.psk,
        )
        for key, p in peers.items()
    ]


def run_plan(live: list[PeerState], desired: list[PeerConfig]) -> dict[str, _ModelPeer]:
    ops = plan_peers(live, desired)
    model = model_from_live(live)
    interpret_set(model, encode_set(None, ops).decode())
    return model


def assert_matches(model: dict[str, _ModelPeer], live: list[PeerState], desired: list[PeerConfig]):
    before = {p.public_key: p for p in live}
    assert set(model) == {p.public_key for p in desired}
    for want in desired:
        got = model[want.public_key]
        assert got.allowed == set(want.allowed_ips)
        assert got.keepalive == (want.keepalive or 0)
        assert got.psk == (want.preshared_key or ZERO_KEY)
        if want.endpoint is not None:
            assert got.endpoint == want.endpoint
        else:  # left alone: whatever WireGuard had learned stays
            old = before.get(want.public_key)
            assert got.endpoint == (old.endpoint if old else None)


@st.composite
def peer_sets(draw: st.DrawFn, *, with_stats: bool = False) -> list[PeerState]:
    keys = draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=len(KEYS)))
    prefixes = draw(st.permutations(PREFIXES))
    cuts = sorted(
        draw(st.lists(st.integers(0, len(prefixes)), min_size=len(keys), max_size=len(keys)))
    )
    peers = []
    start = 0
    for key, end in zip(keys, cuts, strict=True):
        peers.append(
            PeerState(
                public_key=key,
                endpoint=draw(st.none() | st.sampled_from(ENDPOINTS)),
                allowed_ips=tuple(sorted(prefixes[start:end], key=str)),
                keepalive=draw(st.sampled_from([None, 25, 5])),
                preshared_key=draw(st.none() | st.sampled_from(PSKS)),
                last_handshake=draw(st.none() | st.floats(1e9, 2e9)) if with_stats else None,
                rx_bytes=draw(st.integers(0, 10**9)) if with_stats else 0,
            )
        )
        start = max(start, end)
    return peers


def as_desired(peers: list[PeerState]) -> list[PeerConfig]:
    return [
        PeerConfig(p.public_key, p.allowed_ips, p.endpoint, p.keepalive, p.preshared_key)
        for p in peers
    ]


@settings(max_examples=400)
@given(live=peer_sets(with_stats=True), target=peer_sets())
def test_applying_the_plan_yields_the_desired_peers(live, target):
    desired = as_desired(target)
    model = run_plan(live, desired)
    assert_matches(model, live, desired)
    # ...and the result is a fixed point: the next pass plans nothing.
    assert plan_peers(live_from_model(model), desired) == ()


@given(state=peer_sets(with_stats=True))
def test_plan_of_a_state_against_itself_is_empty(state):
    assert plan_peers(state, as_desired(state)) == ()


@given(live=peer_sets(), target=peer_sets())
def test_unchanged_peers_are_never_touched_and_nothing_is_re_added(live, target):
    desired = as_desired(target)
    ops = plan_peers(live, desired)
    live_keys = {p.public_key for p in live}
    unchanged = {p.public_key for p in live} & {
        d.public_key
        for d in desired
        if any(
            p.public_key == d.public_key
            and set(p.allowed_ips) == set(d.allowed_ips)
            and (d.endpoint is None or d.endpoint == p.endpoint)
            and (p.keepalive or 0) == (d.keepalive or 0)
            and p.preshared_key == d.preshared_key
            for p in live
        )
    }
    touched = [op.public_key for op in ops]
    assert len(touched) == len(set(touched)), "one op per peer at most"
    assert not unchanged & set(touched)
    for op in ops:
        if op.kind is OpKind.ADD:
            assert op.public_key not in live_keys
        else:
            assert op.public_key in live_keys


def test_a_prefix_moving_between_peers_is_one_plan_with_the_gainer_first():
    a, b, c = KEYS[:3]
    moving = net("10.9.0.0/24")
    live = [
        PeerState(a, "198.18.0.1:51820", (net("100.64.0.1/32"), moving)),
        PeerState(b, "198.18.0.2:51820", (net("100.64.0.2/32"),)),
        PeerState(c, "198.18.0.3:51820", (net("100.64.0.3/32"),)),
    ]
    desired = [
        PeerConfig(a, (net("100.64.0.1/32"),), "198.18.0.1:51820"),
        PeerConfig(b, (net("100.64.0.2/32"), moving), "198.18.0.2:51820"),
        PeerConfig(c, (net("100.64.0.3/32"),), "198.18.0.3:51820"),
    ]
    ops = plan_peers(live, desired)
    assert [(op.kind, op.public_key) for op in ops] == [(OpKind.UPDATE, b), (OpKind.UPDATE, a)]
    assert ops[0].allowed_ips == (net("10.9.0.0/24"), net("100.64.0.2/32"))
    assert ops[0].endpoint is None
    assert ops[0].keepalive is None
    assert_matches(run_plan(live, desired), live, desired)


def test_a_changed_endpoint_is_an_update_of_that_peer_only():
    a, b = KEYS[:2]
    live = [PeerState(a, "198.18.0.1:51820", (net("100.64.0.1/32"),), 25), PeerState(b)]
    desired = [PeerConfig(a, (net("100.64.0.1/32"),), "198.18.0.9:51820", 25), PeerConfig(b)]
    assert plan_peers(live, desired) == (PeerOp(OpKind.UPDATE, a, endpoint="198.18.0.9:51820"),)


def test_no_desired_endpoint_keeps_the_learned_one():
    live = [PeerState(KEYS[0], "198.18.0.7:40000", (net("100.64.0.1/32"),))]
    assert plan_peers(live, [PeerConfig(KEYS[0], (net("100.64.0.1/32"),))]) == ()


def test_removing_keepalive_and_psk_sets_them_to_off():
    live = [PeerState(KEYS[0], None, (), 25, PSKS[0])]
    (op,) = plan_peers(live, [PeerConfig(KEYS[0])])
    assert (op.kind, op.keepalive, op.preshared_key) == (OpKind.UPDATE, 0, ZERO_KEY)


def test_endpoints_are_compared_in_canonical_form():
    live = [PeerState(KEYS[0], "[fd00::9]:51820")]
    assert plan_peers(live, [PeerConfig(KEYS[0], endpoint="[fd00:0::9]:51820")]) == ()


def test_the_same_prefix_on_two_peers_is_refused_naming_both():
    shared = net("100.64.0.0/16")
    with pytest.raises(WireGuardError, match=r"100\.64\.0\.0/16 is on two peers") as info:
        plan_peers([], [PeerConfig(KEYS[0], (shared,)), PeerConfig(KEYS[1], (shared,))])
    assert KEYS[0] in str(info.value)
    assert KEYS[1] in str(info.value)


def test_a_prefix_inside_another_peers_prefix_is_allowed():
    # The relay carries the mesh range, a direct peer its own /32: longest match wins.
    ops = plan_peers(
        [],
        [
            PeerConfig(KEYS[0], (net("100.64.0.0/16"),)),
            PeerConfig(KEYS[1], (net("100.64.0.2/32"),)),
        ],
    )
    assert len(ops) == 2


@pytest.mark.parametrize(
    ("peer", "error", "message"),
    [
        (PeerConfig("not-a-key"), IdentityError, "peer public key 'not-a-key'"),
        (PeerConfig(KEYS[0][:-2] + "=="), IdentityError, "peer public key"),
        (PeerConfig(KEYS[0], preshared_key="secret"), IdentityError, "preshared key of peer"),
        (PeerConfig(KEYS[0], endpoint="example.org:51820"), WireGuardError, "not an IP address"),
        (PeerConfig(KEYS[0], endpoint="198.18.0.1"), WireGuardError, "is not HOST:PORT"),
        (PeerConfig(KEYS[0], endpoint="198.18.0.1:70000"), WireGuardError, "port out of range"),
        (PeerConfig(KEYS[0], keepalive=70000), WireGuardError, "keepalive 70000"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(peer, error, message):
    with pytest.raises(error, match=message):
        plan_peers([], [peer])


def test_bad_preshared_key_message_does_not_echo_the_key():
    with pytest.raises(IdentityError) as info:
        plan_peers([], [PeerConfig(KEYS[0], preshared_key="s3cr3t-value")])
    assert "s3cr3t" not in str(info.value)


def test_a_key_listed_twice_is_refused():
    with pytest.raises(WireGuardError, match="listed twice"):
        plan_peers([], [PeerConfig(KEYS[0]), PeerConfig(KEYS[0])])


def test_secrets_stay_out_of_reprs():
    op = PeerOp(OpKind.ADD, KEYS[0], preshared_key=PSKS[0])
    state = PeerState(KEYS[0], preshared_key=PSKS[0])
    assert PSKS[0] not in repr(op)
    assert PSKS[0] not in str(op)
    assert PSKS[0] not in repr(state)


def test_routes_cover_prefixes_outside_the_interface_networks_only():
    on_link = [net("100.64.0.0/16"), net("fd00::/64")]
    prefixes = [
        net("100.64.0.2/32"),  # on-link: the interface address covers it
        net("10.9.0.0/24"),  # an egress subnet: needs a route
        net("fd00::5/128"),
        net("fd01::/64"),
        net("0.0.0.0/0"),  # default route: policy routing's job
        net("fe80::1/128"),
    ]
    assert routed_prefixes(prefixes, on_link) == {net("10.9.0.0/24"), net("fd01::/64")}
    plan = plan_routes(prefixes, on_link, [net("10.9.0.0/24"), net("172.16.0.0/12")])
    assert plan.add == (net("fd01::/64"),)
    assert plan.remove == (net("172.16.0.0/12"),)
    assert len(plan_routes(prefixes, on_link, [net("10.9.0.0/24"), net("fd01::/64")])) == 0


@given(
    prefixes=st.sets(st.sampled_from(PREFIXES)),
    on_link=st.sets(st.sampled_from(PREFIXES)),
    live=st.sets(st.sampled_from(PREFIXES)),
)
def test_applying_a_route_plan_yields_the_routed_prefixes(prefixes, on_link, live):
    plan = plan_routes(prefixes, on_link, live)
    after = (set(live) - set(plan.remove)) | set(plan.add)
    assert after == routed_prefixes(prefixes, on_link)
    assert len(plan_routes(prefixes, on_link, after)) == 0


@settings(max_examples=300)
@given(live=peer_sets(), target=peer_sets(), data=st.data())
def test_an_apply_cut_off_anywhere_is_repaired_by_the_next_pass(live, target, data):
    # wireguard-go applies a set=1 line by line and stops at a failing line: model a
    # failure after any line, then check the next pass converges from what is left.
    desired = as_desired(target)
    text = encode_set(None, plan_peers(live, desired)).decode()
    lines = text.rstrip("\n").split("\n")
    cut = data.draw(st.integers(1, len(lines)), label="lines applied")
    model = model_from_live(live)
    interpret_set(model, "\n".join(lines[:cut]) + "\n\n")
    half_done = live_from_model(model)
    repaired = run_plan(half_done, desired)
    assert_matches(repaired, half_done, desired)


# Planning from the last pass's record (AppliedPeers) instead of a device read.


def config_of(peers: dict[str, PeerState] | list[PeerState]) -> dict[str, tuple]:
    """The settings a plan compares, per key (allowed IPs as a set: order is the device's)."""
    values = peers.values() if isinstance(peers, dict) else peers
    return {
        p.public_key: (p.endpoint, frozenset(p.allowed_ips), p.keepalive, p.preshared_key)
        for p in values
    }


@st.composite
def claims(draw: st.DrawFn) -> list[PeerConfig]:
    """Desired peers whose prefixes may collide, and whose endpoints may be left to WireGuard."""
    keys = draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=len(KEYS)))
    return [
        PeerConfig(
            key,
            tuple(draw(st.lists(st.sampled_from(PREFIXES), max_size=3, unique=True))),
            draw(st.none() | st.sampled_from(ENDPOINTS)),
            draw(st.sampled_from([None, 25])),
            draw(st.none() | st.sampled_from(PSKS)),
        )
        for key in keys
    ]


def outcome(plan, *args):
    """A plan's ops, or the type of error it raised."""
    try:
        return plan(*args)
    except (WireGuardError, IdentityError) as exc:
        return type(exc)


@settings(max_examples=400)
@given(live=peer_sets(with_stats=True), target=peer_sets())
def test_the_record_of_applied_ops_is_what_wireguard_ends_up_with(live, target):
    desired = as_desired(target)
    ops = plan_peers(live, desired)
    model = model_from_live(live)
    interpret_set(model, encode_set(None, ops).decode())
    recorded = applied_peers({p.public_key: p for p in live}, ops)
    assert config_of(recorded) == config_of(live_from_model(model))


@st.composite
def op_sequences(draw: st.DrawFn, live: list[PeerState]) -> list[PeerOp]:
    """Any ops WireGuard would accept in a row, not only those a plan makes (a prefix
    may be given twice, to one peer after another)."""
    keys = {p.public_key for p in live}
    ops = []
    for _ in range(draw(st.integers(0, 8))):
        key = draw(st.sampled_from(KEYS))
        prefixes = st.lists(st.sampled_from(PREFIXES), max_size=3, unique=True).map(
            lambda found: tuple(sorted(found, key=str))
        )
        if key not in keys:
            ops.append(PeerOp(OpKind.ADD, key, allowed_ips=draw(prefixes)))
            keys.add(key)
        elif draw(st.booleans()):
            ops.append(PeerOp(OpKind.REMOVE, key))
            keys.discard(key)
        else:
            allowed = draw(st.none() | prefixes)
            ops.append(
                PeerOp(
                    OpKind.UPDATE, key, keepalive=draw(st.none() | st.just(5)), allowed_ips=allowed
                )
            )
    return ops


@settings(max_examples=400)
@given(live=peer_sets(), data=st.data())
def test_the_record_follows_any_sequence_of_ops_like_wireguard(live, data):
    ops = data.draw(op_sequences(live))
    model = model_from_live(live)
    interpret_set(model, encode_set(None, ops).decode())
    assert config_of(applied_peers(peer_map(live), ops)) == config_of(live_from_model(model))


@settings(max_examples=600)
@given(live=peer_sets(with_stats=True), before=peer_sets(), claimed=claims(), data=st.data())
def test_planning_from_the_record_equals_planning_from_a_device_read(live, before, claimed, data):
    # The record of a pass, then a next desired state (valid or not) that keeps some of
    # the previous peers as they were: the record plans exactly what a full read and
    # plan_peers would, and raises where it raises.
    previous = as_desired(before)
    kept = data.draw(st.lists(st.sampled_from(previous), unique=True) if previous else st.just([]))
    kept_keys = {p.public_key for p in kept}
    after = kept + [p for p in claimed if p.public_key not in kept_keys]
    record = AppliedPeers(previous, applied_peers(peer_map(live), plan_peers(live, previous)))
    expected = outcome(plan_peers, list(record.live.values()), after)
    assert outcome(record.plan, after) == expected
    if isinstance(expected, tuple):
        # ...and the record after applying it plans nothing more: idempotent with the cache.
        following = record.after(after, expected)
        assert following.plan(after) == ()
        assert plan_peers(list(following.live.values()), after) == ()


@given(state=peer_sets(with_stats=True))
def test_a_record_of_the_device_against_the_same_desired_peers_is_empty(state):
    desired = as_desired(state)
    assert AppliedPeers(desired, peer_map(state)).plan(desired) == ()
    # Fresh, equal objects (as the agent computes every pass) are no change either.
    fresh = [PeerConfig(p.public_key, tuple(p.allowed_ips), p.endpoint) for p in desired]
    fresh = [
        PeerConfig(f.public_key, f.allowed_ips, f.endpoint, p.keepalive, p.preshared_key)
        for f, p in zip(fresh, desired, strict=True)
    ]
    assert AppliedPeers(desired, peer_map(state)).plan(fresh) == ()


@settings(max_examples=300)
@given(live=peer_sets(with_stats=True), target=peer_sets(), data=st.data())
def test_the_record_matches_a_read_of_the_device_it_describes_and_no_other(live, target, data):
    desired = as_desired(target)
    ops = plan_peers(live, desired)
    model = model_from_live(live)
    interpret_set(model, encode_set(None, ops).decode())
    record = AppliedPeers(desired, applied_peers(peer_map(live), ops))
    device = live_from_model(model)  # as a read shows it: its own prefix order, its stats
    assert record.matches(device)
    # A roamed endpoint is WireGuard's own doing, not drift.
    assert record.matches([replace(p, endpoint="198.18.9.9:4000") for p in device])
    if not device:
        return
    victim = data.draw(st.sampled_from(device))
    others = [p for p in device if p is not victim]
    drifts = [
        others,
        [*others, replace(victim, keepalive=(victim.keepalive or 0) + 1)],
        [*others, replace(victim, preshared_key=PSKS[0] if victim.preshared_key is None else None)],
        [*others, replace(victim, allowed_ips=(*victim.allowed_ips, net("192.0.2.0/24")))],
        [*others, victim, PeerState(encode_b64(bytes(31) + b"x"))],
    ]
    for drifted in drifts:
        assert not record.matches(drifted)


def test_the_record_refuses_a_prefix_an_unchanged_peer_still_holds():
    a, b = KEYS[:2]
    shared = net("10.9.0.0/24")
    previous = [PeerConfig(a, (shared,)), PeerConfig(b, (net("100.64.0.2/32"),))]
    record = AppliedPeers(previous, applied_peers({}, plan_peers([], previous)))
    with pytest.raises(WireGuardError, match=r"10\.9\.0\.0/24 is on two peers"):
        record.plan([previous[0], PeerConfig(b, (net("100.64.0.2/32"), shared))])


def peer_map(peers: list[PeerState]) -> dict[str, PeerState]:
    return {p.public_key: p for p in peers}


@given(
    address=st.ip_addresses(),
    length=st.integers(0, 128),
    link_length=st.integers(0, 128),
    offset=st.integers(-2, 2),
    noise=st.integers(0, 2**128 - 1),
)
def test_routed_prefixes_agree_with_ipaddress_subnet_of(
    address, length, link_length, offset, noise
):
    # The link's address shares the prefix's top bits down to about the link's length:
    # near misses and hits both come up, not only unrelated networks.
    bits = address.max_prefixlen
    shared = min(max(0, min(link_length, bits) + offset), bits)
    flipped = noise & ((1 << (bits - shared)) - 1)
    link_address = ipaddress.ip_address(int(address) ^ flipped) if bits == 32 else None
    if link_address is None:
        link_address = ipaddress.IPv6Address(int(address) ^ flipped)
    prefix = ipaddress.ip_network((address, min(length, bits)), strict=False)
    link = ipaddress.ip_network((link_address, min(link_length, bits)), strict=False)

    def inside(outer: IPNetwork) -> bool:
        return prefix.version == outer.version and prefix.subnet_of(outer)  # type: ignore[arg-type]

    routed = prefix.prefixlen > 0 and not inside(link) and not inside(net("fe80::/10"))
    assert (prefix in routed_prefixes([prefix], [link])) == routed
