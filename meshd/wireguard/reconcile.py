"""Reconcile a WireGuard interface with the desired peers, like ``wg syncconf``.

:func:`plan_peers` and :func:`plan_routes` are pure: they compare the live state
with the desired one and return the fewest operations that turn the first into
the second. :func:`reconcile_peers` reads, plans and applies through a backend.

The rules the plan keeps:

* a peer whose settings are unchanged is not touched, so it keeps its session; a
  changed peer is updated in place (never removed and re-added), and
  ``replace_peers`` is never used;
* the plan of a state against itself is empty: a second pass does nothing;
* an allowed prefix moving from peer A to peer B is one plan applied as one
  transaction (WireGuard takes the prefix from A the moment B gets it); ops that
  give prefixes come first, so even a backend that applies op by op never leaves a
  moving prefix without an owner;
* the same prefix on two desired peers is refused as ambiguous; a prefix *inside*
  another one's is fine (longest-prefix match: a relay carries the mesh range,
  direct peers their own /32);
* a desired endpoint of ``None`` leaves the live endpoint alone (WireGuard learns
  it from the peer's handshakes).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from meshd.errors import WireGuardError
from meshd.identity import decode_key
from meshd.types import IPNetwork, PeerConfig
from meshd.wireguard.backend import (
    ZERO_KEY,
    OpKind,
    PeerOp,
    PeerState,
    WireGuardBackend,
    normalize_endpoint,
    sorted_networks,
)

log = logging.getLogger(__name__)

_LINK_LOCAL6 = ipaddress.ip_network("fe80::/10")


@dataclass(frozen=True)
class _Wanted:
    public_key: str
    endpoint: str | None
    keepalive: int
    preshared_key: str | None
    allowed_ips: frozenset[IPNetwork]


@functools.lru_cache(maxsize=1 << 16)
def _checked_key(key: str, what: str) -> str:
    # Cached: a valid key stays valid; errors are not cached and raise every time.
    decode_key(key, what=what)
    return key


def _validate(desired: Iterable[PeerConfig]) -> dict[str, _Wanted]:
    wanted: dict[str, _Wanted] = {}
    owner: dict[IPNetwork, str] = {}
    for peer in desired:
        key = peer.public_key.strip()
        _checked_key(key, f"peer public key {key!r}")
        if key in wanted:
            raise WireGuardError(f"peer {key} is listed twice in the desired peers")
        psk = None
        if peer.preshared_key is not None:
            decode_key(peer.preshared_key, what=f"preshared key of peer {key}")
            psk = None if peer.preshared_key.strip() == ZERO_KEY else peer.preshared_key.strip()
        keepalive = peer.keepalive or 0
        if not 0 <= keepalive <= 65535:
            raise WireGuardError(f"peer {key}: keepalive {keepalive} is not 0-65535 seconds")
        endpoint = None
        if peer.endpoint is not None:
            try:
                endpoint = normalize_endpoint(peer.endpoint)
            except WireGuardError as exc:
                raise WireGuardError(f"peer {key}: {exc}") from exc
        allowed = frozenset(peer.allowed_ips)
        for net in allowed:
            other = owner.setdefault(net, key)
            if other != key:
                raise WireGuardError(
                    f"allowed prefix {net} is on two peers ({other} and {key}): ambiguous"
                )
        wanted[key] = _Wanted(key, endpoint, keepalive, psk, allowed)
    return wanted


def plan_peers(live: Iterable[PeerState], desired: Iterable[PeerConfig]) -> tuple[PeerOp, ...]:
    """The operations that turn the ``live`` peers into the ``desired`` ones.

    Raises IdentityError for a malformed key and WireGuardError for other bad input
    (two peers with one key or one prefix, a bad endpoint or keepalive), naming it.
    """
    wanted = _validate(desired)
    current = {peer.public_key: peer for peer in live}
    gaining: list[PeerOp] = []
    updating: list[PeerOp] = []
    removing: list[PeerOp] = []
    for key in sorted(wanted):
        want = wanted[key]
        have = current.get(key)
        if have is None:
            gaining.append(
                PeerOp(
                    OpKind.ADD,
                    key,
                    endpoint=want.endpoint,
                    keepalive=want.keepalive or None,
                    preshared_key=want.preshared_key,
                    allowed_ips=sorted_networks(want.allowed_ips),
                )
            )
            continue
        endpoint = want.endpoint if want.endpoint not in (None, have.endpoint) else None
        keepalive = want.keepalive if want.keepalive != (have.keepalive or 0) else None
        psk = None
        if want.preshared_key != have.preshared_key:
            psk = want.preshared_key or ZERO_KEY
        have_ips = frozenset(have.allowed_ips)
        allowed = sorted_networks(want.allowed_ips) if want.allowed_ips != have_ips else None
        if endpoint is None and keepalive is None and psk is None and allowed is None:
            continue
        op = PeerOp(
            OpKind.UPDATE,
            key,
            endpoint=endpoint,
            keepalive=keepalive,
            preshared_key=psk,
            allowed_ips=allowed,
        )
        (gaining if want.allowed_ips - have_ips else updating).append(op)
    removing.extend(PeerOp(OpKind.REMOVE, key) for key in sorted(current) if key not in wanted)
    return (*gaining, *updating, *removing)


@dataclass(frozen=True)
class RoutePlan:
    """Routes to add and to remove on the WireGuard interface."""

    add: tuple[IPNetwork, ...] = ()
    remove: tuple[IPNetwork, ...] = ()

    def __len__(self) -> int:
        return len(self.add) + len(self.remove)


def routed_prefixes(
    prefixes: Iterable[IPNetwork], on_link: Iterable[IPNetwork]
) -> frozenset[IPNetwork]:
    """The prefixes that need a route: not inside an on-link network, and not a default route.

    A default route (``/0``) is left to policy routing: a plain one would also
    capture the tunnel's own underlay packets.
    """
    links = [*on_link, _LINK_LOCAL6]
    return frozenset(
        net
        for net in prefixes
        if net.prefixlen > 0
        and not any(
            net.version == link.version and net.subnet_of(link)  # type: ignore[arg-type]
            for link in links
        )
    )


def plan_routes(
    prefixes: Iterable[IPNetwork], on_link: Iterable[IPNetwork], live: Iterable[IPNetwork]
) -> RoutePlan:
    """Routes for every allowed prefix that is not on-link; live ones nobody wants go."""
    wanted = routed_prefixes(prefixes, on_link)
    have = frozenset(live)
    return RoutePlan(add=sorted_networks(wanted - have), remove=sorted_networks(have - wanted))


async def reconcile_peers(
    backend: WireGuardBackend, desired: Sequence[PeerConfig]
) -> tuple[PeerOp, ...]:
    """Read the live peers, plan, apply; returns the ops applied (empty when in sync)."""
    state = await backend.read_state()
    ops = plan_peers(state.peers, desired)
    if ops:
        log.debug("%s: applying %d peer operation(s)", backend.ifname, len(ops))
        await backend.apply(ops)
    return ops
