"""The gateway plugin's choices: one primary per prefix, the same on every node."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.errors import ConfigError
from meshd.types import ConfigView, Member, MemberState, NodeRecord
from meshd_gateway import GatewayPlugin, primaries

LAN = ipaddress.ip_network("192.168.50.0/24")


def gateway(
    name: str, key: str, state: MemberState = MemberState.ALIVE, *, approved: bool = True
) -> Member:
    record = NodeRecord(
        public_key=key, addresses=(ipaddress.ip_address("100.80.0.9"),), port=1, routes=(LAN,)
    )
    return Member(name, "", state, record, approved_routes=(LAN,) if approved else ())


KEYS = sorted(f"{c}" * 43 + "=" for c in "ABCDEF")


@given(st.permutations(range(4)), st.lists(st.booleans(), min_size=4, max_size=4))
def test_every_order_gives_the_same_primary_alive_first_then_lowest_key(
    order: list[int], alive: list[bool]
) -> None:
    members = [
        gateway(f"g{i}", KEYS[i], MemberState.ALIVE if alive[i] else MemberState.FAILED)
        for i in order
    ]
    chosen = primaries(members)[LAN]
    ranked = sorted(range(4), key=lambda i: (not alive[i], KEYS[i]))
    assert chosen.name == f"g{ranked[0]}"


def test_unapproved_and_own_prefixes_are_never_chosen() -> None:
    assert primaries([gateway("g0", KEYS[0], approved=False)]) == {}
    assert primaries([gateway("g0", KEYS[0])], exclude=frozenset({LAN})) == {}


def test_failover_moves_the_prefix_and_it_comes_back() -> None:
    a, b = gateway("a", KEYS[0]), gateway("b", KEYS[1])
    assert primaries([b, a])[LAN].name == "a"
    assert primaries([b, dataclasses.replace(a, state=MemberState.FAILED)])[LAN].name == "b"
    assert primaries([a, b])[LAN].name == "a"


def test_config_is_checked_key_by_key(tmp_path: Path) -> None:
    plugin = GatewayPlugin()

    def configure(**section: object) -> None:
        plugin.meshd_configure(ConfigView("/etc/meshd.toml", "n1", tmp_path, {"gateway": section}))

    configure(routes=["10.1.0.0/24"], masquerade=False)
    assert plugin.advertised() == (ipaddress.ip_network("10.1.0.0/24"),)
    assert not plugin.masquerade
    with pytest.raises(
        ConfigError, match=r"plugins\.gateway\.routes.*'10\.1\.0\.1/24' is not a prefix"
    ):
        configure(routes=["10.1.0.1/24"])
    with pytest.raises(ConfigError, match=r"plugins\.gateway\.acept_routes.*unknown key"):
        configure(acept_routes=True)


def test_routes_advertised_from_the_command_line_are_kept_in_the_state_dir(tmp_path: Path) -> None:
    plugin = GatewayPlugin()
    plugin.meshd_configure(ConfigView(None, "n1", tmp_path, {}))
    plugin.write_file([LAN], None)
    again = GatewayPlugin()
    again.meshd_configure(ConfigView(None, "n1", tmp_path, {"gateway": {"routes": ["10.0.0.0/8"]}}))
    assert again.advertised() == (ipaddress.ip_network("10.0.0.0/8"), LAN)


def test_the_client_config_is_what_wg_quick_reads() -> None:
    from meshd_gateway import wg_quick_config

    text = wg_quick_config(
        {
            "private_key": "P" * 43 + "=",
            "address": "100.80.255.254",
            "gateway_public_key": "G" * 43 + "=",
            "gateway_endpoint": "198.18.0.4:51820",
            "allowed_ips": ["100.80.0.0/16"],
        }
    )
    assert text.splitlines() == [
        "[Interface]",
        "PrivateKey = " + "P" * 43 + "=",
        "Address = 100.80.255.254/32",
        "",
        "[Peer]",
        "PublicKey = " + "G" * 43 + "=",
        "Endpoint = 198.18.0.4:51820",
        "AllowedIPs = 100.80.0.0/16",
        "PersistentKeepalive = 25",
    ]
