"""The one base64 helper: round trips, padding left off, and strict refusal."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.b64 import decode_b64, encode_b64
from meshd.errors import DecodeError, MeshdError


@given(st.binary(max_size=80))
def test_bytes_round_trip_padded_and_unpadded(data: bytes) -> None:
    assert encode_b64(data) == base64.b64encode(data).decode()
    assert decode_b64(encode_b64(data)) == data
    unpadded = encode_b64(data, padded=False)
    assert "=" not in unpadded
    assert decode_b64(unpadded, padded=False) == data
    assert decode_b64(encode_b64(data), padded=False) == data  # padding is optional there


@given(st.binary(min_size=1, max_size=80).filter(lambda d: len(d) % 3))
def test_padding_is_required_unless_told_otherwise(data: bytes) -> None:
    with pytest.raises(DecodeError, match=r"^not valid base64$"):
        decode_b64(encode_b64(data, padded=False))


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("AAAA AAAA", "not valid base64"),  # a space is refused, not skipped
        ("AAA\n", "not valid base64"),
        ("AA-_", "not valid base64"),  # the URL-safe alphabet is another format
        ("AAAé", "not valid base64"),
        ("A", "not valid base64"),
        (None, "not a string"),
        (b"AAAA", "not a string"),
        (1234, "not a string"),
    ],
)
def test_junk_is_a_decode_error_that_never_repeats_the_text(value: object, reason: str) -> None:
    with pytest.raises(DecodeError, match=rf"^{reason}$") as caught:
        decode_b64(value)
    assert not isinstance(caught.value, MeshdError)
