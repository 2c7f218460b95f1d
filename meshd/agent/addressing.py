"""Addressing: this node keeps its mesh addresses unless another node has a better claim.

Two nodes claiming one address: :func:`meshd.desired.address_owners` decides
the same way on every node. When this node loses, it asks the IPAM plugins for
another address, moves only the lost addresses, and republishes; when the lost
address is the one Serf binds, Serf starts again on the new one.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable

from meshd.agent.runtime import Runtime
from meshd.desired import Claim, address_owners, claim_of
from meshd.errors import MeshdError
from meshd.node import gossip_address, mesh_interface_addresses
from meshd.types import IPAddress, Member, MemberState

log = logging.getLogger(__name__)

_CLAIMING = (MemberState.ALIVE, MemberState.FAILED, MemberState.LEAVING)


def lost_addresses(runtime: Runtime, members: tuple[Member, ...]) -> tuple[list[IPAddress], str]:
    """The addresses of this node another member keeps, and the name of the first winner."""
    own = runtime.published
    if own is None:
        return [], ""
    claims: list[tuple[Claim, tuple[IPAddress, ...]]] = [
        (claim_of(runtime.name, own, runtime.own_chain.node.addresses), own.addresses)
    ]
    for member in members:
        if member.record is None or member.name == runtime.name or member.state not in _CLAIMING:
            continue
        claims.append(
            (
                claim_of(member.name, member.record, member.certified_addresses),
                member.record.addresses,
            )
        )
    owners = address_owners(claims)
    lost = [a for a in own.addresses if owners[a].name != runtime.name]
    return lost, owners[lost[0]].name if lost else ""


class Addressing:
    """Moves this node off addresses it lost; see the module docstring."""

    def __init__(
        self,
        runtime: Runtime,
        republish: Callable[[], Awaitable[None]],
        restart_gossip: Callable[[], Awaitable[None]],
    ) -> None:
        self._rt = runtime
        self._republish = republish
        self._restart_gossip = restart_gossip

    async def resolve(self, members: tuple[Member, ...]) -> bool:
        """Move off lost addresses; True when this node moved."""
        rt = self._rt
        own = rt.published
        lost, winner = lost_addresses(rt, members)
        if own is None or not lost:
            return False
        taken = {
            a for m in members if m.record and m.state in _CLAIMING for a in m.record.addresses
        }
        try:
            offer = rt.plugins.allocate_address(
                rt.state.network, rt.identity, frozenset(taken | set(own.addresses))
            )
        except MeshdError as exc:
            log.error("address %s is kept by %s and cannot move: %s", lost[0], winner, exc)
            return False
        if offer is None:
            log.error("address %s is kept by %s and no plugin offers another", lost[0], winner)
            return False
        # Only the lost addresses move; the others (the gossip address above all) stay.
        replacement = {a.version: a for a in offer.all()}
        moved = tuple(replacement[a.version] if a in lost else a for a in own.addresses)
        log.warning(
            "address conflict: %s is kept by %s; moving to %s",
            ", ".join(map(str, lost)),
            winner,
            ", ".join(str(replacement[a.version]) for a in lost),
        )
        await self._move_to(moved)
        return True

    async def _move_to(self, addresses: tuple[IPAddress, ...]) -> None:
        rt = self._rt
        old_gossip = gossip_address(rt.state.addresses.all())
        v4 = next(a for a in addresses if a.version == 4)
        v6 = next((a for a in addresses if a.version == 6), None)
        new = dataclasses.replace(rt.state.addresses, ipv4=v4, ipv6=v6, static=False)
        rt.state = dataclasses.replace(rt.state, addresses=new, static_address=False)
        rt.store.save_node(rt.state)
        await rt.iface.set_addresses(mesh_interface_addresses(rt.state.network, new))
        if gossip_address(new.all()) == old_gossip:
            await self._republish()
            return
        # Known peers carry the mesh while the new Serf finds the others again.
        rt.carry_peers()
        # Serf is bound to the moved address: it must start again on the new one.
        await self._restart_gossip()
