"""WireGuard keys: byte-compatible with wg(8), malformed keys refused clearly."""

from __future__ import annotations

import contextlib
import shutil
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.errors import IdentityError
from meshd.identity import WireGuardKeyPair, decode_key, public_key_of

WG = shutil.which("wg")


@pytest.mark.skipif(WG is None, reason="wg (wireguard-tools) is not installed")
def test_public_key_matches_wg_pubkey() -> None:
    for _ in range(5):
        pair = WireGuardKeyPair.generate()
        out = subprocess.run(
            [WG, "pubkey"], input=pair.private_key, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == pair.public_key


@pytest.mark.skipif(WG is None, reason="wg (wireguard-tools) is not installed")
def test_wg_genkey_output_is_accepted() -> None:
    private = subprocess.run([WG, "genkey"], capture_output=True, text=True, check=True).stdout
    expected = subprocess.run(
        [WG, "pubkey"], input=private, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert public_key_of(private) == expected


def test_private_key_is_not_in_repr() -> None:
    pair = WireGuardKeyPair.generate()
    assert pair.private_key not in repr(pair)


@pytest.mark.parametrize(
    ("text", "reason"),
    [("not base64!!", "not valid base64"), ("AAAA", "32 bytes"), ("", "32 bytes")],
)
def test_malformed_keys_are_refused(text: str, reason: str) -> None:
    with pytest.raises(IdentityError, match=reason):
        decode_key(text)


@given(st.text(max_size=80))
def test_decode_key_never_raises_anything_else(text: str) -> None:
    with contextlib.suppress(IdentityError):
        assert len(decode_key(text)) == 32
