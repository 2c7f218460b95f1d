"""Standard endpoints plugin: where other nodes can reach this node's WireGuard port.

Candidates, best first: the endpoints configured in ``[plugins.endpoints]
advertise = ["host:port", ...]``, then every address of this machine outside
the mesh (loopback and link-local left out), with the WireGuard port. Set
``local = false`` to publish only the configured ones (a machine whose local
addresses are useless to others).

``trylast``: a NAT-traversal plugin's observed public endpoints come first.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from meshd import (
    AgentAPI,
    ConfigError,
    ConfigView,
    DecodeError,
    format_host_port,
    hookimpl,
    parse_host_port,
)


class EndpointsPlugin:
    """Its settings live in the object: two hosts (or two tests) never share them."""

    def __init__(self) -> None:
        self.advertise: tuple[str, ...] = ()
        self.local = True

    @hookimpl
    def meshd_configure(self, config: ConfigView) -> None:
        section: Mapping[str, Any] = config.section("endpoints")
        advertise: tuple[str, ...] = ()
        local = True
        for key, value in section.items():
            where = f"plugins.endpoints.{key}"
            if key == "advertise":
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ConfigError(
                        'must be a list of "host:port" strings', file=config.path, key=where
                    )
                for endpoint in value:
                    try:
                        parse_host_port(endpoint)
                    except DecodeError as exc:
                        raise ConfigError(f"{exc}", file=config.path, key=where) from None
                advertise = tuple(value)
            elif key == "local":
                if not isinstance(value, bool):
                    raise ConfigError("must be true or false", file=config.path, key=where)
                local = value
            else:
                raise ConfigError(
                    "unknown key (known keys: advertise, local)", file=config.path, key=where
                )
        self.advertise, self.local = advertise, local

    @hookimpl(trylast=True)
    def meshd_endpoint_candidates(self, agent: AgentAPI) -> list[str]:
        found = list(self.advertise)
        if self.local:
            mesh = [agent.network.cidr4, agent.network.cidr6]
            usable = [
                address
                for address in agent.local_addresses
                if not any(net is not None and address in net for net in mesh)
                # ULAs are rarely reachable from other sites; keep lists short
                and not (isinstance(address, ipaddress.IPv6Address) and address.is_private)
            ]
            # Best first (the record keeps what fits, from the front): public before
            # private, IPv4 before IPv6; the kernel's order otherwise.
            usable.sort(key=lambda a: (not a.is_global, a.version))
            found.extend(format_host_port(address, agent.listen_port) for address in usable)
        return found


plugin = EndpointsPlugin()
"""What the ``meshd.plugins`` entry point registers."""
