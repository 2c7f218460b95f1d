"""Standard admission plugin: which gossip members may become WireGuard peers.

Admits a member only when the engine certified it (its certificate chain
leads to the network CA, is neither expired nor revoked, and binds the
member's name and WireGuard key: knowing the gossip key is not enough) and
its record's mesh addresses all lie inside the network's ranges. Refuses
anything else with the reason. ``trylast``, so an installed admission plugin
(an ACL, say) decides first; such a plugin should refuse uncertified members too.
"""

from __future__ import annotations

from meshd import Admission, AgentAPI, Member, hookimpl


@hookimpl(trylast=True)
def meshd_admit_peer(agent: AgentAPI, member: Member) -> Admission:
    record = member.record
    if record is None:
        return Admission(admit=False, reason="no record")
    if not member.certified:
        return Admission(admit=False, reason=member.certificate_error or "no valid certificate")
    ranges = [net for net in (agent.network.cidr4, agent.network.cidr6) if net is not None]
    outside = [a for a in record.addresses if not any(a in net for net in ranges)]
    if outside:
        listed = ", ".join(map(str, outside))
        return Admission(admit=False, reason=f"address {listed} outside the network's ranges")
    if not record.addresses:
        return Admission(admit=False, reason="no mesh address")
    return Admission(admit=True)
