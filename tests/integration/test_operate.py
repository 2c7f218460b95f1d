"""Operating a mesh: Prometheus scrapes an agent, Chromium draws the mesh page.

One 5-node flat lab serves the module; every agent runs the metrics plugin on
loopback and on its mesh address, with the page on the mesh too (so a page on
one node can fetch the others' views). In order: a real Prometheus (run in n1's
namespace with a temporary config and storage) scrapes n1 and ``promtool check
metrics`` accepts what n1 served; headless Chromium loads n1's page and finds
all five members and every pair's path; ``meshd status --graph`` prints n2's
four edges; last, n5's agent is killed and n1's members-by-state metric shows it
failed within Serf's suspicion time.

``MESHD_SAVE_SCREENSHOT=1`` copies the page's screenshot to docs/mesh-page.png
(what the README shows); otherwise it stays in the test's temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from meshd.lab.mesh import MeshLab
from tests.conftest import metric_samples
from tests.integration.conftest import eventually, mesh_lab

pytestmark = pytest.mark.root("serf", "wireguard-go", "wg", "ping")

NODES = [f"n{i}" for i in range(1, 6)]
PORT = 9477
PROMETHEUS_PORT = 9090
# Without the zeroconf plugin: on this one flat LAN it would relabel every pair
# `direct (LAN)` a few seconds after the start, and the paths this module checks
# would depend on when it looks (tests/integration/test_discovery.py covers that).
CONFIG = (
    '[plugins]\ndisable = ["zeroconf"]\n\n'
    f'[plugins.metrics]\nlisten = ["127.0.0.1:{PORT}", "mesh:{PORT}"]\nmesh_page = true\n'
)
# Serf's lan profile: a member is suspected after a missed probe (1 s interval, 0.5 s
# timeout) and declared failed when its suspicion timer runs out: at most
# SuspicionMaxTimeoutMult (6) x SuspicionMult (4) x max(1, log10(n)) x 1 s = 24 s with
# nobody confirming. A scrape then sees it at once (the metric is read at scrape time).
SUSPICION_LIMIT = 1.0 + 0.5 + 24.0
ROOT = Path(__file__).resolve().parents[2]

FETCH = (
    "import sys, urllib.request\n"
    "with urllib.request.urlopen(sys.argv[1], timeout=5) as r:\n"
    "    sys.stdout.write(r.read().decode())\n"
)


@pytest.fixture(scope="module")
def mesh() -> Iterator[MeshLab]:
    with mesh_lab(nodes=len(NODES)) as built:
        built.up(NODES, seed=3, extra_config=CONFIG)
        built.wait_full_mesh(NODES, timeout=60)
        yield built


def fetch(mesh: MeshLab, node: str, url: str) -> str:
    """GET ``url`` from inside ``node``'s namespace."""
    return mesh.lab.run(node, [sys.executable, "-c", FETCH, url], timeout=15).stdout


def members_by_state(mesh: MeshLab, node: str) -> dict[str, float]:
    text = fetch(mesh, node, f"http://127.0.0.1:{PORT}/metrics")
    return {dict(k)["state"]: v for k, v in metric_samples(text, "meshd_members").items()}


@pytest.mark.root("prometheus", "promtool")
def test_prometheus_scrapes_a_node_and_promtool_accepts_its_metrics(
    mesh: MeshLab, tmp_path: Path
) -> None:
    served = fetch(mesh, "n1", f"http://127.0.0.1:{PORT}/metrics")
    check = mesh.lab.run("n1", ["promtool", "check", "metrics"], input=served, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert metric_samples(served, "meshd_peers") == {
        (("path", "direct"),): 4.0,
        (("path", "down"),): 0.0,
        (("path", "lan"),): 0.0,
        (("path", "relay"),): 0.0,
    }
    # Read from the running agent: Serf's queues, the reconcile loop, the certificate.
    assert metric_samples(served, "meshd_gossip_up") == {(): 1.0}
    queues = metric_samples(served, "meshd_gossip_queue_depth")
    assert {dict(labels)["queue"] for labels in queues} == {"event", "query", "intent"}
    assert metric_samples(served, "meshd_reconcile_passes_total")[()] > 0
    assert metric_samples(served, "meshd_certificate_expiry_timestamp_seconds")[()] > time.time()

    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: meshd\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{PORT}']\n"
    )
    mesh.lab.spawn(
        "n1",
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}",
        ],
        name="prometheus",
    )
    try:
        api = f"http://127.0.0.1:{PROMETHEUS_PORT}/api/v1/query?query="

        def query(expr: str) -> list[dict[str, Any]]:
            done = mesh.lab.run(
                "n1", [sys.executable, "-c", FETCH, api + expr], check=False, timeout=15
            )
            if done.returncode != 0:
                return []  # not listening yet
            answer = json.loads(done.stdout)
            assert answer["status"] == "success", answer
            result: list[dict[str, Any]] = answer["data"]["result"]
            return result

        def scraped() -> bool:
            up = query("up")
            return bool(up) and up[0]["value"][1] == "1"

        eventually(scraped, 60, "Prometheus scraped n1 (up == 1)", lambda: query("up"))
        peers = query("meshd_peers")
        assert {r["metric"]["path"]: r["value"][1] for r in peers} == {
            "direct": "4",
            "lan": "0",
            "relay": "0",
            "down": "0",
        }
        alive = query('meshd_members{state="alive"}')
        assert [r["value"][1] for r in alive] == ["5"]
    finally:
        mesh.lab.kill("n1", "prometheus", signal.SIGTERM)


class PageReader(HTMLParser):
    """The members and pairs the page lists (its ``data-member`` and ``data-edge`` rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.members: dict[str, str] = {}
        self.edges: dict[frozenset[str], str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "li" and found.get("data-member"):
            self.members[str(found["data-member"])] = str(found.get("data-state"))
        if tag == "tr" and found.get("data-edge"):
            pair = frozenset(str(found["data-edge"]).split("|"))
            self.edges[pair] = str(found.get("data-kind"))


@pytest.mark.root("chromium")
def test_the_page_shows_every_member_and_every_pairs_path(mesh: MeshLab, tmp_path: Path) -> None:
    chromium = [
        "chromium",
        "--headless",
        "--no-sandbox",  # as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        # Virtual time runs the page's fetches (its own view, then each member's) to the end.
        "--virtual-time-budget=10000",
        "--window-size=1280,720",
    ]
    url = f"http://127.0.0.1:{PORT}/"
    dom = mesh.lab.run("n1", [*chromium, "--dump-dom", url], timeout=120).stdout
    page = PageReader()
    page.feed(dom)
    assert page.members == dict.fromkeys(NODES, "alive")
    pairs = {frozenset((a, b)) for a in NODES for b in NODES if a < b}
    # n1 knows its own four pairs; the other six come from the members' own views.
    assert page.edges == dict.fromkeys(pairs, "direct")

    shot = tmp_path / "mesh-page.png"
    mesh.lab.run("n1", [*chromium, f"--screenshot={shot}", url], timeout=120)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("MESHD_SAVE_SCREENSHOT"):
        shutil.copyfile(shot, ROOT / "docs" / "mesh-page.png")


def test_status_graph_prints_this_nodes_view_as_dot(mesh: MeshLab) -> None:
    dot = mesh.meshd("n2", "status", "--graph").stdout
    assert dot.startswith("graph mesh {\n")
    edges = {line.split(" [")[0].strip(): line for line in dot.splitlines() if " -- " in line}
    assert set(edges) == {f'"n2" -- "{n}"' for n in NODES if n != "n2"}
    assert all("kind=direct" in line for line in edges.values())


def test_a_killed_agent_shows_failed_within_the_suspicion_time(mesh: MeshLab) -> None:
    assert members_by_state(mesh, "n1")["failed"] == 0
    mesh.stop("n5", sig=signal.SIGKILL)
    killed = time.monotonic()
    eventually(
        lambda: members_by_state(mesh, "n1")["failed"] == 1,
        SUSPICION_LIMIT,
        "n1's meshd_members{state=failed} counts the killed n5",
        lambda: members_by_state(mesh, "n1"),
    )
    print(f"n5 failed in n1's metrics {time.monotonic() - killed:.1f} s after the kill")
    served = fetch(mesh, "n1", f"http://127.0.0.1:{PORT}/metrics")
    assert metric_samples(served, "meshd_members")[(("state", "alive"),)] == 4
    assert metric_samples(served, "meshd_peers")[(("path", "down"),)] == 1
    # What the page draws: n5 failed, its pair with n1 down (a dashed red edge).
    view = json.loads(fetch(mesh, "n1", f"http://127.0.0.1:{PORT}/mesh.json"))
    assert {m["name"]: m["state"] for m in view["members"]}["n5"] == "failed"
    assert {e["b"]: e["kind"] for e in view["edges"]} == {
        "n2": "direct",
        "n3": "direct",
        "n4": "direct",
        "n5": "down",
    }
