"""Reconcile a WireGuard interface with the desired peers, like ``wg syncconf``.

:func:`plan_peers` and :func:`plan_routes` are pure: they compare the live state
with the desired one and return the fewest operations that turn the first into
the second. :func:`reconcile_peers` reads, plans and applies through a backend.
:class:`AppliedPeers` remembers what a pass left on the interface, so the next pass
plans from memory, looking only at the peers whose desired settings changed.

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

import ipaddress
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

from meshd.errors import IdentityError, WireGuardError
from meshd.identity import decode_key
from meshd.types import IPNetwork, PeerConfig
from meshd.wireguard.backend import (
    ZERO_KEY,
    OpKind,
    PeerOp,
    PeerState,
    WireGuardBackend,
    key_hex,
    normalize_endpoint,
    preshared_or_none,
    sorted_networks,
)

log = logging.getLogger(__name__)

_LINK_LOCAL6 = ipaddress.ip_network("fe80::/10")


class _Wanted(NamedTuple):  # a NamedTuple: built 1,000 times a pass, 5x cheaper than a dataclass
    public_key: str
    endpoint: str | None
    keepalive: int
    preshared_key: str | None
    allowed_ips: tuple[IPNetwork, ...]  # as given: may repeat a prefix


def _check_key(key: str) -> None:
    try:
        key_hex(key)  # cached: a valid key stays valid
    except IdentityError:
        decode_key(key, what=f"peer public key {key!r}")  # raises, naming the key
        raise


def _validate(desired: Iterable[PeerConfig]) -> dict[str, _Wanted]:
    wanted: dict[str, _Wanted] = {}
    owner: dict[IPNetwork, str] = {}
    for peer in desired:
        key = peer.public_key.strip()
        _check_key(key)
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
        # Hashing a prefix costs ~1 us (ipaddress does it in Python): once each, here.
        for net in peer.allowed_ips:
            other = owner.setdefault(net, key)
            if other != key:
                raise WireGuardError(
                    f"allowed prefix {net} is on two peers ({other} and {key}): ambiguous"
                )
        wanted[key] = _Wanted(key, endpoint, keepalive, psk, tuple(peer.allowed_ips))
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
            given = want.allowed_ips
            gaining.append(
                PeerOp(
                    OpKind.ADD,
                    key,
                    endpoint=want.endpoint,
                    keepalive=want.keepalive or None,
                    preshared_key=want.preshared_key,
                    allowed_ips=sorted_networks(frozenset(given) if len(given) > 1 else given),
                )
            )
            continue
        endpoint = want.endpoint if want.endpoint not in (None, have.endpoint) else None
        keepalive = want.keepalive if want.keepalive != (have.keepalive or 0) else None
        psk = None
        if want.preshared_key != have.preshared_key:
            psk = want.preshared_key or ZERO_KEY
        want_ips, have_ips = frozenset(want.allowed_ips), frozenset(have.allowed_ips)
        allowed = sorted_networks(want_ips) if want_ips != have_ips else None
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
        (gaining if want_ips - have_ips else updating).append(op)
    removing.extend(PeerOp(OpKind.REMOVE, key) for key in sorted(current) if key not in wanted)
    return (*gaining, *updating, *removing)


@dataclass(frozen=True)
class RoutePlan:
    """Routes to add and to remove on the WireGuard interface."""

    add: tuple[IPNetwork, ...] = ()
    remove: tuple[IPNetwork, ...] = ()

    def __len__(self) -> int:
        return len(self.add) + len(self.remove)


def _inside(net: IPNetwork, link: IPNetwork) -> bool:
    # subnet_of in integer arithmetic: ipaddress's own check costs ~3 us a prefix.
    if net.version != link.version or net.prefixlen < link.prefixlen:
        return False
    shift = link.max_prefixlen - link.prefixlen
    return int(net.network_address) >> shift == int(link.network_address) >> shift


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
        if net.prefixlen > 0 and not any(_inside(net, link) for link in links)
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


_NEW_PEER = PeerState("")  # what an ADD starts from: no settings, no stats


def applied_peers(live: Mapping[str, PeerState], ops: Iterable[PeerOp]) -> dict[str, PeerState]:
    """The peers ``live`` becomes once ``ops`` are applied, by WireGuard's rules.

    Only the settings a plan compares are tracked; handshakes and byte counts stay
    as they were (a new peer has none).
    """
    after = dict(live)
    owner: dict[IPNetwork, str] | None = None  # built at the first op that moves prefixes

    def disown(peer: PeerState) -> None:
        if owner is not None:
            for net in peer.allowed_ips:
                if owner.get(net) == peer.public_key:
                    del owner[net]

    for op in ops:
        have = after.get(op.public_key)
        if op.kind is OpKind.REMOVE:
            if have is not None:
                disown(have)
                del after[op.public_key]
            continue
        if have is None:
            if op.kind is OpKind.UPDATE:  # update_only: WireGuard does not create it
                continue
            have = _NEW_PEER
        if op.allowed_ips is not None and owner is None:
            owner = {net: key for key, peer in after.items() for net in peer.allowed_ips}
        psk = have.preshared_key
        if op.preshared_key is not None:
            psk = preshared_or_none(op.preshared_key)
        # Built directly: dataclasses.replace costs ~4 us a call, 1,000 calls a full apply.
        after[op.public_key] = PeerState(
            op.public_key,
            have.endpoint if op.endpoint is None else op.endpoint,
            have.allowed_ips if op.allowed_ips is None else op.allowed_ips,
            have.keepalive if op.keepalive is None else op.keepalive or None,
            psk,
            have.last_handshake,
            have.rx_bytes,
            have.tx_bytes,
        )
        if op.allowed_ips is None or owner is None:
            continue
        disown(have)
        for net in op.allowed_ips:
            # WireGuard takes the prefix from whichever peer held it.
            holder = owner.setdefault(net, op.public_key)
            if holder == op.public_key:
                continue
            owner[net] = op.public_key
            if holder in after:
                other = after[holder]
                after[holder] = replace(
                    other, allowed_ips=tuple(n for n in other.allowed_ips if n != net)
                )
    return after


class AppliedPeers:
    """What a pass left on the interface: the desired peers it applied and the live result.

    :meth:`plan` gives the same operations as :func:`plan_peers` against the live
    peers, but looks only at the peers whose desired settings differ from the last
    applied ones: ~0.5 ms at 1,000 peers for a no-op, instead of a full device read
    and plan. It is only as true as the device is left alone; the owner re-reads the
    device now and then (:class:`meshd.wireguard.interface.WireGuardInterface`).
    """

    def __init__(self, desired: Iterable[PeerConfig], live: Mapping[str, PeerState]) -> None:
        self.desired: dict[str, PeerConfig] = {peer.public_key: peer for peer in desired}
        self.live = dict(live)
        self._owner = {net: key for key, peer in self.desired.items() for net in peer.allowed_ips}

    def plan(self, desired: Sequence[PeerConfig]) -> tuple[PeerOp, ...]:
        """The operations that turn the live peers into ``desired``; raises as plan_peers."""
        wanted = {peer.public_key: peer for peer in desired}
        if len(wanted) != len(desired):
            return plan_peers(self.live.values(), desired)  # raises, naming the twice-listed key
        changed = [peer for peer in desired if self.desired.get(peer.public_key) != peer]
        gone = [key for key in self.desired if key not in wanted]
        if not changed and not gone:
            return ()
        if 2 * (len(changed) + len(gone)) > len(desired):
            return plan_peers(self.live.values(), desired)  # most changed: no subset to save on
        touched = {peer.public_key for peer in changed}.union(gone)
        for peer in changed:
            for net in peer.allowed_ips:
                holder = self._owner.get(net)
                if holder is not None and holder not in touched:
                    # Claimed by a peer that keeps it: plan_peers names the conflict.
                    return plan_peers(self.live.values(), desired)
        live = [self.live[key.strip()] for key in touched if key.strip() in self.live]
        return plan_peers(live, changed)

    def matches(self, peers: Iterable[PeerState]) -> bool:
        """Whether a read of the device shows the peers this record expects.

        Endpoints are not compared: WireGuard moves them itself when a peer roams, and
        the owner's periodic full check sets them back where meshd wants them.
        """
        seen = 0
        for peer in peers:
            seen += 1
            mine = self.live.get(peer.public_key)
            if (
                mine is None
                or mine.keepalive != peer.keepalive
                or mine.preshared_key != peer.preshared_key
                or (
                    mine.allowed_ips != peer.allowed_ips
                    and frozenset(mine.allowed_ips) != frozenset(peer.allowed_ips)
                )
            ):
                return False
        return seen == len(self.live)

    def after(self, desired: Sequence[PeerConfig], ops: Sequence[PeerOp]) -> AppliedPeers:
        """The record once ``ops`` (planned for ``desired``) are applied."""
        if not ops:
            # The device did not change. A peer whose desired settings changed without
            # needing an op (an endpoint left to WireGuard) is merely looked at again.
            return self
        return AppliedPeers(desired, applied_peers(self.live, ops))
