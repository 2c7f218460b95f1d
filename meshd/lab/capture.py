"""Packet capture inside a lab namespace, for tests that must prove what crossed a wire.

    with capture(lab.netns_of("n1")) as seen:       # every interface of n1's namespace
        ...traffic...
    assert seen.frames, "the capture saw nothing: the check below would be vacuous"
    assert not seen.contains(b"marker")
    assert seen.dropped == 0                         # nothing was missed either

One ``AF_PACKET`` socket (all protocols, both directions) opened inside the
namespace (:func:`meshd.netns.call_in_netns`), read by a thread until the block
ends; the frames then stay on the :class:`Capture`. ``interface`` limits it to
one interface (e.g. a WireGuard interface: its frames are bare IP packets). The
kernel's count of frames it dropped for a full buffer is :attr:`Capture.dropped`:
a check that something never appeared holds only when that is 0.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from meshd.errors import LabError
from meshd.netns import call_in_netns

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6  # linux/if_packet.h: struct tpacket_stats {tp_packets, tp_drops}
SO_RCVBUFFORCE = 33
BUFFER_BYTES = 32 << 20
SNAPLEN = 65535


@dataclass
class Capture:
    """What :func:`capture` saw: ``(interface, frame)`` pairs in arrival order."""

    packets: list[tuple[str, bytes]] = field(default_factory=list)
    dropped: int = 0

    @property
    def frames(self) -> list[bytes]:
        return [frame for _, frame in self.packets]

    def contains(self, needle: bytes) -> bool:
        """Whether any captured frame holds ``needle``."""
        return any(needle in frame for _, frame in self.packets)

    def count(self, needle: bytes) -> int:
        """How many captured frames hold ``needle``."""
        return sum(needle in frame for _, frame in self.packets)

    def tcp_port(self, port: int) -> Capture:
        """The Ethernet frames of TCP segments from or to ``port`` (IPv4 or IPv6
        without extension headers), with the same drop count."""
        return Capture([(i, f) for i, f in self.packets if port in _tcp_ports(f)], self.dropped)


def _tcp_ports(frame: bytes) -> tuple[int, ...]:
    """The source and destination ports of a TCP segment in an Ethernet frame, or ()."""
    ethertype = frame[12:14]
    if ethertype == b"\x08\x00" and len(frame) > 23 and frame[23] == socket.IPPROTO_TCP:
        start = 14 + (frame[14] & 0x0F) * 4
    elif ethertype == b"\x86\xdd" and len(frame) > 20 and frame[20] == socket.IPPROTO_TCP:
        start = 14 + 40
    else:
        return ()
    if len(frame) < start + 4:
        return ()
    return struct.unpack_from("!HH", frame, start)


def _open(interface: str | None) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, BUFFER_BYTES)
        if interface is not None:
            sock.bind((interface, ETH_P_ALL))
    except OSError:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def capture(netns: str, interface: str | None = None) -> Iterator[Capture]:
    """Capture every frame in ``netns`` (or on its ``interface``) while the block runs."""
    try:
        sock = call_in_netns(netns, lambda: _open(interface))
    except OSError as exc:
        where = f"{interface} in {netns}" if interface else netns
        raise LabError(f"cannot capture on {where}: {exc.strerror or exc}") from exc
    seen = Capture()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            ready, _, _ = select.select([sock], [], [], 0.05)
            if ready:
                frame, address = sock.recvfrom(SNAPLEN)
                seen.packets.append((address[0], frame))

    reader = threading.Thread(target=read, name=f"capture-{netns}", daemon=True)
    reader.start()
    try:
        yield seen
    finally:
        stop.set()
        reader.join()
        # What arrived after the reader's last look.
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                frame, address = sock.recvfrom(SNAPLEN)
                seen.packets.append((address[0], frame))
        _, seen.dropped = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        sock.close()
