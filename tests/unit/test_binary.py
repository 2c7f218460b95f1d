"""The shared binary codec: what the writer writes the reader reads back, and nothing else."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.binary import MAX_U64, BinaryReader, BinaryWriter
from meshd.errors import DecodeError, MeshdError

# (method name, strategy of values) for every field the format has.
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "u8": st.integers(0, 0xFF),
    "u16": st.integers(0, 0xFFFF),
    "u32": st.integers(0, 0xFFFF_FFFF),
    "u64": st.integers(0, MAX_U64),
    "short_bytes": st.binary(max_size=0xFF),
    "long_bytes": st.binary(max_size=600),
    "text": st.text(max_size=60).filter(lambda t: len(t.encode()) <= 0xFF),
    "address": st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
}
values = st.lists(
    st.sampled_from(sorted(FIELDS)).flatmap(lambda kind: st.tuples(st.just(kind), FIELDS[kind])),
    max_size=12,
)


def write(items: list[tuple[str, Any]]) -> bytes:
    writer = BinaryWriter().header(b"MT", 3)
    for kind, value in items:
        getattr(writer, kind)(value)
    return writer.getvalue()


def read(data: bytes, items: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    reader = BinaryReader(data, "test value")
    reader.header(b"MT", 3)
    found = [(kind, getattr(reader, kind)()) for kind, _ in items]
    reader.end()
    return found


@given(values)
def test_every_field_reads_back_as_written(items: list[tuple[str, Any]]) -> None:
    assert read(write(items), items) == items


@given(values, st.data())
def test_a_cut_encoding_is_a_decode_error_naming_the_value(
    items: list[tuple[str, Any]], data: st.DataObject
) -> None:
    encoded = write(items)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(DecodeError, match=r"^malformed test value: truncated$"):
        read(encoded[:cut], items)


@given(values, st.binary(min_size=1, max_size=8))
def test_trailing_bytes_are_refused(items: list[tuple[str, Any]], junk: bytes) -> None:
    with pytest.raises(DecodeError, match=f"{len(junk)} unexpected trailing bytes"):
        read(write(items) + junk, items)


@pytest.mark.parametrize(
    ("data", "field", "reason"),
    [
        (b"XX\x03", "text", "wrong magic"),
        (b"MT\x04", "text", "unsupported format version 4"),
        (b"MT\x03\x05", "address", "unknown address family 5"),
        (b"MT\x03\x02\xff\xfe", "text", "text is not UTF-8"),
    ],
)
def test_junk_is_a_decode_error_the_caller_converts(data: bytes, field: str, reason: str) -> None:
    def read() -> None:
        reader = BinaryReader(data, "test value")
        reader.header(b"MT", 3)
        getattr(reader, field)()

    with pytest.raises(DecodeError, match=reason) as caught:
        read()
    assert not isinstance(caught.value, MeshdError)


def test_u64_above_the_signed_range_is_refused() -> None:
    reader = BinaryReader(BinaryWriter().u64(MAX_U64 + 1).getvalue(), "time")
    with pytest.raises(DecodeError, match="number out of range"):
        reader.u64()


@pytest.mark.parametrize(
    ("kind", "value", "reason"),
    [
        ("u8", 256, "a byte holds 0 to 255"),
        ("u8", -1, "a byte holds 0 to 255"),
        ("u16", 0x1_0000, "does not fit 2 bytes"),
        ("u32", -1, "does not fit 4 bytes"),
        ("u64", 2**64, "does not fit 8 bytes"),
        ("short_bytes", bytes(256), "at most 255 bytes"),
        ("long_bytes", bytes(0x1_0000), "at most 65535 bytes"),
        ("text", "é" * 128, "at most 255 bytes"),
    ],
)
def test_a_value_the_format_cannot_hold_is_a_value_error(
    kind: str, value: Any, reason: str
) -> None:
    with pytest.raises(ValueError, match=reason) as caught:
        getattr(BinaryWriter(), kind)(value)
    assert not isinstance(caught.value, DecodeError)


def test_the_encoding_is_big_endian_and_length_prefixed() -> None:
    data = (
        BinaryWriter()
        .u16(0x0102)
        .short_bytes(b"ab")
        .address(ipaddress.ip_address("10.0.0.1"))
        .getvalue()
    )
    assert data == b"\x01\x02\x02ab\x04\x0a\x00\x00\x01"
