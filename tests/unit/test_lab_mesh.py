"""meshd in a lab, the parts without root: the seed a host joins through, the config
each host gets and which mesh pairs should answer."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd import config
from meshd.errors import LabError
from meshd.lab import Lab
from meshd.lab.mesh import MeshLab, choose_seed
from meshd.lab.plan import LabPlan, plan_lab

nat_plans = st.builds(
    lambda sites, public, extra, nat_type: plan_lab(
        "t", sites + public + extra, "nat", sites=sites, public=public, nat_type=nat_type
    ),
    st.integers(2, 5),
    st.integers(1, 3),
    st.integers(0, 8),
    st.sampled_from(["restricted", "symmetric"]),
)


@given(nat_plans, st.integers(0, 2**32))
def test_in_a_nat_lab_every_host_joins_through_a_host_it_can_reach(
    plan: LabPlan, seed: int
) -> None:
    rng = random.Random(seed)
    names = [n.name for n in plan.nodes]  # public hosts first, as MeshLab.up takes them
    for index, name in enumerate(names[1:], start=1):
        via = choose_seed(plan, name, names[:index], rng)
        assert via in names[:index]
        joiner, seed_node = plan.node(name), plan.node(via)
        assert seed_node.public or seed_node.site == joiner.site


def test_a_site_host_joins_through_public_hosts_and_its_own_site_only() -> None:
    # n1 public; n2, n4 in s1; n3, n5 in s2.
    plan = plan_lab("t", 5, "nat", sites=2, public=1)
    earlier = ["n1", "n2", "n3", "n4"]
    seeds = {choose_seed(plan, "n5", earlier, random.Random(seed)) for seed in range(200)}
    assert seeds == {"n1", "n3"}


@given(st.integers(2, 30), st.integers(0, 2**32))
def test_in_a_flat_lab_the_choice_is_as_it_always_was(nodes: int, seed: int) -> None:
    # The same draws as the plain rng.choice(earlier) before nat labs ran meshd: a
    # seeded flat mesh (tests, benchmarks) is built exactly as before.
    plan = plan_lab("t", nodes, "flat")
    names = [n.name for n in plan.nodes]
    ours, before = random.Random(seed), random.Random(seed)
    for index in range(1, nodes):
        assert choose_seed(plan, names[index], names[:index], ours) == before.choice(names[:index])


def test_a_host_that_reaches_no_earlier_host_is_refused_by_name() -> None:
    plan = plan_lab("t", 5, "nat", sites=2, public=1)
    with pytest.raises(LabError, match=r"^n3 \(in site s2\) can reach none of .* \(n2, n4\)"):
        choose_seed(plan, "n3", ["n2", "n4"], random.Random(0))


def _mesh(tmp_path: Path, plan: LabPlan, *, nat_traversal: bool = False) -> MeshLab:
    mesh = MeshLab(Lab(plan, tmp_path))
    mesh.nat_traversal = nat_traversal  # as if the NAT plugin were (not) installed
    return mesh


def test_public_hosts_of_a_nat_lab_are_the_nat_plugins_observers(tmp_path: Path) -> None:
    mesh = _mesh(tmp_path, plan_lab("t", 4, "nat", sites=2, public=2))
    sections = {
        node.name: config.load(mesh.write_config(node)).plugin_sections for node in mesh.lab.nodes
    }
    assert sections == {
        "n1": {"nat": {"public": True}},
        "n2": {"nat": {"public": True}},
        "n3": {},
        "n4": {},
    }


def test_flat_hosts_get_no_nat_config(tmp_path: Path) -> None:
    mesh = _mesh(tmp_path, plan_lab("t", 2, "flat"))
    assert config.load(mesh.write_config("n1")).plugin_sections == {}


def test_without_nat_traversal_only_hosts_in_different_sites_miss_each_other(
    tmp_path: Path,
) -> None:
    # n1 public; n2, n4 in s1; n3 in s2.
    plan = plan_lab("t", 4, "nat", sites=2, public=1)
    mesh = _mesh(tmp_path, plan)
    missing = {
        (a.name, b.name)
        for a in plan.nodes
        for b in plan.nodes
        if a != b and not mesh.expect_mesh_reachable(a, b)
    }
    # The public host opens no tunnel into a site, but the site host opens it to n1.
    assert missing == {("n2", "n3"), ("n3", "n2"), ("n4", "n3"), ("n3", "n4")}
    with_plugin = _mesh(tmp_path, plan, nat_traversal=True)
    assert all(with_plugin.expect_mesh_reachable(a, b) for a in plan.nodes for b in plan.nodes)
