"""Peer clock offsets from ping round trips, and when a peer moves onto the others' clock."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gossamer.net.peer_clocks import PeerClocks

NOW = 1.7e9
AGREE_S = 0.25


def test_an_answer_stamped_mid_round_trip_gives_the_exact_offset() -> None:
    clocks = PeerClocks()
    # Sent at 1000.0 here; the peer, 7 s ahead, answered at 1000.1 ours (1007.1 its own).
    clocks.note("b", sent_wall_s=1000.0, round_trip_s=0.2, remote_wall_s=1007.1, now_s=5.0)
    assert clocks.offset_s("b", now_s=5.0) == pytest.approx(7.0)
    assert clocks.offset_s("c", now_s=5.0) is None


def test_the_fresh_sample_with_the_shortest_round_trip_counts() -> None:
    clocks = PeerClocks(num_samples=3, max_age_s=30.0)
    clocks.note("b", sent_wall_s=NOW, round_trip_s=2.0, remote_wall_s=NOW + 1.9, now_s=0.0)
    clocks.note("b", sent_wall_s=NOW, round_trip_s=0.01, remote_wall_s=NOW + 5.005, now_s=1.0)
    clocks.note("b", sent_wall_s=NOW, round_trip_s=1.0, remote_wall_s=NOW + 5.9, now_s=2.0)
    assert clocks.offset_s("b", now_s=3.0) == pytest.approx(5.0)
    # Older than max_age_s: only the last sample still counts, then none.
    assert clocks.offset_s("b", now_s=31.5) == pytest.approx(5.4)
    assert clocks.offset_s("b", now_s=32.5) is None
    # Older samples leave once num_samples newer ones came.
    for i in range(3):
        clocks.note("b", sent_wall_s=NOW, round_trip_s=0.5, remote_wall_s=NOW, now_s=40.0 + i)
    assert clocks.offset_s("b", now_s=43.0) == pytest.approx(-0.25)


@pytest.mark.parametrize(
    ("remote_wall_s", "round_trip_s"),
    [(0.0, 0.1), (math.nan, 0.1), (math.inf, 0.1), (-5.0, 0.1), (1e300, 0.1), (NOW, -1.0)],
)
def test_answers_without_a_usable_stamp_are_ignored(
    remote_wall_s: float, round_trip_s: float
) -> None:
    clocks = PeerClocks()
    clocks.note(
        "b", sent_wall_s=NOW, round_trip_s=round_trip_s, remote_wall_s=remote_wall_s, now_s=0.0
    )
    assert clocks.offset_s("b", now_s=0.0) is None


@pytest.mark.parametrize(("num_samples", "max_age_s"), [(0, 30.0), (8, 0.0), (8, math.nan)])
def test_settings_must_be_positive(num_samples: int, max_age_s: float) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        PeerClocks(num_samples=num_samples, max_age_s=max_age_s)


def view_of(own: float, others: dict[str, float]) -> PeerClocks:
    """What a peer on clock ``own`` measures of ``others`` (exactly)."""
    view = PeerClocks()
    for peer, theirs in others.items():
        view.note(peer, sent_wall_s=own, round_trip_s=0.0, remote_wall_s=theirs, now_s=0.0)
    return view


@pytest.mark.parametrize(
    ("clocks", "moves"),
    [
        # one peer off among agreeing ones: it alone moves, onto theirs
        ({"a": NOW, "b": NOW + 0.01, "c": NOW - 5.0}, {"c": 5.0}),
        ({"a": NOW, "b": NOW, "c": NOW, "d": NOW + 3 * 3600.0}, {"d": -3 * 3600.0}),
        # two off in opposite ways among three agreeing ones
        ({"a": NOW, "b": NOW, "c": NOW, "d": NOW + 5, "e": NOW - 5}, {"d": -5.0, "e": 5.0}),
        # no strict majority: nobody can tell which clock is right, nobody moves
        ({"a": NOW, "b": NOW + 3.0}, {}),
        ({"a": NOW, "b": NOW, "c": NOW + 5, "d": NOW + 5}, {}),
        ({"a": NOW, "b": NOW + 2, "c": NOW + 4}, {}),
        # all agree within the tolerance
        ({"a": NOW, "b": NOW + 0.2, "c": NOW - 0.04}, {}),
    ],
)
def test_only_a_peer_off_the_majority_s_clock_moves_onto_it(
    clocks: dict[str, float], moves: dict[str, float]
) -> None:
    for peer, own in clocks.items():
        others = {p: c for p, c in clocks.items() if p != peer}
        correction = view_of(own, others).correction_s(others, now_s=0.0, agree_s=AGREE_S)
        assert correction == pytest.approx(moves.get(peer, 0.0), abs=0.02), peer


def test_peers_without_a_fresh_sample_do_not_count() -> None:
    """Two agreeing peers outvote this one only while their samples are fresh."""
    view = view_of(NOW, {"b": NOW + 4.0, "c": NOW + 4.0})
    assert view.correction_s(["b", "c"], now_s=0.0, agree_s=AGREE_S) == pytest.approx(4.0)
    assert view.correction_s(["b", "c"], now_s=11.0, agree_s=AGREE_S) == 0.0  # 10 s by default
    assert view.correction_s(["b", "c", "never-sampled"], now_s=0.0, agree_s=AGREE_S) == (
        pytest.approx(4.0)
    )


@given(
    honest=st.lists(st.floats(min_value=-0.1, max_value=0.1), min_size=2, max_size=8),
    skewed=st.lists(
        st.floats(min_value=1.0, max_value=3600.0) | st.floats(min_value=-3600.0, max_value=-1.0),
        max_size=7,
    ),
)
def test_peers_that_move_land_on_the_honest_majority_and_honest_peers_never_move(
    honest: list[float], skewed: list[float]
) -> None:
    """Clocks that agree (within 0.1 s of true time) and a minority far off: honest peers keep
    their clocks; every other peer moves onto the honest ones' (within their spread)."""
    if len(skewed) >= len(honest):
        skewed = skewed[: len(honest) - 1]
    clocks = {f"h{i}": NOW + c for i, c in enumerate(honest)}
    clocks |= {f"s{i}": NOW + c for i, c in enumerate(skewed)}
    for peer, own in clocks.items():
        others = {p: c for p, c in clocks.items() if p != peer}
        correction = view_of(own, others).correction_s(others, now_s=0.0, agree_s=AGREE_S)
        if peer.startswith("h"):
            assert correction == 0.0, peer
        else:
            assert abs(own + correction - NOW) <= 0.1 + 1e-6, peer


def test_peers_whose_samples_all_went_stale_are_forgotten() -> None:
    # One deque per peer ever pinged was kept for the node's life.
    clocks = PeerClocks(max_age_s=10.0)
    for i in range(1000):
        now_s = float(i)
        clocks.note(
            f"peer{i}", sent_wall_s=1e9 + now_s, round_trip_s=0.01, remote_wall_s=1e9, now_s=now_s
        )
        clocks.note(
            "steady", sent_wall_s=1e9 + now_s, round_trip_s=0.01, remote_wall_s=1e9, now_s=now_s
        )
    assert clocks.num_peers < 150  # the fresh ones, and stale ones until the next doubling
    assert clocks.best("steady", now_s=999.0) is not None
    assert clocks.best("peer995", now_s=999.0) is not None
