"""``meshd doctor`` on a real 3-node mesh: quiet on a healthy node, and it finds each of
the planted faults (a state file 0644, a certificate about to expire, the enrolment
port dropped by nftables, a link narrower than the mesh MTU, Serf killed, the WireGuard
port taken while the agent is down). Then an agent runs as the systemd unit runs it.

Each fault is planted on one node, checked, and removed again; the healthy test
runs first and last, so a fault that was not cleaned up fails the module.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshd.b64 import decode_b64, encode_b64
from meshd.lab.mesh import MeshLab
from meshd.pki.ca import NetworkCA
from meshd.pki.certificate import CertChain
from tests.integration.conftest import eventually, mesh_lab

pytestmark = pytest.mark.root("serf", "wireguard-go", "wg", "nft", "setpriv")

NODES = ["n1", "n2", "n3"]
# The capabilities of systemd/meshd.service (CapabilityBoundingSet, NoNewPrivileges).
SERVICE_CAPABILITIES = (
    "setpriv",
    "--no-new-privs",
    "--bounding-set=-all,+net_admin,+net_bind_service",
    "--inh-caps=-all",
)
SERVICE_CAP_MASK = (1 << 12) | (1 << 10)  # CAP_NET_ADMIN, CAP_NET_BIND_SERVICE


def capabilities(pid: int) -> dict[str, int]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
    return {name: int(fields[name], 16) for name in ("CapEff", "CapBnd")}


@pytest.fixture(scope="module")
def mesh() -> Iterator[MeshLab]:
    with mesh_lab(nodes=3, up=NODES) as built:
        yield built


def doctor(mesh: MeshLab, node: str) -> tuple[int, dict[str, dict[str, Any]]]:
    """``meshd doctor --json`` on ``node``: its exit code and its checks by name."""
    done = mesh.meshd(node, "doctor", "--json", check=False)
    report = json.loads(done.stdout)
    assert report["ok"] is (done.returncode == 0), done.stdout
    return done.returncode, {check["name"]: check for check in report["checks"]}


def not_ok(checks: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {name: c["status"] for name, c in checks.items() if c["status"] != "ok"}


def nft(mesh: MeshLab, node: str, *command: str) -> None:
    mesh.lab.run(node, ["nft", *command])


def test_a_healthy_node_has_nothing_wrong(mesh: MeshLab) -> None:
    code, checks = doctor(mesh, "n2")
    assert checks["mtu"]["detail"].endswith("2 of 2 answered a full-size echo"), checks["mtu"]
    assert not_ok(checks) == {}, checks
    assert code == 0
    assert set(checks) >= {
        "agent",
        "wireguard",
        "enrolment",
        "serf",
        "members",
        "clock",
        "certificate",
        "nat",
        "mtu",
        "state files",
        "stale",
    }
    # The text form says so too, in a table.
    text = mesh.meshd("n2", "doctor").stdout
    assert "nothing wrong" in text
    assert "CHECK" in text


def test_a_secret_readable_by_others_fails(mesh: MeshLab) -> None:
    key = mesh.state_dir("n2") / "wireguard.key"
    key.chmod(0o644)
    try:
        code, checks = doctor(mesh, "n2")
    finally:
        key.chmod(0o600)
    assert code == 1
    assert not_ok(checks) == {"state files": "FAIL"}
    assert "wireguard.key is 644" in checks["state files"]["detail"]
    assert f"chmod 600 {key}" in checks["state files"]["fix"]


def test_a_certificate_about_to_expire_is_warned(mesh: MeshLab) -> None:
    """node.json gets a certificate for the same key that lapses in three days."""
    node_file = mesh.state_dir("n2") / "node.json"
    original = node_file.read_text()
    node = json.loads(original)
    current = CertChain.decode(decode_b64(node["chain"])).node
    network = json.loads((mesh.state_dir("n1") / "network.json").read_text())["name"]
    ca_secret = decode_b64((mesh.state_dir("n1") / "ca.key").read_text().strip())
    short = NetworkCA.from_secret(network, ca_secret).issue_node_cert(
        current.name, current.public_key, current.addresses, lifetime=3 * 86400
    )
    node["chain"] = encode_b64(CertChain(short).encode())
    node_file.write_text(json.dumps(node))
    try:
        code, checks = doctor(mesh, "n2")
    finally:
        node_file.write_text(original)
    assert code == 1
    assert not_ok(checks) == {"certificate": "warn"}
    assert "expires in 3.0 days" in checks["certificate"]["detail"]
    assert "meshd key rotate-wireguard" in checks["certificate"]["fix"]


def test_the_enrolment_port_dropped_by_nftables_fails(mesh: MeshLab) -> None:
    nft(mesh, "n2", "add", "table", "inet", "fault")
    try:
        nft(
            mesh,
            "n2",
            "add chain inet fault input { type filter hook input priority 0; policy accept; }",
        )
        nft(mesh, "n2", "add rule inet fault input tcp dport 51821 drop")
        code, checks = doctor(mesh, "n2")
    finally:
        nft(mesh, "n2", "delete", "table", "inet", "fault")
    assert code == 1
    assert not_ok(checks) == {"enrolment": "FAIL"}
    assert "dropped by nftables: inet fault input" in checks["enrolment"]["detail"]
    assert "no answer" in checks["enrolment"]["detail"]


def test_a_path_narrower_than_the_mesh_mtu_is_warned(mesh: MeshLab) -> None:
    """n2's underlay link shrinks to 1400: WireGuard's 1480-byte datagrams no longer fit."""
    route = json.loads(
        mesh.lab.run("n2", ["ip", "-j", "route", "get", mesh.lab.node("n1").address]).stdout
    )
    device = route[0]["dev"]
    link = json.loads(mesh.lab.run("n2", ["ip", "-j", "link", "show", "dev", device]).stdout)
    original = str(link[0]["mtu"])
    mesh.lab.run("n2", ["ip", "link", "set", "dev", device, "mtu", "1400"])
    try:
        code, checks = doctor(mesh, "n2")
    finally:
        mesh.lab.run("n2", ["ip", "link", "set", "dev", device, "mtu", original])
    assert code == 1
    assert not_ok(checks) == {"mtu": "warn"}
    assert "(path 1400)" in checks["mtu"]["detail"]
    assert checks["mtu"]["fix"].startswith("set [wireguard] mtu = 1340 ")


def test_a_killed_serf_is_found(mesh: MeshLab) -> None:
    _, checks = doctor(mesh, "n3")
    pid = int(checks["serf"]["detail"].split("pid ")[1].split(")")[0])
    os.kill(pid, signal.SIGKILL)
    code, checks = doctor(mesh, "n3")
    assert code == 1
    # Caught while dead (FAIL) or after the agent restarted it (warn): never ok.
    assert not_ok(checks).get("serf") in ("FAIL", "warn"), checks
    assert "journalctl -u meshd" in checks["serf"]["fix"]

    def restarted_and_counted() -> bool:
        serf = doctor(mesh, "n3")[1]["serf"]
        return serf["status"] == "warn" and "died 1 time(s)" in serf["detail"]

    eventually(restarted_and_counted, 20, "the doctor reports Serf restarted once")


def test_the_wireguard_port_taken_while_the_agent_is_down(mesh: MeshLab) -> None:
    assert mesh.stop("n3")
    squatter = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            mesh.lab.netns_of("n3"),
            sys.executable,
            "-c",
            "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            "s.bind(('0.0.0.0', 51820)); print('bound', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert squatter.stdout is not None
        assert squatter.stdout.readline().strip() == "bound"
        code, checks = doctor(mesh, "n3")
    finally:
        squatter.kill()
        squatter.wait()
    assert code == 1
    assert not_ok(checks) == {"agent": "FAIL", "wireguard": "FAIL"}
    assert "not running" in checks["agent"]["detail"]
    assert "UDP port 51820 is taken by python" in checks["wireguard"]["detail"]
    # With the port free again the doctor sees only the stopped agent; started, nothing.
    _, checks = doctor(mesh, "n3")
    assert not_ok(checks) == {"agent": "FAIL"}


def test_an_interface_left_without_an_agent_is_stale(mesh: MeshLab) -> None:
    """What a crashed agent can leave: its interface (here a TUN device of that name,
    as wireguard-go makes)."""
    assert not mesh.running("n3")
    ifname = mesh.lab.ifname("n3", "mw")
    mesh.lab.run("n3", ["ip", "tuntap", "add", "dev", ifname, "mode", "tun"])
    try:
        _, checks = doctor(mesh, "n3")
    finally:
        mesh.lab.run("n3", ["ip", "link", "del", ifname])
    assert not_ok(checks) == {"agent": "FAIL", "stale": "FAIL"}
    assert checks["stale"]["fix"] == f"ip link del {ifname}"


def test_the_agent_runs_as_the_service_does(mesh: MeshLab, tmp_path: Path) -> None:
    """n3 (stopped by the test before) starts as systemd/meshd.service runs it: only
    CAP_NET_ADMIN and CAP_NET_BIND_SERVICE, no_new_privs, a notify socket and a
    watchdog of 2 s. It rejoins the mesh, says READY=1 and pings the watchdog."""
    assert not mesh.running("n3")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "2000000"}
    try:
        pid = mesh.start("n3", wrapper=SERVICE_CAPABILITIES, env=env)
        mesh.wait_full_mesh(NODES, timeout=60)
        assert capabilities(pid) == {"CapEff": SERVICE_CAP_MASK, "CapBnd": SERVICE_CAP_MASK}
        messages: list[bytes] = []
        while not any(m.startswith(b"READY=1") for m in messages):
            messages.append(notify.recv(256))
        # Pings go on after READY=1: two more arrive (one per second).
        assert [notify.recv(256) for _ in range(2)] == [b"WATCHDOG=1"] * 2
        assert b"WATCHDOG=1" in messages  # pinged during start-up too
    finally:
        notify.close()


def test_every_node_is_healthy_again(mesh: MeshLab) -> None:
    """After the faults went: a fault left behind, or a restart not healed, shows here."""

    def complaints() -> dict[str, dict[str, str]]:
        return {node: not_ok(doctor(mesh, node)[1]) for node in NODES}

    eventually(
        lambda: not any(complaints().values()), 30, "every doctor is quiet", detail=complaints
    )
