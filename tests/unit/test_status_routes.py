"""What 'meshd status' says of routes: advertised here, in use, standby, ignored."""

from __future__ import annotations

from meshd.commands import _route_rows


def test_each_route_says_what_this_node_does_with_it() -> None:
    result = {
        "node": {"name": "n1", "routes": [{"prefix": "10.1.0.0/24", "approved": False}]},
        "peers": [
            {
                "name": "gw1",
                "routes": [{"prefix": "10.9.0.0/24", "approved": True, "installed": True}],
            },
            {
                "name": "gw2",
                "routes": [{"prefix": "10.9.0.0/24", "approved": True, "installed": False}],
            },
            {
                "name": "ex",
                "routes": [{"prefix": "0.0.0.0/0", "approved": True, "installed": False}],
            },
            {
                "name": "n4",
                "routes": [{"prefix": "10.99.0.0/24", "approved": False, "installed": False}],
            },
            {"name": "n5"},
        ],
    }
    assert _route_rows(result) == [
        ["10.1.0.0/24", "n1 (this node)", "advertised, not approved by the CA"],
        ["10.9.0.0/24", "gw1", "approved, in use"],
        ["10.9.0.0/24", "gw2", "approved, standby"],
        ["0.0.0.0/0", "ex", "approved exit node, not used here (meshd exit use)"],
        ["10.99.0.0/24", "n4", "ignored: not approved by the CA"],
    ]
