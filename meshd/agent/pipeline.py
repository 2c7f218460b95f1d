"""One pass, in one direction: view -> certified members -> desired state -> apply -> notify.

Nothing in the chain calls back up into the agent. Each member is certified
once per pass (the trust store caches verdicts by name, key and chain
reference); the result, with the desired state, becomes the runtime's
:class:`~meshd.agent.runtime.Snapshot`, which every other room reads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping, Sequence

from meshd.agent.runtime import Runtime, Snapshot
from meshd.desired import DesiredState, compute
from meshd.errors import IdentityError, MeshdError
from meshd.node import KnownPeer, gossip_address
from meshd.pki.certificate import CertChain
from meshd.pki.trust import PENDING, Trust
from meshd.plugins import PluginHost
from meshd.types import (
    Admission,
    AgentAPI,
    IPNetwork,
    Member,
    MemberState,
    MeshView,
    NodeRecord,
    PathChoice,
    PeerConfig,
)

log = logging.getLogger(__name__)

# A peer learnt at enrolment or restored from disk, not (yet) seen in gossip,
# is kept this long after gossip has other members.
KNOWN_PEER_GRACE = 120.0
# A live WireGuard session re-handshakes at least every 2 minutes (REKEY_AFTER_TIME,
# driven by the keepalives): a handshake younger than this means the peer is there.
RECENT_HANDSHAKE = 150.0
# The peers a changing pass applied are written this long after it, once for a burst:
# a join runs a pass on every node at once, and writing 40 peers with their chains
# there (~10 ms each) delayed every other node's pass on a shared machine. A restart
# within that second re-joins through the peers saved before.
SAVE_DELAY = 1.0


def certify(
    members: Iterable[Member],
    trust: Trust,
    own_name: str,
    departed: Mapping[str, int],
    held: Mapping[str, str] | None = None,
) -> tuple[Member, ...]:
    """Each member with the trust store's verdict on its record.

    A member that said goodbye through its tunnel (``departed``) is shown as left,
    whatever Serf says yet (a leave can reach a node as "failed" first).

    ``held`` maps a Serf name to the chain reference that last certified it. A record
    naming a chain not fetched yet is judged by that chain meanwhile (same name and
    key, and everything the trust store checks: revocations, expiry, addresses): a
    renewed certificate (a CA rotation) can arrive after the record that names it,
    and the member would otherwise lose its peer until it does (a lab pair silent
    for 5.9 s during a rotation).
    """
    result = []
    for member in members:
        record = member.record
        if record is not None and member.name != own_name:
            verdict = trust.verdict(member.name, record)
            before = (held or {}).get(member.serf_name)
            if verdict.error == PENDING and before is not None and before != record.cert:
                previous = trust.verdict(member.name, dataclasses.replace(record, cert=before))
                if previous.certified and set(record.addresses) <= set(previous.addresses):
                    verdict = previous
            member = dataclasses.replace(
                member,
                certified=verdict.certified,
                certificate_error=verdict.error,
                certified_addresses=verdict.addresses,
                approved_routes=(
                    trust.grants.approved(member.name, record.routes) if verdict.certified else ()
                ),
            )
            if member.state is not MemberState.LEFT and record.public_key in departed:
                member = dataclasses.replace(member, state=MemberState.LEFT)
        result.append(member)
    return tuple(result)


class HookPolicy:
    """The desired-state policy (:class:`meshd.desired.Policy`), answered by the plugins."""

    def __init__(self, plugins: PluginHost, agent: AgentAPI) -> None:
        self._plugins = plugins
        self._agent = agent

    def admit(self, member: Member) -> Admission | None:
        try:
            return self._plugins.admit_peer(self._agent, member)
        except MeshdError as exc:
            # Fail closed for this member only: the rest of the mesh is still computed.
            log.warning("admission of %s failed: %s", member.name, exc)
            return Admission(admit=False, reason=f"admission failed: {exc}")

    def select_path(self, member: Member) -> PathChoice:
        try:
            return self._plugins.select_path(self._agent, member)
        except MeshdError as exc:
            log.warning("path selection for %s failed, going direct: %s", member.name, exc)
            return PathChoice()

    def shape(self, member: Member, peer: PeerConfig) -> PeerConfig:
        return self._plugins.peer_config(self._agent, member, peer)

    def routes(self, members: Sequence[Member]) -> Mapping[str, Sequence[IPNetwork]]:
        return self._plugins.peer_routes(self._agent, members)

    def extra_peers(self) -> Sequence[PeerConfig]:
        return self._plugins.extra_peers(self._agent)


class Pipeline:
    """Runs passes for one agent; the only writer of ``runtime.snapshot``."""

    def __init__(self, runtime: Runtime, own_record: NodeRecord) -> None:
        self._rt = runtime
        self._policy = HookPolicy(runtime.plugins, runtime.face)
        self._fallback_record = own_record
        self._notified: MeshView | None = None
        self._known_checked = -1
        self._saved_chains: frozenset[tuple[str, str]] = frozenset()
        self._save_due: asyncio.TimerHandle | None = None
        self._held: dict[str, str] = {}  # Serf name -> the chain that certified it last

    def observe(self) -> tuple[Member, ...]:
        """The view's members, certified; also forgets departures of members back alive."""
        rt = self._rt
        view = rt.gossip.view.members.values() if rt.has_gossip else ()
        members = certify(view, rt.trust, rt.name, rt.departed, self._held)
        self._held = {
            m.serf_name: m.record.cert if rt.trust.has_chain(m.record.cert) else held
            for m in members
            if m.certified
            and m.record is not None
            and (held := self._held.get(m.serf_name, m.record.cert))
        }
        for member in members:
            record = member.record
            # A goodbye arrives while its sender is still alive: it is back only when it
            # publishes a newer record (a restart), not while the old one lingers.
            if record is not None and record.version > rt.departed.get(record.public_key, 1 << 64):
                del rt.departed[record.public_key]
        return members

    def _drop_refused_known(self) -> None:
        """Forget a peer learnt at enrolment or restored from disk whose chain the trust
        store refuses now (a revocation, a retired CA key) at once, not after the grace
        period. Checked again only when the trust store changed."""
        rt = self._rt
        if self._known_checked == rt.trust.generation:
            return
        self._known_checked = rt.trust.generation
        refused = []
        for peer in rt.known:
            if peer.chain is None:
                continue
            try:
                CertChain.decode(peer.chain).verify(
                    rt.trust.roots, int(time.time()), revoked=rt.trust.revoked
                )
            except IdentityError as exc:
                log.info("%s: no longer a peer: %s", peer.name, exc)
                refused.append(peer.public_key)
        rt.known.forget(refused)

    def desire(self, members: tuple[Member, ...]) -> DesiredState:
        rt = self._rt
        self._drop_refused_known()
        own = rt.published or self._fallback_record
        desired = compute(
            own_name=rt.name,
            own_record=own,
            members=members,
            policy=self._policy,
            keepalive=rt.config.wireguard.keepalive or None,
            own_certified=rt.own_chain.node.addresses,
            known=rt.known.entries(time.monotonic()),
            known_grace=KNOWN_PEER_GRACE,
            recent=rt.recent_handshakes(RECENT_HANDSHAKE),
            departed=frozenset(rt.departed),
        )
        for key in desired.forget:
            peer = rt.known.get(key)
            if peer is not None:
                log.debug("%s: gossip speaks for it now, or it stayed unseen", peer.name)
        rt.known.forget(desired.forget)
        return desired

    async def run(self, members: tuple[Member, ...]) -> Snapshot:
        """Compute, apply the difference, and tell the plugins when something changed:
        the interface, or the members (a peer added at enrolment changes nothing on the
        interface once gossip describes it, but it is a member now)."""
        rt = self._rt
        started = time.monotonic()
        if rt.writes.waiting:  # the disk was full: try again
            rt.writes.flush()
        # The plugins' hooks called while computing (a path choice) read the members of
        # this pass, not the last one's: the NAT plugin judged a peer by its record before
        # it turned symmetric and chose no relay until the next pass, 8 s later in a lab.
        rt.snapshot = Snapshot(members, rt.snapshot.desired)
        desired = self.desire(members)
        snapshot = Snapshot(members, desired)
        rt.snapshot = snapshot
        result = await rt.iface.reconcile(desired.peers)
        stats = rt.engine_stats
        log.debug(
            "pass: %d member(s), %d peer(s), %d op(s), %.1f ms",
            len(members),
            len(desired.peers),
            result.operations,
            (time.monotonic() - started) * 1000,
        )
        rt.engine_stats = dataclasses.replace(
            stats,
            passes=stats.passes + 1,
            changing_passes=stats.changing_passes + bool(result.operations),
            operations=stats.operations + result.operations,
            pass_seconds=stats.pass_seconds + (time.monotonic() - started),
            last_pass=time.time(),
        )
        chains = self._peer_chains(snapshot)
        if (result.operations or chains != self._saved_chains) and self._save_due is None:
            # Also when only a certificate changed (a CA rotation renews every member
            # without touching WireGuard): a restart must not restore a stale chain.
            self._save_due = asyncio.get_running_loop().call_later(SAVE_DELAY, self.flush)
        self._saved_chains = chains
        view = MeshView(node=rt.identity, members=members, peers=desired.peers)
        if result.operations or view != self._notified:
            self._notified = view
            rt.plugins.mesh_changed(rt.face, view)
        return snapshot

    @staticmethod
    def _peer_chains(snapshot: Snapshot) -> frozenset[tuple[str, str]]:
        """(key, certificate reference) of each peer gossip describes."""
        by_key = snapshot.by_key()
        return frozenset(
            (key, member.record.cert)
            for key in (p.public_key for p in snapshot.desired.peers)
            if (member := by_key.get(key)) is not None and member.record is not None
        )

    def flush(self) -> None:
        """Write the peers of the latest pass now if a changing pass left them unwritten
        (at SAVE_DELAY after it, and at shutdown)."""
        if self._save_due is None:
            return
        self._save_due.cancel()
        self._save_due = None
        self._save_peers(self._rt.snapshot)

    def _save_peers(self, snapshot: Snapshot) -> None:
        """The peers just applied, with what a restart needs to re-join and re-admit them."""
        rt = self._rt
        by_key = snapshot.by_key()
        saved = []
        for peer in snapshot.desired.peers:
            member = by_key.get(peer.public_key)
            if member is not None and member.record is not None:
                chain = rt.trust.chain(member.record.cert)
                saved.append(
                    KnownPeer(
                        member.name,
                        peer.public_key,
                        peer.allowed_ips,
                        peer.endpoint,
                        str(gossip_address(member.record.addresses)),
                        chain.encode() if chain else None,
                    )
                )
            elif (known := rt.known.get(peer.public_key)) is not None:
                saved.append(known)
        rt.store.save_peers(saved, writes=rt.writes)
