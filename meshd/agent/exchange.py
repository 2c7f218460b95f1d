"""Trust exchange: certificate chains and revocations travelling between members.

Message budget (N members; a Serf user event or query reaches every member, a
query's answers travel point to point):

- A join costs two chain broadcasts, O(N) messages in all: the seed announces
  the joiner's chain when it enrols it, and the joiner announces its own once
  gossip has joined. Chains are self-certifying, so it does not matter who sends.
- A member whose chain is still unknown is fetched by a Serf query only when
  both broadcasts were missed: after a random 2-4 s wait (the broadcasts arrive
  within about a second), one fetch at a time per node, at most one per second,
  with a per-chain back-off (5 s doubling to 60 s). Never a query per member per
  node on every pass, which at 30 nodes queued 760 queries in Serf.
- A revocation, a route grant or a client record is one broadcast. Anti-entropy
  (a node that was away learns what it missed): every record carries a digest of
  its revocations, grants and client records, and a node asks
  (one query, paged) only members whose digest differs from its own. A mesh that
  agrees sends no revocation query at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from meshd.agent.runtime import Runtime
from meshd.errors import IdentityError, MeshdError
from meshd.gossip.messages import QueryEvent, SerfEvent, UserEvent
from meshd.pki.certificate import CertChain
from meshd.pki.trust import REVOCATIONS_PER_PAGE
from meshd.quietlog import Throttle
from meshd.types import Member, MemberState

log = logging.getLogger(__name__)
T = TypeVar("T")

CHAIN_EVENT = "meshd-chain"
CHAIN_QUERY = "meshd-chain"
REVOKE_EVENT = "meshd-revoke"
GRANT_EVENT = "meshd-grant"
CLIENT_EVENT = "meshd-client"
REVOCATIONS_QUERY = "meshd-revocations"
# 0: Serf's own default, which grows with the mesh (gossip interval x 16 x log10(N+1),
# ~5 s at 40 members). A fixed 1 s closed queries before members 3-4 gossip hops away
# had answered ("reply for non-running query" on 15 of 40 nodes).
QUERY_TIMEOUT = 0.0
FETCH_WAIT = (2.0, 4.0)
FETCH_SPACING = 1.0
FETCH_BACKOFF = (5.0, 60.0)
CHAIN_HELPERS = 2
REVOCATION_SYNC_FIRST = 3.0
REVOCATION_SYNC_INTERVAL = 30.0
REVOCATION_SYNC_PEERS = 2
# A member's record showing a revocation digest not seen before makes the sync run this
# soon (the broadcast usually arrives first, and then the digests agree): a broadcast lost
# under load otherwise waited for the 30-s round (a lab test's 10-s deadline missed).
REVOCATION_SYNC_SOON = 2.0


class TrustExchange:
    """Chains and revocations in and out of gossip, for one agent."""

    def __init__(self, runtime: Runtime, republish: Callable[[], Awaitable[None]]) -> None:
        self._rt = runtime
        self._republish = republish
        self._due: dict[str, float] = {}
        self._backoff: dict[str, float] = {}
        self._fetching: asyncio.Task[None] | None = None
        self._last_fetch = 0.0
        self._quiet = Throttle(log)
        self.fetches = 0
        self._digest_news = asyncio.Event()
        self._differ_seen: set[tuple[str, str]] = set()  # (Serf name, digest) noticed
        """Chain queries sent since start (for tests and diagnostics)."""
        self.on_chain: Callable[[CertChain], None] = lambda chain: None
        """Told of every chain announced in gossip (a CA rotation installs its renewal)."""

    # --- incoming -------------------------------------------------------------

    def on_event(self, event: SerfEvent) -> bool:
        """Take a user event or query of ours; False when it is none of ours."""
        if isinstance(event, UserEvent) and event.name == CHAIN_EVENT:
            self._take_chain(event.payload)
        elif isinstance(event, UserEvent) and event.name == REVOKE_EVENT:
            self.take_revocation(event.payload, "gossip")
        elif isinstance(event, UserEvent) and event.name == GRANT_EVENT:
            self.take_grant(event.payload, "gossip")
        elif isinstance(event, UserEvent) and event.name == CLIENT_EVENT:
            self.take_client(event.payload, "gossip")
        elif isinstance(event, QueryEvent) and event.name in (CHAIN_QUERY, REVOCATIONS_QUERY):
            self._rt.tasks.start(self._answer(event), name=f"answer-{event.name}")
        else:
            return False
        return True

    def _take_chain(self, data: bytes) -> None:
        try:
            chain = CertChain.decode(data)
            if not self._rt.trust.has_chain(chain.ref):
                self._rt.trust.add_chain(data, chain.ref)
                if self._awaited(chain.ref):
                    self._rt.kick()
            self.on_chain(chain)
        except IdentityError as exc:
            log.debug("ignored a certificate chain event: %s", exc)

    def _awaited(self, ref: str) -> bool:
        """Whether a member in the view publishes this chain: only then can a pass use
        it now. The seed announces a joiner's chain before the joiner is a member, and
        a pass on every node for it cost a second pass per join (the member's arrival
        runs one anyway, and finds the chain)."""
        rt = self._rt
        if not rt.has_gossip:
            return True
        return any(
            m.record is not None and m.record.cert == ref for m in rt.gossip.view.members.values()
        )

    def take_revocation(self, data: bytes, source: str) -> None:
        try:
            revocation = self._rt.trust.add_revocation(data)
        except MeshdError as exc:
            self._quiet.warning(source, "ignored a revocation from %s: %s", source, exc)
            return
        if revocation is not None:
            log.warning(
                "revocation of %s (key %s) received by %s",
                revocation.name,
                revocation.public_key or "-",
                source,
            )
            self._trust_changed()

    def take_grant(self, data: bytes, source: str) -> None:
        grant = self._take(self._rt.trust.add_grant, data, "a route grant", source)
        if grant is not None:
            log.info("route %s approved for %s (from %s)", grant.prefix, grant.name, source)

    def take_client(self, data: bytes, source: str) -> None:
        client = self._take(self._rt.trust.add_client, data, "a client record", source)
        if client is not None:
            log.info("client %s (%s) is served by %s", client.name, client.address, client.gateway)

    def _take(
        self, add: Callable[[bytes], T | None], data: bytes, what: str, source: str
    ) -> T | None:
        """A CA-signed statement from gossip, kept when valid and new."""
        try:
            found = add(data)
        except MeshdError as exc:
            self._quiet.warning(source, "ignored %s from %s: %s", what, source, exc)
            return None
        if found is not None:
            self._trust_changed()
        return found

    def _trust_changed(self) -> None:
        self._rt.kick()
        # The record carries the revocation digest: others see it changed.
        self._rt.tasks.start(self._republish_quietly(), name="republish-digest")

    async def _republish_quietly(self) -> None:
        try:
            await self._republish()
        except MeshdError as exc:
            log.debug("cannot republish the record: %s", exc)

    async def _answer(self, event: QueryEvent) -> None:
        rt = self._rt
        if event.name == CHAIN_QUERY:
            # Our own chain, or one we hold for someone else: chains are self-certifying,
            # and the asker may have no tunnel to their owner yet.
            ref = event.payload.decode("ascii", "replace")
            chain = rt.trust.chain(ref)
            if ref == rt.own_chain.ref:
                payload = rt.state.chain
            elif chain is not None:
                payload = chain.encode()
            else:
                return
        else:
            try:
                payload = rt.trust.page(int(event.payload or b"0"))
            except ValueError:
                return
        try:
            await rt.gossip.client.respond(event.id, payload)
        except MeshdError as exc:
            log.debug("cannot answer %s query: %s", event.name, exc)

    # --- outgoing -------------------------------------------------------------

    async def announce(self, chain: bytes) -> None:
        """Gossip a certificate chain, so members can admit its node before any tunnel to it
        exists (a query's answer travels directly, and needs one)."""
        try:
            await self._rt.gossip.client.user_event(CHAIN_EVENT, chain, coalesce=False)
        except MeshdError as exc:
            log.debug("cannot announce a certificate chain: %s", exc)

    async def announce_own(self) -> None:
        await self.announce(self._rt.state.chain)

    async def revoke(self, data: bytes) -> None:
        await self._rt.gossip.client.user_event(REVOKE_EVENT, data, coalesce=False)
        self._trust_changed()

    async def grant(self, data: bytes) -> None:
        await self._rt.gossip.client.user_event(GRANT_EVENT, data, coalesce=False)
        self._trust_changed()

    async def announce_client(self, data: bytes) -> None:
        await self._rt.gossip.client.user_event(CLIENT_EVENT, data, coalesce=False)
        self._trust_changed()

    def notice_digests(self, members: Sequence[Member]) -> None:
        """Wake the revocation sync when an alive certified member publishes a digest
        that differs from ours and was not seen at the last sync. Only a new digest
        wakes it: a member that stays different costs a query per round, as before."""
        differ = self._differing(members)
        if differ - self._differ_seen:
            self._differ_seen |= differ
            self._digest_news.set()

    def _differing(self, members: Sequence[Member]) -> set[tuple[str, str]]:
        ours = self._rt.trust.digest()
        return {
            (m.serf_name, m.record.revocations)
            for m in members
            if m.record is not None
            and m.certified
            and m.state is MemberState.ALIVE
            and m.name != self._rt.name
            and m.record.revocations != ours
        }

    def fetch_missing(self, members: Sequence[Member]) -> None:
        """Fetch one missing chain if one is due (see the module docstring for the budget)."""
        rt = self._rt
        now = time.monotonic()
        missing = {
            m.record.cert: m
            for m in members
            if m.record is not None
            and m.record.cert
            and m.name != rt.name
            and m.state is MemberState.ALIVE
            and not rt.trust.has_chain(m.record.cert)
        }
        for ref in [r for r in self._due if r not in missing]:
            del self._due[ref]
            self._backoff.pop(ref, None)
        for ref in missing:
            self._due.setdefault(ref, now + random.uniform(*FETCH_WAIT))
        if not self._due:
            return
        ref, due = min(self._due.items(), key=lambda item: item[1])
        start = max(due, self._last_fetch + FETCH_SPACING)
        busy = self._fetching is not None and not self._fetching.done()
        if busy or start > now:
            # Come back when it is due: passes may be 5 s apart.
            asyncio.get_running_loop().call_later(max(start - now, 0.1), rt.kick)
            return
        self._last_fetch = now
        self._fetching = rt.tasks.start(self._fetch(missing[ref], members), name="fetch-chain")

    async def _fetch(self, member: Member, members: Sequence[Member]) -> None:
        """Ask the member, and a few certified peers that may hold a copy, for its chain."""
        rt = self._rt
        assert member.record is not None
        ref = member.record.cert
        helpers = [
            m.serf_name
            for m in members
            if m.certified and m.state is MemberState.ALIVE and m.name not in (member.name, rt.name)
        ]
        asked = [member.serf_name, *random.sample(helpers, min(CHAIN_HELPERS, len(helpers)))]
        self.fetches += 1
        try:
            result = await rt.gossip.client.query(
                CHAIN_QUERY, ref.encode(), filter_nodes=asked, query_timeout=QUERY_TIMEOUT
            )
            errors = []
            for responder, data in result.responses.items():
                try:
                    rt.trust.add_chain(data, ref)
                    break
                except IdentityError as exc:
                    errors.append(f"{responder}: {exc}")
            else:
                raise IdentityError("; ".join(errors) or f"none of {', '.join(asked)} answered")
            log.info("certificate chain of %s fetched (%s)", member.name, ref)
            self._due.pop(ref, None)
            self._backoff.pop(ref, None)
            rt.kick()
        except MeshdError as exc:
            wait = min(self._backoff.get(ref, FETCH_BACKOFF[0] / 2) * 2, FETCH_BACKOFF[1])
            self._backoff[ref] = wait
            self._due[ref] = time.monotonic() + wait
            log.info(
                "cannot fetch the certificate of %s (next try in %.0f s): %s",
                member.name,
                wait,
                exc,
            )

    async def revocation_loop(self) -> None:
        """Anti-entropy for revocations, with members whose digest differs from ours."""
        await asyncio.sleep(REVOCATION_SYNC_FIRST)
        while True:
            # Before the sync: news that comes while it runs wakes the next one.
            self._digest_news.clear()
            self._differ_seen = self._differing(self._rt.snapshot.members)
            try:
                await self._sync_revocations()
            except MeshdError as exc:
                log.debug("revocation sync failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REVOCATION_SYNC_INTERVAL):
                    await self._digest_news.wait()
                    await asyncio.sleep(REVOCATION_SYNC_SOON)

    async def _sync_revocations(self) -> None:
        rt = self._rt
        ours = rt.trust.digest()
        differ = [
            m.serf_name
            for m in rt.snapshot.alive_certified(rt.name)
            if m.record is not None and m.record.revocations != ours
        ]
        for name in random.sample(differ, min(REVOCATION_SYNC_PEERS, len(differ))):
            page, total = 0, 1
            while page * REVOCATIONS_PER_PAGE < total:
                result = await rt.gossip.client.query(
                    REVOCATIONS_QUERY,
                    str(page).encode(),
                    filter_nodes=[name],
                    query_timeout=QUERY_TIMEOUT,
                )
                data = result.responses.get(name)
                if data is None:
                    break
                added, total = rt.trust.merge_page(data)
                if added:
                    log.warning("learnt %d revocation(s) from %s", added, name)
                    self._trust_changed()
                page += 1
