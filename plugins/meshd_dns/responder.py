"""A small authoritative DNS responder for the mesh's zone, on the node's mesh addresses.

:func:`answer` is the whole of DNS here, a pure function of the zone and a query
(dnspython does the wire format): A and AAAA of members, SOA and NS at the apex,
NXDOMAIN (with the SOA, for negative caching) for names the zone lacks, REFUSED
for names outside it, NOTIMP for anything but a query. No recursion, no zone
transfers, UDP only (answers are a few records; one too large is sent truncated).

:class:`Responder` listens on UDP port ``port`` of each mesh address and answers
only datagrams that arrived through the mesh interface: Linux accepts a packet
for a local address on any interface, and a neighbour on the underlay has no
business learning the members' names (``IP_PKTINFO`` says where it came in).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable, Sequence

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from meshd import IPAddress
from meshd_dns.records import EXPIRE, REFRESH, RETRY, Zone

log = logging.getLogger(__name__)

MAX_QUERY = 4096
PLAIN_UDP = 512
# Linux's; the socket module spells the IPv4 one only from Python 3.12 on.
IP_PKTINFO = 8  # struct in_pktinfo: interface index (4), two IPv4 addresses
IPV6_PKTINFO = socket.IPV6_PKTINFO  # struct in6_pktinfo: address (16), interface index (4)


def _soa(zone: Zone, origin: dns.name.Name) -> dns.rrset.RRset:
    return dns.rrset.from_text(
        origin,
        zone.ttl,
        dns.rdataclass.IN,
        dns.rdatatype.SOA,
        f"{zone.primary}.{origin} hostmaster.{origin} "
        f"{zone.serial} {REFRESH} {RETRY} {EXPIRE} {zone.ttl}",
    )


def _addresses(
    zone: Zone, name: dns.name.Name, addresses: Sequence[IPAddress], rdtype: dns.rdatatype.RdataType
) -> dns.rrset.RRset | None:
    version = 4 if rdtype == dns.rdatatype.A else 6
    chosen = [str(a) for a in addresses if a.version == version]
    if not chosen:
        return None
    return dns.rrset.from_text_list(name, zone.ttl, dns.rdataclass.IN, rdtype, chosen)


def _fill(response: dns.message.Message, zone: Zone, qname: dns.name.Name, qtype: int) -> None:
    origin = dns.name.from_text(zone.origin)
    if not qname.is_subdomain(origin):
        response.flags &= ~dns.flags.AA
        response.set_rcode(dns.rcode.REFUSED)
        return
    relative = qname.relativize(origin)
    wanted = {qtype} if qtype != dns.rdatatype.ANY else None
    found: list[dns.rrset.RRset] = []
    if qname == origin:
        if wanted is None or dns.rdatatype.SOA in wanted:
            found.append(_soa(zone, origin))
        if wanted is None or dns.rdatatype.NS in wanted:
            found.append(
                dns.rrset.from_text(
                    origin,
                    zone.ttl,
                    dns.rdataclass.IN,
                    dns.rdatatype.NS,
                    f"{zone.primary}.{origin}",
                )
            )
    else:
        host = zone.lookup(relative.to_text().lower()) if len(relative) == 1 else None
        if host is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(_soa(zone, origin))
            return
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            if wanted is None or rdtype in wanted:
                rrset = _addresses(zone, qname, host.addresses, rdtype)
                if rrset is not None:
                    found.append(rrset)
    if found:
        response.answer.extend(found)
    else:  # the name exists, not with that type (NODATA)
        response.authority.append(_soa(zone, origin))


def answer(zone: Zone | None, wire: bytes) -> bytes | None:
    """The answer to the query ``wire`` from ``zone`` (None: no zone yet), or None when
    ``wire`` is not a DNS query worth an answer (garbage, or itself a response)."""
    try:
        query = dns.message.from_wire(wire)
    except dns.exception.DNSException:
        return None
    if query.flags & dns.flags.QR:
        return None
    response = dns.message.make_response(query, recursion_available=False)
    response.flags |= dns.flags.AA
    if query.opcode() != dns.opcode.QUERY:
        response.flags &= ~dns.flags.AA
        response.set_rcode(dns.rcode.NOTIMP)
    elif len(query.question) != 1:
        response.flags &= ~dns.flags.AA
        response.set_rcode(dns.rcode.FORMERR)
    elif zone is None:
        response.flags &= ~dns.flags.AA
        response.set_rcode(dns.rcode.SERVFAIL)
    else:
        question = query.question[0]
        if question.rdclass not in (dns.rdataclass.IN, dns.rdataclass.ANY):
            response.flags &= ~dns.flags.AA
            response.set_rcode(dns.rcode.REFUSED)
        else:
            _fill(response, zone, question.name, question.rdtype)
    limit = max(PLAIN_UDP, query.payload) if query.edns >= 0 else PLAIN_UDP
    try:
        return response.to_wire(max_size=limit)
    except dns.exception.TooBig:
        response.answer.clear()
        response.authority.clear()
        response.flags |= dns.flags.TC
        return response.to_wire(max_size=limit)


def _arrival_interface(family: int, ancdata: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, data in ancdata:
        if family == socket.AF_INET6 and (level, kind) == (socket.IPPROTO_IPV6, IPV6_PKTINFO):
            return int(struct.unpack_from("=I", data, 16)[0]) if len(data) >= 20 else None
        if family == socket.AF_INET and (level, kind) == (socket.IPPROTO_IP, IP_PKTINFO):
            return int(struct.unpack_from("=i", data, 0)[0]) if len(data) >= 12 else None
    return None


class Responder:
    """UDP sockets on the mesh addresses, answering from ``zone()``."""

    def __init__(self, zone: Callable[[], Zone | None], interface: str, port: int) -> None:
        self._zone = zone
        self.interface = interface
        self.port = port
        self._socks: list[socket.socket] = []
        self.answered = 0
        self.dropped = 0  # wrong interface, not a query

    def open(self, addresses: Sequence[IPAddress]) -> None:
        """Bind every address (raises OSError: the address is not there yet, the port taken)."""
        loop = asyncio.get_running_loop()
        opened = []
        try:
            for address in addresses:
                family = socket.AF_INET if address.version == 4 else socket.AF_INET6
                sock = socket.socket(family, socket.SOCK_DGRAM)
                opened.append(sock)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
                else:
                    sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
                sock.setblocking(False)
                sock.bind((str(address), self.port))
        except OSError:
            for sock in opened:
                sock.close()
            raise
        for sock in opened:
            loop.add_reader(sock.fileno(), self._readable, sock)
        self._socks = opened

    def close(self) -> None:
        if not self._socks:
            return
        with contextlib.suppress(RuntimeError):
            loop = asyncio.get_running_loop()
            for sock in self._socks:
                loop.remove_reader(sock.fileno())
        for sock in self._socks:
            sock.close()
        self._socks = []

    def _mesh_index(self) -> int | None:
        try:
            return socket.if_nametoindex(self.interface)
        except OSError:
            return None

    def _readable(self, sock: socket.socket) -> None:
        for _ in range(64):  # a burst, then let the others run
            try:
                data, ancdata, _flags, source = sock.recvmsg(MAX_QUERY, socket.CMSG_SPACE(20))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("DNS socket: %s", exc)
                return
            arrived = _arrival_interface(sock.family, ancdata)
            if arrived is None or arrived != self._mesh_index():
                self.dropped += 1
                continue
            reply = answer(self._zone(), data)
            if reply is None:
                self.dropped += 1
                continue
            with contextlib.suppress(OSError):
                sock.sendto(reply, source)
            self.answered += 1
