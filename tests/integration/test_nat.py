"""meshd across NAT (issue 11): sites behind NAT routers, public hosts, one mesh.

The lab: ``nat_mesh`` (tests/integration/natlab.py) - n1..nP public, the other
hosts dealt over the sites, every host joined through one it can reach. Without
the NAT plugin, hosts of different sites have no path to each other; with it
(entry point ``nat`` in ``meshd.plugins``), every pair should answer:
``MeshLab.expect_mesh_reachable`` knows which, so the checks here hold for both.

NAT plugin tests go here too, on the ``nat9`` lab or a lab of their own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from meshd.lab import Lab
from meshd.lab.mesh import MeshLab, nat_plugin_installed
from meshd.lab.plan import random_lab_id
from tests.conftest import run_meshd
from tests.integration.conftest import MESH_PROGRAMS, eventually, requires_root
from tests.integration.natlab import all_alive, member_states, nat_mesh, ping_gaps

pytestmark = requires_root(*MESH_PROGRAMS, "nft")

NODES, SITES, PUBLIC = 9, 3, 2


@pytest.fixture(scope="module")
def nat9() -> Iterator[MeshLab]:
    """9 hosts: n1, n2 public; s1 = n3, n6, n9; s2 = n4, n7; s3 = n5, n8."""
    with nat_mesh(NODES, SITES, PUBLIC, "restricted", seed=11) as mesh:
        yield mesh


def test_every_host_joins_through_a_seed_it_reaches_and_all_see_all_alive(
    nat9: MeshLab,
) -> None:
    # Before hosts joined through a host they can reach, the third host's join failed
    # ("cannot reach seed"): here every host joined, and every agent knows all nine.
    names = [n.name for n in nat9.lab.nodes]
    views: dict[str, dict[str, str]] = {}

    def everyone_sees_everyone() -> bool:
        views.update(member_states(nat9))
        return all_alive(views, names)

    took = eventually(everyone_sees_everyone, 60, "every agent lists all 9 alive", lambda: views)
    print(f"all 9 agents list all 9 members alive {took:.1f} s after the last join")
    # And every pair with a path answers over the mesh (all pairs with the NAT plugin).
    took = nat9.wait_full_mesh(timeout=60)
    matrix = nat9.ping_matrix(deadline=1)
    answered = sum(p["reachable"] for p in matrix["pairs"])
    print(f"mesh: {answered}/{len(matrix['pairs'])} pairs answer ({took:.1f} s)")
    assert matrix["ok"], matrix["failed"]


def test_lab_up_nat_runs_meshd_and_lab_ping_covers_the_mesh() -> None:
    # As a user: `lab up --topology nat` runs meshd by default and waits for the mesh;
    # `lab ping` pings the underlay and the mesh addresses, and what fails by design
    # (a site host into another site) is "-", not an error.
    lab_id = random_lab_id()
    try:
        up = run_meshd("lab", "up", "-n", "5", "-t", "nat", "--lab", lab_id, timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "joined through" in up.stdout
        assert "mesh: " in up.stdout  # the progress of the wait
        ping = run_meshd("lab", "ping", "--lab", lab_id, "--json")
        assert ping.returncode == 0, ping.stdout + ping.stderr
        result = json.loads(ping.stdout)
    finally:
        run_meshd("lab", "down", "--lab", lab_id)
    assert result["ok"], result["failed"]
    assert result["underlay"]["ok"], result["underlay"]["failed"]
    assert len(result["pairs"]) == 20
    # n1 public; s1: n2, n4; s2: n3, n5.
    no_path = {("n2", "n3"), ("n2", "n5"), ("n4", "n3"), ("n4", "n5")}
    no_path |= {(b, a) for a, b in no_path}
    unexpected = {(p["src"], p["dst"]) for p in result["pairs"] if not p["expected"]}
    assert unexpected == (set() if nat_plugin_installed() else no_path)


def test_ping_gaps_measures_an_outage(lab_factory: Callable[..., Lab]) -> None:
    # n1 pings n2 while n2 is cut off its network for a while: the longest gap covers
    # the cut, and replies came on both sides of it (not just "nothing answered").
    lab = lab_factory(nodes=2)
    with ThreadPoolExecutor(1) as pool:
        gap = pool.submit(ping_gaps, lab, "n1", lab.node("n2").address, 5)
        time.sleep(1.5)  # the outage begins inside the probe's window, after replies
        down_at = time.monotonic()
        lab.link_down("n2")
        try:
            time.sleep(1.5)  # the outage itself
        finally:
            lab.link_up("n2")
        outage = time.monotonic() - down_at
        longest = gap.result()
    print(f"cut {outage:.2f} s, longest gap measured {longest:.2f} s")
    assert outage - 0.2 <= longest < 5
