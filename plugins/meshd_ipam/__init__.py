"""Standard IPAM plugin: a node's mesh address derived from its WireGuard key.

The address is a hash of the public key mapped into the network's range, so
every node computes the same answer for the same key with no coordination; a
static address in ``[plugins.ipam] address = "..."`` wins. When the hash lands
on a taken address the next free one (in hash order) is used.

This plugin is ``trylast``: any installed IPAM plugin pre-empts it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from meshd import ConfigError, ConfigView, MeshAddresses, Network, NodeIdentity, hookimpl

log = logging.getLogger(__name__)


def _host_in(network: IPv4Network | IPv6Network, seed: bytes, attempt: int) -> int:
    digest = hashlib.blake2b(seed + attempt.to_bytes(4, "big"), digest_size=16).digest()
    hosts = network.num_addresses - 2 if network.version == 4 else network.num_addresses - 1
    return 1 + int.from_bytes(digest, "big") % max(hosts, 1)


def derive(
    network: IPv4Network | IPv6Network, seed: bytes, taken: frozenset[Any]
) -> IPv4Address | IPv6Address:
    """The first address in ``network``'s hash order for ``seed`` that is not taken."""
    limit = min(network.num_addresses, 1 << 16)
    for attempt in range(limit):
        candidate = network[_host_in(network, seed, attempt)]
        if candidate not in taken:
            return candidate
    raise ConfigError(f"no free address left in {network}", key="plugins.ipam")


class IpamPlugin:
    """Its static addresses live in the object, not in module globals."""

    def __init__(self) -> None:
        self.static: dict[str, IPv4Address | IPv6Address] = {}

    @hookimpl
    def meshd_configure(self, config: ConfigView) -> None:
        section: Mapping[str, Any] = config.section("ipam")
        static: dict[str, IPv4Address | IPv6Address] = {}
        for key, value in section.items():
            where = f"plugins.ipam.{key}"
            if key not in ("address", "address6"):
                raise ConfigError(
                    "unknown key (known keys: address, address6)", file=config.path, key=where
                )
            try:
                static[key] = ipaddress.ip_address(value)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"must be an IP address, not {value!r}", file=config.path, key=where
                ) from None
        self.static = static

    @hookimpl(trylast=True)
    def meshd_allocate_address(
        self, network: Network, node: NodeIdentity, taken: frozenset[Any]
    ) -> MeshAddresses:
        seed = node.public_key.encode()
        static = self.static.get("address")
        if static is not None and static in taken:
            # Another node keeps it (a conflict this node lost): fall back to a derived one.
            log.warning("static address %s is taken by another node; deriving one", static)
            static = None
        v4 = static or derive(network.cidr4, seed, taken)
        v6 = self.static.get("address6")
        if v6 is not None and v6 in taken:
            v6 = None
        if v6 is None and network.cidr6 is not None:
            v6 = derive(network.cidr6, seed, taken)
        return MeshAddresses(ipv4=v4, ipv6=v6, static=static is not None)  # type: ignore[arg-type]


plugin = IpamPlugin()
"""What the ``meshd.plugins`` entry point registers."""
