"""The mesh as a graph: what kind of path each pair uses, and Graphviz DOT for scripts.

A pair's *kind* is one of :data:`KINDS`, decided by :func:`path_kind` from what
this node knows of a member (its gossip state, whether it is a peer, the path
label the policy chose, its last handshake):

- ``down``: the member is not alive in gossip, is left out of the peers, its path
  says ``no path``, or WireGuard has had no handshake with it for
  ``STALE_HANDSHAKE`` seconds (a session key is rejected after 180 s);
- ``relay``: the path goes through a relay (``relay via n3``, or ``via``);
- ``lan``: direct, at an address on a shared LAN (``direct (LAN)``);
- ``direct``: any other path of a peer.

``meshd status --graph`` prints this node's view: this node and every member, an
edge to each of them, coloured by kind. The metrics plugin's page uses the same
kinds (:func:`path_kind` is exported to plugins).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

KINDS = ("direct", "lan", "relay", "down")
STALE_HANDSHAKE = 180.0
COLOURS = {"direct": "forestgreen", "lan": "royalblue", "relay": "darkorange", "down": "red"}


def path_kind(
    *,
    state: str,
    peer: bool,
    label: str | None = None,
    via: str | None = None,
    excluded: str | None = None,
    last_handshake: float | None = None,
    now: float,
) -> str:
    """The kind of the path to one member (see the module docstring)."""
    label = label or ""
    if state != "alive" or excluded or not peer or label.startswith("no path"):
        return "down"
    if last_handshake is None or now - last_handshake > STALE_HANDSHAKE:
        return "down"
    if via or label.startswith("relay"):
        return "relay"
    if "(LAN)" in label:
        return "lan"
    return "direct"


@dataclass(frozen=True)
class GraphEdge:
    """One pair seen from ``a``: its kind, the status label, last handshake and traffic."""

    a: str
    b: str
    kind: str
    label: str = ""
    last_handshake: float | None = None
    rx_bytes: int = 0
    tx_bytes: int = 0


def edges_of_status(status: Mapping[str, Any], now: float) -> list[GraphEdge]:
    """This node's edges from the agent's ``status`` answer (the control command)."""
    own = str(status["node"]["name"])
    edges = []
    for row in status["peers"]:
        label = row.get("path") or ("direct" if row.get("peer") else "")
        edges.append(
            GraphEdge(
                own,
                str(row["name"]),
                path_kind(
                    state=str(row["gossip"]),
                    peer=bool(row.get("peer")),
                    label=label,
                    via=row.get("via"),
                    excluded=row.get("excluded"),
                    last_handshake=row.get("last_handshake"),
                    now=now,
                ),
                label=f"excluded: {row['excluded']}" if row.get("excluded") else label,
                last_handshake=row.get("last_handshake"),
                rx_bytes=int(row.get("rx_bytes") or 0),
                tx_bytes=int(row.get("tx_bytes") or 0),
            )
        )
    return edges


def _quote(text: str) -> str:
    """A DOT string literal: quotes and backslashes escaped, control characters dropped."""
    cleaned = "".join(ch for ch in text if ch.isprintable())
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _age(last_handshake: float | None, now: float) -> str:
    if last_handshake is None:
        return "no handshake"
    return f"handshake {max(0, round(now - last_handshake))} s ago"


def to_dot(
    own: str, members: Sequence[tuple[str, str]], edges: Sequence[GraphEdge], now: float
) -> str:
    """Graphviz DOT (an undirected graph): ``members`` are (name, gossip state) pairs,
    this node ``own`` drawn bold; each edge coloured by kind, dashed when down, labelled
    with its path, handshake age and traffic."""
    lines = ["graph mesh {", "  node [shape=box, style=rounded];"]
    lines.append(f'  {_quote(own)} [style="rounded,bold"];')
    for name, state in members:
        if name == own:
            continue
        colour = ", color=red, fontcolor=red" if state != "alive" else ""
        lines.append(f"  {_quote(name)} [tooltip={_quote(state)}{colour}];")
    for edge in edges:
        style = ", style=dashed" if edge.kind == "down" else ""
        label = f"{edge.label or edge.kind}\\n{_age(edge.last_handshake, now)}"
        if edge.rx_bytes or edge.tx_bytes:
            label += f"\\nrx {edge.rx_bytes} B, tx {edge.tx_bytes} B"
        # The label's own \n are DOT line breaks: quote the parts, not the breaks.
        parts = label.split("\\n")
        quoted = "\\n".join(_quote(p)[1:-1] for p in parts)
        lines.append(
            f"  {_quote(edge.a)} -- {_quote(edge.b)} "
            f'[color={COLOURS[edge.kind]}, label="{quoted}", kind={edge.kind}{style}];'
        )
    lines.append("}")
    return "\n".join(lines) + "\n"
