"""Is the primary gateway there? ICMP echo to its mesh address, twice a second.

Serf declares a killed node failed only after its suspicion timeout (about 5 s in
a small mesh, more in a large one), too late for traffic through a gateway. Each
node that routes a prefix to a gateway therefore pings that gateway's mesh
address through the tunnel every :data:`INTERVAL` seconds, and treats it as down
once no answer came for :data:`DOWN_AFTER` seconds: the prefix moves to the next
gateway at the next pass. An answer brings it back. Only current primaries are
probed: a node with one route sends two small packets a second.

One raw ICMP socket (the agent runs as root); replies are told apart by the
echo identifier. IPv4 only: every member has an IPv4 mesh address.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

INTERVAL = 0.5
DOWN_AFTER = 2.0
_ECHO_REQUEST, _ECHO_REPLY = 8, 0


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int) -> bytes:
    header = struct.pack("!BBHHH", _ECHO_REQUEST, 0, 0, ident, seq)
    payload = b"meshd-gateway"
    return struct.pack("!BBHHH", _ECHO_REQUEST, 0, checksum(header + payload), ident, seq) + payload


def parse_reply(packet: bytes, ident: int) -> bool:
    """Whether ``packet`` (an IPv4 datagram from a raw socket) is an echo reply of ours."""
    if len(packet) < 20:
        return False
    start = (packet[0] & 0x0F) * 4
    icmp = packet[start : start + 8]
    if len(icmp) < 8:
        return False
    kind, _, _, got_ident, _ = struct.unpack("!BBHHH", icmp)
    return kind == _ECHO_REPLY and got_ident == ident


class Prober:
    """Probes a changing set of addresses; :meth:`down` says which stopped answering."""

    def __init__(self, on_change: Callable[[], None], clock: Callable[[], float] = time.monotonic):
        self._on_change = on_change
        self._clock = clock
        self._ident = os.getpid() & 0xFFFF
        self._seq = 0
        self._targets: dict[str, float] = {}  # address -> when it last answered (or was added)
        self._down: set[str] = set()
        self._wanted = asyncio.Event()  # set while there are targets

    def watch(self, addresses: Iterable[str]) -> None:
        """Probe exactly these from now on (each gets DOWN_AFTER before it can be down)."""
        wanted = set(addresses)
        now = self._clock()
        for address in wanted - set(self._targets):
            self._targets[address] = now
        for address in set(self._targets) - wanted:
            del self._targets[address]
            self._down.discard(address)
        if self._targets:
            self._wanted.set()

    def down(self) -> frozenset[str]:
        return frozenset(self._down)

    def _answered(self, address: str) -> None:
        if address in self._targets:
            self._targets[address] = self._clock()
            if address in self._down:
                self._down.discard(address)
                log.info("gateway %s answers again", address)
                self._on_change()

    def _check(self) -> None:
        now = self._clock()
        for address, last in self._targets.items():
            if address not in self._down and now - last > DOWN_AFTER:
                self._down.add(address)
                log.warning(
                    "gateway %s has not answered for %.1f s: failing over", address, now - last
                )
                self._on_change()

    async def run(self) -> None:
        """Probe while there is something to probe; no socket open otherwise (a raw ICMP
        socket sees every ICMP packet of the machine)."""
        while True:
            await self._wanted.wait()
            await self._probe_while_wanted()

    async def _probe_while_wanted(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()

        def readable() -> None:
            while True:
                try:
                    packet, (source, _) = sock.recvfrom(2048)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    log.debug("probe socket: %s", exc)
                    return
                if parse_reply(packet, self._ident):
                    self._answered(source)

        loop.add_reader(sock.fileno(), readable)
        try:
            while self._targets:
                self._seq = (self._seq + 1) & 0xFFFF
                for address in list(self._targets):
                    with contextlib.suppress(OSError):  # unreachable now: it stays unanswered
                        sock.sendto(echo_request(self._ident, self._seq), (address, 0))
                self._check()
                await asyncio.sleep(INTERVAL)
        finally:
            loop.remove_reader(sock.fileno())
            sock.close()
            self._wanted.clear()


def ipv4_of(addresses: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> str | None:
    return next((str(a) for a in addresses if a.version == 4), None)
