"""The seed side of enrolment: this node admits a joiner that holds a valid token.

The enrolment server (:mod:`meshd.pki.enrol`) has checked the token proof and
the chain; here the seed refuses a name held by a live member or an address
held by another node (saying which, as data), adds the joiner as a known peer
so the tunnel comes up at once, announces its chain to the mesh, and answers
with every certified member so the joiner has tunnels to all of them at once:
each with the endpoint a stranger may dial (:func:`dialable`), none where only
an arrangement opens the way (a member behind NAT, a relay's port). Once the
joiner is a member in its gossip, the seed passes it on to a few members directly
(:meth:`Presence.spread`).

A member that proved it holds its certified WireGuard key (a re-join, see
:mod:`meshd.pki.rejoin`: everybody dropped it and it hears nobody) is added back
as a known peer the same way, after its chain is checked like any other (CA,
validity, revocations), and counts as recently heard for ``REJOIN_VOUCH``
seconds, so a forged *left* in this node's view does not keep its peer out while
its Serf comes back.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from meshd.agent.runtime import Runtime
from meshd.errors import EnrolRefused, IdentityError
from meshd.identity import decode_key
from meshd.node import KnownPeer, gossip_address, host_prefixes
from meshd.pki.enrol import (
    MAX_MEMBERS_IN_ANSWER,
    EnrolRequest,
    EnrolResult,
    PeerInfo,
    SeedIdentity,
)
from meshd.pki.rejoin import RejoinRequest
from meshd.types import IPAddress, MemberState, NodeRecord, PathChoice

log = logging.getLogger(__name__)

# Long enough for the member's Serf to join through the new tunnel and refute a leave.
REJOIN_VOUCH = 30.0


class Seed:
    """Answers enrolment requests for one agent."""

    def __init__(
        self,
        runtime: Runtime,
        run_pass: Callable[[], Awaitable[None]],
        announce: Callable[[bytes], Coroutine[Any, Any, None]],
        spread: Callable[[str], Coroutine[Any, Any, None]],
    ) -> None:
        self._rt = runtime
        self._run_pass = run_pass
        self._announce = announce
        self._spread = spread

    async def enrolled(self, request: EnrolRequest) -> EnrolResult:
        rt = self._rt
        name, key = request.name, request.public_key
        members = rt.snapshot.members
        for member in members:
            if (
                member.name == name
                and member.state is MemberState.ALIVE
                # A gossip-key holder alone must not block a wiped machine's re-join.
                and member.certified
                and member.record
                and member.record.public_key != key
            ):
                raise EnrolRefused(f"the name {name!r} is taken by a live member")
        network = rt.state.network
        ranges = [n for n in (network.cidr4, network.cidr6) if n is not None]
        for address in request.addresses:
            if not any(address in net for net in ranges):
                raise EnrolRefused(f"address {address} is outside the network's ranges")
            holder = self._holder_of(address, key)
            if holder is not None:
                raise EnrolRefused(f"address {address} is taken by {holder}", taken=str(address))
        chain = request.chain.encode()
        rt.known.add(
            KnownPeer(
                name=name,
                public_key=key,
                allowed_ips=host_prefixes(request.addresses),
                endpoint=request.endpoint,
                gossip_addr=str(gossip_address(request.addresses)),
                # Kept with it: a revocation or a retired CA key drops it at once.
                chain=chain,
            )
        )
        rt.trust.add_chain(chain, request.chain.ref)
        await self._run_pass()
        rt.tasks.start(self._announce(chain), name="announce-chain")
        rt.tasks.start(self._spread(key), name="spread-newcomer")
        log.info(
            "enrolled %s (%s) from %s",
            name,
            ", ".join(map(str, request.addresses)),
            request.endpoint,
        )
        own = rt.published
        return EnrolResult(
            seed=PeerInfo(chain=rt.own_chain, endpoint=_first(own.endpoints if own else ())),
            members=tuple(self._member_infos(exclude=name)[:MAX_MEMBERS_IN_ANSWER]),
        )

    def identity(self) -> SeedIdentity:
        """What this seed proves itself with in the enrolment handshake, read at each
        connection: its WireGuard key and chain (a key rotation changes both) and the
        gossip keys Serf accepts now, from its keyring (a token made before a rotation
        that is still under way still works; one whose key was removed does not), or
        this node's own before Serf first ran."""
        rt = self._rt
        state = rt.state
        # A token names a CA key this node trusts now: two during a CA rotation, and
        # never the old one once it is retired.
        first, *others = rt.trust.roots.keys
        return SeedIdentity(
            private_key=decode_key(state.keys.private_key, what="wireguard.key"),
            chain=rt.own_chain,
            gossip_keys=rt.store.gossip_keys() or (state.gossip_key,),
            ca_public_key=first,
            other_ca_keys=tuple(others),
        )

    async def rejoined(self, request: RejoinRequest) -> str:
        """Take back a member that proved it holds its certified key (the server checked
        the proof); how this node's gossip saw it before ("absent" if not at all)."""
        rt = self._rt
        try:
            request.chain.verify(rt.trust.roots, int(time.time()), revoked=rt.trust.revoked)
        except IdentityError as exc:
            raise EnrolRefused(f"certificate refused: {exc}") from exc
        node = request.chain.node
        key = node.public_key
        if key == rt.state.keys.public_key:
            raise EnrolRefused("that is this node's own key")
        states = {m.state for m in rt.snapshot.members if m.record and m.record.public_key == key}
        known = "alive" if MemberState.ALIVE in states else min(states, default="absent")
        rt.vouch(key, REJOIN_VOUCH)
        rt.known.add(
            KnownPeer(
                name=node.name,
                public_key=key,
                allowed_ips=host_prefixes(node.addresses),
                endpoint=request.endpoint,
                gossip_addr=str(gossip_address(node.addresses)),
            )
        )
        rt.trust.add_chain(request.chain.encode(), request.chain.ref)
        await self._run_pass()
        rt.iface.poke(p for p in rt.snapshot.desired.peers if p.public_key == key)
        log.info(
            "took %s as a peer on its own request (%s; gossip here: %s)",
            node.name,
            request.endpoint,
            known,
        )
        return known

    def _member_infos(self, *, exclude: str) -> list[PeerInfo]:
        """Every alive, certified member (but the joiner) with its chain and the endpoint
        the joiner may dial before gossip tells it more (:func:`dialable`)."""
        rt = self._rt
        paths = rt.snapshot.desired.paths
        infos = []
        for member in rt.snapshot.alive_certified(rt.name):
            record = member.record
            chain = rt.trust.chain(record.cert) if record else None
            if record is None or chain is None or member.name == exclude:
                continue
            infos.append(PeerInfo(chain=chain, endpoint=dialable(record, paths.get(member.name))))
        return infos

    def _holder_of(self, address: IPAddress, key: str) -> str | None:
        """The node, other than the one with ``key``, that claims ``address``."""
        rt = self._rt
        if address in rt.state.addresses.all():
            return rt.name
        for member in rt.snapshot.members:
            record = member.record
            if record is None or record.public_key == key:
                continue
            if member.state in (MemberState.LEFT, MemberState.REAPED):
                continue
            if address in record.addresses:
                return member.name
        prefix = ipaddress.ip_network(address)
        for known in rt.known:
            if known.public_key != key and prefix in known.allowed_ips:
                return known.name
        return None


def _first(endpoints: tuple[str, ...]) -> str | None:
    return endpoints[0] if endpoints else None


def dialable(record: NodeRecord, path: PathChoice | None) -> str | None:
    """The endpoint a joiner may aim at a member before gossip describes it: where
    this node reaches the member directly (the first endpoint on the engine's default
    path, or before any path was chosen), unless that is open to this node only.

    None for a relay (its port serves one pair), for a member that dials in (behind
    NAT, it lets in only whom it sends to) and for a hole punched for this pair
    (``pair_only``). Packets sent there anyway are worse than lost: behind a Linux
    NAT the joiner's first packet to a member's reflexive endpoint keeps source port
    51820 when that mapping is free, so it takes the mapping the joiner's site-mate
    holding port 51820 needs to punch to that member, and that pair stays relayed
    while the joiner keeps sending. The joiner learns the path from gossip a moment
    later.
    """
    if path is None or (path.via is None and path.endpoint is None and not path.learn):
        return _first(record.endpoints)
    if path.via or path.learn or path.pair_only:
        return None
    return path.endpoint  # direct, found by a policy (its LAN address, heard by mDNS)
