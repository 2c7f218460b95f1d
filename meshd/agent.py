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
import signal
import time
from collections.abc import Awaitable, Coroutine
from typing import Any

from meshd import systemd
from meshd.ca import CertChain
from meshd.config import Config
from meshd.control import ControlServer
from meshd.desired import STATIC_ROLE, Claim, DesiredState, address_owners, claim_of, compute
from meshd.enrol import EnrolRequest, EnrolResult, EnrolServer, PeerInfo, chain_verifier
from meshd.errors import EnrolRefused, GossipError, MeshdError
from meshd.gossip.rpc import SerfClient, UserEvent
from meshd.gossip.supervisor import SerfAgent, SerfSettings
from meshd.gossip.view import MembershipView, publish_record
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
from meshd.plugins import PluginHost
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
JOIN_RETRY = 2.0
# A peer learnt at enrolment or restored from disk, not (yet) seen in gossip,
# is kept this long after gossip has other members.
KNOWN_PEER_GRACE = 120.0
SHUTDOWN_TIMEOUT = 10.0
LEAVE_EVENT = "meshd-leave"


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
        self._joined = False

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
            await self._start()
            systemd.notify("READY=1\nSTATUS=mesh interface up, gossip running")
            await self._stop.wait()
        finally:
            systemd.notify("STOPPING=1")
            await self._shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

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
        self._iface = await WireGuardInterface.open(spec, backend=cfg.wireguard.backend)
        self._start_task(self._iface.supervise(), name="wireguard")
        await self._refresh_local_addresses()

        now = time.monotonic()
        for peer in self.store.load_peers():
            self._known[peer.public_key] = (peer, now)
        if self._known:
            log.info("restoring %d peer(s) from the last run", len(self._known))
        await self._reconcile()

        self._control = ControlServer(
            self.store.dir, {"status": self._cmd_status, "leave": self._cmd_leave}
        )
        await self._control.start()

        if cfg.enrol.enabled:
            self._enrol = EnrolServer(
                "0.0.0.0",
                cfg.enrol.port,
                verify=chain_verifier(state.ca_public_key),
                on_enrolled=self._on_enrolled,
            )
            await self._enrol.start()

        await self._start_gossip()
        self.plugins.startup(self)
        self._start_task(self._loop(), name="reconcile-loop")
        self._start_task(self._join_loop(), name="gossip-join")

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
        log.info("stopping%s", " (leaving the mesh)" if self._leave else "")
        with contextlib.suppress(Exception):
            self.plugins.shutdown(self)
        if self._leave and self._client is not None:
            try:
                await self._client.user_event(
                    LEAVE_EVENT, self.state.keys.public_key.encode(), coalesce=False
                )
                await asyncio.wait_for(self._client.leave(), SHUTDOWN_TIMEOUT)
            except (MeshdError, asyncio.TimeoutError) as exc:
                log.warning("graceful leave did not complete: %s", exc)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for closer in (
            self._client.close() if self._client else None,
            self._serf.stop() if self._serf else None,
            self._enrol.stop() if self._enrol else None,
            self._control.stop() if self._control else None,
            self._iface.close() if self._iface else None,
        ):
            if closer is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(closer, SHUTDOWN_TIMEOUT)
        if self._leave:
            self.store.save_peers([])

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
                self._joined = True
            else:
                targets = self._join_targets()
                if targets:
                    try:
                        joined = await client.join(targets)
                        log.info("gossip: joined %d of %s", joined, ", ".join(targets))
                        view.poll_now()
                    except GossipError as exc:
                        log.debug("gossip join of %s failed: %s", targets, exc)
            await asyncio.sleep(JOIN_RETRY)

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
        members = list(self._view.members.values()) if self._view else []
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

    def _on_gossip_event(self, event: object) -> None:
        if isinstance(event, UserEvent) and event.name == LEAVE_EVENT:
            key = event.payload.decode("ascii", "replace")
            if key != self.state.keys.public_key:
                self._departed[key] = time.monotonic()
                self._kick.set()

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
        )
        peers = list(self._desired.peers)
        # By key, not name: a machine that re-joins under an old name has a new key.
        in_gossip = {m.record.public_key for m in members if m.record}
        taken = {prefix for p in peers for prefix in p.allowed_ips}
        taken |= set(host_prefixes(own.addresses))
        now = time.monotonic()
        others_alive = any(
            m.state is MemberState.ALIVE and m.name != self.state.name for m in members
        )
        for key, (known, since) in list(self._known.items()):
            if key in in_gossip:
                del self._known[key]  # gossip speaks for it now (even if it left)
                continue
            if others_alive and now - since > KNOWN_PEER_GRACE:
                log.info("forgetting %s: not seen in gossip for %.0f s", known.name, now - since)
                del self._known[key]
                continue
            if any(p in taken for p in known.allowed_ips):
                continue
            peers.append(known.peer(self._config.wireguard.keepalive or None))
            taken.update(known.allowed_ips)
        return peers

    async def _reconcile(self) -> None:
        assert self._iface is not None
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
                known.append(
                    KnownPeer(member.name, peer.public_key, peer.allowed_ips, peer.endpoint, gossip)
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
            (claim_of(self.state.name, own), own.addresses)
        ]
        taken: set[IPAddress] = set()
        for member in self._members():
            if member.record is None or member.name == self.state.name:
                continue
            if member.state not in (MemberState.ALIVE, MemberState.FAILED, MemberState.LEAVING):
                continue
            claims.append((claim_of(member.name, member.record), member.record.addresses))
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
        for address in request.addresses:
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
        await self._reconcile()
        log.info("enrolled %s (%s) from %s", name, ", ".join(map(str, request.addresses)), endpoint)
        own_endpoint = (
            self._published.endpoints[0] if self._published and self._published.endpoints else None
        )
        return EnrolResult(
            seed=PeerInfo(chain=CertChain.decode(self.state.chain), endpoint=own_endpoint)
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
            },
            "peers": rows,
        }


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
