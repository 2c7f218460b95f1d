"""The gossip layer against real ``serf agent`` processes in lab namespaces.

Every agent runs under :class:`SerfAgent` inside its own lab node (gossip on the
node's lab address, RPC on 127.0.0.1 inside the node); the test process reaches
each RPC port through the namespace (``SerfClient(netns=...)``). Deadlines are
generous (failure detection alone takes 4-6 s, a missed gossip message up to
30 s of push/pull) and every wait polls: nothing here is a timing assertion.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import ip_address
from typing import Any

import pytest

from meshd import config as config_mod
from meshd.b64 import encode_b64
from meshd.errors import ConfigError, SerfAuthError, SerfCommandError, SerfConnectionError
from meshd.gossip.messages import QueryEvent, StreamGap, UserEvent
from meshd.gossip.record import TAGS_LIMIT, encode_record, tags_size
from meshd.gossip.rpc import SerfClient
from meshd.gossip.supervisor import SerfAgent, SerfSettings
from meshd.gossip.view import MembershipView, publish_record
from meshd.lab import Lab
from meshd.types import Member, MemberState, NodeRecord

pytestmark = pytest.mark.root("serf")

DEADLINE = 45.0  # seconds; a late gossip message is repaired by Serf's 30 s push/pull


def record(index: int, version: int = 1) -> NodeRecord:
    return NodeRecord(
        public_key=encode_b64(bytes([index]) * 32),
        addresses=(ip_address(f"100.80.0.{index}"),),
        port=51820,
        endpoints=(f"198.18.0.{index}:51820",),
        version=version,
    )


@dataclass
class Node:
    name: str
    agent: SerfAgent
    client: SerfClient
    view: MembershipView
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)


def states(view: MembershipView) -> dict[str, MemberState]:
    return {name: member.state for name, member in view.members.items()}


@contextlib.asynccontextmanager
async def serf_mesh(
    lab: Lab, *, auth_key: str | None = None, supervise: bool = False
) -> AsyncIterator[list[Node]]:
    """One supervised serf agent per lab node, joined to n1, each with a client and a view."""
    gossip_key = encode_b64(os.urandom(32))
    auth = auth_key or secrets.token_urlsafe(16)
    nodes: list[Node] = []
    try:
        for lab_node in lab.nodes:
            settings = SerfSettings(
                node_name=lab_node.name,
                state_dir=lab.node_dir(lab_node) / "serf",
                rpc_auth_key=auth,
                bind_addr=lab_node.address,
                gossip_keys=(gossip_key,),
                tags=encode_record(record(lab_node.index)),
            )
            agent = SerfAgent(settings, netns=lab_node.netns, backoff_initial=0.1)
            await agent.start()
            client = agent.client()
            node = Node(lab_node.name, agent, client, MembershipView(client))
            nodes.append(node)
            await client.connect()
            node.tasks.append(asyncio.create_task(node.view.run()))
            if supervise:
                node.tasks.append(asyncio.create_task(agent.supervise()))
        seed = f"{lab.nodes[0].address}:7946"
        for node in nodes[1:]:
            assert await node.client.join([seed]) == 1
        everyone = {n.name for n in nodes}
        for node in nodes:
            assert await node.view.wait_for(
                lambda m: {k for k, v in m.items() if v.state is MemberState.ALIVE} == everyone,
                DEADLINE,
            ), f"{node.name} sees {states(node.view)}"
        yield nodes
    finally:
        for node in nodes:
            for task in node.tasks:
                task.cancel()
            await asyncio.gather(*node.tasks, return_exceptions=True)
            await node.client.close()
            await node.agent.stop()


def run(lab: Lab, scenario: Callable[[Lab], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario(lab))


def test_join_and_a_record_change_reach_every_view(lab_factory: Callable[..., Lab]) -> None:
    async def scenario(lab: Lab) -> None:
        async with serf_mesh(lab) as nodes:
            for node in nodes:
                assert {n: m.record for n, m in node.view.members.items()} == {
                    lab_node.name: record(lab_node.index) for lab_node in lab.nodes
                }
            changed = replace(record(1, version=2), roles=frozenset({"relay"}))
            await publish_record(nodes[0].client, changed)

            def has_new_record(members: Mapping[str, Member]) -> bool:
                return members["n1"].record == changed

            for node in nodes[1:]:
                assert await node.view.wait_for(has_new_record, DEADLINE), node.view.members["n1"]

    run(lab_factory(nodes=4), scenario)


def test_graceful_leave_is_left_and_kill_9_is_failed(lab_factory: Callable[..., Lab]) -> None:
    async def scenario(lab: Lab) -> None:
        async with serf_mesh(lab) as nodes:
            await nodes[2].client.leave()
            os.kill(nodes[3].agent.pid or 0, signal.SIGKILL)
            for node in nodes[:2]:
                assert await node.view.wait_for(
                    lambda m: (
                        m["n3"].state is MemberState.LEFT and m["n4"].state is MemberState.FAILED
                    ),
                    DEADLINE,
                ), f"{node.name} sees {states(node.view)}"
            # A failed member may come back; force-leave tells everyone it will not.
            await nodes[0].client.force_leave("n4")
            for node in nodes[:2]:
                assert await node.view.wait_for(
                    lambda m: m["n4"].state is MemberState.LEFT, DEADLINE
                ), f"{node.name} sees {states(node.view)}"

    run(lab_factory(nodes=4), scenario)


def test_a_restarted_agent_rejoins_from_its_snapshot(lab_factory: Callable[..., Lab]) -> None:
    async def scenario(lab: Lab) -> None:
        async with serf_mesh(lab, supervise=True) as nodes:
            victim = nodes[2]
            old_pid = victim.agent.pid
            watcher = victim.agent.client()
            await watcher.connect()
            # Serf flushes its snapshot lazily; the view's nudge must get the others on disk.
            wanted = {f"alive: {n.name} " for n in nodes}
            for _ in range(int(DEADLINE / 0.1)):
                text = victim.agent.snapshot_path.read_text()
                if all(line in text for line in wanted):
                    break
                await asyncio.sleep(0.1)
            assert all(line in text for line in wanted), text
            os.kill(old_pid or 0, signal.SIGKILL)
            for _ in range(int(DEADLINE / 0.1)):
                if victim.agent.restarts >= 1 and victim.client.connected:
                    break
                await asyncio.sleep(0.1)
            assert victim.agent.restarts == 1
            assert victim.agent.pid not in (None, old_pid)
            # Nobody asked the new agent to join: only its snapshot can bring the others back.
            everyone = {n.name for n in nodes}
            alive: set[str] = set()
            for _ in range(int(DEADLINE / 0.2)):
                with contextlib.suppress(SerfConnectionError):
                    alive = {m.name for m in await victim.client.members() if m.status == "alive"}
                if alive == everyone:
                    break
                await asyncio.sleep(0.2)
            assert alive == everyone
            # The record came back from the tags file too.
            assert nodes[0].view.members["n3"].record == record(3)
            assert victim.client.reconnects >= 1
            # The agent replays nothing after a restart: the client says so in the stream.
            gap = None
            while gap is None:
                event = await asyncio.wait_for(anext(aiter(watcher.events())), DEADLINE)
                gap = event if isinstance(event, StreamGap) else None
            assert gap.reason == "reconnected"
            await watcher.close()

    run(lab_factory(nodes=3), scenario)


def test_wrong_rpc_auth_key_is_a_clear_error(lab_factory: Callable[..., Lab]) -> None:
    async def scenario(lab: Lab) -> None:
        async with serf_mesh(lab) as nodes:
            wrong = SerfClient(
                nodes[0].agent.settings.rpc_addr, auth_key="not-the-key", netns=lab.nodes[0].netns
            )
            with pytest.raises(SerfAuthError, match="Invalid authentication token"):
                await wrong.connect()
            none = SerfClient(nodes[0].agent.settings.rpc_addr, netns=lab.nodes[0].netns)
            with pytest.raises(SerfAuthError, match="Authentication required"):
                await none.connect()
            await none.close()

    run(lab_factory(nodes=2), scenario)


def test_no_agent_is_a_connection_error(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(nodes=1)

    async def scenario() -> None:
        client = SerfClient("127.0.0.1:7373", auth_key="x", netns=lab.nodes[0].netns, timeout=3)
        with pytest.raises(SerfConnectionError, match="cannot reach"):
            await client.connect()

    asyncio.run(scenario())


def test_calls_events_and_queries_share_one_connection(lab_factory: Callable[..., Lab]) -> None:
    async def scenario(lab: Lab) -> None:
        async with serf_mesh(lab) as nodes:
            n1, n2 = nodes[0].client, nodes[1].client
            got: list[object] = []
            nodes[1].view._on_event = got.append
            # Many calls in flight at once on one connection, replies matched by Seq.
            results = await asyncio.gather(
                *(n1.members() for _ in range(20)),
                n1.stats(),
                n1.list_keys(),
                n1.get_coordinate("n2"),
                n1.members_filtered(name="n[12]"),
            )
            assert all(len(r) == 3 for r in results[:20])
            stats, keys, _coord, filtered = results[20:]
            assert stats["agent"]["name"] == "n1"
            assert keys.num_nodes == 3
            assert len(keys.keys) == 1
            assert sorted(m.name for m in filtered) == ["n1", "n2"]
            assert await n1.get_coordinate("no-such-node") is None
            with pytest.raises(SerfCommandError, match="bad regex"):
                await n1.members_filtered(name="n[")

            await n1.user_event("hello", b"\x00\xffworld", coalesce=False)
            for _ in range(int(DEADLINE / 0.1)):
                if any(isinstance(e, UserEvent) for e in got):
                    break
                await asyncio.sleep(0.1)
            (event,) = [e for e in got if isinstance(e, UserEvent)]
            assert (event.name, event.payload) == ("hello", b"\x00\xffworld")

            async def answer() -> None:
                for _ in range(int(DEADLINE / 0.05)):
                    queries = [e for e in got if isinstance(e, QueryEvent)]
                    if queries:
                        await n2.respond(queries[0].id, b"pong:" + queries[0].payload)
                        return
                    await asyncio.sleep(0.05)

            responder = asyncio.create_task(answer())
            result = await n1.query(
                "ping", b"42", filter_nodes=["n2"], request_ack=True, query_timeout=5
            )
            await responder
            assert result.responses == {"n2": b"pong:42"}
            assert result.acks == ("n2",)

            # An error header becomes a typed exception carrying the agent's text.
            with pytest.raises(SerfCommandError, match="serf remove-key"):
                await n1.remove_key(next(iter(keys.keys)))
            new_key = encode_b64(os.urandom(32))
            assert (await n1.install_key(new_key)).num_err == 0
            assert (await n1.use_key(new_key)).num_err == 0
            assert (await n1.remove_key(next(iter(keys.keys)))).num_err == 0
            assert set((await n2.list_keys()).keys) == {new_key}
            # The connection still works after all of that.
            assert len(await n1.members()) == 3

    run(lab_factory(nodes=3), scenario)


def test_tag_size_is_measured_exactly_as_the_agent_does(lab_factory: Callable[..., Lab]) -> None:
    async def scenario(lab: Lab) -> None:
        async with serf_mesh(lab) as nodes:
            client = nodes[0].client
            (me,) = [m for m in await client.members() if m.name == "n1"]
            # Replace every tag with one we size ourselves: first exactly at the limit...
            # magic byte + fixmap + fixstr "x" = 4 bytes, then a str16 header (3) + the text.
            filler = "y" * (TAGS_LIMIT - 4 - 3)
            assert tags_size({"x": filler}) == TAGS_LIMIT
            await client.set_tags({"x": filler}, delete=list(me.tags))
            # ...then one byte over it, which the agent must refuse.
            with pytest.raises(SerfCommandError, match="exceeds limit"):
                await client.set_tags({"x": filler + "y"})
            with pytest.raises(SerfCommandError, match="exceeds limit"):
                await client.set_tags({"x": filler[:-1], "z": ""})

    run(lab_factory(nodes=1), scenario)


def test_a_slow_event_reader_loses_events_not_the_connection(
    lab_factory: Callable[..., Lab],
) -> None:
    async def scenario(lab: Lab) -> None:
        async with serf_mesh(lab) as nodes:
            slow = SerfClient(
                nodes[1].agent.settings.rpc_addr,
                auth_key=nodes[1].agent.settings.rpc_auth_key,
                netns=lab.nodes[1].netns,
                queue_size=4,
            )
            await slow.connect()
            for i in range(12):
                await nodes[0].client.user_event(f"burst-{i}", coalesce=False)
            for _ in range(int(DEADLINE / 0.1)):
                if slow.dropped_events:
                    break
                await asyncio.sleep(0.1)
            assert slow.dropped_events > 0
            # Replies still flow while nobody reads the full event queue.
            assert len(await slow.members()) == 2
            queued = [slow.next_event_nowait() for _ in range(4)]
            assert slow.next_event_nowait() is None
            assert all(isinstance(e, UserEvent) for e in queued)
            await nodes[0].client.user_event("after", coalesce=False)
            events = [await asyncio.wait_for(anext(aiter(slow.events())), DEADLINE)]
            while not (isinstance(events[-1], UserEvent) and events[-1].name == "after"):
                events.append(await asyncio.wait_for(anext(aiter(slow.events())), DEADLINE))
            assert events[0] == StreamGap("overflow")
            await slow.close()

    run(lab_factory(nodes=2), scenario)


@pytest.mark.parametrize("rpc_addr", ["0.0.0.0:7373", "198.18.0.1:7373", "[::]:7373"])
def test_an_rpc_address_that_is_not_loopback_is_refused(
    lab_factory: Callable[..., Lab], rpc_addr: str
) -> None:
    lab = lab_factory(nodes=1)
    with pytest.raises(ConfigError, match=r"gossip\.rpc_addr.*loopback"):
        config_mod.parse(f'[gossip]\nrpc_addr = "{rpc_addr}"\n')
    with pytest.raises(ConfigError, match="loopback"):
        SerfSettings(
            node_name="n1",
            state_dir=lab.node_dir("n1") / "serf",
            rpc_auth_key="k",
            rpc_addr=rpc_addr,
        )
    # Nothing was written or started for the refused settings.
    assert not (lab.node_dir("n1") / "serf").exists()
