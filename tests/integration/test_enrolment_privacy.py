"""Enrolment is encrypted and both sides are authenticated (issue 12, finding 8).

A capture on the seed's underlay interface during a real ``meshd join`` shows the
clear hello and nothing of the joiner or the members; a token of another network
fails with a clear message; a process on the enrolment port that holds the gossip
key and shows a real member's certificate, but not that member's key, is refused
by the joiner before the joiner says who it is.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator

import pytest

from meshd.b64 import encode_b64
from meshd.config import EnrolSection
from meshd.identity import decode_key
from meshd.lab.capture import capture
from meshd.lab.mesh import MeshLab, meshd_argv
from meshd.node import NodeStore
from meshd.pki.enrol import NOISE_PROTOCOL
from tests.integration.conftest import eventually, mesh_lab

pytestmark = pytest.mark.root("serf", "wireguard-go", "wg")

MEMBERS = ["n1", "n3"]  # a mesh; n2 joins it; n4 holds no member, only an impostor
JOINER_NAME = "laptop-of-alice"

IMPOSTOR = """
import asyncio, json, logging, sys
from meshd.b64 import decode_b64
from meshd.errors import EnrolRefused
from meshd.pki.certificate import CertChain
from meshd.pki.enrol import SeedIdentity
from meshd.pki.enrol_server import EnrolServer
from meshd.pki.noise import generate_private_key

facts = json.load(open(sys.argv[1]))
identity = SeedIdentity(
    generate_private_key(),  # its own key: it cannot have the member's
    CertChain.decode(decode_b64(facts["chain"])),
    (decode_b64(facts["gossip_key"]),),
    decode_b64(facts["ca"]),
)

def verify(request):
    print("REQUEST FROM", request.name, flush=True)

def on_enrolled(request):
    raise EnrolRefused("an impostor")

async def main():
    logging.basicConfig(level=logging.DEBUG, stream=sys.stdout)
    port = facts["port"]
    async with EnrolServer("0.0.0.0", port, verify, on_enrolled, identity=lambda: identity):
        print("LISTENING", flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def mesh() -> Iterator[MeshLab]:
    with mesh_lab(4, up=MEMBERS, seed=1, timeout=60) as built:
        yield built


def join(mesh: MeshLab, seed: str, token: str) -> tuple[int, str]:
    """``meshd join`` on n2 as JOINER_NAME through ``seed`` (a host or host:port)."""
    mesh.write_config("n2", node_name=JOINER_NAME)
    done = mesh.meshd(
        "n2",
        "join",
        seed,
        "--token-file",
        token,
        "--endpoint",
        mesh.endpoint("n2"),
        "--no-start",
        check=False,
    )
    return done.returncode, done.stderr


def copy_token(mesh: MeshLab, name: str) -> str:
    path = mesh.lab.node_dir("n2") / name
    shutil.copyfile(mesh.state_dir("n1") / "join-token", path)
    path.chmod(0o600)
    return str(path)


def test_a_token_of_another_network_fails_clearly(mesh: MeshLab) -> None:
    # Another network, made with `meshd init` in a scratch directory on n4.
    scratch = mesh.lab.node_dir("n4") / "elsewhere"
    config = scratch / "meshd.toml"
    scratch.mkdir(mode=0o700, exist_ok=True)
    config.write_text(
        f'[node]\nname = "elsewhere"\nstate_dir = "{scratch / "state"}"\n'
        f'[wireguard]\ninterface = "{mesh.lab.ifname("n4", "xw")}"\n'
    )
    mesh.lab.run(
        "n4",
        [
            *meshd_argv(),
            "--config",
            str(config),
            "init",
            "--network",
            "elsewhere",
            "--cidr",
            "100.81.0.0/16",
            "--endpoint",
            mesh.endpoint("n4"),
            "--no-start",
        ],
    )
    foreign = mesh.lab.node_dir("n2") / "foreign-token"
    shutil.copyfile(scratch / "state" / "join-token", foreign)
    foreign.chmod(0o600)

    code, stderr = join(mesh, mesh.lab.node("n1").address, str(foreign))

    assert code != 0
    assert "the token is not for this seed's network" in stderr, stderr
    assert not NodeStore(mesh.state_dir("n2")).exists()


def test_an_impostor_seed_is_refused_by_the_joiner(mesh: MeshLab) -> None:
    n1 = NodeStore(mesh.state_dir("n1")).load()
    facts = mesh.lab.node_dir("n4") / "impostor.json"
    facts.write_text(
        json.dumps(
            {
                "chain": encode_b64(n1.chain),
                "gossip_key": encode_b64(n1.gossip_key),
                "ca": encode_b64(n1.ca_public_key),
                "port": EnrolSection().port,  # the enrolment port every seed listens on
            }
        )
    )
    script = mesh.lab.node_dir("n4") / "impostor.py"
    script.write_text(IMPOSTOR)
    mesh.lab.spawn("n4", [sys.executable, str(script), str(facts)], name="impostor")
    log = mesh.lab.log_path("n4", "impostor")
    try:
        eventually(lambda: "LISTENING" in log.read_text(), 20, "the impostor listens")

        code, stderr = join(mesh, mesh.lab.node("n4").address, copy_token(mesh, "token"))

        assert code != 0
        assert "is not a member of network" in stderr, stderr
        assert "it shows the certificate of 'n1' without holding that member's key" in stderr
        assert not NodeStore(mesh.state_dir("n2")).exists()
        # The joiner hung up after the handshake, before its request: the impostor saw
        # the connection end and never a request.
        eventually(
            lambda: "enrolment connection from" in log.read_text(),
            20,
            "the impostor sees the joiner hang up",
            lambda: log.read_text()[-400:],
        )
        assert "REQUEST FROM" not in log.read_text()
    finally:
        mesh.lab.kill("n4", "impostor")


def test_a_capture_of_an_enrolment_shows_no_name_key_or_certificate(mesh: MeshLab) -> None:
    token = copy_token(mesh, "token")
    seed = mesh.lab.node("n1")
    with capture(mesh.lab.netns_of("n1"), seed.interface) as everything:
        code, stderr = join(mesh, seed.address, token)
    assert code == 0, stderr
    # The enrolment's own segments: the LAN's mDNS adverts carry members' names and
    # keys by design (public facts, docs/discovery.md), and are not the exchange.
    seen = everything.tcp_port(EnrolSection().port)

    assert seen.dropped == 0, "the capture missed frames: absence proves nothing"
    assert seen.contains(NOISE_PROTOCOL.encode()), "the capture did not see the enrolment"
    joiner = NodeStore(mesh.state_dir("n2")).load()
    members = {name: NodeStore(mesh.state_dir(name)).load() for name in MEMBERS}
    needles = {
        "joiner's name": JOINER_NAME.encode(),
        "joiner's endpoint": mesh.endpoint("n2").encode(),
        **fingerprints("joiner", joiner.keys.public_key, joiner.chain),
    }
    for name, state in members.items():
        needles.update(fingerprints(name, state.keys.public_key, state.chain))
    shown = [what for what, needle in needles.items() if seen.contains(needle)]
    assert shown == [], f"seen in clear on the seed's wire: {shown}"


def fingerprints(who: str, public_key: str, chain: bytes) -> dict[str, bytes]:
    """A member's key (text and raw) and slices of its chain (raw and base64), as they
    would appear in a clear exchange."""
    middle = len(chain) // 2
    text = encode_b64(chain)
    return {
        f"{who}'s key": public_key.encode(),
        f"{who}'s key (raw)": decode_key(public_key),
        f"{who}'s chain": chain[middle : middle + 32],
        f"{who}'s chain (base64)": text[len(text) // 2 : len(text) // 2 + 32].encode(),
    }
