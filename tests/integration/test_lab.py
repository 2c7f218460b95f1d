"""The lab in real network namespaces: topology, reachability, NAT, teardown."""

from __future__ import annotations

import pytest

from meshd.lab import Lab

pytestmark = pytest.mark.root("ping")


def test_flat_every_host_pings_every_other(lab_factory) -> None:
    lab = lab_factory(nodes=4)
    assert [n.name for n in lab.nodes] == ["n1", "n2", "n3", "n4"]
    matrix = lab.ping_matrix()
    assert matrix["ok"], matrix["failed"]
    assert len(matrix["pairs"]) == 12
    assert all(p["reachable"] for p in matrix["pairs"])


def test_flat_hosts_have_no_route_out(lab_factory) -> None:
    lab = lab_factory(nodes=2)
    routes = lab.run("n1", ["ip", "-4", "route", "show"]).stdout
    assert "default" not in routes
    # The kernel has no route to anything outside the lab (asked, nothing sent).
    lookup = lab.run("n1", ["ip", "route", "get", "192.0.2.1"], check=False)
    assert lookup.returncode != 0
    assert "unreachable" in lookup.stderr


def test_loaded_lab_sees_the_same_plan(lab_factory) -> None:
    lab = lab_factory(nodes=2)
    again = Lab.load(lab.lab_id)
    assert again.nodes == lab.nodes
    assert again.topology == "flat"
