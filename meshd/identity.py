"""Node keys: WireGuard X25519 key pairs, byte-compatible with ``wg genkey``/``wg pubkey``.

Keys travel as the standard base64 of their 32 bytes, exactly as ``wg`` prints them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nacl.bindings import crypto_scalarmult_base
from nacl.utils import random

from meshd.b64 import decode_b64, encode_b64
from meshd.errors import DecodeError, IdentityError

KEY_LEN = 32


def _clamp(secret: bytes) -> bytes:
    # The X25519 clamp, as `wg genkey` applies it before printing the key.
    clamped = bytearray(secret)
    clamped[0] &= 248
    clamped[31] = (clamped[31] & 127) | 64
    return bytes(clamped)


def decode_key(text: str, *, what: str = "key") -> bytes:
    """The 32 bytes of a base64 WireGuard key; IdentityError names what was wrong."""
    cleaned = text.strip()
    try:
        raw = decode_b64(cleaned)
    except DecodeError as exc:
        raise IdentityError(f"{what} is {exc}") from exc
    if len(raw) != KEY_LEN or len(cleaned) != 44:
        raise IdentityError(f"{what} must be 32 bytes (44 base64 characters), got {len(raw)} bytes")
    return raw


def encode_key(raw: bytes) -> str:
    if len(raw) != KEY_LEN:
        raise IdentityError(f"a key must be 32 bytes, got {len(raw)}")
    return encode_b64(raw)


def public_key_of(private_key: str) -> str:
    """The public key of a base64 private key, as ``wg pubkey`` computes it."""
    return encode_key(crypto_scalarmult_base(_clamp(decode_key(private_key, what="private key"))))


@dataclass(frozen=True)
class WireGuardKeyPair:
    private_key: str = field(repr=False)
    public_key: str

    @classmethod
    def generate(cls) -> WireGuardKeyPair:
        private = encode_key(_clamp(random(KEY_LEN)))
        return cls(private_key=private, public_key=public_key_of(private))

    @classmethod
    def from_private(cls, private_key: str) -> WireGuardKeyPair:
        return cls(private_key=private_key.strip(), public_key=public_key_of(private_key))
