"""Desired state: which WireGuard peers this node should have, as a pure function.

Input: this node, the membership view, and the policy (the plugins' answers).
Output: the full peer set, computed from scratch every pass (level-triggered),
plus what was left out and why. Nothing here touches the network; the agent
diffs the result against the live interface and applies only the difference.

Rules:

- Members that are alive or failed are candidates: a failed member keeps its
  peer entry so it can come back within Serf's reconnect window. Leaving and
  left are Serf states anyone with the gossip key can forge (``force-leave``):
  such a member stays a candidate while its WireGuard handshake is recent
  (``recent``), unless it said goodbye itself through its own tunnel
  (``departed``, authenticated by WireGuard). Reaped members are dropped.
- A member without a decodable record, or whose record the policy does not
  admit, is left out with the reason.
- Two admitted members under one name are two incarnations of one machine
  (wiped and joined again with a new key, or restarted after a key rotation;
  Serf keeps the old one as failed or left): only the current one is a
  candidate, the alive one, else the one with the newer record
  (:func:`current_incarnations`). An unadmitted newcomer never displaces
  the member it claims to replace.
- Two members claiming one mesh address: one keeps it (an address its
  certificate binds beats one it does not, then a static address beats a
  derived one, then the lower public key wins); the loser's claim is left out
  of allowed IPs until it moves, so the interface never holds overlapping
  prefixes. :func:`address_owners` tells the agent when this node must move.
- A member reached through a *forwarding* relay (the policy gives the relay's
  forwarding endpoint) stays a peer of its own: only its endpoint changes, and the
  relay carries ciphertext. A member behind a *routed* relay (no endpoint given)
  is not a peer of its own: its addresses are added to the relay's allowed IPs.
- Routes to prefixes outside the mesh (a gateway's LAN, an exit node's default
  route) come from the policy, for all candidates at once (:meth:`Policy.routes`,
  so a choice between gateways sees this pass's states): each prefix is added to
  the allowed IPs of the member that carries it (of its routed relay, when it has
  no peer of its own). The interface routes every allowed prefix outside its own
  networks, so the kernel routes follow. A prefix two peers claim stays with the
  lower key (:func:`_without_overlaps`). Members' own addresses are host prefixes,
  so they win over any wider route by WireGuard's longest-prefix match.
- Peers that are no members (plain WireGuard clients of a gateway) come from the
  policy (:meth:`Policy.extra_peers`); a key a member holds is never taken by one.
- Known peers (learnt at enrolment or restored from the last run) fill in what
  gossip has not described yet: each keeps only the prefixes nobody else holds
  (a joiner whose IPv4 address turns out taken still needs its IPv6 gossip
  address, to learn that it must move). A known peer is forgotten once gossip
  speaks for its key (a peer, or a member that left or whose certificate was
  refused), or when it stayed unseen ``known_grace`` seconds while others are alive.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from meshd.errors import DecodeError
from meshd.hostport import parse_host_port
from meshd.node import KnownPeer
from meshd.pki.trust import PENDING
from meshd.types import (
    Admission,
    IPAddress,
    IPNetwork,
    Member,
    MemberState,
    NodeRecord,
    PathChoice,
    PeerConfig,
)

STATIC_ROLE = "static-addr"

# "leaving" is a graceful leave under way: its peer goes now, not when "left" arrives
# (a node that misses that last message would keep it until push/pull, 30 s later).
_CANDIDATE_STATES = frozenset({MemberState.ALIVE, MemberState.FAILED})
_UNAUTHENTICATED_GONE = frozenset({MemberState.LEAVING, MemberState.LEFT})


class Policy(Protocol):
    """The plugin answers the computation needs (the agent adapts its hooks to this)."""

    def admit(self, member: Member) -> Admission | None: ...

    def select_path(self, member: Member) -> PathChoice: ...

    def shape(self, member: Member, peer: PeerConfig) -> PeerConfig: ...

    def routes(self, members: Sequence[Member]) -> Mapping[str, Sequence[IPNetwork]]: ...

    def extra_peers(self) -> Sequence[PeerConfig]: ...


@dataclass(frozen=True)
class Claim:
    """A node's claim on its addresses, with what decides a conflict."""

    name: str
    public_key: str
    static: bool
    certified: frozenset[IPAddress] = frozenset()

    def rank(self, address: IPAddress) -> tuple[bool, bool, str]:
        """Lower wins: an address its certificate binds, then a static one, then the lower key."""
        return (address not in self.certified, not self.static, self.public_key)


class KnownEntry(NamedTuple):
    """A known peer and how long ago it was learnt (seconds)."""

    peer: KnownPeer
    age: float


@dataclass(frozen=True)
class DesiredState:
    peers: tuple[PeerConfig, ...]
    # member name -> why it is not a peer (unadmitted, no record, address conflict...)
    excluded: Mapping[str, str] = field(default_factory=dict)
    # member name -> name of the relay it goes through (routed or forwarding)
    relayed: Mapping[str, str] = field(default_factory=dict)
    # member name -> the path the policy chose (what status shows)
    paths: Mapping[str, PathChoice] = field(default_factory=dict)
    # keys of known peers gossip now speaks for, or that stayed unseen too long
    forget: tuple[str, ...] = ()
    # keys of known peers kept as peers although gossip has not described them
    unconfirmed: tuple[str, ...] = ()


@functools.lru_cache(maxsize=8192)
def host_prefix(address: IPAddress) -> IPNetwork:
    # Cached: every pass needs one per member address, and ipaddress builds a network
    # through its text form (at N=30 that was a third of an idle agent's pass).
    return ipaddress.ip_network(address)


def default_endpoint(endpoints: Sequence[str], into_mesh: AbstractSet[IPNetwork]) -> str | None:
    """A member's first endpoint that is not inside a network this node routes into the
    mesh (the first one when all are); None when it published none."""
    for endpoint in endpoints:
        if not routed_into_mesh(endpoint, into_mesh):
            return endpoint
    return endpoints[0] if endpoints else None


def routed_into_mesh(endpoint: str, into_mesh: AbstractSet[IPNetwork]) -> bool:
    """Whether ``endpoint``'s address lies in one of ``into_mesh`` (a name: not known)."""
    if not into_mesh:  # the usual case: parsing every member's endpoint was ~15 % of a pass
        return False
    host = _endpoint_address(endpoint)
    return host is not None and any(host in prefix for prefix in into_mesh)


@functools.lru_cache(maxsize=4096)
def _endpoint_address(endpoint: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(parse_host_port(endpoint)[0])
    except (DecodeError, ValueError):
        return None


def address_owners(claims: Iterable[tuple[Claim, Sequence[IPAddress]]]) -> dict[IPAddress, Claim]:
    """For every claimed address, the claim that keeps it."""
    owners: dict[IPAddress, Claim] = {}
    for claim, addresses in claims:
        for address in addresses:
            current = owners.get(address)
            if current is None or claim.rank(address) < current.rank(address):
                owners[address] = claim
    return owners


def claim_of(name: str, record: NodeRecord, certified: Iterable[IPAddress] = ()) -> Claim:
    return Claim(
        name=name,
        public_key=record.public_key,
        static=STATIC_ROLE in record.roles,
        certified=frozenset(certified),
    )


def current_incarnations(members: Iterable[Member]) -> list[Member]:
    """One member per name, in first-seen order: a certified one before an uncertified
    one (a newcomer with only the gossip key never hides the member it claims to be),
    then alive before any other state, then the newer record (a node's record version
    grows with the wall clock)."""

    def rank(member: Member) -> tuple[bool, bool, int]:
        version = member.record.version if member.record else -1
        return (member.certified, member.state is MemberState.ALIVE, version)

    chosen: dict[str, Member] = {}
    for member in members:
        held = chosen.get(member.name)
        if held is None or rank(member) > rank(held):
            chosen[member.name] = member
    return list(chosen.values())


def compute(
    *,
    own_name: str,
    own_record: NodeRecord,
    members: Sequence[Member],
    policy: Policy,
    keepalive: int | None = None,
    own_certified: Iterable[IPAddress] = (),
    known: Sequence[KnownEntry] = (),
    known_grace: float = 120.0,
    recent: AbstractSet[str] = frozenset(),
    departed: AbstractSet[str] = frozenset(),
) -> DesiredState:
    """The full desired peer set for this node: gossip's members, then known peers."""
    excluded: dict[str, str] = {}
    candidates: list[Member] = []
    for member in members:
        if member.name == own_name:
            continue
        record = member.record
        if record is not None and record.public_key in departed:
            continue
        if member.state not in _CANDIDATE_STATES and not (
            member.state in _UNAUTHENTICATED_GONE
            and record is not None
            and record.public_key in recent
        ):
            continue
        if record is None:
            excluded[member.name] = f"no valid record: {member.record_error or 'none published'}"
            continue
        if record.public_key == own_record.public_key:
            excluded[member.name] = "uses this node's own WireGuard key"
            continue
        verdict = policy.admit(member)
        if verdict is None or not verdict.admit:
            excluded[member.name] = (
                f"not admitted: {verdict.reason}" if verdict else "not admitted by any plugin"
            )
            continue
        candidates.append(member)
    candidates = current_incarnations(candidates)

    owners = address_owners(
        [(claim_of(own_name, own_record, own_certified), own_record.addresses)]
        + [
            (claim_of(m.name, m.record, m.certified_addresses), m.record.addresses)
            for m in candidates
            if m.record
        ]
    )

    by_name = {m.name: m for m in candidates}
    extra_routes = policy.routes(candidates)
    # Networks this node sends into the mesh (a gateway's LAN): a member's endpoint in
    # one of them would carry its WireGuard packets through another member's tunnel, and
    # die with that gateway. Default routes are left out: an exit node's traffic is kept
    # off WireGuard's own packets by policy routing.
    into_mesh = {p for routes in extra_routes.values() for p in routes if p.prefixlen}
    peers: dict[str, PeerConfig] = {}
    routed: dict[str, list[IPNetwork]] = {}
    relayed: dict[str, str] = {}
    paths: dict[str, PathChoice] = {}
    for member in candidates:
        record = member.record
        assert record is not None
        kept = [a for a in record.addresses if owners[a].name == member.name]
        if len(kept) < len(record.addresses):
            lost = ", ".join(str(a) for a in record.addresses if a not in kept)
            excluded[member.name] = f"address conflict: {lost} belongs to another node"
        if not kept:
            continue
        prefixes = [host_prefix(a) for a in kept]
        prefixes += [p for p in extra_routes.get(member.name, ()) if p not in prefixes]
        choice = policy.select_path(member)
        paths[member.name] = choice
        if choice.via and choice.endpoint is None and not choice.learn:
            relay = by_name.get(choice.via)
            if relay is not None and relay.name != member.name:
                routed.setdefault(relay.name, []).extend(prefixes)
                relayed[member.name] = relay.name
                continue
        if choice.via:
            relayed[member.name] = choice.via
        endpoint = choice.endpoint
        if endpoint is not None and routed_into_mesh(endpoint, into_mesh):
            endpoint = default_endpoint(record.endpoints, into_mesh)  # a policy's choice, too
        if endpoint is None and not choice.learn:
            endpoint = default_endpoint(record.endpoints, into_mesh)
        base = PeerConfig(
            public_key=record.public_key,
            allowed_ips=tuple(prefixes),
            endpoint=endpoint,
            keepalive=keepalive,
        )
        peers[member.name] = policy.shape(member, base)

    for relay_name, prefixes in routed.items():
        peer = peers.get(relay_name)
        if peer is None:
            for name in [n for n, via in relayed.items() if via == relay_name and n not in peers]:
                excluded[name] = f"relay {relay_name} is not a peer"
                del relayed[name]
            continue
        extra = tuple(p for p in prefixes if p not in peer.allowed_ips)
        peers[relay_name] = PeerConfig(
            public_key=peer.public_key,
            allowed_ips=peer.allowed_ips + extra,
            endpoint=peer.endpoint,
            keepalive=peer.keepalive,
            preshared_key=peer.preshared_key,
        )

    member_keys = {p.public_key for p in peers.values()} | {own_record.public_key}
    non_members = [p for p in policy.extra_peers() if p.public_key not in member_keys]
    gossip_peers = _without_overlaps((*peers.values(), *non_members))
    merged, forget, unconfirmed = _merge_known(
        gossip_peers, members, own_name, own_record, known, keepalive, known_grace, departed
    )
    return DesiredState(
        peers=merged,
        excluded=excluded,
        relayed=relayed,
        paths=paths,
        forget=forget,
        unconfirmed=unconfirmed,
    )


def _settled(member: Member) -> bool:
    """Gossip has decided about this member: gone, or its certificate refused."""
    if member.state in (MemberState.LEAVING, MemberState.LEFT, MemberState.REAPED):
        return True
    return member.certificate_error not in (None, PENDING)


def _merge_known(
    peers: tuple[PeerConfig, ...],
    members: Sequence[Member],
    own_name: str,
    own_record: NodeRecord,
    known: Sequence[KnownEntry],
    keepalive: int | None,
    grace: float,
    departed: AbstractSet[str],
) -> tuple[tuple[PeerConfig, ...], tuple[str, ...], tuple[str, ...]]:
    desired_keys = {p.public_key for p in peers}
    by_key = {m.record.public_key: m for m in members if m.record}
    taken = {prefix for p in peers for prefix in p.allowed_ips}
    taken.update(host_prefix(a) for a in own_record.addresses)
    others_alive = any(m.state is MemberState.ALIVE and m.name != own_name for m in members)
    merged = list(peers)
    forget: list[str] = []
    unconfirmed: list[str] = []
    for entry in sorted(known, key=lambda e: e.peer.public_key):
        key = entry.peer.public_key
        member = by_key.get(key)
        if key in desired_keys or key in departed or (member is not None and _settled(member)):
            forget.append(key)
            continue
        if others_alive and entry.age > grace:
            forget.append(key)
            continue
        free = tuple(p for p in entry.peer.allowed_ips if p not in taken)
        if not free:
            continue
        merged.append(
            PeerConfig(
                public_key=key,
                allowed_ips=free,
                endpoint=entry.peer.endpoint,
                keepalive=keepalive,
            )
        )
        taken.update(free)
        unconfirmed.append(key)
    return tuple(merged), tuple(forget), tuple(unconfirmed)


def _without_overlaps(peers: tuple[PeerConfig, ...]) -> tuple[PeerConfig, ...]:
    # Plugins may add prefixes (egress routes) that collide; WireGuard would silently
    # move the prefix to whichever peer is configured last. Keep the first claim.
    seen: dict[IPNetwork, str] = {}
    result = []
    for peer in sorted(peers, key=lambda p: p.public_key):
        allowed = []
        for prefix in peer.allowed_ips:
            if prefix in seen:
                continue
            seen[prefix] = peer.public_key
            allowed.append(prefix)
        if len(allowed) == len(peer.allowed_ips):
            result.append(peer)  # the usual case: nothing to drop, nothing to rebuild
            continue
        result.append(
            PeerConfig(
                public_key=peer.public_key,
                allowed_ips=tuple(allowed),
                endpoint=peer.endpoint,
                keepalive=peer.keepalive,
                preshared_key=peer.preshared_key,
            )
        )
    return tuple(result)
