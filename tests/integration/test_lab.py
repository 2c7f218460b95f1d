"""The lab in real network namespaces: topology, reachability, NAT, teardown, CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from meshd.errors import LabError
from meshd.lab import Lab
from meshd.lab.netns import list_netns
from meshd.lab.plan import NETNS_PREFIX, netns_prefix, random_lab_id
from tests.conftest import run_meshd
from tests.integration.conftest import eventually

pytestmark = pytest.mark.root("ping", "sysctl")

LabFactory = Callable[..., Lab]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as dead: it runs nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def non_lab_namespaces() -> set[str]:
    return {n for n in list_netns() if not n.startswith(NETNS_PREFIX)}


# ---- flat ---------------------------------------------------------------


def test_cli_up_flat_four_nodes_pings_every_host_and_down_cleans_up() -> None:
    lab_id = random_lab_id()
    others = non_lab_namespaces()
    try:
        up = run_meshd("lab", "up", "--nodes", "4", "--lab", lab_id)
        assert up.returncode == 0, up.stderr
        assert "reachability" in up.stdout
        assert "FAIL" not in up.stdout
        status = json.loads(run_meshd("lab", "status", "--lab", lab_id, "--json").stdout)
        assert [n["name"] for n in status["nodes"]] == ["n1", "n2", "n3", "n4"]
        # Through `meshd lab exec`: n1 -> n4 answers, and a lab address nobody holds does not
        # (the exit code of the command is the exit code of exec).
        n4 = status["nodes"][3]["address"]
        ping = ["ping", "-c", "1", "-w", "3"]
        assert run_meshd("lab", "exec", "--lab", lab_id, "n1", "--", *ping, n4).returncode == 0
        miss = run_meshd("lab", "exec", "--lab", lab_id, "n1", "--", *ping, "198.18.0.250")
        assert miss.returncode == 1
        # Every other pair through the API.
        lab = Lab.load(lab_id)
        matrix = lab.ping_matrix()
        assert matrix["ok"], matrix["failed"]
        assert len(matrix["pairs"]) == 12
        assert all(p["reachable"] and p["rtt_ms"] is not None for p in matrix["pairs"])
    finally:
        down = run_meshd("lab", "down", "--lab", lab_id)
    assert down.returncode == 0, down.stderr
    assert f"lab {lab_id} is down" in down.stdout
    assert not [n for n in list_netns() if n.startswith(netns_prefix(lab_id))]
    assert others <= non_lab_namespaces()
    again = run_meshd("lab", "down", "--lab", lab_id)
    assert again.returncode == 0
    assert "nothing to do" in again.stdout


def test_flat_hosts_have_no_route_out(lab_factory: LabFactory) -> None:
    lab = lab_factory(nodes=2)
    routes = lab.run("n1", ["ip", "-4", "route", "show"]).stdout
    assert "default" not in routes
    # The kernel has no route to anything outside the lab (asked, nothing sent).
    lookup = lab.run("n1", ["ip", "route", "get", "192.0.2.1"], check=False)
    assert lookup.returncode != 0
    assert "unreachable" in lookup.stderr
    # The switch namespace holds the bridge; the root namespace got nothing.
    assert "br0" in lab.run("hub", ["ip", "-br", "link"]).stdout
    assert lab.run("n1", ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "0"


def test_ping_matrix_over_given_addresses_covers_only_those_hosts(
    lab_factory: LabFactory,
) -> None:
    lab = lab_factory(nodes=3)
    lab.run("n2", ["ip", "addr", "add", "10.99.0.2/32", "dev", "lo"])
    lab.run("n1", ["ip", "route", "add", "10.99.0.2/32", "via", lab.node("n2").address])
    lab.run("n2", ["ip", "route", "add", "10.99.0.1/32", "via", lab.node("n1").address])
    lab.run("n1", ["ip", "addr", "add", "10.99.0.1/32", "dev", "lo"])
    good = lab.ping_matrix({"n1": "10.99.0.1", "n2": "10.99.0.2"})
    assert good["ok"], good["failed"]
    assert {(p["src"], p["dst"]) for p in good["pairs"]} == {("n1", "n2"), ("n2", "n1")}
    # n3 has no route to those addresses: with it included, its pairs fail.
    bad = lab.ping_matrix({"n1": "10.99.0.1", "n3": lab.node("n3").address}, deadline=1)
    assert bad["failed"] == ["n3->n1"]


def test_loaded_lab_sees_the_same_plan_and_processes(lab_factory: LabFactory) -> None:
    lab = lab_factory(nodes=2)
    pid = lab.spawn("n2", ["sleep", "300"], name="sleeper")
    again = Lab.load(lab.lab_id)
    assert again.nodes == lab.nodes
    assert again.topology == "flat"
    assert [(p["name"], p["pid"], p["alive"]) for p in again.processes()] == [
        ("sleeper", pid, True)
    ]


def test_link_down_cuts_a_node_off_and_link_up_restores_it(lab_factory: LabFactory) -> None:
    lab = lab_factory(nodes=2)
    n2 = lab.node("n2").address
    assert lab.ping("n1", n2) is not None
    lab.link_down("n2")
    assert lab.ping("n1", n2, deadline=1) is None
    lab.link_up("n2")
    assert lab.ping("n1", n2, deadline=5) is not None


def test_interface_names_are_unique_per_lab(lab_factory: LabFactory) -> None:
    first, second = lab_factory(nodes=2), lab_factory(nodes=2)
    names = {lab.ifname(node) for lab in (first, second) for node in lab.nodes}
    assert len(names) == 4
    assert all(len(name) <= 15 for name in names)
    # A real interface of that name can be made in the node.
    name = first.ifname("n1", prefix="tst")
    first.run("n1", ["ip", "link", "add", name, "type", "bridge"])
    assert name in first.run("n1", ["ip", "-br", "link"]).stdout


# ---- nat ----------------------------------------------------------------

# Sends "hello" to the public host every 0.3 s from one UDP socket and prints
# every datagram it receives, with its sender.
SITE_LISTENER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 6000))
s.settimeout(0.3)
while True:
    s.sendto(b"hello", (sys.argv[1], 5000))
    try:
        data, addr = s.recvfrom(2048)
    except TimeoutError:
        continue
    print(data.decode(), addr[0], addr[1], flush=True)
"""

# Answers every datagram to the address it came from, and prints that address.
PUBLIC_ECHO = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 5000))
while True:
    data, addr = s.recvfrom(2048)
    print("from", addr[0], addr[1], flush=True)
    s.sendto(b"reply", addr)
"""

SEND_UDP = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(5):
    try:
        s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
    except OSError:
        pass
"""


def test_nat_site_host_reaches_public_host_but_nothing_reaches_in(
    lab_factory: LabFactory,
) -> None:
    lab = lab_factory(nodes=3, topology="nat")
    public, inside, elsewhere = lab.node("n1"), lab.node("n2"), lab.node("n3")
    assert public.public
    assert not inside.public
    assert inside.site != elsewhere.site
    router = lab.plan.router(inside.site or "")
    assert inside.gateway == router.lan_address

    # Outbound works, through the router: the public host sees the router's WAN address.
    lab.spawn(public, [sys.executable, "-u", "-c", PUBLIC_ECHO], name="echo")
    lab.spawn(inside, [sys.executable, "-u", "-c", SITE_LISTENER, public.address], name="listener")
    echo_log, listener_log = lab.log_path(public, "echo"), lab.log_path(inside, "listener")
    eventually(lambda: "from" in echo_log.read_text(), 20, "the public host hears the site host")
    seen = echo_log.read_text().split()
    assert seen[1] == router.wan_address, "not masqueraded"
    mapped_port = seen[2]
    eventually(lambda: "reply" in listener_log.read_text(), 20, "the reply reaches the site host")

    # Unsolicited traffic from outside, every way in:
    # the public host from another port, to the mapping the router made;
    lab.run(public, [sys.executable, "-c", SEND_UDP, router.wan_address, mapped_port, "intr-1"])
    # a host in another site, to that mapping and to the LAN address itself;
    lab.run(elsewhere, [sys.executable, "-c", SEND_UDP, router.wan_address, mapped_port, "intr-2"])
    lab.run(elsewhere, [sys.executable, "-c", SEND_UDP, inside.address, "6000", "intr-3"])
    # the public host with a route into the site through its router (a neighbour gone rogue).
    lab.run(public, ["ip", "route", "add", router.lan_cidr, "via", router.wan_address])
    lab.run(public, [sys.executable, "-c", SEND_UDP, inside.address, "6000", "intr-4"])
    assert lab.ping(public, inside.address, deadline=1) is None

    # The listener is alive and reading: replies keep arriving after the intruders'
    # datagrams were sent, so any of those that got through would be in its log by now.
    replies = listener_log.read_text().count("reply")
    eventually(
        lambda: listener_log.read_text().count("reply") >= replies + 2,
        20,
        "more replies came after the intruders",
    )
    received = listener_log.read_text()
    assert "intr" not in received, received
    # And the planned picture holds: n2 -> n1 works, nothing else crosses a NAT.
    matrix = lab.ping_matrix()
    assert matrix["ok"], matrix["failed"]
    reachable = {(p["src"], p["dst"]) for p in matrix["pairs"] if p["reachable"]}
    assert reachable == {("n2", "n1"), ("n3", "n1")}


# Prints the source port of the first datagram to reach each of two ports.
TWO_PORTS = """
import select, socket
socks = []
for port in (5000, 5001):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    socks.append(s)
seen = {}
while len(seen) < 2:
    for s in select.select(socks, [], [])[0]:
        seen[s.getsockname()[1]] = s.recvfrom(2048)[1][1]
print(seen[5000], seen[5001], flush=True)
"""

# From one socket on port 6000, to two ports of the same host.
SEND_TWO = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 6000))
for _ in range(100):
    for port in (5000, 5001):
        s.sendto(b"x", (sys.argv[1], port))
    time.sleep(0.1)
"""


@pytest.mark.parametrize("nat_type", ["restricted", "symmetric"])
def test_nat_type_decides_whether_the_mapping_depends_on_the_destination(
    lab_factory: LabFactory, nat_type: str
) -> None:
    lab = lab_factory(nodes=3, topology="nat", nat_type=nat_type)
    public, inside = lab.node("n1"), lab.node("n2")
    lab.spawn(public, [sys.executable, "-u", "-c", TWO_PORTS], name="ports")
    lab.spawn(inside, [sys.executable, "-c", SEND_TWO, public.address], name="sender")
    out = lab.log_path(public, "ports")
    eventually(lambda: len(out.read_text().split()) == 2, 20, "both ports hear the site host")
    first, second = (int(port) for port in out.read_text().split())
    if nat_type == "restricted":
        assert first == second == 6000  # one mapping for every destination, port kept
    else:
        assert first != second  # a new random port per destination


def test_nat_routers_forward_and_hosts_do_not(lab_factory: LabFactory) -> None:
    lab = lab_factory(nodes=4, topology="nat", sites=2)
    forwarding = lambda name: lab.run(name, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip()  # noqa: E731
    assert forwarding("r1") == "1"
    assert forwarding("r2") == "1"
    assert forwarding("n2") == "0"
    assert forwarding("inet") == "0"
    # Same-site hosts talk directly on their LAN.
    site = [n for n in lab.nodes if n.site == "s1"]
    assert len(site) == 2
    assert lab.ping(site[0], site[1].address) is not None


# ---- teardown -----------------------------------------------------------


def test_down_removes_namespaces_processes_and_files(lab_factory: LabFactory) -> None:
    others = non_lab_namespaces()
    lab = lab_factory(nodes=3, topology="nat")
    prefix = netns_prefix(lab.lab_id)
    assert len([n for n in list_netns() if n.startswith(prefix)]) == 6
    sleeper = lab.spawn("n1", ["sleep", "300"], name="sleeper")
    # A grandchild nobody recorded is found through its namespace.
    pidfile = lab.node_dir("n2") / "bg.pid"
    lab.spawn("n2", ["sh", "-c", f"sleep 300 & echo $! > {pidfile}; wait"], name="bg")
    eventually(lambda: pidfile.exists() and pidfile.read_text().strip() != "", 20, "the pid file")
    grandchild = int(pidfile.read_text())
    assert alive(sleeper)
    assert alive(grandchild)

    lab.down()
    assert not [n for n in list_netns() if n.startswith(prefix)]
    assert others <= non_lab_namespaces()
    assert not alive(sleeper)
    eventually(lambda: not alive(grandchild), 5, "the grandchild is gone")
    assert not lab.dir.exists()
    lab.down()  # idempotent
    assert Lab.down_by_id(lab.lab_id) is False


def test_down_by_id_after_a_crash_without_state_file(lab_factory: LabFactory) -> None:
    lab = lab_factory(nodes=2)
    sleeper = lab.spawn("n2", ["sleep", "300"], name="sleeper")
    shutil.rmtree(lab.dir)  # the crash took the state with it
    with pytest.raises(LabError, match="no lab"):
        Lab.load(lab.lab_id)
    assert Lab.down_by_id(lab.lab_id) is True
    assert not [n for n in list_netns() if n.startswith(netns_prefix(lab.lab_id))]
    # The sleeper was our child: it is dead, waiting to be reaped.
    os.waitpid(sleeper, 0)
    assert not alive(sleeper)


def test_down_by_id_after_a_killed_up() -> None:
    # What a `lab up` killed half-way leaves: some namespaces, a bridge, no state at all.
    lab_id = random_lab_id()
    prefix = netns_prefix(lab_id)
    made = [f"{prefix}hub", f"{prefix}n1"]
    try:
        for name in made:
            subprocess.run(["ip", "netns", "add", name], check=True)
        subprocess.run(["ip", "-n", made[0], "link", "add", "br0", "type", "bridge"], check=True)
        assert Lab.down_by_id(lab_id) is True
        assert not [n for n in list_netns() if n.startswith(prefix)]
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


def test_down_after_kill_9_of_a_real_up() -> None:
    # Wherever the kill lands (before, during or after the build), down cleans up.
    lab_id = random_lab_id()
    up = subprocess.Popen(
        [sys.executable, "-m", "meshd", "lab", "up", "--nodes", "20", "--lab", lab_id],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert up.stdout is not None
        assert "namespaces" in up.stdout.readline() + up.stdout.readline()
        up.kill()
    finally:
        up.wait()
        up.stdout.close()  # type: ignore[union-attr]
    assert [n for n in list_netns() if n.startswith(netns_prefix(lab_id))]
    assert Lab.down_by_id(lab_id) is True
    assert not [n for n in list_netns() if n.startswith(netns_prefix(lab_id))]


def test_two_creates_of_one_id_race_and_one_wins_intact() -> None:
    lab_id = random_lab_id()
    results: list[object] = []

    def create() -> None:
        try:
            results.append(Lab.create(nodes=3, lab_id=lab_id))
        except LabError as exc:
            results.append(exc)

    threads = [threading.Thread(target=create) for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        labs = [r for r in results if isinstance(r, Lab)]
        errors = [str(r) for r in results if isinstance(r, LabError)]
        assert len(labs) == 1, errors
        assert len(errors) == 1
        assert "already exists" in errors[0]
        assert labs[0].ping_matrix()["ok"]
    finally:
        Lab.down_by_id(lab_id)


def test_create_refuses_an_existing_lab_and_leaves_it_alone(lab_factory: LabFactory) -> None:
    lab = lab_factory(nodes=2)
    with pytest.raises(LabError, match="already exists"):
        Lab.create(nodes=2, lab_id=lab.lab_id)
    assert lab.ping("n1", lab.node("n2").address) is not None


def test_context_manager_downs_on_exit() -> None:
    with Lab.create(nodes=2) as lab:
        prefix = netns_prefix(lab.lab_id)
        assert [n for n in list_netns() if n.startswith(prefix)]
    assert not [n for n in list_netns() if n.startswith(prefix)]
