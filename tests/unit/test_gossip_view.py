"""The membership view's state logic, fed by a scripted stand-in for the Serf RPC client.

The real client against real agents is exercised in tests/integration/test_gossip*.py;
here only the view's own decisions (states, reaping, coalescing) are under test.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable, Mapping
from ipaddress import ip_address

import pytest

from meshd.b64 import encode_b64
from meshd.errors import SerfConnectionError
from meshd.gossip.messages import MemberEvent, SerfEvent, SerfMember, StreamGap, UserEvent
from meshd.gossip.names import serf_node_name
from meshd.gossip.record import encode_record
from meshd.gossip.view import (
    MembershipView,
    is_heartbeat,
    member_state,
    publish_record,
    tells_of_member_change,
)
from meshd.types import MemberState, NodeRecord


def rec(n: int, version: int = 1) -> NodeRecord:
    return NodeRecord(
        public_key=encode_b64(bytes([n]) * 32),
        addresses=(ip_address(f"100.80.0.{n}"),),
        port=51820,
        version=version,
    )


def sm(n: int, status: str = "alive", version: int = 1, tags: Mapping[str, str] | None = None):
    return SerfMember(
        f"n{n}",
        f"192.0.2.{n}",
        7946,
        tags if tags is not None else encode_record(rec(n, version)),
        status,
    )


class ScriptedSerf:
    """Answers ``members`` with whatever the test put in ``listed``."""

    def __init__(self) -> None:
        self.listed: list[SerfMember] = []
        self.calls = 0
        self.failed_calls = 0
        self.fail = False
        self.called = asyncio.Event()  # set on every call, for until()
        self.queue: asyncio.Queue[SerfEvent] = asyncio.Queue()
        self.tags: dict[str, str] = {}
        self.deleted: list[str] = []
        self.queries: list[tuple[str, object]] = []
        self.log_handler: Callable[[str], None] | None = None
        self.user_events: list[tuple[str, bytes, bool]] = []

    async def members(self) -> list[SerfMember]:
        self.calls += 1
        self.called.set()
        if self.fail:
            self.failed_calls += 1
            raise SerfConnectionError("agent away")
        return list(self.listed)

    async def set_tags(self, tags: Mapping[str, str], delete: object = ()) -> None:
        self.tags.update(tags)
        self.deleted = list(delete)  # type: ignore[call-overload]

    async def user_event(self, name: str, payload: bytes = b"", *, coalesce: bool = True) -> None:
        self.user_events.append((name, payload, coalesce))

    async def monitor(self, on_line: Callable[[str], None], *, level: str = "INFO") -> None:
        self.log_handler = on_line

    async def stats(self) -> dict[str, dict[str, str]]:
        return {"agent": {"name": "n1"}}

    async def query(self, name: str, payload: bytes = b"", **options: object) -> None:
        self.queries.append((name, options.get("filter_nodes")))
        self.called.set()

    async def until(self, check: Callable[[], bool], seconds: float = 5) -> None:
        """Wait until ``check()`` holds, re-testing after each call the view makes."""
        async with asyncio.timeout(seconds):
            while not check():
                self.called.clear()
                await self.called.wait()

    async def events(self) -> AsyncIterator[SerfEvent]:
        while True:
            yield await self.queue.get()


def test_states_and_records_are_decoded() -> None:
    view = MembershipView(ScriptedSerf())  # type: ignore[arg-type]
    bad = sm(3, tags={"m": "1", "k": "nope"})
    update = view.apply([sm(1), sm(2, "failed"), bad, sm(4, tags={"role": "web"})])
    assert update is not None
    assert {c.serf_name for c in update.changes} == {"n1", "n2", "n3", "n4"}
    assert view.members["n1"].record == rec(1)
    assert view.members["n1"].gossip_addr == "192.0.2.1:7946"
    assert view.members["n2"].state is MemberState.FAILED
    assert view.members["n3"].record is None
    assert "public key" in (view.members["n3"].record_error or "")
    assert "no meshd record" in (view.members["n4"].record_error or "")


def test_an_unchanged_poll_is_no_update_and_a_record_change_is_one() -> None:
    view = MembershipView(ScriptedSerf())  # type: ignore[arg-type]
    view.apply([sm(1), sm(2)])
    assert view.apply([sm(1), sm(2)]) is None
    update = view.apply([sm(1), sm(2, version=2)])
    assert update is not None
    (change,) = update.changes
    assert change.before is not None
    assert change.before.record == rec(2, 1)
    assert change.after.record == rec(2, 2)


def test_a_newer_version_of_an_unchanged_record_is_a_heartbeat_and_nothing_else_is() -> None:
    view = MembershipView(ScriptedSerf())  # type: ignore[arg-type]
    view.apply([sm(1), sm(2)])

    def change(*listed: SerfMember) -> bool:
        update = view.apply(list(listed))
        assert update is not None
        (only,) = update.changes
        return is_heartbeat(only)

    assert change(sm(1), sm(2, version=2))
    moved = dataclasses.replace(rec(2, 3), endpoints=("198.18.0.2:51820",))
    assert not change(sm(1), sm(2, tags=encode_record(moved)))
    assert not change(sm(1), sm(2, status="failed", version=3))  # a state change
    assert not change(sm(1), sm(2, version=4))  # back to alive
    assert not change(sm(1), sm(2, version=2))  # an older version: not a heartbeat
    assert not change(sm(1), sm(2, tags={"v": "x"}))  # undecodable
    assert not change(sm(1), sm(2, tags={"v": "x"}), sm(3))  # a new member


def test_left_and_failed_are_different_and_failed_may_come_back() -> None:
    view = MembershipView(ScriptedSerf())  # type: ignore[arg-type]
    view.apply([sm(1), sm(2), sm(3)])
    view.apply([sm(1), sm(2, "left"), sm(3, "failed")])
    assert view.members["n2"].state is MemberState.LEFT
    assert view.members["n3"].state is MemberState.FAILED
    view.apply([sm(1), sm(2, "left"), sm(3)])
    assert view.members["n3"].state is MemberState.ALIVE


def test_a_gone_member_that_left_or_failed_is_reaped() -> None:
    view = MembershipView(ScriptedSerf())  # type: ignore[arg-type]
    view.apply([sm(1), sm(2, "left"), sm(3, "failed")])
    update = view.apply([sm(1)])
    assert update is not None
    assert {c.serf_name: c.after.state for c in update.changes} == {
        "n2": MemberState.REAPED,
        "n3": MemberState.REAPED,
    }
    assert set(view.members) == {"n1"}


def test_an_alive_member_that_vanishes_is_kept_for_the_grace_period() -> None:
    view = MembershipView(ScriptedSerf(), missing_grace=30)  # type: ignore[arg-type]
    view.apply([sm(1), sm(2)], now=100.0)
    assert view.apply([sm(1)], now=101.0) is None
    assert view.members["n2"].state is MemberState.ALIVE
    assert view.apply([sm(1)], now=129.0) is None
    update = view.apply([sm(1)], now=131.0)
    assert update is not None
    assert update.changes[0].after.state is MemberState.REAPED
    assert "n2" not in view.members


def test_unknown_status_counts_as_failed() -> None:
    assert member_state("none") is MemberState.FAILED
    assert member_state("leaving") is MemberState.LEAVING


def test_subscription_coalesces_changes_for_a_slow_reader() -> None:
    async def scenario() -> None:
        view = MembershipView(ScriptedSerf())  # type: ignore[arg-type]
        view.apply([sm(1)])
        feed = view.subscribe()
        first = await feed.__anext__()
        assert [(c.serf_name, c.before) for c in first.changes] == [("n1", None)]
        view.apply([sm(1, version=2)])
        view.apply([sm(1, version=3), sm(2)])
        update = await asyncio.wait_for(feed.__anext__(), 1)
        by_name = {c.serf_name: c for c in update.changes}
        assert by_name["n1"].before is not None
        assert by_name["n1"].before.record == rec(1, 1)
        assert by_name["n1"].after.record == rec(1, 3)
        assert by_name["n2"].before is None
        assert set(update.members) == {"n1", "n2"}
        feed.close()

    asyncio.run(scenario())


def test_run_polls_on_events_and_survives_a_failing_agent() -> None:
    async def scenario() -> None:
        serf = ScriptedSerf()
        seen: list[SerfEvent] = []
        # A long interval: only events can make the view poll quickly.
        view = MembershipView(serf, poll_interval=60, on_event=seen.append)  # type: ignore[arg-type]
        serf.listed = [sm(1)]
        task = asyncio.create_task(view.run())
        assert await view.wait_for(lambda m: "n1" in m, 5)
        serf.listed = [sm(1), sm(2)]
        serf.queue.put_nowait(MemberEvent("member-join", ()))
        assert await view.wait_for(lambda m: "n2" in m, 5)
        serf.fail = True
        serf.queue.put_nowait(StreamGap("reconnected"))
        await serf.until(lambda: serf.failed_calls > 0)
        serf.fail = False
        serf.listed = [sm(1), sm(2, "failed")]
        serf.queue.put_nowait(UserEvent("hello", b"", 1, False))
        assert await view.wait_for(lambda m: m["n2"].state is MemberState.FAILED, 5)
        assert [type(e) for e in seen] == [UserEvent]
        # The agent's log line about a member change makes the view poll at once
        # (which lines do is test_only_member_change_log_lines_make_the_view_poll).
        assert serf.log_handler is not None
        serf.listed = [sm(1), sm(2, "failed"), sm(3)]
        serf.log_handler("2026/01/01 00:00:00 [INFO] serf: EventMemberJoin: n3 192.0.2.3")
        assert await view.wait_for(lambda m: "n3" in m, 5)
        # Membership changed, so Serf's lazily flushed snapshot was nudged (to this node only).
        await serf.until(lambda: bool(serf.queries))
        assert serf.queries[0] == ("_meshd-snapshot", ["n1"])
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())


@pytest.mark.parametrize("steps", range(8))
def test_a_cancel_that_comes_with_a_kick_stops_the_view(steps: int) -> None:
    # 3.11's asyncio.wait_for returned instead of raising when the awaited thing finished in
    # the cancel's loop iteration: the poll loop then ran on and the agent's shutdown hung.
    async def scenario() -> None:
        serf = ScriptedSerf()
        serf.listed = [sm(1)]
        view = MembershipView(serf, poll_interval=60)  # type: ignore[arg-type]
        task = asyncio.create_task(view.run())
        assert await view.wait_for(lambda m: "n1" in m, 5)
        view.poll_now()
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        assert done, f"the view still runs after a cancel {steps} loop steps after a kick"

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("line", "polls"),
    [
        ("2026/01/01 00:00:00 [INFO] serf: EventMemberJoin: n3 192.0.2.3", True),
        ("2026/01/01 00:00:00 [INFO] serf: EventMemberUpdate: n3", True),
        ("2026/01/01 00:00:00 [INFO] serf: EventMemberFailed: n3 192.0.2.3", True),
        ("2026/01/01 00:00:00 [INFO] agent: Received event: user-event", False),
        ("2026/01/01 00:00:00 [INFO] agent: Received event: member-join", False),
        ("2026/01/01 00:00:00 [WARN] memberlist: Refuting a suspect message", False),
    ],
)
def test_only_member_change_log_lines_make_the_view_poll(line: str, polls: bool) -> None:
    assert tells_of_member_change(line) is polls


def test_publish_record_sets_tags_and_deletes_stale_keys() -> None:
    async def scenario() -> None:
        serf = ScriptedSerf()
        tags = await publish_record(serf, rec(1))  # type: ignore[arg-type]
        assert serf.tags == tags
        assert "e" in serf.deleted
        assert "k" not in serf.deleted

    asyncio.run(scenario())


def test_two_incarnations_of_one_name_are_two_members_under_that_name() -> None:
    # n3 was wiped and joined again with a new key: Serf keeps the old member as failed.
    old_key, new_key = rec(3).public_key, rec(13).public_key
    old = SerfMember(
        serf_node_name("n3", old_key), "192.0.2.3", 7946, encode_record(rec(3)), "failed"
    )
    new = SerfMember(
        serf_node_name("n3", new_key), "192.0.2.13", 7946, encode_record(rec(13, 2)), "alive"
    )
    view = MembershipView(ScriptedSerf())  # type: ignore[arg-type]
    update = view.apply([sm(1), old, new])
    assert update is not None
    assert {c.serf_name for c in update.changes} == {"n1", old.name, new.name}
    assert {(m.name, m.serf_name, m.state) for m in view.members.values()} == {
        ("n1", "n1", MemberState.ALIVE),
        ("n3", old.name, MemberState.FAILED),
        ("n3", new.name, MemberState.ALIVE),
    }
    assert view.members[new.name].record == rec(13, 2)
    # The old one is reaped on its own; the new one stays.
    view.apply([sm(1), new])
    assert [m.serf_name for m in view.members.values() if m.name == "n3"] == [new.name]


def test_an_undecodable_record_keeps_the_members_names() -> None:
    view = MembershipView(ScriptedSerf())  # type: ignore[arg-type]
    serf_name = serf_node_name("n5", rec(5).public_key)
    view.apply([SerfMember(serf_name, "192.0.2.5", 7946, {"role": "web"}, "alive")])
    member = view.members[serf_name]
    assert (member.name, member.serf_name, member.record) == ("n5", serf_name, None)
    assert "no meshd record" in (member.record_error or "")
