"""A rogue holding only the gossip key forges leaves of a healthy member (12-node lab).

Observed before the fix: three forged ``force-leave n3`` 8 s apart isolated n3 for
good. Now an unauthenticated leave never removes a peer whose WireGuard handshake
is recent, and gossip cannot be reached from the underlay at all.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator

import pytest

from meshd.gossip.names import display_name
from meshd.lab.mesh import MeshLab
from tests.integration.conftest import mesh_lab, rogue_serf

pytestmark = pytest.mark.root("serf", "wireguard-go", "wg", "ping", "nft")

NODES = [f"n{i}" for i in range(1, 13)]
VICTIM = "n3"
PINGERS = ["n2", "n7", "n12"]
ATTACK = 60.0  # seconds of pings under attack
BURSTS = (5.0, 25.0, 45.0)  # three forged leaves 0.5 s apart at each


@pytest.fixture(scope="module")
def mesh() -> Iterator[MeshLab]:
    with mesh_lab(len(NODES), up=NODES, seed=12, timeout=120) as built:
        yield built


def test_forged_leaves_lose_no_ping_of_a_healthy_member(mesh: MeshLab) -> None:
    victim = mesh.mesh_address(VICTIM)
    results: dict[str, str] = {}

    def pinger(node: str) -> None:
        count = int(ATTACK / 0.2)
        done = mesh.lab.run(
            node,
            ["ping", "-n", "-q", "-i", "0.2", "-c", str(count), "-W", "1", victim],
            check=False,
            timeout=ATTACK + 30,
        )
        results[node] = done.stdout

    async def attack() -> list[str]:
        agent = rogue_serf(mesh, "n5", "rogue", 7980)
        await agent.start()
        client = agent.client()
        await client.connect()
        forged: list[str] = []
        try:
            # The rogue must see the victim first (its Serf name may carry a suffix).
            target = None
            while target is None:
                names = [m.name for m in await client.members()]
                target = next((n for n in names if display_name(n) == VICTIM), None)
                await asyncio.sleep(0.2)
            started = time.monotonic()
            for at in BURSTS:
                await asyncio.sleep(max(0.0, started + at - time.monotonic()))
                for _ in range(3):
                    await client.force_leave(target)
                    forged.append(target)
                    await asyncio.sleep(0.5)
        finally:
            await client.close()
            await agent.stop()
        return forged

    threads = [threading.Thread(target=pinger, args=(n,)) for n in PINGERS]
    for thread in threads:
        thread.start()
    forged = asyncio.run(attack())
    for thread in threads:
        thread.join()
    assert len(forged) == 9
    lost = {}
    for node, out in results.items():
        found = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert found, out
        lost[node] = int(found.group(1)) - int(found.group(2))
    print(f"pings to {VICTIM} lost over {ATTACK:.0f} s of forged leaves: {lost}")
    assert lost == dict.fromkeys(PINGERS, 0)

    # And the victim is still everyone's peer, and gossip says alive again.
    key = mesh.status(VICTIM)["node"]["public_key"]  # type: ignore[index]
    for node in NODES:
        if node != VICTIM:
            peers = mesh.lab.run(node, ["wg", "show", mesh.lab.ifname(node, "mw"), "peers"])
            assert key in peers.stdout.split(), node


def test_gossip_is_closed_to_an_underlay_neighbour(mesh: MeshLab) -> None:
    """From n2, route n4's mesh address over the underlay (as the attacker did) and try
    Serf's port: dropped by meshd's nftables table on n4. Through the mesh it answers."""
    target = mesh.status("n4")["node"]["addresses"][1]  # type: ignore[index]
    n4_eth = mesh.lab.node("n4").interface
    link_local = (
        mesh.lab.run("n4", ["ip", "-6", "-o", "address", "show", "dev", n4_eth, "scope", "link"])
        .stdout.split()[3]
        .split("/")[0]
    )
    probe = (
        "import socket,sys\n"
        "try:\n"
        f"    socket.create_connection(('{target}', 7946), timeout=2).close(); print('open')\n"
        "except OSError as exc:\n"
        "    print('closed', exc)\n"
    )
    through_mesh = mesh.lab.run("n2", ["python3", "-c", probe]).stdout
    assert through_mesh.startswith("open"), through_mesh
    route = [f"{target}/128", "via", link_local, "dev", mesh.lab.node("n2").interface]
    mesh.lab.run("n2", ["ip", "-6", "route", "add", *route])
    try:
        over_underlay = mesh.lab.run("n2", ["python3", "-c", probe]).stdout
    finally:
        mesh.lab.run("n2", ["ip", "-6", "route", "del", *route])
    assert over_underlay.startswith("closed"), over_underlay
    table = mesh.lab.run("n4", ["nft", "list", "table", "inet", "meshd"]).stdout
    assert "gossip_only_through_the_mesh" in table
