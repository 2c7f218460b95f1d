"""Presence: this node's record in gossip, and gossip joined to the others.

- :meth:`Presence.record` builds the record (addresses, endpoints from the
  plugins, roles, certificate reference) and :meth:`publish` sets it as Serf tags.
- :meth:`join_loop` asks Serf to join known peers until another member is alive,
  and again whenever this node finds itself alone.
- :meth:`rejoin_loop` notices when this node hears nobody (its mesh interface
  received nothing for ``SILENCE`` seconds: not even an ack of Serf's probes) and
  asks every member it knows, proving it holds its certified key, to take it back
  (:mod:`meshd.pki.rejoin`): the others may all have dropped its peer entry, and
  then its gossip reaches no one. If none of those that took it back still saw it
  alive, Serf starts again as a fresh member (the next name generation,
  :mod:`meshd.gossip.names`) and joins them.
- :meth:`reannounce_loop` publishes the record again while an alive member never
  shook hands with this node (see its docstring), and every ``republish_interval(N)``;
  it also asks every member (alive or failed, or a known peer gossip has not
  described) that never shook hands with it directly to take this node as a peer
  (:meth:`introduce`), and joins the gossip of those that had not heard of it.
- :meth:`greet` asks, at a node's first start, every member its seed named to take it
  as a peer at once (the same datagram), not only once gossip has told them of it.
- :meth:`prune_loop` erases members' superseded Serf incarnations (left or failed
  under an older key or generation, while the name is alive again) from every
  member's list: Serf would keep them for 24 h in every push/pull and poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import operator
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet

from meshd import firewall
from meshd.agent.goodbye import goodbye_port
from meshd.agent.runtime import Gossip, Runtime, bounded
from meshd.b64 import encode_b64
from meshd.desired import STATIC_ROLE
from meshd.errors import FirewallError, GossipError, MeshdError, NetlinkError, RecordError
from meshd.gossip.messages import SerfEvent
from meshd.gossip.names import serf_node_name
from meshd.gossip.record import encode_record
from meshd.gossip.supervisor import SerfAgent, SerfSettings
from meshd.gossip.view import MembershipView, publish_record
from meshd.hostport import format_host_port
from meshd.identity import decode_key
from meshd.netlink import Netlink, watch_addresses
from meshd.node import gossip_address, new_rpc_key
from meshd.pki.rejoin import RejoinTarget, Welcome, ask_to_rejoin
from meshd.pki.token import split_endpoint
from meshd.types import Member, MemberState, NodeRecord

log = logging.getLogger(__name__)

RESYNC_INTERVAL = 5.0
JOIN_RETRY = 2.0
# Serf tries a join's targets one after another, each for up to 10 s (memberlist's TCP
# timeout) when the target's WireGuard does not know this node yet.
JOIN_TIMEOUT_PER_TARGET = 10.0
# Serf tries a join's targets one after another: a few are enough.
JOIN_TARGETS = 8
# A newcomer this node enrolled is passed on, once it is a member here, to this many
# other members at once by a Serf push/pull each (see Presence.spread).
SPREAD_TO = 3
# How long a seed waits for its joiner to become a member before giving up spreading it.
SPREAD_WAIT = 30.0
# Members whose last handshake is at most this old are the ones it is passed on to.
SPREAD_HEARD = 150.0
# An alive member with no WireGuard handshake this long may never have heard of this
# node: announce it again, then less and less often.
UNHEARD_GRACE = 5.0
REANNOUNCE_MAX = 60.0
REPUBLISH_INTERVAL = 60.0
# A heartbeat is a Serf broadcast and a members poll on every other node (no pass: see
# meshd.gossip.view.is_heartbeat), so the interval grows with the mesh: the whole mesh
# sends about one per REPUBLISH_PER_MEMBER seconds at any size, not N a minute.
REPUBLISH_PER_MEMBER = 3.0
# Once every member has shaken hands, the handshakes are read again on a view change,
# for this long after it (until its newcomers are heard or counted unheard), and at
# least this often (they feed "recent handshake", a 150 s window).
HEARD_SETTLE = 3 * UNHEARD_GRACE
HEARD_RECHECK = 15.0
# A changed record is announced again this much later. Serf sends a broadcast a few
# times only (memberlist's retransmit limit: 4 transmissions per member at N <= 9), so a
# member misses a tag update now and then (in 44 runs of the NAT joiner test, 2 of 1,475
# took 10 and 17 s, while tunnels were still forming) and learns it only at a push/pull,
# up to 30 s later.
# The second announcement has the same record: a member that has it runs no pass (Serf
# re-encodes the tags, so it still logs a member update).
ECHO_DELAY = 2.0
# Address events come in bursts (a flush then an add): republish once, after this.
ROAM_SETTLE = 0.1
# Nothing came out of any tunnel for this long: this node hears nobody. Serf probes a
# member every second (every 5 s on "wan") and each probe is answered, so a node that
# others still hear is never silent that long; Serf itself marks members failed one
# probe at a time, tens of seconds for a few.
SILENCE = {"lan": 3.0, "local": 3.0, "wan": 15.0}
SILENCE_POLL = 1.0
# A joiner's first seconds are quiet too: silence counts once it joined, or after this.
SILENCE_AT_START = 30.0
# Their gossip still holds this node's Serf name in a state it comes back from.
_RETURNS_FROM = frozenset({MemberState.ALIVE.value, MemberState.FAILED.value})
REJOIN_TIMEOUT = 2.0
# While nobody answers, ask again after 2, 4, ... up to this many seconds.
REJOIN_BACKOFF_MAX = 30.0
# Members asked per round, all at once (one datagram each).
REJOIN_TARGETS = 32
# At its first start a node asks this many of the members its seed named to take it as
# a peer (Presence.greet): all of them, in any mesh meshd is meant for.
GREET_TARGETS = 1024
# Serf's log tells the view of every member change at once; the poll is the safety net.
VIEW_POLL_INTERVAL = 2.0
# How often prune_loop looks for old incarnations in the last pass's members.
PRUNE_CHECK_INTERVAL = 5.0
# prune_loop's random wait: a broadcast takes about a second to reach everyone, so with
# a wait spread over N/2 s about one member in the mesh speaks.
PRUNE_DELAY_MIN = 5.0
PRUNE_DELAY_PER_MEMBER = 0.5
_GONE = frozenset({MemberState.LEFT, MemberState.FAILED})


def _facts(record: NodeRecord) -> tuple[object, ...]:
    """What others act on in a record: all but its version."""
    return (record.endpoints, record.roles, record.routes, record.addresses, record.cert)


def republish_interval(members: int) -> float:
    """Seconds between two heartbeats of one node in a mesh of ``members`` nodes."""
    return max(REPUBLISH_INTERVAL, REPUBLISH_PER_MEMBER * members)


class Presence:
    """This node's record and its place in gossip."""

    def __init__(self, runtime: Runtime, announce_chain: Callable[[], Awaitable[None]]) -> None:
        self._rt = runtime
        self._announce_chain = announce_chain
        self._version = 0
        self._published_at = 0.0
        self._echo: asyncio.Task[None] | None = None
        self._join_call: asyncio.Task[None] | None = None
        self._introduce_call: asyncio.Task[None] | None = None
        # Serf name generation (meshd.gossip.names): the next one after a re-join.
        self._generation = 0
        self._on_event: Callable[[SerfEvent], None] | None = None

    def record(self) -> NodeRecord:
        """This node's record as it should be published now (a new version each time)."""
        rt = self._rt
        state = rt.state
        extras = rt.plugins.node_record(rt.face)
        roles = set(extras.roles)
        if state.static_address:
            roles.add(STATIC_ROLE)
        self._version = max(self._version + 1, int(time.time() * 1000))
        return fit_record(
            NodeRecord(
                public_key=state.keys.public_key,
                addresses=state.addresses.all(),
                port=rt.config.wireguard.port,
                endpoints=rt.plugins.endpoint_candidates(rt.face),
                roles=frozenset(roles),
                routes=extras.routes,
                cert=rt.own_chain.ref,
                version=self._version,
                revocations=rt.trust.digest(),
            )
        )

    async def publish(self, record: NodeRecord | None = None) -> None:
        """Publish this node's record; a changed one is announced again ECHO_DELAY later."""
        rt = self._rt
        record = record or self.record()
        changed = rt.published is None or _facts(record) != _facts(rt.published)
        await publish_record(rt.gossip.client, record)
        rt.published = record
        self._published_at = time.monotonic()
        log.info(
            "published record v%d: %s at %s",
            record.version,
            ", ".join(map(str, record.addresses)),
            ", ".join(record.endpoints) or "no endpoint",
        )
        if changed:
            if self._echo is not None:
                self._echo.cancel()
            self._echo = rt.tasks.start(self._announce_again(record), name="record-echo")

    async def _announce_again(self, record: NodeRecord) -> None:
        await asyncio.sleep(ECHO_DELAY)
        rt = self._rt
        if rt.published is not record or not rt.has_gossip:
            return  # a newer record went out (and has its own echo), or gossip stopped
        try:
            await publish_record(rt.gossip.client, record)
        except MeshdError as exc:
            log.debug("cannot announce record v%d again: %s", record.version, exc)
            return
        log.debug("announced record v%d again", record.version)

    async def start_gossip(self, on_event: Callable[[SerfEvent], None]) -> None:
        """Start Serf on this node's mesh address, with the record in its first alive message."""
        rt = self._rt
        cfg, state = rt.config, rt.state
        self._on_event = on_event
        record = self.record()
        bind = str(gossip_address(state.addresses.all()))
        targets = self.join_targets(limit=1)
        settings = SerfSettings(
            node_name=serf_node_name(state.name, state.keys.public_key, self._generation),
            state_dir=rt.store.serf_dir,
            # A fresh key every start: one learnt from an old run opens nothing.
            rpc_auth_key=new_rpc_key(),
            bind_addr=bind,
            bind_port=cfg.gossip.port,
            advertise_addr=format_host_port(bind, cfg.gossip.port),
            rpc_addr=cfg.gossip.rpc_addr,
            gossip_keys=(encode_b64(state.gossip_key),),
            profile=cfg.gossip.profile,
            # A member that missed the tag update that would follow would see this node
            # without a record.
            tags=encode_record(record),
            log_level="info" if log.isEnabledFor(logging.DEBUG) else "warn",
            # Serf joins the known peers as it starts, with no RPC round trip first; the
            # join loop below covers whatever this misses.
            extra={"retry_join": targets, "retry_interval": "2s"} if targets else {},
        )
        try:
            await firewall.protect_gossip(
                gossip_address(state.addresses.all()),
                (cfg.gossip.port, goodbye_port(cfg.gossip.port)),
                rt.iface.ifname,
            )
        except FirewallError as exc:
            log.warning("gossip stays reachable from the underlay: %s", exc)
        serf = SerfAgent(settings, serf_binary=cfg.gossip.serf_binary)
        await serf.start()
        rt.tasks.start(serf.supervise(), name="serf")
        client = serf.client()
        await client.connect()
        # No snapshot nudge (a query, so a broadcast, from every node on every change):
        # a restarted agent re-joins from peers.json, not from Serf's snapshot.
        view = MembershipView(
            client, on_event=on_event, poll_interval=VIEW_POLL_INTERVAL, flush_snapshot=False
        )
        rt.gossip = Gossip(serf, client, view)
        rt.tasks.start(view.run(), name="membership")
        # Serf started with the record in its tags: no set_tags now (Serf answers it only
        # once its broadcast went out, seconds while it is still joining).
        rt.published = record
        self._published_at = time.monotonic()

    async def stop_gossip(self, *, leave: bool, timeout: float) -> None:
        """Stop Serf (leaving the mesh gracefully first with ``leave``), within ``timeout``."""
        rt = self._rt
        if not rt.has_gossip:
            return
        gossip = rt.gossip
        # Stop supervising first: a leave ends the Serf agent on purpose.
        await rt.tasks.cancel(rt.tasks.named("serf", "membership", "gossip-join-call"), 0.5)
        if leave:
            await bounded(gossip.client.leave(), "the graceful leave", timeout)
        await bounded(gossip.client.close(), "closing the Serf connection", 0.5)
        await bounded(gossip.serf.stop(), "stopping serf", timeout)
        rt.gossip = None
        rt.joined.clear()

    async def refresh_local_addresses(self) -> None:
        rt = self._rt
        async with Netlink() as nl:
            found = await nl.host_addresses(exclude=[rt.config.wireguard.interface])
        rt.local_addresses = tuple(i.ip for i in found)
        rt.local_networks = tuple(dict.fromkeys(i.network for i in found))

    async def roam_loop(self) -> None:
        """Republish at once when this machine's addresses change (netlink events), or
        when a plugin says its facts changed (``AgentAPI.refresh``).

        Others take the new endpoint from the record; before that, a packet into
        every tunnel reaches each peer from the new address, and WireGuard moves the
        peer's endpoint to where authenticated packets come from.
        """
        rt = self._rt
        moved = asyncio.Event()

        def on_address_event() -> None:
            moved.set()
            rt.record_stale.set()

        watcher = rt.tasks.start(watch_addresses(on_address_event), name="address-watch")
        try:
            while True:
                await rt.record_stale.wait()
                await asyncio.sleep(ROAM_SETTLE)  # one burst of events, one republish
                rt.record_stale.clear()
                try:
                    if moved.is_set():
                        moved.clear()
                        before = rt.local_addresses
                        await self.refresh_local_addresses()
                        if rt.local_addresses != before:
                            log.info(
                                "this machine's addresses changed: %s",
                                ", ".join(map(str, rt.local_addresses)) or "none",
                            )
                            await rt.iface.forget_sources()
                            rt.iface.poke(rt.snapshot.desired.peers)
                    if not rt.has_gossip:
                        continue
                    record = self.record()
                    if rt.published is None or _facts(record) != _facts(rt.published):
                        await self.publish(record)
                except MeshdError as exc:
                    log.warning("cannot republish this node's record: %s", exc)
        finally:
            watcher.cancel()

    def join_targets(self, limit: int = 8) -> list[str]:
        """Known peers, then every member gossip ever showed us: a node that finds itself
        alone (restarted, or wrongly dropped by the others) gets back through any of them.

        The first known peer is the seed that enrolled this node (or a peer of the last
        run): it certainly has a tunnel to us. Serf joins its targets one by one, and one
        that has no tunnel to us yet costs a TCP retransmit (1 s), so start small.
        """
        rt = self._rt
        port = rt.config.gossip.port
        addresses = [p.gossip_addr for p in rt.known if p.gossip_addr]
        others = [m for m in rt.snapshot.others(rt.name) if m.record is not None]
        random.shuffle(others)
        addresses += [str(gossip_address(m.record.addresses)) for m in others if m.record]
        unique = list(dict.fromkeys(addresses))
        return [format_host_port(a, port) for a in unique[:limit]]

    async def join_loop(self) -> None:
        """Ask Serf to join known peers until another member is alive, and again if alone.

        Serf's own ``retry_join`` (the first known peer) goes first; while alone, each
        round here asks twice as many targets as the last, up to JOIN_TARGETS.
        """
        rt = self._rt
        rounds = 0
        while True:
            if not rt.has_gossip:  # restarting on a new address
                await asyncio.sleep(JOIN_RETRY)
                continue
            view = rt.gossip.view

            def others_alive(members: Mapping[str, Member]) -> bool:
                return any(
                    m.state is MemberState.ALIVE and m.name != rt.name for m in members.values()
                )

            if others_alive(view.members):
                rounds = 0
                if not rt.joined.is_set():
                    await self._announce_chain()
                    rt.joined.set()
            elif rt.joined.is_set():
                rt.joined.clear()  # alone again: join anew
            elif rounds and (self._join_call is None or self._join_call.done()):
                targets = self.join_targets(limit=min(2**rounds, JOIN_TARGETS))
                if targets:
                    self._join_call = rt.tasks.start(self._join(targets), name="gossip-join-call")
                rounds += 1
            else:
                rounds += 1
            # Wake as soon as someone answers: READY=1 and the chain announcement wait on it.
            await view.wait_for(lambda m: others_alive(m) != rt.joined.is_set(), JOIN_RETRY)

    async def rejoin_loop(self) -> None:
        """Ask to be taken back whenever this node hears nobody (see the module docstring).

        The mesh interface's packet counter is read every ``SILENCE_POLL`` seconds (one
        netlink request); while nobody takes this node back, it asks again less and
        less often.
        """
        rt = self._rt
        silence = SILENCE[rt.config.gossip.profile]
        count: int | None = None
        started = heard_at = next_at = time.monotonic()
        wait = 0.0
        async with Netlink() as nl:
            while True:
                await asyncio.sleep(SILENCE_POLL)
                now = time.monotonic()
                try:
                    received = await nl.received_packets(rt.iface.ifname)
                except NetlinkError as exc:
                    log.debug("cannot read the mesh interface's counters: %s", exc)
                    continue
                if received != count:
                    count, heard_at, wait = received, now, 0.0
                    continue
                if now - heard_at < silence or now < next_at:
                    continue
                if not rt.joined.is_set() and now - started < SILENCE_AT_START:
                    continue
                if await self.rejoin():
                    heard_at = time.monotonic()  # give the tunnels time to carry gossip
                    continue
                wait = min(max(2 * wait, JOIN_RETRY), REJOIN_BACKOFF_MAX)
                next_at = time.monotonic() + wait

    def rejoin_targets(
        self, limit: int = REJOIN_TARGETS, only: AbstractSet[str] | None = None
    ) -> list[RejoinTarget]:
        """Every member gossip showed (then the known peers), in random order: the host of
        its first WireGuard endpoint and its key; only the keys in ``only`` if given.
        Their re-join port is taken to be this node's own enrolment port (the mesh uses
        one)."""
        rt = self._rt
        found: dict[str, str] = {}
        others = [m for m in rt.snapshot.others(rt.name) if m.record and m.record.endpoints]
        random.shuffle(others)
        for member in others:
            assert member.record is not None
            found.setdefault(member.record.public_key, member.record.endpoints[0])
        for peer in rt.known:
            if peer.endpoint:
                found.setdefault(peer.public_key, peer.endpoint)
        found.pop(rt.state.keys.public_key, None)
        if only is not None:
            found = {key: endpoint for key, endpoint in found.items() if key in only}
        targets = []
        for key, endpoint in list(found.items())[:limit]:
            try:
                host = split_endpoint(endpoint)[0]
                targets.append(RejoinTarget(host, rt.config.enrol.port, decode_key(key)))
            except MeshdError as exc:
                log.debug("cannot ask %s to take this node back: %s", endpoint, exc)
        return targets

    async def rejoin(self) -> bool:
        """Ask every member at once to take this node back; then join those that did,
        as a fresh Serf member unless one of them still holds this node's Serf name
        alive or failed (memberlist brings a failed one back). Whether anyone took it
        back."""
        rt = self._rt
        own = rt.published
        targets = self.rejoin_targets()
        if own is None or not own.endpoints or not targets:
            return False
        key = decode_key(rt.state.keys.private_key)
        try:
            welcomes = await ask_to_rejoin(
                targets, rt.own_chain, key, own.endpoints[0], timeout=REJOIN_TIMEOUT
            )
        except (MeshdError, OSError) as exc:
            log.warning("cannot ask members to take this node back: %s", exc)
            return False
        if not welcomes:
            log.debug("heard nobody; none of %d member(s) asked took this node back", len(targets))
            return False
        takers = self._takers(welcomes)
        log.info(
            "heard nobody: taken back by %s (gossip there: %s)",
            ", ".join(name for name, _ in takers) or f"{len(welcomes)} member(s)",
            ", ".join(sorted({w.known for w in welcomes})),
        )
        if all(w.known not in _RETURNS_FROM for w in welcomes) and rt.has_gossip:
            # Their Serf holds this name as left, or erased it (a forged prune) while
            # memberlist still counts it alive: either way it ignores its return.
            self._generation += 1
            log.info("starting gossip again as a fresh member (generation %d)", self._generation)
            rt.carry_peers()  # the new Serf's view starts empty
            await self.stop_gossip(leave=False, timeout=JOIN_RETRY)
            assert self._on_event is not None
            await self.start_gossip(self._on_event)
        if rt.has_gossip and takers:
            port = rt.config.gossip.port
            joins = [format_host_port(address, port) for _, address in takers]
            await self._join(joins[:JOIN_TARGETS])
        return True

    async def introduce(self, keys: AbstractSet[str]) -> None:
        """Ask the members with ``keys`` (alive or failed here, or known peers gossip has
        not described, and no handshake with this node yet) directly over the underlay
        to take this node as a peer (:mod:`meshd.pki.rejoin`, one datagram each), then
        join the gossip of those that had not heard of it.

        A newcomer is announced by its seed's gossip alone, and a member's broadcast goes
        out a few times only, each piggybacked on a packet to a random member or a probe:
        while the seed's tunnels are still forming (a NAT lab), all of them can go to
        members it cannot reach yet. A member that missed it drops the newcomer's own
        packets (its WireGuard does not know the key) until a push/pull, up to 30 s later.
        Only members this node reaches over the underlay answer (the public ones, behind
        a NAT): once one knows this node, gossip carries it on.
        """
        rt = self._rt
        own = rt.published
        targets = self.rejoin_targets(only=keys)
        if own is None or not own.endpoints or not targets:
            return
        try:
            welcomes = await ask_to_rejoin(
                targets,
                rt.own_chain,
                decode_key(rt.state.keys.private_key),
                own.endpoints[0],
                timeout=REJOIN_TIMEOUT,
            )
        except (MeshdError, OSError) as exc:
            log.debug("cannot introduce this node to its unheard members: %s", exc)
            return
        strangers = [w for w in welcomes if w.known != MemberState.ALIVE.value]
        # A member that is really down answers nothing, and is asked again every minute.
        log.log(
            logging.INFO if welcomes else logging.DEBUG,
            "introduced this node to %d of %d member(s) it never shook hands with; "
            "%d had not seen it alive",
            len(welcomes),
            len(targets),
            len(strangers),
        )
        takers = self._takers(strangers)
        if takers and rt.has_gossip:
            port = rt.config.gossip.port
            await self._join([format_host_port(address, port) for _, address in takers])

    async def greet(self) -> None:
        """A newcomer's first start: ask every member its seed named, directly over the
        underlay, to take it as a peer now (:mod:`meshd.pki.rejoin`, one datagram each).

        Otherwise a member takes the newcomer's packets only once gossip has brought it
        both the newcomer's alive message and its certificate chain: two broadcasts
        that travel on their own, three random members each 200 ms. A member that had
        one of them still waited for the other (160 ms more at N=10 in the bench's
        logs), and the slowest member is what a join waits for. A member that takes the
        request has checked the chain and built its tunnel within milliseconds; gossip
        tells it the rest later. No push/pull follows (as :meth:`introduce` does): each
        member's answer is "absent" at this moment, and once the tunnels stand this
        node's own gossip reaches them. Members this node cannot reach over the
        underlay (behind a NAT) wait for gossip as before.
        """
        rt = self._rt
        own = rt.published
        targets = self.rejoin_targets(limit=GREET_TARGETS)
        if own is None or not own.endpoints or not targets:
            return
        try:
            welcomes = await ask_to_rejoin(
                targets,
                rt.own_chain,
                decode_key(rt.state.keys.private_key),
                own.endpoints[0],
                timeout=REJOIN_TIMEOUT,
            )
        except (MeshdError, OSError) as exc:
            log.info("cannot greet the members at this node's first start: %s", exc)
            return
        log.info(
            "first start: %d of %d member(s) asked took this node as a peer at once",
            len(welcomes),
            len(targets),
        )

    def _takers(self, welcomes: list[Welcome]) -> list[tuple[str, str]]:
        """(name, gossip address) of the members behind ``welcomes``, where known."""
        rt = self._rt
        by_key = rt.snapshot.by_key()
        known = {p.public_key: p for p in rt.known}
        takers = []
        for welcome in welcomes:
            key = encode_b64(welcome.key)
            member, peer = by_key.get(key), known.get(key)
            if member is not None and member.record is not None:
                takers.append((member.name, str(gossip_address(member.record.addresses))))
            elif peer is not None and peer.gossip_addr:
                takers.append((peer.name, peer.gossip_addr))
        return takers

    async def spread(self, key: str) -> None:
        """Pass on a newcomer this node enrolled (WireGuard key ``key``) to ``SPREAD_TO``
        random alive members, as soon as it is a member here.

        The newcomer joins gossip through its seed alone: it has no tunnel to anyone
        else yet (the others drop its packets until they learn its key). From there its
        alive message spreads by gossip, three random members each 200 ms: 0.3-0.9 s to
        reach 40 members in the bench, with a long tail, and each member builds its
        tunnel only then. A Serf push/pull (a join) from the seed to a few members hands
        them the newcomer at once, and each passes it on too. Cost: ``SPREAD_TO``
        push/pulls of the member list per join, from the seed only.
        """
        rt = self._rt
        if not rt.has_gossip:
            return
        view = rt.gossip.view

        def arrived(members: Mapping[str, Member]) -> bool:
            return any(
                m.state is MemberState.ALIVE and m.record is not None and m.record.public_key == key
                for m in members.values()
            )

        if not await view.wait_for(arrived, SPREAD_WAIT):
            return
        own = rt.state.keys.public_key
        newcomer = next(
            m.name for m in view.members.values() if m.record and m.record.public_key == key
        )
        others = [
            m
            for m in view.members.values()
            if m.state is MemberState.ALIVE
            and m.record is not None
            and m.record.public_key not in (key, own)
        ]
        # Through a tunnel that works: a push/pull to a member with none (behind another
        # NAT) would hold the join for Serf's 10-s TCP timeout. Read now: the handshakes
        # the presence loop last read can be 15 s old.
        try:
            stats = await rt.iface.peer_stats()
        except MeshdError as exc:
            log.debug("cannot read the peers' handshakes: %s", exc)
            stats = ()
        now = time.time()
        heard = {p.public_key for p in stats if now - (p.last_handshake or 0) <= SPREAD_HEARD}
        others = [m for m in others if m.record and m.record.public_key in heard] or others
        chosen = random.sample(others, min(SPREAD_TO, len(others)))
        if not chosen:
            return
        port = rt.config.gossip.port
        targets = {
            format_host_port(str(gossip_address(m.record.addresses)), port): m.name
            for m in chosen
            if m.record is not None
        }
        joined = await self._join(list(targets))
        log.info(
            "passed %s on to %s by Serf push/pull (%d of %d answered)",
            newcomer,
            ", ".join(sorted(targets.values())),
            joined,
            len(targets),
        )

    async def _join(self, targets: list[str]) -> int:
        """One Serf join, on an RPC connection of its own; how many targets it joined.

        Serf answers the requests of one connection in order, and a join can take
        ``JOIN_TIMEOUT_PER_TARGET`` seconds per target that does not know this node yet:
        on the shared connection it froze the view, record updates and query answers
        for tens of seconds.
        """
        gossip = self._rt.gossip
        client = gossip.serf.client(
            stream=None,
            reconnect=False,
            timeout=JOIN_TIMEOUT_PER_TARGET * len(targets) + JOIN_RETRY,
        )
        joined = 0
        try:
            await client.connect()
            joined = await client.join(targets)
            log.info("gossip: joined %d of %s", joined, ", ".join(targets))
            gossip.view.poll_now()
        except GossipError as exc:
            log.debug("gossip join of %s failed: %s", targets, exc)
        finally:
            with contextlib.suppress(Exception):
                await client.close()
        return joined

    async def prune_loop(self) -> None:
        """Erase superseded incarnations of members from gossip.

        A machine wiped and joined again comes back under a new Serf name (a new key),
        and one that everybody dropped under a new generation; the old name stays in
        every member's list as left (or failed, and then Serf calls it every 30 s) for
        24 h. In a fleet that rebuilds machines those pile up: a 30-minute soak with a
        wiped re-join every minute held about 50 Serf members for 20 machines, and
        every push/pull and every poll of ``members`` carries them all.

        Once a certified incarnation of a name is alive, a left or failed one under the
        same name can only be an old one (the certificate's name belongs to the live
        one now): one ``force-leave -prune`` erases it everywhere. The machine itself
        cannot send it (its fresh Serf never learns of its old self: memberlist passes
        on no dead node it does not know, Serf keeps a left one only as an intent), so
        whoever sees both does, after a random wait of up to ``prune_delay(N)``: the
        first broadcast reaches everyone in about a second and the others, finding the
        old name gone, send nothing. Left and failed only: an alive one is a live
        machine (a clone, or an impostor), for the trust checks to judge.
        """
        rt = self._rt
        pruned: set[str] = set()
        while True:
            if not rt.has_gossip:
                await asyncio.sleep(JOIN_RETRY)
                continue
            gossip = rt.gossip

            def superseded() -> set[str]:
                return superseded_incarnations(rt.snapshot.members, rt.name) - pruned

            if not superseded():
                # The passes' verdicts (certified or not) are read, not the view: a look
                # at every member every few seconds costs less than a wake-up per pass.
                await asyncio.sleep(PRUNE_CHECK_INTERVAL)
                continue
            await asyncio.sleep(random.uniform(0, prune_delay(len(gossip.view.members))))
            # Re-read after the wait: another member may have erased them meanwhile.
            for serf_name in sorted(superseded() & set(gossip.view.members)):
                pruned.add(serf_name)
                try:
                    await gossip.client.force_leave(serf_name, prune=True)
                except MeshdError as exc:
                    log.debug("cannot erase the old incarnation %s: %s", serf_name, exc)
                    continue
                log.info("erased %s, an old incarnation of a member, from gossip", serf_name)

    async def reannounce_loop(self) -> None:
        """Publish this node's record again while an alive member never shook hands with it.

        A member hears of a newcomer only from third parties: the newcomer's own gossip
        is dropped by the WireGuard of every member that does not know its key yet. Serf
        sends each broadcast a few times only (memberlist's retransmit limit), so a member
        can miss the newcomer's alive message; it then learns of it only at a push/pull
        (every 30 s, with a random partner), and until then the pair has no tunnel. A
        record update is a new alive message, passed on by every member that knows us.

        The handshakes are read every ``RESYNC_INTERVAL / 2`` while a member is unheard
        or the view changed lately; once every member has shaken hands, only on a view
        change or every ``HEARD_RECHECK`` seconds (each read is a full UAPI dump, and an
        idle mesh has nothing new to tell).
        """
        rt = self._rt
        unheard_since: dict[str, float] = {}
        stranger_since: dict[str, float] = {}
        delay, next_at = UNHEARD_GRACE, 0.0
        intro_delay, intro_at = UNHEARD_GRACE, 0.0
        generation, changed_at = -1, time.monotonic()
        while True:
            if (
                unheard_since
                or (stranger_since and intro_delay < REANNOUNCE_MAX)
                or time.monotonic() - changed_at < HEARD_SETTLE
            ):
                await asyncio.sleep(RESYNC_INTERVAL / 2)
            elif rt.has_gossip:
                # A view change replaces the members' snapshot.
                view = rt.gossip.view
                await view.wait_for(functools.partial(operator.is_not, view.members), HEARD_RECHECK)
            else:
                await asyncio.sleep(HEARD_RECHECK)
            if rt.has_gossip and rt.gossip.view.generation != generation:
                generation, changed_at = rt.gossip.view.generation, time.monotonic()
            try:
                stats = {p.public_key: p for p in await rt.iface.peer_stats()}
            except MeshdError as exc:
                log.debug("cannot read the peers' handshakes: %s", exc)
                continue
            rt.handshakes = {
                key: peer.last_handshake for key, peer in stats.items() if peer.last_handshake
            }
            now = time.monotonic()
            snapshot = rt.snapshot
            alive = {
                m.record.public_key: m.name
                for m in snapshot.others(rt.name)
                if m.state is MemberState.ALIVE and m.record
            }
            desired = {p.public_key for p in snapshot.desired.peers}
            handshakes = {key: peer.last_handshake for key, peer in stats.items()}
            unheard_since, unheard = unheard_peers(alive, desired, handshakes, unheard_since, now)
            # A member this node's own probes call failed may just not know this node, nor
            # may a peer its seed named that gossip has not described (the seed's gossip
            # held it as suspect when this node joined, say: Serf passes on no suspect).
            met = {peer.public_key: peer.name for peer in rt.known if peer.endpoint}
            met.update(
                (m.record.public_key, m.name)
                for m in snapshot.others(rt.name)
                if m.state in (MemberState.ALIVE, MemberState.FAILED) and m.record
            )
            stranger_since, strangers = unheard_peers(met, desired, handshakes, stranger_since, now)
            if not strangers:
                intro_delay, intro_at = UNHEARD_GRACE, 0.0
            elif now >= intro_at and (self._introduce_call is None or self._introduce_call.done()):
                names = set(strangers)
                keys = {key for key, name in met.items() if name in names}
                self._introduce_call = rt.tasks.start(self.introduce(keys), name="introduce")
                intro_at = now + intro_delay
                intro_delay = min(intro_delay * 2, REANNOUNCE_MAX)
            if not unheard:
                delay, next_at = UNHEARD_GRACE, 0.0
                if now - self._published_at > republish_interval(len(alive) + 1):
                    # A heartbeat: a member that missed a tag update gets the record again.
                    with contextlib.suppress(MeshdError):
                        await self.publish()
                continue
            if now < next_at:
                continue
            log.info("no handshake yet with %s: announcing this node again", ", ".join(unheard))
            try:
                await self.publish()
            except MeshdError as exc:
                log.warning("cannot publish this node's record again: %s", exc)
            await self._announce_chain()
            next_at = now + delay
            delay = min(delay * 2, REANNOUNCE_MAX)


def prune_delay(members: int) -> float:
    """The longest random wait before erasing an old incarnation (see ``prune_loop``)."""
    return max(PRUNE_DELAY_MIN, PRUNE_DELAY_PER_MEMBER * members)


def superseded_incarnations(members: Iterable[Member], own_name: str) -> set[str]:
    """Serf names of left or failed members whose name a certified alive member holds
    under another Serf name (or this node itself, under ``own_name``)."""
    live: dict[str, set[str]] = {}
    for m in members:
        if m.state is MemberState.ALIVE and m.certified:
            live.setdefault(m.name, set()).add(m.serf_name)
    return {
        m.serf_name
        for m in members
        if m.state in _GONE
        and m.serf_name
        and (m.name == own_name or m.name in live)
        and m.serf_name not in live.get(m.name, ())
    }


def fit_record(record: NodeRecord) -> NodeRecord:
    """``record`` with as many endpoint candidates as fit Serf's tag limit.

    The plugins rank candidates best first, so the last ones go: a host with sixty
    addresses still publishes a record (it used to fail to start).
    """
    endpoints = record.endpoints
    while True:
        candidate = dataclasses.replace(record, endpoints=endpoints)
        try:
            encode_record(candidate)
        except RecordError:
            if not endpoints:
                raise
            endpoints = endpoints[:-1]
            continue
        if len(endpoints) < len(record.endpoints):
            log.debug(
                "record: %d of %d endpoint candidates fit", len(endpoints), len(record.endpoints)
            )
        return candidate


def unheard_peers(
    alive: Mapping[str, str],
    desired: AbstractSet[str],
    handshakes: Mapping[str, float | None],
    since: Mapping[str, float],
    now: float,
    grace: float = UNHEARD_GRACE,
) -> tuple[dict[str, float], list[str]]:
    """Alive members (key -> name) that are desired peers but never shook hands with us.

    Returns when each of them was first seen so (to pass back in as ``since`` next
    time) and the sorted names of those silent for at least ``grace`` seconds.
    """
    silent = {
        key: since.get(key, now) for key in alive if key in desired and handshakes.get(key) is None
    }
    return silent, sorted(alive[key] for key, first in silent.items() if now - first >= grace)
