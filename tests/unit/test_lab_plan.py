"""The lab's pure parts: names, the address plan, the state file (no root needed)."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.errors import LabError
from meshd.lab import Lab
from meshd.lab.plan import (
    LabPlan,
    ifname,
    lab_id_of_netns,
    netns_name,
    plan_lab,
    random_lab_id,
    validate_lab_id,
)
from tests.conftest import run_meshd

lab_ids = st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True)
node_names = st.integers(min_value=1, max_value=250).map(lambda i: f"n{i}")


@given(lab_ids, node_names, lab_ids, node_names)
def test_ifnames_differ_for_different_lab_or_node(
    lab_a: str, n_a: str, lab_b: str, n_b: str
) -> None:
    a, b = ifname(lab_a, n_a), ifname(lab_b, n_b)
    assert len(a) <= 15
    assert (a == b) == ((lab_a, n_a) == (lab_b, n_b))


@given(lab_ids, st.sampled_from(["n1", "n250", "hub", "inet", "r3"]))
def test_namespace_names_lead_back_to_their_lab(lab_id: str, member: str) -> None:
    assert lab_id_of_netns(netns_name(lab_id, member)) == lab_id


def test_prefixes_of_one_lab_do_not_catch_another() -> None:
    # "ab" must not take down "abc": ids contain no "-", the prefix ends with one.
    assert not netns_name("abc", "n1").startswith(netns_name("ab", ""))
    assert lab_id_of_netns("wgproto1") is None
    assert lab_id_of_netns("meshd-lab-UPPER-n1") is None


@pytest.mark.parametrize("bad", ["", "toolongid", "a-b", "A", "a b", "../x"])
def test_bad_lab_ids_are_refused_with_the_rule(bad: str) -> None:
    with pytest.raises(LabError, match="1-8 characters"):
        validate_lab_id(bad)


def test_random_ids_are_valid_and_differ() -> None:
    ids = {random_lab_id() for _ in range(50)}
    assert len(ids) > 45
    assert all(validate_lab_id(i) for i in ids)


def test_long_prefix_and_id_make_a_too_long_name() -> None:
    with pytest.raises(LabError, match="longer than 15"):
        ifname("abcdefgh", "n250", prefix="wgxx")


def test_flat_plan_one_subnet_no_gateway() -> None:
    plan = plan_lab("t1", 4)
    assert [n.address for n in plan.nodes] == [f"198.18.0.{i}" for i in range(1, 5)]
    assert all(n.public and n.site is None and n.gateway is None for n in plan.nodes)
    assert plan.switch == "meshd-lab-t1-hub"
    assert plan.namespaces[0] == plan.switch
    assert all(plan.expect_reachable(a, b) for a in plan.nodes for b in plan.nodes)


def test_nat_plan_public_hosts_sites_and_routers() -> None:
    plan = plan_lab("t1", 7, "nat", sites=3, public=1)
    n1, n2, n3, n4, n5 = (plan.node(f"n{i}") for i in range(1, 6))
    assert n1.public
    assert n1.address == "198.18.0.101"
    assert [n.site for n in (n2, n3, n4, n5)] == ["s1", "s2", "s3", "s1"]
    assert (n2.address, n5.address) == ("198.19.1.2", "198.19.1.3")
    assert n2.gateway == plan.router("s1").lan_address == "198.19.1.1"
    assert [r.wan_address for r in plan.routers] == ["198.18.0.1", "198.18.0.2", "198.18.0.3"]
    assert plan.expect_reachable(n2, n1)
    assert plan.expect_reachable(n2, n5)  # same site
    assert not plan.expect_reachable(n1, n2)  # into a site
    assert not plan.expect_reachable(n2, n3)  # across sites


@given(st.integers(min_value=3, max_value=250), st.integers(2, 5), st.integers(1, 3))
def test_nat_plan_addresses_are_unique_and_inside_their_networks(
    nodes: int, sites: int, public: int
) -> None:
    if nodes < sites + public:
        with pytest.raises(LabError, match="needs at least"):
            plan_lab("t1", nodes, "nat", sites=sites, public=public)
        return
    plan = plan_lab("t1", nodes, "nat", sites=sites, public=public)
    addresses = [n.address for n in plan.nodes] + [r.wan_address for r in plan.routers]
    addresses += [r.lan_address for r in plan.routers]
    assert len(set(addresses)) == len(addresses)
    for node in plan.nodes:
        net = ipaddress.ip_network("198.18.0.0/24")
        if node.site:
            net = ipaddress.ip_network(plan.router(node.site).lan_cidr)
        assert ipaddress.ip_address(node.address) in net
        assert ipaddress.ip_address(node.address) in ipaddress.ip_network("198.18.0.0/15")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nodes": 0}, "between 1 and"),
        ({"nodes": 251}, "between 1 and"),
        ({"nodes": 3, "topology": "star"}, "unknown topology"),
        ({"nodes": 2, "topology": "nat"}, "needs at least 3"),
        ({"nodes": 5, "topology": "nat", "sites": 1}, "2 to 99 sites"),
    ],
)
def test_impossible_plans_say_why(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(LabError, match=message):
        plan_lab("t1", **kwargs)  # type: ignore[arg-type]


def test_unknown_node_names_the_known_ones() -> None:
    with pytest.raises(LabError, match=r"unknown node 'n9' in lab t1 \(nodes: n1, n2\)"):
        plan_lab("t1", 2).node("n9")


@pytest.mark.parametrize("topology", ["flat", "nat"])
def test_plan_survives_a_json_round_trip(topology: str) -> None:
    plan = plan_lab("t1", 5, topology)
    assert LabPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_state_file_round_trip_through_load(tmp_path: Path) -> None:
    plan = plan_lab("t2", 3, "nat")
    directory = tmp_path / "t2"
    directory.mkdir()
    Lab(plan, directory)._write_state({"processes": []})
    loaded = Lab.load("t2", base_dir=tmp_path)
    assert loaded.plan == plan
    assert loaded.nodes[1].gateway == "198.19.1.1"
    assert loaded.processes() == []
    assert loaded.log_path("n2", "agent") == directory / "logs" / "n2.agent.log"
    assert loaded.ifname("n3") == "wgt2n3"
    assert loaded.netns_of("r2") == "meshd-lab-t2-r2"
    assert loaded.netns_of("inet") == plan.switch


def test_load_of_a_missing_or_broken_lab(tmp_path: Path) -> None:
    with pytest.raises(LabError, match="no lab 'zz'; start one with: meshd lab up --lab zz"):
        Lab.load("zz", base_dir=tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "lab.json").write_text("{not json")
    with pytest.raises(LabError, match="cannot read lab state"):
        Lab.load("bad", base_dir=tmp_path)


def test_cli_help_teaches_and_missing_lab_is_one_line(tmp_path: Path) -> None:
    helped = run_meshd("lab", "--help", env={})
    assert helped.returncode == 0
    for word in ("up", "exec", "status", "down", "--topology nat", "MESHD_LAB"):
        assert word in helped.stdout
    missing = run_meshd("lab", "status", env={"MESHD_LAB_DIR": str(tmp_path), "MESHD_LAB": "nope"})
    assert missing.returncode == 1
    # One line (other labs on this machine, if any, are named after it).
    assert missing.stderr.count("\n") == 1
    assert missing.stderr.startswith(
        "meshd: error: no lab 'nope'; start one with: meshd lab up --lab nope"
    )


def test_nat_type_is_planned_kept_and_shapes_the_ruleset() -> None:
    from meshd.lab.lab import router_ruleset

    plan = plan_lab("t1", 3, "nat", nat_type="symmetric")
    assert LabPlan.from_dict(json.loads(json.dumps(plan.to_dict()))).nat_type == "symmetric"
    assert plan_lab("t1", 3).nat_type is None
    with pytest.raises(LabError, match="unknown NAT type 'full-cone'"):
        plan_lab("t1", 3, "nat", nat_type="full-cone")
    assert 'oifname "wan" masquerade fully-random' in router_ruleset("symmetric")
    restricted = router_ruleset("restricted")
    assert 'oifname "wan" masquerade\n' in restricted
    assert restricted.count('iifname "wan" drop') == 2  # through the router and to it
