"""Links, addresses and routes through rtnetlink, namespace-aware.

:class:`Netlink` is one ``NETLINK_ROUTE`` socket, opened in the network namespace
``netns`` (``None``: the current one, the normal case for an agent that itself
runs inside a namespace), speaking the few rtnetlink messages meshd needs. Every
kernel or OS error is converted here into :class:`meshd.errors.NetlinkError`
naming the interface and the change.

The messages are packed here rather than through pyroute2: importing pyroute2
loads every netlink family it knows (about 10 MiB and 70-100 ms of an agent's
start-up, measured with bench/startup.py), for the eleven requests below.

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
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NamedTuple

from meshd.errors import NetlinkError
from meshd.netns import call_in_netns
from meshd.types import IPNetwork

log = logging.getLogger(__name__)

MESHD_ROUTE_PROTO = 109
"""rtnetlink protocol number on meshd's routes (unassigned in iproute2's rt_protos)."""

_MAIN_TABLE = 254
_SOCKET_BUFFER = 1 << 20

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

# From linux/netlink.h, linux/rtnetlink.h, linux/if_link.h, linux/if_addr.h.
_NLMSG = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_NLATTR = struct.Struct("=HH")  # length, type
_IFINFOMSG = struct.Struct("=BxHiII")  # family, device type, index, flags, change mask
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, index
_RTMSG = struct.Struct(
    "=BBBBBBBBI"
)  # family, dst len, src len, tos, table, proto, scope, type, flags
_U32 = struct.Struct("=I")
_ERRNO = struct.Struct("=i")
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO, IFLA_INFO_KIND = 3, 4, 18, 1
IFLA_STATS64 = 23  # struct rtnl_link_stats64: rx_packets first, a u64
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_TABLE = 1, 4, 15
_NLA_TYPE_MASK = 0x3FFF  # without the NLA_F_NESTED / NLA_F_NET_BYTEORDER bits
_IFF_UP = 0x1
_RT_SCOPE_UNIVERSE = 0
_RTN_UNICAST = 1
_RECV_SIZE = 1 << 16


@dataclass(frozen=True)
class AddressChanges:
    added: tuple[IPInterface, ...] = ()
    removed: tuple[IPInterface, ...] = ()


def _reason(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0)
    text = exc.strerror or str(exc)
    return f"{name}: {text}" if name else text


@contextlib.contextmanager
def _converted(action: str) -> Any:
    try:
        yield
    except OSError as exc:
        hint = " (needs root / CAP_NET_ADMIN)" if exc.errno == errno.EPERM else ""
        raise NetlinkError(f"{action}: {_reason(exc)}{hint}") from exc


# ---------------------------------------------------------------- the wire format


def attribute(kind: int, value: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    length = _NLATTR.size + len(value)
    return _NLATTR.pack(length, kind) + value + b"\0" * (-length % 4)


def parse_attributes(data: bytes) -> dict[int, bytes]:
    """Attribute type -> value of a run of attributes; a truncated tail is ignored."""
    found: dict[int, bytes] = {}
    offset = 0
    while offset + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, offset)
        if length < _NLATTR.size or offset + length > len(data):
            break
        found[kind & _NLA_TYPE_MASK] = data[offset + _NLATTR.size : offset + length]
        offset += (length + 3) & ~3
    return found


def message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    return _NLMSG.pack(_NLMSG.size + len(body), kind, flags, seq, 0) + body


def parse_messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, sequence, payload) of each message in one datagram; a truncated tail is ignored."""
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length, kind, _, seq, _ = _NLMSG.unpack_from(data, offset)
        if length < _NLMSG.size or offset + length > len(data):
            break
        yield kind, seq, data[offset + _NLMSG.size : offset + length]
        offset += (length + 3) & ~3


def _text(value: bytes) -> str:
    return value.split(b"\0", 1)[0].decode(errors="replace")


def _family(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    return socket.AF_INET if address.version == 4 else socket.AF_INET6


@dataclass(frozen=True)
class _Link:
    index: int
    flags: int
    attrs: Mapping[int, bytes]


class _Address(NamedTuple):
    ifindex: int
    interface: IPInterface


@dataclass(frozen=True)
class _Route:
    table: int
    proto: int
    oif: int | None
    dst: IPNetwork


def _parse_link(payload: bytes) -> _Link:
    _, _, index, flags, _ = _IFINFOMSG.unpack_from(payload)
    return _Link(index, flags, parse_attributes(payload[_IFINFOMSG.size :]))


def _parse_address(payload: bytes) -> _Address | None:
    family, prefixlen, _, _, index = _IFADDRMSG.unpack_from(payload)
    attrs = parse_attributes(payload[_IFADDRMSG.size :])
    raw = attrs.get(IFA_ADDRESS, attrs.get(IFA_LOCAL))
    if raw is None or family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return _Address(index, ipaddress.ip_interface((ipaddress.ip_address(raw), prefixlen)))


def _parse_route(payload: bytes) -> _Route:
    family, dst_len, _, _, table, proto, _, _, _ = _RTMSG.unpack_from(payload)
    attrs = parse_attributes(payload[_RTMSG.size :])
    if RTA_DST in attrs:
        dst = ipaddress.ip_address(attrs[RTA_DST])
    else:  # a default route
        dst = ipaddress.IPv4Address(0) if family == socket.AF_INET else ipaddress.IPv6Address(0)
    if RTA_TABLE in attrs:  # tables above 255 are only here
        table = _U32.unpack(attrs[RTA_TABLE][:4])[0]
    oif = _U32.unpack(attrs[RTA_OIF][:4])[0] if RTA_OIF in attrs else None
    return _Route(table, proto, oif, ipaddress.ip_network((dst, dst_len), strict=False))


def _netlink_socket(proto: int = socket.NETLINK_ROUTE) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
    return sock


def netns_socket(netns: str, proto: int = socket.NETLINK_ROUTE) -> socket.socket:
    """A netlink socket of protocol ``proto`` living in the named network namespace."""
    return call_in_netns(netns, lambda: _netlink_socket(proto))


class Netlink:
    """One rtnetlink socket in one network namespace. Use as ``async with``."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._socket: socket.socket | None = None
        self._seq = 0
        # One request in flight at a time: each waits for its own answer.
        self._lock = asyncio.Lock()
        # Prefixes whose route someone else holds (warned about once).
        self._foreign: set[IPNetwork] = set()

    async def open(self) -> Netlink:
        where = f"network namespace {self.netns}" if self.netns else "this namespace"
        with _converted(f"opening rtnetlink in {where}"):
            sock = netns_socket(self.netns) if self.netns else _netlink_socket()
            sock.setblocking(False)
            sock.bind((0, 0))
            self._socket = sock
        return self

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    async def __aenter__(self) -> Netlink:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def _request(self, kind: int, flags: int, body: bytes) -> list[bytes]:
        """Send one request; the payloads of its answers (OSError for the kernel's error).

        A dump ends with NLMSG_DONE, a change is acknowledged (NLM_F_ACK), a plain get
        is answered by one message.
        """
        if self._socket is None:
            raise NetlinkError("the netlink socket is not open")
        sock = self._socket
        loop = asyncio.get_running_loop()
        async with self._lock:
            self._seq = self._seq % 0xFFFFFFFF + 1
            seq = self._seq
            await loop.sock_sendall(sock, message(kind, flags | NLM_F_REQUEST, seq, body))
            answers: list[bytes] = []
            while True:
                data = await loop.sock_recv(sock, _RECV_SIZE)
                for answer_kind, answer_seq, payload in parse_messages(data):
                    if answer_seq != seq:
                        continue  # the late answer of a request that was cancelled
                    if answer_kind in (NLMSG_ERROR, NLMSG_DONE):
                        code = -_ERRNO.unpack_from(payload)[0] if len(payload) >= 4 else 0
                        if code > 0:
                            raise OSError(code, os.strerror(code))
                        return answers
                    answers.append(payload)
                    if not flags & (NLM_F_ACK | NLM_F_DUMP):
                        return answers

    async def _get_link(self, index: int, ifname: str) -> _Link:
        with _converted(f"reading {ifname}"):
            (payload,) = await self._request(
                RTM_GETLINK, 0, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0)
            )
        return _parse_link(payload)

    async def _dump_addresses(self, action: str) -> list[_Address]:
        with _converted(action):
            payloads = await self._request(
                RTM_GETADDR, NLM_F_DUMP, _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
            )
        return [found for p in payloads if (found := _parse_address(p)) is not None]

    # Links

    async def link_index(self, ifname: str) -> int | None:
        """The interface's index, ``None`` when there is no such interface."""
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        body += attribute(IFLA_IFNAME, ifname.encode() + b"\0")
        with _converted(f"looking up {ifname}"):
            try:
                (payload,) = await self._request(RTM_GETLINK, 0, body)
            except OSError as exc:
                if exc.errno == errno.ENODEV:
                    return None
                raise
        return _parse_link(payload).index

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
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        body += attribute(IFLA_IFNAME, ifname.encode() + b"\0")
        body += attribute(IFLA_LINKINFO, attribute(IFLA_INFO_KIND, kind.encode()))
        with _converted(f"creating {kind} interface {ifname}"):
            await self._request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK, body)
        return await self._index(ifname)

    async def link_kind(self, ifname: str) -> str | None:
        """The link's kind (``wireguard``, ``tun``, ``veth``...); None for a plain device."""
        link = await self._get_link(await self._index(ifname), ifname)
        info = parse_attributes(link.attrs.get(IFLA_LINKINFO, b""))
        kind = info.get(IFLA_INFO_KIND)
        return _text(kind) if kind is not None else None

    async def delete_link(self, ifname: str) -> None:
        """Delete ``ifname``; an interface that is already gone is fine."""
        index = await self.link_index(ifname)
        if index is None:
            return
        with _converted(f"deleting {ifname}"):
            try:
                await self._request(
                    RTM_DELLINK, NLM_F_ACK, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0)
                )
            except OSError as exc:
                if exc.errno != errno.ENODEV:
                    raise

    async def set_link(self, ifname: str, *, mtu: int | None = None, up: bool = True) -> None:
        index = await self._index(ifname)
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, _IFF_UP if up else 0, _IFF_UP)
        changes = f"state {'up' if up else 'down'}"
        if mtu is not None:
            body += attribute(IFLA_MTU, _U32.pack(mtu))
            changes += f" mtu {mtu}"
        with _converted(f"setting {ifname} {changes}"):
            await self._request(RTM_NEWLINK, NLM_F_ACK, body)

    async def link_info(self, ifname: str) -> tuple[int, bool]:
        """``(mtu, up)`` of ``ifname``."""
        link = await self._get_link(await self._index(ifname), ifname)
        (mtu,) = _U32.unpack(link.attrs[IFLA_MTU][:4])
        return mtu, bool(link.flags & _IFF_UP)

    async def received_packets(self, ifname: str) -> int:
        """How many packets ``ifname`` has received (for a WireGuard interface: packets
        that came out of a tunnel)."""
        link = await self._get_link(await self._index(ifname), ifname)
        stats = link.attrs.get(IFLA_STATS64, b"")
        if len(stats) < 8:
            raise NetlinkError(f"{ifname}: the kernel gave no packet counters")
        return int(struct.unpack_from("=Q", stats)[0])

    # Addresses

    async def addresses(self, ifname: str) -> tuple[IPInterface, ...]:
        """The interface's addresses, IPv6 link-local ones left out."""
        index = await self._index(ifname)
        found = await self._dump_addresses(f"listing addresses of {ifname}")
        return tuple(
            a.interface for a in found if a.ifindex == index and not a.interface.is_link_local
        )

    async def host_addresses(self, *, exclude: Iterable[str] = ()) -> tuple[IPInterface, ...]:
        """Every address of this namespace usable from elsewhere: no loopback, no link-local,
        nothing on the interfaces named in ``exclude`` (the mesh interface itself)."""
        skip = {index for name in exclude if (index := await self.link_index(name)) is not None}
        found = await self._dump_addresses("listing addresses")
        return tuple(
            a.interface
            for a in found
            if a.ifindex not in skip and not (a.interface.is_loopback or a.interface.is_link_local)
        )

    async def _change_address(self, kind: int, flags: int, index: int, iface: IPInterface) -> None:
        raw = iface.ip.packed
        body = _IFADDRMSG.pack(_family(iface.ip), iface.network.prefixlen, 0, 0, index)
        body += attribute(IFA_LOCAL, raw) + attribute(IFA_ADDRESS, raw)
        await self._request(kind, flags | NLM_F_ACK, body)

    async def sync_addresses(self, ifname: str, wanted: Iterable[IPInterface]) -> AddressChanges:
        """Make the interface's addresses exactly ``wanted`` (link-local ones aside)."""
        index = await self._index(ifname)
        want = set(wanted)
        have = set(await self.addresses(ifname))
        added = sorted(want - have, key=str)
        removed = sorted(have - want, key=str)
        for iface in removed:
            with _converted(f"removing {iface} from {ifname}"):
                await self._change_address(RTM_DELADDR, 0, index, iface)
        for iface in added:
            with _converted(f"adding {iface} to {ifname}"):
                await self._change_address(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, index, iface)
        return AddressChanges(tuple(added), tuple(removed))

    # Routes

    async def routes(self, ifname: str) -> tuple[IPNetwork, ...]:
        """The routes meshd made through ``ifname`` in the main table."""
        index = await self._index(ifname)
        found: list[IPNetwork] = []
        for family in (socket.AF_INET, socket.AF_INET6):
            request = _RTMSG.pack(family, 0, 0, 0, _MAIN_TABLE, MESHD_ROUTE_PROTO, 0, 0, 0)
            with _converted(f"listing routes of {ifname}"):
                payloads = await self._request(RTM_GETROUTE, NLM_F_DUMP, request)
            for payload in payloads:
                route = _parse_route(payload)
                # The kernel does not filter a dump by these keys: filter here.
                if (route.proto, route.table, route.oif) == (MESHD_ROUTE_PROTO, _MAIN_TABLE, index):
                    found.append(route.dst)
        return tuple(found)

    async def _change_route(self, kind: int, flags: int, index: int, net: IPNetwork) -> None:
        family = _family(net.network_address)
        body = _RTMSG.pack(
            family,
            net.prefixlen,
            0,
            0,
            _MAIN_TABLE,
            MESHD_ROUTE_PROTO,
            _RT_SCOPE_UNIVERSE,
            _RTN_UNICAST,
            0,
        )
        body += attribute(RTA_DST, net.network_address.packed)
        body += attribute(RTA_OIF, _U32.pack(index))
        await self._request(kind, flags | NLM_F_ACK, body)

    async def add_routes(self, ifname: str, prefixes: Sequence[IPNetwork]) -> None:
        """Route ``prefixes`` into ``ifname``. A route to the same prefix and metric that
        someone else made (a connected LAN, an administrator's static route) is left
        alone, with a warning, never replaced: removing ours later would lose it."""
        index = await self._index(ifname)
        for net in prefixes:
            with _converted(f"adding route {net} dev {ifname}"):
                try:
                    await self._change_route(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, index, net)
                except OSError as exc:
                    if exc.errno != errno.EEXIST:
                        raise
                    if net not in await self.routes(ifname) and net not in self._foreign:
                        self._foreign.add(net)
                        log.warning(
                            "a route to %s that meshd did not make exists; leaving it "
                            "(traffic to %s does not go through %s)",
                            net,
                            net,
                            ifname,
                        )

    async def remove_routes(self, ifname: str, prefixes: Sequence[IPNetwork]) -> None:
        """Remove meshd's routes to ``prefixes``; one that is already gone is fine."""
        index = await self._index(ifname)
        for net in prefixes:
            with _converted(f"removing route {net} dev {ifname}"):
                try:
                    await self._change_route(RTM_DELROUTE, 0, index, net)
                except OSError as exc:
                    if exc.errno != errno.ESRCH:
                        raise


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
