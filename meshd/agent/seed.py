"""The seed side of enrolment: this node admits a joiner that holds a valid token.

The enrolment server (:mod:`meshd.pki.enrol`) has checked the token proof and
the chain; here the seed refuses a name held by a live member or an address
held by another node (saying which, as data), adds the joiner as a known peer
so the tunnel comes up at once, announces its chain to the mesh, and answers
with every certified member so the joiner has tunnels to all of them at once.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from meshd.agent.runtime import Runtime
from meshd.errors import EnrolRefused
from meshd.node import KnownPeer, gossip_address, host_prefixes
from meshd.pki.enrol import MAX_MEMBERS_IN_ANSWER, EnrolRequest, EnrolResult, PeerInfo
from meshd.types import IPAddress, MemberState

log = logging.getLogger(__name__)


class Seed:
    """Answers enrolment requests for one agent."""

    def __init__(
        self,
        runtime: Runtime,
        run_pass: Callable[[], Awaitable[None]],
        announce: Callable[[bytes], Coroutine[Any, Any, None]],
    ) -> None:
        self._rt = runtime
        self._run_pass = run_pass
        self._announce = announce

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

    def _member_infos(self, *, exclude: str) -> list[PeerInfo]:
        """Every alive, certified member (but the joiner) with its chain and first endpoint."""
        rt = self._rt
        infos = []
        for member in rt.snapshot.alive_certified(rt.name):
            record = member.record
            chain = rt.trust.chain(record.cert) if record else None
            if record is None or chain is None or member.name == exclude:
                continue
            infos.append(PeerInfo(chain=chain, endpoint=_first(record.endpoints)))
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
