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
)
from meshd_zeroconf import ZeroconfPlugin, lan_addresses, lan_path

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

    def __init__(self) -> None:
        self.refreshed = 0

    def refresh(self) -> None:
        self.refreshed += 1


def test_it_runs_on_lan_ipv4_addresses_only_never_mesh_loopback_or_link_local() -> None:
    assert lan_addresses(FakeAgent()) == (ipaddress.ip_address("192.168.1.10"),)  # type: ignore[arg-type]


def test_a_member_heard_on_this_lan_is_reached_at_its_own_lan_endpoint() -> None:
    assert lan_path(MEMBER, ADVERT) == PathChoice(
        endpoint="192.168.1.20:51820", label="direct (LAN)", reason="heard on this LAN by mDNS"
    )


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


def test_only_this_networks_adverts_of_others_are_kept_and_each_news_refreshes() -> None:
    plugin, agent = ZeroconfPlugin(), FakeAgent()
    plugin._agent = agent  # type: ignore[assignment]
    plugin.on_advert(replace(ADVERT, network_id="0" * 16))
    plugin.on_advert(replace(ADVERT, ca_fingerprint="d" * 32))
    plugin.on_advert(replace(ADVERT, public_key=OWN_KEY))
    assert (plugin.heard, agent.refreshed) == ({}, 0)
    plugin.on_advert(ADVERT)
    plugin.on_advert(ADVERT)  # heard again, unchanged: no new pass
    assert (plugin.heard, agent.refreshed) == ({KEY: ADVERT}, 1)
    assert plugin.meshd_select_path(agent, MEMBER) == lan_path(MEMBER, ADVERT)  # type: ignore[arg-type]
    plugin.on_gone(ADVERT.instance)
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
