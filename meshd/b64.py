"""Base64 text of bytes (the standard alphabet), written and read in one place.

Keys, the gossip key, certificate chains in enrolment messages and state files,
and the packed fields of a node record travel as base64. The record leaves the
``=`` padding off (every byte of a Serf tag counts), so reading takes
``padded=False`` to accept text with or without it.

Reading is strict: any character outside the alphabet is refused, never skipped.
Bad input raises :class:`meshd.errors.DecodeError` with a message that never
repeats the text (it may be a secret); the caller converts it and names the
value: ``raise StateError(f"gossip key is {exc}") from exc``.
"""

from __future__ import annotations

import base64
import binascii

from meshd.errors import DecodeError


def encode_b64(data: bytes, *, padded: bool = True) -> str:
    """``data`` as base64 text, without the ``=`` padding when ``padded`` is false."""
    text = base64.b64encode(data).decode("ascii")
    return text if padded else text.rstrip("=")


def decode_b64(text: object, *, padded: bool = True) -> bytes:
    """The bytes of base64 ``text``; with ``padded=False`` the padding may be left off."""
    if not isinstance(text, str):
        raise DecodeError("not a string")
    if not padded:
        text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:  # ValueError: a non-ASCII character
        raise DecodeError("not valid base64") from exc
