"""Node names as DNS labels, and zone names: pure functions.

Rules of :func:`base_label` (one name, on its own):

- NFKC-normalised and lower-cased; every run of characters other than ``a-z``,
  ``0-9`` and non-ASCII letters (spaces, ``_``, ``.``, punctuation) becomes one ``-``;
  leading and trailing ``-`` go.
- A name that is a valid label already (every name meshd accepts today) is its label.
- A name with non-ASCII characters left is written in punycode (``xn--...``, RFC 3492);
  when that is longer than 63, the non-ASCII characters become ``-`` instead.
- Cut to 63 characters (a trailing ``-`` the cut leaves goes too); an empty result is
  ``node``.

Rules of :func:`assign_labels` (the whole membership, the same on every node):

- A name whose base label is unique keeps it.
- Names sharing a base label (after the mapping above, or the cut) are told apart by
  a suffix: ``-`` and the first 8 hex digits of SHA-256 of the *name*, with the base
  cut so the whole fits in 63. The name, not the key: a name is unique among members
  and survives key rotation and a re-join, so the label does too. A name that is
  already exactly the label keeps it unsuffixed (``web`` stays ``web`` when ``Web``
  joins). Should a suffixed label still be taken, the suffix grows.

The result depends only on the set of names, never on their order, so every node
with the same view computes the same labels.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable

MAX_LABEL = 63
MAX_NAME = 253
SUFFIX_HEX = 8
FALLBACK = "node"

_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_NOT_KEPT_RE = re.compile(r"[^a-z0-9\u0080-\U0010ffff]+")


def is_label(text: str) -> bool:
    """A valid LDH label: ``a-z``, ``0-9``, inner ``-``, 1-63 characters."""
    return bool(_LABEL_RE.fullmatch(text))


def _cut(text: str, length: int) -> str:
    return text[:length].rstrip("-")


def base_label(name: str) -> str:
    """``name`` as a DNS label on its own (see the module docstring)."""
    if is_label(name):  # every name meshd itself accepts: the label is the name
        return name
    text = unicodedata.normalize("NFKC", name).lower()
    # Keep letters of other scripts for punycode; drop every other non-ASCII symbol.
    text = "".join(ch if ch.isascii() or ch.isalnum() else "-" for ch in text)
    text = _NOT_KEPT_RE.sub("-", text).strip("-")
    if not text.isascii():
        encoded = "xn--" + text.encode("punycode").decode("ascii")
        # Punycode cut short would not decode: past 63, spell the ASCII part alone.
        text = encoded if len(encoded) <= MAX_LABEL else _ascii_only(text)
    return _cut(text, MAX_LABEL) or FALLBACK


def _ascii_only(text: str) -> str:
    return _NOT_KEPT_RE.sub("-", "".join(ch if ch.isascii() else "-" for ch in text)).strip("-")


def _suffixed(base: str, name: str, digits: int) -> str:
    tag = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:digits]
    return f"{_cut(base, MAX_LABEL - 1 - digits) or FALLBACK}-{tag}"


def assign_labels(names: Iterable[str]) -> dict[str, str]:
    """A distinct DNS label for each of ``names``, independent of their order."""
    unique = sorted(set(names))
    groups: dict[str, list[str]] = {}
    for name in unique:
        groups.setdefault(base_label(name), []).append(name)
    labels: dict[str, str] = {}
    taken: set[str] = set()
    # First every label that needs no suffix, so a suffix never takes one of those.
    for base, members in groups.items():
        keeper = members[0] if len(members) == 1 else (base if base in members else None)
        if keeper is not None:
            labels[keeper] = base
            taken.add(base)
    for base, members in sorted(groups.items()):
        for name in members:
            if name in labels:
                continue
            digits = SUFFIX_HEX
            label = _suffixed(base, name, digits)
            while label in taken:
                digits += 4
                label = _suffixed(base, name, digits)
            labels[name] = label
            taken.add(label)
    return labels


def zone_from_network(network_name: str) -> str:
    """The default zone of a network: ``<network>.internal`` (RFC 9476's private TLD)."""
    return f"{base_label(network_name)}.internal"


def check_zone(zone: str) -> str | None:
    """Why ``zone`` is no good as the mesh's zone, or None. Never ``.local`` (mDNS's)."""
    text = zone.rstrip(".").lower()
    if not text:
        return "must not be empty"
    if len(text) > MAX_NAME - MAX_LABEL - 1:
        return f"is too long (at most {MAX_NAME - MAX_LABEL - 1} characters, room for a label)"
    for part in text.split("."):
        if not is_label(part):
            return f"has {part!r}, not a DNS label (a-z, 0-9, inner '-', 1-63 characters)"
    if text == "local" or text.endswith(".local"):
        return "must not be under .local: that is multicast DNS's (RFC 6762)"
    return None
