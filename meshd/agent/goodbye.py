"""Goodbyes that cannot be forged: a leaving node tells each peer through its own tunnel.

Serf's "leaving" and "left" can be forged by anyone holding the gossip key
(``serf force-leave``), so they do not remove a peer whose WireGuard handshake
is recent (see :mod:`meshd.desired`). A node that leaves on purpose sends a
small datagram to every peer's mesh address instead. WireGuard authenticates
it: a packet that comes out of the mesh interface with a member's mesh address
as its source was sent with that member's key. The receiver checks that the
datagram arrived on the mesh interface (``IPV6_PKTINFO``) from the address of
the member whose key it names, then drops the peer at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
from collections.abc import Iterable

from meshd.agent.runtime import Runtime
from meshd.errors import MeshdError
from meshd.node import gossip_address
from meshd.quietlog import Throttle
from meshd.types import IPAddress, PeerConfig

log = logging.getLogger(__name__)

MAGIC = b"meshd-bye1 "
# Datagrams get lost; a goodbye is tiny, so say it a few times.
REPEAT = 3
REPEAT_GAP = 0.05
_IP_PKTINFO = 8  # linux/in.h; not in every Python's socket module


def goodbye_port(gossip_port: int) -> int:
    """The UDP port of goodbyes: the one after Serf's gossip port."""
    return gossip_port + 1


class GoodbyeListener:
    """Receives goodbyes on this node's gossip address; see the module docstring."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self._sock: socket.socket | None = None
        self._quiet = Throttle(log)

    def open(self) -> None:
        rt = self._rt
        address = gossip_address(rt.state.addresses.all())
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
            sock.bind((str(address), goodbye_port(rt.config.gossip.port)))
        except OSError as exc:
            sock.close()
            raise MeshdError(f"cannot listen for goodbyes on {address}: {exc}") from exc
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def run(self) -> None:
        """Receive until cancelled (the socket is re-opened when this node moves)."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                if self._sock is None:
                    self.open()
                assert self._sock is not None
                sock = self._sock
                waiter = loop.create_future()
                loop.add_reader(sock.fileno(), waiter.set_result, None)
                try:
                    await waiter
                finally:
                    loop.remove_reader(sock.fileno())
                with contextlib.suppress(BlockingIOError, InterruptedError):
                    data, ancillary, _, source = sock.recvmsg(256, 64)
                    self._take(data, _arrival_index(ancillary), source[0])
        finally:
            self.close()

    def _take(self, data: bytes, ifindex: int | None, source: str) -> None:
        rt = self._rt
        if not data.startswith(MAGIC):
            return
        key = data[len(MAGIC) :].decode("ascii", "replace")
        try:
            mesh_index = socket.if_nametoindex(rt.iface.ifname)
        except OSError:
            return
        if ifindex != mesh_index:
            self._quiet.warning(
                source, "ignored a goodbye from %s that did not come through the mesh", source
            )
            return
        sender = ipaddress.ip_address(source.split("%")[0])
        member = rt.snapshot.by_key().get(key)
        if member is None or member.record is None or sender not in member.record.addresses:
            self._quiet.warning(source, "ignored a goodbye from %s naming another key", source)
            return
        if key not in rt.departed:
            log.info("%s said goodbye", member.name)
        # With the version of the record it left with: it is back only with a newer one.
        rt.departed[key] = member.record.version
        rt.kick()


def _arrival_index(ancillary: Iterable[tuple[int, int, bytes]]) -> int | None:
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 20:
            return int(struct.unpack_from("=I", data, 16)[0])
        if level == socket.IPPROTO_IP and kind == _IP_PKTINFO and len(data) >= 4:
            return int(struct.unpack_from("=i", data, 0)[0])
    return None


async def say_goodbye(public_key: str, peers: Iterable[tuple[IPAddress, int]]) -> int:
    """Send this node's goodbye to every (gossip address, port); how many were sent."""
    payload = MAGIC + public_key.encode("ascii")
    targets = list(peers)
    sent = 0
    for attempt in range(REPEAT):
        for address, port in targets:
            family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
            try:
                with socket.socket(family, socket.SOCK_DGRAM) as sock:
                    sock.setblocking(False)
                    sock.sendto(payload, (str(address), port))
                    sent += attempt == 0
            except OSError as exc:
                log.debug("cannot say goodbye to %s: %s", address, exc)
        await asyncio.sleep(REPEAT_GAP)
    return sent


def goodbye_targets(runtime: Runtime, peers: Iterable[PeerConfig]) -> list[tuple[IPAddress, int]]:
    """The gossip address of each peer's member, with the goodbye port."""
    port = goodbye_port(runtime.config.gossip.port)
    by_key = runtime.snapshot.by_key()
    targets = []
    for peer in peers:
        member = by_key.get(peer.public_key)
        if member is not None and member.record is not None:
            targets.append((gossip_address(member.record.addresses), port))
    return targets
