"""The zeroconf plugin's decisions: which LAN addresses it runs on, and when an advert
heard on the LAN becomes a member's path (certified member, its key, its own endpoint)."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from meshd import (
    Advert,
    ConfigError,
    ConfigView,
    Member,
    MemberState,
    Network,
    NodeIdentity,
    NodeRecord,
    PathChoice,
    PeerStats,
)
from meshd_zeroconf import (
    SILENT_LIMIT,
    Trial,
    ZeroconfPlugin,
    choose_lan,
    judge,
    lan_addresses,
    lan_networks,
)

OWN_KEY = "B" * 43 + "="
KEY = "A" * 43 + "="
NET = Network("lab", "4138725422cd2766", ipaddress.ip_network("100.80.0.0/16"))
FP = "c" * 32
RECORD = NodeRecord(
    public_key=KEY,
    addresses=(ipaddress.ip_address("100.80.0.2"),),
    port=51820,
    endpoints=("203.0.113.9:40000", "192.168.1.20:51820"),
)
MEMBER = Member("n2", "100.80.0.2", MemberState.ALIVE, RECORD, certified=True)
ADVERT = Advert("n2", NET.network_id, FP, KEY, (ipaddress.ip_address("192.168.1.20"),), 51820, None)


class FakeAgent:
    identity = NodeIdentity("n1", OWN_KEY)
    network = NET
    ca_fingerprint = FP
    enrol_port = 51821
    listen_port = 51820
    local_addresses: tuple[Any, ...] = tuple(
        ipaddress.ip_address(a)
        for a in ("192.168.1.10", "100.80.0.1", "127.0.0.1", "169.254.0.3", "2001:db8::1")
    )
    local_networks: tuple[Any, ...] = tuple(
        ipaddress.ip_network(n)
        for n in ("192.168.1.0/24", "100.80.0.0/16", "127.0.0.0/8", "169.254.0.0/16")
    )

    def __init__(self) -> None:
        self.refreshed = 0

    def refresh(self) -> None:
        self.refreshed += 1


def test_it_runs_on_lan_ipv4_addresses_only_never_mesh_loopback_or_link_local() -> None:
    assert lan_addresses(FakeAgent()) == (ipaddress.ip_address("192.168.1.10"),)  # type: ignore[arg-type]


LAN_PATH = PathChoice(
    endpoint="192.168.1.20:51820", label="direct (LAN)", reason="heard on this LAN by mDNS"
)


def lan_path(member: Member, advert: Advert | None) -> PathChoice | None:
    return choose_lan(member, {} if advert is None else {"n2-x": advert}, {}, 0.0)


def test_a_member_heard_on_this_lan_is_reached_at_its_own_lan_endpoint() -> None:
    assert lan_path(MEMBER, ADVERT) == LAN_PATH


def test_an_endpoint_that_failed_is_left_until_its_retry_time_for_the_next_one() -> None:
    forged = replace(ADVERT, addresses=(ipaddress.ip_address("203.0.113.9"),))
    record = replace(RECORD, endpoints=("203.0.113.9:51820", "192.168.1.20:51820"))
    member = replace(MEMBER, record=record)
    adverts = {"a-forged": forged, "n2-x": ADVERT}
    first = choose_lan(member, adverts, {}, 100.0)
    assert first is not None
    assert first.endpoint == "203.0.113.9:51820"
    assert choose_lan(member, adverts, {"203.0.113.9:51820": 160.0}, 100.0) == LAN_PATH
    assert choose_lan(member, adverts, {"203.0.113.9:51820": 160.0}, 160.0) == first


@pytest.mark.parametrize(
    ("member", "advert", "why"),
    [
        (MEMBER, None, "nothing heard"),
        (replace(MEMBER, certified=False), ADVERT, "not certified"),
        (MEMBER, replace(ADVERT, public_key=OWN_KEY), "another key than the certified one"),
        (
            MEMBER,
            replace(ADVERT, addresses=(ipaddress.ip_address("192.168.1.66"),)),
            "an address the member does not publish (a forged advert)",
        ),
        (replace(MEMBER, record=replace(RECORD, port=51999)), ADVERT, "another port"),
    ],
)
def test_an_advert_that_does_not_fit_the_certified_member_is_ignored(
    member: Member, advert: Advert | None, why: str
) -> None:
    assert lan_path(member, advert) is None, why


def test_of_a_member_on_two_lans_the_address_on_this_machines_link_is_chosen() -> None:
    # nb-2: a gateway got a second LAN for a phone and advertised both addresses, the new
    # one first; its neighbours reached it there, "network is unreachable".
    phone_side = ipaddress.ip_address("192.168.99.1")
    advert = replace(ADVERT, addresses=(phone_side, ipaddress.ip_address("192.168.1.20")))
    record = replace(RECORD, endpoints=("192.168.99.1:51820", "192.168.1.20:51820"))
    member = replace(MEMBER, record=record)
    plugin, agent = ZeroconfPlugin(), FakeAgent()
    plugin.heard = {KEY: {"n2-x": advert}}
    assert plugin.meshd_select_path(agent, member) == LAN_PATH  # type: ignore[arg-type]
    assert lan_networks(agent) == (ipaddress.ip_network("192.168.1.0/24"),)  # type: ignore[arg-type]
    # Only its other link's address: no LAN path here (the other plugins choose).
    plugin.heard = {KEY: {"n2-x": replace(advert, addresses=(phone_side,))}}
    assert plugin.meshd_select_path(agent, member) is None  # type: ignore[arg-type]
    # Without the networks (a caller that has none), every advertised address counts.
    assert choose_lan(member, {"n2-x": advert}, {}, 0.0) is not None


def test_only_this_networks_adverts_of_others_are_kept_and_each_news_refreshes() -> None:
    plugin, agent = ZeroconfPlugin(), FakeAgent()
    plugin._agent = agent  # type: ignore[assignment]
    plugin.on_advert("x", replace(ADVERT, network_id="0" * 16))
    plugin.on_advert("x", replace(ADVERT, ca_fingerprint="d" * 32))
    plugin.on_advert("x", replace(ADVERT, public_key=OWN_KEY))
    assert (plugin.heard, agent.refreshed) == ({}, 0)
    plugin.on_advert("n2-x", ADVERT)
    plugin.on_advert("n2-x", ADVERT)  # heard again, unchanged: no new pass
    assert (plugin.heard, agent.refreshed) == ({KEY: {"n2-x": ADVERT}}, 1)
    assert plugin.meshd_select_path(agent, MEMBER) == LAN_PATH  # type: ignore[arg-type]
    assert plugin.chosen == {KEY: ("n2", "192.168.1.20:51820")}
    plugin.on_gone("n2-x")
    assert (plugin.heard, agent.refreshed) == ({}, 2)
    assert plugin.meshd_select_path(agent, MEMBER) is None  # type: ignore[arg-type]


def config(section: dict[str, Any]) -> ConfigView:
    return ConfigView("/etc/meshd/meshd.toml", "n1", Path("/tmp"), {"zeroconf": section})


def test_its_settings_are_read_and_bad_ones_refused_by_name() -> None:
    plugin = ZeroconfPlugin()
    plugin.meshd_configure(config({"advertise": False}))
    assert (plugin.advertise, plugin.browse) == (False, True)
    with pytest.raises(ConfigError, match=r"plugins\.zeroconf\.browse.*true or false"):
        plugin.meshd_configure(config({"browse": "yes"}))
    with pytest.raises(ConfigError, match=r"plugins\.zeroconf\.interfaces.*unknown key"):
        plugin.meshd_configure(config({"interfaces": ["eth0"]}))


def stats(tx: int, rx: int, endpoint: str = "192.168.1.20:51820") -> PeerStats:
    return PeerStats(KEY, endpoint, 1.0, rx_bytes=rx, tx_bytes=tx)


LAN = "192.168.1.20:51820"


def test_a_lan_path_works_when_the_peers_packets_come_from_there() -> None:
    verdict, trial = judge(None, LAN, stats(100, 100), 0.0)
    assert (verdict, trial) == ("wait", Trial(LAN, 0.0, 100, 100))
    assert judge(trial, LAN, stats(200, 180), 3.0) == ("ok", Trial(LAN, 3.0, 200, 180))


def test_a_lan_path_fails_when_this_node_sends_and_nothing_comes_back() -> None:
    trial = Trial(LAN, 0.0, 100, 100)
    assert judge(trial, LAN, stats(900, 100), SILENT_LIMIT - 1) == ("wait", trial)
    assert judge(trial, LAN, stats(900, 100), SILENT_LIMIT)[0] == "failed"
    # The peer's packets came, but from elsewhere (WireGuard moved the endpoint there).
    elsewhere = stats(900, 500, endpoint="198.18.0.1:40000")
    assert judge(trial, LAN, elsewhere, SILENT_LIMIT)[0] == "failed"


def test_with_persistent_keepalives_a_pair_gets_one_interval_more_before_it_fails() -> None:
    """Only keepalives flowing: ours went out in the window, the peer's is due within
    its interval (a keepalive gets no answer). Found in a 40-node lab, where working
    LAN paths were dropped every few minutes."""
    trial = Trial(LAN, 0.0, 100, 100)
    keepalives = PeerStats(KEY, LAN, 1.0, rx_bytes=100, tx_bytes=132, keepalive=25)
    assert judge(trial, LAN, keepalives, SILENT_LIMIT + 20) == ("wait", trial)
    assert judge(trial, LAN, keepalives, SILENT_LIMIT + 25)[0] == "failed"
    answered = PeerStats(KEY, LAN, 1.0, rx_bytes=132, tx_bytes=132, keepalive=25)
    assert judge(trial, LAN, answered, SILENT_LIMIT + 20)[0] == "ok"
    # The peer's keepalive came, from another endpoint (a forged advert's address is not
    # the peer's): no need to wait the longer limit.
    moved = PeerStats(KEY, "198.18.0.4:51820", 1.0, rx_bytes=132, tx_bytes=132, keepalive=25)
    assert judge(trial, LAN, moved, SILENT_LIMIT - 1) == ("wait", trial)
    assert judge(trial, LAN, moved, SILENT_LIMIT)[0] == "failed"


def test_an_idle_pair_proves_nothing_and_starts_a_new_window() -> None:
    trial = Trial(LAN, 0.0, 100, 100)
    assert judge(trial, LAN, stats(100, 100), SILENT_LIMIT + 5) == (
        "wait",
        Trial(LAN, SILENT_LIMIT + 5, 100, 100),
    )
    other = "192.168.1.21:51820"
    assert judge(trial, other, stats(900, 100), 99.0) == ("wait", Trial(other, 99.0, 900, 100))


def test_a_confirmed_lan_path_is_read_seldom_and_one_on_trial_often(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio

    import meshd_zeroconf

    monkeypatch.setattr(meshd_zeroconf, "WATCH_INTERVAL", 0.001)
    monkeypatch.setattr(meshd_zeroconf, "CONFIRMED_WATCH", 3600.0)

    class Counting(FakeAgent):
        reads = 0
        rx = 100

        async def peer_stats(self) -> tuple[PeerStats, ...]:
            self.reads += 1
            self.rx += 10  # the peer's packets keep coming from the LAN endpoint
            return (stats(self.reads * 10, self.rx),)

    agent = Counting()
    plugin = ZeroconfPlugin()
    plugin.chosen[KEY] = ("n2", LAN)

    async def run_for(seconds: float) -> None:
        task = asyncio.create_task(plugin.watch(agent))  # type: ignore[arg-type]
        await asyncio.sleep(seconds)
        task.cancel()

    asyncio.run(run_for(0.2))
    # Two reads: the first opens the trial, the second sees the peer's packets there;
    # then the path is confirmed and not read again within CONFIRMED_WATCH.
    assert agent.reads == 2
    assert plugin.confirmed == {KEY: LAN}

    plugin.chosen[KEY] = ("n2", "192.168.1.21:51820")  # another endpoint: on trial again
    asyncio.run(run_for(0.2))
    assert agent.reads > 2
