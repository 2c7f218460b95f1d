"""What the rooms of the agent share, and the small face plugins get of it.

:class:`Runtime` holds the handles every room needs (config, store, trust,
plugins, the interface, gossip) and the few pieces of state that cross rooms,
each with the one room that writes it. Rooms read the last pass's
:class:`Snapshot` instead of asking each other: members are certified once per
pass, by the pipeline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from meshd.config import Config
from meshd.desired import DesiredState, KnownEntry
from meshd.errors import GossipError
from meshd.firewall import FORWARDING_FILE, Forwarding
from meshd.gossip.rpc import SerfClient
from meshd.gossip.supervisor import SerfAgent
from meshd.gossip.view import MembershipView
from meshd.node import KnownPeer, NodeState, NodeStore, gossip_address
from meshd.pki.certificate import CertChain
from meshd.pki.trust import Trust
from meshd.plugins import PluginHost
from meshd.state import DeferredWrites
from meshd.tasks import cancel_and_wait
from meshd.types import (
    Client,
    ConfigView,
    EngineStats,
    IPAddress,
    IPNetwork,
    Member,
    MemberState,
    MetricSample,
    Network,
    NodeIdentity,
    NodeRecord,
    PathChoice,
    PeerStats,
)
from meshd.wireguard import WireGuardInterface

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Snapshot:
    """One pass's result: the certified members and the desired state computed from them."""

    members: tuple[Member, ...] = ()
    desired: DesiredState = field(default_factory=lambda: DesiredState(peers=()))

    def others(self, own_name: str) -> Iterator[Member]:
        return (m for m in self.members if m.name != own_name)

    def alive_certified(self, own_name: str) -> list[Member]:
        return [m for m in self.others(own_name) if m.state is MemberState.ALIVE and m.certified]

    def by_key(self) -> dict[str, Member]:
        # By key, not name: a machine that re-joins under an old name has a new key.
        return {m.record.public_key: m for m in self.members if m.record}


@dataclass
class Gossip:
    """This node's Serf: the child process, the RPC client and the membership view."""

    serf: SerfAgent
    client: SerfClient
    view: MembershipView


class KnownPeers:
    """Peers learnt at enrolment or restored from disk that gossip has not described yet."""

    def __init__(self) -> None:
        self._peers: dict[str, tuple[KnownPeer, float]] = {}

    def add(self, peer: KnownPeer, now: float | None = None) -> None:
        self._peers[peer.public_key] = (peer, time.monotonic() if now is None else now)

    def get(self, key: str) -> KnownPeer | None:
        found = self._peers.get(key)
        return found[0] if found else None

    def forget(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._peers.pop(key, None)

    def entries(self, now: float) -> tuple[KnownEntry, ...]:
        """The desired-state input: each peer with its age."""
        return tuple(KnownEntry(peer, now - since) for peer, since in self._peers.values())

    def __iter__(self) -> Iterator[KnownPeer]:
        return iter([peer for peer, _ in self._peers.values()])

    def __len__(self) -> int:
        return len(self._peers)

    def __contains__(self, key: object) -> bool:
        return key in self._peers


class TaskSet:
    """The agent's tasks: a failed one stops the agent; all end within a deadline."""

    def __init__(self, on_failure: Any) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._on_failure = on_failure
        self.stopping = False

    def start(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or self.stopping:
            return
        exc = task.exception()
        if exc is not None:
            log.error("%s failed: %s", task.get_name(), exc, exc_info=exc)
            self._on_failure()

    def named(self, *names: str) -> list[asyncio.Task[Any]]:
        return [t for t in self._tasks if t.get_name() in names]

    async def cancel(self, tasks: Iterable[asyncio.Task[Any]], timeout: float) -> list[str]:
        return await cancel_and_wait(list(tasks), timeout)

    async def cancel_all(self, timeout: float) -> list[str]:
        self.stopping = True
        return await cancel_and_wait(list(self._tasks), timeout)


class Late(Generic[T]):
    """An attribute that one room sets once it has started (and may clear with None);
    reading it before is a bug of the start order, said with ``why``."""

    def __init__(self, why: str) -> None:
        self._why = why
        self._slot = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self._slot = f"_late_{name}"

    def __get__(self, obj: object, objtype: type | None = None) -> T:
        value: T | None = getattr(obj, self._slot, None)
        assert value is not None, self._why
        return value

    def __set__(self, obj: object, value: T | None) -> None:
        setattr(obj, self._slot, value)

    @staticmethod
    def is_set(obj: object, name: str) -> bool:
        return getattr(obj, f"_late_{name}", None) is not None


@dataclass(frozen=True)
class _Derived:
    """What the agent derives from its node state and reads often."""

    identity: NodeIdentity
    chain: CertChain


class Runtime:
    """The shared handles and cross-room state of one running agent.

    Writers: ``state`` by addressing (moves) and operations (rotations);
    ``gossip`` by the lifecycle and addressing (a restart on a new address);
    ``snapshot`` and ``engine_stats`` by the pipeline only; ``published`` by presence only;
    ``known`` by the lifecycle (restore), the seed (enrolled joiners), addressing
    and the pipeline (forgetting what gossip now speaks for).
    """

    def __init__(self, config: Config, plugins: PluginHost, store: NodeStore) -> None:
        self.config = config
        self.plugins = plugins
        self.store = store
        self.state: NodeState = store.load()
        self._derived_of: NodeState | None = None
        self._derived_cache: _Derived | None = None
        # State files the disk refused (full), waiting in memory; flushed on every pass.
        self.writes = DeferredWrites()
        self.trust = Trust(self.state.ca_public_key, store.dir, writes=self.writes)
        self.known = KnownPeers()
        # Keys whose owner said goodbye through its own tunnel (agent/goodbye.py).
        # (key -> the record version it said goodbye with)
        self.departed: dict[str, int] = {}
        # Last WireGuard handshake (epoch seconds) per peer key, read by presence.
        self.handshakes: dict[str, float] = {}
        # Keys that proved themselves over the enrolment port (a re-join), until when.
        self.vouched: dict[str, float] = {}
        self.snapshot = Snapshot()
        # What the reconcile loop has done (written by the pipeline, read by metrics).
        self.engine_stats = EngineStats()
        self.published: NodeRecord | None = None
        self.local_addresses: tuple[IPAddress, ...] = ()
        self.local_networks: tuple[IPNetwork, ...] = ()
        self.joined = asyncio.Event()
        self.kicked = asyncio.Event()
        # Set to republish this node's record if it changed (addresses, a plugin's facts).
        self.record_stale = asyncio.Event()
        self.stop_requested = asyncio.Event()
        self.leaving = False
        self.tasks = TaskSet(self.stop_requested.set)
        # IP forwarding and the gateway table, on while a plugin routes for others.
        self.forwarding = Forwarding(config.wireguard.interface, store.dir / FORWARDING_FILE)
        self.face = PluginFace(self)

    iface: Late[WireGuardInterface] = Late("the interface is opened first")
    gossip: Late[Gossip] = Late("gossip starts before anything uses it")

    @property
    def has_iface(self) -> bool:
        return Late.is_set(self, "iface")

    @property
    def has_gossip(self) -> bool:
        return Late.is_set(self, "gossip")

    @property
    def name(self) -> str:
        return self.state.name

    @property
    def identity(self) -> NodeIdentity:
        return self._derived().identity

    @property
    def own_chain(self) -> CertChain:
        return self._derived().chain

    def _derived(self) -> _Derived:
        # Read by every hook call of every pass (N per pass): built once per state,
        # which is replaced, never changed in place, on a move or a rotation.
        state = self.state
        derived = self._derived_cache
        if derived is None or self._derived_of is not state:
            derived = self._derived_cache = _Derived(
                NodeIdentity(name=state.name, public_key=state.keys.public_key),
                CertChain.decode(state.chain),
            )
            self._derived_of = state
        return derived

    def carry_peers(self) -> None:
        """Keep every current peer as a known peer: a Serf that starts afresh knows no
        member yet, and the tunnels must carry its joins meanwhile."""
        now = time.monotonic()
        by_key = self.snapshot.by_key()
        for peer in self.snapshot.desired.peers:
            member = by_key.get(peer.public_key)
            if member is not None and member.record is not None:
                gossip = str(gossip_address(member.record.addresses))
                known = KnownPeer(
                    member.name, peer.public_key, peer.allowed_ips, peer.endpoint, gossip
                )
                self.known.add(known, now)

    def recent_handshakes(self, within: float) -> frozenset[str]:
        """Keys of peers whose last handshake is at most ``within`` seconds old, and of
        members vouched for (see :meth:`vouch`)."""
        now = time.time()
        heard = {k for k, at in self.handshakes.items() if now - at <= within}
        self.vouched = {k: until for k, until in self.vouched.items() if until > now}
        return frozenset(heard | self.vouched.keys())

    def vouch(self, key: str, seconds: float) -> None:
        """Count ``key`` as recently heard for ``seconds``: it proved it holds that key."""
        self.vouched[key] = time.time() + seconds

    def request_stop(self, *, leave: bool = False) -> None:
        """Stop the agent (SIGTERM, ``meshd leave``, a failed task); ``leave`` sticks."""
        self.leaving = self.leaving or leave
        self.stop_requested.set()

    def kick(self) -> None:
        """Ask for a pass now."""
        self.kicked.set()


class PluginFace:
    """What hooks get as ``agent`` (:class:`meshd.types.AgentAPI`): read-only facts and
    ``spawn``, never the engine's own objects."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime

    @property
    def identity(self) -> NodeIdentity:
        return self._rt.identity

    @property
    def network(self) -> Network:
        return self._rt.state.network

    @property
    def config(self) -> ConfigView:
        return self._rt.config.view()

    @property
    def listen_port(self) -> int:
        return self._rt.config.wireguard.port

    @property
    def local_addresses(self) -> tuple[IPAddress, ...]:
        return self._rt.local_addresses

    @property
    def local_networks(self) -> tuple[IPNetwork, ...]:
        return self._rt.local_networks

    @property
    def state_dir(self) -> Path:
        return self._rt.store.dir

    @property
    def members(self) -> tuple[Member, ...]:
        """The members of the pass running now (in a hook it calls), else of the last one."""
        return self._rt.snapshot.members

    @property
    def clients(self) -> tuple[Client, ...]:
        return tuple(
            Client(c.name, c.public_key, c.address, c.gateway) for c in self._rt.trust.clients()
        )

    @property
    def mesh_addresses(self) -> tuple[IPAddress, ...]:
        return self._rt.state.addresses.all()

    @property
    def interface(self) -> str:
        return self._rt.config.wireguard.interface

    @property
    def paths(self) -> Mapping[str, PathChoice]:
        return self._rt.snapshot.desired.paths

    @property
    def excluded(self) -> Mapping[str, str]:
        return self._rt.snapshot.desired.excluded

    @property
    def engine_stats(self) -> EngineStats:
        return self._rt.engine_stats

    @property
    def certificate_expires(self) -> float:
        return float(self._rt.own_chain.node.not_after)

    def plugin_metrics(self) -> tuple[MetricSample, ...]:
        return self._rt.plugins.metrics(self)

    async def gossip_stats(self) -> Mapping[str, Mapping[str, str]]:
        if not self._rt.has_gossip:
            raise GossipError("gossip is not running (starting, or restarting on a new address)")
        return await self._rt.gossip.client.stats()

    @property
    def ca_fingerprint(self) -> str:
        from meshd.mdns import ca_fingerprint

        return ca_fingerprint(self._rt.state.ca_public_key)

    @property
    def enrol_port(self) -> int | None:
        enrol = self._rt.config.enrol
        return enrol.port if enrol.enabled else None

    async def peer_stats(self) -> tuple[PeerStats, ...]:
        if not self._rt.has_iface:
            return ()
        return tuple(
            PeerStats(
                p.public_key, p.endpoint, p.last_handshake, p.rx_bytes, p.tx_bytes, p.keepalive
            )
            for p in await self._rt.iface.peer_stats()
        )

    async def set_endpoint(self, public_key: str, endpoint: str) -> None:
        if self._rt.has_iface:
            await self._rt.iface.set_endpoint(public_key, endpoint)

    async def restart_peer(self, public_key: str, endpoint: str) -> bool:
        if not self._rt.has_iface:
            return False
        return await self._rt.iface.restart_peer(public_key, endpoint)

    async def set_forwarding(self, enabled: bool, masquerade: Sequence[IPNetwork] = ()) -> None:
        await self._rt.forwarding.apply(enabled, masquerade)

    def refresh(self) -> None:
        self._rt.record_stale.set()
        self._rt.kick()

    def spawn(self, coro: Awaitable[None], *, name: str) -> None:
        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("plugin task %s failed", name)

        self._rt.tasks.start(guarded(), name=name)


async def bounded(step: Awaitable[Any], what: str, timeout: float) -> None:
    """Await one shutdown step for at most ``timeout``; its failure is logged, not raised."""
    try:
        async with asyncio.timeout(timeout):
            await step
    except TimeoutError:
        log.warning("%s did not finish within %.1f s; going on", what, timeout)
    except Exception as exc:
        log.warning("%s failed: %s", what, exc)
