"""Gateways in a real lab: a LAN behind two mesh nodes, approval, failover, clean leave.

One shared lab of four meshd nodes: n1 holds the CA and is the far node, n2 and
n3 are gateways to a LAN (a namespace without meshd, bridged to both), n4
advertises a prefix nobody approves. The tests run in file order on it.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from meshd.lab import netns
from meshd.lab.mesh import AGENT, MeshLab
from meshd.lab.plan import netns_name
from tests.integration.conftest import eventually, mesh_lab, wg_peers

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
    initial: dict[str, dict[str, str]]  # traces() of each gateway before it was one

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
        yield GatewayLab(mesh, lan, {node: traces(mesh, node) for node in GATEWAYS})


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


def route_state(
    mesh: MeshLab, node: str, gateway: str, prefix: ipaddress.IPv4Network, key: str
) -> bool:
    """``approved`` or ``installed`` of a route in ``node``'s status; False while it is not
    listed there yet (gossip has not brought it)."""
    return bool(routes_of(mesh, node).get((gateway, str(prefix)), {}).get(key))


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
            lambda node=node: route_state(mesh, node, "n2", LAN, "installed"),
            20,
            f"{node} routes {LAN} to n2",
        )
    assert "n2 (this node)" in mesh.meshd("n2", "status").stdout
    # No WireGuard endpoint inside the routed LAN: n3 publishes its LAN address too, and
    # a tunnel to it through n2's tunnel would carry n3's traffic only while n2 lives.
    for node in ("n1", "n4"):
        out = mesh.lab.run(node, ["wg", "show", mesh.lab.ifname(node, "mw"), "endpoints"]).stdout
        pairs = [line.split() for line in out.splitlines()]
        hosts = [p[1].rsplit(":", 1)[0].strip("[]") for p in pairs if len(p) == 2]
        inside = [h for h in hosts if h != "(none)" and ipaddress.ip_address(h) in LAN]
        assert inside == [], f"{node} reaches members through the LAN it routes: {out}"
    # n4's route stays ignored by every other node: not in status as approved, not in
    # WireGuard's allowed IPs, no kernel route.
    eventually(lambda: ("n4", str(UNAPPROVED)) in routes_of(mesh, "n2"), 10, "n2 sees n4's route")
    for node in ("n1", "n2", "n3"):
        route = routes_of(mesh, node)[("n4", str(UNAPPROVED))]
        assert route == {"prefix": str(UNAPPROVED), "approved": False, "installed": False}
        assert str(UNAPPROVED) not in allowed_ips(mesh, node)
        assert kernel_routes(mesh, node, str(UNAPPROVED)) == ""


def gateway_keys(mesh: MeshLab) -> dict[str, str]:
    return {n: status(mesh, n)["node"]["public_key"] for n in GATEWAYS}


def carried_by(mesh: MeshLab, node: str) -> set[str]:
    """The gateways whose LAN route ``node`` has installed."""
    return {
        gw
        for (gw, prefix), r in routes_of(mesh, node).items()
        if prefix == str(LAN) and r["installed"]
    }


class Pinger:
    """``ping -i 0.2`` from a node, each reply's arrival time kept."""

    def __init__(self, mesh: MeshLab, node: str, address: str) -> None:
        argv = ["stdbuf", "-oL", "ping", "-n", "-D", "-i", "0.2", "-W", "1", address]
        self.proc = subprocess.Popen(
            netns.exec_argv(mesh.lab.netns_of(node), argv), stdout=subprocess.PIPE, text=True
        )
        self.replies: list[float] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            found = re.match(r"\[(\d+\.\d+)\] \d+ bytes from", line)
            if found:
                self.replies.append(float(found.group(1)))

    def stop(self) -> float:
        """Stop; the longest time between two replies (seconds)."""
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=10)
        self._reader.join(timeout=10)
        assert len(self.replies) > 2, "ping got almost no replies"
        return max(b - a for a, b in itertools.pairwise(self.replies))


def test_two_gateways_fail_over_within_five_seconds_and_come_back(gw: GatewayLab) -> None:
    mesh = gw.mesh
    mesh.meshd("n3", "route", "advertise", str(LAN))
    # By its mesh address: every command that takes a node takes either (issue 14).
    mesh.meshd("n1", "route", "approve", mesh.mesh_address("n3"), str(LAN))
    keys = gateway_keys(mesh)
    primary = min(GATEWAYS, key=keys.__getitem__)
    standby = max(GATEWAYS, key=keys.__getitem__)
    # The standby keeps source addresses: the LAN host routes the mesh back through it.
    mesh.write_config(standby, "[plugins.gateway]\nmasquerade = false\n")
    mesh.lab.kill(standby, AGENT, signal.SIGHUP)
    gw.lan_run("ip", "route", "add", mesh.cidr, "via", LAN_ADDRESS[standby])
    for node in ("n1", "n4"):
        eventually(
            lambda node=node: (
                carried_by(mesh, node) == {primary}
                and route_state(mesh, node, standby, LAN, "approved")
            ),
            20,
            f"{node} uses {primary} as the primary and knows {standby} is approved",
            lambda node=node: routes_of(mesh, node),
        )
    # n1 (the CA) knows the grant at once, the gateway itself only when gossip brings it
    # and its next pass turns forwarding on: wait for the path, not for n1's view alone.
    took_path = eventually(
        lambda: reaches(mesh, "n1", LAN_HOST),
        10,
        f"n1 pings the LAN host through {primary}",
        lambda: diagnose(mesh, gw, primary),
    )
    print(f"the LAN behind {primary} answered n1 {took_path:.1f} s after n1 and n4 routed it")

    pinger = Pinger(mesh, "n1", LAN_HOST)
    try:
        eventually(lambda: len(pinger.replies) >= 3, 10, "pings through the primary")
        mesh.stop(primary, sig=signal.SIGKILL)
        took = eventually(
            lambda: carried_by(mesh, "n1") == {standby}, 20, f"n1 moves {LAN} to {standby}"
        )
        since = len(pinger.replies)
        eventually(
            lambda: len(pinger.replies) >= since + 5,
            10,
            "pings through the standby",
            lambda: diagnose(mesh, gw, standby),
        )
        # The standby does not masquerade: the LAN host sees the far node's mesh address.
        n1_address = mesh.mesh_address("n1")
        capture = ["timeout", "10", "tcpdump", "-n", "-l", "-c", "1", "-i", "br0"]
        seen = gw.lan_run(*capture, f"icmp and src host {n1_address}")
        assert n1_address in seen.stdout
    finally:
        gap = pinger.stop()
    print(
        f"failover: n1 switched {LAN} to {standby} {took:.1f} s after the primary's agent "
        f"was killed; longest gap between ping replies {gap:.2f} s"
    )
    assert gap < 5.0

    # Back, with a health check of its LAN side (the meshd_route_health hook).
    mesh.write_config(primary, f'[plugins.gateway]\nhealth_check = ["{LAN_HOST}"]\n')
    mesh.start(primary)
    mesh.wait_ready(primary)
    eventually(lambda: carried_by(mesh, "n1") == {primary}, 30, f"{LAN} back on {primary}")
    eventually(lambda: reaches(mesh, "n1", LAN_HOST), 10, "n1 reaches the LAN through it again")

    # Its LAN side goes down: it withdraws the route, the others fail over; and back.
    mesh.lab.run(primary, ["ip", "link", "set", "lan", "down"])
    took = eventually(lambda: carried_by(mesh, "n1") == {standby}, 20, "failover on health")
    print(f"health check: {primary}'s LAN down, n1 moved {LAN} to {standby} after {took:.1f} s")
    assert reaches(mesh, "n1", LAN_HOST)
    mesh.lab.run(primary, ["ip", "link", "set", "lan", "up"])
    eventually(lambda: carried_by(mesh, "n1") == {primary}, 20, f"{LAN} back after its LAN")


INTERNET_HOST = "203.0.113.10"


def test_an_exit_node_carries_only_a_node_that_opts_in(gw: GatewayLab) -> None:
    mesh = gw.mesh
    exit_node = max(GATEWAYS, key=gateway_keys(mesh).__getitem__)
    www = netns_name(mesh.lab.lab_id, "www")  # "the internet", behind the exit node only
    netns.add_netns(www)
    netns.ip_batch(
        www,
        [
            "link set lo up",
            f"link add up0 type veth peer name www netns {mesh.lab.netns_of(exit_node)}",
            f"addr add {INTERNET_HOST}/24 dev up0",
            "link set up0 up",
            f"route add {mesh.cidr} via 203.0.113.1",  # this exit node keeps source addresses
        ],
    )
    netns.ip_batch(
        mesh.lab.netns_of(exit_node), ["addr add 203.0.113.1/24 dev www", "link set www up"]
    )
    mesh.meshd(exit_node, "route", "advertise", "0.0.0.0/0")
    mesh.meshd("n1", "route", "approve", exit_node, "0.0.0.0/0")
    eventually(
        lambda: route_state(mesh, "n4", exit_node, ipaddress.ip_network("0.0.0.0/0"), "approved"),
        20,
        f"n4 sees {exit_node}'s approved default route",
    )
    # Approved, but nobody uses an exit node without opting in.
    for node in ("n1", "n4"):
        assert not reaches(mesh, node, INTERNET_HOST)
        assert "0.0.0.0/0" not in allowed_ips(mesh, node)

    used = mesh.meshd("n4", "exit", "use", mesh.mesh_address(exit_node))
    assert f"using {exit_node} as the exit node" in used.stdout
    eventually(lambda: reaches(mesh, "n4", INTERNET_HOST), 20, f"n4 reaches {INTERNET_HOST}")
    assert not reaches(mesh, "n1", INTERNET_HOST)
    iface = mesh.lab.ifname("n4", "mw")
    # Anything else goes into the mesh; WireGuard's own (marked) packets never do.
    assert f"dev {iface}" in mesh.lab.run("n4", ["ip", "route", "get", "192.0.2.1"]).stdout
    marked = mesh.lab.run("n4", ["ip", "route", "get", "192.0.2.1", "mark", "0x6d65"], check=False)
    assert iface not in marked.stdout
    # Its WireGuard sessions stay up: every other node still answers through the mesh.
    for node in ("n1", "n2", "n3"):
        assert reaches(mesh, "n4", mesh.mesh_address(node)), f"n4 lost {node}"

    mesh.meshd("n4", "exit", "off")
    eventually(lambda: not reaches(mesh, "n4", INTERNET_HOST), 20, "n4 off the exit node")
    eventually(
        lambda: "30800" not in mesh.lab.run("n4", ["ip", "rule"]).stdout,
        10,
        "n4's exit routing rules are gone",
    )


def addresses_of_client(found: dict) -> str:
    return next(c["address"] for c in found["node"]["clients"] if c["name"] == "phone")


def test_a_plain_wireguard_client_reaches_every_node_until_removed(gw: GatewayLab) -> None:
    mesh = gw.mesh
    gateway = "n4"
    # n4 routes for nobody now: only its client will make it forward. (The route tests
    # before this one leave it advertising a prefix; run alone, it advertises none.)
    if (gateway, str(UNAPPROVED)) in routes_of(mesh, "n1"):
        mesh.meshd(gateway, "route", "withdraw", str(UNAPPROVED))
    eventually(
        lambda: traces(mesh, gateway)["ip_forward"] == "0", 10, f"{gateway} stops forwarding"
    )
    client = netns_name(mesh.lab.lab_id, "phone")  # wg and wg-quick only, no meshd
    netns.add_netns(client)
    netns.ip_batch(
        client,
        [
            "link set lo up",
            f"link add up0 type veth peer name phone netns {mesh.lab.netns_of(gateway)}",
            "addr add 192.168.99.2/24 dev up0",
            "link set up0 up",
            "route add default via 192.168.99.1",
        ],
    )
    netns.ip_batch(
        mesh.lab.netns_of(gateway), ["addr add 192.168.99.1/24 dev phone", "link set phone up"]
    )
    added = mesh.meshd("n1", "client", "add", "phone", "--gateway", gateway, "--qr")
    assert "PrivateKey = " in added.stdout
    assert "\u2588" in added.stderr  # the QR code, in block characters
    # wg-quick names the interface after the file, and wireguard-go's UAPI socket
    # (/var/run/wireguard/<ifname>.sock) is shared by every namespace: a fixed "phone0"
    # collided with a second test run's on this machine ("Cannot find device").
    conf = mesh.lab.node_dir("n1") / f"{mesh.lab.ifname('n1', 'ph')}.conf"
    conf.write_text(added.stdout)
    conf.chmod(0o600)
    netns.run(
        netns.exec_argv(
            client,
            ["env", "WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go", "wg-quick", "up", str(conf)],
        )
    )
    addresses = mesh.mesh_addresses()

    def client_reaches(address: str) -> bool:
        done = netns.run(
            netns.exec_argv(client, ["ping", "-c", "1", "-W", "1", address]), check=False
        )
        return done.returncode == 0

    for node, address in addresses.items():
        eventually(lambda a=address: client_reaches(a), 20, f"the client pings {node}")
    listed = mesh.meshd("n1", "client", "list").stdout
    assert f"phone  {addresses_of_client(status(mesh, 'n1'))}  via {gateway}" in listed

    key = next(c["public_key"] for c in status(mesh, "n1")["node"]["clients"])
    mesh.meshd("n1", "client", "remove", "phone")
    took = eventually(lambda: key not in wg_peers(mesh, gateway), 5, f"{gateway} drops the client")
    print(f"client removed: gone from its gateway after {took:.1f} s")
    for node, address in addresses.items():
        assert not client_reaches(address), f"the removed client still reaches {node}"


def diagnose(mesh: MeshLab, gw: GatewayLab, standby: str) -> str:
    out = []
    for node, argv in [
        ("n1", ["wg", "show", mesh.lab.ifname("n1", "mw"), "allowed-ips"]),
        ("n1", ["ip", "route", "get", LAN_HOST]),
        (standby, ["wg", "show", mesh.lab.ifname(standby, "mw")]),
        (standby, ["ip", "route"]),
        (standby, ["nft", "list", "ruleset"]),
        (standby, ["sysctl", "net.ipv4.ip_forward"]),
    ]:
        out.append(f"--- {node}: {' '.join(argv)}\n" + mesh.lab.run(node, argv, check=False).stdout)
    out.append(gw.lan_run("ip", "route", check=False).stdout)
    return "\n".join(out)


def traces(mesh: MeshLab, node: str) -> dict[str, str]:
    """What meshd may leave on a node: nftables tables, forwarding sysctls, its routes."""
    run = functools.partial(mesh.lab.run, node)
    return {
        "nft tables": run(["nft", "list", "tables"]).stdout.strip(),
        "ip_forward": run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip(),
        "ipv6 forwarding": run(["sysctl", "-n", "net.ipv6.conf.all.forwarding"]).stdout.strip(),
        "meshd routes": (
            run(["ip", "route", "show", "proto", "109"]).stdout
            + run(["ip", "-6", "route", "show", "proto", "109"]).stdout
        ).strip(),
    }


def test_leave_on_a_gateway_leaves_no_table_sysctl_or_route(gw: GatewayLab) -> None:
    mesh = gw.mesh
    gateway = min(GATEWAYS, key=gateway_keys(mesh).__getitem__)  # masquerading, restarted
    eventually(lambda: "meshd-gateway" in traces(mesh, gateway)["nft tables"], 10, "its table")
    before = traces(mesh, gateway)
    print(f"{gateway} before leave: {before}")
    assert before["ip_forward"] == "1"
    assert "meshd-gateway" in before["nft tables"]
    mesh.meshd(gateway, "leave")
    after = traces(mesh, gateway)
    print(f"{gateway} after leave: {after}")
    assert "meshd" not in after["nft tables"]
    initial = gw.initial[gateway]
    print(f"{gateway} before it was a gateway: {initial}")
    assert (after["ip_forward"], after["ipv6 forwarding"]) == (
        initial["ip_forward"],
        initial["ipv6 forwarding"],
    )
    assert after["meshd routes"] == ""
    # The others move the LAN to the remaining gateway.
    other = next(n for n in GATEWAYS if n != gateway)
    eventually(lambda: carried_by(mesh, "n1") == {other}, 20, f"n1 moves {LAN} to {other}")
