"""One mesh interface: a WireGuard backend plus its link, addresses and routes.

This is what the agent drives:

    spec = InterfaceSpec(ifname="mesh0", private_key=key, listen_port=51820,
                         addresses=(ip_interface("100.64.0.1/10"),))
    iface = await WireGuardInterface.open(spec, backend="auto")
    tg.create_task(iface.supervise())           # heals a dead wireguard-go
    result = await iface.reconcile(peers)       # desired PeerConfigs -> minimal changes
    stats = await iface.peer_stats()            # endpoint, last handshake, rx/tx per peer
    await iface.close()                         # removes the interface

``backend`` is ``"userspace"`` (wireguard-go), ``"kernel"`` or ``"auto"`` (kernel
when the module can create the link, else userspace). A reconcile pass sets the
peers (:func:`meshd.wireguard.reconcile.plan_peers`) and then the routes for every
allowed prefix outside the interface's own networks, removing meshd's stale routes.
After wireguard-go restarts, the interface is rebuilt: link, addresses, device
keys, the last desired peers and their routes.

A pass plans from what the previous pass left (:class:`~meshd.wireguard.reconcile.AppliedPeers`
and the routes it made) rather than reading 1,000 peers over UAPI and dumping the
routes each time: a pass with no change does no I/O at all, and a change touches
only the peers that changed. What someone else does to the device (``wg set`` by
hand, a lost route) is found by a *full check*: read the device, dump the routes,
plan against what is really there. One runs on the first pass, after a pass that
failed, after a rebuild, on the first pass at least ``full_check_interval``
(:data:`FULL_CHECK_INTERVAL`) after the last one, and on the first pass after
:meth:`~WireGuardInterface.peer_stats` saw peers other than the record says.
``peer_stats`` has to read the whole device anyway (handshake times live only there;
UAPI has no partial read), so the agent's 2.5 s handshake watch doubles as a cheap
drift detector for peers, keys and prefixes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from meshd.errors import NetlinkError, WireGuardError
from meshd.identity import public_key_of
from meshd.netlink import IPInterface, Netlink
from meshd.types import IPNetwork, PeerConfig
from meshd.wireguard.backend import (
    DeviceConfig,
    DeviceState,
    OpKind,
    PeerOp,
    PeerState,
    WireGuardBackend,
    normalize_endpoint,
)
from meshd.wireguard.kernel import KernelBackend
from meshd.wireguard.policy import EXIT_FWMARK, route_default, unroute_default
from meshd.wireguard.reconcile import (
    AppliedPeers,
    RoutePlan,
    applied_peers,
    plan_peers,
    plan_routes,
)
from meshd.wireguard.userspace import UserspaceBackend

log = logging.getLogger(__name__)

BACKENDS = ("auto", "kernel", "userspace")
REBUILD_TIMEOUT = 10.0
FULL_CHECK_INTERVAL = 30.0
"""Seconds between full checks of the device. The agent reconciles every 5 s, so a
lost route or an endpoint set by hand lives at most ~35 s (a changed peer, key or port
is seen sooner, by ``peer_stats``); a full check at 1,000 peers costs ~20 ms, once
every six passes rather than every pass. (A dead wireguard-go does not wait for it:
its restart rebuilds the interface with a full check.)"""


@dataclass(frozen=True)
class InterfaceSpec:
    """Everything about the interface that is not a peer."""

    ifname: str
    private_key: str = field(repr=False)
    listen_port: int | None = None
    addresses: tuple[IPInterface, ...] = ()
    mtu: int = 1420
    fwmark: int | None = None
    netns: str | None = None

    @property
    def device(self) -> DeviceConfig:
        return DeviceConfig(self.private_key, self.listen_port, self.fwmark)


@dataclass(frozen=True)
class ReconcileResult:
    """What one pass changed; ``operations == 0`` means the interface was already in sync."""

    peer_ops: tuple[PeerOp, ...] = ()
    routes: RoutePlan = field(default_factory=RoutePlan)

    @property
    def operations(self) -> int:
        return len(self.peer_ops) + len(self.routes)


async def start_backend(
    ifname: str, netns: str | None = None, *, backend: str = "auto"
) -> WireGuardBackend:
    """Create the interface with the chosen backend and return that backend, started."""
    if backend not in BACKENDS:
        raise WireGuardError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend in ("auto", "kernel"):
        kernel = KernelBackend(ifname, netns)
        try:
            await kernel.start()
            log.info("%s: using the kernel WireGuard module", ifname)
            return kernel
        except WireGuardError as exc:
            if backend == "kernel":
                raise
            log.info("%s: kernel WireGuard not usable (%s); using wireguard-go", ifname, exc)
    # At debug, wireguard-go's handshakes and keepalives join the agent's log: how a
    # tunnel that formed late is explained.
    verbose = logging.getLogger("meshd.wireguard.userspace").isEnabledFor(logging.DEBUG)
    userspace = UserspaceBackend(ifname, netns, log_level="verbose" if verbose else "error")
    await userspace.start()
    return userspace


class WireGuardInterface:
    """A configured mesh interface; build it with :meth:`open`."""

    def __init__(
        self,
        spec: InterfaceSpec,
        backend: WireGuardBackend,
        *,
        full_check_interval: float = FULL_CHECK_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self.backend = backend
        self.full_check_interval = full_check_interval
        self._clock = clock
        self._desired: tuple[PeerConfig, ...] | None = None
        # What the last pass left on the device; None: unknown, the next pass reads it.
        self._applied: AppliedPeers | None = None
        self._routes: frozenset[IPNetwork] | None = None
        # IP versions whose default route goes into the mesh (an exit node; policy.py)
        self._defaults: frozenset[int] = frozenset()
        self._checked_at = 0.0
        self._drifted = False  # peer_stats saw a device unlike the record
        self._passes = 0
        self._lock = asyncio.Lock()
        self.rebuilds = 0
        """How many times the interface was rebuilt after its daemon died."""
        self.full_checks = 0
        """How many passes read the device and its routes instead of trusting the last pass."""
        # One rtnetlink socket for the interface's life: opening one in a namespace costs ~15 ms.
        self._netlink: Netlink | None = None
        backend.set_restart_hook(self._rebuild)

    async def _nl(self) -> Netlink:
        if self._netlink is None:
            self._netlink = await Netlink(self.spec.netns).open()
        return self._netlink

    @classmethod
    async def open(
        cls,
        spec: InterfaceSpec,
        *,
        backend: str = "auto",
        full_check_interval: float = FULL_CHECK_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> WireGuardInterface:
        """Create the interface, set its key, port, MTU and addresses, and bring it up."""
        started = await start_backend(spec.ifname, spec.netns, backend=backend)
        iface = cls(spec, started, full_check_interval=full_check_interval, clock=clock)
        try:
            await iface._setup()
        except BaseException:
            iface._close_netlink()
            await started.stop()
            raise
        return iface

    @property
    def ifname(self) -> str:
        return self.spec.ifname

    async def _setup(self) -> None:
        await self.backend.configure_device(self.spec.device)
        nl = await self._nl()
        await nl.wait_link(self.ifname)
        await nl.set_link(self.ifname, mtu=self.spec.mtu, up=True)
        await nl.sync_addresses(self.ifname, self.spec.addresses)

    async def _rebuild(self) -> None:
        # The backend re-applied the device keys; the link, its addresses and peers are new.
        # The dead daemon's TUN device can linger for a moment after the new one answers, so
        # a lookup may hit the old index (ENODEV): retry with fresh lookups for a while.
        deadline = time.monotonic() + REBUILD_TIMEOUT
        async with self._lock:
            while True:
                try:
                    await self._setup()
                    result = await self._pass(self._desired or (), full=True)
                    break
                except (NetlinkError, WireGuardError) as exc:
                    if time.monotonic() > deadline:
                        raise
                    log.debug("%s: rebuild not yet possible: %s", self.ifname, exc)
                    await asyncio.sleep(0.1)
            self.rebuilds += 1
            log.warning("%s: rebuilt after restart (%d operations)", self.ifname, result.operations)

    def _on_link(self) -> list[IPNetwork]:
        return [iface.network for iface in self.spec.addresses]

    def _full_check_due(self) -> bool:
        return (
            self._applied is None
            or self._routes is None
            or self._drifted
            or self._clock() - self._checked_at >= self.full_check_interval
        )

    async def _pass(self, peers: Sequence[PeerConfig], *, full: bool = False) -> ReconcileResult:
        self._passes += 1
        base = None if full or self._full_check_due() else self._applied
        checked_at = self._clock()
        if base is None:  # a full check: plan against the device as it is
            state = await self.backend.read_state()
            live = state.peer_map()
            ops = plan_peers(live.values(), peers)
            # The input is valid and the old record void: a failure from here on leaves no
            # record, so the next pass checks again.
            self._applied, self._drifted = None, False
            await self._repair_device(state)
        else:
            live = base.live
            ops = base.plan(peers)
        # Valid input: this is what a rebuild re-applies, even if applying it fails below.
        self._desired = tuple(peers)
        if ops:
            self._applied = None  # unknown until the device answers
            await self.backend.apply(ops)
        self._applied = (
            base.after(peers, ops)
            if base is not None
            else AppliedPeers(peers, applied_peers(live, ops))
        )
        # Routes follow the allowed prefixes: unless an op changed those, they are as the
        # last pass left them.
        routes = RoutePlan()
        if base is None or any(
            op.allowed_ips is not None or op.kind is OpKind.REMOVE for op in ops
        ):
            routes = await self._sync_routes(peers, dump=base is None)
        if base is None:
            self._checked_at = checked_at
            self.full_checks += 1
        if ops or routes:
            log.info(
                "%s: %d peer op(s), %d route(s) added, %d removed",
                self.ifname,
                len(ops),
                len(routes.add),
                len(routes.remove),
            )
        return ReconcileResult(ops, routes)

    def _device_matches(self, state: DeviceState) -> bool:
        spec = self.spec
        return (
            state.public_key == public_key_of(spec.private_key)
            and spec.listen_port in (None, state.listen_port)
            and (spec.fwmark or None) in (None, state.fwmark)  # 0 is off, read back as None
        )

    async def _repair_device(self, state: DeviceState) -> None:
        # A key, port or fwmark set by hand: peers would not reach us with it.
        if not self._device_matches(state):
            log.warning("%s: private key, port or fwmark changed behind meshd's back", self.ifname)
            await self.backend.configure_device(self.spec.device)

    async def _sync_routes(self, peers: Sequence[PeerConfig], *, dump: bool) -> RoutePlan:
        nl = await self._nl()
        live = self._routes
        if dump or live is None:
            live = frozenset(await nl.routes(self.ifname))
        prefixes = [net for peer in peers for net in peer.allowed_ips]
        routes = plan_routes(prefixes, self._on_link(), live)
        self._routes = None
        if routes.remove:
            await nl.remove_routes(self.ifname, routes.remove)
        if routes.add:
            await nl.add_routes(self.ifname, routes.add)
        self._routes = live.difference(routes.remove).union(routes.add)
        await self._sync_defaults(
            frozenset(net.version for net in prefixes if net.prefixlen == 0), again=dump
        )
        return routes

    async def _sync_defaults(self, wanted: frozenset[int], *, again: bool) -> None:
        """Policy routing for default prefixes (:mod:`meshd.wireguard.policy`)."""
        if wanted and self.spec.fwmark != EXIT_FWMARK:
            self.spec = replace(self.spec, fwmark=EXIT_FWMARK)
            await self.backend.configure_device(self.spec.device)
        for version in sorted(wanted - self._defaults if not again else wanted):
            await route_default(self.spec.netns, self.ifname, version)
        for version in sorted(self._defaults - wanted):
            await unroute_default(self.spec.netns, version)
        self._defaults = wanted

    async def reconcile(self, peers: Sequence[PeerConfig]) -> ReconcileResult:
        """Make the interface's peers and routes match ``peers``; idempotent.

        Bad input (a malformed key, one prefix on two peers, a bad endpoint) raises
        before anything changes. A failure while applying leaves a state the next
        pass repairs.
        """
        async with self._lock:
            return await self._pass(tuple(peers))

    async def set_addresses(self, addresses: Sequence[IPInterface]) -> None:
        """Put exactly ``addresses`` on the link (this node moved to a new mesh address)."""
        async with self._lock:
            self.spec = replace(self.spec, addresses=tuple(addresses))
            # What is on-link changed, so which prefixes need a route: the next pass checks.
            self._routes = None
            await (await self._nl()).sync_addresses(self.ifname, self.spec.addresses)

    async def set_private_key(self, private_key: str) -> None:
        """Switch the device to a new private key; kept for a rebuild after a restart."""
        async with self._lock:
            self.spec = replace(self.spec, private_key=private_key)
            await self.backend.configure_device(self.spec.device)

    async def forget_sources(self) -> None:
        """This machine's addresses changed: set every peer's endpoint again.

        WireGuard sends to a peer from the source address it used last (wireguard-go's
        sticky sockets); once that address is gone every send fails with "network is
        unreachable" until the endpoint is set anew, which clears the remembered source.
        """
        async with self._lock:
            peers = (await self.backend.read_state()).peers
            ops = [
                PeerOp(OpKind.UPDATE, p.public_key, endpoint=p.endpoint)
                for p in peers
                if p.endpoint is not None
            ]
            if ops:
                await self.backend.apply(ops)

    async def set_endpoint(self, public_key: str, endpoint: str) -> None:
        """Aim one existing peer at ``endpoint`` now, whatever WireGuard learnt since.

        WireGuard moves a peer's endpoint to the source of its last authenticated
        packet; while two paths deliver (a relay's and a new direct one), the older
        one can win it back. The next pass plans from the desired state as usual."""
        op = PeerOp(OpKind.UPDATE, public_key, endpoint=normalize_endpoint(endpoint))
        async with self._lock:
            await self.backend.apply([op])

    async def restart_peer(self, public_key: str, endpoint: str) -> bool:
        """Re-create one peer of the last pass, aimed at ``endpoint``, so that its next
        packet starts a handshake at once; False if the last pass has no such peer.

        WireGuard sends no handshake initiation within 5 s of the previous one, also
        when that one could not leave (no endpoint yet, or one that cannot work): a peer
        whose first working path just appeared would wait up to 5 s for its first
        packet. A new peer has no such past. Its session, if any, is dropped: use it for
        a peer that has none."""
        async with self._lock:
            peer = next((p for p in self._desired or () if p.public_key == public_key), None)
            if peer is None:
                return False
            fresh = plan_peers((), [replace(peer, endpoint=normalize_endpoint(endpoint))])
            ops = (PeerOp(OpKind.REMOVE, public_key), *fresh)
            self._applied = None  # the next pass checks the device
            await self.backend.apply(ops)
        return True

    def poke(self, peers: Iterable[PeerConfig]) -> None:
        """Start a handshake with each peer now, rather than after WireGuard's 5 s retry:
        one empty UDP datagram (discard port) to its first allowed address goes into the
        tunnel, and traffic into the tunnel makes WireGuard initiate at once."""
        for peer in peers:
            if not peer.allowed_ips:
                continue
            address = peer.allowed_ips[0].network_address
            family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
            try:
                with socket.socket(family, socket.SOCK_DGRAM) as sock:
                    sock.setblocking(False)
                    sock.sendto(b"", (str(address), 9))
            except OSError as exc:
                log.debug("cannot poke %s: %s", address, exc)

    @property
    def backend_name(self) -> str:
        """``kernel`` or ``userspace``, for status and diagnostics."""
        return self.backend.name

    async def state(self) -> DeviceState:
        return await self.backend.read_state()

    async def peer_stats(self) -> tuple[PeerState, ...]:
        """Every live peer with endpoint, last handshake and rx/tx bytes, read from the device.

        A read that disagrees with what the last pass left makes the next pass a full check.
        """
        passes, busy = self._passes, self._lock.locked()
        state = await self.backend.read_state()
        record = self._applied
        # Compared only when no pass ran meanwhile: one could have changed the device mid-read.
        quiet = not busy and not self._lock.locked() and passes == self._passes
        if (
            quiet
            and record is not None
            and not (record.matches(state.peers) and self._device_matches(state))
        ):
            log.info("%s: the device changed behind meshd's back; checking all", self.ifname)
            self._drifted = True
        return state.peers

    async def supervise(self) -> None:
        """Keep the interface alive (restart wireguard-go and rebuild); run as a task."""
        await self.backend.supervise()

    def _close_netlink(self) -> None:
        if self._netlink is not None:
            self._netlink.close()
            self._netlink = None

    async def close(self) -> None:
        """Remove the interface (stopping wireguard-go) and its policy routing rules."""
        for version in sorted(self._defaults):
            try:
                await unroute_default(self.spec.netns, version)
            except NetlinkError as exc:
                log.warning("%s: cannot remove the exit routing rules: %s", self.ifname, exc)
        self._defaults = frozenset()
        self._close_netlink()
        await self.backend.stop()


def parse_interfaces(texts: Sequence[str]) -> tuple[IPInterface, ...]:
    """``["100.64.0.1/10", ...]`` as interface addresses; WireGuardError names a bad one."""
    found: list[IPInterface] = []
    for text in texts:
        try:
            found.append(ipaddress.ip_interface(text))
        except ValueError as exc:
            raise WireGuardError(f"{text!r} is not an address with prefix length") from exc
    return tuple(found)
