"""The node-record codec: round trips, the Serf tag size limit, and hostile input.

``decode_record`` turns any exception into a RecordError (a decoder bug must not
stop the membership loop), so a fuzz test through it cannot see a bug: the
hostile-input tests call the decoder inside that safety net instead, where only
the decoder's own refusals are RecordErrors.
"""

from __future__ import annotations

import contextlib
from ipaddress import ip_address, ip_network

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.b64 import encode_b64
from meshd.errors import RecordError
from meshd.gossip import record as record_mod
from meshd.gossip.record import (
    RECORD_KEYS,
    TAGS_LIMIT,
    decode_record,
    encode_record,
    tags_size,
)
from meshd.hostport import format_host_port
from meshd.types import NodeRecord

# The decoder inside decode_record's catch-all: any exception but RecordError is a bug.
decode_unguarded = record_mod._decode

KEY = encode_b64(bytes(range(32)))


def record(**changes: object) -> NodeRecord:
    fields: dict[str, object] = {
        "public_key": KEY,
        "addresses": (ip_address("100.80.0.7"), ip_address("fd00:80::7")),
        "port": 51820,
        "endpoints": ("192.0.2.10:51820", "[2001:db8::10]:51820", "gw.example.net:4500"),
        "roles": frozenset({"relay", "egress"}),
        "routes": (ip_network("10.1.0.0/16"), ip_network("2001:db8:1::/48")),
        "cert": "c1:9f2a",
        "version": 42,
    }
    fields.update(changes)
    return NodeRecord(**fields)  # type: ignore[arg-type]


def test_full_record_round_trips_in_short_tags() -> None:
    tags = encode_record(record())
    assert set(tags) <= RECORD_KEYS
    assert decode_record(tags) == record()
    assert tags["v"] == "42"
    assert tags_size(tags) < TAGS_LIMIT // 2


def test_empty_optional_fields_are_left_out() -> None:
    tags = encode_record(record(endpoints=(), roles=frozenset(), routes=(), cert=""))
    assert set(tags) == {"m", "v", "k", "a", "p"}


def test_foreign_tags_are_ignored_when_decoding() -> None:
    tags = {**encode_record(record()), "role": "web", "dc": "x"}
    assert decode_record(tags) == record()


def test_size_is_measured_as_serf_does() -> None:
    # Old-spec msgpack: a 32-255 byte string has a 3-byte header (no str8).
    assert tags_size({"x": "y" * 31}) == 1 + 1 + 2 + 32
    assert tags_size({"x": "y" * 32}) == 1 + 1 + 2 + 3 + 32


@given(st.dictionaries(st.text(max_size=40), st.text(max_size=300), max_size=20))
def test_size_matches_old_spec_msgpack(tags: dict[str, str]) -> None:
    assert tags_size(tags) == 1 + len(msgpack.packb(tags, use_bin_type=False))


def test_too_big_record_is_refused_with_the_reason() -> None:
    big = record(cert="c" * 600)
    with pytest.raises(RecordError, match="512-byte limit"):
        encode_record(big)


def test_extra_tags_count_against_the_limit() -> None:
    tags = encode_record(record())
    room = TAGS_LIMIT - tags_size(tags)
    with pytest.raises(RecordError, match="limit"):
        encode_record(record(), extra_tags={"zz": "q" * room})
    encode_record(record(), extra_tags={"zz": "q" * (room - 10)})


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"public_key": "short"}, "public key"),
        ({"addresses": ()}, "address"),
        ({"port": 0}, "port"),
        ({"version": -1}, "version"),
        ({"roles": frozenset({"Bad Role"})}, "role"),
        ({"endpoints": ("",)}, "endpoint"),
    ],
)
def test_invalid_records_are_refused(change: dict[str, object], reason: str) -> None:
    with pytest.raises(RecordError, match=reason):
        encode_record(record(**change))


def test_non_canonical_endpoint_text_survives_verbatim() -> None:
    odd = record(endpoints=("[192.0.2.1]:51820", "[FD00::1]:7", "192.0.2.1:0"))
    assert decode_record(encode_record(odd)).endpoints == odd.endpoints


@pytest.mark.parametrize(
    ("tags", "reason"),
    [
        ({}, "no meshd record"),
        ({"m": "2"}, "not supported"),
        ({**encode_record(record()), "k": "!!"}, "base64"),
        ({**encode_record(record()), "p": "70000"}, "port"),
        ({**encode_record(record()), "a": "BQ"}, "family"),
        ({**encode_record(record()), "a": "BGRQ"}, "truncated"),
        ({**encode_record(record()), "n": "BAcL"}, "routes"),
        ({**encode_record(record()), "r": "a,,b"}, "roles"),
        ({**encode_record(record()), "v": "-1"}, "version"),
    ],
)
def test_malformed_tags_give_a_record_error(tags: dict[str, str], reason: str) -> None:
    with pytest.raises(RecordError, match=reason):
        decode_record(tags)


# ---- properties

keys = st.binary(min_size=32, max_size=32).map(lambda b: encode_b64(b))
v4 = st.ip_addresses(v=4)
v6 = st.ip_addresses(v=6)
addresses = st.lists(st.one_of(v4, v6), min_size=1, max_size=3).map(tuple)
ports = st.integers(1, 65535)


endpoints = st.one_of(
    st.builds(format_host_port, st.one_of(v4, v6), ports),
    st.text(min_size=1, max_size=40).filter(lambda s: len(s.encode()) <= 255),
)
roles = st.frozensets(st.from_regex(r"[a-z0-9_-]{1,12}", fullmatch=True), max_size=4)
routes = st.one_of(
    st.builds(lambda a, p: ip_network((a, p), strict=False), v4, st.integers(0, 32)),
    st.builds(lambda a, p: ip_network((a, p), strict=False), v6, st.integers(0, 128)),
)
records = st.builds(
    NodeRecord,
    public_key=keys,
    addresses=addresses,
    port=ports,
    endpoints=st.lists(endpoints, max_size=4).map(tuple),
    roles=roles,
    routes=st.lists(routes, max_size=6).map(tuple),
    cert=st.text(max_size=80),
    version=st.integers(0, 2**64 - 1),
)


@settings(max_examples=400)
@given(records)
def test_every_valid_record_round_trips_or_is_refused_as_too_big(rec: NodeRecord) -> None:
    try:
        tags = encode_record(rec)
    except RecordError as exc:
        error = str(exc)
    else:
        assert tags_size(tags) <= TAGS_LIMIT
        assert decode_record(tags) == rec
        return
    assert "limit" in error


@given(
    records.map(
        lambda r: NodeRecord(
            r.public_key, r.addresses[:1], r.port, r.endpoints[:2], r.roles, r.routes[:2], "", 1
        )
    )
)
def test_small_records_always_fit(rec: NodeRecord) -> None:
    assert decode_record(encode_record(rec)) == rec


tag_values = st.one_of(
    st.text(max_size=60),
    st.binary(max_size=60).map(lambda b: encode_b64(b, padded=False)),
    st.integers().map(str),
)


@settings(max_examples=400)
@given(
    st.dictionaries(
        st.sampled_from([*sorted(RECORD_KEYS), "x"]),
        st.one_of(st.none(), tag_values),
        max_size=len(RECORD_KEYS) + 1,
    )
)
def test_random_tag_maps_never_crash_the_decoder(changes: dict[str, str | None]) -> None:
    # From a valid record, so that most maps get past the first check to the deeper fields.
    tags = encode_record(record())
    for key, value in changes.items():
        if value is None:
            tags.pop(key, None)
        else:
            tags[key] = value
    with contextlib.suppress(RecordError):
        decode_unguarded(tags)


@settings(max_examples=400)
@given(st.sampled_from("kaenrpvc"), st.binary(max_size=80))
def test_random_bytes_in_any_field_never_crash_the_decoder(key: str, data: bytes) -> None:
    tags = encode_record(record())
    tags[key] = encode_b64(data, padded=False)
    with contextlib.suppress(RecordError):
        decode_unguarded(tags)


@given(st.one_of(st.none(), st.integers(), st.lists(st.integers()), st.binary()))
def test_non_maps_and_non_string_values_give_a_record_error(value: object) -> None:
    with pytest.raises(RecordError):
        decode_unguarded(value)  # type: ignore[arg-type]
    with pytest.raises(RecordError):
        decode_unguarded({"m": "1", "k": value, "a": value, "p": value, "v": value})  # type: ignore[dict-item]


def test_the_wire_format_does_not_drift() -> None:
    # Other nodes, of other versions, read these bytes: a change of encoder must not change them.
    known = NodeRecord(
        public_key=encode_b64(bytes(range(32))),
        addresses=(ip_address("100.64.0.1"), ip_address("fd00::1")),
        port=51820,
        endpoints=("192.0.2.1:51820", "[2001:db8::1]:5", "host.example:7", "[::ffff:1.2.3.4]:9"),
        routes=(ip_network("10.9.0.0/16"), ip_network("2001:db8::/33"), ip_network("0.0.0.0/0")),
        roles=frozenset({"gw"}),
        cert="abc",
        version=7,
    )
    tags = {
        "a": "BGRAAAEG/QAAAAAAAAAAAAAAAAAAAQ",
        "c": "abc",
        "e": "BMAAAgHKbAYgAQ24AAAAAAAAAAAAAAABAAUADmhvc3QuZXhhbXBsZTo3ABJbOjpmZmZmOjEuMi4zLjRdOjk",
        "k": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8",
        "m": "1",
        "n": "BBAKCQYhIAENuAAEAA",
        "p": "51820",
        "r": "gw",
        "v": "7",
    }
    assert encode_record(known) == tags
    assert decode_record(tags) == known


def test_a_decoder_bug_still_reaches_the_caller_as_a_record_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(tags: object) -> NodeRecord:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(record_mod, "_decode", broken)
    with pytest.raises(RecordError, match="undecodable record: ZeroDivisionError") as caught:
        decode_record(encode_record(record()))
    assert isinstance(caught.value.__cause__, ZeroDivisionError)
