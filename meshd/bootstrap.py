"""Use cases that make a node, without click: create a network, join one.

The CLI (:mod:`meshd.commands`) reads options, calls these and prints; these
check their input (raising :class:`~meshd.errors.InputError` that names the
option), do the work, and return what was made. Nothing is written to the state
directory unless the whole use case succeeded.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshd.config import Config
from meshd.errors import DecodeError, EnrolError, EnrolRefused, InputError, MeshdError, StateError
from meshd.hostport import format_host_port, parse_host_port
from meshd.identity import WireGuardKeyPair
from meshd.node import (
    KnownPeer,
    NodeState,
    NodeStore,
    gossip_address,
    host_prefixes,
    ula_prefix,
)
from meshd.pki.ca import NetworkCA
from meshd.pki.certificate import CertChain
from meshd.pki.token import Seed, Token, create_token, split_endpoint
from meshd.plugins import PluginHost
from meshd.types import IPAddress, MeshAddresses, Network, NodeIdentity

MAX_ADDRESS_RETRIES = 4
_DURATION_RE = re.compile(r"^(\d+)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}

Report = Callable[[str], None]


def parse_duration(text: str, *, option: str = "--ttl") -> int:
    """``90``, ``30m``, ``24h``, ``7d`` as seconds."""
    match = _DURATION_RE.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise InputError(f"{text!r} is not a duration like 30m, 24h or 7d", option=option)
    return int(match.group(1)) * _UNITS[match.group(2)]


def check_endpoint(value: str | None, *, option: str = "--endpoint") -> str | None:
    if value is not None:
        try:
            split_endpoint(value)
        except MeshdError as exc:
            raise InputError(str(exc), option=option) from None
    return value


def lan_addresses(config: Config) -> tuple[IPAddress, ...]:
    """This machine's addresses outside the mesh (no loopback, no link-local)."""
    from meshd.netlink import Netlink  # pyroute2 is heavy; only init/join need it

    async def listed() -> tuple[IPAddress, ...]:
        async with Netlink() as nl:
            found = await nl.host_addresses(exclude=[config.wireguard.interface])
        return tuple(iface.ip for iface in found)

    return asyncio.run(listed())


def discover_seeds(
    config: Config, token: Token, *, timeout: float, report: Report
) -> list[tuple[str, int]]:
    """Seeds of the token's network heard by mDNS on this machine's LANs, in the order
    heard (hints: the enrolment checks each seed's certificate against the token's CA).
    EnrolError when none answered within ``timeout`` s."""
    from meshd.mdns import ca_fingerprint, find_seeds

    addresses = [a for a in lan_addresses(config) if a.version == 4]
    if not addresses:
        raise EnrolError("--discover: this machine has no IPv4 LAN address to look on")
    report(
        f"looking for a seed of network {token.network_name} ({token.network_id}) on "
        f"{', '.join(map(str, addresses))} for up to {timeout:g} s"
    )
    found = asyncio.run(
        find_seeds(
            addresses,
            token.network_id,
            ca_fingerprint(token.ca_public_key),
            timeout=timeout,
            report=report,
        )
    )
    if not found:
        raise EnrolError(
            f"no seed of network {token.network_name} ({token.network_id}) answered on the "
            f"LAN within {timeout:g} s; give a seed's address: meshd join SEED-HOST"
        )
    return [
        (str(address), advert.enrol_port)
        for advert in found
        if advert.enrol_port is not None
        for address in advert.addresses
    ]


def local_endpoint(config: Config) -> str:
    """This machine's first IPv4 address outside the mesh, with the WireGuard port."""
    from meshd.netlink import Netlink  # pyroute2 is heavy; only init/join need it

    async def first() -> str | None:
        async with Netlink() as nl:
            found = await nl.host_addresses(exclude=[config.wireguard.interface])
        for iface in found:
            if iface.version == 4:
                return format_host_port(iface.ip, config.wireguard.port)
        return None

    endpoint = asyncio.run(first())
    if endpoint is None:
        raise InputError("this machine has no usable address: give one", option="--endpoint")
    return endpoint


def allocate(
    plugins: PluginHost,
    network: Network,
    node: NodeIdentity,
    static: str | None,
    taken: frozenset[Any],
) -> MeshAddresses:
    """This node's mesh addresses: ``static`` (checked) or what the IPAM plugins offer."""
    if static is not None:
        try:
            address = ipaddress.IPv4Address(static)
        except ValueError:
            raise InputError(f"{static!r} is not an IPv4 address", option="--address") from None
        if address not in network.cidr4:
            raise InputError(
                f"{address} is outside the network's range {network.cidr4}", option="--address"
            )
        if address in taken:
            raise InputError(f"{address} is already used by a seed", option="--address")
        derived = plugins.allocate_address(network, node, taken)
        return MeshAddresses(ipv4=address, ipv6=derived.ipv6 if derived else None, static=True)
    found = plugins.allocate_address(network, node, taken)
    if found is None:
        raise StateError("no IPAM plugin offered an address (is the ipam plugin disabled?)")
    return found


def _node(
    network: Network,
    ca_public_key: bytes,
    identity: NodeIdentity,
    keys: WireGuardKeyPair,
    addresses: MeshAddresses,
    chain: CertChain,
    gossip_key: bytes,
) -> NodeState:
    return NodeState(
        network=network,
        ca_public_key=ca_public_key,
        name=identity.name,
        keys=keys,
        addresses=addresses,
        chain=chain.encode(),
        gossip_key=gossip_key,
        static_address=addresses.static,
    )


@dataclass(frozen=True)
class Created:
    node: NodeState
    token: Token


def create_network(
    config: Config,
    plugins: PluginHost,
    *,
    network_name: str,
    cidr: str,
    ipv6: bool,
    address: str | None,
    endpoint: str | None,
    token_ttl: int,
) -> Created:
    """A new network with this machine as its first member, stored; and its first token."""
    store = NodeStore(config.state_dir)
    if store.exists():
        raise StateError(f"{store.dir} already holds a node; use another --state-dir")
    try:
        cidr4 = ipaddress.IPv4Network(cidr)
    except ValueError as exc:
        raise InputError(str(exc), option="--cidr") from None
    if cidr4.prefixlen > 30:
        raise InputError("the range must hold more than two hosts", option="--cidr")
    ca = NetworkCA.generate(network_name)
    network = Network(
        name=network_name,
        network_id=ca.network_id,
        cidr4=cidr4,
        cidr6=ula_prefix(ca.network_id) if ipv6 else None,
    )
    keys = WireGuardKeyPair.generate()
    name = config.node.name
    identity = NodeIdentity(name, keys.public_key)
    addresses = allocate(plugins, network, identity, address, frozenset())
    seed_endpoint = check_endpoint(endpoint) or local_endpoint(config)
    cert = ca.issue_node_cert(name, keys.public_key, addresses.all())
    node = _node(network, ca.public_key, identity, keys, addresses, CertChain(cert), os.urandom(32))
    token = create_token(
        ca,
        gossip_key=node.gossip_key,
        cidr4=network.cidr4,
        cidr6=network.cidr6,
        seeds=[Seed(seed_endpoint, config.enrol.port, keys.public_key, addresses.ipv4)],
        ttl=token_ttl,
    )
    store.create(node, ca_secret=ca.secret)
    return Created(node, token)


def seed_targets(seed: str | None, token: Token, enrol_port: int) -> list[tuple[str, int]]:
    """Where to enrol: ``seed`` (``HOST``, ``HOST:PORT``, ``[V6]:PORT``) or the token's seeds."""
    if seed is None:
        return [(s.enrol_host, s.enrol_port) for s in token.seeds]
    try:
        return [parse_host_port(seed)]
    except DecodeError:
        pass
    try:
        return [parse_host_port(format_host_port(seed.strip("[]"), enrol_port))]
    except DecodeError as exc:
        raise InputError(f"{seed!r} is not HOST or HOST:PORT ({exc})", option="SEED") from None


@dataclass(frozen=True)
class Joined:
    node: NodeState
    seed_name: str


def join_network(
    config: Config,
    plugins: PluginHost,
    token: Token,
    *,
    seed: str | None,
    address: str | None,
    endpoint: str | None,
    report: Report,
    targets: list[tuple[str, int]] | None = None,
) -> Joined:
    """Enrol through ``seed`` (or ``targets``, e.g. discovered; or the token's seeds) and
    store the new node and its peers; the targets are tried in order.

    A seed that finds the chosen address taken says which; another one is taken and
    the request made again (``report`` tells the user), up to MAX_ADDRESS_RETRIES.
    """
    from meshd.pki.enrol import enrol

    store = NodeStore(config.state_dir)
    if store.exists():
        raise StateError(f"{store.dir} already holds a node; use another --state-dir")
    network = token.network
    keys = WireGuardKeyPair.generate()
    name = config.node.name
    identity = NodeIdentity(name, keys.public_key)
    taken: set[Any] = {s.address for s in token.seeds}
    addresses = allocate(plugins, network, identity, address, frozenset(taken))
    own_endpoint = check_endpoint(endpoint) or local_endpoint(config)

    errors: list[str] = []
    tries = targets if targets is not None else seed_targets(seed, token, config.enrol.port)
    for host, port in tries:
        if targets is not None:
            report(f"trying seed {format_host_port(host, port)}")
        for _ in range(MAX_ADDRESS_RETRIES):
            cert = token.enrolment.sign_node_cert(name, keys.public_key, addresses.all())
            try:
                result = asyncio.run(enrol(host, port, token, cert, own_endpoint))
            except EnrolRefused as exc:
                if exc.taken is None:
                    errors.append(str(exc))
                    break
                try:
                    taken.add(ipaddress.ip_address(exc.taken))
                except ValueError:
                    errors.append(str(exc))
                    break
                addresses = allocate(plugins, network, identity, None, frozenset(taken))
                report(f"{exc.reason}; using {addresses.ipv4} instead")
                continue
            except EnrolError as exc:
                errors.append(str(exc))
                break
            chain = CertChain(cert, (token.enrolment.cert,))
            node = _node(
                network, token.ca_public_key, identity, keys, addresses, chain, token.gossip_key
            )
            store.create(node)
            store.save_peers(
                [
                    KnownPeer(
                        name=p.name,
                        public_key=p.public_key,
                        allowed_ips=host_prefixes(p.addresses),
                        endpoint=p.endpoint,
                        gossip_addr=str(gossip_address(p.addresses)),
                        chain=p.chain.encode(),
                    )
                    for p in (result.seed, *result.members)
                    if p.public_key != keys.public_key
                ]
            )
            return Joined(node, result.seed.name)
    raise EnrolError("; ".join(errors) or "the token names no seed: give SEED-HOST")
