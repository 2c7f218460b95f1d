"""Standard NAT-traversal plugin: endpoint discovery, hole punching and relays.

Configuration (``[plugins.nat]``, every key optional)::

    public = true    # reachable from outside: observe others' endpoints and relay.
                     # Default: true when this machine has a global address.
    relay = true     # forward WireGuard ciphertext for pairs with no direct path.
                     # Default: = public. Only public nodes relay.
    punch = true     # try hole punching with other cone-NATed members (default true)

How it works: :mod:`meshd_nat.traversal`; the path rules: :mod:`meshd_nat.paths`;
the relay: :mod:`meshd_nat.relay`; the control channel: :mod:`meshd_nat.control`.
Everything travels through gossip (records) and WireGuard: no server.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meshd import (
    AgentAPI,
    ConfigError,
    ConfigView,
    Member,
    MetricSample,
    PathChoice,
    RecordExtras,
    hookimpl,
)
from meshd_nat.traversal import Settings, Traversal

_KEYS = ("public", "relay", "punch")


class NatPlugin:
    """Settings and the running state live in the object (two lab hosts never share)."""

    def __init__(self) -> None:
        self.configured: dict[str, bool] = {}
        self.traversal: Traversal | None = None

    @hookimpl
    def meshd_configure(self, config: ConfigView) -> None:
        section: Mapping[str, Any] = config.section("nat")
        configured: dict[str, bool] = {}
        for key, value in section.items():
            where = f"plugins.nat.{key}"
            if key not in _KEYS:
                raise ConfigError(
                    f"unknown key (known keys: {', '.join(_KEYS)})", file=config.path, key=where
                )
            if not isinstance(value, bool):
                raise ConfigError("must be true or false", file=config.path, key=where)
            configured[key] = value
        self.configured = configured

    def _settings(self, agent: AgentAPI) -> Settings:
        public = self.configured.get("public")
        if public is None:
            public = any(a.is_global for a in agent.local_addresses)
        relay = self.configured.get("relay", public) and public
        return Settings(public=public, relay=relay, punch=self.configured.get("punch", True))

    @hookimpl
    def meshd_startup(self, agent: AgentAPI) -> None:
        self.traversal = Traversal(agent, self._settings(agent))
        agent.spawn(self.traversal.run(), name="nat-traversal")

    @hookimpl
    def meshd_shutdown(self, agent: AgentAPI) -> None:
        if self.traversal is not None:
            self.traversal.close()

    @hookimpl
    def meshd_endpoint_candidates(self, agent: AgentAPI) -> list[str] | None:
        return self.traversal.endpoints() if self.traversal else None

    @hookimpl
    def meshd_node_record(self, agent: AgentAPI) -> RecordExtras | None:
        if self.traversal is None:
            return None
        return RecordExtras(roles=frozenset(self.traversal.roles()))

    @hookimpl
    def meshd_metrics(self, agent: AgentAPI) -> list[MetricSample] | None:
        relay = self.traversal.relay_server if self.traversal else None
        if relay is None:
            return None
        packets, size = relay.forwarded()
        return [
            MetricSample(
                "meshd_relay_forwarded_bytes", size, "Bytes this relay forwarded.", "counter"
            ),
            MetricSample(
                "meshd_relay_forwarded_packets",
                packets,
                "Datagrams this relay forwarded.",
                "counter",
            ),
            MetricSample(
                "meshd_relay_pairs", len(relay.allocations()), "Pairs this relay serves now."
            ),
        ]

    @hookimpl(trylast=True)
    def meshd_select_path(self, agent: AgentAPI, member: Member) -> PathChoice | None:
        return self.traversal.select(member) if self.traversal else None


plugin = NatPlugin()
"""What the ``meshd.plugins`` entry point registers."""
