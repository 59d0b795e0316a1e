"""SwarmHistory: curves, link rates and events derived from snapshots; everything bounded."""

from __future__ import annotations

import json
import math

import pytest

from gossamer.obs.dashboard.history import HistoryConfig, SwarmHistory, swarm_goodput_ratio
from gossamer.obs.dashboard.source import PeerSample, PeerView, SwarmSnapshot


def _view(peer_id: str, status: str = "alive") -> PeerView:
    return PeerView(peer_id=peer_id, address=f"{peer_id}:1", status=status)  # type: ignore[arg-type]


def _snap(t: float, *views: PeerView, **samples: PeerSample) -> SwarmSnapshot:
    return SwarmSnapshot(taken_at_wall_s=t, peers=views, samples=samples)


def _kinds(history: SwarmHistory) -> list[tuple[str, str]]:
    return [(e.kind, e.peer_id) for e in history.events]


def test_status_changes_become_events() -> None:
    history = SwarmHistory()
    history.record(_snap(1.0, _view("a"), _view("b")))
    history.record(_snap(2.0, _view("a"), _view("b", "gone")))
    history.record(_snap(3.0, _view("a"), _view("b", "gone")))
    history.record(_snap(4.0, _view("a"), _view("b")))
    assert _kinds(history) == [("joined", "a"), ("joined", "b"), ("gone", "b"), ("came back", "b")]
    state = history.state()
    assert [e["kind"] for e in state["events"]] == ["came back", "gone", "joined", "joined"]
    assert state["swarm"]["num_alive"] == 2


def test_a_peer_no_longer_listed_is_gone_and_then_forgotten() -> None:
    history = SwarmHistory(HistoryConfig(forget_after_s=10.0))
    history.record(_snap(0.0, _view("a"), _view("b")))
    history.record(_snap(1.0, _view("a")))
    assert _kinds(history)[-1] == ("gone", "b")
    assert {p["peer_id"]: p["status"] for p in history.state()["peers"]} == {
        "a": "alive",
        "b": "gone",
    }
    history.record(_snap(12.0, _view("a")))
    assert [p["peer_id"] for p in history.state()["peers"]] == ["a"]


def test_an_address_that_never_answered_is_replaced_silently() -> None:
    history = SwarmHistory()
    history.record(_snap(0.0, _view("127.0.0.1:9", "gone")))
    history.record(_snap(1.0, _view("peer-id")))
    assert _kinds(history) == [("joined", "peer-id")]
    assert [p["peer_id"] for p in history.state()["peers"]] == ["peer-id"]


def test_curves_are_bounded_rings_of_changed_samples() -> None:
    history = SwarmHistory(HistoryConfig(num_points=5))
    for step in range(12):
        sample = PeerSample(step=step, loss=10.0 - step, tokens_per_second=100.0 + step)
        history.record(_snap(float(step), _view("a"), a=sample))
        history.record(_snap(step + 0.5, _view("a"), a=sample))  # unchanged: no new point
    curve = history.state()["curves"]["a"]
    assert curve["t"] == [7.0, 8.0, 9.0, 10.0, 11.0]
    assert curve["loss"] == [3.0, 2.0, 1.0, 0.0, -1.0]
    assert curve["tokens_per_second"][-1] == 111.0


def test_link_rates_come_from_counter_differences() -> None:
    history = SwarmHistory()
    a0 = PeerSample(bytes_sent={"b": 1000.0}, bytes_received={"b": 10.0})
    b0 = PeerSample(bytes_received={"a": 990.0})
    history.record(_snap(10.0, _view("a"), _view("b"), a=a0, b=b0))
    a1 = PeerSample(bytes_sent={"b": 3000.0}, bytes_received={"b": 20.0})
    history.record(_snap(12.0, _view("a"), _view("b"), a=a1, b=b0))
    links = {(link["source"], link["target"]): link for link in history.state()["links"]}
    # a reports its own sends (preferred over b's receipts); b -> a only from a's receipts.
    assert links[("a", "b")]["bytes_total"] == 3000
    assert links[("a", "b")]["bytes_per_s"] == 1000.0
    assert links[("b", "a")]["bytes_per_s"] == 5.0
    # A counter going down (a restarted peer) gives no rate rather than a negative one.
    history.record(_snap(13.0, _view("a"), _view("b"), a=PeerSample(bytes_sent={"b": 5.0})))
    links = {(link["source"], link["target"]): link for link in history.state()["links"]}
    assert links[("a", "b")]["bytes_per_s"] is None


def test_resync_counter_increases_become_events() -> None:
    history = SwarmHistory()
    history.record(_snap(0.0, _view("a"), a=PeerSample(num_resyncs=0.0)))
    history.record(_snap(1.0, _view("a"), a=PeerSample(num_resyncs=2.0)))
    assert history.events[-1].kind == "resynced"
    assert history.events[-1].detail == "2x"


def test_a_resync_count_that_overflows_is_an_event_not_a_crash() -> None:
    # Two finite figures whose difference is infinite: int() raised OverflowError, and the
    # dashboard's polling task died with the page frozen on its last state.
    history = SwarmHistory()
    history.record(_snap(0.0, _view("a"), a=PeerSample(num_resyncs=-1.7e308)))
    history.record(_snap(1.0, _view("a"), a=PeerSample(num_resyncs=1.7e308)))
    assert (history.events[-1].kind, history.events[-1].detail) == ("resynced", "many times")


def test_a_link_no_longer_reported_shows_no_rate() -> None:
    # It kept its last rate on the page for as long as either peer was listed.
    history = SwarmHistory()
    history.record(_snap(0.0, _view("a"), _view("b"), a=PeerSample(bytes_sent={"b": 0.0})))
    history.record(_snap(1.0, _view("a"), _view("b"), a=PeerSample(bytes_sent={"b": 5e7})))
    history.record(_snap(2.0, _view("a"), _view("b"), a=PeerSample(bytes_sent={"other": 1.0})))
    links = {(link["source"], link["target"]): link for link in history.state()["links"]}
    assert links[("a", "b")]["bytes_per_s"] is None
    assert links[("a", "b")]["bytes_total"] == 5e7


def test_state_is_strict_json_even_with_nan_values() -> None:
    history = SwarmHistory()
    history.record(
        _snap(0.0, _view("a"), a=PeerSample(loss=math.nan, goodput_ratio=math.inf, step=1))
    )
    state = history.state()
    json.dumps(state, allow_nan=False)
    assert state["peers"][0]["loss"] is None
    assert state["swarm"]["goodput_ratio"] is None


def test_gone_peers_add_no_throughput_and_events_are_bounded() -> None:
    history = SwarmHistory(HistoryConfig(num_events=3))
    for t in range(5):
        status = "alive" if t % 2 == 0 else "gone"
        sample = PeerSample(tokens_per_second=50.0)
        history.record(_snap(float(t), _view("a", status), _view("b"), a=sample, b=sample))
    assert len(history.events) == 3
    history.record(_snap(9.0, _view("a", "gone"), _view("b")))
    state = history.state()
    assert state["swarm"]["tokens_per_second"] == 50.0  # b's last figure; a, gone, adds none
    assert {p["peer_id"]: p["tokens_per_second"] for p in state["peers"]} == {"a": 0.0, "b": 50.0}


def test_links_no_longer_reported_are_forgotten() -> None:
    # A long-lived peer whose remotes came and went (throwaway identities, short-lived peers)
    # grew the table and the page by a link a second: 10,126 links and 2.1 MB after 5,000 s.
    history = SwarmHistory(HistoryConfig(forget_after_s=60.0))
    for t in range(1000):
        sample = PeerSample(bytes_sent={f"remote{t}": 1.0})
        history.record(_snap(float(t), _view("a"), a=sample))
    assert len(history.state()["links"]) <= 61


def test_links_past_the_cap_go_those_with_an_end_not_listed_first() -> None:
    # Links to remotes a peer names were kept for ten minutes each, however many: a peer that
    # named 5,000 new ones at each scrape grew the table and /api/state without end.
    history = SwarmHistory(HistoryConfig(num_links=4))
    b = PeerSample(bytes_sent={"a": 5.0})
    for t in range(50):
        a = PeerSample(bytes_sent={"b": 10.0 + t, **{f"remote{t}.{i}": 1.0 for i in range(3)}})
        history.record(_snap(float(t), _view("a"), _view("b"), a=a, b=b))
    links = {(link["source"], link["target"]): link for link in history.state()["links"]}
    assert len(links) == 4
    # Both ways between the listed peers stay, the rate kept; of the rest, ones reported now.
    assert links[("a", "b")]["bytes_per_s"] == 1.0
    assert ("b", "a") in links
    assert set(links) - {("a", "b"), ("b", "a")} < {("a", f"remote49.{i}") for i in range(3)}


def test_peers_that_do_not_train_leave_the_swarm_s_goodput_alone() -> None:
    # A bootstrap or relay peer exports a goodput of 0: one perfect trainer and two such
    # peers showed 0.333.
    history = SwarmHistory()
    trainer = PeerSample(goodput_ratio=1.0, tokens_total=1e6)
    bare = PeerSample(goodput_ratio=0.0, tokens_total=0.0)
    history.record(_snap(1.0, _view("a"), _view("b"), _view("c"), a=trainer, b=bare, c=bare))
    assert history.state()["swarm"]["goodput_ratio"] == 1.0


def _trainer(kept: float, wall_s: float, rate: float) -> PeerSample:
    return PeerSample(
        tokens_total=wall_s * rate,
        goodput_ratio=kept / (wall_s * rate),
        goodput_kept_tokens=kept,
        goodput_wall_s=wall_s,
        compute_tokens_per_second=rate,
    )


def test_the_swarm_s_goodput_is_kept_tokens_over_capacity() -> None:
    # The mean of per-peer ratios, 0.5 here, where docs/observability.md and swarm_goodput
    # define the swarm's goodput as all kept tokens over all capacity: 910,000 / 1,100,000.
    fast = _trainer(kept=900_000, wall_s=100.0, rate=10_000.0)  # 0.9 of a big machine
    slow = _trainer(kept=10_000, wall_s=100.0, rate=1_000.0)  # 0.1 of a small one
    history = SwarmHistory()
    history.record(_snap(1.0, _view("a"), _view("b"), a=fast, b=slow))
    assert history.state()["swarm"]["goodput_ratio"] == pytest.approx(910_000 / 1_100_000)


def test_a_peer_with_its_ratio_only_counts_as_one_of_mean_capacity() -> None:
    fast = _trainer(kept=900_000, wall_s=100.0, rate=10_000.0)
    slow = _trainer(kept=10_000, wall_s=100.0, rate=1_000.0)
    ratio_only = PeerSample(goodput_ratio=0.5, tokens_total=1e6)
    mean_capacity = 550_000.0
    expected = (910_000 + 0.5 * mean_capacity) / (1_100_000 + mean_capacity)
    assert swarm_goodput_ratio([fast, slow, ratio_only]) == pytest.approx(expected)
    # None of them with the figures: their mean, as before.
    assert swarm_goodput_ratio([ratio_only, PeerSample(goodput_ratio=1.0)]) == 0.75
    assert swarm_goodput_ratio([PeerSample()]) is None
    # A peer that has not computed yet (capacity 0) says nothing either way.
    idle = PeerSample(goodput_kept_tokens=0.0, goodput_wall_s=10.0, compute_tokens_per_second=0.0)
    assert swarm_goodput_ratio([fast, idle]) == pytest.approx(0.9)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_points": 1},
        {"num_events": 0},
        {"num_links": 0},
        {"forget_after_s": 0.0},
        {"forget_after_s": math.nan},
    ],
)
def test_config_rejects_useless_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="HistoryConfig"):
        HistoryConfig(**kwargs)  # type: ignore[arg-type]
