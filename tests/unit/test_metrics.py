"""The metrics plugin without an agent: settings, the collector over given facts, the
mesh JSON and page, and the small HTTP server on loopback."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import shutil
import subprocess
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd import (
    ConfigError,
    ConfigView,
    EngineStats,
    GossipError,
    Member,
    MemberState,
    MetricSample,
    NodeIdentity,
    NodeRecord,
    PathChoice,
    PeerStats,
)
from meshd_metrics import MetricsPlugin
from meshd_metrics.collector import Facts, current_members, exposition, peer_views
from meshd_metrics.server import Answer, Route, WebServer
from meshd_metrics.settings import (
    Listener,
    Settings,
    check_addresses,
    parse_listener,
    parse_settings,
)
from meshd_metrics.topology import mesh_json, page
from tests.conftest import metric_samples

NOW = 1_800_000_000.0


def member(name: str, state: MemberState = MemberState.ALIVE, version: int = 1) -> Member:
    number = int(name[1:])
    return Member(
        name,
        f"100.80.0.{number}:7946",
        state,
        NodeRecord(
            public_key=f"{name}-{version}-key",
            addresses=(ipaddress.ip_address(f"100.80.0.{number}"),),
            port=51820,
            version=version,
        ),
        certified=True,
    )


def stats(name: str, age: float | None, rx: int = 100, tx: int = 200) -> PeerStats:
    return PeerStats(
        f"{name}-1-key", "198.18.0.9:51820", None if age is None else NOW - age, rx, tx
    )


# n2 direct, n3 on the LAN, n4 relayed, n5 failed, n6 alive but no handshake for 10 min,
# n7 excluded (not a peer).
FACTS = Facts(
    node="n1",
    now=NOW,
    members=(
        member("n1"),
        member("n2"),
        member("n3"),
        member("n4"),
        member("n5", MemberState.FAILED),
        member("n6"),
        member("n7"),
    ),
    paths={
        "n2": PathChoice(label="direct"),
        "n3": PathChoice(endpoint="192.168.1.3:51820", label="direct (LAN)"),
        "n4": PathChoice(via="n2", endpoint="198.18.0.2:40000", label="relay via n2"),
        "n5": PathChoice(label="direct"),
        "n6": PathChoice(label="direct"),
    },
    excluded={"n7": "not admitted"},
    peers=(stats("n2", 5), stats("n3", 30), stats("n4", 60), stats("n5", 400), stats("n6", 600)),
    engine=EngineStats(
        passes=12, changing_passes=3, operations=9, pass_seconds=0.25, last_pass=NOW - 1
    ),
    certificate_expires=NOW + 86400,
    extra=(
        MetricSample("meshd_relay_forwarded_bytes", 1500, "Bytes forwarded.", "counter"),
        MetricSample("meshd_relay_pairs", 2, "Pairs.", labels=(("relay", "n1"),)),
        MetricSample("bad name", 1),
        MetricSample("meshd_peers", 99),  # the collector's own: not a plugin's to change
    ),
    gossip={
        "serf": {"event_queue": "2", "query_queue": "0", "intent_queue": "1", "health_score": "0"}
    },
)


# --- the collector -----------------------------------------------------------------


def test_peers_are_counted_by_the_kind_of_their_path() -> None:
    text = exposition(FACTS).decode()
    assert metric_samples(text, "meshd_peers") == {
        (("path", "direct"),): 1,
        (("path", "lan"),): 1,
        (("path", "relay"),): 1,
        (("path", "down"),): 3,  # n5 failed, n6 stale, n7 excluded
    }
    assert {v.name: v.kind for v in peer_views(FACTS)} == {
        "n2": "direct",
        "n3": "lan",
        "n4": "relay",
        "n5": "down",
        "n6": "down",
        "n7": "down",
    }


def test_members_by_state_count_this_node_too_and_every_state_is_present() -> None:
    text = exposition(FACTS).decode()
    assert metric_samples(text, "meshd_members") == {
        (("state", "alive"),): 6,
        (("state", "failed"),): 1,
        (("state", "leaving"),): 0,
        (("state", "left"),): 0,
        (("state", "reaped"),): 0,
    }


def test_per_peer_handshake_age_and_traffic() -> None:
    text = exposition(FACTS).decode()
    ages = metric_samples(text, "meshd_peer_handshake_age_seconds")
    assert ages[(("peer", "n2"),)] == 5
    assert ages[(("peer", "n6"),)] == 600
    assert (("peer", "n7"),) not in ages
    assert metric_samples(text, "meshd_peer_receive_bytes_total")[(("peer", "n3"),)] == 100
    assert metric_samples(text, "meshd_peer_transmit_bytes_total")[(("peer", "n3"),)] == 200


def test_engine_certificate_and_gossip_figures() -> None:
    text = exposition(FACTS).decode()
    assert metric_samples(text, "meshd_reconcile_passes_total") == {(): 12}
    assert metric_samples(text, "meshd_reconcile_changing_passes_total") == {(): 3}
    assert metric_samples(text, "meshd_reconcile_operations_total") == {(): 9}
    assert metric_samples(text, "meshd_reconcile_duration_seconds_total") == {(): 0.25}
    assert metric_samples(text, "meshd_certificate_expiry_timestamp_seconds") == {(): NOW + 86400}
    assert metric_samples(text, "meshd_gossip_up") == {(): 1}
    assert metric_samples(text, "meshd_gossip_queue_depth") == {
        (("queue", "event"),): 2,
        (("queue", "intent"),): 1,
        (("queue", "query"),): 0,
    }


def test_what_plugins_report_is_added_when_its_name_is_valid_and_free() -> None:
    text = exposition(FACTS).decode()
    assert metric_samples(text, "meshd_relay_forwarded_bytes_total") == {(): 1500}
    assert metric_samples(text, "meshd_relay_pairs") == {(("relay", "n1"),): 2}
    assert "bad name" not in text
    assert 99 not in metric_samples(text, "meshd_peers").values()


def test_serf_not_answering_is_gossip_up_0_and_no_queues() -> None:
    facts = Facts(node="n1", now=NOW, members=(member("n1"),), gossip=None)
    text = exposition(facts).decode()
    assert metric_samples(text, "meshd_gossip_up") == {(): 0}
    assert metric_samples(text, "meshd_gossip_queue_depth") == {}
    assert metric_samples(text, "meshd_reconcile_last_pass_timestamp_seconds") == {}


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (Debian prometheus)")
def test_promtool_accepts_the_exposition() -> None:
    done = subprocess.run(
        ["promtool", "check", "metrics"],
        input=exposition(FACTS),
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_current_incarnation_of_a_name_is_the_alive_one_then_the_newest() -> None:
    old = member("n2", MemberState.FAILED, version=9)
    new = member("n2", MemberState.ALIVE, version=1)
    assert current_members([old, new]) == [new]
    assert current_members([new, old]) == [new]
    older = member("n3", MemberState.LEFT, version=1)
    newer = member("n3", MemberState.FAILED, version=2)
    assert current_members([newer, older]) == [newer]


# --- the JSON and the page -----------------------------------------------------------


def test_mesh_json_lists_members_and_this_nodes_edges() -> None:
    view = mesh_json(FACTS)
    assert [m["name"] for m in view["members"]] == [f"n{i}" for i in range(1, 8)]
    assert view["members"][4] == {"name": "n5", "state": "failed", "addresses": ["100.80.0.5"]}
    edges = {e["b"]: e for e in view["edges"]}
    assert set(edges) == {"n2", "n3", "n4", "n5", "n6", "n7"}
    assert {e["a"] for e in view["edges"]} == {"n1"}
    assert edges["n4"]["kind"] == "relay"
    assert edges["n4"]["label"] == "relay via n2"
    assert edges["n7"]["label"] == "excluded: not admitted"
    assert edges["n2"]["last_handshake"] == NOW - 5
    json.dumps(view)  # all of it is JSON


def test_the_page_inlines_the_view_and_no_name_can_close_its_script() -> None:
    hostile = "</script><script>alert(1)</script><!--"
    facts = Facts(
        node="n1",
        now=NOW,
        members=(
            member("n1"),
            Member(hostile, "100.80.0.9:7946", MemberState.ALIVE, None),
        ),
    )
    html = page(mesh_json(facts)).decode()
    assert "null/*MESH_JSON*/" not in html
    assert hostile not in html
    assert html.count("</script>") == 1  # the page's own
    start = html.index("let own = ") + len("let own = ")
    inlined = json.loads(html[start : html.index(";\n", start)])
    assert hostile in [m["name"] for m in inlined["members"]]


# --- settings ------------------------------------------------------------------------


def test_an_empty_table_listens_on_loopback_9477() -> None:
    assert parse_settings({}, "m.toml") == Settings(listen=(Listener("127.0.0.1", 9477),))


def test_listen_takes_loopback_mesh_and_lists() -> None:
    settings = parse_settings(
        {"listen": ["localhost:9000", "[::1]:9001", "mesh:9477"], "mesh_page": True}, None
    )
    assert settings.listen == (
        Listener("127.0.0.1", 9000),
        Listener("::1", 9001),
        Listener("mesh", 9477),
    )
    assert [listener.loopback for listener in settings.listen] == [True, True, False]
    assert settings.mesh_page


def test_a_textfile_alone_serves_nothing() -> None:
    settings = parse_settings({"textfile": "/tmp/meshd.prom", "interval": 5}, None)
    assert settings.listen == ()
    assert settings.textfile == Path("/tmp/meshd.prom")
    assert settings.interval == 5.0


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            {"listen": "0.0.0.0:9477"},
            "m.toml: plugins.metrics.listen: '0.0.0.0:9477': metrics listen on loopback or on "
            "this node's mesh address only (use mesh:PORT for the mesh address)",
        ),
        (
            {"listen": "example.com:9477"},
            "m.toml: plugins.metrics.listen: 'example.com:9477': the host must be an IP "
            "address, 'localhost' or 'mesh'",
        ),
        (
            {"listen": "127.0.0.1"},
            "m.toml: plugins.metrics.listen: '127.0.0.1' is not HOST:PORT: write HOST:PORT, "
            "e.g. 127.0.0.1:9477 or mesh:9477",
        ),
        ({"listen": 9477}, "m.toml: plugins.metrics.listen: must be HOST:PORT or a list of them"),
        ({"mesh_page": "yes"}, "m.toml: plugins.metrics.mesh_page: must be true or false"),
        ({"interval": 0}, "m.toml: plugins.metrics.interval: must be a positive number of seconds"),
        (
            {"port": 1},
            "m.toml: plugins.metrics.port: unknown key "
            "(known keys: listen, mesh_page, textfile, interval)",
        ),
    ],
)
def test_bad_settings_are_refused_naming_the_key(section: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings(section, "m.toml")
    assert str(caught.value) == message


def test_a_literal_address_must_be_this_nodes_mesh_address() -> None:
    mesh = (ipaddress.ip_address("100.80.0.1"), ipaddress.ip_address("fd00::1"))
    check_addresses((Listener("100.80.0.1", 9477), Listener("mesh", 1)), mesh)
    with pytest.raises(ValueError, match=r"^192\.168\.1\.5: metrics listen on loopback or on"):
        check_addresses((Listener("192.168.1.5", 9477),), mesh)


@given(st.text(max_size=40))
def test_parse_listener_returns_a_listener_or_says_why(text: str) -> None:
    try:
        listener = parse_listener(text)
    except ValueError:
        return  # refused (anything but ValueError fails the test)
    assert 0 < listener.port < 65536
    assert listener.host == "mesh" or ipaddress.ip_address(listener.host)


# --- the server ----------------------------------------------------------------------


async def _request(port: int, head: str) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    top, _, body = raw.partition(b"\r\n\r\n")
    lines = top.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _serve(*heads: str) -> list[tuple[int, dict[str, str], bytes]]:
    async def fail() -> Answer:
        raise RuntimeError("planted")

    async def hello() -> Answer:
        return Answer(b"hello\n", "text/plain")

    async def main() -> list[tuple[int, dict[str, str], bytes]]:
        server = WebServer(
            {"/": Route(hello), "/open": Route(hello, cross_origin=True), "/fail": Route(fail)}
        )
        port = await server.start("127.0.0.1", 0)
        try:
            return [await _request(port, head) for head in heads]
        finally:
            server.close()

    return asyncio.run(main())


def test_the_server_answers_get_and_head_and_refuses_the_rest() -> None:
    got, head, post, missing, failed = _serve(
        "GET /?x=1 HTTP/1.1\r\nHost: 127.0.0.1:9477\r\n\r\n",
        "HEAD / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n",
        "GET /nothing HTTP/1.1\r\nHost: [::1]:9477\r\n\r\n",
        "GET /fail HTTP/1.1\r\n\r\n",
    )
    assert got[0] == 200
    assert got[2] == b"hello\n"
    assert head[0] == 200
    assert head[1]["content-length"] == "6"
    assert head[2] == b""
    assert post[0] == 405
    assert missing[0] == 404
    assert failed[0] == 500


def test_a_host_name_other_than_localhost_is_refused() -> None:
    # A DNS name rebound to 127.0.0.1 by a web page elsewhere must not read the mesh.
    rebound, malformed = _serve(
        "GET / HTTP/1.1\r\nHost: attacker.example:9477\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: [::1\r\n\r\n",
    )
    assert rebound[0] == 421
    assert malformed[0] == 421


def test_cross_origin_reads_only_where_allowed_and_only_from_ip_origins() -> None:
    page, elsewhere, closed, broken = _serve(
        "GET /open HTTP/1.1\r\nHost: 100.80.0.2:9477\r\nOrigin: http://127.0.0.1:9477\r\n\r\n",
        "GET /open HTTP/1.1\r\nHost: 100.80.0.2:9477\r\nOrigin: https://evil.example\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: 100.80.0.2:9477\r\nOrigin: http://127.0.0.1:9477\r\n\r\n",
        "GET /open HTTP/1.1\r\nHost: 100.80.0.2:9477\r\nOrigin: http://[::1\r\n\r\n",
    )
    assert page[1]["access-control-allow-origin"] == "http://127.0.0.1:9477"
    assert "access-control-allow-origin" not in elsewhere[1]
    assert "access-control-allow-origin" not in closed[1]
    assert broken[0] == 200
    assert "access-control-allow-origin" not in broken[1]


# --- the plugin, on a stand-in agent -----------------------------------------------


class StandInAgent:
    """The AgentAPI members the metrics plugin reads, answering from FACTS."""

    identity = NodeIdentity("n1", "n1-1-key")
    members = FACTS.members
    paths = FACTS.paths
    excluded = FACTS.excluded
    engine_stats = FACTS.engine
    certificate_expires = FACTS.certificate_expires
    mesh_addresses = (ipaddress.ip_address("100.80.0.1"),)

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[None]] = []

    async def peer_stats(self) -> tuple[PeerStats, ...]:
        return FACTS.peers

    async def gossip_stats(self) -> dict[str, dict[str, str]]:
        raise GossipError("serf is restarting")

    def plugin_metrics(self) -> tuple[MetricSample, ...]:
        return FACTS.extra

    def spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> None:
        self.tasks.append(asyncio.get_running_loop().create_task(coro, name=name))


def test_the_textfile_is_written_atomically_from_the_agent(tmp_path: Path) -> None:
    target = tmp_path / "meshd.prom"
    plugin = MetricsPlugin()
    section = {"textfile": str(target), "interval": 0.05}
    plugin.meshd_configure(ConfigView(None, "n1", tmp_path, {"metrics": section}))

    async def main() -> str:
        agent = StandInAgent()
        plugin.meshd_startup(agent)  # type: ignore[arg-type]
        assert [t.get_name() for t in agent.tasks] == ["metrics-textfile"]
        try:
            async with asyncio.timeout(5):
                while not target.exists():  # noqa: ASYNC110 (a file has nothing to await)
                    await asyncio.sleep(0.01)
        finally:
            for task in agent.tasks:
                task.cancel()
            await asyncio.gather(*agent.tasks, return_exceptions=True)
        return target.read_text()

    text = asyncio.run(main())
    assert metric_samples(text, "meshd_peers")[(("path", "relay"),)] == 1
    # Serf's failure is a figure, not an error.
    assert metric_samples(text, "meshd_gossip_up") == {(): 0}
    assert metric_samples(text, "meshd_relay_pairs") == {(("relay", "n1"),): 2}
    assert [p.name for p in tmp_path.iterdir()] == ["meshd.prom"]  # no temporary file left


def test_a_literal_listen_address_that_is_not_this_nodes_is_refused_at_start() -> None:
    plugin = MetricsPlugin()
    section = {"listen": "100.80.0.9:9477"}
    plugin.meshd_configure(ConfigView("m.toml", "n1", Path("/tmp"), {"metrics": section}))
    agent = StandInAgent()
    with pytest.raises(ConfigError, match=r"^m\.toml: plugins\.metrics\.listen: 100\.80\.0\.9: "):
        plugin.meshd_startup(agent)  # type: ignore[arg-type]
    assert agent.tasks == []
