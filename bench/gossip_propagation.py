"""How fast a node-record change on one node reaches another node's membership view.

    .venv/bin/python bench/gossip_propagation.py --nodes 5 --reps 5

Builds a lab of N namespaces, runs one supervised ``serf agent`` per node
(meshd's SerfAgent), joins them, then repeatedly publishes a new record version
on n1 and times, from the moment the tag command is sent, in the same run:

- meshd: the last node's MembershipView (RPC ``members`` polls + event stream)
  holding the new version;
- stock CLI: ``serf members -format json`` spawned in a loop in the same node,
  until it lists the new version.

Prints both medians (and min/max), their ratio, and the CPU each side used. Both
include the gossip hop itself (Serf's 200 ms gossip interval), the floor for any
observer. Needs root, ``serf`` and ``ip``.
The stock CLI gets the per-run RPC key through SERF_RPC_AUTH (its documented way;
the key is random and dies with the lab).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import resource
import secrets
import shutil
import statistics
import sys
import time
from collections.abc import Mapping
from ipaddress import ip_address

from meshd.b64 import encode_b64
from meshd.gossip.record import encode_record
from meshd.gossip.rpc import SerfClient
from meshd.gossip.supervisor import SerfAgent, SerfSettings
from meshd.gossip.view import MembershipView, publish_record
from meshd.lab import Lab
from meshd.types import Member, MemberState, NodeRecord

DEADLINE = 60.0
CLI_SPAWNS = [0]


def record(index: int, version: int) -> NodeRecord:
    return NodeRecord(
        public_key=encode_b64(bytes([index]) * 32),
        addresses=(ip_address(f"100.80.0.{index}"),),
        port=51820,
        version=version,
    )


async def cli_sees(netns: str, auth: str, version: int, start: float) -> float:
    """Milliseconds until a spawned ``serf members`` lists n1 with ``version``."""
    serf = shutil.which("serf") or "serf"
    env = {"PATH": os.environ.get("PATH", ""), "SERF_RPC_AUTH": auth}
    argv = ["ip", "netns", "exec", netns, serf, "members", "-format", "json", "-name", "n1"]
    while time.monotonic() - start < DEADLINE:
        CLI_SPAWNS[0] += 1
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=env
        )
        out, _ = await proc.communicate()
        with contextlib.suppress(ValueError, KeyError):
            for member in json.loads(out)["members"]:
                if member["name"] == "n1" and member["tags"].get("v") == str(version):
                    return (time.monotonic() - start) * 1000
    raise TimeoutError(f"serf members never showed version {version}")


async def view_sees(view: MembershipView, version: int, start: float) -> float:
    def seen(members: Mapping[str, Member]) -> bool:
        member = members.get("n1")
        return member is not None and member.record is not None and member.record.version == version

    if not await view.wait_for(seen, DEADLINE):
        raise TimeoutError(f"the view never showed version {version}")
    return (time.monotonic() - start) * 1000


async def bench(
    lab: Lab, reps: int, poll: float | None, cli: bool
) -> tuple[list[float], list[float]]:
    auth = secrets.token_urlsafe(16)
    gossip_key = encode_b64(os.urandom(32))
    agents: list[SerfAgent] = []
    clients: list[SerfClient] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        for node in lab.nodes:
            agent = SerfAgent(
                SerfSettings(
                    node_name=node.name,
                    state_dir=lab.node_dir(node) / "serf",
                    rpc_auth_key=auth,
                    bind_addr=node.address,
                    gossip_keys=(gossip_key,),
                    tags=encode_record(record(node.index, 0)),
                ),
                netns=node.netns,
            )
            await agent.start()
            agents.append(agent)
            tasks.append(asyncio.create_task(agent.supervise()))
            client = agent.client()
            await client.connect()
            clients.append(client)
        for client in clients[1:]:
            await client.join([f"{lab.nodes[0].address}:7946"])
        observer = lab.nodes[-1]
        view = (
            MembershipView(clients[-1], poll_interval=poll) if poll else MembershipView(clients[-1])
        )
        tasks.append(asyncio.create_task(view.run()))
        everyone = {n.name for n in lab.nodes}
        joined = await view.wait_for(
            lambda m: {k for k, v in m.items() if v.state is MemberState.ALIVE} == everyone,
            DEADLINE,
        )
        if not joined:
            raise SystemExit("the mesh did not form")
        await asyncio.sleep(1.5)  # let join traffic and member events settle
        meshd_ms: list[float] = []
        cli_ms: list[float] = []
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        self_before = resource.getrusage(resource.RUSAGE_SELF)
        for version in range(1, reps + 1):
            start = time.monotonic()
            # Both observers watch from before the change: set_tags itself returns only
            # once Serf has gossiped the change, which may already have arrived by then.
            ours_task = asyncio.create_task(view_sees(view, version, start))
            theirs_task = (
                asyncio.create_task(cli_sees(observer.netns, auth, version, start)) if cli else None
            )
            await publish_record(clients[0], record(1, version))
            ours = await ours_task
            theirs = await theirs_task if theirs_task is not None else float("nan")
            meshd_ms.append(ours)
            cli_ms.append(theirs)
            print(f"rep {version}: meshd view {ours:7.1f} ms   serf CLI poll {theirs:7.1f} ms")
            await asyncio.sleep(1.0)
        # Agents are still running, so RUSAGE_CHILDREN counts only the CLI processes.
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        me = resource.getrusage(resource.RUSAGE_SELF)
        cpu_cli = (children.ru_utime + children.ru_stime) - (
            children_before.ru_utime + children_before.ru_stime
        )
        cpu_self = (me.ru_utime + me.ru_stime) - (self_before.ru_utime + self_before.ru_stime)
        print(
            f"CPU during the reps: {CLI_SPAWNS[0]} CLI processes used {cpu_cli:.2f} s; "
            f"this process (view, clients, spawning) {cpu_self:.2f} s"
        )
        return meshd_ms, cli_ms
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in clients:
            await client.close()
        for agent in agents:
            await agent.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--poll", type=float, default=None, help="view poll interval (s)")
    parser.add_argument("--no-cli", dest="cli", action="store_false", help="skip the CLI side")
    args = parser.parse_args()
    if args.nodes < 2:
        parser.error("--nodes must be at least 2")
    logging.basicConfig(level=logging.ERROR)
    with Lab.create(nodes=args.nodes) as lab:
        print(
            f"lab {lab.lab_id}: {args.nodes} nodes, {args.reps} record changes on n1, "
            f"observed on {lab.nodes[-1].name}"
        )
        meshd_ms, cli_ms = asyncio.run(bench(lab, args.reps, args.poll, args.cli))
    ours, theirs = statistics.median(meshd_ms), statistics.median(cli_ms)
    print(
        f"meshd MembershipView : median {ours:7.1f} ms  (min {min(meshd_ms):.1f}, "
        f"max {max(meshd_ms):.1f})"
    )
    print(
        f"stock serf CLI poll  : median {theirs:7.1f} ms  (min {min(cli_ms):.1f}, "
        f"max {max(cli_ms):.1f})"
    )
    print(f"ratio CLI / meshd    : {theirs / ours:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
