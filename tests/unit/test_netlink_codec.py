"""meshd.netlink's wire format: attributes and messages as the kernel lays them out."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from meshd.netlink import attribute, message, parse_attributes, parse_messages

kinds = st.integers(min_value=0, max_value=0x3FFF)
values = st.binary(max_size=64)


def test_an_attribute_is_length_type_value_padded_to_four_bytes():
    assert attribute(3, b"wg0\0") == struct.pack("=HH", 8, 3) + b"wg0\0"
    assert attribute(4, b"\x01") == struct.pack("=HH", 5, 4) + b"\x01\0\0\0"


def test_the_nested_and_byte_order_flags_are_not_part_of_the_type():
    nested = struct.pack("=HH", 8, 0x8000 | 18) + b"abcd"
    assert parse_attributes(nested) == {18: b"abcd"}


@given(st.dictionaries(kinds, values, max_size=8))
def test_attributes_round_trip(attrs):
    data = b"".join(attribute(kind, value) for kind, value in attrs.items())
    assert parse_attributes(data) == attrs


@given(st.dictionaries(kinds, values, min_size=1, max_size=8), st.data())
def test_a_truncated_run_keeps_the_whole_attributes_before_the_cut(attrs, data):
    encoded = [attribute(kind, value) for kind, value in attrs.items()]
    whole = b"".join(encoded)
    cut = data.draw(st.integers(min_value=0, max_value=len(whole) - 1))
    complete = 0
    offset = 0
    for one in encoded:
        unpadded = struct.unpack_from("=H", one)[0]
        if offset + unpadded > cut:
            break
        complete += 1
        offset += len(one)
    expected = dict(list(attrs.items())[:complete])
    assert parse_attributes(whole[:cut]) == expected


@given(st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1), values), max_size=6))
def test_messages_round_trip(messages):
    data = b"".join(
        message(kind, 0, seq, body + b"\0" * (-len(body) % 4)) for kind, seq, body in messages
    )
    parsed = list(parse_messages(data))
    assert [(k, s) for k, s, _ in parsed] == [(k, s) for k, s, _ in messages]
    assert [p[: len(b)] for (_, _, p), (_, _, b) in zip(parsed, messages, strict=True)] == [
        b for _, _, b in messages
    ]


def test_a_message_claiming_more_than_the_datagram_holds_is_dropped():
    data = message(16, 0, 7, b"abcd")
    assert list(parse_messages(data[:-1])) == []
    header_only = struct.pack("=IHHII", 4, 16, 0, 7, 0)  # a length below the header's own
    assert list(parse_messages(header_only)) == []
