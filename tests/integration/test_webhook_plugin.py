"""contrib/meshd-webhook, the example third-party plugin, installed with pip and run by a
real agent: a receiver on loopback inside n1's namespace gets a JSON POST when n3
joins and when it leaves.

pip installs it into a private target directory put on the agent's PYTHONPATH (as
test_plugin_distribution does), so the project's own environment is never changed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshd.lab.mesh import MeshLab
from tests.conftest import pip_install_target
from tests.integration.conftest import eventually, mesh_lab

pytestmark = pytest.mark.root("serf", "wireguard-go", "wg")

PLUGIN = Path(__file__).parents[2] / "contrib" / "meshd-webhook"
PORT = 18080
RECEIVER = f"""
import http.server, sys
class Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        print(self.path, body.decode(), flush=True)
        self.send_response(204)
        self.end_headers()
    def log_message(self, *args):
        pass
print("listening", flush=True)
http.server.HTTPServer(("127.0.0.1", {PORT}), Hook).serve_forever()
"""


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pip_install_target(PLUGIN, tmp_path_factory.mktemp("site"))


@pytest.fixture(scope="module")
def mesh() -> Iterator[MeshLab]:
    with mesh_lab(nodes=3) as built:
        yield built


def received(mesh: MeshLab) -> list[tuple[str, dict[str, Any]]]:
    lines = mesh.lab.log_path("n1", "receiver").read_text().splitlines()
    return [
        (path, json.loads(body))
        for path, _, body in (line.partition(" ") for line in lines)
        if path.startswith("/")
    ]


def test_the_webhook_posts_joins_and_leaves(mesh: MeshLab, plugin_path: Path) -> None:
    mesh.lab.spawn("n1", [sys.executable, "-c", RECEIVER], name="receiver")
    eventually(
        lambda: "listening" in mesh.lab.log_path("n1", "receiver").read_text(),
        10,
        "the receiver listens",
    )
    env = {"PYTHONPATH": str(plugin_path)}
    mesh.init("n1", extra_config=f'[plugins.webhook]\nurl = "http://127.0.0.1:{PORT}/meshd"\n')
    plugins = json.loads(
        mesh.lab.run(
            "n1",
            [
                "env",
                *(f"{k}={v}" for k, v in env.items()),
                *mesh_argv(mesh, "n1"),
                "plugins",
                "--json",
            ],
        ).stdout
    )["plugins"]
    webhook = next(p for p in plugins if p["name"] == "webhook")
    assert (webhook["distribution"], webhook["status"]) == ("meshd-webhook", "loaded")

    mesh.start("n1", env=env)
    mesh.wait_ready("n1")
    for node in ("n2", "n3"):
        mesh.join(node, "n1")
        mesh.start(node)
        mesh.wait_ready(node)
    mesh.wait_full_mesh(["n1", "n2", "n3"], timeout=60)

    def events() -> list[tuple[str, str]]:
        return [(body["event"], body["member"]) for _, body in received(mesh)]

    eventually(
        lambda: events() == [("member-join", "n2"), ("member-join", "n3")],
        30,
        "n1's webhook posted both joins",
        detail=events,
    )
    path, body = received(mesh)[0]
    assert path == "/meshd"
    assert (body["node"], body["network"]) == ("n1", mesh.network)

    mesh.meshd("n3", "leave")
    eventually(
        lambda: events()[2:] == [("member-leave", "n3")],
        30,
        "n1's webhook posted the leave",
        detail=events,
    )


def mesh_argv(mesh: MeshLab, node: str) -> list[str]:
    return [sys.executable, "-m", "meshd", "--config", str(mesh.config_path(node))]
