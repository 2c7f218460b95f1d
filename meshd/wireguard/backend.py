"""What every WireGuard backend offers, and the values that cross that line.

A backend owns one WireGuard interface: it creates it (:meth:`start`), sets the
device's key and port (:meth:`configure_device`), reads the live state
(:meth:`read_state`) and applies peer operations (:meth:`apply`), in one
transaction where the backend can. Two implementations exist:

* :class:`meshd.wireguard.userspace.UserspaceBackend` supervises ``wireguard-go``
  and speaks its UAPI socket;
* :class:`meshd.wireguard.kernel.KernelBackend` uses the kernel module through
  pyroute2 (generic netlink).

Value types:

* :class:`DeviceConfig` the device's own settings (private key, listen port, fwmark);
* :class:`DeviceState` / :class:`PeerState` what the interface reports, with per-peer
  endpoint, last handshake and rx/tx bytes (the stats ``meshd status`` shows);
* :class:`PeerOp` one peer operation of a reconcile plan (add, update or remove).

Keys are the base64 text ``wg`` prints; endpoints are ``IP:PORT`` or
``[IPv6]:PORT`` with the address in canonical form (:func:`normalize_endpoint`).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from meshd.errors import DecodeError, WireGuardError
from meshd.hostport import format_host_port, parse_ip_port
from meshd.identity import decode_key, encode_key
from meshd.types import IPAddress, IPNetwork

ZERO_KEY = encode_key(bytes(32))


def preshared_or_none(key: str | None) -> str | None:
    """A preshared key as meshd holds it: ``None`` for none (WireGuard says all zeros)."""
    return None if key is None or key == ZERO_KEY else key


"""A preshared key of 32 zero bytes: WireGuard's spelling of "no preshared key"."""

RestartHook = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class DeviceConfig:
    """The interface's own settings. ``listen_port=None`` lets WireGuard pick one."""

    private_key: str = field(repr=False)
    listen_port: int | None = None
    fwmark: int | None = None


@dataclass(frozen=True)
class PeerState:
    """One live peer as the interface reports it.

    ``allowed_ips`` are sorted; ``keepalive`` is ``None`` when off;
    ``preshared_key`` is ``None`` when unset; ``last_handshake`` is Unix time,
    ``None`` before the first handshake.
    """

    public_key: str
    endpoint: str | None = None
    allowed_ips: tuple[IPNetwork, ...] = ()
    keepalive: int | None = None
    preshared_key: str | None = field(default=None, repr=False)
    last_handshake: float | None = None
    rx_bytes: int = 0
    tx_bytes: int = 0


@dataclass(frozen=True)
class DeviceState:
    """The live interface: its key, port and peers (in the order the backend lists them)."""

    public_key: str | None
    listen_port: int
    fwmark: int | None = None
    peers: tuple[PeerState, ...] = ()

    def peer_map(self) -> dict[str, PeerState]:
        return {peer.public_key: peer for peer in self.peers}


class OpKind(str, enum.Enum):
    ADD = "add"
    UPDATE = "update"
    REMOVE = "remove"


@dataclass(frozen=True)
class PeerOp:
    """One operation on one peer; a field left ``None`` is not touched.

    ``ADD`` carries every field; ``UPDATE`` only the changed ones (the peer and its
    session stay); ``REMOVE`` only the key. ``allowed_ips`` replaces the peer's whole
    list. ``preshared_key=ZERO_KEY`` clears the key.
    """

    kind: OpKind
    public_key: str
    endpoint: str | None = None
    keepalive: int | None = None
    preshared_key: str | None = field(default=None, repr=False)
    allowed_ips: tuple[IPNetwork, ...] | None = None

    def __str__(self) -> str:
        changed = [
            name
            for name in ("endpoint", "keepalive", "preshared_key", "allowed_ips")
            if getattr(self, name) is not None
        ]
        detail = f" ({', '.join(changed)})" if changed and self.kind is OpKind.UPDATE else ""
        return f"{self.kind.value} {self.public_key}{detail}"


class WireGuardBackend(Protocol):
    """One WireGuard interface, driven by one implementation.

    ``netns`` is the network namespace the interface lives in (``None``: the
    current one, the normal case when the agent itself runs inside a namespace).
    """

    name: str
    ifname: str
    netns: str | None

    async def start(self) -> None:
        """Create the interface (or adopt an existing one of ours); raises WireGuardError."""

    async def stop(self) -> None:
        """Remove the interface and stop what runs it."""

    async def configure_device(self, config: DeviceConfig) -> None:
        """Set private key, listen port and fwmark; peers are untouched."""

    async def read_state(self) -> DeviceState:
        """The interface as it is now."""

    async def apply(self, ops: Sequence[PeerOp]) -> None:
        """Apply the operations in order, in one transaction where the backend can."""

    async def supervise(self) -> None:
        """Keep the interface alive until :meth:`stop` (restart a dead daemon); run as a task."""

    def set_restart_hook(self, hook: RestartHook | None) -> None:
        """Call ``hook`` after the backend had to recreate a lost interface."""

    @property
    def restarts(self) -> int:
        """How many times the interface had to be recreated."""


# Cached: every pass sees the same few thousand strings again (1,000 peers: ~50 ms saved).
@functools.lru_cache(maxsize=1 << 16)
def normalize_endpoint(text: str) -> str:
    """``IP:PORT`` / ``[IPv6]:PORT`` in canonical form; WireGuardError if ``text`` is not one.

    Host names are refused: resolving them is the caller's decision, not the data plane's.
    """
    return format_host_port(*parse_endpoint(text))


def parse_endpoint(text: str) -> tuple[IPAddress, int]:
    """The address and port of ``IP:PORT`` / ``[IPv6]:PORT``; WireGuardError if not one."""
    try:
        return parse_ip_port(text.strip())
    except DecodeError as exc:
        raise WireGuardError(f"endpoint {exc}") from exc


@functools.lru_cache(maxsize=1 << 16)
def key_hex(key: str) -> str:
    """A base64 key as the hex UAPI carries; IdentityError (not cached) if it is no key.

    Cached: a plan validates each key and the encoder converts it, every pass.
    """
    return decode_key(key).hex()


@functools.lru_cache(maxsize=1 << 16)
def parse_network(text: str) -> IPNetwork:
    """A prefix as WireGuard prints it (host bits allowed); WireGuardError if it is none."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise WireGuardError(f"{text!r} is not an IP prefix") from exc


def sorted_networks(networks: Sequence[IPNetwork] | frozenset[IPNetwork]) -> tuple[IPNetwork, ...]:
    """Networks in a stable order: IPv4 before IPv6, then by address and length."""
    if len(networks) < 2:  # the common case (a peer's one /32), without building sort keys
        return tuple(networks)
    return tuple(
        sorted(networks, key=lambda net: (net.version, net.network_address.packed, net.prefixlen))
    )


def peers_by_key(peers: Sequence[PeerState]) -> Mapping[str, PeerState]:
    return {peer.public_key: peer for peer in peers}
