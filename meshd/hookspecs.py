"""The plugin API of meshd: every hook, when it is called and what it returns.

A plugin is a module or object with functions marked ``@meshd.hookimpl`` whose
names and parameters match the specs below (a plugin may accept a subset of the
parameters). It is registered through the ``meshd.plugins`` entry-point group.
It imports only the package ``meshd`` itself (``from meshd import hookimpl,
ConfigError, AgentAPI``): the types below and the errors a hook raises are all
exported there, and nothing deeper is promised to stay put.

Hooks are synchronous decisions over data already in hand: pluggy does not await,
so an ``async def`` implementation would "answer" with an un-awaited coroutine.
A plugin that needs I/O starts its own task in :func:`meshd_startup` through
``agent.spawn`` and keeps its results ready for the next call.

What ``agent`` (:class:`meshd.AgentAPI`) offers for reporting: ``members``,
``paths`` (the path chosen per peer, as status shows it), ``excluded``,
``engine_stats`` (reconcile passes, operations, their time),
``certificate_expires``, ``plugin_metrics()`` (what :func:`meshd_metrics`
reports) and, awaited in a task, ``peer_stats()`` (WireGuard's handshakes and
bytes) and ``gossip_stats()`` (Serf's queues and counts).

``AgentAPI`` (:mod:`meshd.types`) is what hooks get as ``agent``; besides identity,
network, config, addresses and ``spawn`` it tells ``ca_fingerprint`` (the network
CA's, as LAN adverts carry it) and ``enrol_port`` (``None`` when this node admits
nobody), which the zeroconf plugin advertises.

Calling rules: *firstresult* hooks stop at the first implementation that returns
something other than ``None`` (``tryfirst``/``trylast`` order them; the standard
plugins are ``trylast`` so any installed plugin pre-empts them). Every other hook
calls all implementations and collects their non-None results.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

from meshd import PROJECT

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from ipaddress import IPv4Address, IPv6Address

    import click

    from meshd.types import (
        Admission,
        AgentAPI,
        ConfigView,
        IPNetwork,
        Member,
        MeshAddresses,
        MeshView,
        MetricSample,
        Network,
        NodeIdentity,
        PathChoice,
        PeerConfig,
        PeerPatch,
        RecordExtras,
    )

hookspec = pluggy.HookspecMarker(PROJECT)


@hookspec
def meshd_configure(config: ConfigView) -> None:
    """Validate and read this plugin's own configuration.

    Called once, after the plugin manager is built and before anything starts,
    by every command that loads plugins (the agent, ``meshd plugins``, CLI
    commands). Also called again on SIGHUP with the reloaded configuration.

    :param config: the configuration; ``config.section("name")`` is the plugin's
        ``[plugins.name]`` table.
    :returns: nothing. Raise :class:`meshd.ConfigError` (naming the key)
        to refuse a bad value: the command stops with that message.

    Calling rule: all implementations are called.
    """


@hookspec
def meshd_startup(agent: AgentAPI) -> None:
    """The agent is starting; WireGuard and gossip are about to come up.

    Called once per agent run. Start long-running I/O here with
    ``agent.spawn(coro, name=...)``; do not block.

    Calling rule: all implementations are called; an exception is logged and
    the plugin's other hooks keep being called.
    """


@hookspec
def meshd_shutdown(agent: AgentAPI) -> None:
    """The agent is stopping (SIGTERM, ``meshd leave`` or an error).

    Called once, before the agent's tasks are cancelled. Release what the
    plugin holds (files, sockets). Must return quickly.

    Calling rule: all implementations are called.
    """


@hookspec(firstresult=True)
def meshd_allocate_address(
    network: Network, node: NodeIdentity, taken: frozenset[IPv4Address | IPv6Address]
) -> MeshAddresses | None:
    """Choose this node's mesh address(es) (IPAM).

    Called when a node is created (``init``, ``join``) and again when gossip
    shows another node holding the same address and this node must move.

    :param network: the network and its ranges.
    :param node: this node's name and WireGuard public key.
    :param taken: addresses other members hold; the answer must avoid them.
    :returns: the addresses, or ``None`` to let the next implementation decide.

    Calling rule: firstresult. The standard IPAM plugin is ``trylast``.
    """


@hookspec
def meshd_endpoint_candidates(agent: AgentAPI) -> Sequence[str] | None:
    """Where other nodes may reach this node's WireGuard port.

    Called before each publication of this node's record.

    :returns: ``host:port`` strings (interface addresses, an observed public
        address, a configured endpoint), best first.

    Calling rule: all results are merged in call order, duplicates dropped.
    """


@hookspec
def meshd_node_record(agent: AgentAPI) -> RecordExtras | None:
    """What a plugin adds to this node's published record (roles, routes).

    Called before each publication of this node's record.

    Calling rule: all results are merged: roles and routes are unioned.
    """


@hookspec
def meshd_route_health(agent: AgentAPI, prefix: IPNetwork) -> bool | None:
    """Whether this node can carry traffic for ``prefix`` right now (its LAN side is up).

    Called before each publication of this node's record, for every route the
    ``meshd_node_record`` answers advertise. A route some plugin answers ``False``
    for is left out of the record: every other node stops routing it here and
    fails over to another gateway. A plugin whose check changes its answer calls
    ``agent.refresh()`` so the record is published again.

    :returns: ``False`` when unhealthy, ``True`` or ``None`` otherwise.

    Calling rule: all implementations are called; one ``False`` withdraws the route.
    """


@hookspec(firstresult=True)
def meshd_admit_peer(agent: AgentAPI, member: Member) -> Admission | None:
    """Decide whether a member may become a WireGuard peer (certificates, ACLs).

    Called for every alive or failed member with a decoded record, on every
    reconcile pass (answers must be cheap; cache by ``member.record.version``).

    :returns: an :class:`~meshd.Admission`; ``admit=False`` keeps the
        member out and its ``reason`` is logged once. ``None`` defers.

    Calling rule: firstresult; a member nobody admits is not a peer.
    """


@hookspec
def meshd_peer_config(agent: AgentAPI, member: Member, peer: PeerConfig) -> PeerPatch | None:
    """Shape the WireGuard peer for an admitted member.

    Called for every admitted member on every reconcile pass, with the peer the
    engine computed (its mesh addresses as allowed IPs, its best endpoint).

    :returns: a :class:`~meshd.PeerPatch`: extra allowed IPs (egress
        routes) are added, an endpoint or keepalive replaces the engine's.

    Calling rule: all results are merged in call order.
    """


@hookspec
def meshd_peer_routes(
    agent: AgentAPI, members: Sequence[Member]
) -> Mapping[str, Sequence[IPNetwork]] | None:
    """Prefixes outside the mesh to route to members (gateways, exit nodes).

    Called once per reconcile pass with every admitted member of this pass (the
    current incarnation of each name, alive or failed), before any peer is shaped:
    a choice between several members offering one prefix (a primary gateway) sees
    them all, in this pass's states.

    :param members: the admitted members; ``member.approved_routes`` are the
        prefixes of its record that a CA-signed route grant covers.
    :returns: member name -> prefixes to add to that member's allowed IPs (or
        to its routed relay's); the interface adds a kernel route for each.
        Names that are not admitted members are ignored. A prefix two members
        are given stays with the lower WireGuard key.

    Calling rule: all results are merged (prefixes are unioned per member).
    """


@hookspec
def meshd_extra_peers(agent: AgentAPI) -> Sequence[PeerConfig] | None:
    """WireGuard peers that are no members: plain WireGuard clients a gateway serves.

    Called once per reconcile pass, after the members' peers are computed. Their
    allowed IPs must not overlap a member's (an overlapping prefix stays with the
    lower key, as everywhere).

    :returns: the peers to add (``agent.clients`` has the CA-signed clients).

    Calling rule: all results are concatenated; a key given twice keeps the first.
    """


@hookspec(firstresult=True)
def meshd_select_path(agent: AgentAPI, member: Member) -> PathChoice | None:
    """Reach ``member`` directly or through a relay.

    Called for every admitted member on every reconcile pass.

    :returns: a :class:`~meshd.PathChoice`: ``PathChoice()`` for direct at the
        member's first endpoint; ``endpoint="host:port"`` to aim elsewhere (a LAN
        address, a hole-punched reflexive endpoint, or with ``via`` a relay's
        forwarding port: the relay sees only ciphertext); ``learn=True`` to leave the
        endpoint to WireGuard (the member dials in); ``via`` alone routes the member
        through that member's tunnel (a routed relay, which decrypts);
        ``pair_only=True`` with an endpoint open to this node only (a punched hole),
        which a seed then never hands a joiner to dial. ``label`` and ``reason`` are
        what ``meshd status`` shows. ``None`` defers.

    Calling rule: firstresult.
    """


@hookspec
def meshd_mesh_changed(agent: AgentAPI, view: MeshView) -> None:
    """The WireGuard interface now matches a new desired state.

    Called after every reconcile pass that changed something: the peers on the
    interface, or the members (a member's state, record or certificate verdict; a
    peer learnt at enrolment becomes a member without touching the interface).
    ``view.members`` holds every gossip member with the engine's certificate
    verdict, ``view.peers`` the peers now on the interface. Use it to export DNS,
    metrics or status; do slow work in a task, not here.

    Calling rule: all implementations are called.
    """


@hookspec
def meshd_metrics(agent: AgentAPI) -> Sequence[MetricSample] | None:
    """Figures this plugin adds to the agent's metrics (a relay's forwarded bytes...).

    Called whenever a metrics exporter reads the agent (``agent.plugin_metrics()``:
    the metrics plugin calls it on every scrape or textfile write). Answer from
    counters already in hand; never do I/O here.

    :returns: :class:`~meshd.MetricSample` values; a counter must only grow for the
        agent's lifetime (count what is closed, not only what is open).

    Calling rule: all results are concatenated, in call order.
    """


@hookspec
def meshd_cli(group: click.Group) -> None:
    """Add commands to the ``meshd`` command line.

    Called once when the CLI starts, with the top-level ``click`` group. Add a
    command or a group (``group.add_command(...)``); do not replace existing ones.

    Calling rule: all implementations are called.
    """
