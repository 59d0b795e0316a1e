"""Peer clock offsets from heartbeat round trips, and the time base peers agree on."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gossamer.net.peer_clocks import PeerClocks


def test_an_answer_stamped_mid_round_trip_gives_the_exact_offset() -> None:
    clocks = PeerClocks()
    # Sent at 1000.0 here; the peer, 7 s ahead, answered at 1000.1 ours (1007.1 its own).
    clocks.note("b", sent_wall_s=1000.0, round_trip_s=0.2, remote_wall_s=1007.1)
    assert clocks.offset_s("b") == pytest.approx(7.0)
    assert clocks.offset_s("c") is None


def test_the_sample_with_the_shortest_round_trip_counts() -> None:
    clocks = PeerClocks(num_samples=3)
    clocks.note("b", sent_wall_s=0.0 + 1e9, round_trip_s=2.0, remote_wall_s=1e9 + 1.9)  # queued
    clocks.note("b", sent_wall_s=10.0 + 1e9, round_trip_s=0.01, remote_wall_s=1e9 + 15.005)
    clocks.note("b", sent_wall_s=20.0 + 1e9, round_trip_s=1.0, remote_wall_s=1e9 + 25.9)
    assert clocks.offset_s("b") == pytest.approx(5.0)
    # Older samples leave once num_samples newer ones came.
    for i in range(3):
        clocks.note("b", sent_wall_s=1e9 + 30 + i, round_trip_s=0.5, remote_wall_s=1e9 + 30 + i)
    assert clocks.offset_s("b") == pytest.approx(-0.25)


@pytest.mark.parametrize(
    ("remote_wall_s", "round_trip_s"),
    [(0.0, 0.1), (math.nan, 0.1), (math.inf, 0.1), (-5.0, 0.1), (1e300, 0.1), (1e9, -1.0)],
)
def test_answers_without_a_usable_stamp_are_ignored(
    remote_wall_s: float, round_trip_s: float
) -> None:
    clocks = PeerClocks()
    clocks.note("b", sent_wall_s=1e9, round_trip_s=round_trip_s, remote_wall_s=remote_wall_s)
    assert clocks.offset_s("b") is None
    assert clocks.swarm_offset_s(["b"]) == 0.0


def test_num_samples_must_be_positive() -> None:
    with pytest.raises(ValueError, match="num_samples"):
        PeerClocks(num_samples=0)


@given(
    clocks_s=st.lists(st.floats(min_value=1.6e9, max_value=1.6e9 + 3600.0), min_size=1, max_size=9),
    round_trips_s=st.lists(st.floats(min_value=0.0, max_value=0.5), min_size=81, max_size=81),
)
def test_every_peer_arrives_at_the_median_clock(
    clocks_s: list[float], round_trips_s: list[float]
) -> None:
    """Measured exactly (the answer stamped mid round trip), every peer's wall clock plus its
    swarm offset is the median of all the clocks, whatever they are."""
    peers = [f"p{i}" for i in range(len(clocks_s))]
    expected = sorted(clocks_s)[len(clocks_s) // 2]
    if len(clocks_s) % 2 == 0:
        expected = (expected + sorted(clocks_s)[len(clocks_s) // 2 - 1]) / 2
    for i, own in enumerate(clocks_s):
        view = PeerClocks()
        for j, theirs in enumerate(clocks_s):
            if j != i:
                rtt = round_trips_s[i * 9 + j]
                view.note(
                    peers[j], sent_wall_s=own, round_trip_s=rtt, remote_wall_s=theirs + rtt / 2
                )
        others = [p for p in peers if p != peers[i]]
        assert own + view.swarm_offset_s(others) == pytest.approx(expected, abs=1e-6)


def test_one_clock_far_off_does_not_move_the_others_time() -> None:
    """Three peers on time and one 3 hours ahead (or lying): the median is on time."""
    view = PeerClocks()
    now = 1.7e9
    for peer, skew in (("b", 0.02), ("c", -0.01), ("liar", 3 * 3600.0)):
        view.note(peer, sent_wall_s=now, round_trip_s=0.0, remote_wall_s=now + skew)
    assert abs(view.swarm_offset_s(["b", "c", "liar"])) <= 0.02
