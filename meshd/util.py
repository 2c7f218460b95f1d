"""Small helpers with no better home: base64 text of bytes."""

from __future__ import annotations

import base64


def b64encode(data: bytes) -> str:
    """Standard base64 of ``data`` as text (as ``wg`` and Serf's keyring print keys)."""
    return base64.b64encode(data).decode("ascii")
