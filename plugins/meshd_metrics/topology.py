"""The mesh as this node sees it, as the JSON the page draws (``/mesh.json``), and the page.

This node knows its own edges: one to every other member, with the path kind,
label, handshake and traffic. It does not know how two other members reach each
other; the page asks each of them for its own ``/mesh.json`` over the mesh (where
they opted in with ``mesh_page = true`` and listen on ``mesh:PORT``, the same port)
and draws what it got; a pair nobody answered for is left out.

The JSON::

    {"node": "n1", "generated": 1764600000.0,
     "members": [{"name": "n1", "state": "alive", "addresses": ["100.80.0.1", ...]}, ...],
     "edges": [{"a": "n1", "b": "n2", "kind": "direct", "label": "direct",
                "endpoint": "10.0.0.2:51820", "last_handshake": 1764599990.5,
                "rx_bytes": 1234, "tx_bytes": 5678}, ...]}
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from meshd_metrics.collector import Facts, current_members, peer_views


def mesh_json(facts: Facts) -> dict[str, Any]:
    """This node's view (see the module docstring)."""
    members = [
        {
            "name": m.name,
            "state": m.state.value,
            "addresses": [str(a) for a in m.record.addresses] if m.record else [],
        }
        for m in current_members(facts.members)
    ]
    if not any(m["name"] == facts.node for m in members):
        members.insert(0, {"name": facts.node, "state": "alive", "addresses": []})
    edges = [
        {
            "a": facts.node,
            "b": v.name,
            "kind": v.kind,
            "label": v.label,
            "endpoint": v.endpoint,
            "last_handshake": v.last_handshake,
            "rx_bytes": v.rx_bytes,
            "tx_bytes": v.tx_bytes,
        }
        for v in peer_views(facts)
    ]
    return {"node": facts.node, "generated": facts.now, "members": members, "edges": edges}


def page(view: dict[str, Any]) -> bytes:
    """The page, with ``view`` inlined so it draws at once, before its first fetch."""
    template = resources.files("meshd_metrics").joinpath("page.html").read_text("utf-8")
    # Inside <script>, whatever a member is called: no "</script>" or "<!--" may end or
    # bend the element. \u003c is "<" in JSON and in JavaScript alike.
    inline = json.dumps(view).replace("<", "\\u003c").replace(">", "\\u003e")
    return template.replace("null/*MESH_JSON*/", inline).encode()
