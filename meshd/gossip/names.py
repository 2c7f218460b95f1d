"""Serf node names: a node's name plus a suffix from its WireGuard key.

Serf remembers a member that left or failed for a long time (failed ones are
reaped after 24 h) and will not take a new machine under the same node name
while it does: memberlist reports a conflicting address, and Serf may even shut
the newcomer down. A wiped machine re-joins with a new key, so naming the Serf
member ``<name>.<suffix>`` (the suffix derived from the key) makes the new
incarnation a new Serf member while people keep seeing ``<name>``::

    serf_node_name("n3", public_key)   -> "n3.1f0c9a2e"
    display_name("n3.1f0c9a2e")        -> "n3"

The split is unambiguous because a meshd name is a DNS label (see
:func:`meshd.pki.certificate.check_name`): it never holds a dot. A Serf name without a
suffix (a bare Serf agent, an older meshd) shows as it is.

A member that everybody dropped (see :mod:`meshd.pki.rejoin`) comes back as a
fresh Serf member, ``generation`` 1, 2, ...: the others' Serf may still hold
its old name as left, or have erased it while memberlist still counts it alive
(a forged prune), and then ignores that name's return. The suffix of a later
generation is derived from the key and the generation.

The suffix only tells incarnations apart; it proves nothing (anyone with the
gossip key may pick any Serf name): the member's certificate binds its name and
key. After a key rotation the running agent keeps its Serf name until it next
starts, so the suffix need not match the key a member publishes now.
"""

from __future__ import annotations

import hashlib
import re

SUFFIX_LENGTH = 8
_SEPARATOR = "."
_SUFFIX_RE = re.compile(rf"[0-9a-f]{{{SUFFIX_LENGTH}}}")


def key_suffix(public_key: str, generation: int = 0) -> str:
    """Eight hex digits derived from ``public_key`` (any text: a hash, not a decode)
    and, after the first, the ``generation``."""
    text = public_key if generation == 0 else f"{public_key}#{generation}"
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:SUFFIX_LENGTH]


def serf_node_name(name: str, public_key: str, generation: int = 0) -> str:
    """The Serf node name of the node ``name`` with WireGuard key ``public_key``."""
    return f"{name}{_SEPARATOR}{key_suffix(public_key, generation)}"


def display_name(serf_name: str) -> str:
    """The node name people see for a Serf member: its Serf name without the key suffix."""
    head, separator, tail = serf_name.rpartition(_SEPARATOR)
    if separator and head and _SUFFIX_RE.fullmatch(tail):
        return head
    return serf_name
