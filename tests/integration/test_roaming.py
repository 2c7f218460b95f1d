"""Roaming: a node's underlay address changes and the others reach it again at once.

The agent watches its own addresses through netlink events, republishes its
endpoints and sends a packet into every tunnel from the new address (WireGuard
moves a peer's endpoint to where authenticated packets come from). Without it,
the others waited for the node's next keepalive: 34.9 s in a 12-node lab.
"""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from meshd.lab import Lab
from meshd.lab.mesh import MeshLab

pytestmark = pytest.mark.root("serf", "wireguard-go", "wg", "ping")

NODES = ["n1", "n2", "n3", "n4", "n5"]
# The bound; the mechanism needs one packet round trip, so this is slack, not a tune.
REACH_AGAIN = 3.0


@pytest.fixture(scope="module")
def mesh() -> Iterator[MeshLab]:
    from tests.integration.conftest import missing_requirements

    reason = missing_requirements(("serf", "wireguard-go", "wg", "ping"))
    if reason:
        pytest.skip(reason)
    lab = Lab.create(nodes=len(NODES), topology="flat")
    try:
        yield MeshLab(lab)
    finally:
        if not os.environ.get("MESHD_TEST_KEEP_LAB"):
            lab.down()


def test_a_node_whose_address_changes_is_reached_again_at_once(mesh: MeshLab) -> None:
    mesh.up(NODES, seed=3)
    mesh.wait_full_mesh(NODES, timeout=60)
    addresses = mesh.mesh_addresses(NODES)
    mover = mesh.lab.node("n3")
    others = [n for n in NODES if n != "n3"]
    # Every pair has a session before the move, as in a running mesh.
    assert all(mesh.lab.ping(n, addresses["n3"], deadline=5) is not None for n in others)

    old = ipaddress.ip_interface(mover.cidr)
    new = ipaddress.ip_interface(f"{old.ip + 100}/{old.network.prefixlen}")
    assert all(str(new.ip) != mesh.lab.node(n).address for n in NODES)
    moved_at = time.monotonic()
    mesh.lab.run("n3", ["ip", "address", "flush", "dev", mover.interface])
    mesh.lab.run("n3", ["ip", "address", "add", str(new), "dev", mover.interface])

    def reach(node: str) -> float | None:
        if mesh.lab.ping(node, addresses["n3"], deadline=REACH_AGAIN + 2) is None:
            return None
        return time.monotonic() - moved_at

    with ThreadPoolExecutor(len(others)) as pool:
        took = dict(zip(others, pool.map(reach, others), strict=True))
    print(f"reached n3 again after its address changed: {took}")
    assert all(t is not None for t in took.values()), took
    assert max(t for t in took.values() if t is not None) <= REACH_AGAIN, took

    # The record follows: every other node's peer entry points at the new address.
    def endpoint_on(node: str) -> str | None:
        status = mesh.status(node)
        assert status is not None
        row = next(p for p in status["peers"] if p["name"] == "n3")
        return row["endpoint"]

    deadline = time.monotonic() + 10
    while any(str(new.ip) not in (endpoint_on(n) or "") for n in others):
        assert time.monotonic() < deadline, {n: endpoint_on(n) for n in others}
        time.sleep(0.2)
