"""The membership view: every gossip member with its decoded node record and state.

A :class:`MembershipView` reads one :class:`~meshd.gossip.rpc.SerfRPC` client.
Serf coalesces member events for about a second before a stream sees them, so
the view does not wait for them: it polls ``members`` every ``poll_interval``
(0.25 s; one cheap loopback call) and polls at once whenever an event arrives
(member-*, user events, and the ``StreamGap`` the client puts in after a
reconnect or an overflow). The content of member events is not applied: a
late, coalesced event could carry an older state than the last poll did.

Faster still, the view follows the agent's log over RPC (``monitor``): the agent
logs ``serf: EventMemberUpdate: NAME`` (and Join/Leave/Failed/Reap) the moment
it applies a change, a second before the coalesced event; such a line makes
the view poll at once. So a change costs one gossip hop plus one loopback call,
and the periodic poll remains the safety net.

States (:class:`meshd.types.MemberState`): alive, leaving, left, failed as the
agent reports them (failed may come back; left will not), and reaped: a left or
failed member that vanished from ``members``. An alive member that vanishes
(the local agent restarted and has not re-joined yet) is kept as it was for
``missing_grace`` seconds before it counts as reaped, so a restart of the local
agent does not tear down every peer.

A member's tags are decoded with :func:`meshd.gossip.record.decode_record`; an
undecodable record gives ``Member.record = None`` and ``record_error`` with the
reason: the loop never stops on bad gossip.

Members are keyed by their Serf name (``name.<key suffix>``, see
:mod:`meshd.gossip.names`), unique in Serf; ``Member.name`` is the name people
see. A machine wiped and joined again under its old name is a new Serf member,
so its old incarnation (failed or left) and the new one are both in the view
under one ``Member.name``: which of them counts is the engine's decision
(:func:`meshd.desired.compute` takes the alive one, else the newer record).

The change feed (for the agent)::

    view = MembershipView(client)
    task = asyncio.create_task(view.run())
    async for update in view.subscribe():      # ViewUpdate
        update.members      # Mapping[serf name, Member]: the whole current view (reaped excluded)
        update.changes      # tuple[MemberChange]: serf_name, before (None if new), after
        ...                 # (after.state is REAPED when a member went away)

A subscriber that is slower than the view does not queue snapshots: pending
updates coalesce into one (latest members; per member the first ``before`` and
the last ``after``), which is what a level-triggered reconcile wants.
``view.members`` is always the latest snapshot; ``await view.wait_for(pred, seconds)``
waits until ``pred(view.members)`` holds.

Non-member events (user events, queries) are handed to ``on_event`` if given.

Snapshot nudge: Serf's snapshotter flushes its file only when it appends a line
more than 0.5 s after its last flush, so members learned in one burst stay in
its buffer until the next event; a ``kill -9`` then loses them and the restarted
agent re-joins nobody. With ``flush_snapshot`` (the default) the view sends a
tiny query addressed to its own node 0.6 s after membership changed: the query
clock line it appends makes Serf flush everything before it.
:func:`publish_record` sets this node's record in its tags (and deletes stale keys).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

from meshd.errors import GossipError, RecordError
from meshd.gossip.messages import MemberEvent, QueryEvent, SerfEvent, SerfMember, SerfRPC, StreamGap
from meshd.gossip.names import display_name
from meshd.gossip.record import RECORD_KEYS, decode_record, encode_record
from meshd.types import Member, MemberState, NodeRecord

log = logging.getLogger(__name__)

_STATES = {
    "alive": MemberState.ALIVE,
    "leaving": MemberState.LEAVING,
    "left": MemberState.LEFT,
    "failed": MemberState.FAILED,
}

EventHandler = Callable[[SerfEvent], None]

_MEMBER_LOG_MARK = "serf: EventMember"  # serf logs it when it applies a member change
SNAPSHOT_NUDGE_QUERY = "_meshd-snapshot"
SNAPSHOT_NUDGE_DELAY = 0.6  # Serf flushes a line appended > 0.5 s after its last flush


@dataclass(frozen=True)
class MemberChange:
    """One member before and after a change; ``before`` is None for a new member."""

    serf_name: str
    before: Member | None
    after: Member


@dataclass(frozen=True)
class ViewUpdate:
    """The whole view after a change, and what changed since the subscriber's last update."""

    members: Mapping[str, Member]
    changes: tuple[MemberChange, ...]
    generation: int


async def publish_record(
    client: SerfRPC, record: NodeRecord, *, extra_tags: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Encode ``record`` into this node's tags; RecordError if it does not fit.

    The call returns once the agent has the new tags (Serf waits up to 5 s for
    their gossip to go out); other views see it at their next ``members`` poll.
    """
    tags = encode_record(record, extra_tags=extra_tags)
    await client.set_tags(tags, delete=sorted(RECORD_KEYS - tags.keys()))
    return tags


def is_heartbeat(change: MemberChange) -> bool:
    """Whether ``change`` is a member publishing its unchanged record again (a newer
    version, nothing else changed): every node sends one a minute or more seldom
    (:func:`meshd.agent.presence.republish_interval`) and no pass needs to run for it."""
    before, after = change.before, change.after
    if before is None or before.record is None or after.record is None:
        return False
    return (
        after.record.version > before.record.version
        and replace(before.record, version=after.record.version) == after.record
        and replace(before, record=after.record) == after
    )


def tells_of_member_change(log_line: str) -> bool:
    """Whether a line of the agent's log tells of a member change (the view then polls)."""
    return _MEMBER_LOG_MARK in log_line


def member_state(status: str) -> MemberState:
    """The MemberState for a Serf status; an unknown status counts as failed."""
    return _STATES.get(status, MemberState.FAILED)


class ViewSubscription:
    """An async iterator of coalesced :class:`ViewUpdate` values; see the module docstring."""

    def __init__(self, view: MembershipView) -> None:
        self._view = view
        self._pending: dict[str, MemberChange] = {}
        self._ready = asyncio.Event()
        self._members: Mapping[str, Member] = view.members
        self._generation = view.generation

    def _push(self, update: ViewUpdate) -> None:
        for change in update.changes:
            earlier = self._pending.get(change.serf_name)
            before = earlier.before if earlier is not None else change.before
            self._pending[change.serf_name] = MemberChange(change.serf_name, before, change.after)
        self._members = update.members
        self._generation = update.generation
        self._ready.set()

    def __aiter__(self) -> ViewSubscription:
        return self

    async def __anext__(self) -> ViewUpdate:
        await self._ready.wait()
        self._ready.clear()
        changes, self._pending = tuple(self._pending.values()), {}
        return ViewUpdate(self._members, changes, self._generation)

    def close(self) -> None:
        self._view._subscribers.discard(self)


class MembershipView:
    """Members with decoded records, kept current from one Serf RPC client."""

    def __init__(
        self,
        client: SerfRPC,
        *,
        poll_interval: float = 0.25,
        missing_grace: float = 30.0,
        on_event: EventHandler | None = None,
        flush_snapshot: bool = True,
        follow_log: bool = True,
    ) -> None:
        self._client = client
        self._poll_interval = poll_interval
        self._missing_grace = missing_grace
        self._on_event = on_event
        self._members: dict[str, Member] = {}
        self._snapshot: Mapping[str, Member] = MappingProxyType({})
        self._missing_since: dict[str, float] = {}
        self._decoded: dict[str, tuple[tuple[tuple[str, str], ...], Member]] = {}
        self._subscribers: set[ViewSubscription] = set()
        self._changed = asyncio.Event()
        self._kick = asyncio.Event()
        self._poll_failing = False
        self._flush_snapshot = flush_snapshot
        self._follow_log = follow_log
        self._membership_changed = asyncio.Event()
        self._self_name: str | None = None
        self.generation = 0

    @property
    def members(self) -> Mapping[str, Member]:
        """The latest snapshot (read-only) by Serf name, reaped members excluded."""
        return self._snapshot

    def subscribe(self, *, initial: bool = True) -> ViewSubscription:
        """A change feed; with ``initial`` the first update lists every current member as new."""
        subscription = ViewSubscription(self)
        self._subscribers.add(subscription)
        if initial and self._members:
            changes = tuple(MemberChange(n, None, m) for n, m in self._members.items())
            subscription._push(ViewUpdate(self._snapshot, changes, self.generation))
        return subscription

    def _member(self, serf: SerfMember) -> Member:
        # Decoding is cached per member and tag set: a poll of an unchanged mesh costs no decode.
        key = tuple(sorted(serf.tags.items()))
        cached = self._decoded.get(serf.name)
        if cached is not None and cached[0] == key:
            base = cached[1]
        else:
            base = Member(
                display_name(serf.name), serf.gossip_addr, MemberState.ALIVE, serf_name=serf.name
            )
            try:
                base = replace(base, record=decode_record(serf.tags))
            except RecordError as exc:
                base = replace(base, record_error=str(exc))
            self._decoded[serf.name] = (key, base)
        state = member_state(serf.status)
        current = self._members.get(serf.name)
        if (
            current is not None
            and current.gossip_addr == serf.gossip_addr
            and current.state is state
            and current.record is base.record
            and current.record_error == base.record_error
            and current.serf_name == base.serf_name
        ):
            return current  # the usual poll: nothing changed, nothing to rebuild or compare
        return replace(base, gossip_addr=serf.gossip_addr, state=state)

    def apply(self, listed: list[SerfMember], now: float | None = None) -> ViewUpdate | None:
        """Fold one ``members`` answer into the view; the update, or None if nothing changed."""
        now = time.monotonic() if now is None else now
        seen: dict[str, Member] = {m.name: self._member(m) for m in listed}
        changes: list[MemberChange] = []
        for name, member in seen.items():
            self._missing_since.pop(name, None)
            before = self._members.get(name)
            if before != member:
                changes.append(MemberChange(name, before, member))
                self._members[name] = member
        for name in [n for n in self._members if n not in seen]:
            before = self._members[name]
            gone = before.state in (MemberState.LEFT, MemberState.FAILED)
            first_missed = self._missing_since.setdefault(name, now)
            if gone or now - first_missed >= self._missing_grace:
                changes.append(
                    MemberChange(name, before, replace(before, state=MemberState.REAPED))
                )
                del self._members[name]
                self._missing_since.pop(name, None)
                self._decoded.pop(name, None)
        if not changes:
            return None
        if any(c.before is None or c.before.state != c.after.state for c in changes):
            self._membership_changed.set()
        self.generation += 1
        self._snapshot = MappingProxyType(dict(self._members))
        update = ViewUpdate(self._snapshot, tuple(changes), self.generation)
        for change in changes:
            log.debug(
                "member %s: %s -> %s",
                change.serf_name,
                change.before.state.value if change.before else "new",
                change.after.state.value,
            )
        for subscriber in list(self._subscribers):
            subscriber._push(update)
        self._changed.set()
        return update

    async def refresh(self) -> ViewUpdate | None:
        """Read ``members`` now and fold it in; raises GossipError if the agent is away."""
        return self.apply(await self._client.members())

    def poll_now(self) -> None:
        """Ask the poller to read ``members`` without waiting for the next interval."""
        self._kick.set()

    async def wait_for(
        self, predicate: Callable[[Mapping[str, Member]], bool], seconds: float
    ) -> bool:
        """Wait until ``predicate(view.members)`` is true; False after ``seconds``."""
        deadline = time.monotonic() + seconds
        while not predicate(self._snapshot):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
            except TimeoutError:
                return predicate(self._snapshot)
        return True

    def _on_log_line(self, line: str) -> None:
        if tells_of_member_change(line):
            self.poll_now()

    async def run(self) -> None:
        """Poll and follow the event stream until cancelled. Run it as a task."""
        if self._follow_log:
            try:
                await self._client.monitor(self._on_log_line)
            except GossipError as exc:
                # Not fatal: the polls and events still work, only slower.
                log.warning("cannot follow the Serf agent's log: %s", exc)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._follow_events(), name="view-events")
            group.create_task(self._poll(), name="view-poll")
            if self._flush_snapshot:
                group.create_task(self._nudge_snapshot(), name="view-snapshot-nudge")

    async def _poll(self) -> None:
        while True:
            self._kick.clear()
            try:
                await self.refresh()
                if self._poll_failing:
                    log.info("membership polls work again")
                self._poll_failing = False
            except GossipError as exc:
                # Once at WARNING, then DEBUG while the agent stays away.
                (log.debug if self._poll_failing else log.warning)("members poll failed: %s", exc)
                self._poll_failing = True
            # asyncio.timeout, not wait_for: 3.11's wait_for returns instead of raising when
            # a kick and a cancel come together, and this loop would then never end.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_interval):
                    await self._kick.wait()

    async def _follow_events(self) -> None:
        async for event in self._client.events():
            if isinstance(event, (MemberEvent, StreamGap)):
                self.poll_now()
                continue
            if isinstance(event, QueryEvent):
                # A query says nothing of membership, and every member's periodic
                # queries (revocation sync) would make an idle view poll ~N times a minute.
                if event.name == SNAPSHOT_NUDGE_QUERY:
                    continue
            else:
                self.poll_now()
            if self._on_event is not None:
                try:
                    self._on_event(event)
                except Exception:
                    log.exception("event handler failed on %s", type(event).__name__)

    async def _nudge_snapshot(self) -> None:
        quiet = False
        while True:
            await self._membership_changed.wait()
            # Debounce: one nudge 0.6 s after the last change of a burst.
            while self._membership_changed.is_set():
                self._membership_changed.clear()
                await asyncio.sleep(SNAPSHOT_NUDGE_DELAY)
            try:
                if self._self_name is None:
                    self._self_name = (await self._client.stats())["agent"]["name"]
                await self._client.query(
                    SNAPSHOT_NUDGE_QUERY, filter_nodes=[self._self_name], query_timeout=0.1
                )
                quiet = False
            except (GossipError, KeyError, TypeError) as exc:
                (log.debug if quiet else log.warning)("snapshot nudge failed: %s", exc)
                quiet = True
