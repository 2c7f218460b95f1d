"""CA rotation in a real lab: ``meshd ca rotate`` under pings, restart, retire, re-join.

One lab of five hosts, the tests in order: n1 holds the CA; n1-n4 ping every pair
5 times a second through the rotation; n5 is down during it (its certificate stays
issued by the old CA only) and is refused once the old CA is retired; the n5 host
then joins again, with a new token, as n6.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from collections.abc import Iterator
from typing import Any

import pytest

from meshd.lab.mesh import MeshLab
from tests.integration.conftest import Pinger, eventually, mesh_lab, refused_twice, wg_peers

pytestmark = pytest.mark.root("serf", "wireguard-go", "wg", "ping")

PINGED = ["n1", "n2", "n3", "n4"]
MAX_SILENCE = 3.0


@pytest.fixture(scope="module")
def mesh() -> Iterator[MeshLab]:
    with mesh_lab(5, up=[*PINGED, "n5"], seed=12) as built:
        yield built


@pytest.fixture(scope="module")
def before(mesh: MeshLab, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What the mesh looked like before the rotation: each node's certificate, the CA
    key, and a copy of a token made then."""
    old_token = tmp_path_factory.mktemp("tokens") / "old-token"
    shutil.copyfile(mesh.state_dir("n1") / "join-token", old_token)
    return {
        "certificates": {n: status(mesh, n)["node"]["certificate"] for n in PINGED},
        "ca": status(mesh, "n1")["node"]["ca_keys"],
        "n5_key": status(mesh, "n5")["node"]["public_key"],
        "old_token": old_token,
    }


def status(mesh: MeshLab, node: str) -> dict[str, Any]:
    found = mesh.status(node)
    assert found is not None, f"the agent on {node} does not answer"
    return found


def rows_of(mesh: MeshLab, node: str, key: str) -> list[dict[str, Any]]:
    """``node``'s status rows for the member with WireGuard key ``key``."""
    return [row for row in status(mesh, node)["peers"] if row["public_key"] == key]


def test_a_ca_rotation_under_pings_leaves_no_pair_silent_for_3_s(
    mesh: MeshLab, before: dict[str, Any]
) -> None:
    assert len(before["ca"]) == 1
    mesh.stop("n5")  # away for the whole rotation: it keeps its old certificate
    pairs = list(itertools.combinations(PINGED, 2))
    pingers = [Pinger(mesh, a, b) for a, b in pairs]
    for pinger in pingers:
        pinger.start()
    try:
        eventually(lambda: all(p.answered_since(0) for p in pingers), 30, "every pair answers")
        rotated = mesh.meshd("n1", "ca", "rotate", "--json", "--timeout", "60s")
        result = json.loads(rotated.stdout)
        print(f"meshd ca rotate: {result}")
        assert result["renewed"] == PINGED
        assert result["pending"] == []
        new_ca = result["new_ca"]

        def every_node_renewed_and_trusts_both() -> bool:
            nodes = {n: status(mesh, n)["node"] for n in PINGED}
            return all(
                node["certificate"] != before["certificates"][name]
                and node["ca_keys"] == [*before["ca"], new_ca]
                for name, node in nodes.items()
            )

        eventually(every_node_renewed_and_trusts_both, 20, "every node renewed, trusting both")
        renewed_at = time.time()
        eventually(
            lambda: all(p.answered_since(renewed_at) for p in pingers),
            15,
            "every pair answers after the renewals",
        )
    finally:
        for pinger in pingers:
            pinger.stop()
    gaps = {f"{a}-{b}": round(p.longest_gap(), 2) for (a, b), p in zip(pairs, pingers, strict=True)}
    print(f"longest silence per pair during the CA rotation (s): {gaps}")
    assert all(gap <= MAX_SILENCE for gap in gaps.values()), gaps


def test_a_restart_during_the_overlap_keeps_both_ca_keys_and_the_renewal(mesh: MeshLab) -> None:
    node = status(mesh, "n3")["node"]
    mesh.stop("n3")
    mesh.start("n3")
    again = mesh.wait_ready("n3")["node"]
    assert again["ca_keys"] == node["ca_keys"]
    assert len(again["ca_keys"]) == 2
    assert again["certificate"] == node["certificate"]
    mesh.wait_full_mesh(PINGED, timeout=30)


def test_after_retiring_the_old_ca_its_certificates_and_tokens_are_refused(
    mesh: MeshLab, before: dict[str, Any]
) -> None:
    new_ca = status(mesh, "n1")["node"]["ca_keys"][-1]
    retired = json.loads(mesh.meshd("n1", "ca", "retire", "--json").stdout)
    assert retired["retired"] == before["ca"]
    eventually(
        lambda: all(status(mesh, n)["node"]["ca_keys"] == [new_ca] for n in PINGED),
        15,
        "every node trusts only the new CA key",
    )
    eventually(
        lambda: all(before["n5_key"] not in wg_peers(mesh, n) for n in PINGED),
        15,
        "no node keeps n5 (certificate of the old CA only) as a peer",
        lambda: {n: rows_of(mesh, n, before["n5_key"]) for n in PINGED},
    )
    # n5 comes back, still holding its certificate of the old CA: nobody answers it.
    keys = {n: status(mesh, n)["node"]["public_key"] for n in PINGED}
    mesh.start("n5")
    mesh.wait_ready("n5")

    eventually(
        lambda: refused_twice(mesh, "n5", keys),
        60,
        "every node left two of n5's handshakes unanswered",
    )
    for node in PINGED:
        assert before["n5_key"] not in wg_peers(mesh, node)
    mesh.wait_full_mesh(PINGED, timeout=15)
    # A token made before the rotation admits nobody any more.
    mesh.stop("n5")
    shutil.rmtree(mesh.state_dir("n5"))
    token = mesh.token_path("n5")
    shutil.copyfile(before["old_token"], token)
    token.chmod(0o600)
    seed = mesh.lab.node("n2").address
    refused = mesh.meshd("n5", "join", seed, "--token-file", str(token), "--no-start", check=False)
    assert refused.returncode != 0
    # Refused before anything is said in the encrypted channel: the seed no longer
    # accepts a handshake keyed by the retired CA key (meshd.pki.enrol.HANDSHAKE_REFUSAL).
    assert "names a CA key the network retired" in refused.stderr, refused.stderr


def test_a_fresh_node_joins_with_a_token_made_after_the_rotation(mesh: MeshLab) -> None:
    new_ca = status(mesh, "n1")["node"]["ca_keys"]
    mesh.meshd("n1", "token", "create", "--ttl", "1h", "--endpoint", mesh.endpoint("n1"))
    mesh.join("n5", "n3", node_name="n6")
    mesh.start("n5")
    joined = mesh.wait_ready("n5")["node"]
    assert joined["name"] == "n6"
    assert joined["ca_keys"] == new_ca

    def n6_is_everyones_peer() -> bool:
        return all("n6" in (mesh.peer_names(n) or set()) for n in PINGED)

    eventually(n6_is_everyones_peer, 30, "every node has n6 as a peer")
    for node in PINGED:
        address = mesh.mesh_address(node)
        mesh.lab.run("n5", ["ping", "-n", "-c", "1", "-W", "2", address])
