"""The frozen values hooks receive and return: the plugin API's vocabulary.

This module and :mod:`meshd.hookspecs` are the plugin API. They import nothing
of the engine, so a plugin that imports them cannot reach into it.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any, Protocol

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network


@dataclass(frozen=True)
class Network:
    """A mesh network: its name, its id (derived from the CA key) and its address ranges."""

    name: str
    network_id: str
    cidr4: IPv4Network
    cidr6: IPv6Network | None = None


@dataclass(frozen=True)
class NodeIdentity:
    """Who a node is: its name and its WireGuard public key (base64, as ``wg`` prints it)."""

    name: str
    public_key: str


@dataclass(frozen=True)
class MeshAddresses:
    """A node's addresses inside the mesh; ``static`` when configured rather than derived
    (a static address wins an address conflict against a derived one)."""

    ipv4: IPv4Address
    ipv6: IPv6Address | None = None
    static: bool = False

    def all(self) -> tuple[IPAddress, ...]:
        return (self.ipv4,) if self.ipv6 is None else (self.ipv4, self.ipv6)


@dataclass(frozen=True)
class NodeRecord:
    """What a node publishes about itself through gossip.

    ``version`` grows with every change so others can tell a new record from a
    replayed old one. ``endpoints`` are ``host:port`` underlay candidates.
    """

    public_key: str
    addresses: tuple[IPAddress, ...]
    port: int
    endpoints: tuple[str, ...] = ()
    roles: frozenset[str] = frozenset()
    routes: tuple[IPNetwork, ...] = ()
    cert: str = ""
    version: int = 0
    # A digest of the revocations the node holds: members that differ exchange them.
    revocations: str = ""


class MemberState(str, enum.Enum):
    """A member's gossip state. ``failed`` may come back; ``left`` and ``reaped`` will not."""

    ALIVE = "alive"
    LEAVING = "leaving"
    LEFT = "left"
    FAILED = "failed"
    REAPED = "reaped"


@dataclass(frozen=True)
class Member:
    """A gossip member with its decoded record (``None`` with ``record_error`` if undecodable).

    ``certified`` is the engine's verdict on the member's certificate chain: it
    leads to the network CA, nothing in it is revoked or expired, and it binds
    the member's name and WireGuard key (``certificate_error`` says why not).
    ``certified_addresses`` are the addresses its certificate binds.
    ``approved_routes`` are the prefixes of its record's ``routes`` that a route
    grant signed by the network CA covers (none unless it is certified): only
    those may be routed to it.

    ``name`` is the node's name, the one its certificate binds and people see;
    ``serf_name`` is its member name in Serf (``name.<key suffix>``, see
    :mod:`meshd.gossip.names`), the one to hand to Serf (a query's node filter).
    A machine that was wiped and joined again under its old name is a new Serf
    member: for a while the view holds both, under one ``name``.
    """

    name: str
    gossip_addr: str
    state: MemberState
    record: NodeRecord | None = None
    record_error: str | None = None
    certified: bool = False
    certificate_error: str | None = None
    certified_addresses: tuple[IPAddress, ...] = ()
    serf_name: str = ""
    approved_routes: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class PeerConfig:
    """The desired configuration of one WireGuard peer."""

    public_key: str
    allowed_ips: tuple[IPNetwork, ...] = ()
    endpoint: str | None = None
    keepalive: int | None = None
    preshared_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Client:
    """A plain WireGuard client (no meshd on it), as the network CA signed it: it dials
    ``gateway`` (a node name) with ``public_key`` and uses ``address`` in the mesh."""

    name: str
    public_key: str
    address: IPAddress
    gateway: str


@dataclass(frozen=True)
class PeerStats:
    """What WireGuard reports of one live peer."""

    public_key: str
    endpoint: str | None
    last_handshake: float | None  # epoch seconds, None: never
    rx_bytes: int = 0
    tx_bytes: int = 0
    keepalive: int | None = None  # persistent keepalive, seconds; None: off


@dataclass(frozen=True)
class PeerPatch:
    """What one plugin adds to a peer: merged by the engine (allowed IPs are unioned)."""

    extra_allowed_ips: tuple[IPNetwork, ...] = ()
    endpoint: str | None = None
    keepalive: int | None = None


@dataclass(frozen=True)
class RecordExtras:
    """What one plugin adds to this node's published record."""

    roles: frozenset[str] = frozenset()
    routes: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class Admission:
    """A plugin's verdict on a member becoming a peer."""

    admit: bool
    reason: str = ""


@dataclass(frozen=True)
class PathChoice:
    """How to reach a peer, and what ``meshd status`` says of it.

    - ``PathChoice()``: the engine's default, directly at the first endpoint the
      member publishes.
    - ``endpoint="host:port"``: directly, or through a *forwarding* relay when
      ``via`` names it: WireGuard sends to that address, the end-to-end session stays
      between the two nodes and the relay sees only ciphertext.
    - ``learn=True``: set no endpoint; WireGuard learns it from the peer's own packets
      (the peer dials in: it is behind a NAT that only it can open).
    - ``via`` without ``endpoint``: a *routed* relay; the member is no peer of its own,
      its addresses ride the relay's peer (the relay decrypts and re-encrypts).
    - ``pair_only=True``: the endpoint lets in this node only (a hole punched for the
      pair). A seed hands a joiner the endpoint of a direct path to dial before gossip
      tells it more (:func:`meshd.agent.seed.dialable`); never one of these, nor a
      relay's port, nor anything to a member that dials in.

    ``label`` is how status shows the path (``direct``, ``direct (LAN)``, ``relay via
    n3``); ``reason`` says why a pair is not direct, or what showed a direct path
    (``heard on this LAN by mDNS``).
    """

    via: str | None = None
    endpoint: str | None = None
    learn: bool = False
    label: str = ""
    reason: str = ""
    pair_only: bool = False


@dataclass(frozen=True)
class EngineStats:
    """What the agent's reconcile loop has done since it started (for metrics).

    ``passes`` counts every pass, ``changing_passes`` those that changed the
    interface, ``operations`` the WireGuard peer and route operations they applied,
    ``pass_seconds`` their total duration. ``last_pass`` is when the last one
    ended (epoch seconds), ``None`` before the first.
    """

    passes: int = 0
    changing_passes: int = 0
    operations: int = 0
    pass_seconds: float = 0.0
    last_pass: float | None = None


@dataclass(frozen=True)
class MetricSample:
    """One figure a plugin adds to the agent's metrics (the ``meshd_metrics`` hook).

    ``name`` is the Prometheus family name, a counter's without the ``_total`` the
    exporter adds (``meshd_relay_forwarded_bytes``); ``kind`` is ``"counter"`` (only
    grows) or ``"gauge"``. Samples of one name share ``help`` and ``kind`` and
    differ by ``labels`` (name, value pairs).
    """

    name: str
    value: float
    help: str = ""
    kind: str = "gauge"
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class MeshView:
    """The mesh as this node sees it after an apply."""

    node: NodeIdentity
    members: tuple[Member, ...]
    peers: tuple[PeerConfig, ...]


@dataclass(frozen=True)
class ConfigView:
    """The parts of the configuration a plugin may read.

    ``sections`` holds every ``[plugins.NAME]`` table of the config file, as read.
    """

    path: str | None
    node_name: str
    state_dir: Path
    sections: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def section(self, plugin: str) -> Mapping[str, Any]:
        """The ``[plugins.<plugin>]`` table, empty when the file has none."""
        return self.sections.get(plugin, {})


class AgentAPI(Protocol):
    """What hooks may use of the running agent: facts to read and ``spawn``. It is a
    small face of the engine (``meshd.agent.runtime.PluginFace``), never the agent."""

    @property
    def identity(self) -> NodeIdentity: ...

    @property
    def network(self) -> Network: ...

    @property
    def config(self) -> ConfigView: ...

    @property
    def listen_port(self) -> int:
        """This node's WireGuard UDP port."""

    @property
    def local_addresses(self) -> tuple[IPAddress, ...]:
        """This machine's own addresses outside the mesh (no loopback, no link-local)."""

    @property
    def local_networks(self) -> tuple[IPNetwork, ...]:
        """The networks of ``local_addresses`` (address and prefix length): what is on
        this machine's links."""

    @property
    def state_dir(self) -> Path:
        """This node's state directory (a plugin may keep files of its own there)."""

    @property
    def members(self) -> tuple[Member, ...]:
        """The gossip members, each with the engine's certificate verdict: those of the pass
        running now when read from a hook it calls (a path choice), else of the last pass."""

    @property
    def clients(self) -> tuple[Client, ...]:
        """The plain WireGuard clients in force (CA-signed, not removed), every gateway's."""

    @property
    def mesh_addresses(self) -> tuple[IPAddress, ...]:
        """This node's own mesh addresses (IPv4 and IPv6)."""

    @property
    def interface(self) -> str:
        """The name of this node's WireGuard interface."""

    @property
    def paths(self) -> Mapping[str, PathChoice]:
        """The path chosen for each member that is a peer, by member name, as of the
        last pass (what ``meshd status`` shows in its PATH column)."""

    @property
    def excluded(self) -> Mapping[str, str]:
        """Members left out of the peers in the last pass, by name, with the reason."""

    @property
    def engine_stats(self) -> EngineStats:
        """What the reconcile loop has done since the agent started."""

    @property
    def certificate_expires(self) -> float:
        """When this node's certificate expires (epoch seconds)."""

    def plugin_metrics(self) -> tuple[MetricSample, ...]:
        """What the plugins' ``meshd_metrics`` hooks report now (a relay's bytes...)."""

    async def gossip_stats(self) -> Mapping[str, Mapping[str, str]]:
        """Serf's ``stats`` now: sections (``agent``, ``runtime``, ``serf``...) of
        name -> value, as Serf prints them (``serf.event_queue``, ``serf.query_queue``,
        ``serf.intent_queue``, ``serf.members``, ``serf.failed``...). Raises
        :class:`meshd.GossipError` when Serf does not answer."""

    @property
    def ca_fingerprint(self) -> str:
        """The network CA key's fingerprint (SHA-256, 32 hex digits), as LAN adverts carry it."""

    @property
    def enrol_port(self) -> int | None:
        """The TCP port this node admits new machines on; ``None`` when enrolment is off."""

    async def peer_stats(self) -> tuple[PeerStats, ...]:
        """What WireGuard reports of each peer now: live endpoint, last handshake, bytes.
        Raises :class:`meshd.WireGuardError` when the device cannot be read."""

    async def set_endpoint(self, public_key: str, endpoint: str) -> None:
        """Aim an existing peer at ``endpoint`` at once (hole punching: WireGuard may have
        moved it back to an older path). The next pass applies the desired state again.
        Raises :class:`meshd.WireGuardError`."""

    async def restart_peer(self, public_key: str, endpoint: str) -> bool:
        """Re-create a peer that has no session, aimed at ``endpoint``, so that the next
        packet into its tunnel starts a handshake at once (WireGuard waits 5 s after any
        attempt, even one that could not leave). A session it had is dropped. False when
        the last pass has no such peer. Raises :class:`meshd.WireGuardError`."""

    async def set_forwarding(self, enabled: bool, masquerade: Sequence[IPNetwork] = ()) -> None:
        """Route for others (a gateway): IP forwarding on and, for traffic from the mesh to
        ``masquerade`` prefixes, source NAT to this node's address, in meshd's own nftables
        table ``inet meshd-gateway``. ``enabled=False`` undoes it all (the sysctls get their
        earlier values back); the agent undoes it when it stops. Repeating the last call
        does nothing. Raises :class:`meshd.MeshdError` (``FirewallError``) on failure."""

    def refresh(self) -> None:
        """Republish this node's record if the plugins' answers changed it, and run a
        pass now (call it when a fact behind ``meshd_node_record``,
        ``meshd_endpoint_candidates`` or ``meshd_select_path`` changed)."""

    def spawn(self, coro: Awaitable[None], *, name: str) -> None:
        """Run ``coro`` in the agent's task group; its failure is logged, not fatal."""
