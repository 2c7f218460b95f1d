"""Standard zeroconf plugin: LAN discovery by mDNS (python-zeroconf, through ``meshd``).

Each node advertises ``_meshd._udp`` on its LAN addresses only (IPv4; never the mesh
interface, never loopback) with its network id, its CA's fingerprint, its WireGuard
key and port, and its enrolment port when it admits new machines; never a secret
(:class:`meshd.Advert`). ``meshd join --discover`` finds seeds by these adverts.

It browses too. A member heard on this node's LAN is reached at that LAN address
(``direct (LAN)``), pre-empting the NAT plugin's choice, but only when all of this
holds: the member is certified (its certificate chain leads to the network CA), the
advert names the member's certified WireGuard key, the address with the member's
WireGuard port is an endpoint the member publishes in its own record, and that
address is on one of this machine's own networks (an advert lists the member's
addresses on all its links). So
an advert is a hint that says *which* of a member's own endpoints is on this link
(two sites can both use 192.168.1.0/24: a private address in a record does not say
"same LAN"; an mDNS answer, link-local by nature, does). A forged advert can at
worst aim this node at an endpoint the member itself published; WireGuard talks
there only with the member's certified key, so nobody else gets in. And the path
stays only while it works: a task watches WireGuard's counters, and when this node
has sent for 12 s (plus the persistent keepalive interval) and no authenticated
packet of the member came from that endpoint, the endpoint is left for 60 s
(:func:`judge`); the next advert's, or the NAT plugin's path, takes over.

Configuration (``[plugins.zeroconf]``, every key optional)::

    advertise = true   # publish this node's advert on its LANs
    browse = true      # listen for other members' adverts and use their LAN paths

The zeroconf instance runs in the agent's own event loop (asyncio API) and is made
again when this machine's LAN addresses change (checked every 5 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshd import (
    Advert,
    AgentAPI,
    ConfigError,
    ConfigView,
    IPAddress,
    IPNetwork,
    LanService,
    MdnsError,
    Member,
    PathChoice,
    PeerStats,
    WireGuardError,
    format_host_port,
    hookimpl,
)

log = logging.getLogger("meshd_zeroconf")

ADDRESS_CHECK = 5.0
# mDNS waits this long after the agent starts: importing python-zeroconf and its first
# announcements cost ~0.1 s of CPU, which would otherwise sit between a new node's
# start and its first handshakes (adverts are hints; nothing waits on them).
START_DELAY = 2.0
WATCH_INTERVAL = 2.0
# Once a LAN path has carried the peer's packets it is checked this seldom: every check
# is a full read of WireGuard's peers, and at N=30 one every 2 s on every node was most
# of an idle agent's CPU (bench/mesh_join.py: 0.90 % of a core against 0.57 % without).
CONFIRMED_WATCH = 30.0
SILENT_LIMIT = 12.0  # WireGuard answers data with a keepalive after 10 s at most
RETRY_AFTER = 60.0  # a LAN endpoint that failed is left alone this long
HEARD = "heard on this LAN by mDNS"  # what `meshd status` says of a path this plugin chose
_KEYS = ("advertise", "browse")


def lan_addresses(agent: AgentAPI) -> tuple[IPAddress, ...]:
    """This machine's IPv4 addresses that face a LAN: no mesh, loopback or link-local."""
    mesh = [net for net in (agent.network.cidr4, agent.network.cidr6) if net is not None]
    return tuple(
        address
        for address in agent.local_addresses
        if address.version == 4
        and not (address.is_loopback or address.is_link_local)
        and not any(address in net for net in mesh)
    )


def lan_networks(agent: AgentAPI) -> tuple[IPNetwork, ...]:
    """The networks of :func:`lan_addresses`: the links this machine is on."""
    lan = lan_addresses(agent)
    return tuple(net for net in agent.local_networks if any(a in net for a in lan))


def lan_endpoints(member: Member, advert: Advert, on_link: Sequence[IPNetwork] = ()) -> list[str]:
    """The member's own published endpoints that ``advert`` shows on this LAN (none when
    the member is not certified or the advert names another key).

    An advert lists all the member's LAN addresses, also those of its other links: with
    ``on_link`` (this machine's networks) only the addresses in one of them count. A
    gateway that got a second LAN (192.168.99.1 for a phone) was otherwise reached there
    by its neighbours, "network is unreachable", until the path failed 12 s later (CI
    run nb-2: the gateway missed a client's removal meanwhile).
    """
    record = member.record
    if record is None or not member.certified or advert.public_key != record.public_key:
        return []
    addresses = [a for a in advert.addresses if not on_link or any(a in n for n in on_link)]
    wanted = (format_host_port(address, record.port) for address in addresses)
    return [endpoint for endpoint in wanted if endpoint in record.endpoints]


def choose_lan(
    member: Member,
    adverts: Mapping[str, Advert],
    failed: Mapping[str, float],
    now: float,
    on_link: Sequence[IPNetwork] = (),
) -> PathChoice | None:
    """``direct (LAN)`` to the first endpoint the adverts (by instance name) show for the
    member on this machine's links (``on_link``, when given) that has not failed lately
    (``failed``: endpoint -> retry after); else None."""
    for instance in sorted(adverts):
        for endpoint in lan_endpoints(member, adverts[instance], on_link):
            if failed.get(endpoint, 0.0) <= now:
                return PathChoice(endpoint=endpoint, label="direct (LAN)", reason=HEARD)
    return None


@dataclass(frozen=True)
class Trial:
    """A LAN path under watch since ``since``, with the peer's byte counters then."""

    endpoint: str
    since: float
    tx: int
    rx: int


def silent_limit(stats: PeerStats) -> float:
    """How long this node may send to a peer with nothing back before the path counts
    as failed: SILENT_LIMIT, plus the persistent keepalive when it is on. A keepalive
    is not data and gets no answer, so with only keepalives flowing each side hears
    the other once per interval: an idle pair's 12-s window often held one of ours and
    none of theirs, and a 40-node lab dropped working LAN paths every few minutes."""
    return SILENT_LIMIT + (stats.keepalive or 0)


def judge(trial: Trial | None, endpoint: str, stats: PeerStats, now: float) -> tuple[str, Trial]:
    """Whether the LAN path to a peer works: ``ok``, ``wait`` or ``failed``, and the
    trial to keep. It works when authenticated packets of the peer came from that
    endpoint (WireGuard moves the live endpoint to where they come from); it failed
    when this node kept sending for :func:`silent_limit` s and nothing came back
    (WireGuard answers data with a keepalive within 10 s, and a peer with a persistent
    keepalive sends one at least that often), or for SILENT_LIMIT s while the peer's
    packets came from another endpoint (WireGuard then moved there: a forged advert's
    address is left as soon as the peer's own keepalive arrives). An idle pair proves
    nothing either way: its window starts again."""
    fresh = Trial(endpoint, now, stats.tx_bytes, stats.rx_bytes)
    if trial is None or trial.endpoint != endpoint:
        return "wait", fresh
    heard = stats.rx_bytes > trial.rx
    if heard and stats.endpoint == endpoint:
        return "ok", fresh
    sent = stats.tx_bytes > trial.tx
    if heard and sent and now - trial.since >= SILENT_LIMIT:
        return "failed", trial  # the peer answers, but from elsewhere: WireGuard moved there
    if now - trial.since < silent_limit(stats):
        return "wait", trial
    if sent:
        return "failed", trial
    return "wait", fresh


async def addresses_changed(agent: AgentAPI, addresses: tuple[IPAddress, ...]) -> None:
    """Return once this machine's LAN addresses are no longer ``addresses``."""
    while True:
        await asyncio.sleep(ADDRESS_CHECK)
        if lan_addresses(agent) != addresses:
            return


class ZeroconfPlugin:
    """Settings and what was heard live in the object (two lab hosts never share)."""

    def __init__(self) -> None:
        self.advertise = True
        self.browse = True
        # WireGuard key -> mDNS instance name -> this network's advert for that key
        self.heard: dict[str, dict[str, Advert]] = {}
        # WireGuard key -> (member name, the LAN endpoint select_path gave)
        self.chosen: dict[str, tuple[str, str]] = {}
        self.failed: dict[str, dict[str, float]] = {}  # key -> endpoint -> retry after
        self.trials: dict[str, Trial] = {}
        self.confirmed: dict[str, str] = {}  # key -> the LAN endpoint its packets came from
        self.service: LanService | None = None
        self._agent: AgentAPI | None = None

    @hookimpl
    def meshd_configure(self, config: ConfigView) -> None:
        section: Mapping[str, Any] = config.section("zeroconf")
        settings = {"advertise": True, "browse": True}
        for key, value in section.items():
            where = f"plugins.zeroconf.{key}"
            if key not in _KEYS:
                raise ConfigError(
                    f"unknown key (known keys: {', '.join(_KEYS)})", file=config.path, key=where
                )
            if not isinstance(value, bool):
                raise ConfigError("must be true or false", file=config.path, key=where)
            settings[key] = value
        self.advertise, self.browse = settings["advertise"], settings["browse"]

    @hookimpl
    def meshd_startup(self, agent: AgentAPI) -> None:
        if self.advertise or self.browse:
            self._agent = agent
            agent.spawn(self.run(agent), name="zeroconf")
        if self.browse:
            agent.spawn(self.watch(agent), name="zeroconf-paths")

    @hookimpl
    def meshd_select_path(self, agent: AgentAPI, member: Member) -> PathChoice | None:
        if member.record is None:
            return None
        key = member.record.public_key
        choice = choose_lan(
            member,
            self.heard.get(key, {}),
            self.failed.get(key, {}),
            time.monotonic(),
            lan_networks(agent),
        )
        if choice is None or choice.endpoint is None:
            self.chosen.pop(key, None)
            return None
        self.chosen[key] = (member.name, choice.endpoint)
        return choice

    # --- the task ---------------------------------------------------------------

    def advert(self, agent: AgentAPI, addresses: tuple[IPAddress, ...]) -> Advert:
        return Advert(
            name=agent.identity.name,
            network_id=agent.network.network_id,
            ca_fingerprint=agent.ca_fingerprint,
            public_key=agent.identity.public_key,
            addresses=addresses,
            port=agent.listen_port,
            enrol_port=agent.enrol_port,
        )

    def on_advert(self, instance: str, advert: Advert) -> None:
        agent = self._agent
        if agent is None or advert.public_key == agent.identity.public_key:
            return
        if (advert.network_id, advert.ca_fingerprint) != (
            agent.network.network_id,
            agent.ca_fingerprint,
        ):
            return
        adverts = self.heard.setdefault(advert.public_key, {})
        if adverts.get(instance) != advert:
            log.info("mDNS: %s is on this LAN at %s", advert.name, advert.addresses[0])
            adverts[instance] = advert
            agent.refresh()

    def on_gone(self, instance: str) -> None:
        for key, adverts in list(self.heard.items()):
            advert = adverts.pop(instance, None)
            if advert is None:
                continue
            log.info("mDNS: %s left this LAN", advert.name)
            if not adverts:
                del self.heard[key]
            if self._agent is not None:
                self._agent.refresh()

    async def watch(self, agent: AgentAPI) -> None:
        """Keep a LAN path only while the peer answers there (:func:`judge`): every
        WATCH_INTERVAL while a chosen path has not yet shown the peer's packets, every
        CONFIRMED_WATCH once they all have."""
        last_read = 0.0
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            self.trials = {k: t for k, t in self.trials.items() if k in self.chosen}
            self.confirmed = {
                k: e for k, e in self.confirmed.items() if self.chosen.get(k, ("", ""))[1] == e
            }
            if not self.chosen:
                continue
            on_trial = any(k not in self.confirmed for k in self.chosen)
            if not on_trial and time.monotonic() - last_read < CONFIRMED_WATCH:
                continue
            last_read = time.monotonic()
            try:
                stats = {s.public_key: s for s in await agent.peer_stats()}
            except WireGuardError as exc:
                log.debug("watching LAN paths: %s", exc)
                continue
            now = time.monotonic()
            for key, (name, endpoint) in list(self.chosen.items()):
                if key not in stats:
                    continue
                verdict, self.trials[key] = judge(self.trials.get(key), endpoint, stats[key], now)
                if verdict == "ok":
                    self.confirmed[key] = endpoint
                if verdict == "failed":
                    log.warning(
                        "LAN path to %s at %s: nothing came back in %.0f s; leaving it for %.0f s",
                        name,
                        endpoint,
                        SILENT_LIMIT,
                        RETRY_AFTER,
                    )
                    self.failed.setdefault(key, {})[endpoint] = now + RETRY_AFTER
                    del self.chosen[key], self.trials[key]
                    self.confirmed.pop(key, None)
                    agent.refresh()

    async def run(self, agent: AgentAPI) -> None:
        """Advertise and browse on the LAN addresses; start again when they change."""
        await asyncio.sleep(START_DELAY)
        warned = False
        while True:
            addresses = lan_addresses(agent)
            service = LanService(addresses)
            try:
                if addresses:
                    await service.start()
                    self.service = service
                    if self.browse:
                        await service.browse(self.on_advert, self.on_gone)
                    if self.advertise:
                        await service.advertise(self.advert(agent, addresses))
                    log.info("mDNS on %s", ", ".join(map(str, addresses)))
                    warned = False
                await addresses_changed(agent, addresses)
            except MdnsError as exc:
                (log.debug if warned else log.warning)("mDNS is off for now: %s", exc)
                warned = True
                await asyncio.sleep(ADDRESS_CHECK)
            finally:
                self.service = None
                with contextlib.suppress(Exception):
                    await service.close()
            # Other LAN addresses: what was heard may be of another LAN now.
            if self.heard:
                self.heard.clear()
                agent.refresh()


plugin = ZeroconfPlugin()
"""What the ``meshd.plugins`` entry point registers."""
