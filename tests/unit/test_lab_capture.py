"""The lab capture's frame filter (pure: frames built here)."""

from __future__ import annotations

import struct

from meshd.lab.capture import Capture

ETH = b"\x02" * 12


def ipv4(proto: int, payload: bytes) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, proto, 0,
                         bytes(4), bytes(4))  # fmt: skip
    return ETH + b"\x08\x00" + header + payload


def ipv6(next_header: int, payload: bytes) -> bytes:
    addresses = bytes(16), bytes(16)
    header = struct.pack("!IHBB16s16s", 6 << 28, len(payload), next_header, 64, *addresses)
    return ETH + b"\x86\xdd" + header + payload


def ports(src: int, dst: int) -> bytes:
    return struct.pack("!HH", src, dst) + bytes(16)


def test_only_tcp_segments_of_the_port_are_kept_v4_and_v6() -> None:
    kept = [ipv4(6, ports(40000, 51821)), ipv6(6, ports(51821, 40001))]
    other = [
        ipv4(17, ports(40000, 51821)),  # UDP on that number
        ipv4(6, ports(40000, 7946)),  # TCP elsewhere
        ipv6(17, ports(5353, 5353)),  # mDNS
        ETH + b"\x08\x06" + bytes(28),  # ARP
        ipv4(6, b"\x00"),  # cut short
    ]
    seen = Capture([("eth0", f) for f in kept + other], dropped=3)

    only = seen.tcp_port(51821)

    assert only.frames == kept
    assert only.dropped == 3
