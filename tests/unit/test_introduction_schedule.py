"""IntroductionSchedule: when a node introduces itself to members that never shook hands."""

from __future__ import annotations

from meshd.agent.presence import IntroductionSchedule


def test_a_stranger_is_due_at_once_then_after_a_doubling_back_off() -> None:
    schedule = IntroductionSchedule(5.0, 60.0)
    sent_at = []
    for now in range(0, 200):
        due = schedule.due({"k"}, {"k"}, float(now))
        if due:
            assert due == {"k"}
            schedule.sent(due, float(now))
            sent_at.append(now)
    assert sent_at == [0, 5, 15, 35, 75, 135, 195]


def test_each_stranger_has_its_own_back_off() -> None:
    schedule = IntroductionSchedule(5.0, 60.0)
    schedule.sent(schedule.due({"old"}, set(), 0.0), 0.0)
    schedule.sent(schedule.due({"old"}, set(), 5.0), 5.0)  # "old" next due at 15
    # A new stranger at 6 is due at once, not when "old" is.
    assert schedule.due({"old", "new"}, set(), 6.0) == {"new"}


def test_a_stranger_that_comes_back_alive_is_due_at_once() -> None:
    schedule = IntroductionSchedule(5.0, 60.0)
    for now in (0.0, 5.0, 15.0, 35.0):
        schedule.sent(schedule.due({"k"}, set(), now), now)  # down: failed, never answers
    assert schedule.due({"k"}, set(), 40.0) == set()  # next due at 75
    assert schedule.due({"k"}, {"k"}, 41.0) == {"k"}  # back from a power loss
    schedule.sent({"k"}, 41.0)
    assert schedule.due({"k"}, {"k"}, 42.0) == set()  # and then the back-off again
    assert schedule.due({"k"}, {"k"}, 46.0) == {"k"}


def test_a_member_that_shook_hands_starts_again_when_it_is_a_stranger_again() -> None:
    schedule = IntroductionSchedule(5.0, 60.0)
    for now in (0.0, 5.0, 15.0):
        schedule.sent(schedule.due({"k"}, {"k"}, now), now)
    assert schedule.due(set(), {"k"}, 20.0) == set()
    assert schedule.due({"k"}, {"k"}, 21.0) == {"k"}


def test_eager_while_a_silent_member_is_new_or_its_back_off_still_grows() -> None:
    schedule = IntroductionSchedule(5.0, 20.0)
    assert not schedule.eager(set())
    assert schedule.eager({"k"})  # silent, not introduced to yet
    now = 0.0
    while schedule.eager({"k"}):
        schedule.sent(schedule.due({"k"}, set(), now) or {"k"}, now)
        now += 1
    assert now == 2  # two sent: the next wait is 20 s, the most
    assert schedule.eager({"k", "other"})
