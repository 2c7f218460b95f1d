"""The mDNS advert codec (meshd.mdns): what a node publishes, and what is read back from
anything a LAN neighbour may send."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.errors import DecodeError
from meshd.mdns import Advert, ca_fingerprint, decode_txt, encode_txt

KEY = "A" * 43 + "="
ADVERT = Advert(
    name="n1",
    network_id="4138725422cd2766",
    ca_fingerprint=ca_fingerprint(b"\x01" * 32),
    public_key=KEY,
    addresses=(ipaddress.ip_address("198.18.0.1"),),
    port=51820,
    enrol_port=51821,
)


def read_back(advert: Advert) -> Advert:
    """The advert as a browser reads it: TXT values as bytes, addresses as text."""
    txt = {k.encode(): v.encode() for k, v in encode_txt(advert).items()}
    return decode_txt(txt, [str(a) for a in advert.addresses], advert.port)


def test_an_advert_reads_back_as_published() -> None:
    assert read_back(ADVERT) == ADVERT


def test_an_advert_carries_no_secret_only_these_fields() -> None:
    assert set(encode_txt(ADVERT)) == {"v", "net", "ca", "key", "name", "enrol"}


def test_a_node_that_admits_nobody_advertises_no_enrolment_port() -> None:
    quiet = Advert(**{**ADVERT.__dict__, "enrol_port": None})
    assert "enrol" not in encode_txt(quiet)
    assert read_back(quiet).enrol_port is None


def test_the_ca_fingerprint_is_32_hex_digits_of_the_key() -> None:
    assert len(ADVERT.ca_fingerprint) == 32
    assert ca_fingerprint(b"\x02" * 32) != ADVERT.ca_fingerprint


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({b"v": b"2"}, "not a version 1"),
        ({b"net": b"XYZ"}, "TXT net"),
        ({b"key": b"short"}, "TXT key"),
        ({b"name": b"Bad Name"}, "TXT name"),
        ({b"enrol": b"0"}, "TXT enrol"),
        ({b"enrol": b"\xff"}, "not ASCII"),
    ],
)
def test_a_malformed_advert_is_refused_naming_the_field(
    change: dict[bytes, bytes], message: str
) -> None:
    txt = {k.encode(): v.encode() for k, v in encode_txt(ADVERT).items()} | change
    with pytest.raises(DecodeError, match=message):
        decode_txt(txt, ["198.18.0.1"], 51820)


def test_loopback_and_link_local_addresses_are_not_usable() -> None:
    txt = encode_txt(ADVERT)
    with pytest.raises(DecodeError, match="no usable address"):
        decode_txt(txt, ["127.0.0.1", "169.254.1.1"], 51820)
    assert decode_txt(txt, ["127.0.0.1", "198.18.0.9"], 51820).addresses == (
        ipaddress.ip_address("198.18.0.9"),
    )


def test_a_service_without_a_port_is_refused() -> None:
    with pytest.raises(DecodeError, match="no port"):
        decode_txt(encode_txt(ADVERT), ["198.18.0.1"], None)


names = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
keys = st.from_regex(r"[A-Za-z0-9+/]{43}=", fullmatch=True)


@given(
    name=names,
    key=keys,
    seed=st.binary(min_size=32, max_size=32),
    address=st.ip_addresses(v=4).filter(
        lambda a: not (a.is_loopback or a.is_link_local or a.is_multicast)
    ),
    port=st.integers(1, 65535),
    enrol=st.none() | st.integers(1, 65535),
)
def test_every_advert_round_trips(
    name: str,
    key: str,
    seed: bytes,
    address: ipaddress.IPv4Address,
    port: int,
    enrol: int | None,
) -> None:
    advert = Advert(
        name, seed[:8].hex(), ca_fingerprint(seed), key, (address,), port, enrol_port=enrol
    )
    assert read_back(advert) == advert


@given(
    txt=st.dictionaries(
        st.sampled_from([b"v", b"net", b"ca", b"key", b"name", b"enrol", b"x"]),
        st.none() | st.binary(max_size=70),
    ),
    addresses=st.lists(st.text(max_size=20), max_size=3),
    port=st.none() | st.integers(-5, 70000),
)
def test_anything_a_neighbour_sends_is_an_advert_or_a_decode_error(
    txt: dict[bytes, bytes | None], addresses: list[str], port: int | None
) -> None:
    try:
        advert = decode_txt(txt, addresses, port)
    except DecodeError:
        return
    assert advert.addresses
    assert 0 < advert.port < 65536
