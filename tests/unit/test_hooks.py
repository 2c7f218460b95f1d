"""Each hook changes behaviour when a small plugin implements it (through the typed facade).

Hooks that need the running agent are also exercised end to end in the lab tests
(admission, endpoints, allocation); here every hook gets a plugin of its own.
"""

from __future__ import annotations

import inspect
import ipaddress
from pathlib import Path
from typing import Any

import click
import pytest

from meshd import hookimpl, hookspecs
from meshd.agent.pipeline import HookPolicy
from meshd.desired import compute
from meshd.errors import ConfigError, PluginError
from meshd.plugins import build_plugin_host
from meshd.types import (
    Admission,
    ConfigView,
    Member,
    MemberState,
    MeshAddresses,
    MeshView,
    MetricSample,
    Network,
    NodeIdentity,
    NodeRecord,
    PathChoice,
    PeerConfig,
    PeerPatch,
    RecordExtras,
)

NET = Network("lab", "abcd", ipaddress.IPv4Network("100.80.0.0/16"))
KEY = "A" * 43 + "="
OWN_KEY = "B" * 43 + "="
MEMBER = Member(
    "n2",
    "100.80.0.2",
    MemberState.ALIVE,
    NodeRecord(public_key=KEY, addresses=(ipaddress.ip_address("100.80.0.2"),), port=51820),
)
PEER = PeerConfig(KEY, (ipaddress.ip_network("100.80.0.2/32"),), "198.18.0.2:51820", 25)


class FakeAgent:
    identity = NodeIdentity("n1", KEY)
    network = NET
    config = ConfigView(None, "n1", Path("/tmp"))
    listen_port = 51820
    local_addresses = (ipaddress.ip_address("198.18.0.1"),)
    state_dir = Path("/tmp")
    members = ()
    clients = ()

    def spawn(self, coro: Any, *, name: str) -> None:
        coro.close()


class Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    def meshd_configure(self, config: ConfigView) -> None:
        self.calls.append(f"configure {config.node_name}")

    @hookimpl
    def meshd_startup(self, agent: Any) -> None:
        self.calls.append("startup")

    @hookimpl
    def meshd_shutdown(self, agent: Any) -> None:
        self.calls.append("shutdown")

    @hookimpl(tryfirst=True)
    def meshd_allocate_address(self, network: Network, node: NodeIdentity, taken: Any) -> Any:
        return MeshAddresses(ipaddress.IPv4Address("100.80.9.9"))

    @hookimpl
    def meshd_endpoint_candidates(self, agent: Any) -> list[str]:
        return ["203.0.113.7:51820"]

    @hookimpl
    def meshd_node_record(self, agent: Any) -> RecordExtras:
        return RecordExtras(
            roles=frozenset({"relay"}), routes=(ipaddress.ip_network("10.9.0.0/24"),)
        )

    @hookimpl(tryfirst=True)
    def meshd_admit_peer(self, agent: Any, member: Member) -> Admission:
        return Admission(admit=False, reason="acl says no")

    @hookimpl
    def meshd_peer_config(self, agent: Any, member: Member, peer: PeerConfig) -> PeerPatch:
        return PeerPatch(extra_allowed_ips=(ipaddress.ip_network("10.9.0.0/24"),), keepalive=5)

    @hookimpl
    def meshd_route_health(self, agent: Any, prefix: Any) -> bool:
        return prefix != ipaddress.ip_network("10.9.0.0/24")

    @hookimpl
    def meshd_extra_peers(self, agent: Any) -> list[PeerConfig]:
        return [PeerConfig("C" * 43 + "=", (ipaddress.ip_network("100.80.7.7/32"),))]

    @hookimpl
    def meshd_peer_routes(self, agent: Any, members: Any) -> dict[str, list[Any]]:
        return {m.name: [ipaddress.ip_network("10.7.0.0/16")] for m in members}

    @hookimpl
    def meshd_select_path(self, agent: Any, member: Member) -> PathChoice:
        return PathChoice(via="n3")

    @hookimpl
    def meshd_mesh_changed(self, agent: Any, view: MeshView) -> None:
        self.calls.append(f"changed {len(view.peers)}")

    @hookimpl
    def meshd_metrics(self, agent: Any) -> list[MetricSample]:
        return [MetricSample("recorder_things", 3, kind="counter", labels=(("kind", "a"),))]

    @hookimpl
    def meshd_cli(self, group: click.Group) -> None:
        @group.command("recorder")
        def recorder() -> None:
            """A command from a plugin."""


@pytest.fixture
def host_and_recorder() -> tuple[Any, Recorder]:
    recorder = Recorder()
    return build_plugin_host(extra_plugins=[("recorder", recorder)]), recorder


def test_every_hook_of_the_spec_is_implemented_here() -> None:
    specs = {
        n for n, _ in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("meshd_")
    }
    assert specs == {n for n in dir(Recorder) if n.startswith("meshd_")}


def test_every_hookspec_documents_when_and_its_calling_rule() -> None:
    for name, func in inspect.getmembers(hookspecs, inspect.isfunction):
        if name.startswith("meshd_"):
            doc = inspect.getdoc(func) or ""
            assert "Called" in doc, name
            assert "Calling rule" in doc, name


def test_each_hook_changes_what_the_engine_gets(host_and_recorder: Any) -> None:
    host, recorder = host_and_recorder
    agent = FakeAgent()
    host.configure(agent.config)
    host.startup(agent)
    assert host.allocate_address(NET, agent.identity, frozenset()).ipv4 == ipaddress.IPv4Address(
        "100.80.9.9"
    )
    assert host.endpoint_candidates(agent)[0] == "203.0.113.7:51820"
    assert host.node_record(agent).roles == frozenset({"relay"})
    assert host.node_record(agent).routes == ()  # its route is unhealthy: withdrawn
    assert host.admit_peer(agent, MEMBER) == Admission(admit=False, reason="acl says no")
    shaped = host.peer_config(agent, MEMBER, PEER)
    assert ipaddress.ip_network("10.9.0.0/24") in shaped.allowed_ips
    assert shaped.keepalive == 5
    assert host.select_path(agent, MEMBER).via == "n3"
    assert host.peer_routes(agent, [MEMBER]) == {"n2": (ipaddress.ip_network("10.7.0.0/16"),)}
    assert [p.public_key for p in host.extra_peers(agent)] == ["C" * 43 + "="]
    host.mesh_changed(agent, MeshView(agent.identity, (MEMBER,), (PEER,)))
    assert host.metrics(agent) == (
        MetricSample("recorder_things", 3, kind="counter", labels=(("kind", "a"),)),
    )
    group = click.Group()
    host.cli(group)
    assert "recorder" in group.commands
    host.shutdown(agent)
    assert recorder.calls == ["configure n1", "startup", "changed 1", "shutdown"]


def test_a_failing_plugin_is_isolated_in_the_running_loop() -> None:
    class Broken:
        @hookimpl
        def meshd_endpoint_candidates(self, agent: Any) -> list[str]:
            raise RuntimeError("boom")

        @hookimpl
        def meshd_select_path(self, agent: Any, member: Member) -> PathChoice:
            raise RuntimeError("boom")

    host = build_plugin_host(extra_plugins=[("broken", Broken())])
    agent = FakeAgent()
    assert "198.18.0.1:51820" in host.endpoint_candidates(
        agent
    )  # the standard plugin still answers
    # A firstresult hook goes through pluggy; its failure is named, and the engine's
    # policy falls back (direct path) instead of losing the pass.
    with pytest.raises(PluginError, match="meshd_select_path: RuntimeError: boom"):
        host.select_path(agent, MEMBER)
    assert HookPolicy(host, agent).select_path(MEMBER) == PathChoice()


def test_a_plugins_meshd_error_is_reported_as_it_is() -> None:
    class Full:
        @hookimpl(tryfirst=True)
        def meshd_allocate_address(self, network: Any, node: Any, taken: Any) -> None:
            raise ConfigError("no free address left in 100.80.0.0/30", key="plugins.ipam")

    host = build_plugin_host(extra_plugins=[("full", Full())])
    with pytest.raises(ConfigError, match="no free address left"):
        host.allocate_address(NET, FakeAgent().identity, frozenset())


def test_plugins_change_what_desired_compute_gets() -> None:
    """The engine's own computation, driven by a real plugin host: the recorder's answers
    (its admission refusal, then a relay, extra allowed IPs and a keepalive) show up in
    the desired state."""
    agent = FakeAgent()
    own = NodeRecord(public_key=OWN_KEY, addresses=(ipaddress.ip_address("100.80.0.1"),), port=1)

    refusing = build_plugin_host(extra_plugins=[("recorder", Recorder())])
    state = compute(
        own_name="n1", own_record=own, members=[MEMBER], policy=HookPolicy(refusing, agent)
    )
    # Refused, so no peer; the recorder's extra peer (a plain client) is one.
    assert [p.public_key for p in state.peers] == ["C" * 43 + "="]
    assert state.excluded[MEMBER.name] == "not admitted: acl says no"

    class Shaper:
        @hookimpl(tryfirst=True)
        def meshd_admit_peer(self, agent: Any, member: Member) -> Admission:
            return Admission(admit=True)

        @hookimpl
        def meshd_peer_config(self, agent: Any, member: Member, peer: Any) -> PeerPatch:
            return PeerPatch(extra_allowed_ips=(ipaddress.ip_network("10.9.0.0/24"),), keepalive=5)

    shaping = build_plugin_host(extra_plugins=[("shaper", Shaper())])
    state = compute(
        own_name="n1", own_record=own, members=[MEMBER], policy=HookPolicy(shaping, agent)
    )
    (peer,) = state.peers
    assert ipaddress.ip_network("10.9.0.0/24") in peer.allowed_ips
    assert peer.keepalive == 5
