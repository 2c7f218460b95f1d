"""The relay forwarder with real WireGuard: two NATed sites talk through a public relay.

The nat lab: n1 is public and runs ``python -m meshd_nat.relay`` for the pair;
n2 (site 1) and n3 (site 2) run plain ``wireguard-go`` configured by ``wg set``,
each with the other as its only peer at endpoint relay:port. Neither can reach
the other's underlay (each sits behind its site's NAT), so every tunnel packet
goes through the relay, which must never see the traffic in clear.
"""

from __future__ import annotations

import json
import secrets
import socket
import sys
import time

import pytest

from meshd.lab import Lab
from meshd.lab.capture import capture
from meshd.lab.tunnel import BareWireGuard, bare_wireguard
from meshd.netns import call_in_netns
from meshd_nat.relay import decode_public_key, mac1_key, valid_mac1
from tests.integration.conftest import eventually

pytestmark = pytest.mark.root("wireguard-go", "wg", "ping", "nft")

MARKER_PORT = 9999
FULL_PAYLOAD = 1420 - 20 - 8  # wireguard-go's MTU less the IPv4 and UDP headers


def start_relay(lab: Lab, node: str, a: BareWireGuard, b: BareWireGuard) -> dict[str, int]:
    """Run the relay for the pair (a, b) on ``node``; the port each of them must send to."""
    ports_file = lab.node_dir(node) / "relay-ports.json"
    argv = [sys.executable, "-m", "meshd_nat.relay", "--pair", a.public_key, b.public_key]
    lab.spawn(node, [*argv, "--ports-file", str(ports_file)], name="relay")
    eventually(ports_file.exists, 10, "the relay wrote its ports", lambda: relay_log(lab, node))
    ports: dict[str, int] = json.loads(ports_file.read_text())["ports"]
    return ports


def relay_log(lab: Lab, node: str) -> str:
    path = lab.log_path(node, "relay")
    return path.read_text() if path.exists() else "(no relay log)"


def udp_socket_in(lab: Lab, node: str, bind: tuple[str, int]) -> socket.socket:
    """A UDP socket made inside ``node``'s namespace, bound to ``bind``."""

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(bind)
        return sock

    return call_in_netns(lab.netns_of(node), make)


def test_relayed_pair_talks_and_the_relay_never_sees_plaintext(lab_factory):
    lab = lab_factory(nodes=3, topology="nat", sites=2, public=1)
    relay_host, left, right = lab.node("n1"), lab.node("n2"), lab.node("n3")
    assert relay_host.public
    assert left.site != right.site
    assert not lab.expect_reachable(left, right)
    a = bare_wireguard(lab, left.name, "100.64.0.2")
    b = bare_wireguard(lab, right.name, "100.64.0.3")
    ports = start_relay(lab, relay_host.name, a, b)
    a.set_peer(b, endpoint=f"{relay_host.address}:{ports[a.public_key]}", keepalive=25)
    b.set_peer(a, endpoint=f"{relay_host.address}:{ports[b.public_key]}", keepalive=25)

    # Ping over the tunnel: the first handshakes may be dropped until both ends have
    # been heard by the relay; WireGuard retries every 5 s.
    rtt = lab.ping(left.name, b.address, deadline=20)
    assert rtt is not None, f"no ping over the relayed tunnel\n{relay_log(lab, relay_host.name)}"
    print(f"ping n2 -> n3 through the relay: {rtt} ms")

    marker = b"MESHD-MARKER-" + secrets.token_hex(8).encode()
    relay_netns = lab.netns_of(relay_host.name)
    # Control: the marker sent in clear to the relay's namespace is seen there, so
    # its absence below means something (the port is closed; no matter).
    with capture(relay_netns) as control:
        plain = udp_socket_in(lab, left.name, ("0.0.0.0", 0))
        plain.sendto(marker, (relay_host.address, MARKER_PORT))
        plain.close()
        eventually(lambda: control.contains(marker), 5, "the control marker captured")

    receiver = udp_socket_in(lab, right.name, (b.address, MARKER_PORT))
    sender = udp_socket_in(lab, left.name, (a.address, 0))
    receiver.settimeout(5)
    try:
        with (
            capture(relay_netns) as at_relay,
            capture(lab.netns_of(right.name), b.ifname) as at_receiver,
        ):
            # Small ones, and full-size ones: 1392 bytes of UDP fill wireguard-go's MTU
            # (1420), whose datagrams are not padded to a multiple of 16.
            for payload in [marker, marker.ljust(FULL_PAYLOAD, b".")] * 2 + [marker]:
                sender.sendto(payload, (b.address, MARKER_PORT))
                got, source = receiver.recvfrom(2048)
                assert got == payload, got
                assert source[0] == a.address, source
    finally:
        sender.close()
        receiver.close()

    assert at_relay.dropped == 0, "the relay's capture missed frames: absence proves nothing"
    assert at_receiver.dropped == 0
    assert at_receiver.count(marker) == 5, "the marker is not on the receiver's wg interface"
    relayed = [f for f in at_relay.frames if is_relay_udp(f, ports)]
    # Each datagram crosses the relay's interface twice: in to one port, out of the other.
    assert len(relayed) >= 2 * 5, f"only {len(relayed)} relayed frames captured at the relay"
    assert not at_relay.contains(marker), "the marker appeared in clear at the relay"
    print(
        f"relay capture: {len(at_relay.frames)} frames, {len(relayed)} relayed, "
        f"marker 0 times; receiver's wg interface: marker {at_receiver.count(marker)} times"
    )


def is_relay_udp(frame: bytes, ports: dict[str, int]) -> bool:
    """Whether an Ethernet frame is IPv4 UDP to or from one of the relay's ports."""
    if len(frame) < 14 + 20 + 8 or frame[12:14] != b"\x08\x00" or frame[14 + 9] != 17:
        return False
    header = (frame[14] & 0x0F) * 4
    udp = frame[14 + header : 14 + header + 4]
    source, destination = int.from_bytes(udp[:2], "big"), int.from_bytes(udp[2:4], "big")
    relay_ports = set(ports.values())
    return source in relay_ports or destination in relay_ports


def first_handshake_of_wireguard_go(lab: Lab, node: str) -> tuple[bytes, str]:
    """The first datagram a real wireguard-go sends to a peer; and that peer's public key.

    The peer is a UDP socket on loopback in ``node``'s namespace, so the datagram
    never leaves it.
    """
    listener = udp_socket_in(lab, node, ("127.0.0.1", 0))
    listener.settimeout(15)
    try:
        wg = bare_wireguard(lab, node, "100.64.0.1")
        peer = bare_wireguard(
            lab, node, "100.64.1.1", listen_port=51821, prefix="wh"
        )  # only for its key
        endpoint = f"127.0.0.1:{listener.getsockname()[1]}"
        wg.set_peer(peer, endpoint=endpoint, keepalive=1)  # keepalive: send at once
        datagram, _ = listener.recvfrom(2048)
    finally:
        listener.close()
    return datagram, peer.public_key


def test_mac1_check_accepts_real_wireguard_go_for_its_receiver_only(lab_factory):
    lab = lab_factory(nodes=1)
    started = time.monotonic()
    datagram, receiver = first_handshake_of_wireguard_go(lab, "n1")
    print(f"wireguard-go's first datagram after {time.monotonic() - started:.1f} s")
    print(f"  receiver {receiver}\n  {datagram.hex()}")
    assert len(datagram) == 148
    assert datagram[0] == 1
    assert valid_mac1(datagram, mac1_key(decode_public_key(receiver)))
    other = bare_wireguard(lab, "n1", "100.64.2.1", listen_port=51822, prefix="wi").public_key
    assert not valid_mac1(datagram, mac1_key(decode_public_key(other)))
