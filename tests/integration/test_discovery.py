"""LAN discovery with zeroconf (issue 14): ``meshd join --discover`` and LAN paths.

The flat lab is one LAN (one bridge; mDNS, 224.0.0.251, passes it like any link-local
multicast). Its hosts:

    n1  seed of network "lab" (agent running, zeroconf advertising)
    n2  first node of network "other" (made at once, its agent started by a test)
    n3  joins "lab" with --discover
    n4  joins "other" with --discover: first with no seed of "other" on the LAN, then
        with only a forged one, then with "lab"'s seeds, "other"'s seed and the forged
        one all advertising
    n5  not a member of anything: publishes a forged advert for "other" and answers
        enrolment like a seed that admits everyone (tests/integration/forged_seed.py)

The nat lab (two sites, the fewest the lab builds): n1 public; n2, n4, n6 in site 1
behind a NAT router (n3, n5 in site 2 stay idle); n6 runs without the zeroconf plugin,
so one status shows the NAT plugin's LAN path (n2 -> n6) beside zeroconf's (n2 -> n4).
Last, a forger on n6 claims n4 is at an address nobody reaches: n2 tries it and leaves it.
"""

from __future__ import annotations

import ipaddress
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import pytest

from meshd.lab.mesh import WIREGUARD_PORT, MeshLab
from meshd.mdns import ca_fingerprint
from meshd.pki.token import parse_token
from tests.integration.conftest import MESH_PROGRAMS, eventually, mesh_lab, requires_root, wg_peers

pytestmark = requires_root(*MESH_PROGRAMS)

FORGED_SEED = Path(__file__).with_name("forged_seed.py")
HEARD = "heard on this LAN by mDNS"  # the reason meshd_zeroconf gives its LAN paths


class Flat:
    """The flat lab and the two networks on it."""

    def __init__(self, mesh: MeshLab) -> None:
        self.mesh = mesh
        self.lab = mesh.lab
        self.other = MeshLab(mesh.lab, network="other", cidr="100.90.0.0/16")

    def token(self, first: str) -> Path:
        return self.mesh.state_dir(first) / "join-token"

    def join_discover(
        self, node: str, token: Path, *extra: str
    ) -> tuple[CompletedProcess[str], float]:
        """``meshd join --discover`` on ``node`` (no seed address); its output and duration."""
        copy = self.mesh.token_path(node)
        shutil.copyfile(token, copy)
        copy.chmod(0o600)
        self.mesh.write_config(node)
        started = time.monotonic()
        done = self.mesh.meshd(
            node,
            "join",
            "--discover",
            "--token-file",
            str(copy),
            "--endpoint",
            self.mesh.endpoint(node),
            "--no-start",
            *extra,
            check=False,
        )
        return done, time.monotonic() - started

    def advertising(self, node: str) -> bool:
        """Whether ``node``'s agent has published its advert (meshd_zeroconf logs it)."""
        log = self.lab.log_path(node, "agent")
        return log.exists() and "meshd_zeroconf: mDNS on" in log.read_text(errors="replace")

    def log(self, node: str, name: str) -> str:
        path = self.lab.log_path(node, name)
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture(scope="module")
def flat() -> Iterator[Flat]:
    with mesh_lab(5) as mesh:
        lab = Flat(mesh)
        mesh.init("n1")
        mesh.start("n1")
        mesh.wait_ready("n1")
        lab.other.init("n2")
        eventually(lambda: lab.advertising("n1"), 10, "n1 advertises on the LAN")
        yield lab


def peer_row(mesh: MeshLab, node: str, peer: str) -> dict[str, Any] | None:
    status = mesh.status(node)
    rows = [] if status is None else [p for p in status["peers"] if p["name"] == peer]
    return rows[0] if rows else None


def test_join_discover_finds_the_seed_without_an_address(flat: Flat) -> None:
    mesh = flat.mesh
    done, took = flat.join_discover("n3", flat.token("n1"))
    print(f"meshd join --discover took {took:.2f} s:\n{done.stderr}")
    assert done.returncode == 0, done.stderr
    assert "meshd: found seed n1 at 198.18.0.1:51821" in done.stderr
    assert "joined network lab" in done.stdout
    assert "through n1" in done.stdout
    mesh.start("n3")
    mesh.wait_ready("n3")
    eventually(
        lambda: flat.lab.ping("n3", mesh.mesh_address("n1"), deadline=1) is not None,
        15,
        "n3 pings n1 through the mesh",
    )

    # Both see each other on the LAN by mDNS and say so.
    def lan_path(node: str, peer: str) -> bool:
        row = peer_row(mesh, node, peer)
        return row is not None and (row["path"], row["path_reason"]) == ("direct (LAN)", HEARD)

    eventually(lambda: lan_path("n3", "n1") and lan_path("n1", "n3"), 10, "LAN paths by mDNS")
    row = peer_row(mesh, "n1", "n3")
    assert row is not None
    assert row["endpoint"] == f"{flat.lab.node('n3').address}:{WIREGUARD_PORT}"


def test_with_no_seed_of_its_network_on_the_lan_join_discover_says_so(flat: Flat) -> None:
    # "other"'s only seed (n2) is not running; "lab"'s seeds are, and are not taken.
    done, _took = flat.join_discover("n4", flat.token("n2"), "--discover-timeout", "1")
    assert done.returncode == 1, done.stdout
    assert "meshd: error: no seed of network other (" in done.stderr
    assert "answered on the LAN within 1 s; give a seed's address" in done.stderr
    assert not (flat.mesh.state_dir("n4") / "node.json").exists()


def test_a_forged_advert_alone_gets_nobody_in(flat: Flat) -> None:
    # "other"'s only seed (n2) is not running: the only seed of "other" on the LAN is the
    # forged one on n5, which claims the network id and CA fingerprint of "other".
    token = parse_token(flat.token("n2").read_text().strip(), int(time.time()))
    n5 = flat.lab.node("n5")
    argv = [sys.executable, str(FORGED_SEED), n5.address, token.network_id]
    forger_token = flat.lab.node_dir("n5") / "forger-knows"
    shutil.copyfile(flat.token("n2"), forger_token)
    forger_token.chmod(0o600)
    argv += [ca_fingerprint(token.ca_public_key), str(forger_token)]
    flat.lab.spawn("n5", argv, name="forged")
    eventually(lambda: "ready" in flat.log("n5", "forged"), 10, "the forged seed advertises")

    done, _took = flat.join_discover("n4", flat.token("n2"))
    print(done.stderr)
    assert done.returncode == 1, done.stdout
    assert f"meshd: found seed forged at {n5.address}:51821" in done.stderr
    # The forged seed knows the gossip key, so the handshake reached its proof of
    # membership: a certificate of another CA. The joiner checked it against the
    # token's CA and refused before saying anything of itself.
    assert f"seed {n5.address}:51821 is not a member of network {token.network_id}" in (done.stderr)
    assert "enrolment request from" not in flat.log("n5", "forged")
    assert not (flat.mesh.state_dir("n4") / "node.json").exists()


def test_with_two_networks_on_the_lan_it_joins_the_one_of_its_token(flat: Flat) -> None:
    # On the LAN now: "lab"'s seeds n1 and n3, the forged seed on n5 and "other"'s n2.
    other = flat.other
    other.start("n2")
    other.wait_ready("n2")
    eventually(lambda: flat.advertising("n2"), 10, "n2 advertises on the LAN")

    done, took = flat.join_discover("n4", flat.token("n2"))
    print(f"meshd join --discover took {took:.2f} s:\n{done.stderr}")
    assert done.returncode == 0, done.stderr
    assert "joined network other" in done.stdout
    assert "through n2" in done.stdout
    other.start("n4")
    other.wait_ready("n4")
    eventually(
        lambda: flat.lab.ping("n4", other.mesh_address("n2"), deadline=1) is not None,
        15,
        "n4 pings n2 through the mesh of 'other'",
    )
    # Each network kept to itself, and the forged seed is nobody's peer.
    n2_key = other.status("n2")["node"]["public_key"]  # type: ignore[index]
    n4_key = other.status("n4")["node"]["public_key"]  # type: ignore[index]
    assert wg_peers(other, "n4") == {n2_key}
    assert wg_peers(other, "n2") == {n4_key}
    assert n4_key not in wg_peers(flat.mesh, "n1")


@pytest.fixture(scope="module")
def nat_site() -> Iterator[MeshLab]:
    """n1 public; n2, n4, n6 in site 1 (n6 without the zeroconf plugin); n3, n5 idle."""
    with mesh_lab(6, topology="nat", sites=2, public=1) as mesh:
        assert {n.name for n in mesh.lab.nodes if n.site == "s1"} == {"n2", "n4", "n6"}
        mesh.init("n1")
        mesh.start("n1")
        mesh.wait_ready("n1")
        for node, extra in (("n2", ""), ("n4", ""), ("n6", '[plugins]\ndisable = ["zeroconf"]\n')):
            mesh.join(node, "n1", extra_config=extra)
            mesh.start(node)
            mesh.wait_ready(node)
        mesh.wait_full_mesh(["n1", "n2", "n4", "n6"], timeout=30)
        yield mesh


def test_two_members_of_one_nat_site_reach_each_other_on_the_lan(nat_site: MeshLab) -> None:
    lab = nat_site.lab
    lan = {n: f"{lab.node(n).address}:{WIREGUARD_PORT}" for n in ("n2", "n4", "n6")}
    seen: dict[str, Any] = {}

    def shows(node: str, peer: str, reason: str | None) -> bool:
        row = peer_row(nat_site, node, peer)
        seen[f"{node}->{peer}"] = row and (row["path"], row["path_reason"], row["endpoint"])
        return seen[f"{node}->{peer}"] == ("direct (LAN)", reason, lan[peer])

    # zeroconf on both ends: n2 and n4 hear each other's adverts.
    by_mdns = eventually(
        lambda: shows("n2", "n4", HEARD) and shows("n4", "n2", HEARD),
        15,
        "n2 and n4 on each other's LAN endpoint, by mDNS",
        lambda: seen,
    )
    # n6 has no zeroconf: the NAT plugin alone puts the pair on the LAN endpoint (both
    # behind the same reflexive address), not a hairpin through the router. It needs
    # both reflexive endpoints; with one public observer that has no session yet at
    # the first ask, the next ask is 10 s later (meshd_nat OBSERVE_SINGLE): seen at
    # about 15 s after the mesh is up. Until then the engine's default path already
    # aims at the LAN address (the first endpoint of a record without a reflexive one).
    by_nat = eventually(
        lambda: shows("n2", "n6", None) and shows("n6", "n2", None),
        30,
        "n2 and n6 on each other's LAN endpoint, by the NAT plugin",
        lambda: seen,
    )
    for src, dst in (("n2", "n4"), ("n2", "n6")):
        assert lab.ping(src, nat_site.mesh_address(dst), deadline=3) is not None, f"{src}->{dst}"
    print(f"paths seen: {seen}; waited {by_mdns:.1f} s (mDNS), then {by_nat:.1f} s (NAT plugin)")


def test_a_forged_lan_advert_for_a_member_is_tried_then_left(nat_site: MeshLab) -> None:
    # n4 gets an address of the site LAN that no one can reach: on its loopback
    # interface, with ARP answered only for an interface's own addresses (its record
    # publishes it like any address outside 127/8). A forger on the site LAN claims
    # n4's key is there, under an instance name that sorts first. n2 takes the hint (the
    # address is on its link), sends into the void, hears nothing back from there, and
    # leaves it for n4's own advert. (An address off n2's links is not even tried.)
    lab = nat_site.lab
    lan = ipaddress.ip_interface(lab.node("n4").cidr).network
    void = str(lan.network_address + 250)
    lab.run("n4", ["sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=1"])
    lab.run("n4", ["ip", "addr", "add", f"{void}/32", "dev", "lo"])
    token = parse_token(
        (nat_site.state_dir("n1") / "join-token").read_text().strip(), int(time.time())
    )
    n4_key = nat_site.status("n4")["node"]["public_key"]  # type: ignore[index]
    argv = [sys.executable, str(FORGED_SEED), "--member", lab.node("n6").address]
    argv += [token.network_id, ca_fingerprint(token.ca_public_key), n4_key, void]
    lab.spawn("n6", argv, name="forged")
    log = lab.log_path("n2", "agent")
    gave_up = f"LAN path to n4 at {void}:51820: nothing came back"
    took = eventually(
        lambda: gave_up in log.read_text(errors="replace"),
        40,
        "n2 tries the forged endpoint of n4 and leaves it",
    )
    row: dict[str, Any] = {}

    def back_on_lan() -> bool:
        row.update(peer_row(nat_site, "n2", "n4") or {})
        return (row.get("path"), row.get("endpoint")) == (
            "direct (LAN)",
            f"{lab.node('n4').address}:{WIREGUARD_PORT}",
        )

    eventually(back_on_lan, 10, "n2 back on n4's own LAN endpoint", lambda: row)
    assert lab.ping("n2", nat_site.mesh_address("n4"), deadline=3) is not None
    print(f"the forged endpoint was left {took:.1f} s after the forger started")
