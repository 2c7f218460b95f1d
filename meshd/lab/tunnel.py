"""A bare WireGuard interface in a lab host: ``wireguard-go`` and ``wg set``, no meshd.

For tests and benchmarks of what sits under meshd (a relay, NAT behaviour), set
up as an admin would by hand:

    a = bare_wireguard(lab, "n2", "100.64.0.2")
    b = bare_wireguard(lab, "n3", "100.64.0.3")
    a.set_peer(b, endpoint="198.18.0.101:40000")
    b.set_peer(a, endpoint="198.18.0.101:40001")

``wireguard-go`` runs through :meth:`Lab.spawn`, so ``lab.down()`` stops it. The
private key goes to ``wg`` through a 0600 file, never on a command line.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from meshd.errors import LabError
from meshd.identity import WireGuardKeyPair
from meshd.lab.lab import Lab
from meshd.state import write_secret
from meshd.wireguard.userspace import SOCKET_DIR

TUNNEL_PREFIXLEN = 24
LISTEN_PORT = 51820


@dataclass(frozen=True)
class BareWireGuard:
    """A running ``wireguard-go`` interface on one lab host."""

    lab: Lab
    node: str
    ifname: str
    address: str  # its tunnel address (in a /24)
    public_key: str
    listen_port: int
    pid: int

    def set_peer(self, peer: BareWireGuard, *, endpoint: str, keepalive: int = 0) -> None:
        """Make ``peer`` (its tunnel address only) reachable through ``endpoint``."""
        argv = ["wg", "set", self.ifname, "peer", peer.public_key]
        argv += ["allowed-ips", f"{peer.address}/32", "endpoint", endpoint]
        if keepalive:
            argv += ["persistent-keepalive", str(keepalive)]
        self.lab.run(self.node, argv)

    def show(self, field: str) -> str:
        """``wg show <ifname> <field>`` (e.g. "transfer", "endpoints", "latest-handshakes")."""
        return self.lab.run(self.node, ["wg", "show", self.ifname, field]).stdout


def uapi_listens(ifname: str) -> bool:
    """Whether ``ifname``'s wireguard-go takes connections on its control socket.

    Not ``wg show``: when its connect is refused, ``wg`` deletes the socket as stale, and
    it is refused for a moment while wireguard-go creates it (bound, not listening yet).
    wireguard-go then finds its socket gone and exits ("Failed to listen on uapi socket:
    no such file or directory"; CI run mc-2). The socket directory is the same in
    every network namespace.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(SOCKET_DIR / f"{ifname}.sock"))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
    return True


def bare_wireguard(
    lab: Lab,
    node: str,
    address: str,
    *,
    listen_port: int = LISTEN_PORT,
    prefix: str = "wg",
    timeout: float = 10,
) -> BareWireGuard:
    """Start ``wireguard-go`` on ``node`` with a fresh key and tunnel ``address``/24, up.

    A second interface on the same node needs another ``prefix`` (its name's start)
    and ``listen_port``.
    """
    ifname = lab.ifname(node, prefix)
    pid = lab.spawn(node, ["wireguard-go", "-f", ifname], name=f"wireguard-go-{ifname}")
    deadline = time.monotonic() + timeout
    while not uapi_listens(ifname):
        if time.monotonic() > deadline:
            raise LabError(f"wireguard-go for {ifname} on {node} not up within {timeout:g} s")
        time.sleep(0.05)
    keys = WireGuardKeyPair.generate()
    key_file = lab.node_dir(node) / f"{ifname}.key"
    write_secret(key_file, keys.private_key + "\n")
    lab.run(
        node,
        ["wg", "set", ifname, "private-key", str(key_file), "listen-port", str(listen_port)],
    )
    lab.run(node, ["ip", "addr", "add", f"{address}/{TUNNEL_PREFIXLEN}", "dev", ifname])
    lab.run(node, ["ip", "link", "set", ifname, "up"])
    return BareWireGuard(lab, node, ifname, address, keys.public_key, listen_port, pid)
