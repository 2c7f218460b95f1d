"""Standard gateway plugin: routes to prefixes behind a node (egress), with failover.

Configuration (``[plugins.gateway]``, every key optional)::

    routes = ["192.168.50.0/24"]   # prefixes behind this node, advertised in its record
    accept_routes = true           # route to approved prefixes other nodes advertise
    masquerade = true              # traffic from the mesh leaves with this node's address
    health_check = ["192.168.50.1"]  # LAN addresses to ping; while none answers, the
                                   # routes are withdrawn (others fail over)

``meshd route advertise PREFIX`` / ``meshd route withdraw PREFIX`` add and remove
advertised prefixes at run time (kept in ``<state_dir>/gateway.json``; the agent
notices within a second). Other nodes use a prefix only when the network CA
approved it (``meshd route approve NODE PREFIX``, on the CA machine): the engine
gives each member's approved prefixes as ``member.approved_routes``.

Exit nodes: a gateway that advertises ``0.0.0.0/0`` and ``::/0`` (approved like any
route) offers its internet access; a node uses it only after ``meshd exit use
NODE`` (``meshd exit off`` to stop). The engine keeps WireGuard's own packets on
the underlay (policy routing, :mod:`meshd.wireguard.policy`).

A node never routes into the mesh a prefix it advertises itself or one of its
own (non-mesh) addresses is in: it reaches that LAN directly.

Several gateways for one prefix: every node picks the same primary, the alive one
with the lowest WireGuard key (a failed one only when none is alive), and routes
the prefix to it alone. When Serf declares the primary failed, or it stops
answering this node's probes for 2 s (:mod:`meshd_gateway.probe`), the next pass
moves the prefix to the next one. How it works in full: ``docs/gateways.md``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from meshd import (
    AgentAPI,
    Client,
    ConfigError,
    ConfigView,
    IPNetwork,
    Member,
    MemberState,
    MeshdError,
    PeerConfig,
    RecordExtras,
    atomic_write,
    call_agent,
    hookimpl,
)
from meshd_gateway.probe import Prober, ipv4_of

log = logging.getLogger(__name__)

_KEYS = ("routes", "accept_routes", "masquerade", "health_check")
STATE_FILE = "gateway.json"
ROLE = "gateway"
WATCH_INTERVAL = 1.0


def parse_prefix(text: object) -> IPNetwork:
    """A prefix as written by a user; ValueError says what is wrong."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a string")
    return ipaddress.ip_network(text.strip())


def host_prefix(client: Client) -> IPNetwork:
    return ipaddress.ip_network(client.address)


def wg_quick_config(answer: Mapping[str, Any]) -> str:
    """The client's configuration file for wg-quick or a WireGuard app."""
    return (
        "[Interface]\n"
        f"PrivateKey = {answer['private_key']}\n"
        f"Address = {answer['address']}/32\n"
        "\n[Peer]\n"
        f"PublicKey = {answer['gateway_public_key']}\n"
        f"Endpoint = {answer['gateway_endpoint']}\n"
        f"AllowedIPs = {', '.join(answer['allowed_ips'])}\n"
        "PersistentKeepalive = 25\n"
    )


def is_default(prefix: IPNetwork) -> bool:
    return prefix.prefixlen == 0


def primaries(
    members: Sequence[Member],
    exclude: frozenset[IPNetwork] = frozenset(),
    unanswered: frozenset[str] = frozenset(),
) -> dict[IPNetwork, Member]:
    """For each approved prefix, the member that carries it: the same everywhere.

    Alive members before any other, then those that answer this node's probes
    (``unanswered`` names the others), then the lowest WireGuard key. ``exclude``
    are prefixes this node should not route into the mesh (its own).
    """
    chosen: dict[IPNetwork, Member] = {}

    def rank(member: Member) -> tuple[bool, bool, str]:
        assert member.record is not None
        return (
            member.state is not MemberState.ALIVE,
            member.name in unanswered,
            member.record.public_key,
        )

    for member in members:
        if member.record is None:
            continue
        for prefix in member.approved_routes:
            if prefix in exclude or is_default(prefix):  # exit routes: only by choice
                continue
            held = chosen.get(prefix)
            if held is None or rank(member) < rank(held):
                chosen[prefix] = member
    return chosen


class GatewayPlugin:
    """Settings and running state live in the object (two lab hosts never share)."""

    def __init__(self) -> None:
        self.configured: tuple[IPNetwork, ...] = ()
        self.accept_routes = True
        self.masquerade = True
        self.state_dir: Path | None = None
        self.from_file: tuple[IPNetwork, ...] = ()
        self.exit_node: str | None = None
        self._quiet_failure = False
        self.prober: Prober | None = None
        self.health_check: tuple[str, ...] = ()
        self.health: Prober | None = None

    # --- configuration and the state file ------------------------------------

    @hookimpl
    def meshd_configure(self, config: ConfigView) -> None:
        section: Mapping[str, Any] = config.section("gateway")
        routes: list[IPNetwork] = []
        accept, masquerade = True, True
        self.health_check = ()
        for key, value in section.items():
            where = f"plugins.gateway.{key}"
            if key not in _KEYS:
                raise ConfigError(
                    f"unknown key (known keys: {', '.join(_KEYS)})", file=config.path, key=where
                )
            if key == "health_check":
                try:
                    checks = [str(ipaddress.IPv4Address(a)) for a in value]
                except (TypeError, ValueError) as exc:
                    raise ConfigError(
                        f"must be a list of IPv4 addresses: {exc}", file=config.path, key=where
                    ) from None
                self.health_check = tuple(checks)
            elif key == "routes":
                if not isinstance(value, list):
                    raise ConfigError("must be a list of prefixes", file=config.path, key=where)
                for item in value:
                    try:
                        routes.append(parse_prefix(item))
                    except ValueError as exc:
                        raise ConfigError(
                            f"{item!r} is not a prefix: {exc}", file=config.path, key=where
                        ) from None
            elif not isinstance(value, bool):
                raise ConfigError("must be true or false", file=config.path, key=where)
            elif key == "accept_routes":
                accept = value
            else:
                masquerade = value
        self.configured = tuple(dict.fromkeys(routes))
        self.accept_routes, self.masquerade = accept, masquerade
        self.state_dir = config.state_dir
        self._load()

    def _path(self) -> Path:
        if self.state_dir is None:
            raise ConfigError("the gateway plugin is not configured yet")
        return self.state_dir / STATE_FILE

    def _read_file(self) -> tuple[tuple[IPNetwork, ...], str | None]:
        """The routes advertised and the exit node chosen on the command line."""
        try:
            data = json.loads(self._path().read_text(encoding="utf-8"))
            routes = tuple(parse_prefix(p) for p in data.get("routes", []))
            exit_node = data.get("exit")
            return routes, exit_node if isinstance(exit_node, str) else None
        except FileNotFoundError:
            return (), None
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("ignoring %s: %s", self._path(), exc)
            return (), None

    def _load(self) -> None:
        self.from_file, self.exit_node = self._read_file()

    def write_file(self, routes: Sequence[IPNetwork], exit_node: str | None) -> None:
        data = {"routes": [str(p) for p in routes], "exit": exit_node}
        atomic_write(self._path(), json.dumps(data, indent=2) + "\n")
        self.from_file, self.exit_node = tuple(routes), exit_node

    def advertised(self) -> tuple[IPNetwork, ...]:
        return tuple(dict.fromkeys((*self.configured, *self.from_file)))

    # --- the running agent ------------------------------------------------------

    @hookimpl
    def meshd_startup(self, agent: AgentAPI) -> None:
        agent.spawn(self._watch(agent), name="gateway")
        if self.accept_routes:
            self.prober = Prober(agent.refresh)
            agent.spawn(self.prober.run(), name="gateway-probe")
        self.health = Prober(agent.refresh)
        agent.spawn(self.health.run(), name="gateway-health")

    async def _watch(self, agent: AgentAPI) -> None:
        """Follow the state file (``meshd route advertise``) and the configuration (a
        SIGHUP re-reads it), republish when the advertised prefixes change, and keep
        forwarding in line."""
        published, exit_node = self.advertised(), self.exit_node
        while True:
            self._load()
            advertised = self.advertised()
            if advertised != published:
                published = advertised
                log.info("advertised routes now: %s", ", ".join(map(str, advertised)) or "none")
                agent.refresh()
            if self.exit_node != exit_node:
                exit_node = self.exit_node
                log.info("exit node now: %s", exit_node or "none")
                agent.refresh()
            if self.health is not None:
                self.health.watch(self.health_check)  # a SIGHUP may have changed them
            serving = any(c.gateway == agent.identity.name for c in agent.clients)
            try:
                await agent.set_forwarding(
                    bool(advertised) or serving, advertised if self.masquerade else ()
                )
                self._quiet_failure = False
            except MeshdError as exc:
                if not self._quiet_failure:
                    log.warning("cannot set up forwarding for the gateway: %s", exc)
                self._quiet_failure = True
            await asyncio.sleep(WATCH_INTERVAL)

    @hookimpl
    def meshd_node_record(self, agent: AgentAPI) -> RecordExtras | None:
        advertised = self.advertised()
        if not advertised:
            return None
        return RecordExtras(roles=frozenset({ROLE}), routes=advertised)

    @hookimpl
    def meshd_route_health(self, agent: AgentAPI, prefix: IPNetwork) -> bool | None:
        """This gateway's own check: its routes go while no health_check address answers."""
        if self.health is None or not self.health_check or prefix not in self.advertised():
            return None
        return not set(self.health_check) <= self.health.down()

    @hookimpl
    def meshd_peer_routes(
        self, agent: AgentAPI, members: Sequence[Member]
    ) -> dict[str, list[IPNetwork]] | None:
        if not self.accept_routes:
            return None
        # Its own prefixes, and a LAN this machine is on itself, it reaches directly (a
        # route into the mesh would shadow, or replace, the on-link one).
        own = set(self.advertised())
        for prefix in {p for m in members for p in m.approved_routes}:
            if any(a in prefix for a in agent.local_addresses if a.version == prefix.version):
                own.add(prefix)
        unanswered: frozenset[str] = frozenset()
        if self.prober is not None:
            down = self.prober.down()
            unanswered = frozenset(
                m.name for m in members if m.record and ipv4_of(m.record.addresses) in down
            )
        routes: dict[str, list[IPNetwork]] = {}
        chosen = primaries(members, frozenset(own), unanswered)
        for prefix, member in chosen.items():
            routes.setdefault(member.name, []).append(prefix)
        names = {m.name for m in members}
        for client in agent.clients:  # a client's address rides its gateway's tunnel
            if client.gateway in names:
                routes.setdefault(client.gateway, []).append(host_prefix(client))
        for member in members:
            if member.name == self.exit_node:
                exits = [p for p in member.approved_routes if is_default(p)]
                if exits:
                    routes.setdefault(member.name, []).extend(exits)
        if self.prober is not None:
            # Probe every gateway that carries something here, and any that stopped
            # answering (to see it come back).
            self.prober.watch(
                a
                for m in members
                if m.record
                and (m.name in routes or m.name in unanswered)
                and (a := ipv4_of(m.record.addresses))
            )
        return routes

    @hookimpl
    def meshd_extra_peers(self, agent: AgentAPI) -> list[PeerConfig]:
        """The plain WireGuard clients this node is the gateway of (they dial in)."""
        own = agent.identity.name
        return [
            PeerConfig(public_key=c.public_key, allowed_ips=(host_prefix(c),))
            for c in agent.clients
            if c.gateway == own
        ]

    # --- the command line ---------------------------------------------------------

    @hookimpl
    def meshd_cli(self, group: click.Group) -> None:
        group.add_command(self._route_group())
        group.add_command(self._exit_group())
        group.add_command(self._client_group())

    def _client_group(self) -> click.Group:
        plugin = self

        @click.group("client")
        def client_group() -> None:
            """Plain WireGuard clients (phones, laptops) reaching the mesh through a gateway."""

        @client_group.command("add")
        @click.argument("name")
        @click.option("--gateway", metavar="NODE", help="The node it dials (default: this one).")
        @click.option("--qr", is_flag=True, help="Also print the config as a QR code (stderr).")
        def add(name: str, gateway: str | None, qr: bool) -> None:
            """On the CA machine: a key, an address and a CA-signed record for client NAME;
            prints its wg-quick config (it holds the client's private key)."""
            answer = call_agent(plugin._path().parent, "client-add", name=name, gateway=gateway)
            text = wg_quick_config(answer)
            click.echo(text, nl=False)
            if qr:
                import qrcode  # only this command needs it

                # On stderr: stdout stays the config file ("... > phone.conf").
                code = qrcode.QRCode(border=1)
                code.add_data(text)
                code.print_ascii(out=click.get_text_stream("stderr"), invert=True)

        @client_group.command("list")
        def list_clients() -> None:
            """The clients in force: name, address, gateway, whether this node peers with it."""
            status = call_agent(plugin._path().parent, "status")
            for c in status["node"].get("clients", []):
                here = "  (peer here)" if c["peer"] else ""
                click.echo(f"{c['name']}  {c['address']}  via {c['gateway']}{here}")

        @client_group.command("remove")
        @click.argument("name")
        def remove(name: str) -> None:
            """On the CA machine: revoke client NAME's key; every gateway drops it."""
            answer = call_agent(plugin._path().parent, "client-remove", name=name)
            click.echo(f"removed {answer['removed']}")

        return client_group

    def _exit_group(self) -> click.Group:
        plugin = self

        @click.group("exit")
        def exit_group() -> None:
            """Send this node's internet traffic through an exit node of the mesh."""

        @exit_group.command("use")
        @click.argument("node")
        def use(node: str) -> None:
            """Route 0.0.0.0/0 and ::/0 through NODE (it must advertise them, approved
            by the CA). WireGuard's own packets stay on this machine's underlay."""
            node = plugin._node_name(node)
            routes, _ = plugin._read_file()
            plugin.write_file(routes, node)
            click.echo(f"using {node} as the exit node")

        @exit_group.command("off")
        def off() -> None:
            """Stop using an exit node."""
            routes, _ = plugin._read_file()
            plugin.write_file(routes, None)
            click.echo("no exit node")

        return exit_group

    def _node_name(self, node: str) -> str:
        """NODE as a name: a mesh address becomes the name of the member holding it
        (asked of the running agent); a name stays as it is."""
        try:
            address = ipaddress.ip_address(node)
        except ValueError:
            return node
        status = call_agent(self._path().parent, "status")
        for row in status.get("peers", []):
            if str(address) in row.get("addresses", []):
                return str(row["name"])
        raise click.BadParameter(
            f"no member has the mesh address {address}: give the node's name (meshd status)"
        )

    def _route_group(self) -> click.Group:
        plugin = self

        def prefix_argument(value: str) -> IPNetwork:
            try:
                return parse_prefix(value)
            except ValueError as exc:
                raise click.BadParameter(str(exc)) from None

        @click.group()
        def route() -> None:
            """Routes to networks behind mesh nodes (egress gateways)."""

        @route.command("advertise")
        @click.argument("prefix")
        def advertise(prefix: str) -> None:
            """Offer PREFIX (a LAN behind this node) to the mesh; others use it once the
            CA approves it: meshd route approve NODE PREFIX."""
            net = prefix_argument(prefix)
            current, exit_node = plugin._read_file()
            if net not in current:
                plugin.write_file((*current, net), exit_node)
            click.echo(f"advertising {net}")

        @route.command("withdraw")
        @click.argument("prefix")
        def withdraw(prefix: str) -> None:
            """Stop offering PREFIX (only one added by 'route advertise')."""
            net = prefix_argument(prefix)
            current, exit_node = plugin._read_file()
            if net not in current:
                raise click.ClickException(f"{net} is not advertised with 'route advertise'")
            plugin.write_file(tuple(p for p in current if p != net), exit_node)
            click.echo(f"withdrawn {net}")

        @route.command("approve")
        @click.argument("node")
        @click.argument("prefix")
        def approve(node: str, prefix: str) -> None:
            """On the CA machine: let every node route PREFIX to NODE (a signed grant,
            gossiped to all and kept by each)."""
            net = prefix_argument(prefix)
            result = call_agent(plugin._path().parent, "route-approve", name=node, prefix=str(net))
            click.echo(f"approved {result['prefix']} behind {result['node']}")

        return route


plugin = GatewayPlugin()
"""What the ``meshd.plugins`` entry point registers."""
