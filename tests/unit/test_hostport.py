"""``host:port`` text: one formatter, one parser, and what they refuse."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.errors import DecodeError, MeshdError
from meshd.hostport import format_host_port, parse_host_port, parse_ip_port

ports = st.integers(1, 65535)
labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
host_names = st.lists(labels, min_size=1, max_size=4).map(".".join)


@given(st.ip_addresses(v=4), ports)
def test_ipv4_round_trips_bare(address: ipaddress.IPv4Address, port: int) -> None:
    text = format_host_port(address, port)
    assert text == f"{address}:{port}"
    assert parse_host_port(text) == (str(address), port)
    assert parse_ip_port(text) == (address, port)


@given(st.ip_addresses(v=6), ports)
def test_ipv6_round_trips_in_brackets(address: ipaddress.IPv6Address, port: int) -> None:
    text = format_host_port(address, port)
    assert text == f"[{address.compressed}]:{port}"
    assert format_host_port(str(address), port) == text  # text or address object alike
    assert parse_host_port(text) == (address.compressed, port)
    assert parse_ip_port(text) == (address, port)


@given(st.ip_addresses(v=6), ports)
def test_ipv6_comes_back_compressed(address: ipaddress.IPv6Address, port: int) -> None:
    assert parse_host_port(f"[{address.exploded}]:{port}") == (address.compressed, port)


@given(host_names, ports)
def test_host_names_round_trip(host: str, port: int) -> None:
    assert parse_host_port(format_host_port(host, port)) == (host, port)


@given(host_names.filter(lambda h: not h.replace(".", "").isdigit()), ports)
def test_a_host_name_is_not_an_ip_port(host: str, port: int) -> None:
    with pytest.raises(DecodeError, match="is not an IP address"):
        parse_ip_port(format_host_port(host, port))


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("192.0.2.1", "is not HOST:PORT"),
        ("host:", "is not HOST:PORT"),
        ("host:http", "is not HOST:PORT"),
        ("host:-1", "is not HOST:PORT"),
        ("h:\uff18\uff10", "is not HOST:PORT"),  # full-width digits pass str.isdigit
        ("host:0", "port out of range"),
        ("host:65536", "port out of range"),
        ("host:99999999999999999999", "port out of range"),
        (":80", "bad host name"),
        ("a b:80", "bad host name"),
        ("h\n:80", "bad host name"),
        ("-host:80", "bad host name"),
        ("host-:80", "bad host name"),
        ("::1:80", "bad host name"),  # IPv6 needs its brackets
        ("[zz]:80", "bad IPv6 address"),
        ("[192.0.2.1]:80", "bad IPv6 address"),
        ("[::1]]:80", "bad IPv6 address"),
    ],
)
def test_bad_text_is_refused_with_a_decode_error(text: str, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason) as caught:
        parse_host_port(text)
    assert str(caught.value).startswith(repr(text))  # callers prefix the value's name
    assert not isinstance(caught.value, MeshdError)  # ...and convert it into their own error


@given(st.text(max_size=40))
def test_any_text_parses_or_is_a_decode_error(text: str) -> None:
    try:
        host, port = parse_host_port(text)
    except DecodeError:
        return
    assert 0 < port < 65536
    assert parse_host_port(format_host_port(host, port)) == (host, port)
