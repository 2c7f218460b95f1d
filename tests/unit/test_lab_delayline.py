"""The lab's userspace delay line (pure part): schedule, loss, the TUNSETIFF request."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.lab.delayline import IFF_NO_PI, IFF_TUN, IFREQ_SIZE, DelayLine, tun_ifreq

gaps = st.lists(st.floats(min_value=0, max_value=0.5), min_size=1, max_size=60)
delays = st.floats(min_value=0, max_value=0.3)


@given(gaps=gaps, delay=delays, polls=st.lists(st.floats(min_value=0, max_value=0.2)))
def test_every_packet_leaves_once_in_order_never_before_its_delay(
    gaps: list[float], delay: float, polls: list[float]
) -> None:
    line = DelayLine(delay, 0.0, random.Random(0))
    now, arrivals = 0.0, []
    for i, gap in enumerate(gaps):
        now += gap
        assert line.offer(i.to_bytes(2, "big"), now)
        arrivals.append(now)
    out: list[tuple[float, int]] = []
    clock = 0.0
    for step in [*polls, now + delay + 1]:  # the last poll comes after every due time
        clock += step
        out += [(clock, int.from_bytes(p, "big")) for p in line.due(clock)]
    assert [i for _, i in out] == list(range(len(gaps)))
    for left_at, i in out:
        assert left_at >= arrivals[i] + delay
    assert len(line) == 0
    assert line.stats.passed == len(gaps)
    assert line.wait(clock) is None


@given(gaps=gaps, delay=delays)
def test_wait_is_the_time_to_the_oldest_packet_due(gaps: list[float], delay: float) -> None:
    line = DelayLine(delay, 0.0, random.Random(0))
    now = 0.0
    first = None
    for gap in gaps:
        now += gap
        line.offer(b"x", now)
        first = now if first is None else first
    assert first is not None
    wait = line.wait(now)
    assert wait == pytest.approx(max(0.0, first + delay - now))
    assert line.due(first + delay) != []


def test_a_packet_is_held_for_the_delay() -> None:
    line = DelayLine(0.1, 0.0, random.Random(0))
    line.offer(b"a", 10.0)
    assert line.due(10.099) == []
    assert line.due(10.1) == [b"a"]


def test_loss_drops_that_share_at_random_and_only_those_are_missing() -> None:
    line = DelayLine(0.0, 0.1, random.Random(16))
    kept = sum(line.offer(b"p", float(i)) for i in range(20_000))
    assert 0.09 < line.stats.dropped / 20_000 < 0.11
    assert len(line.due(20_000.0)) == kept == 20_000 - line.stats.dropped


@pytest.mark.parametrize(("loss", "kept"), [(0.0, 100), (1.0, 0)])
def test_no_loss_keeps_all_and_full_loss_none(loss: float, kept: int) -> None:
    line = DelayLine(0.0, loss, random.Random(1))
    assert sum(line.offer(b"p", 0.0) for _ in range(100)) == kept


@pytest.mark.parametrize(("delay", "loss"), [(-0.1, 0.0), (0.1, -0.01), (0.1, 1.5)])
def test_impossible_settings_are_refused(delay: float, loss: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        DelayLine(delay, loss, random.Random(0))


def test_the_tunsetiff_request_names_a_tun_device_without_packet_info() -> None:
    request = tun_ifreq("dl0")
    assert len(request) == IFREQ_SIZE
    name, flags = struct.unpack_from("16sH", request)
    assert name.rstrip(b"\0") == b"dl0"
    assert flags == IFF_TUN | IFF_NO_PI


@pytest.mark.parametrize("name", ["", "a-name-too-long-x"])
def test_an_interface_name_the_kernel_cannot_take_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="bad interface name"):
        tun_ifreq(name)
