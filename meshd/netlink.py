"""Links, addresses and routes through rtnetlink (pyroute2), namespace-aware.

:class:`Netlink` wraps one ``pyroute2.AsyncIPRoute`` socket, opened in the network
namespace ``netns`` (``None``: the current one, the normal case for an agent that
itself runs inside a namespace). Every pyroute2 or OS error is converted here into
:class:`meshd.errors.NetlinkError` naming the interface and the change.

Routes meshd adds carry their own protocol number (:data:`MESHD_ROUTE_PROTO`), so
:meth:`Netlink.routes` lists only ours and stale-route removal never touches a
route someone else made.

    async with Netlink(netns) as nl:
        index = await nl.wait_link("mesh0", timeout=5)
        await nl.set_link("mesh0", mtu=1420, up=True)
        await nl.sync_addresses("mesh0", [ip_interface("100.64.0.1/10")])
        await nl.add_routes("mesh0", [ip_network("10.9.0.0/16")])
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError as PyrouteNetlinkError

from meshd.errors import NetlinkError
from meshd.netns import call_in_netns
from meshd.types import IPNetwork

log = logging.getLogger(__name__)

MESHD_ROUTE_PROTO = 109
"""rtnetlink protocol number on meshd's routes (unassigned in iproute2's rt_protos)."""

_MAIN_TABLE = 254
_SOCKET_BUFFER = 1 << 20

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass(frozen=True)
class AddressChanges:
    added: tuple[IPInterface, ...] = ()
    removed: tuple[IPInterface, ...] = ()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, PyrouteNetlinkError):
        code = exc.code
        return f"{errno.errorcode.get(code, code)}: {exc.args[1] if len(exc.args) > 1 else ''}"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


@contextlib.contextmanager
def _converted(action: str) -> Any:
    try:
        yield
    except (PyrouteNetlinkError, OSError) as exc:
        hint = ""
        if getattr(exc, "code", getattr(exc, "errno", None)) == errno.EPERM:
            hint = " (needs root / CAP_NET_ADMIN)"
        raise NetlinkError(f"{action}: {_reason(exc)}{hint}") from exc


def netns_socket(netns: str, proto: int = socket.NETLINK_ROUTE) -> socket.socket:
    """A netlink socket of protocol ``proto`` living in the named network namespace."""

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        return sock

    return call_in_netns(netns, make)


class Netlink:
    """One rtnetlink socket in one network namespace. Use as ``async with``."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._ipr: Any = None

    async def open(self) -> Netlink:
        where = f"network namespace {self.netns}" if self.netns else "this namespace"
        with _converted(f"opening rtnetlink in {where}"):
            if self.netns:
                self._ipr = AsyncIPRoute(use_socket=netns_socket(self.netns))
            else:
                self._ipr = AsyncIPRoute()
            await self._ipr.setup_endpoint()
        return self

    def close(self) -> None:
        if self._ipr is not None:
            with contextlib.suppress(Exception):
                self._ipr.close()
            self._ipr = None

    async def __aenter__(self) -> Netlink:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def _sock(self) -> Any:
        if self._ipr is None:
            raise NetlinkError("the netlink socket is not open")
        return self._ipr

    async def _dump(self, result: Any) -> list[Any]:
        # AsyncIPRoute answers dumps with an async iterator, "get" with a list.
        if hasattr(result, "__aiter__"):
            return [msg async for msg in result]
        return list(result)

    # Links

    async def link_index(self, ifname: str) -> int | None:
        """The interface's index, ``None`` when there is no such interface."""
        with _converted(f"looking up {ifname}"):
            found = await self._sock.link_lookup(ifname=ifname)
        return int(found[0]) if found else None

    async def wait_link(self, ifname: str, *, timeout: float = 10.0) -> int:
        """Poll until ``ifname`` exists (a daemon creates it); NetlinkError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            index = await self.link_index(ifname)
            if index is not None:
                return index
            if time.monotonic() > deadline:
                raise NetlinkError(f"interface {ifname} did not appear within {timeout:g} s")
            await asyncio.sleep(0.02)

    async def _index(self, ifname: str) -> int:
        index = await self.link_index(ifname)
        if index is None:
            where = f" in {self.netns}" if self.netns else ""
            raise NetlinkError(f"no interface {ifname}{where}")
        return index

    async def create_link(self, ifname: str, kind: str) -> int:
        """Create a link of ``kind`` (e.g. ``wireguard``); an existing one of that kind is kept."""
        index = await self.link_index(ifname)
        if index is not None:
            existing = await self.link_kind(ifname)
            if existing != kind:
                raise NetlinkError(
                    f"{ifname} exists but is a {existing or 'plain'} link, not {kind}"
                )
            return index
        with _converted(f"creating {kind} interface {ifname}"):
            await self._sock.link("add", ifname=ifname, kind=kind)
        return await self._index(ifname)

    async def link_kind(self, ifname: str) -> str | None:
        """The link's kind (``wireguard``, ``tun``, ``veth``...); None for a plain device."""
        index = await self._index(ifname)
        with _converted(f"reading {ifname}"):
            (msg,) = await self._dump(await self._sock.link("get", index=index))
        info = msg.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        return str(kind) if kind is not None else None

    async def delete_link(self, ifname: str) -> None:
        """Delete ``ifname``; an interface that is already gone is fine."""
        index = await self.link_index(ifname)
        if index is None:
            return
        with _converted(f"deleting {ifname}"):
            try:
                await self._sock.link("del", index=index)
            except PyrouteNetlinkError as exc:
                if exc.code != errno.ENODEV:
                    raise

    async def set_link(self, ifname: str, *, mtu: int | None = None, up: bool = True) -> None:
        index = await self._index(ifname)
        changes: dict[str, Any] = {"state": "up" if up else "down"}
        if mtu is not None:
            changes["mtu"] = mtu
        with _converted(f"setting {ifname} {' '.join(f'{k} {v}' for k, v in changes.items())}"):
            await self._sock.link("set", index=index, **changes)

    async def link_info(self, ifname: str) -> tuple[int, bool]:
        """``(mtu, up)`` of ``ifname``."""
        index = await self._index(ifname)
        with _converted(f"reading {ifname}"):
            (msg,) = await self._dump(await self._sock.link("get", index=index))
        return int(msg.get("IFLA_MTU") or msg.get("mtu")), bool(msg["flags"] & 1)

    # Addresses

    async def addresses(self, ifname: str) -> tuple[IPInterface, ...]:
        """The interface's addresses, IPv6 link-local ones left out."""
        index = await self._index(ifname)
        with _converted(f"listing addresses of {ifname}"):
            msgs = await self._dump(await self._sock.addr("dump", index=index))
        found: list[IPInterface] = []
        for msg in msgs:
            if msg["index"] != index:
                continue
            iface = ipaddress.ip_interface(f"{msg.get('IFA_ADDRESS')}/{msg['prefixlen']}")
            if not iface.is_link_local:
                found.append(iface)
        return tuple(found)

    async def host_addresses(self, *, exclude: Iterable[str] = ()) -> tuple[IPInterface, ...]:
        """Every address of this namespace usable from elsewhere: no loopback, no link-local,
        nothing on the interfaces named in ``exclude`` (the mesh interface itself)."""
        skip = {index for name in exclude if (index := await self.link_index(name)) is not None}
        with _converted("listing addresses"):
            msgs = await self._dump(await self._sock.addr("dump"))
        found: list[IPInterface] = []
        for msg in msgs:
            if msg["index"] in skip:
                continue
            iface = ipaddress.ip_interface(f"{msg.get('IFA_ADDRESS')}/{msg['prefixlen']}")
            if not (iface.is_loopback or iface.is_link_local):
                found.append(iface)
        return tuple(found)

    async def sync_addresses(self, ifname: str, wanted: Iterable[IPInterface]) -> AddressChanges:
        """Make the interface's addresses exactly ``wanted`` (link-local ones aside)."""
        index = await self._index(ifname)
        want = set(wanted)
        have = set(await self.addresses(ifname))
        added = sorted(want - have, key=str)
        removed = sorted(have - want, key=str)
        for iface in removed:
            with _converted(f"removing {iface} from {ifname}"):
                await self._sock.addr(
                    "del", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen
                )
        for iface in added:
            with _converted(f"adding {iface} to {ifname}"):
                await self._sock.addr(
                    "add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen
                )
        return AddressChanges(tuple(added), tuple(removed))

    # Routes

    async def routes(self, ifname: str) -> tuple[IPNetwork, ...]:
        """The routes meshd made through ``ifname`` in the main table."""
        index = await self._index(ifname)
        found: list[IPNetwork] = []
        for family in (socket.AF_INET, socket.AF_INET6):
            with _converted(f"listing routes of {ifname}"):
                msgs = await self._dump(
                    await self._sock.route(
                        "dump", family=family, oif=index, table=_MAIN_TABLE, proto=MESHD_ROUTE_PROTO
                    )
                )
            for msg in msgs:
                # Filter here too: not every kernel filters dumps by these keys.
                if msg.get("proto") != MESHD_ROUTE_PROTO or msg.get("RTA_OIF") != index:
                    continue
                if (msg.get("RTA_TABLE") or msg.get("table")) != _MAIN_TABLE:
                    continue
                dst = msg.get("RTA_DST") or ("0.0.0.0" if family == socket.AF_INET else "::")
                found.append(ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False))
        return tuple(found)

    async def add_routes(self, ifname: str, prefixes: Sequence[IPNetwork]) -> None:
        """Route ``prefixes`` into ``ifname`` (replacing a route to the same prefix)."""
        index = await self._index(ifname)
        for net in prefixes:
            with _converted(f"adding route {net} dev {ifname}"):
                await self._route("replace", net, index)

    async def remove_routes(self, ifname: str, prefixes: Sequence[IPNetwork]) -> None:
        """Remove meshd's routes to ``prefixes``; one that is already gone is fine."""
        index = await self._index(ifname)
        for net in prefixes:
            with _converted(f"removing route {net} dev {ifname}"):
                try:
                    await self._route("del", net, index)
                except PyrouteNetlinkError as exc:
                    if exc.code != errno.ESRCH:
                        raise

    async def _route(self, action: str, net: IPNetwork, index: int) -> None:
        # Always in the main table and with meshd's protocol: how routes() knows ours.
        await self._sock.route(
            action, dst=net.with_prefixlen, oif=index, table=_MAIN_TABLE, proto=MESHD_ROUTE_PROTO
        )


@contextlib.asynccontextmanager
async def open_netlink(netns: str | None = None) -> AsyncIterator[Netlink]:
    """``async with open_netlink(ns) as nl``: a :class:`Netlink` closed on exit."""
    nl = await Netlink(netns).open()
    try:
        yield nl
    finally:
        nl.close()


# rtnetlink multicast groups (linux/rtnetlink.h): address changes of either family.
_RTMGRP_IPV4_IFADDR = 0x10
_RTMGRP_IPV6_IFADDR = 0x100


async def watch_addresses(on_change: Callable[[], None]) -> None:
    """Call ``on_change`` after every address added or removed in this namespace.

    Netlink address events, not polling: the kernel tells the moment a DHCP lease
    renews with a new address or a laptop moves. Runs until cancelled.
    """
    try:
        sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.NETLINK_ROUTE
        )
        sock.bind((0, _RTMGRP_IPV4_IFADDR | _RTMGRP_IPV6_IFADDR))
    except OSError as exc:
        raise NetlinkError(f"cannot watch address changes: {_reason(exc)}") from exc
    loop = asyncio.get_running_loop()
    try:
        while True:
            try:
                await loop.sock_recv(sock, 65536)
            except OSError as exc:
                # ENOBUFS: events were lost; the caller re-reads everything anyway.
                if exc.errno != errno.ENOBUFS:
                    raise NetlinkError(f"watching address changes: {_reason(exc)}") from exc
            on_change()
    finally:
        sock.close()
