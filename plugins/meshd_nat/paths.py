"""Which path reaches a member, as a pure function of what both records say.

A node's record tells, through roles, what the NAT plugin learnt about it:

- ``public``: reachable from outside (configured, or a global address); it observes
  others' endpoints and, with ``relay``, forwards for pairs that have no direct path;
- ``nat-cone`` / ``nat-symmetric`` / ``nat-unknown``: behind NAT, its reflexive
  (public) endpoint is known and is the first endpoint of its record; two observers
  saw the same mapping (cone: hole punching can work), different ones (symmetric: it
  cannot), or only one has answered yet (unknown: relayed, never punched on a guess);
- ``home-<10 hex>``: the relay it uses, by the first bytes of the relay's key.

The rules, for this node A and a member B:

1. B publishes none of these roles: the engine's default path.
2. B is public: direct to B's first endpoint.
3. A is public, B behind NAT: direct, with no endpoint set: B dials in (its
   keepalives hold its NAT open) and WireGuard learns where from.
4. Both behind one NAT (the same reflexive address): direct (LAN), to B's first
   endpoint that is not the reflexive one.
5. Both behind different NATs: direct to B's reflexive endpoint once hole punching
   worked (or while it is being tried); otherwise through the pair's relay: the
   home relay of the pair's member with the lower key (so both ends pick the same
   one), else the other's home, else the first relay by name.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from meshd import DecodeError, Member, MemberState, NodeRecord, PathChoice, parse_host_port

PUBLIC, RELAY = "public", "relay"
CONE, SYMMETRIC, UNKNOWN = "cone", "symmetric", "unknown"
NAT_PREFIX, HOME_PREFIX = "nat-", "home-"


def key_tag(public_key: str) -> str:
    """The short tag a ``home-`` role names a relay by: 10 hex digits of its key."""
    try:
        return base64.b64decode(public_key + "=" * (-len(public_key) % 4)).hex()[:10]
    except (binascii.Error, ValueError):
        return ""


@dataclass(frozen=True)
class Side:
    """One end of a pair, as its record describes it."""

    name: str
    key: str
    endpoints: tuple[str, ...]
    public: bool = False
    nat: str | None = None  # CONE, SYMMETRIC, UNKNOWN (one observer so far); None: no facts
    relay: bool = False
    home: str | None = None  # key tag of its home relay

    @property
    def natted(self) -> bool:
        return self.nat is not None

    @property
    def reflexive(self) -> str | None:
        return self.endpoints[0] if self.natted and self.endpoints else None

    @property
    def described(self) -> bool:
        """Whether the record carries this plugin's facts at all."""
        return self.public or self.natted

    @classmethod
    def of(cls, name: str, record: NodeRecord) -> Side:
        roles = record.roles
        nat = next(
            (r.removeprefix(NAT_PREFIX) for r in sorted(roles) if r.startswith(NAT_PREFIX)), None
        )
        home = next(
            (r.removeprefix(HOME_PREFIX) for r in sorted(roles) if r.startswith(HOME_PREFIX)), None
        )
        return cls(
            name=name,
            key=record.public_key,
            endpoints=record.endpoints,
            public=PUBLIC in record.roles,
            nat=nat if nat in (CONE, SYMMETRIC, UNKNOWN) else None,
            relay=RELAY in record.roles,
            home=home,
        )


@dataclass(frozen=True)
class Punch:
    """Hole punching between this node and one member, as far as it got."""

    direct: bool = False  # a punch worked and the direct path still carries traffic
    trying: bool = False  # a punch is under way: both ends aim at each other now
    failures: int = 0
    next_try: float = 0.0  # monotonic time of the next attempt


def host_of(endpoint: str) -> str | None:
    try:
        return str(parse_host_port(endpoint)[0])
    except DecodeError:
        return None


def lan_endpoint(peer: Side) -> str | None:
    """B's first endpoint that is a private (site) address, not its reflexive one."""
    for endpoint in peer.endpoints[1:]:
        host = host_of(endpoint)
        if host is None:
            continue
        try:
            if not ipaddress.ip_address(host).is_loopback:
                return endpoint
        except ValueError:
            continue
    return None


def same_site(me: Side, peer: Side) -> bool:
    return (
        me.reflexive is not None
        and peer.reflexive is not None
        and host_of(me.reflexive) == host_of(peer.reflexive)
    )


def can_punch(me: Side, peer: Side) -> bool:
    """Both behind endpoint-independent (cone) NATs, in different sites."""
    return me.nat == CONE and peer.nat == CONE and not same_site(me, peer)


def pair_relay(me: Side, peer: Side, relays: Mapping[str, str]) -> str | None:
    """The relay both ends of the pair choose: ``relays`` maps key tag -> member name."""
    low, high = sorted((me, peer), key=lambda side: side.key)
    for side in (low, high):
        if side.home and side.home in relays:
            return relays[side.home]
    return relays[min(relays, key=lambda tag: relays[tag])] if relays else None


def choose(
    me: Side,
    peer: Side,
    *,
    punch: Punch,
    relay: str | None,
    relay_endpoint: str | None,
    now: float,
) -> PathChoice | None:
    """The path to ``peer``; ``relay``/``relay_endpoint``: the pair's relay and the
    forwarding port it gave this node (None while being asked)."""
    if not peer.described:
        return None
    if peer.public:
        return PathChoice(label="direct")
    if me.public or not me.described:
        # Its mapping towards this node is the one its own packets come from: a
        # reflexive endpoint another observer saw is wrong for a symmetric NAT.
        return PathChoice(learn=True, label="direct", reason="it dials in (behind NAT)")
    if same_site(me, peer):
        lan = lan_endpoint(peer)
        if lan is not None:
            return PathChoice(endpoint=lan, label="direct (LAN)")
    if can_punch(me, peer) and peer.reflexive and (punch.direct or punch.trying):
        label = "direct" if punch.direct else "direct (punching)"
        return PathChoice(endpoint=peer.reflexive, label=label, pair_only=True)
    reason = why_relayed(me, peer, punch, now)
    if relay is None:
        return PathChoice(learn=True, label="no path", reason=f"{reason}; no relay alive")
    if relay_endpoint is None:
        return PathChoice(learn=True, label=f"relay via {relay} (asking)", reason=reason)
    return PathChoice(via=relay, endpoint=relay_endpoint, label=f"relay via {relay}", reason=reason)


def why_relayed(me: Side, peer: Side, punch: Punch, now: float) -> str:
    if me.nat == SYMMETRIC:
        return "this node's NAT is symmetric"
    if peer.nat == SYMMETRIC:
        return f"{peer.name} is behind a symmetric NAT"
    if punch.failures:
        wait = max(0.0, punch.next_try - now)
        return f"hole punching failed {punch.failures}x, next try in {wait:.0f} s"
    return "hole punching not tried yet"


def sides(members: Sequence[Member], own_name: str) -> dict[str, Side]:
    """Every alive or failed certified member's side, by name (this node's excluded)."""
    found: dict[str, Side] = {}
    for member in members:
        if member.name == own_name or member.record is None or not member.certified:
            continue
        if member.state not in (MemberState.ALIVE, MemberState.FAILED):
            continue
        found[member.name] = Side.of(member.name, member.record)
    return found
