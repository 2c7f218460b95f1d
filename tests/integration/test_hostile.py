"""Attacks from the security review, each as a test (issue: security findings).

A revoked machine must not come back with the token it joined with, while the
machines that joined earlier with that same token keep their place.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator

import pytest

from meshd.lab import Lab
from meshd.lab.mesh import MeshLab

pytestmark = pytest.mark.root("serf", "wireguard-go", "wg", "ping")

NODES = ["n1", "n2", "n3", "n4"]


@pytest.fixture(scope="module")
def mesh() -> Iterator[MeshLab]:
    from tests.integration.conftest import missing_requirements

    reason = missing_requirements(("serf", "wireguard-go", "wg", "ping"))
    if reason:
        pytest.skip(reason)
    lab = Lab.create(nodes=len(NODES) + 1, topology="flat")
    try:
        yield MeshLab(lab)
    finally:
        if not os.environ.get("MESHD_TEST_KEEP_LAB"):
            lab.down()


def test_a_revoked_node_cannot_rejoin_with_its_token(mesh: MeshLab) -> None:
    mesh.up(NODES, seed=2)
    mesh.wait_full_mesh(NODES, timeout=60)
    # Every node joined with the first node's token; keep a copy of it, as an attacker
    # who wiped n4 and kept its token file would.
    stolen = mesh.lab.node_dir("n4") / "stolen-token"
    shutil.copyfile(mesh.state_dir("n1") / "join-token", stolen)
    stolen.chmod(0o600)
    # The token file a join used is gone afterwards.
    assert not mesh.token_path("n4").exists()

    done = mesh.meshd("n1", "revoke", "n4", "--yes")
    assert "revoked the token it joined with" in done.stdout
    mesh.stop("n4")
    shutil.rmtree(mesh.state_dir("n4"))

    refused = mesh.meshd(
        "n4",
        "join",
        mesh.lab.node("n2").address,
        "--token-file",
        str(stolen),
        "--endpoint",
        mesh.endpoint("n4"),
        "--no-start",
        check=False,
    )
    assert refused.returncode != 0
    assert "revoked" in refused.stderr, refused.stderr
    assert not (mesh.state_dir("n4") / "node.json").exists()

    # n2 and n3 joined with that same token before the revocation: still a full mesh.
    others = ["n1", "n2", "n3"]
    mesh.wait_full_mesh(others, timeout=30)
    addresses = mesh.mesh_addresses(others)
    assert all(
        mesh.lab.ping(a, addresses[b], deadline=3) is not None
        for a in others
        for b in others
        if a != b
    )


def test_a_fresh_token_still_admits_a_new_machine(mesh: MeshLab) -> None:
    mesh.meshd("n1", "token", "create", "--endpoint", mesh.endpoint("n1"))
    mesh.join("n5", "n3")
    mesh.start("n5")
    started = time.monotonic()
    mesh.wait_full_mesh(["n1", "n2", "n3", "n5"], timeout=60)
    print(f"n5 in the full mesh {time.monotonic() - started:.1f} s after its agent started")
