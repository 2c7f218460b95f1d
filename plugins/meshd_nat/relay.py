"""The relay forwarder: WireGuard ciphertext between two members that cannot reach each other.

A relay R helps a pair {A, B} of members with no direct path. The WireGuard
session stays end to end between A and B: R only moves their encrypted
datagrams and never holds their keys, so it cannot read (or forge) their traffic.

Per pair, R holds one *allocation*: two UDP sockets on its underlay, on ports the
kernel picks: ``port_A`` (A sends there) and ``port_B`` (B sends there). A
datagram arriving on ``port_A`` from source S teaches R that A is at S; if R
knows where B is, it sends the datagram out of the ``port_B`` socket to B. So B
sees it come from R:port_B, the very endpoint B has configured for A, and B's
NAT lets it in (B has sent to R:port_B itself). The same holds the other way.
While R does not know where the other side is, the datagram is dropped (and
counted): WireGuard retries its handshake every 5 s, so nothing is lost that
matters.

What is forwarded, and what R learns from (the why of each rule):

- Only WireGuard-shaped datagrams: the first byte is a message type (1 handshake
  initiation, 148 bytes; 2 handshake response, 92 bytes; 3 cookie reply, 64
  bytes; 4 transport data, at least 32 bytes), followed by three zero bytes.
  Anything else is dropped as ``junk``: a relay port must not become an open UDP
  reflector for whoever finds it. Transport data has no further length rule on
  purpose: WireGuard pads a packet to a multiple of 16 *but never beyond the
  interface's MTU*, so a full-size packet through a wireguard-go with its
  default MTU of 1420 (not a multiple of 16) is 16 + 1420 + 16 = 1452 bytes.
  (A first version required a multiple of 16: pings passed, TCP stalled.)
- A handshake initiation or response arriving on ``port_A`` must carry a valid
  mac1 for B's public key (B is its receiver): ``mac1 = BLAKE2s-128(key =
  BLAKE2s-256("mac1----" || B's public key), message up to mac1)`` (WireGuard
  whitepaper 5.4.4). Junk is filtered this way too, and a stranger who does not
  even know B's public key cannot steal the mapping (drop reason ``mac1``).
  Keys are public, so this is a filter, not authentication.
- Transport data moves the mapping too. WireGuard roams on data: after a NAT
  rebinding in the middle of a session, A sends only data (the next handshake
  may be two minutes away), and B must follow A's new address. The price:
  anyone who knows R:port_A and can send from any address can divert the pair's
  ciphertext to itself, until A's next packet moves it back. That is a denial of
  service, never a disclosure: the datagrams stay encrypted and authenticated
  end to end, and a forged one is dropped by B.
- A cookie reply carries no MAC at all: it is forwarded only when it comes from
  the address already learnt for its side, and never moves the mapping (drop
  reason ``stranger``).

A fresh allocation (a new pair, a relay that restarted, a pair moved here from
a dead relay) knows neither end: what one end sends is dropped until the other
end has sent something too. WireGuard sends nothing by itself on an idle
tunnel, so whoever points a pair at a relay should make both ends send (a
persistent keepalive does within its interval; ``bench/relay.py`` pings once
each way).

Using it (from the plugin's own task, on the agent's loop)::

    relay = Relay()                                  # bound to the wildcard address
    port = await relay.allocate(requester_key, peer_key)   # tell the requester R:port
    ...
    relay.expire()                                   # every few seconds
    relay.allocations()                              # for status and metrics
    relay.close()                                    # at shutdown

Resources are bounded: at most ``max_allocations`` pairs (two sockets each),
:class:`RelayFull` beyond that, and :meth:`Relay.expire` closes allocations that
neither forwarded nor were asked for during ``idle_timeout``. The owner calls
:meth:`Relay.expire` periodically (every few seconds); idleness is judged by
comparing packet counts between those calls, so the forwarding path itself never
reads the clock.

Performance: each socket is read by a callback the event loop calls when it is
readable (``loop.add_reader``), which drains up to 64 datagrams and forwards
each with a plain non-blocking ``sendto`` on the other socket; the only
allocation per datagram is the ``bytes`` ``recvfrom`` returns. The first version
used a ``DatagramProtocol`` per socket: asyncio's selector transport reads one
datagram per wake-up of the loop, and on loopback the relay then cost 36 us of
CPU per forwarded datagram and dropped 80 % of a burst; draining costs 7-9 us
on either loop (uvloop's protocol path was already 8 us). In the agent the relay
runs on the agent's loop (asyncio unless MESHD_LOOP=uvloop); standalone, --loop chooses.
Figures in ``bench/README.md`` (``bench/relay.py``).

Standalone, for the lab and the benchmark (one relay process serving given pairs
until SIGTERM; the ports go to a JSON file, written atomically)::

    python -m meshd_nat.relay --pair KEY_A KEY_B --ports-file /tmp/ports.json [--loop asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from meshd import MeshdError, format_host_port

log = logging.getLogger(__name__)

# Message types (WireGuard whitepaper 5.4), as the first four bytes of a datagram:
# the type, then three reserved zero bytes.
HANDSHAKE_INITIATION = b"\x01\x00\x00\x00"
HANDSHAKE_RESPONSE = b"\x02\x00\x00\x00"
COOKIE_REPLY = b"\x03\x00\x00\x00"
TRANSPORT_DATA = b"\x04\x00\x00\x00"
INITIATION_SIZE = 148
RESPONSE_SIZE = 92
COOKIE_REPLY_SIZE = 64
TRANSPORT_MIN_SIZE = 32  # header 16 + an empty (keepalive) payload's 16-byte tag
MAC_SIZE = 16
MAC1_LABEL = b"mac1----"
MAX_DATAGRAM = 65535
DRAIN_BATCH = 64  # datagrams read per wake-up of one socket before the others get a turn
SOCKET_BUFFER = 1 << 20

DROP_REASONS = ("junk", "mac1", "stranger", "unknown", "unsent")
"""Why a datagram was dropped: not WireGuard-shaped; a handshake without a valid mac1
for its receiver; a cookie reply from an address not learnt; the other side not
known yet; sending it failed (a full send buffer)."""

Address = tuple[Any, ...]  # what a datagram socket reports: (host, port[, flowinfo, scope])


class RelayError(MeshdError):
    """The relay cannot do what was asked (bad key, no socket)."""


class RelayFull(RelayError):
    """Every allocation the relay allows is in use."""


def decode_public_key(text: str) -> bytes:
    """The 32 bytes of a WireGuard public key in base64; RelayError naming it if it is not one."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise RelayError(f"not a WireGuard public key (32 bytes in base64): {text!r}")
    return raw


def mac1_key(public_key: bytes) -> bytes:
    """The key of mac1 for messages sent to the owner of ``public_key`` (whitepaper 5.4.4)."""
    return hashlib.blake2s(MAC1_LABEL + public_key).digest()


def valid_mac1(message: bytes, key: bytes) -> bool:
    """Whether a handshake initiation or response carries a valid mac1 under ``key``.

    ``key`` is :func:`mac1_key` of the message's receiver. Any other message is False.
    """
    if len(message) == INITIATION_SIZE and message.startswith(HANDSHAKE_INITIATION):
        offset = INITIATION_SIZE - 2 * MAC_SIZE
    elif len(message) == RESPONSE_SIZE and message.startswith(HANDSHAKE_RESPONSE):
        offset = RESPONSE_SIZE - 2 * MAC_SIZE
    else:
        return False
    expected = hashlib.blake2s(message[:offset], key=key, digest_size=MAC_SIZE).digest()
    return hmac.compare_digest(expected, message[offset : offset + MAC_SIZE])


@dataclass(frozen=True)
class SideInfo:
    """One member of an allocation, as the relay sees it."""

    public_key: str  # the member that sends to ``port``
    port: int
    address: str | None  # where it was last heard from ("host:port"), None before
    packets: int  # datagrams forwarded from this member to the other
    bytes: int
    dropped: dict[str, int]  # of the datagrams arriving on ``port``, by DROP_REASONS


@dataclass(frozen=True)
class AllocationInfo:
    """An allocation for status and metrics: both sides, and how long it has been idle."""

    sides: tuple[SideInfo, SideInfo]
    idle: float  # seconds since the last forwarded datagram or allocate(), as of expire()


class _Side:
    """One socket of an allocation: what arrives here goes to the other side's member."""

    __slots__ = (
        "address",
        "bad_mac1",
        "bytes",
        "junk",
        "loop",
        "mac1_key",
        "other",
        "packets",
        "port",
        "public_key",
        "sock",
        "strangers",
        "unknown",
        "unsent",
    )

    def __init__(
        self,
        public_key: str,
        receiver_key: bytes,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.public_key = public_key
        self.mac1_key = mac1_key(receiver_key)
        self.sock = sock
        self.loop = loop
        self.port: int = sock.getsockname()[1]
        self.other: _Side = self  # set to the other side before it starts reading
        self.address: Address | None = None  # the member's learnt source address
        self.packets = 0
        self.bytes = 0
        self.junk = 0
        self.bad_mac1 = 0
        self.strangers = 0
        self.unknown = 0
        self.unsent = 0

    def start(self) -> None:
        self.loop.add_reader(self.sock.fileno(), self.on_readable)

    def on_readable(self) -> None:
        """Drain the socket (up to a batch, then let the other sockets have a turn)."""
        recvfrom = self.sock.recvfrom
        for _ in range(DRAIN_BATCH):
            try:
                data, addr = recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # an ICMP error queued on the socket; nothing to do
                log.debug("relay port %d: %s", self.port, exc)
                return
            self.datagram_received(data, addr)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        size = len(data)
        if data.startswith(TRANSPORT_DATA):
            if size < TRANSPORT_MIN_SIZE:
                self.junk += 1
                return
            if addr != self.address:
                self._learn(addr)
        elif data.startswith(HANDSHAKE_INITIATION) or data.startswith(HANDSHAKE_RESPONSE):
            if size != (INITIATION_SIZE if data[0] == 1 else RESPONSE_SIZE):
                self.junk += 1
                return
            if not valid_mac1(data, self.mac1_key):
                self.bad_mac1 += 1
                return
            if addr != self.address:
                self._learn(addr)
        elif data.startswith(COOKIE_REPLY) and size == COOKIE_REPLY_SIZE:
            if addr != self.address:
                self.strangers += 1
                return
        else:
            self.junk += 1
            return
        other = self.other
        if other.address is None:
            self.unknown += 1
            return
        try:
            other.sock.sendto(data, other.address)
        except OSError:  # the send buffer is full (or the route is gone): UDP drops it
            self.unsent += 1
            return
        self.packets += 1
        self.bytes += size

    def _learn(self, addr: Address) -> None:
        log.debug(
            "relay port %d: %s now at %s (was %s)", self.port, self.public_key, addr, self.address
        )
        self.address = addr

    def info(self) -> SideInfo:
        address = format_host_port(self.address[0], self.address[1]) if self.address else None
        return SideInfo(
            public_key=self.public_key,
            port=self.port,
            address=address,
            packets=self.packets,
            bytes=self.bytes,
            dropped={
                "junk": self.junk,
                "mac1": self.bad_mac1,
                "stranger": self.strangers,
                "unknown": self.unknown,
                "unsent": self.unsent,
            },
        )

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()


def _open_socket(host: str) -> socket.socket:
    """A non-blocking UDP socket on ``host`` and a port the kernel picks."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # Room for bursts (the kernel caps these at net.core.[rw]mem_max).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        sock.bind((host, 0))
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass
class _Allocation:
    sides: tuple[_Side, _Side]
    last_active: float
    seen_packets: int  # both sides' forwarded counts at the last expire()
    seen: tuple[int, int] = (0, 0)  # forwarded and dropped at the last expire(), for the log

    def activity(self) -> int:
        # Forwarded only: junk sprayed at a port must not keep a dead pair's sockets open.
        return self.sides[0].packets + self.sides[1].packets

    def dropped(self) -> int:
        return sum(sum(side.info().dropped.values()) for side in self.sides)

    def describe(self) -> str:
        """One line for the debug log: per side, forwarded and dropped counts."""
        parts = []
        for side in self.sides:
            info = side.info()
            drops = ", ".join(f"{why} {n}" for why, n in info.dropped.items() if n)
            parts.append(
                f"port {info.port} from {info.address or '-'} ({info.public_key[:8]}): "
                f"{info.packets} forwarded" + (f", dropped {drops}" if drops else "")
            )
        return "; ".join(parts)

    def info(self, now: float) -> AllocationInfo:
        return AllocationInfo(
            sides=(self.sides[0].info(), self.sides[1].info()), idle=now - self.last_active
        )


class Relay:
    """Forwards WireGuard datagrams for pairs of members; see the module docstring.

    ``host`` is the address the sockets bind to (the wildcard by default; "::" for
    IPv6 and IPv4). Use it from one event loop; :meth:`close` when done.
    """

    def __init__(
        self,
        *,
        host: str = "0.0.0.0",
        idle_timeout: float = 120.0,
        max_allocations: int = 512,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._host = host
        self._idle_timeout = idle_timeout
        self._max_allocations = max_allocations
        self._clock = clock
        self._allocations: dict[frozenset[str], _Allocation] = {}
        # What closed allocations forwarded (packets, bytes): totals only ever grow.
        self._closed = (0, 0)

    def forwarded(self) -> tuple[int, int]:
        """(packets, bytes) forwarded since the relay started, closed pairs included.
        Read from the sides' own counts: the forwarding path does nothing more."""
        packets, size = self._closed
        for allocation in self._allocations.values():
            for one in allocation.sides:
                packets += one.packets
                size += one.bytes
        return packets, size

    async def allocate(self, requester_key: str, peer_key: str) -> int:
        """The port ``requester_key`` must send to in order to reach ``peer_key``.

        One allocation per unordered pair of WireGuard public keys (base64),
        created on the first request from either; asking again refreshes it (it
        is not idle). RelayError for a bad key or a pair of one key, RelayFull
        when ``max_allocations`` are in use, RelayError when no socket can be bound.
        """
        requester, peer = decode_public_key(requester_key), decode_public_key(peer_key)
        if requester == peer:
            raise RelayError(f"a member cannot be relayed to itself: {requester_key}")
        pair = frozenset((requester_key, peer_key))
        # No await from here on: two requests for a new pair cannot make two allocations.
        allocation = self._allocations.get(pair)
        if allocation is None:
            if len(self._allocations) >= self._max_allocations:
                raise RelayFull(
                    f"relay full: {self._max_allocations} pairs already relayed "
                    f"(refusing {requester_key} <-> {peer_key})"
                )
            allocation = self._open(requester_key, requester, peer_key, peer)
            self._allocations[pair] = allocation
        allocation.last_active = self._clock()
        side = allocation.sides[0] if allocation.sides[0].public_key == requester_key else None
        return (side or allocation.sides[1]).port

    def _open(self, key_a: str, raw_a: bytes, key_b: str, raw_b: bytes) -> _Allocation:
        loop = asyncio.get_running_loop()
        sockets: list[socket.socket] = []
        try:
            for _ in range(2):
                sockets.append(_open_socket(self._host))
        except OSError as exc:
            for sock in sockets:
                sock.close()
            raise RelayError(f"cannot open a relay socket on {self._host}: {exc}") from exc
        # A sends to side a, whose datagrams are for B: their mac1 is under B's key.
        a, b = _Side(key_a, raw_b, sockets[0], loop), _Side(key_b, raw_a, sockets[1], loop)
        a.other, b.other = b, a
        a.start()
        b.start()
        log.info("relay: %s on port %d <-> %s on port %d", key_a, a.port, key_b, b.port)
        return _Allocation((a, b), self._clock(), 0)

    def expire(self) -> list[AllocationInfo]:
        """Close the allocations idle for longer than ``idle_timeout``; return what they were.

        Idle: no datagram forwarded (dropped ones do not count) and no :meth:`allocate`
        since the previous call, for ``idle_timeout`` seconds. Call it every few
        seconds; an allocation is closed at most one period late.
        """
        now = self._clock()
        closed = []
        for pair, allocation in list(self._allocations.items()):
            activity = allocation.activity()
            dropped = allocation.dropped()
            if log.isEnabledFor(logging.DEBUG) and (activity, dropped) != allocation.seen:
                # What a pair that will not come up needs explained: who sent, what was dropped.
                log.debug("relay: %s", allocation.describe())
            allocation.seen = (activity, dropped)
            if activity != allocation.seen_packets:
                allocation.seen_packets = activity
                allocation.last_active = now
            elif now - allocation.last_active > self._idle_timeout:
                del self._allocations[pair]
                closed.append(allocation.info(now))
                self._closed = (
                    self._closed[0] + allocation.activity(),
                    self._closed[1] + sum(one.bytes for one in allocation.sides),
                )
                for side in allocation.sides:
                    side.close()
                log.info(
                    "relay: closed idle pair %s <-> %s",
                    allocation.sides[0].public_key,
                    allocation.sides[1].public_key,
                )
        return closed

    def allocations(self) -> list[AllocationInfo]:
        """Every open allocation: keys, ports, learnt addresses, counts."""
        now = self._clock()
        return [allocation.info(now) for allocation in self._allocations.values()]

    def close(self) -> None:
        """Close every allocation's sockets."""
        for allocation in self._allocations.values():
            for side in allocation.sides:
                side.close()
        self._allocations.clear()


# ---- standalone: python -m meshd_nat.relay ---------------------------------


def _write_json_atomically(path: str, value: object) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".relay-")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(value, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


async def _serve(pairs: Sequence[tuple[str, str]], ports_file: str, host: str) -> None:
    relay = Relay(host=host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        ports = {}
        for key_a, key_b in pairs:
            ports[key_a] = await relay.allocate(key_a, key_b)
            ports[key_b] = await relay.allocate(key_b, key_a)
        _write_json_atomically(ports_file, {"pid": os.getpid(), "ports": ports})
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await stop.wait()
            relay.expire()
        for info in relay.allocations():
            log.info("relay: at exit %s", info)
    finally:
        relay.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshd_nat.relay", description=__doc__)
    parser.add_argument("--pair", nargs=2, action="append", required=True, metavar="KEY")
    parser.add_argument("--ports-file", required=True, help="JSON {key: port} goes here")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop (asyncio; uvloop measured no faster: bench/README.md, meshd[uvloop])",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run: Callable[..., Any] = asyncio.run
    if args.loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            sys.stderr.write("relay: uvloop is not installed; use --loop asyncio\n")
            return 1
        run = uvloop.run
    try:
        run(_serve([tuple(p) for p in args.pair], args.ports_file, args.host))
    except MeshdError as exc:
        sys.stderr.write(f"relay: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
