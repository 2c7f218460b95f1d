"""Which Serf members are old incarnations of a machine that is alive again (agent prune)."""

from __future__ import annotations

from meshd.agent.presence import (
    PRUNE_DELAY_MIN,
    prune_delay,
    superseded_incarnations,
)
from meshd.types import Member, MemberState

ALIVE, LEFT, FAILED = MemberState.ALIVE, MemberState.LEFT, MemberState.FAILED


def member(serf_name: str, state: MemberState, *, certified: bool = True) -> Member:
    return Member(
        name=serf_name.split(".")[0],
        gossip_addr="10.0.0.1:7946",
        state=state,
        certified=certified,
        serf_name=serf_name,
    )


def test_a_left_or_failed_incarnation_of_a_live_name_is_superseded() -> None:
    members = [
        member("n3.aaaa0000", LEFT),
        member("n3.bbbb0000", FAILED),
        member("n3.cccc0000", ALIVE),
        member("n4.dddd0000", ALIVE),
    ]
    assert superseded_incarnations(members, "n1") == {"n3.aaaa0000", "n3.bbbb0000"}


def test_a_name_with_no_certified_live_incarnation_keeps_its_old_ones() -> None:
    members = [
        member("n3.aaaa0000", LEFT),
        member("n5.aaaa0000", FAILED),
        # Alive but not certified: an impostor does not make the real one's past go away.
        member("n5.bbbb0000", ALIVE, certified=False),
    ]
    assert superseded_incarnations(members, "n1") == set()


def test_this_nodes_own_old_incarnations_are_superseded() -> None:
    members = [member("n1.aaaa0000", LEFT), member("n1.bbbb0000", ALIVE, certified=False)]
    assert superseded_incarnations(members, "n1") == {"n1.aaaa0000"}


def test_an_alive_incarnation_is_never_superseded() -> None:
    members = [member("n3.aaaa0000", ALIVE), member("n3.bbbb0000", ALIVE)]
    assert superseded_incarnations(members, "n1") == set()


def test_the_wait_grows_with_the_mesh() -> None:
    assert prune_delay(4) == PRUNE_DELAY_MIN
    assert prune_delay(200) > prune_delay(40) > PRUNE_DELAY_MIN
