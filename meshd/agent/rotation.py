"""CA rotation: a new CA cross-signed by the old one, members renewed by gossip, the old retired.

``meshd ca rotate`` (on the machine holding the CA key) makes a new CA key, has
the old one cross-sign it (a root certificate), and trusts both. From then on
this agent renews, every :data:`RENEW_INTERVAL`, the certificate of each alive
certified member still issued by the old CA: same name, key, addresses and end
of validity, signed by the new CA, announced as a ``meshd-chain`` event with the
cross-signature at its end (so members that trust only the old key accept it,
and learn the new key from it). A member that hears its own renewed chain (same
name and key, cross-signed by the CA that issued its current one) installs it
and re-publishes its record; the announcement is repeated every
:data:`RENEW_REPEAT` until the member's record shows it, and a member that was
away is renewed when it comes back. Nothing changes on any WireGuard interface.

``meshd ca retire`` signs, with the new CA, a revocation of the old CA key: it
travels and persists like any revocation (anti-entropy included) and every
member that holds it stops trusting the old key (:mod:`meshd.pki.trust`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from meshd.agent.runtime import Runtime
from meshd.control import Handler
from meshd.errors import IdentityError, MeshdError
from meshd.identity import encode_key
from meshd.pki.ca import NetworkCA
from meshd.pki.certificate import CertChain, Role, Roots, network_id_of

log = logging.getLogger(__name__)

RENEW_INTERVAL = 1.0
RENEW_REPEAT = 5.0


def is_renewal(
    own: CertChain, offered: CertChain, identity: tuple[str, str], roots: Roots, now: int
) -> bool:
    """Whether ``offered`` is this node's certificate renewed by a CA rotation: the same
    name and WireGuard key (``identity``), cross-signed by the CA key that issued ``own``,
    and valid under ``roots`` at ``now``."""
    if offered.ref == own.ref or offered.cross is None:
        return False
    if (offered.node.name, offered.node.public_key) != identity:
        return False
    top = own.issuers[0] if own.issuers and own.issuers[0].role is Role.ENROL else own.node
    if top.issuer_key_id != offered.cross.issuer_key_id:
        return False
    try:
        offered.verify(roots, now)
    except IdentityError:
        return False
    return True


class CaRotation:
    """The CA side (rotate, renew, retire) and the member side (install a renewal)."""

    def __init__(
        self,
        runtime: Runtime,
        announce: Callable[[bytes], Awaitable[None]],
        republish: Callable[[], Awaitable[None]],
        revoke: Callable[[bytes], Awaitable[None]],
    ) -> None:
        self._rt = runtime
        self._announce = announce
        self._republish = republish
        self._revoke = revoke
        self._issued: dict[str, tuple[CertChain, float]] = {}

    # --- the CA machine --------------------------------------------------------

    def held_ca(self) -> NetworkCA | None:
        """The CA key held here, finishing a rotation a crash interrupted."""
        rt = self._rt
        staged = rt.store.staged_ca_secret()
        if staged is not None:
            successor = NetworkCA.from_secret(rt.state.network.name, staged)
            if successor.public_key in rt.trust.roots.keys:
                rt.store.commit_ca_secret()
            else:
                rt.store.discard_ca_secret("new")
        secret = rt.store.ca_secret()
        return None if secret is None else NetworkCA.from_secret(rt.state.network.name, secret)

    def _ca(self) -> NetworkCA:
        ca = self.held_ca()
        if ca is None:
            raise IdentityError(
                "this machine does not hold the network CA key: run this where 'meshd init' ran"
            )
        return ca

    async def rotate(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Make a new CA key, cross-signed by the current one; renewals start at once."""
        rt = self._rt
        old = self._ca()
        if rt.trust.rotating:
            raise IdentityError(
                "a CA rotation is under way already: finish it with 'meshd ca retire' first"
            )
        new = NetworkCA.generate(rt.state.network.name)
        cross = old.cross_sign(new)
        rt.store.stage_ca_secret(new.secret)
        rt.trust.learn_root(cross)
        rt.store.commit_ca_secret()
        log.warning(
            "CA rotation: new CA key %s cross-signed by %s; renewing members' certificates",
            new.network_id,
            old.network_id,
        )
        await self._renew_once(new)
        return {"old_ca": old.network_id, "new_ca": new.network_id, **self.progress(new)}

    async def retire(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Stop trusting every CA key but the one held here, everywhere."""
        rt = self._rt
        ca = self._ca()
        if not rt.trust.rotating:
            raise IdentityError("no CA rotation to finish: this network trusts one CA key")
        progress = self.progress(ca)
        if progress["pending"] and not request.get("force"):
            raise IdentityError(
                f"not renewed yet: {', '.join(progress['pending'])}; they would be cut off "
                "(wait for them, or retire with --force and re-join them with a new token)"
            )
        retired = []
        for key in [k for k in rt.trust.roots.keys if k != ca.public_key]:
            revocation = ca.revoke_key(rt.state.network.name, encode_key(key))
            rt.trust.add(revocation)
            await self._revoke(revocation.encode())
            retired.append(network_id_of(key))
        rt.store.discard_ca_secret("old")
        self._issued.clear()
        log.warning("CA key(s) %s retired; the CA is %s", ", ".join(retired), ca.network_id)
        return {"retired": retired, "ca": ca.network_id, "cut_off": progress["pending"]}

    async def status(self, request: Mapping[str, Any]) -> dict[str, Any]:
        rt = self._rt
        ca = self.held_ca()
        answer: dict[str, Any] = {
            "ca_keys": list(rt.trust.roots.ids),
            "rotating": rt.trust.rotating,
        }
        if ca is not None:
            answer.update(ca=ca.network_id, **self.progress(ca))
        return answer

    def progress(self, ca: NetworkCA) -> dict[str, list[str]]:
        """Which alive certified members (this node included) hold a certificate of ``ca``."""
        rt = self._rt
        renewed: list[str] = []
        pending: list[str] = []
        own = rt.own_chain.verify(rt.trust.roots, int(time.time()))
        (renewed if own == ca.public_key else pending).append(rt.name)
        for member in rt.snapshot.alive_certified(rt.name):
            assert member.record is not None
            verdict = rt.trust.verdict(member.name, member.record)
            (renewed if verdict.issuer == ca.public_key else pending).append(member.name)
        return {"renewed": sorted(renewed), "pending": sorted(pending)}

    async def renew_loop(self) -> None:
        """On the CA machine, while a rotation is under way: renew who needs it."""
        while True:
            await asyncio.sleep(RENEW_INTERVAL)
            if not self._rt.trust.rotating:
                continue
            try:
                ca = self.held_ca()
                if ca is not None and self._rt.trust.cross_for(ca.public_key) is not None:
                    await self._renew_once(ca)
            except MeshdError as exc:
                log.warning("certificate renewal failed, trying again: %s", exc)

    async def _renew_once(self, ca: NetworkCA) -> None:
        rt = self._rt
        cross = rt.trust.cross_for(ca.public_key)
        if cross is None:
            return
        if rt.own_chain.verify(rt.trust.roots, int(time.time())) != ca.public_key:
            await self.install(CertChain(ca.renew(rt.own_chain.node), (cross,)))
        now = time.monotonic()
        for member in rt.snapshot.alive_certified(rt.name):
            record = member.record
            assert record is not None
            verdict = rt.trust.verdict(member.name, record)
            old = rt.trust.chain(record.cert)
            if verdict.issuer == ca.public_key or old is None:
                self._issued.pop(member.name, None)
                continue
            issued = self._issued.get(member.name)
            if issued is not None and issued[0].node.public_key == record.public_key:
                if now - issued[1] < RENEW_REPEAT:
                    continue
                chain = issued[0]
            else:
                chain = CertChain(ca.renew(old.node), (cross,))
                log.info(
                    "renewed the certificate of %s (%s -> %s)", member.name, old.ref, chain.ref
                )
            encoded = chain.encode()
            rt.trust.add_chain(encoded, chain.ref)
            self._issued[member.name] = (chain, now)
            await self._announce(encoded)

    # --- every member ---------------------------------------------------------

    def offer(self, chain: CertChain) -> None:
        """A chain heard in gossip: install it when it is this node's renewal."""
        rt = self._rt
        identity = (rt.name, rt.state.keys.public_key)
        if is_renewal(rt.own_chain, chain, identity, rt.trust.roots, int(time.time())):
            rt.tasks.start(self.install(chain), name="install-renewal")

    async def install(self, chain: CertChain) -> None:
        """Make ``chain`` this node's certificate, keep it, and tell the mesh."""
        rt = self._rt
        old = rt.own_chain.ref
        rt.state = dataclasses.replace(rt.state, chain=chain.encode())
        rt.store.save_node(rt.state)
        log.warning("installed this node's renewed certificate %s (was %s)", chain.ref, old)
        await self._announce(rt.state.chain)
        try:
            await self._republish()
        except MeshdError as exc:
            log.warning("cannot republish the record after a renewal: %s", exc)
        rt.kick()


def handlers(rotation: CaRotation) -> Mapping[str, Handler]:
    """The control commands of a CA rotation."""
    return {
        "ca-rotate": rotation.rotate,
        "ca-retire": rotation.retire,
        "ca-status": rotation.status,
    }
