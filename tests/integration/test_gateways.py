"""Gateways in a real lab: a LAN behind two mesh nodes, approval, failover, clean leave.

One shared lab of four meshd nodes: n1 holds the CA and is the far node, n2 and
n3 are gateways to a LAN (a namespace without meshd, bridged to both), n4
advertises a prefix nobody approves. The tests run in file order on it.
"""

from __future__ import annotations

import ipaddress
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from meshd.lab import netns
from meshd.lab.mesh import AGENT, MeshLab
from meshd.lab.plan import netns_name
from tests.integration.conftest import eventually, mesh_lab

pytestmark = pytest.mark.root("serf", "wireguard-go", "wg", "ping", "nft", "tcpdump")

NODES = ["n1", "n2", "n3", "n4"]
GATEWAYS = ("n2", "n3")
LAN = ipaddress.ip_network("192.168.77.0/24")
LAN_HOST = "192.168.77.10"
LAN_ADDRESS = {"n2": "192.168.77.2", "n3": "192.168.77.3"}
UNAPPROVED = ipaddress.ip_network("10.99.0.0/24")


@dataclass
class GatewayLab:
    mesh: MeshLab
    lan: str  # the LAN host's namespace

    def lan_run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return netns.run(netns.exec_argv(self.lan, list(argv)), check=check, timeout=30)


@pytest.fixture(scope="module")
def gw() -> Iterator[GatewayLab]:
    with mesh_lab(len(NODES), up=NODES, seed=13) as mesh:
        lan = netns_name(mesh.lab.lab_id, "lan")  # lab down deletes it with the rest
        netns.add_netns(lan)
        netns.ip_batch(
            lan,
            ["link set lo up", "link add br0 type bridge", "link set br0 up"]
            + [
                cmd
                for i, node in enumerate(GATEWAYS)
                for cmd in (
                    f"link add lan{i} type veth peer name lan netns {mesh.lab.netns_of(node)}",
                    f"link set lan{i} master br0",
                    f"link set lan{i} up",
                )
            ]
            + [f"addr add {LAN_HOST}/24 dev br0"],
        )
        for node in GATEWAYS:
            netns.ip_batch(
                mesh.lab.netns_of(node),
                [f"addr add {LAN_ADDRESS[node]}/24 dev lan", "link set lan up"],
            )
        yield GatewayLab(mesh, lan)


def status(mesh: MeshLab, node: str) -> dict:
    found = mesh.status(node)
    assert found is not None, f"the agent on {node} does not answer"
    return found


def routes_of(mesh: MeshLab, node: str) -> dict[tuple[str, str], dict]:
    """(gateway, prefix) -> the route as ``node``'s status shows it."""
    return {
        (peer["name"], r["prefix"]): r
        for peer in status(mesh, node)["peers"]
        for r in peer.get("routes", [])
    }


def kernel_routes(mesh: MeshLab, node: str, prefix: str) -> str:
    return mesh.lab.run(node, ["ip", "route", "show", prefix]).stdout.strip()


def allowed_ips(mesh: MeshLab, node: str) -> str:
    return mesh.lab.run(node, ["wg", "show", mesh.lab.ifname(node, "mw"), "allowed-ips"]).stdout


def reaches(mesh: MeshLab, node: str, address: str) -> bool:
    return mesh.lab.ping(node, address, deadline=1) is not None


def test_an_approved_lan_is_reached_and_an_unapproved_route_is_ignored(gw: GatewayLab) -> None:
    mesh = gw.mesh
    mesh.meshd("n2", "route", "advertise", str(LAN))
    mesh.meshd("n4", "route", "advertise", str(UNAPPROVED))
    # Advertised everywhere, approved nowhere yet: every node says so and routes nothing.
    for node in ("n1", "n3"):
        eventually(
            lambda node=node: (
                {("n2", str(LAN)), ("n4", str(UNAPPROVED))} <= set(routes_of(mesh, node))
            ),
            20,
            f"{node} sees both advertised routes",
            lambda node=node: routes_of(mesh, node),
        )
    assert not reaches(mesh, "n1", LAN_HOST)
    text = mesh.meshd("n1", "status").stdout
    assert re.search(rf"{re.escape(str(UNAPPROVED))}\s+n4\s+ignored: not approved by the CA", text)

    mesh.meshd("n1", "route", "approve", "n2", str(LAN))
    eventually(lambda: reaches(mesh, "n1", LAN_HOST), 20, "n1 pings the LAN host behind n2")
    for node in ("n1", "n4"):
        eventually(
            lambda node=node: routes_of(mesh, node)[("n2", str(LAN))]["installed"],
            20,
            f"{node} routes {LAN} to n2",
        )
    assert "n2 (this node)" in mesh.meshd("n2", "status").stdout
    # n4's route stays ignored by every other node: not in status as approved, not in
    # WireGuard's allowed IPs, no kernel route.
    for node in ("n1", "n2", "n3"):
        route = routes_of(mesh, node)[("n4", str(UNAPPROVED))]
        assert route == {"prefix": str(UNAPPROVED), "approved": False, "installed": False}
        assert str(UNAPPROVED) not in allowed_ips(mesh, node)
        assert kernel_routes(mesh, node, str(UNAPPROVED)) == ""
