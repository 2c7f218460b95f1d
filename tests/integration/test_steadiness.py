"""The mesh stays whole through what machines go through: real meshd agents,
serf and wireguard-go in a flat lab.

A machine that is wiped (state directory gone, so a new WireGuard key) and
joins again under the name it had must be taken back: Serf remembers the old
member for a day (under the bare name, memberlist reported a conflicting
address and kept the newcomer out for about 30 s), so each incarnation is its
own Serf member (:mod:`meshd.gossip.names`), and people still see the one name.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from meshd.lab import Lab
from meshd.lab.mesh import AGENT, MeshLab
from tests.integration.conftest import eventually

pytestmark = pytest.mark.root("serf", "wireguard-go", "wg", "ping")

NODES = ["n1", "n2", "n3", "n4"]


@pytest.fixture(scope="module")
def mesh() -> Iterator[MeshLab]:
    from tests.integration.conftest import missing_requirements

    reason = missing_requirements(("serf", "wireguard-go", "wg", "ping"))
    if reason:
        pytest.skip(reason)
    lab = Lab.create(nodes=len(NODES), topology="flat")
    try:
        built = MeshLab(lab)
        built.up(NODES, seed=3)
        built.wait_full_mesh(NODES, timeout=60)
        yield built
    finally:
        # MESHD_TEST_KEEP_LAB=1 keeps the lab (and its agents' logs) for a post-mortem.
        if not os.environ.get("MESHD_TEST_KEEP_LAB"):
            lab.down()


def status(mesh: MeshLab, node: str) -> dict[str, Any]:
    found = mesh.status(node)
    assert found is not None, f"the agent on {node} does not answer"
    return found


def seen(mesh: MeshLab, node: str, name: str) -> list[tuple[str, str, bool]]:
    """(public key, gossip state, is a peer) of each row ``node``'s status shows for ``name``."""
    rows = status(mesh, node)["peers"]
    return [(r["public_key"], r["gossip"], r["peer"]) for r in rows if r["name"] == name]


def name_conflicts(mesh: MeshLab, node: str) -> list[str]:
    """The lines of ``node``'s agent log where Serf took two machines for one member."""
    text = mesh.lab.log_path(node, AGENT).read_text(errors="replace")
    marks = ("memberlist: Conflicting address for", "serf: Name conflict for")
    return [line for line in text.splitlines() if any(mark in line for mark in marks)]


@pytest.mark.parametrize(
    ("machine", "seed", "gone_as"),
    [("n3", "n2", ("failed", True)), ("n4", "n2", ("left", False))],
    ids=["after-a-stop", "after-a-leave"],
)
def test_a_wiped_machine_rejoins_under_its_old_name_through_another_seed(
    mesh: MeshLab, machine: str, seed: str, gone_as: tuple[str, bool]
) -> None:
    old_key = status(mesh, machine)["node"]["public_key"]
    if gone_as[0] == "left":
        mesh.meshd(machine, "leave")
    else:
        assert mesh.stop(machine)
    # A seed refuses to enrol a name that a live member holds: wait until it sees it gone
    # (a failed member keeps its peer, one that left does not).
    eventually(
        lambda: seen(mesh, seed, machine) == [(old_key, *gone_as)],
        30,
        f"{seed} sees the old {machine} as {gone_as[0]}",
        lambda: seen(mesh, seed, machine),
    )
    shutil.rmtree(mesh.state_dir(machine))
    mesh.join(machine, seed)  # not through n1, the node that ran init
    mesh.start(machine)
    own = mesh.wait_ready(machine)["node"]
    assert own["name"] == machine
    new_key = own["public_key"]
    assert new_key != old_key

    mesh.wait_full_mesh(NODES, timeout=60)

    # Every other node shows it once, under its name, with its new key, as a peer.
    for node in NODES:
        if node != machine:
            eventually(
                lambda node=node: seen(mesh, node, machine) == [(new_key, "alive", True)],
                30,
                f"{node} shows {machine} once, alive, with its new key",
                lambda node=node: seen(mesh, node, machine),
            )
    # The new machine is a new Serf member: Serf never saw two machines claim one name
    # (under the bare name it did, and kept the newcomer out for about 30 s).
    conflicts = {node: name_conflicts(mesh, node) for node in NODES}
    assert not any(conflicts.values()), conflicts
