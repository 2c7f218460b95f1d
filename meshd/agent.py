"""The agent: what ``meshd agent`` (and the service) runs on every machine.

One direction, level-triggered::

    gossip (Serf) -> membership view -> desired peers (pure, plus hooks)
        -> minimal WireGuard diff -> apply -> meshd_mesh_changed

Start-up order matters. The WireGuard interface comes first, with the peers
applied last time (``peers.json``), so a rebooted node has a data plane before
gossip converges. Then Serf, bound to this node's *mesh* address: all gossip
flows inside WireGuard, and the only underlay ports are WireGuard's and the
enrolment port. Serf re-joins from its snapshot, and the agent also asks it to
join every known peer's mesh address until another member answers.

A pass runs on every view change and every ``RESYNC_INTERVAL`` seconds, so
whatever was missed is repaired. Failed members keep their peer entry (they
may come back); left and reaped ones lose it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import ipaddress
import logging
import os
import random
import re
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from collections.abc import Set as AbstractSet
from typing import Any

from meshd import systemd
from meshd.config import Config
from meshd.control import ControlServer
from meshd.desired import STATIC_ROLE, Claim, DesiredState, address_owners, claim_of, compute
from meshd.errors import (
    EnrolRefused,
    GossipError,
    IdentityError,
    MeshdError,
    NetlinkError,
    SerfCommandError,
    WireGuardError,
)
from meshd.gossip.record import encode_record
from meshd.gossip.rpc import QueryEvent, SerfClient, UserEvent
from meshd.gossip.supervisor import SerfAgent, SerfSettings
from meshd.gossip.view import MembershipView, publish_record
from meshd.identity import WireGuardKeyPair
from meshd.netlink import Netlink
from meshd.node import (
    KnownPeer,
    NodeState,
    NodeStore,
    gossip_address,
    host_prefixes,
    join_address,
    mesh_interface_addresses,
)
from meshd.pki.ca import CertChain, NetworkCA
from meshd.pki.enrol import (
    MAX_MEMBERS_IN_ANSWER,
    EnrolRequest,
    EnrolResult,
    EnrolServer,
    PeerInfo,
    chain_verifier,
)
from meshd.pki.token import check_network, parse_token
from meshd.pki.trust import EXPIRY_WARNING, PENDING, REVOCATIONS_PER_PAGE, Trust
from meshd.plugins import PluginHost
from meshd.tasks import ShutdownBudget, cancel_and_wait
from meshd.types import (
    Admission,
    ConfigView,
    IPAddress,
    Member,
    MemberState,
    MeshView,
    Network,
    NodeIdentity,
    NodeRecord,
    PathChoice,
    PeerConfig,
)
from meshd.wireguard import InterfaceSpec, WireGuardInterface

log = logging.getLogger(__name__)

RESYNC_INTERVAL = 5.0
INTERFACE_WAIT = 15.0
READY_TIMEOUT = 30.0
JOIN_RETRY = 2.0
# Serf tries a join's targets one after another, each for up to 10 s (memberlist's TCP
# timeout) when the target's WireGuard does not know this node yet.
JOIN_TIMEOUT_PER_TARGET = 10.0
# An alive member with no WireGuard handshake this long may never have heard of this
# node: announce it again (see _reannounce_loop), then less and less often.
UNHEARD_GRACE = 5.0
REANNOUNCE_MAX = 60.0
REPUBLISH_INTERVAL = 60.0
# A peer learnt at enrolment or restored from disk, not (yet) seen in gossip,
# is kept this long after gossip has other members.
KNOWN_PEER_GRACE = 120.0
# A leave (``meshd leave``) may take this long to reach the others.
SHUTDOWN_TIMEOUT = 10.0
# SIGTERM must end the agent within 3 s: its steps share this budget, each bounded.
SHUTDOWN_BUDGET = 2.5
TASKS_STOP_TIMEOUT = 1.0
LEAVE_EVENT = "meshd-leave"
REVOKE_EVENT = "meshd-revoke"
CHAIN_QUERY = "meshd-chain"
CHAIN_EVENT = "meshd-chain"
REVOCATIONS_QUERY = "meshd-revocations"
CHAIN_TIMEOUT = 1.0
CHAIN_RETRY = 5.0
CHAIN_HELPERS = 3
REVOCATION_SYNC_FIRST = 3.0
REVOCATION_SYNC_INTERVAL = 30.0
REVOCATION_SYNC_PEERS = 2
# After publishing a new WireGuard key, how long the old one keeps the tunnels up
# while the record spreads (gossip reaches 99 % of 1,000 nodes in about 1.6 s).
KEY_SWITCH_DELAY = 2.0


class _HookPolicy:
    """The desired-state policy answered by the plugins."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    def admit(self, member: Member) -> Admission | None:
        return self._agent.plugins.admit_peer(self._agent, member)

    def select_path(self, member: Member) -> PathChoice:
        return self._agent.plugins.select_path(self._agent, member)

    def shape(self, member: Member, peer: PeerConfig) -> PeerConfig:
        return self._agent.plugins.peer_config(self._agent, member, peer)


class Agent:
    """One node's daemon. Implements :class:`meshd.types.AgentAPI` for the plugins."""

    def __init__(self, config: Config, plugins: PluginHost, store: NodeStore) -> None:
        self._config = config
        self.plugins = plugins
        self.store = store
        self.state: NodeState = store.load()
        self.trust = Trust(self.state.ca_public_key, store.dir)
        self._fetching: set[str] = set()
        self._fetch_failed: dict[str, float] = {}
        self._expiry_warned = 0.0
        self._local_addresses: tuple[IPAddress, ...] = ()
        self._known: dict[str, tuple[KnownPeer, float]] = {}
        # Keys whose owner announced its leave; see _members().
        self._departed: dict[str, float] = {}
        self._stop = asyncio.Event()
        self._leave = False
        self._kick = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._iface: WireGuardInterface | None = None
        self._serf: SerfAgent | None = None
        self._client: SerfClient | None = None
        self._view: MembershipView | None = None
        self._desired = DesiredState(peers=())
        self._control: ControlServer | None = None
        self._enrol: EnrolServer | None = None
        self._record_version = 0
        self._published: NodeRecord | None = None
        self._published_at = 0.0
        self._joined = False
        self._joined_event = asyncio.Event()
        self._join_call: asyncio.Task[None] | None = None

    # --- AgentAPI --------------------------------------------------------

    @property
    def identity(self) -> NodeIdentity:
        return NodeIdentity(name=self.state.name, public_key=self.state.keys.public_key)

    @property
    def network(self) -> Network:
        return self.state.network

    @property
    def config(self) -> ConfigView:
        return self._config.view()

    @property
    def listen_port(self) -> int:
        return self._config.wireguard.port

    @property
    def local_addresses(self) -> tuple[IPAddress, ...]:
        return self._local_addresses

    def spawn(self, coro: Awaitable[None], *, name: str) -> None:
        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("plugin task %s failed", name)

        self._start_task(guarded(), name=name)

    # --- lifecycle -------------------------------------------------------

    def _start_task(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or self._stop.is_set():
            return
        exc = task.exception()
        if exc is not None:
            log.error("%s failed: %s", task.get_name(), exc, exc_info=exc)
            self._stop.set()

    def request_stop(self, *, leave: bool = False) -> None:
        self._leave = self._leave or leave
        self._stop.set()

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT (or ``meshd leave``); clean up on the way out."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        try:
            if await self._start_unless_stopped():
                systemd.notify("READY=1\nSTATUS=mesh interface up, gossip joined")
                await self._stop.wait()
        finally:
            systemd.notify("STOPPING=1")
            await self._shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    async def _start_unless_stopped(self) -> bool:
        """Start and wait to join, unless a stop comes first: then the start-up is
        cancelled (a SIGTERM must not wait out a 30 s wait for the mesh). True if started."""

        async def start_up() -> None:
            await self._start()
            await self._wait_joined()

        starting = asyncio.create_task(start_up(), name="start-up")
        stopping = asyncio.create_task(self._stop.wait(), name="stop-requested")
        try:
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not starting.done():
                await cancel_and_wait([starting], TASKS_STOP_TIMEOUT, what="start-up")
        if starting.cancelled() or not starting.done():
            return False
        starting.result()  # a start-up error ends the agent, as before
        return not self._stop.is_set()

    async def _start(self) -> None:
        cfg = self._config
        state = self.state
        spec = InterfaceSpec(
            ifname=cfg.wireguard.interface,
            private_key=state.keys.private_key,
            listen_port=cfg.wireguard.port,
            addresses=mesh_interface_addresses(state.network, state.addresses),
            mtu=cfg.wireguard.mtu,
        )
        self._iface = await self._open_interface(spec)
        self._start_task(self._iface.supervise(), name="wireguard")
        await self._refresh_local_addresses()

        now = time.monotonic()
        for peer in self.store.load_peers():
            self._known[peer.public_key] = (peer, now)
            if peer.chain is not None:
                try:
                    self.trust.add_chain(peer.chain, CertChain.decode(peer.chain).ref)
                except IdentityError as exc:
                    log.warning("ignored the cached certificate of %s: %s", peer.name, exc)
        if self._known:
            log.info("restoring %d peer(s) from the last run", len(self._known))
        await self._reconcile()

        self._control = ControlServer(
            self.store.dir,
            {
                "status": self._cmd_status,
                "leave": self._cmd_leave,
                "revoke": self._cmd_revoke,
                "rotate-gossip": self._cmd_rotate_gossip,
                "rotate-wireguard": self._cmd_rotate_wireguard,
            },
        )
        await self._control.start()

        if cfg.enrol.enabled:
            self._enrol = EnrolServer(
                "0.0.0.0",
                cfg.enrol.port,
                verify=chain_verifier(state.ca_public_key, revoked=lambda: self.trust.revoked),
                on_enrolled=self._on_enrolled,
            )
            await self._enrol.start()

        await self._start_gossip()
        self.plugins.startup(self)
        self._start_task(self._loop(), name="reconcile-loop")
        self._start_task(self._join_loop(), name="gossip-join")
        self._start_task(self._revocation_sync_loop(), name="revocation-sync")
        self._start_task(self._reannounce_loop(), name="reannounce")

    async def _wait_joined(self) -> None:
        """Until gossip has joined another member: at once for a node that knows nobody
        (the first one), at most READY_TIMEOUT for the others (a mesh that is down must
        not keep the service from starting)."""
        if not self._known:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._joined_event.wait(), READY_TIMEOUT)
        if not self._joined:
            log.warning("no other member answered within %.0f s; running alone", READY_TIMEOUT)

    async def _open_interface(self, spec: InterfaceSpec) -> WireGuardInterface:
        """Open the interface, waiting a while for the wireguard-go of a crashed agent
        (it gets SIGTERM when its parent dies, and may take a moment to go)."""
        deadline = time.monotonic() + INTERFACE_WAIT
        while True:
            try:
                return await WireGuardInterface.open(spec, backend=self._config.wireguard.backend)
            except (WireGuardError, NetlinkError) as exc:
                if time.monotonic() > deadline:
                    raise
                log.info("interface %s not ready yet (%s); retrying", spec.ifname, exc)
                await asyncio.sleep(0.5)

    async def _start_gossip(self) -> None:
        cfg, state = self._config, self.state
        record = self._record()
        settings = SerfSettings(
            node_name=state.name,
            state_dir=self.store.serf_dir,
            rpc_auth_key=state.rpc_key,
            bind_addr=str(gossip_address(state.addresses.all())),
            bind_port=cfg.gossip.port,
            # serf parses the advertise address as host:port: IPv6 needs its brackets.
            advertise_addr=join_address(
                str(gossip_address(state.addresses.all())), cfg.gossip.port
            ),
            rpc_addr=cfg.gossip.rpc_addr,
            gossip_keys=(_b64(state.gossip_key),),
            profile=cfg.gossip.profile,
            # The record goes out with the agent's very first alive message: a member that
            # missed the tag update that would follow would see this node without one.
            tags=encode_record(record),
            log_level="info" if log.isEnabledFor(logging.DEBUG) else "warn",
        )
        self._serf = SerfAgent(settings, serf_binary=cfg.gossip.serf_binary)
        await self._serf.start()
        self._start_task(self._serf.supervise(), name="serf")
        self._client = self._serf.client()
        await self._client.connect()
        self._view = MembershipView(self._client, on_event=self._on_gossip_event)
        self._start_task(self._view.run(), name="membership")
        await self._publish(record)

    async def _shutdown(self) -> None:
        """Every step bounded, all within SHUTDOWN_BUDGET (plus the leave's own time):
        a task or a closer that does not end in time is logged by name and abandoned."""
        log.info("stopping%s", " (leaving the mesh)" if self._leave else "")
        budget = ShutdownBudget(SHUTDOWN_BUDGET + (SHUTDOWN_TIMEOUT if self._leave else 0.0))
        with contextlib.suppress(Exception):
            self.plugins.shutdown(self)
        if self._leave and self._client is not None:
            await budget.step("leaving the mesh", self._announce_leave(), limit=SHUTDOWN_TIMEOUT)
        await budget.cancel_tasks(list(self._tasks), limit=TASKS_STOP_TIMEOUT)
        if self._client is not None:
            await budget.step("closing the Serf RPC client", self._client.close(), limit=0.5)
        # Side by side: each child may use its SIGTERM grace, and a step cut short kills.
        closers = [
            ("stopping serf", self._serf.stop() if self._serf else None),
            ("stopping the enrolment server", self._enrol.stop() if self._enrol else None),
            ("stopping the control server", self._control.stop() if self._control else None),
            ("closing the interface", self._iface.close() if self._iface else None),
        ]
        await asyncio.gather(
            *(budget.step(name, closer) for name, closer in closers if closer is not None)
        )
        if budget.abandoned:
            log.warning("stopped, leaving behind: %s", ", ".join(budget.abandoned))
        if self._leave:
            self.store.save_peers([])

    async def _announce_leave(self) -> None:
        assert self._client is not None
        try:
            await self._client.user_event(
                LEAVE_EVENT, self.state.keys.public_key.encode(), coalesce=False
            )
            await self._client.leave()
        except MeshdError as exc:
            log.warning("graceful leave did not complete: %s", exc)

    def _reload(self) -> None:
        log.info("SIGHUP: re-reading the configuration of plugins")
        try:
            self.plugins.configure(self._config.view())
        except MeshdError as exc:
            log.error("reload refused: %s", exc)
        self._kick.set()

    # --- the loop --------------------------------------------------------

    async def _loop(self) -> None:
        """A pass on every view change, on a kick, and every RESYNC_INTERVAL seconds."""
        while True:
            view = self._view
            assert view is not None
            subscription = view.subscribe()
            next_change = asyncio.ensure_future(subscription.__anext__())
            try:
                # Until gossip restarts on a new address and a new view replaces this one.
                while self._view is view:
                    kick = asyncio.ensure_future(self._kick.wait())
                    await asyncio.wait(
                        {next_change, kick},
                        timeout=RESYNC_INTERVAL,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    kick.cancel()
                    self._kick.clear()
                    if next_change.done():
                        next_change = asyncio.ensure_future(subscription.__anext__())
                    try:
                        await self._resolve_conflicts()
                        await self._reconcile()
                    except MeshdError as exc:
                        log.warning("reconcile pass failed, retrying: %s", exc)
            finally:
                next_change.cancel()
                subscription.close()

    async def _join_loop(self) -> None:
        """Ask Serf to join known peers until another member is alive, and again if alone."""
        while True:
            client, view = self._client, self._view
            assert client is not None
            assert view is not None
            others_alive = any(
                m.state is MemberState.ALIVE and m.name != self.state.name
                for m in view.members.values()
            )
            if others_alive:
                if not self._joined:
                    await self._announce_chain(self.state.chain)
                self._joined = True
                self._joined_event.set()
            elif self._join_call is None or self._join_call.done():
                targets = self._join_targets()
                if targets:
                    self._join_call = self._start_task(
                        self._join(targets, view), name="gossip-join-call"
                    )
            await asyncio.sleep(JOIN_RETRY)

    async def _join(self, targets: list[str], view: MembershipView) -> None:
        """One Serf join, on an RPC connection of its own.

        Serf answers the requests of one connection in order, and a join can take
        ``JOIN_TIMEOUT_PER_TARGET`` seconds per target that does not know this node yet:
        on the shared connection it froze the view, record updates and query answers
        (this node's own certificate among them) for tens of seconds.
        """
        assert self._serf is not None
        client = self._serf.client(
            stream=None,
            reconnect=False,
            timeout=JOIN_TIMEOUT_PER_TARGET * len(targets) + JOIN_RETRY,
        )
        try:
            await client.connect()
            joined = await client.join(targets)
            log.info("gossip: joined %d of %s", joined, ", ".join(targets))
            view.poll_now()
        except GossipError as exc:
            log.debug("gossip join of %s failed: %s", targets, exc)
        finally:
            with contextlib.suppress(Exception):
                await client.close()

    async def _reannounce_loop(self) -> None:
        """Publish this node's record again while an alive member never shook hands with it.

        A member hears of a newcomer only from third parties: the newcomer's own gossip
        is dropped by the WireGuard of every member that does not know its key yet. Serf
        sends each broadcast a few times only (memberlist's retransmit limit), so a member
        can miss the newcomer's alive message; it then learns of it only at a push/pull
        (every 30 s, with a random partner), and until then the pair has no tunnel. A
        record update is a new alive message, passed on by every member that knows us.
        """
        unheard_since: dict[str, float] = {}
        delay, next_at = UNHEARD_GRACE, 0.0
        while True:
            await asyncio.sleep(RESYNC_INTERVAL / 2)
            assert self._iface is not None
            try:
                stats = {p.public_key: p for p in await self._iface.peer_stats()}
            except MeshdError as exc:
                log.debug("cannot read the peers' handshakes: %s", exc)
                continue
            now = time.monotonic()
            alive = {
                m.record.public_key: m.name
                for m in self._members()
                if m.state is MemberState.ALIVE and m.record and m.name != self.state.name
            }
            unheard_since, unheard = unheard_peers(
                alive,
                {p.public_key for p in self._desired.peers},
                {key: peer.last_handshake for key, peer in stats.items()},
                unheard_since,
                now,
            )
            if not unheard:
                delay, next_at = UNHEARD_GRACE, 0.0
                if now - self._published_at > REPUBLISH_INTERVAL:
                    # A heartbeat: a member that missed a tag update gets the record again.
                    with contextlib.suppress(MeshdError):
                        await self._publish(self._record())
                continue
            if now < next_at:
                continue
            log.info("no handshake yet with %s: announcing this node again", ", ".join(unheard))
            try:
                await self._publish(self._record())
            except MeshdError as exc:
                log.warning("cannot publish this node's record again: %s", exc)
            await self._announce_chain(self.state.chain)
            next_at = now + delay
            delay = min(delay * 2, REANNOUNCE_MAX)

    def _join_targets(self) -> list[str]:
        port = self._config.gossip.port
        addrs = []
        for peer, _ in self._known.values():
            if peer.gossip_addr:
                addrs.append(join_address(peer.gossip_addr, port))
        return addrs

    async def _refresh_local_addresses(self) -> None:
        async with Netlink() as nl:
            found = await nl.host_addresses(exclude=[self._config.wireguard.interface])
        self._local_addresses = tuple(i.ip for i in found)

    # --- one pass --------------------------------------------------------

    def _record(self) -> NodeRecord:
        state = self.state
        extras = self.plugins.node_record(self)
        roles = set(extras.roles)
        if state.static_address:
            roles.add(STATIC_ROLE)
        self._record_version = max(self._record_version + 1, int(time.time() * 1000))
        return NodeRecord(
            public_key=state.keys.public_key,
            addresses=state.addresses.all(),
            port=self._config.wireguard.port,
            endpoints=self.plugins.endpoint_candidates(self),
            roles=frozenset(roles),
            routes=extras.routes,
            cert=CertChain.decode(state.chain).ref,
            version=self._record_version,
        )

    async def _publish(self, record: NodeRecord) -> None:
        assert self._client is not None
        await publish_record(self._client, record)
        self._published = record
        self._published_at = time.monotonic()
        log.info(
            "published record v%d: %s at %s",
            record.version,
            ", ".join(map(str, record.addresses)),
            ", ".join(record.endpoints) or "no endpoint",
        )

    def _members(self) -> list[Member]:
        """The view's members, where a "failed" one that announced its leave counts as left.

        A leave can reach a node as "failed" first (it missed the leave intent; push/pull
        repairs it up to 30 s later), and a failed member keeps its peer. The leaver's
        own user event, sent before it leaves, settles it sooner.
        """
        members = [self._certify(m) for m in self._view.members.values()] if self._view else []
        if not self._departed:
            return members
        for member in members:
            if member.state is MemberState.ALIVE and member.record is not None:
                self._departed.pop(member.record.public_key, None)  # it came back
        return [
            dataclasses.replace(m, state=MemberState.LEFT)
            if m.state is MemberState.FAILED
            and m.record is not None
            and m.record.public_key in self._departed
            else m
            for m in members
        ]

    def _certify(self, member: Member) -> Member:
        if member.record is None or member.name == self.state.name:
            return member
        verdict = self.trust.verdict(member.name, member.record)
        return dataclasses.replace(
            member,
            certified=verdict.certified,
            certificate_error=verdict.error,
            certified_addresses=verdict.addresses,
        )

    def _on_gossip_event(self, event: object) -> None:
        if isinstance(event, UserEvent) and event.name == LEAVE_EVENT:
            key = event.payload.decode("ascii", "replace")
            if key != self.state.keys.public_key:
                self._departed[key] = time.monotonic()
                self._kick.set()
        elif isinstance(event, UserEvent) and event.name == REVOKE_EVENT:
            self._take_revocation(event.payload, "gossip")
        elif isinstance(event, UserEvent) and event.name == CHAIN_EVENT:
            try:
                chain = CertChain.decode(event.payload)
                if not self.trust.has_chain(chain.ref):
                    self.trust.add_chain(event.payload, chain.ref)
                    self._kick.set()
            except IdentityError as exc:
                log.debug("ignored a certificate chain event: %s", exc)
        elif isinstance(event, QueryEvent) and event.name in (CHAIN_QUERY, REVOCATIONS_QUERY):
            self._start_task(self._answer(event), name=f"answer-{event.name}")

    async def _answer(self, event: QueryEvent) -> None:
        client = self._client
        if client is None:
            return
        if event.name == CHAIN_QUERY:
            # Our own chain, or one we hold for someone else: chains are self-certifying,
            # and the asker may have no tunnel to their owner yet.
            ref = event.payload.decode("ascii", "replace")
            if ref == self._own_chain().ref:
                payload = self.state.chain
            else:
                chain = self.trust.chain(ref)
                if chain is None:
                    return
                payload = chain.encode()
        else:
            try:
                payload = self.trust.page(int(event.payload or b"0"))
            except ValueError:
                return
        try:
            await client.respond(event.id, payload)
        except MeshdError as exc:
            log.debug("cannot answer %s query: %s", event.name, exc)

    async def _announce_chain(self, chain: bytes) -> None:
        """Gossip a certificate chain, so members can admit its node before any tunnel to it
        exists (a query's answer travels directly, and needs one)."""
        client = self._client
        if client is None:
            return
        try:
            await client.user_event(CHAIN_EVENT, chain, coalesce=False)
        except MeshdError as exc:
            log.debug("cannot announce a certificate chain: %s", exc)

    def _take_revocation(self, data: bytes, source: str) -> None:
        try:
            revocation = self.trust.add_revocation(data)
        except MeshdError as exc:
            log.warning("ignored a revocation from %s: %s", source, exc)
            return
        if revocation is not None:
            log.warning(
                "revocation of %s (key %s) received by %s",
                revocation.name,
                revocation.public_key or "-",
                source,
            )
            self._kick.set()

    def _fetch_missing_chains(self) -> None:
        """Ask each member whose certificate chain is unknown for it (a Serf query)."""
        now = time.monotonic()
        for member in self._view.members.values() if self._view else ():
            record = member.record
            if record is None or not record.cert or member.name == self.state.name:
                continue
            if member.state is not MemberState.ALIVE or self.trust.has_chain(record.cert):
                continue
            if record.cert in self._fetching or now < self._fetch_failed.get(record.cert, 0):
                continue
            self._fetching.add(record.cert)
            self._start_task(self._fetch_chain(member.name, record.cert), name="fetch-chain")

    async def _fetch_chain(self, name: str, ref: str) -> None:
        """Ask the member, and a few certified peers that may hold a copy, for a chain."""
        try:
            client = self._client
            assert client is not None
            helpers = [
                m.name
                for m in self._members()
                if m.certified and m.state is MemberState.ALIVE and m.name != name
            ]
            asked = [name, *random.sample(helpers, min(CHAIN_HELPERS, len(helpers)))]
            log.debug("asking %s for the certificate chain of %s", ", ".join(asked), name)
            result = await client.query(
                CHAIN_QUERY, ref.encode(), filter_nodes=asked, query_timeout=CHAIN_TIMEOUT
            )
            errors = []
            for responder, data in result.responses.items():
                try:
                    self.trust.add_chain(data, ref)
                    break
                except IdentityError as exc:
                    errors.append(f"{responder}: {exc}")
            else:
                raise IdentityError("; ".join(errors) or f"none of {', '.join(asked)} answered")
            log.debug("certificate chain of %s fetched (%s)", name, ref)
            self._kick.set()
        except MeshdError as exc:
            log.info("cannot fetch the certificate of %s: %s", name, exc)
            self._fetch_failed[ref] = time.monotonic() + CHAIN_RETRY
        finally:
            self._fetching.discard(ref)

    async def _revocation_sync_loop(self) -> None:
        """Anti-entropy for revocations: a node that was away learns what it missed."""
        await asyncio.sleep(REVOCATION_SYNC_FIRST)
        while True:
            try:
                await self._sync_revocations()
            except MeshdError as exc:
                log.debug("revocation sync failed: %s", exc)
            await asyncio.sleep(REVOCATION_SYNC_INTERVAL)

    async def _sync_revocations(self) -> None:
        client = self._client
        if client is None:
            return
        others = [
            m.name
            for m in self._members()
            if m.state is MemberState.ALIVE and m.certified and m.name != self.state.name
        ]
        for name in random.sample(others, min(REVOCATION_SYNC_PEERS, len(others))):
            page, total = 0, 1
            while page * REVOCATIONS_PER_PAGE < total:
                result = await client.query(
                    REVOCATIONS_QUERY,
                    str(page).encode(),
                    filter_nodes=[name],
                    query_timeout=CHAIN_TIMEOUT,
                )
                data = result.responses.get(name)
                if data is None:
                    break
                added, total = self.trust.merge_page(data)
                if added:
                    log.warning("learnt %d revocation(s) from %s", added, name)
                    self._kick.set()
                page += 1

    def _desired_peers(self) -> list[PeerConfig]:
        """Gossip's desired peers plus known peers gossip has not (yet) described."""
        members = self._members()
        own = self._published or self._record()
        self._desired = compute(
            own_name=self.state.name,
            own_record=own,
            members=members,
            policy=_HookPolicy(self),
            keepalive=self._config.wireguard.keepalive or None,
            own_certified=self._own_chain().node.addresses,
        )
        peers = list(self._desired.peers)
        desired_keys = {p.public_key for p in peers}
        # By key, not name: a machine that re-joins under an old name has a new key.
        by_key = {m.record.public_key: m for m in members if m.record}
        taken = {prefix for p in peers for prefix in p.allowed_ips}
        taken |= set(host_prefixes(own.addresses))
        now = time.monotonic()
        others_alive = any(
            m.state is MemberState.ALIVE and m.name != self.state.name for m in members
        )
        for key, (known, since) in list(self._known.items()):
            member = by_key.get(key)
            if key in desired_keys or (member is not None and _settled(member)):
                del self._known[key]  # gossip speaks for it now (even if it left)
                continue
            if others_alive and now - since > KNOWN_PEER_GRACE:
                log.info("forgetting %s: not seen in gossip for %.0f s", known.name, now - since)
                del self._known[key]
                continue
            # Only the prefixes nobody else holds: a joiner whose IPv4 address turns out
            # taken still needs its IPv6 (gossip) address, to learn that it must move.
            free = tuple(p for p in known.allowed_ips if p not in taken)
            if not free:
                continue
            # Still needed while its certificate is fetched: through this very tunnel.
            peer = known.peer(self._config.wireguard.keepalive or None)
            peers.append(dataclasses.replace(peer, allowed_ips=free))
            taken.update(free)
        return peers

    def _own_chain(self) -> CertChain:
        return CertChain.decode(self.state.chain)

    def _own_expiry(self) -> int:
        chain = self._own_chain()
        return chain.node.not_after

    def _warn_expiry(self) -> None:
        """Warn, at most hourly, when this node's certificate lapses within two weeks."""
        left = self._own_expiry() - time.time()
        if left > EXPIRY_WARNING or time.monotonic() - self._expiry_warned < 3600:
            return
        self._expiry_warned = time.monotonic()
        log.warning(
            "this node's certificate %s in %.1f days: rotate it with "
            "'meshd key rotate-wireguard --token-file TOKEN'",
            "expires" if left > 0 else "expired",
            abs(left) / 86400,
        )

    async def _reconcile(self) -> None:
        assert self._iface is not None
        self._fetch_missing_chains()
        self._warn_expiry()
        peers = self._desired_peers()
        result = await self._iface.reconcile(peers)
        if result.operations == 0:
            return
        self._save_peers(peers)
        view = MeshView(node=self.identity, members=tuple(self._members()), peers=tuple(peers))
        self.plugins.mesh_changed(self, view)

    def _save_peers(self, peers: list[PeerConfig]) -> None:
        by_key = {m.record.public_key: m for m in self._members() if m.record}
        known = []
        for peer in peers:
            member = by_key.get(peer.public_key)
            if member is not None and member.record is not None:
                gossip = str(gossip_address(member.record.addresses))
                chain = self.trust.chain(member.record.cert)
                known.append(
                    KnownPeer(
                        member.name,
                        peer.public_key,
                        peer.allowed_ips,
                        peer.endpoint,
                        gossip,
                        chain.encode() if chain else None,
                    )
                )
            elif peer.public_key in self._known:
                known.append(self._known[peer.public_key][0])
        try:
            self.store.save_peers(known)
        except MeshdError as exc:
            log.warning("cannot save the peer cache: %s", exc)

    async def _resolve_conflicts(self) -> None:
        """Move this node off an address another node keeps (see :mod:`meshd.desired`)."""
        own = self._published
        if own is None:
            return
        claims: list[tuple[Claim, tuple[IPAddress, ...]]] = [
            (claim_of(self.state.name, own, self._own_chain().node.addresses), own.addresses)
        ]
        taken: set[IPAddress] = set()
        for member in self._members():
            if member.record is None or member.name == self.state.name:
                continue
            if member.state not in (MemberState.ALIVE, MemberState.FAILED, MemberState.LEAVING):
                continue
            claims.append(
                (
                    claim_of(member.name, member.record, member.certified_addresses),
                    member.record.addresses,
                )
            )
            taken.update(member.record.addresses)
        owners = address_owners(claims)
        lost = [a for a in own.addresses if owners[a].name != self.state.name]
        if not lost:
            return
        winner = owners[lost[0]].name
        offer = self.plugins.allocate_address(
            self.network, self.identity, frozenset(taken | set(own.addresses))
        )
        if offer is None:
            log.error("address %s is kept by %s and no plugin offers another", lost[0], winner)
            return
        # Only the lost addresses move; the others (the gossip address above all) stay.
        replacement = {a.version: a for a in offer.all()}
        moved = tuple(replacement[a.version] if a in lost else a for a in own.addresses)
        log.warning(
            "address conflict: %s is kept by %s; moving to %s",
            ", ".join(map(str, lost)),
            winner,
            ", ".join(str(replacement[a.version]) for a in lost),
        )
        await self._move_to(moved)

    async def _move_to(self, addresses: tuple[IPAddress, ...]) -> None:
        assert self._iface is not None
        old_gossip = gossip_address(self.state.addresses.all())
        v4 = next(a for a in addresses if a.version == 4)
        v6 = next((a for a in addresses if a.version == 6), None)
        new_addresses = dataclasses.replace(self.state.addresses, ipv4=v4, ipv6=v6, static=False)
        self.state = dataclasses.replace(self.state, addresses=new_addresses, static_address=False)
        self.store.save_node(self.state)
        wanted = mesh_interface_addresses(self.state.network, new_addresses)
        async with Netlink() as nl:
            await nl.sync_addresses(self._iface.ifname, wanted)
        self._iface.spec = dataclasses.replace(self._iface.spec, addresses=wanted)
        if gossip_address(new_addresses.all()) == old_gossip:
            await self._publish(self._record())
        else:
            # Serf is bound to the moved address: it must start again on the new one.
            await self._restart_gossip()

    async def _restart_gossip(self) -> None:
        """Serf again, on this node's new address: leave, start afresh, re-join known peers."""
        # Known peers carry the mesh on while the new Serf finds the others again.
        now = time.monotonic()
        by_key = {m.record.public_key: m for m in self._members() if m.record}
        for peer in self._desired.peers:
            member = by_key.get(peer.public_key)
            if member is not None and member.record is not None:
                gossip = str(gossip_address(member.record.addresses))
                known = KnownPeer(
                    member.name, peer.public_key, peer.allowed_ips, peer.endpoint, gossip
                )
                self._known[peer.public_key] = (known, now)
        # Stop supervising first: the leave below ends the agent on purpose.
        for task in [t for t in self._tasks if t.get_name() in ("serf", "membership")]:
            task.cancel()
        if self._client is not None:
            # A graceful leave, so the others take the new address at once instead of
            # refusing a second "n9" while the old one is only suspected dead.
            with contextlib.suppress(MeshdError, asyncio.TimeoutError):
                await asyncio.wait_for(self._client.leave(), SHUTDOWN_TIMEOUT)
        if self._client is not None:
            await self._client.close()
        if self._serf is not None:
            await self._serf.stop()
        self._joined = False
        await self._start_gossip()

    # --- enrolment (this node as a seed) -----------------------------------

    async def _on_enrolled(self, request: EnrolRequest) -> EnrolResult:
        name, key = request.name, request.public_key
        for member in self._members():
            if (
                member.name == name
                and member.state is MemberState.ALIVE
                and member.record
                and member.record.public_key != key
            ):
                raise EnrolRefused(f"the name {name!r} is taken by a live member")
        ranges = [n for n in (self.network.cidr4, self.network.cidr6) if n is not None]
        for address in request.addresses:
            if not any(address in net for net in ranges):
                raise EnrolRefused(f"address {address} is outside the network's ranges")
            holder = self._holder_of(address, key)
            if holder is not None:
                raise EnrolRefused(f"address {address} is taken by {holder}")
        endpoint = request.endpoint
        peer = KnownPeer(
            name=name,
            public_key=key,
            allowed_ips=host_prefixes(request.addresses),
            endpoint=endpoint,
            gossip_addr=str(gossip_address(request.addresses)),
        )
        self._known[key] = (peer, time.monotonic())
        self.trust.add_chain(request.chain.encode(), request.chain.ref)
        await self._reconcile()
        self._start_task(self._announce_chain(request.chain.encode()), name="announce-chain")
        log.info("enrolled %s (%s) from %s", name, ", ".join(map(str, request.addresses)), endpoint)
        own_endpoint = (
            self._published.endpoints[0] if self._published and self._published.endpoints else None
        )
        # Every certified member, so the joiner has tunnels to all of them at once.
        members = []
        for member in self._members():
            record = member.record
            chain = self.trust.chain(record.cert) if record else None
            if not member.certified or chain is None or record is None or member.name == name:
                continue
            if member.state is not MemberState.ALIVE:
                continue
            endpoint_ = record.endpoints[0] if record.endpoints else None
            members.append(PeerInfo(chain=chain, endpoint=endpoint_))
        return EnrolResult(
            seed=PeerInfo(chain=CertChain.decode(self.state.chain), endpoint=own_endpoint),
            members=tuple(members[:MAX_MEMBERS_IN_ANSWER]),
        )

    def _holder_of(self, address: IPAddress, key: str) -> str | None:
        """The node, other than the one with ``key``, that claims ``address``."""
        if address in self.state.addresses.all():
            return self.state.name
        for member in self._members():
            record = member.record
            if record is None or record.public_key == key:
                continue
            if member.state in (MemberState.LEFT, MemberState.REAPED):
                continue
            if address in record.addresses:
                return member.name
        prefix = ipaddress.ip_network(address)
        for other, (known, _) in self._known.items():
            if other != key and prefix in known.allowed_ips:
                return known.name
        return None

    # --- control commands ----------------------------------------------------

    async def _cmd_revoke(self, request: Any) -> dict[str, Any]:
        """Sign a revocation of member ``name`` (needs the CA key here) and gossip it."""
        secret = self.store.ca_secret()
        if secret is None:
            raise IdentityError(
                "this machine does not hold the network CA key: revoke where 'meshd init' ran"
            )
        name = str(request.get("name", ""))
        chain = None
        for member in self._members():
            if member.name == name and member.record is not None:
                chain = self.trust.chain(member.record.cert)
        if chain is None:
            raise IdentityError(
                f"no certificate known for {name!r}: it must be (or have been) a member "
                "this node has seen"
            )
        ca = NetworkCA.from_secret(self.network.name, secret)
        revocation = ca.revoke(chain.node, include_key=True)
        self.trust.add(revocation)
        assert self._client is not None
        await self._client.user_event(REVOKE_EVENT, revocation.encode(), coalesce=False)
        self._kick.set()
        log.warning("revoked %s (certificate %s)", name, chain.ref)
        return {"revoked": name, "certificate": chain.ref, "public_key": chain.node.public_key}

    async def _cmd_rotate_gossip(self, request: Any) -> dict[str, Any]:
        """A new gossip key on every member: install everywhere, make it primary, drop the old.

        Members that are down, or revoked (nobody has a tunnel to them any more), cannot
        answer and keep the old key: exactly what a rotation after a revocation is for.
        Every alive, certified member must confirm each step.
        """
        client = self._client
        assert client is not None
        needed = 1 + sum(
            1
            for m in self._members()
            if m.state is MemberState.ALIVE and m.certified and m.name != self.state.name
        )
        # The primary key Serf uses now: another node may have rotated it since we started.
        old = self.store.current_gossip_key() or _b64(self.state.gossip_key)
        new_key = os.urandom(32)
        new = _b64(new_key)
        await self._key_step("install", client.install_key, new, needed)
        await self._key_step("use", client.use_key, new, needed)
        self.state = dataclasses.replace(self.state, gossip_key=new_key)
        self.store.save_gossip_key(new_key)
        confirmed = await self._key_step("remove", client.remove_key, old, 0)
        log.warning("gossip key rotated; %d member(s) confirmed", confirmed)
        return {"members": confirmed, "required": needed}

    async def _key_step(
        self, step: str, call: Callable[[str], Awaitable[Any]], key: str, needed: int
    ) -> int:
        """One keyring step over the whole mesh; how many members confirmed it."""
        try:
            answer = await call(key)
            return int(answer.num_nodes - answer.num_err)
        except SerfCommandError as exc:
            found = re.search(r"(\d+)/(\d+) nodes reported success", str(exc))
            confirmed = int(found.group(1)) if found else 0
            if confirmed < needed:
                raise GossipError(
                    f"gossip key {step}: only {confirmed} of the {needed} live members "
                    f"confirmed ({exc}); nothing else was changed"
                ) from exc
            log.info("gossip key %s: %s (members that are down keep the old key)", step, exc)
            return confirmed

    async def _cmd_rotate_wireguard(self, request: Any) -> dict[str, Any]:
        """A new WireGuard key and certificate (signed with a token's enrolment key)."""
        assert self._iface is not None
        token = parse_token(str(request.get("token", "")), int(time.time()))
        check_network(token, self.network.network_id)
        keys = WireGuardKeyPair.generate()
        cert = token.enrolment.sign_node_cert(
            self.state.name, keys.public_key, self.state.addresses.all()
        )
        chain = CertChain(cert, (token.enrolment.cert,))
        chain.verify(self.state.ca_public_key, int(time.time()), at_admission=True)
        old = self.state.keys.public_key
        # Tell the mesh first, through the tunnels the old key still holds up: a node
        # that switched before the others knew its new key would be cut off, unable
        # to gossip the very record that would let them follow.
        self.state = dataclasses.replace(self.state, keys=keys, chain=chain.encode())
        self.store.save_keys(self.state)
        await self._announce_chain(self.state.chain)
        await self._publish(self._record())
        await asyncio.sleep(KEY_SWITCH_DELAY)
        self._iface.spec = dataclasses.replace(self._iface.spec, private_key=keys.private_key)
        await self._iface.backend.configure_device(self._iface.spec.device)
        # The others' last handshake attempts failed against the old key and WireGuard
        # waits 5 s to retry: start every session from this side now.
        _poke(p.allowed_ips[0].network_address for p in self._desired.peers if p.allowed_ips)
        log.warning("WireGuard key rotated: %s -> %s", old, keys.public_key)
        return {"old_public_key": old, "public_key": keys.public_key, "certificate": chain.ref}

    async def _cmd_leave(self, request: Any) -> dict[str, Any]:
        self.request_stop(leave=True)
        return {"leaving": self.state.name}

    async def _cmd_status(self, request: Any) -> dict[str, Any]:
        assert self._iface is not None
        stats = {p.public_key: p for p in await self._iface.peer_stats()}
        state = self.state
        own = self._published
        peers_by_key = {p.public_key: p for p in self._desired.peers}
        rows: list[dict[str, Any]] = []
        seen_keys: set[str] = set()
        for member in sorted(self._members(), key=lambda m: m.name):
            if member.name == state.name:
                continue
            key = member.record.public_key if member.record else None
            live = stats.get(key) if key else None
            if key:
                seen_keys.add(key)
            rows.append(
                _peer_row(
                    member.name,
                    key,
                    member.record.addresses if member.record else (),
                    member.state.value,
                    live,
                    is_peer=key in peers_by_key,
                    via=self._desired.relayed.get(member.name),
                    excluded=self._desired.excluded.get(member.name),
                )
            )
        for key, (known, _) in self._known.items():
            if key in seen_keys:
                continue
            rows.append(
                _peer_row(
                    known.name,
                    key,
                    tuple(p.network_address for p in known.allowed_ips),
                    "unconfirmed",
                    stats.get(key),
                    is_peer=key in stats,
                )
            )
        return {
            "node": {
                "name": state.name,
                "network": state.network.name,
                "network_id": state.network.network_id,
                "public_key": state.keys.public_key,
                "addresses": [str(a) for a in state.addresses.all()],
                "interface": self._iface.ifname,
                "listen_port": self._config.wireguard.port,
                "endpoints": list(own.endpoints) if own else [],
                "backend": type(self._iface.backend).__name__,
                "gossip_joined": self._joined,
                "certificate": self._own_chain().ref,
                "certificate_expires": self._own_expiry(),
                "certificate_expiring": self._own_expiry() - time.time() < EXPIRY_WARNING,
                "revocations": len(self.trust.revoked),
            },
            "peers": rows,
        }


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


def _poke(addresses: Iterable[IPAddress]) -> None:
    """One empty UDP datagram (discard port) to each address: traffic into the tunnel
    makes WireGuard start a handshake with that peer at once."""
    for address in addresses:
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.sendto(b"", (str(address), 9))
        except OSError as exc:
            log.debug("cannot poke %s: %s", address, exc)


def _settled(member: Member) -> bool:
    """Gossip has decided about this member: gone, or its certificate refused."""
    if member.state in (MemberState.LEAVING, MemberState.LEFT, MemberState.REAPED):
        return True
    return member.certificate_error not in (None, PENDING)


def _peer_row(
    name: str,
    key: str | None,
    addresses: tuple[Any, ...],
    state: str,
    live: Any,
    *,
    is_peer: bool,
    via: str | None = None,
    excluded: str | None = None,
) -> dict[str, Any]:
    return {
        "name": name,
        "public_key": key,
        "addresses": [str(a) for a in addresses],
        "gossip": state,
        "peer": is_peer,
        "via": via,
        "excluded": excluded,
        "endpoint": live.endpoint if live else None,
        "last_handshake": live.last_handshake if live else None,
        "rx_bytes": live.rx_bytes if live else 0,
        "tx_bytes": live.tx_bytes if live else 0,
    }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
