"""Pair kinds and the DOT ``meshd status --graph`` prints."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.graph import GraphEdge, _quote, edges_of_status, path_kind, to_dot

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("given_", "kind"),
    [
        ({"state": "alive", "peer": True, "label": "direct", "last_handshake": NOW - 5}, "direct"),
        ({"state": "alive", "peer": True, "label": "", "last_handshake": NOW - 5}, "direct"),
        (
            {"state": "alive", "peer": True, "label": "direct (LAN)", "last_handshake": NOW},
            "lan",
        ),
        (
            {"state": "alive", "peer": True, "label": "relay via n3", "last_handshake": NOW},
            "relay",
        ),
        ({"state": "alive", "peer": True, "via": "n3", "last_handshake": NOW}, "relay"),
        ({"state": "failed", "peer": True, "label": "direct", "last_handshake": NOW}, "down"),
        ({"state": "alive", "peer": False, "label": "direct", "last_handshake": NOW}, "down"),
        ({"state": "alive", "peer": True, "label": "no path", "last_handshake": NOW}, "down"),
        ({"state": "alive", "peer": True, "excluded": "no", "last_handshake": NOW}, "down"),
        ({"state": "alive", "peer": True, "label": "direct", "last_handshake": None}, "down"),
        ({"state": "alive", "peer": True, "label": "direct", "last_handshake": NOW - 181}, "down"),
    ],
)
def test_path_kind(given_: dict[str, object], kind: str) -> None:
    assert path_kind(now=NOW, **given_) == kind  # type: ignore[arg-type]


STATUS = {
    "node": {"name": "n1"},
    "peers": [
        {
            "name": "n2",
            "gossip": "alive",
            "peer": True,
            "path": None,
            "via": None,
            "excluded": None,
            "last_handshake": NOW - 12,
            "rx_bytes": 1000,
            "tx_bytes": 2000,
        },
        {
            "name": "n3",
            "gossip": "alive",
            "peer": True,
            "path": "relay via n2",
            "via": "n2",
            "excluded": None,
            "last_handshake": NOW - 3,
            "rx_bytes": 0,
            "tx_bytes": 0,
        },
        {
            "name": "n4",
            "gossip": "failed",
            "peer": True,
            "path": "direct",
            "excluded": None,
            "last_handshake": None,
            "rx_bytes": 0,
            "tx_bytes": 0,
        },
    ],
}


def test_the_status_answer_becomes_this_nodes_edges() -> None:
    assert edges_of_status(STATUS, NOW) == [
        GraphEdge("n1", "n2", "direct", "direct", NOW - 12, 1000, 2000),
        GraphEdge("n1", "n3", "relay", "relay via n2", NOW - 3, 0, 0),
        GraphEdge("n1", "n4", "down", "direct", None, 0, 0),
    ]


def test_dot_output() -> None:
    members = [("n2", "alive"), ("n3", "alive"), ("n4", "failed")]
    assert to_dot("n1", members, edges_of_status(STATUS, NOW), NOW) == (
        "graph mesh {\n"
        "  node [shape=box, style=rounded];\n"
        '  "n1" [style="rounded,bold"];\n'
        '  "n2" [tooltip="alive"];\n'
        '  "n3" [tooltip="alive"];\n'
        '  "n4" [tooltip="failed", color=red, fontcolor=red];\n'
        '  "n1" -- "n2" [color=forestgreen, label="direct\\nhandshake 12 s ago\\n'
        'rx 1000 B, tx 2000 B", kind=direct];\n'
        '  "n1" -- "n3" [color=darkorange, label="relay via n2\\nhandshake 3 s ago", '
        "kind=relay];\n"
        '  "n1" -- "n4" [color=red, label="direct\\nno handshake", kind=down, style=dashed];\n'
        "}\n"
    )


def _unquoted_body(literal: str) -> str:
    assert literal.startswith('"')
    assert literal.endswith('"')
    return re.sub(r"\\.", "", literal[1:-1])  # drop every escaped character


@given(st.text())
def test_any_name_is_one_dot_string(name: str) -> None:
    body = _unquoted_body(_quote(name))
    assert '"' not in body
    assert not body.endswith("\\")
    assert "\n" not in _quote(name)
