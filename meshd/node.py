"""This node's state on disk: the network it belongs to, its keys, certificate and last peers.

Files in the state directory (0700)::

    network.json    network name, id, address ranges, CA public key     (0644)
    node.json       node name, mesh addresses, certificate chain        (0644)
    wireguard.key   the WireGuard private key                           (0600)
    gossip.key      the network's gossip key at creation (Serf then keeps
                    its own keyring in serf/keyring.json)               (0600)
    ca.key          the network CA's secret, only where it was created  (0600)
    ca.key.new      during ``meshd ca rotate``: the next CA secret, until it is
                    trusted (then it replaces ca.key)                   (0600)
    ca.key.old      the CA secret a rotation replaced, until it is retired (0600)
    ca-roots        CA keys learnt by cross-signature, and keys retired (0644)
    peers.json      the peers last applied, restored at start so a rebooted
                    node has a data plane before gossip converges       (0644)

Every write is atomic. :meth:`NodeStore.create` refuses to overwrite an
existing node, so a second ``meshd init`` or ``join`` cannot lose a network.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshd.b64 import decode_b64, encode_b64
from meshd.errors import DecodeError, IdentityError, StateError
from meshd.identity import WireGuardKeyPair
from meshd.state import (
    DeferredWrites,
    atomic_write,
    ensure_private_dir,
    read_secret,
    write_secret,
)
from meshd.types import IPAddress, IPNetwork, MeshAddresses, Network, PeerConfig

SERF_DIR = "serf"


@dataclass(frozen=True)
class NodeState:
    """Everything this node needs to run, loaded from the state directory."""

    network: Network
    ca_public_key: bytes
    name: str
    keys: WireGuardKeyPair
    addresses: MeshAddresses
    chain: bytes
    gossip_key: bytes = field(repr=False)
    static_address: bool = False


@dataclass(frozen=True)
class KnownPeer:
    """A peer from the last applied state (or from enrolment), before gossip confirms it."""

    name: str
    public_key: str
    allowed_ips: tuple[IPNetwork, ...]
    endpoint: str | None
    gossip_addr: str | None = None
    # Its certificate chain, when known: admission needs no query after a restart.
    chain: bytes | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "public_key": self.public_key,
            "allowed_ips": [str(p) for p in self.allowed_ips],
            "endpoint": self.endpoint,
            "gossip_addr": self.gossip_addr,
            "chain": encode_b64(self.chain) if self.chain else None,
        }

    @classmethod
    def from_json(cls, value: Any) -> KnownPeer:
        return cls(
            name=str(value["name"]),
            public_key=str(value["public_key"]),
            allowed_ips=tuple(ipaddress.ip_network(p) for p in value["allowed_ips"]),
            endpoint=value.get("endpoint"),
            gossip_addr=value.get("gossip_addr"),
            chain=_unb64(value["chain"], "chain") if value.get("chain") else None,
        )

    def peer(self, keepalive: int | None) -> PeerConfig:
        return PeerConfig(
            public_key=self.public_key,
            allowed_ips=self.allowed_ips,
            endpoint=self.endpoint,
            keepalive=keepalive,
        )


def _unb64(text: str, what: str) -> bytes:
    try:
        return decode_b64(text)
    except DecodeError as exc:
        raise StateError(f"{what} is {exc}") from exc


class NodeStore:
    """Reads and writes :class:`NodeState` in one state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)

    def path(self, name: str) -> Path:
        return self.dir / name

    @property
    def serf_dir(self) -> Path:
        return self.dir / SERF_DIR

    def exists(self) -> bool:
        return self.path("network.json").exists()

    def create(self, state: NodeState, *, ca_secret: bytes | None = None) -> None:
        """Write a new node; StateError if this state directory already holds one."""
        if self.exists():
            raise StateError(
                f"{self.dir} already holds a node of network "
                f"{self._peek_network()!r}; use another --state-dir, or remove it first"
            )
        ensure_private_dir(self.dir)
        write_secret(self.path("wireguard.key"), state.keys.private_key + "\n")
        write_secret(self.path("gossip.key"), encode_b64(state.gossip_key) + "\n")
        if ca_secret is not None:
            write_secret(self.path("ca.key"), encode_b64(ca_secret) + "\n")
        self.save_node(state)
        network = state.network
        atomic_write(
            self.path("network.json"),
            json.dumps(
                {
                    "name": network.name,
                    "network_id": network.network_id,
                    "cidr4": str(network.cidr4),
                    "cidr6": str(network.cidr6) if network.cidr6 else None,
                    "ca_public_key": encode_b64(state.ca_public_key),
                },
                indent=2,
            )
            + "\n",
        )

    def save_node(self, state: NodeState) -> None:
        """Rewrite node.json (e.g. after this node moved to another address)."""
        atomic_write(
            self.path("node.json"),
            json.dumps(
                {
                    "name": state.name,
                    "ipv4": str(state.addresses.ipv4),
                    "ipv6": str(state.addresses.ipv6) if state.addresses.ipv6 else None,
                    "static_address": state.static_address,
                    "chain": encode_b64(state.chain),
                },
                indent=2,
            )
            + "\n",
        )

    def save_keys(self, state: NodeState) -> None:
        """After a WireGuard key rotation: the new private key, then the new certificate."""
        write_secret(self.path("wireguard.key"), state.keys.private_key + "\n")
        self.save_node(state)

    def save_gossip_key(self, key: bytes) -> None:
        """After a gossip key rotation: the key new tokens carry."""
        write_secret(self.path("gossip.key"), encode_b64(key) + "\n")

    def current_gossip_key(self) -> str | None:
        """The primary gossip key in Serf's own keyring file (Serf rewrites it, primary
        first, whenever any member rotates the key), or None before Serf first ran."""
        try:
            keys = json.loads((self.serf_dir / "keyring.json").read_text())
        except (OSError, ValueError):
            return None
        if isinstance(keys, list) and keys and isinstance(keys[0], str):
            return keys[0]
        return None

    def gossip_keys(self) -> tuple[bytes, ...]:
        """Every key in Serf's keyring file (primary first); empty before Serf first ran.
        Keys that are not base64 are skipped."""
        try:
            keys = json.loads((self.serf_dir / "keyring.json").read_text())
        except (OSError, ValueError):
            return ()
        if not isinstance(keys, list):
            return ()
        out = []
        for key in keys:
            try:
                out.append(decode_b64(key))
            except DecodeError:
                continue
        return tuple(out)

    def _peek_network(self) -> str:
        try:
            return str(json.loads(self.path("network.json").read_text())["name"])
        except (OSError, ValueError, KeyError):
            return "?"

    def _json(self, name: str) -> dict[str, Any]:
        path = self.path(name)
        try:
            value = json.loads(path.read_text())
        except FileNotFoundError:
            raise StateError(
                f"{path} does not exist: this machine is in no network yet "
                "(run 'meshd init' or 'meshd join')"
            ) from None
        except (OSError, ValueError) as exc:
            raise StateError(f"cannot read {path}: {exc}") from exc
        if not isinstance(value, dict):
            raise StateError(f"{path} is not a JSON object")
        return value

    def _secret(self, name: str) -> str:
        return read_secret(self.path(name)).decode().strip()

    def load(self) -> NodeState:
        network = self._json("network.json")
        node = self._json("node.json")
        try:
            cidr6 = network.get("cidr6")
            net = Network(
                name=network["name"],
                network_id=network["network_id"],
                cidr4=ipaddress.IPv4Network(network["cidr4"]),
                cidr6=ipaddress.IPv6Network(cidr6) if cidr6 else None,
            )
            ipv6 = node.get("ipv6")
            addresses = MeshAddresses(
                ipv4=ipaddress.IPv4Address(node["ipv4"]),
                ipv6=ipaddress.IPv6Address(ipv6) if ipv6 else None,
            )
            return NodeState(
                network=net,
                ca_public_key=_unb64(network["ca_public_key"], "ca_public_key"),
                name=node["name"],
                keys=WireGuardKeyPair.from_private(self._secret("wireguard.key")),
                addresses=addresses,
                chain=_unb64(node["chain"], "chain"),
                gossip_key=_unb64(self._secret("gossip.key"), "gossip.key"),
                static_address=bool(node.get("static_address", False)),
            )
        except (KeyError, TypeError, ValueError, IdentityError) as exc:
            raise StateError(f"the node state in {self.dir} is damaged: {exc}") from exc

    def ca_secret(self) -> bytes | None:
        """The CA secret, when this machine holds it."""
        if not self.path("ca.key").exists():
            return None
        return _unb64(self._secret("ca.key"), "ca.key")

    def stage_ca_secret(self, secret: bytes) -> None:
        """Keep the current CA secret as ca.key.old and write the next one to ca.key.new;
        :meth:`commit_ca_secret` makes it ca.key once the mesh trusts its key."""
        current = self.ca_secret()
        if current is None:
            raise StateError(f"{self.path('ca.key')} does not exist: no CA key to rotate here")
        write_secret(self.path("ca.key.old"), encode_b64(current) + "\n")
        write_secret(self.path("ca.key.new"), encode_b64(secret) + "\n")

    def staged_ca_secret(self) -> bytes | None:
        """The next CA secret of a rotation not committed yet (a crash in between)."""
        if not self.path("ca.key.new").exists():
            return None
        return _unb64(self._secret("ca.key.new"), "ca.key.new")

    def commit_ca_secret(self) -> None:
        os.replace(self.path("ca.key.new"), self.path("ca.key"))

    def discard_ca_secret(self, which: str) -> None:
        """Remove ca.key.new (a rotation that never took) or ca.key.old (retired)."""
        self.path(f"ca.key.{which}").unlink(missing_ok=True)

    def load_peers(self) -> list[KnownPeer]:
        path = self.path("peers.json")
        try:
            return [KnownPeer.from_json(p) for p in json.loads(path.read_text())["peers"]]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Only a cache: a damaged one costs a slower start, not the node.
            raise StateError(f"{path} is damaged ({exc}); remove it to start without it") from exc

    def save_peers(self, peers: list[KnownPeer], *, writes: DeferredWrites | None = None) -> None:
        """Write the peer cache; through ``writes`` (the daemon's), it waits in memory
        while the disk is full instead of raising."""
        text = json.dumps({"peers": [p.to_json() for p in peers]}, indent=2) + "\n"
        if writes is None:
            atomic_write(self.path("peers.json"), text)
        else:
            writes.write(self.path("peers.json"), text)


def new_rpc_key() -> str:
    return secrets.token_urlsafe(24)


def ula_prefix(network_id: str) -> ipaddress.IPv6Network:
    """An RFC 4193 unique local /64 derived from the network id (fdXX:XXXX:XXXX::/64)."""
    global_id = hashlib.blake2b(network_id.encode(), digest_size=5).digest()
    raw = b"\xfd" + global_id + b"\x00\x00" + bytes(8)
    return ipaddress.IPv6Network((ipaddress.IPv6Address(raw), 64))


def mesh_interface_addresses(
    network: Network, addresses: MeshAddresses
) -> tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...]:
    """The interface addresses: each mesh address with its network's prefix length."""
    result: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = [
        ipaddress.IPv4Interface(f"{addresses.ipv4}/{network.cidr4.prefixlen}")
    ]
    if addresses.ipv6 is not None and network.cidr6 is not None:
        result.append(ipaddress.IPv6Interface(f"{addresses.ipv6}/{network.cidr6.prefixlen}"))
    return tuple(result)


def gossip_address(addresses: tuple[IPAddress, ...]) -> IPAddress:
    """The mesh address Serf binds: the IPv6 one when there is one.

    IPv6 addresses are derived from the node's key in a /64 and practically never
    collide, so an IPv4 address conflict never moves gossip: a Serf agent that
    re-appears under its old name at a new address is refused by the others
    until the old entry is reaped, 24 hours later.
    """
    return next((a for a in addresses if a.version == 6), addresses[0])


def host_prefixes(addresses: tuple[IPAddress, ...]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(a) for a in addresses)
