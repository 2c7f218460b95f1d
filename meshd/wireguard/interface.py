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
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from meshd.errors import NetlinkError, WireGuardError
from meshd.netlink import IPInterface, Netlink
from meshd.types import IPNetwork, PeerConfig
from meshd.wireguard.backend import (
    DeviceConfig,
    DeviceState,
    OpKind,
    PeerOp,
    PeerState,
    WireGuardBackend,
)
from meshd.wireguard.kernel import KernelBackend
from meshd.wireguard.reconcile import RoutePlan, plan_peers, plan_routes
from meshd.wireguard.userspace import UserspaceBackend

log = logging.getLogger(__name__)

BACKENDS = ("auto", "kernel", "userspace")
REBUILD_TIMEOUT = 10.0


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
    userspace = UserspaceBackend(ifname, netns)
    await userspace.start()
    return userspace


class WireGuardInterface:
    """A configured mesh interface; build it with :meth:`open`."""

    def __init__(self, spec: InterfaceSpec, backend: WireGuardBackend) -> None:
        self.spec = spec
        self.backend = backend
        self._desired: tuple[PeerConfig, ...] | None = None
        self._lock = asyncio.Lock()
        self.rebuilds = 0
        """How many times the interface was rebuilt after its daemon died."""
        # One rtnetlink socket for the interface's life: opening one in a namespace costs ~15 ms.
        self._netlink: Netlink | None = None
        backend.set_restart_hook(self._rebuild)

    async def _nl(self) -> Netlink:
        if self._netlink is None:
            self._netlink = await Netlink(self.spec.netns).open()
        return self._netlink

    @classmethod
    async def open(cls, spec: InterfaceSpec, *, backend: str = "auto") -> WireGuardInterface:
        """Create the interface, set its key, port, MTU and addresses, and bring it up."""
        started = await start_backend(spec.ifname, spec.netns, backend=backend)
        iface = cls(spec, started)
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
                    result = await self._pass(self._desired or ())
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

    async def _pass(self, peers: Sequence[PeerConfig]) -> ReconcileResult:
        state = await self.backend.read_state()
        ops = plan_peers(state.peers, peers)
        # Valid input: this is what a rebuild re-applies, even if applying it fails below.
        self._desired = tuple(peers)
        if ops:
            await self.backend.apply(ops)
        prefixes = [net for peer in peers for net in peer.allowed_ips]
        nl = await self._nl()
        routes = plan_routes(prefixes, self._on_link(), await nl.routes(self.ifname))
        if routes.remove:
            await nl.remove_routes(self.ifname, routes.remove)
        if routes.add:
            await nl.add_routes(self.ifname, routes.add)
        if ops or routes:
            log.info(
                "%s: %d peer op(s), %d route(s) added, %d removed",
                self.ifname,
                len(ops),
                len(routes.add),
                len(routes.remove),
            )
        return ReconcileResult(ops, routes)

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
        """Every live peer with endpoint, last handshake and rx/tx bytes."""
        return (await self.backend.read_state()).peers

    async def supervise(self) -> None:
        """Keep the interface alive (restart wireguard-go and rebuild); run as a task."""
        await self.backend.supervise()

    def _close_netlink(self) -> None:
        if self._netlink is not None:
            self._netlink.close()
            self._netlink = None

    async def close(self) -> None:
        """Remove the interface (stopping wireguard-go)."""
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
