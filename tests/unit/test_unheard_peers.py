"""Which alive members never shook hands with this node, and for how long (agent re-announce)."""

from __future__ import annotations

from meshd.agent.presence import UNHEARD_GRACE, unheard_peers

ALIVE = {"ka": "a", "kb": "b", "kc": "c"}


def test_a_silent_desired_peer_is_named_only_after_the_grace() -> None:
    since, names = unheard_peers(ALIVE, {"ka"}, {"ka": None}, {}, now=100.0)
    assert since == {"ka": 100.0}
    assert names == []
    since, names = unheard_peers(ALIVE, {"ka"}, {}, since, now=100.0 + UNHEARD_GRACE)
    assert since == {"ka": 100.0}
    assert names == ["a"]


def test_a_handshake_or_leaving_the_desired_set_forgets_the_peer() -> None:
    since = {"ka": 0.0, "kb": 0.0}
    after, names = unheard_peers(ALIVE, {"ka"}, {"ka": 1234.5, "kb": None}, since, now=60.0)
    assert after == {}
    assert names == []


def test_members_not_alive_are_never_named() -> None:
    since, names = unheard_peers({"kb": "b"}, {"ka", "kb"}, {}, {"ka": 0.0}, now=60.0)
    assert since == {"kb": 60.0}
    assert names == []


def test_several_silent_peers_come_sorted_by_name() -> None:
    _, names = unheard_peers(ALIVE, {"ka", "kb", "kc"}, {}, {"kc": 0.0, "ka": 0.0}, now=60.0)
    assert names == ["a", "c"]
