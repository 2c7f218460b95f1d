"""The standard endpoints plugin reads its advertised endpoints with the one host:port parser."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from meshd import ConfigError, ConfigView
from meshd_endpoints import EndpointsPlugin


def configure(**section: Any) -> EndpointsPlugin:
    plugin = EndpointsPlugin()
    plugin.meshd_configure(ConfigView("meshd.toml", "n1", Path("/tmp"), {"endpoints": section}))
    return plugin


def test_advertised_endpoints_are_kept_in_order() -> None:
    plugin = configure(advertise=["198.51.100.7:51820", "[2001:db8::7]:51820", "gw.example:4500"])
    assert plugin.advertise == (
        "198.51.100.7:51820",
        "[2001:db8::7]:51820",
        "gw.example:4500",
    )


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (["198.51.100.7"], "'198.51.100.7' is not HOST:PORT"),
        (["gw.example:0"], "port out of range"),
        (["2001:db8::7:51820"], "bad host name"),  # IPv6 needs its brackets
        (["a:b:c"], "is not HOST:PORT"),
        ("gw.example:4500", 'list of "host:port" strings'),
        ([4500], 'list of "host:port" strings'),
    ],
)
def test_a_bad_advertised_endpoint_names_file_key_and_reason(value: object, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as caught:
        configure(advertise=value)
    assert caught.value.file == "meshd.toml"
    assert caught.value.key == "plugins.endpoints.advertise"
