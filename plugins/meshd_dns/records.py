"""What the mesh's zone holds, and the three files that spell it: pure functions.

:func:`hosts_of_view` picks the members a node names from its own view (the rules
are in its docstring); :func:`render_hosts`, :func:`render_zone` and
:func:`render_corefile` turn the result into a CoreDNS ``hosts`` file, an RFC 1035
zone file and a Corefile snippet.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from meshd import IPAddress, Member, MemberState, MeshView
from meshd_dns.names import assign_labels

# SOA timers (seconds): secondaries refresh often; the mesh changes all the time.
REFRESH, RETRY, EXPIRE = 60, 30, 86400


@dataclass(frozen=True, order=True)
class Host:
    """One name in the zone: its label, the node's own name and its mesh addresses."""

    label: str
    name: str
    addresses: tuple[IPAddress, ...]


@dataclass(frozen=True)
class Zone:
    """Everything the files are made of; ``serial`` grows with every change of the rest."""

    origin: str  # without the trailing dot
    ttl: int
    primary: str  # the label of the node that wrote it: the zone's NS
    hosts: tuple[Host, ...]
    serial: int = 1

    def same_content(self, other: Zone | None) -> bool:
        """Whether ``other`` names the same things (its serial aside)."""
        return other is not None and (self.origin, self.ttl, self.primary, self.hosts) == (
            other.origin,
            other.ttl,
            other.primary,
            other.hosts,
        )

    def fqdn(self, label: str) -> str:
        return f"{label}.{self.origin}"

    def lookup(self, label: str) -> Host | None:
        for host in self.hosts:
            if host.label == label:
                return host
        return None


_NAMED_STATES = frozenset({MemberState.ALIVE, MemberState.FAILED})


def _routed(view: MeshView) -> set[IPAddress]:
    """The single addresses this node's WireGuard sends somewhere (host prefixes)."""
    routed: set[IPAddress] = set()
    for peer in view.peers:
        for prefix in peer.allowed_ips:
            if prefix.num_addresses == 1:
                routed.add(prefix.network_address)
    return routed


def _current(members: Iterable[Member], peer_keys: set[str]) -> dict[str, Member]:
    """One member per name: the one that is a peer, else alive, else the newest record."""
    chosen: dict[str, Member] = {}
    for member in members:
        assert member.record is not None
        rank = (
            member.record.public_key in peer_keys,
            member.state is MemberState.ALIVE,
            member.record.version,
        )
        held = chosen.get(member.name)
        if held is None:
            chosen[member.name] = member
            continue
        assert held.record is not None
        held_rank = (
            held.record.public_key in peer_keys,
            held.state is MemberState.ALIVE,
            held.record.version,
        )
        if rank > held_rank:
            chosen[member.name] = member
    return chosen


def hosts_of_view(
    view: MeshView, own_addresses: Sequence[IPAddress]
) -> dict[str, tuple[IPAddress, ...]]:
    """Name -> mesh addresses of every member this node would reach, itself included.

    A member is named when its certificate checks out (so never once revoked) and it
    is alive or failed (a failed member keeps its peer and may come back), or it is
    still a WireGuard peer whatever gossip says (a leave anyone could forge). Of its
    addresses only those this node's WireGuard routes count: the loser of an address
    conflict, or a member the admission policy refuses, names nothing. A member that
    left, said goodbye, or was revoked has no peer and is gone. One name, one member
    (a re-joined machine's old incarnation is not named twice).
    """
    routed = _routed(view)
    peer_keys = {peer.public_key for peer in view.peers}
    candidates = [
        m
        for m in view.members
        if m.record is not None
        and m.name != view.node.name
        and m.certified
        and (m.state in _NAMED_STATES or m.record.public_key in peer_keys)
    ]
    named: dict[str, tuple[IPAddress, ...]] = {}
    for name, member in _current(candidates, peer_keys).items():
        assert member.record is not None
        addresses = tuple(a for a in member.record.addresses if a in routed)
        if addresses:
            named[name] = addresses
    named[view.node.name] = tuple(own_addresses)
    return named


def build_zone(
    origin: str, ttl: int, own_name: str, named: dict[str, tuple[IPAddress, ...]]
) -> Zone:
    """The zone of ``named`` (name -> addresses), labels assigned over all of them."""
    labels = assign_labels(named)
    hosts = tuple(
        sorted(
            Host(labels[name], name, tuple(sorted(addrs, key=lambda a: (a.version, int(a)))))
            for name, addrs in named.items()
        )
    )
    return Zone(origin=origin.rstrip(".").lower(), ttl=ttl, primary=labels[own_name], hosts=hosts)


def render_hosts(zone: Zone) -> str:
    """The CoreDNS ``hosts`` file (the /etc/hosts format): full name, then the short one."""
    lines = [
        f"# meshd: members of {zone.origin}, serial {zone.serial}; written by meshd, do not edit"
    ]
    for host in zone.hosts:
        lines.extend(f"{a} {zone.fqdn(host.label)} {host.label}" for a in host.addresses)
    return "\n".join(lines) + "\n"


def render_zone(zone: Zone) -> str:
    """An RFC 1035 master file: SOA and NS at the apex (the writing node is the primary),
    an A or AAAA record per member address."""
    origin = f"{zone.origin}."
    width = max([len(h.label) for h in zone.hosts] + [1])
    lines = [
        f"; meshd: members of {zone.origin}; written by meshd, do not edit",
        f"$ORIGIN {origin}",
        f"$TTL {zone.ttl}",
        f"@ IN SOA {zone.primary}.{origin} hostmaster.{origin} "
        f"{zone.serial} {REFRESH} {RETRY} {EXPIRE} {zone.ttl}",
        f"@ IN NS {zone.primary}.{origin}",
    ]
    for host in zone.hosts:
        for address in host.addresses:
            kind = "A" if address.version == 4 else "AAAA"
            lines.append(f"{host.label:<{width}} IN {kind:<4} {address}")
    return "\n".join(lines) + "\n"


def render_corefile(zone: Zone, directory: Path, *, hosts_file: bool) -> str:
    """A Corefile server block for the zone: CoreDNS's ``hosts`` plugin on the hosts
    file (re-read every second) when it is written, else ``file`` on the zone file."""
    lines = [f"# meshd: serve {zone.origin} from the files meshd writes", f"{zone.origin} {{"]
    if hosts_file:
        lines += [
            f"    hosts {directory / 'hosts'} {zone.origin} {{",
            f"        ttl {zone.ttl}",
            "        reload 1s",
            "        no_reverse",
            "    }",
        ]
    else:
        lines += [f"    file {directory / f'db.{zone.origin}'} {{", "        reload 1s", "    }"]
    lines += ["    errors", "}"]
    return "\n".join(lines) + "\n"


def zone_to_json(zone: Zone) -> dict[str, object]:
    return {
        "origin": zone.origin,
        "ttl": zone.ttl,
        "primary": zone.primary,
        "serial": zone.serial,
        "hosts": [[h.label, h.name, [str(a) for a in h.addresses]] for h in zone.hosts],
    }


def zone_from_json(data: dict[str, object]) -> Zone:
    """The inverse of :func:`zone_to_json`; raises KeyError, TypeError or ValueError."""
    hosts = data["hosts"]
    if not isinstance(hosts, list):
        raise TypeError("hosts must be a list")
    return Zone(
        origin=str(data["origin"]),
        ttl=int(str(data["ttl"])),
        primary=str(data["primary"]),
        serial=int(str(data["serial"])),
        hosts=tuple(
            Host(str(label), str(name), tuple(ipaddress.ip_address(a) for a in addrs))
            for label, name, addrs in hosts
        ),
    )
