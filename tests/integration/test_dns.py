"""DNS for every member (issue 14): the dns plugin's files, real DNS servers on them,
and the plugin's own responder, in one lab of three real meshd agents.

- n1 writes only its hosts file, and ``dnsmasq`` (Debian ``dnsmasq-base``) serves that
  directory from n1's underlay address (``--hostsdir``: re-read on every change by inotify);
- n2 and n3 write all three files and answer the zone themselves on their mesh
  addresses (``serve = true``); ``knotd`` (Debian ``knot``) serves n2's zone file from
  n2's underlay address, and n2's agent reloads it (``reload = ["knotc", ...]``);
- queries come from another node with ``kdig`` (Debian ``knot-dnsutils``), zone files
  are checked with ``named-checkzone`` (``bind9-utils``) and ``kzonecheck``.

The last test makes n3 leave: it must be gone from every file and every answer.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from meshd.lab.mesh import MeshLab
from tests.integration.conftest import MESH_PROGRAMS, eventually, mesh_lab, requires_root

pytestmark = requires_root(*MESH_PROGRAMS, "dnsmasq", "knotd", "kdig", "named-checkzone")

ZONE = "lab.internal"  # the default: <network>.internal, the lab's network is "lab"
NODES = ["n1", "n2", "n3"]
N1_CONFIG = '[plugins.dns]\nfiles = ["hosts"]\nresolved = false\n'
SERVING_CONFIG = "[plugins.dns]\nserve = true\nresolved = false\n"
KNOT_CONFIG = """\
server:
    listen: {address}@53
    rundir: {run}
database:
    storage: {run}
control:
    listen: {run}/knot.sock
template:
  - id: default
    storage: {zones}
    zonefile-sync: -1
    zonefile-load: whole
    journal-content: none
zone:
  - domain: {zone}
    file: db.{zone}
"""


def knot_run_dir(mesh: MeshLab) -> Path:
    return mesh.lab.node_dir("n2") / "knot"


def config_of(mesh: MeshLab, node: str) -> str:
    """n1 writes only its hosts file; n2 and n3 serve the zone; n2 reloads knot."""
    if node == "n1":
        return N1_CONFIG
    if node == "n2":
        control = knot_run_dir(mesh) / "knot.sock"
        command = ["knotc", "-s", str(control), "zone-reload", ZONE]
        return SERVING_CONFIG + f"reload = {json.dumps(command)}\n"
    return SERVING_CONFIG


@pytest.fixture(scope="module")
def mesh() -> Iterator[MeshLab]:
    with mesh_lab(len(NODES)) as built:
        built.init("n1", extra_config=config_of(built, "n1"))
        built.start("n1")
        built.wait_ready("n1")
        for node in NODES[1:]:
            built.join(node, "n1", extra_config=config_of(built, node))
            built.start(node)
            built.wait_ready(node)
        built.wait_full_mesh(NODES)
        # dnsmasq on n1's underlay address, serving n1's export directory and nothing else.
        built.lab.spawn(
            "n1",
            [
                shutil.which("dnsmasq") or "dnsmasq",
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                f"--listen-address={built.lab.node('n1').address}",
                "--port=53",
                f"--hostsdir={dns_dir(built, 'n1')}",
                f"--local=/{ZONE}/",  # answer NXDOMAIN for the rest of the zone
                "--local-ttl=1",
                "--user=root",
                "--pid-file=",
                "--log-facility=-",
            ],
            name="dnsmasq",
        )
        # knot on n2's underlay address, serving n2's zone file (the agent reloads it).
        run = knot_run_dir(built)
        run.mkdir(mode=0o700)
        knot_conf = run / "knot.conf"
        knot_conf.write_text(
            KNOT_CONFIG.format(
                address=built.lab.node("n2").address, run=run, zones=dns_dir(built, "n2"), zone=ZONE
            )
        )
        built.lab.spawn("n2", ["knotd", "-c", str(knot_conf)], name="knotd")
        yield built


def dns_dir(mesh: MeshLab, node: str) -> Path:
    return mesh.state_dir(node) / "dns"


def addresses(mesh: MeshLab, node: str) -> list[str]:
    data = json.loads((mesh.state_dir(node) / "node.json").read_text())
    return [str(data["ipv4"]), str(data["ipv6"])]


def hosts_lines(mesh: MeshLab, node: str) -> set[str]:
    try:
        text = (dns_dir(mesh, node) / "hosts").read_text()
    except FileNotFoundError:
        return set()
    return {line for line in text.splitlines() if line and not line.startswith("#")}


def expected_lines(mesh: MeshLab, nodes: list[str]) -> set[str]:
    return {f"{a} {n}.{ZONE} {n}" for n in nodes for a in addresses(mesh, n)}


def kdig(
    mesh: MeshLab, src: str, server: str, name: str, rdtype: str, *, tries: int = 3
) -> tuple[str, list[str]]:
    """(status, answers) of one query from ``src`` to ``server`` port 53."""
    done = mesh.lab.run(
        src,
        [
            "kdig",
            f"@{server}",
            name,
            rdtype,
            f"+retry={tries - 1}",
            "+time=1",
            "+noall",
            "+header",
            "+answer",
        ],
        check=False,
        timeout=10,
    )
    found = re.search(r"status: ([A-Z]+)", done.stdout)
    answers = [
        line.split()[-1]
        for line in done.stdout.splitlines()
        if line and not line.startswith(";") and f"\t{rdtype}\t" in line.replace(" ", "\t")
    ]
    return (found.group(1) if found else f"no answer: {done.stdout} {done.stderr}"), answers


def test_every_node_writes_every_member_under_the_same_labels(mesh: MeshLab) -> None:
    everyone = expected_lines(mesh, NODES)
    views: dict[str, set[str]] = {}

    def all_written() -> bool:
        views.update({n: hosts_lines(mesh, n) for n in NODES})
        return all(view == everyone for view in views.values())

    eventually(all_written, 30, "every hosts file names all three", lambda: views)
    # What `meshd dns export` prints is what the files hold.
    for fmt, file in [("hosts", "hosts"), ("zone", f"db.{ZONE}"), ("corefile", "Corefile.meshd")]:
        printed = mesh.meshd("n2", "dns", "export", "--format", fmt).stdout
        assert printed == (dns_dir(mesh, "n2") / file).read_text(), fmt
    assert sorted(p.name for p in dns_dir(mesh, "n1").iterdir()) == ["hosts"]


def test_the_zone_file_passes_named_checkzone_and_kzonecheck(mesh: MeshLab) -> None:
    eventually(lambda: len(hosts_lines(mesh, "n2")) == 6, 30, "n2 names all three")
    zone_file = dns_dir(mesh, "n2") / f"db.{ZONE}"
    checked = mesh.lab.run("n2", ["named-checkzone", ZONE, str(zone_file)], check=False)
    print(checked.stdout.strip())
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert re.search(r"loaded serial \d+", checked.stdout)
    if shutil.which("kzonecheck"):
        checked = mesh.lab.run("n2", ["kzonecheck", "-o", ZONE, str(zone_file)], check=False)
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_responder_answers_the_zone_on_the_mesh_address(mesh: MeshLab) -> None:
    n2_mesh4, n2_mesh6 = addresses(mesh, "n2")
    n1_4, n1_6 = addresses(mesh, "n1")
    assert kdig(mesh, "n3", n2_mesh4, f"n1.{ZONE}", "A") == ("NOERROR", [n1_4])
    assert kdig(mesh, "n3", n2_mesh6, f"n1.{ZONE}", "A") == ("NOERROR", [n1_4])  # over IPv6
    assert kdig(mesh, "n3", n2_mesh4, f"N1.{ZONE}", "AAAA") == ("NOERROR", [n1_6])
    assert kdig(mesh, "n3", n2_mesh4, f"nobody.{ZONE}", "A") == ("NXDOMAIN", [])
    assert kdig(mesh, "n3", n2_mesh4, "example.com", "A")[0] == "REFUSED"
    status, soa = kdig(mesh, "n3", n2_mesh4, ZONE, "SOA")
    assert status == "NOERROR"
    assert soa  # the serial, last field of the SOA


def test_the_responder_does_not_answer_through_the_underlay(mesh: MeshLab) -> None:
    # n1 routes n2's mesh address through the LAN: Linux on n2 accepts the packet (the
    # address is local), the responder must not answer it.
    n2_mesh4, _ = addresses(mesh, "n2")
    route = [f"{n2_mesh4}/32", "via", mesh.lab.node("n2").address]
    mesh.lab.run("n1", ["ip", "route", "add", *route])
    try:
        status, _ = kdig(mesh, "n1", n2_mesh4, f"n1.{ZONE}", "A", tries=1)
    finally:
        mesh.lab.run("n1", ["ip", "route", "del", *route])
    assert status.startswith("no answer"), status
    assert kdig(mesh, "n1", n2_mesh4, f"n1.{ZONE}", "A")[0] == "NOERROR"  # through the mesh


def zone_names(mesh: MeshLab, node: str) -> set[str]:
    text = (dns_dir(mesh, node) / f"db.{ZONE}").read_text()
    return set(re.findall(r"^([a-z0-9-]+) +IN (?:A|AAAA) ", text, re.MULTILINE))


def zone_serial(mesh: MeshLab, node: str) -> int:
    text = (dns_dir(mesh, node) / f"db.{ZONE}").read_text()
    found = re.search(r"IN SOA \S+ \S+ (\d+) ", text)
    assert found, text
    return int(found.group(1))


def when_each_holds(
    checks: dict[str, Callable[[], bool]], started: float, timeout: float
) -> dict[str, float]:
    """Seconds from ``started`` until each check first held; fails naming those that never did."""
    seen: dict[str, float] = {}
    while len(seen) < len(checks):
        for what, check in checks.items():
            if what not in seen and check():
                seen[what] = time.monotonic() - started
        if time.monotonic() - started > timeout:
            pytest.fail(
                f"not true after {timeout:g} s: {', '.join(sorted(set(checks) - set(seen)))}"
            )
        time.sleep(0.05)
    return seen


def test_dnsmasq_and_knot_serve_the_export_and_a_member_that_left_is_gone(
    mesh: MeshLab,
) -> None:
    dnsmasq, knot = mesh.lab.node("n1").address, mesh.lab.node("n2").address
    n3_4, n3_6 = addresses(mesh, "n3")
    for server in (dnsmasq, knot):
        eventually(
            lambda server=server: (
                kdig(mesh, "n1", server, f"n3.{ZONE}", "A") == ("NOERROR", [n3_4])
            ),
            30,
            f"the server on {server} answers n3's address",
            lambda server=server: kdig(mesh, "n1", server, f"n3.{ZONE}", "A"),
        )
        assert kdig(mesh, "n1", server, f"n3.{ZONE}", "AAAA") == ("NOERROR", [n3_6])
    serial_before = zone_serial(mesh, "n2")

    remaining = expected_lines(mesh, ["n1", "n2"])
    # `meshd leave` returns once n3's agent has stopped; the others drop n3 as soon as
    # its goodbye arrives, before that: time it all from the command's start.
    leaving = threading.Thread(target=mesh.meshd, args=("n3", "leave"))
    started = time.monotonic()
    leaving.start()
    try:
        took = when_each_holds(
            {
                "n1's hosts file": lambda: hosts_lines(mesh, "n1") == remaining,
                "dnsmasq": lambda: kdig(mesh, "n1", dnsmasq, f"n3.{ZONE}", "A")[0] == "NXDOMAIN",
                "n2's zone file": lambda: zone_names(mesh, "n2") == {"n1", "n2"},
                "knot": lambda: kdig(mesh, "n1", knot, f"n3.{ZONE}", "A")[0] == "NXDOMAIN",
            },
            started,
            15,
        )
    finally:
        leaving.join(30)
    print(
        f"n3 gone, in seconds from the start of 'meshd leave' on n3 (which took "
        f"{time.monotonic() - started:.2f} s to return): "
        + ", ".join(f"{what} {seconds:.2f}" for what, seconds in took.items())
    )
    assert hosts_lines(mesh, "n2") == remaining
    assert zone_serial(mesh, "n2") > serial_before
    n2_mesh4, _ = addresses(mesh, "n2")
    assert kdig(mesh, "n1", n2_mesh4, f"n3.{ZONE}", "A")[0] == "NXDOMAIN"  # n2's responder


def test_revoke_by_mesh_address_and_the_revoked_name_is_gone(mesh: MeshLab) -> None:
    n2_4, _ = addresses(mesh, "n2")
    eventually(lambda: len(hosts_lines(mesh, "n1")) == 4, 10, "n1 names n1 and n2")
    done = mesh.meshd("n1", "revoke", n2_4, "--yes")
    assert done.stdout.startswith("revoked n2 (certificate "), done.stdout
    eventually(
        lambda: hosts_lines(mesh, "n1") == expected_lines(mesh, ["n1"]),
        10,
        "n2 gone from n1's hosts file",
        lambda: hosts_lines(mesh, "n1"),
    )
    nobody = mesh.meshd("n1", "revoke", "100.80.255.254", "--yes", check=False)
    assert nobody.returncode != 0
    assert "no member has the mesh address 100.80.255.254" in nobody.stderr
