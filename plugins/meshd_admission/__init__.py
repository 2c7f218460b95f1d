"""Standard admission plugin: which gossip members may become WireGuard peers.

Admits a member whose record's mesh addresses all lie inside the network's
ranges; refuses anything else with the reason. ``trylast``, so any installed
admission plugin decides first.

It does not yet verify the member's certificate chain against the network CA:
knowing the gossip key is, for now, enough to be admitted. That check is the
next step of admission (the record already carries the certificate reference).
"""

from __future__ import annotations

from meshd import hookimpl
from meshd.types import Admission, AgentAPI, Member


@hookimpl(trylast=True)
def meshd_admit_peer(agent: AgentAPI, member: Member) -> Admission:
    record = member.record
    if record is None:
        return Admission(admit=False, reason="no record")
    ranges = [net for net in (agent.network.cidr4, agent.network.cidr6) if net is not None]
    outside = [a for a in record.addresses if not any(a in net for net in ranges)]
    if outside:
        listed = ", ".join(map(str, outside))
        return Admission(admit=False, reason=f"address {listed} outside the network's ranges")
    if not record.addresses:
        return Admission(admit=False, reason="no mesh address")
    return Admission(admit=True)
