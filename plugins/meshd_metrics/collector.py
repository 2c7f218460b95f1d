"""What the agent knows, read once per scrape, and the Prometheus metrics made of it.

:func:`gather` reads the agent (:class:`meshd.AgentAPI`) at scrape time into
:class:`Facts`; :func:`families` turns facts into metric families, purely, and
:class:`FactsCollector` is the ``prometheus_client`` collector that yields them.
Nothing updates a gauge on an event: a scrape sees the agent as it is.

Metrics (all prefixed ``meshd_``):

- ``peers{path}``: other members by the kind of path to them
  (``direct``, ``lan``, ``relay``, ``down``: :func:`meshd.path_kind`);
- ``peer_handshake_age_seconds{peer}``, ``peer_receive_bytes_total{peer}``,
  ``peer_transmit_bytes_total{peer}``: WireGuard's view of each peer;
- ``members{state}``: gossip members (this node included) by Serf state;
- ``reconcile_passes_total``, ``reconcile_changing_passes_total``,
  ``reconcile_operations_total``, ``reconcile_duration_seconds_total``,
  ``reconcile_last_pass_timestamp_seconds``;
- ``certificate_expiry_timestamp_seconds``;
- ``gossip_up``, ``gossip_queue_depth{queue}`` (Serf's event, query and intent
  queues), ``gossip_health_score`` (memberlist's awareness: 0 is healthy);
- whatever plugins report through the ``meshd_metrics`` hook: the NAT plugin's
  ``relay_forwarded_bytes_total``, ``relay_forwarded_packets_total`` and
  ``relay_pairs`` on a relay. A plugin's sample whose name is not a valid metric
  name, or is one of the above, is left out.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from meshd import (
    AgentAPI,
    EngineStats,
    GossipError,
    Member,
    MemberState,
    MetricSample,
    PathChoice,
    PeerStats,
    WireGuardError,
    path_kind,
)

log = logging.getLogger(__name__)

KINDS = ("direct", "lan", "relay", "down")
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
SERF_QUEUES = ("event", "query", "intent")


@dataclass(frozen=True)
class Facts:
    """The agent as one scrape sees it."""

    node: str
    now: float
    members: tuple[Member, ...] = ()
    paths: Mapping[str, PathChoice] = field(default_factory=dict)
    excluded: Mapping[str, str] = field(default_factory=dict)
    peers: tuple[PeerStats, ...] = ()
    engine: EngineStats = field(default_factory=EngineStats)
    certificate_expires: float = 0.0
    gossip: Mapping[str, Mapping[str, str]] | None = None  # None: Serf did not answer
    extra: tuple[MetricSample, ...] = ()  # what plugins report (meshd_metrics hook)


async def gather(agent: AgentAPI) -> Facts:
    """Read the agent now; WireGuard or Serf not answering leaves their part empty."""
    peers: tuple[PeerStats, ...] = ()
    with contextlib.suppress(WireGuardError):
        peers = await agent.peer_stats()
    gossip = None
    with contextlib.suppress(GossipError):
        gossip = await agent.gossip_stats()
    return Facts(
        node=agent.identity.name,
        now=time.time(),
        members=agent.members,
        paths=dict(agent.paths),
        excluded=dict(agent.excluded),
        peers=peers,
        engine=agent.engine_stats,
        certificate_expires=agent.certificate_expires,
        gossip=gossip,
        extra=agent.plugin_metrics(),
    )


def current_members(members: Iterable[Member]) -> list[Member]:
    """One member per name (a machine that joined again leaves its old incarnation in
    gossip for a while): the alive one, else the one with the newest record."""
    chosen: dict[str, Member] = {}

    def rank(m: Member) -> tuple[bool, int]:
        return (m.state is MemberState.ALIVE, m.record.version if m.record else -1)

    for member in members:
        held = chosen.get(member.name)
        if held is None or rank(member) > rank(held):
            chosen[member.name] = member
    return sorted(chosen.values(), key=lambda m: m.name)


@dataclass(frozen=True)
class PeerView:
    """One other member as this node sees it: the pair's kind and WireGuard's figures."""

    name: str
    state: str
    kind: str
    label: str
    addresses: tuple[str, ...]
    endpoint: str | None
    last_handshake: float | None
    rx_bytes: int
    tx_bytes: int


def peer_views(facts: Facts) -> list[PeerView]:
    """Every other member (current incarnation), with its path kind and live figures."""
    live = {p.public_key: p for p in facts.peers}
    current = current_members(facts.members)
    keys = {m.name: m.record.public_key for m in current if m.record}
    views = []
    for member in current:
        if member.name == facts.node:
            continue
        path = facts.paths.get(member.name)
        stats = live.get(keys.get(member.name, ""))
        session = stats
        if session is None and path is not None and path.via:
            # A routed relay: the member rides the relay's peer and its session.
            session = live.get(keys.get(path.via, ""))
        peer = session is not None and member.name not in facts.excluded
        label = (path.label if path else "") or ("direct" if peer else "")
        excluded = facts.excluded.get(member.name)
        views.append(
            PeerView(
                name=member.name,
                state=member.state.value,
                kind=path_kind(
                    state=member.state.value,
                    peer=peer,
                    label=label,
                    via=path.via if path else None,
                    excluded=excluded,
                    last_handshake=session.last_handshake if session else None,
                    now=facts.now,
                ),
                label=f"excluded: {excluded}" if excluded else label,
                addresses=tuple(str(a) for a in member.record.addresses) if member.record else (),
                endpoint=stats.endpoint if stats else None,
                last_handshake=session.last_handshake if session else None,
                rx_bytes=stats.rx_bytes if stats else 0,
                tx_bytes=stats.tx_bytes if stats else 0,
            )
        )
    return views


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def families(facts: Facts) -> Iterator[Metric]:
    """The metric families of one scrape (see the module docstring)."""
    views = peer_views(facts)
    by_kind = GaugeMetricFamily("meshd_peers", "Other members by path kind.", labels=["path"])
    for kind in KINDS:
        by_kind.add_metric([kind], sum(1 for v in views if v.kind == kind))
    yield by_kind

    age = GaugeMetricFamily(
        "meshd_peer_handshake_age_seconds",
        "Seconds since the last WireGuard handshake with the peer.",
        labels=["peer"],
    )
    rx = CounterMetricFamily(
        "meshd_peer_receive_bytes", "Bytes received from the peer.", labels=["peer"]
    )
    tx = CounterMetricFamily(
        "meshd_peer_transmit_bytes", "Bytes sent to the peer.", labels=["peer"]
    )
    for view in views:
        if view.last_handshake is not None:
            age.add_metric([view.name], max(0.0, facts.now - view.last_handshake))
        if view.endpoint is not None or view.rx_bytes or view.tx_bytes:
            rx.add_metric([view.name], view.rx_bytes)
            tx.add_metric([view.name], view.tx_bytes)
    yield from (age, rx, tx)

    members = GaugeMetricFamily(
        "meshd_members", "Gossip members (this node included) by state.", labels=["state"]
    )
    for state in MemberState:
        members.add_metric([state.value], sum(1 for m in facts.members if m.state is state))
    yield members

    engine = facts.engine
    yield CounterMetricFamily(
        "meshd_reconcile_passes", "Reconcile passes run.", value=engine.passes
    )
    yield CounterMetricFamily(
        "meshd_reconcile_changing_passes",
        "Reconcile passes that changed the WireGuard interface.",
        value=engine.changing_passes,
    )
    yield CounterMetricFamily(
        "meshd_reconcile_operations",
        "WireGuard peer and route operations applied.",
        value=engine.operations,
    )
    yield CounterMetricFamily(
        "meshd_reconcile_duration_seconds",
        "Time spent in reconcile passes.",
        value=engine.pass_seconds,
    )
    if engine.last_pass is not None:
        yield GaugeMetricFamily(
            "meshd_reconcile_last_pass_timestamp_seconds",
            "When the last reconcile pass ended.",
            value=engine.last_pass,
        )
    yield GaugeMetricFamily(
        "meshd_certificate_expiry_timestamp_seconds",
        "When this node's certificate expires.",
        value=facts.certificate_expires,
    )

    serf = (facts.gossip or {}).get("serf", {})
    yield GaugeMetricFamily(
        "meshd_gossip_up",
        "1 when Serf answered this scrape.",
        value=float(facts.gossip is not None),
    )
    queues = GaugeMetricFamily("meshd_gossip_queue_depth", "Serf's queue depths.", labels=["queue"])
    for queue in SERF_QUEUES:
        depth = _number(serf.get(f"{queue}_queue"))
        if depth is not None:
            queues.add_metric([queue], depth)
    yield queues
    health = _number(serf.get("health_score"))
    if health is not None:
        yield GaugeMetricFamily(
            "meshd_gossip_health_score",
            "Memberlist's awareness score: 0 is healthy, higher is a slow node.",
            value=health,
        )


def plugin_families(samples: Iterable[MetricSample], taken: set[str]) -> Iterator[Metric]:
    """The plugins' samples as families: one per name, its first sample's kind and help."""
    found: dict[str, Metric] = {}
    for sample in samples:
        kind = "counter" if sample.kind == "counter" else "gauge"
        name = sample.name.removesuffix("_total") if kind == "counter" else sample.name
        valid = _METRIC_NAME.fullmatch(name) and all(
            _LABEL_NAME.fullmatch(k) for k, _ in sample.labels
        )
        if not valid or name in taken:
            log.debug("metrics: left out a plugin's sample %r", sample)
            continue
        family = found.setdefault(name, Metric(name, sample.help or name, kind))
        suffix = "_total" if family.type == "counter" else ""
        family.add_sample(name + suffix, dict(sample.labels), float(sample.value))
    yield from found.values()


class FactsCollector(Collector):
    """A collector over one scrape's facts."""

    def __init__(self, facts: Facts) -> None:
        self._facts = facts

    def collect(self) -> Iterable[Metric]:
        own = list(families(self._facts))
        return [*own, *plugin_families(self._facts.extra, {m.name for m in own})]


def exposition(facts: Facts) -> bytes:
    """The text exposition format (what ``/metrics`` serves and the textfile holds)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FactsCollector(facts))
    return generate_latest(registry)
