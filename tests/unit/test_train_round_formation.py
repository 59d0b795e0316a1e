"""When a swarm round's members are final before the propagation grace is over."""

from __future__ import annotations

import asyncio
import functools
import json
from types import SimpleNamespace
from typing import Any

import pytest

from gossamer.comm.report import AllReduceReport, PartOutcome, PartReport
from gossamer.net.identity import peer_id_of_public_key
from gossamer.train.swarm import _on_loopback_only
from gossamer.train.swarm_averager import SwarmAverager, _group_size
from gossamer.train.swarm_averager_config import SwarmAveragerConfig
from gossamer.train.swarm_round_records import _figure, round_settled
from gossamer.train.swarm_torch_rounds import _forces_torch, _store_address

WINDOW_S = 30.0


def _settled(**overrides: Any) -> bool:
    """A round of three peers that all came (closing at c's stamp) and all published that close."""
    args: dict[str, Any] = {
        "me": "a",
        "stamp": 10.0,
        "close_at": 12.0,
        "active": {"b", "c"},
        "entries": {"b": 11.0, "c": 12.0},
        "closes": {"a": 12.0, "b": 12.0, "c": 12.0},
        "join_window_s": WINDOW_S,
    }
    return round_settled(**(args | overrides))


def test_everyone_came_and_agrees_on_the_close() -> None:
    assert _settled()


def test_own_close_not_yet_read_back_still_settles() -> None:
    assert _settled(closes={"b": 12.0, "c": 12.0})


def test_an_active_peer_that_has_not_announced_keeps_the_grace() -> None:
    # d joined the run: its announcement may be stamped before the close but not yet visible.
    assert not _settled(active={"b", "c", "d"})


def test_a_member_without_a_published_close_keeps_the_grace() -> None:
    assert not _settled(closes={"a": 12.0, "b": 12.0})


def test_a_member_with_another_close_keeps_the_grace() -> None:
    assert not _settled(closes={"a": 12.0, "b": 11.5, "c": 12.0})


def test_an_earlier_close_from_anyone_keeps_the_grace() -> None:
    # e is no member (it came later), but the earliest close counts for everyone.
    closes = {"a": 12.0, "b": 12.0, "c": 12.0, "e": 11.0}
    assert not _settled(entries={"b": 11.0, "c": 12.0, "e": 13.0}, closes=closes)


def test_a_later_non_member_close_does_not_matter() -> None:
    closes = {"a": 12.0, "b": 12.0, "c": 12.0, "e": 13.0}
    assert _settled(entries={"b": 11.0, "c": 12.0, "e": 13.0}, closes=closes)


def test_a_close_at_the_join_window_keeps_the_grace() -> None:
    # A peer that saw the window run out closes by it, possibly before this close.
    assert not _settled(
        stamp=0.0,
        close_at=WINDOW_S,
        entries={"b": 1.0, "c": WINDOW_S},
        closes={"a": WINDOW_S, "b": WINDOW_S, "c": WINDOW_S},
    )


def test_a_peer_that_left_the_run_is_not_waited_for() -> None:
    assert _settled(active={"b"}, entries={"b": 12.0}, closes={"a": 12.0, "b": 12.0})


def test_a_peer_alone_keeps_the_grace() -> None:
    assert not _settled(active=set(), entries={}, closes={"a": 10.0}, close_at=10.0)


def test_store_addresses_from_round_entries_are_literal_ips_and_ports() -> None:
    assert _store_address({"tcp": "10.0.0.7:29500"}) == ("10.0.0.7", 29500)
    assert _store_address({"tcp": "[fd00::1]:29500"}) == ("fd00::1", 29500)
    for bad in (
        "",
        "10.0.0.7",
        "10.0.0.7:",
        "10.0.0.7:0",
        "10.0.0.7:65536",
        "10.0.0.7:+80",
        "host.example:80",
        "10.0.0.7:eighty",
        29500,
        None,
    ):
        assert _store_address({"tcp": bad}) is None, bad
    assert _store_address({}) is None


class _Records:
    """A node whose DHT holds ``values`` (raw record bytes), all published by one key."""

    def __init__(self, values: list[bytes]) -> None:
        records = [SimpleNamespace(value=v, publisher_public_key=b"k" * 32) for v in values]

        async def get(key: bytes, replicated_only: bool = False) -> list[SimpleNamespace]:
            return records

        self.dht = SimpleNamespace(get=get)
        self.detector = SimpleNamespace(watch=lambda peer_id: None)
        self.peer_id = "me"


def test_numbers_too_large_for_a_float_in_other_peers_records_are_skipped() -> None:
    # int 10**400 as a stamp, 1e999 (JSON's inf) as a version, 10**400 as a bandwidth figure:
    # each raised OverflowError out of the round's formation on every peer that read it.
    huge_stamp = _Records([json.dumps({"at": 10**400, "inc": "x"}).encode()])
    found = asyncio.run(SwarmAverager._records_by_publisher(huge_stamp, b"k", "at"))  # type: ignore[arg-type]
    assert found == {}
    inf_version = _Records([b'{"state": "active", "version": 1e999, "inc": "x"}'])
    averager = _membership_reader()
    assert asyncio.run(SwarmAverager._memberships(averager, inf_version)) == {}  # type: ignore[arg-type]
    assert _figure({"bw": 10**400}) == 0.0


def test_records_nested_past_the_parsers_depth_are_skipped() -> None:
    # 16,000 brackets fit a DHT value (16 KiB) and raised RecursionError out of every peer's
    # read of the run's members, a record anyone in the DHT may publish under that key.
    nested = b"[" * 16000
    active = json.dumps({"state": "active", "version": 1, "inc": "x"}).encode()
    averager = _membership_reader()
    found = asyncio.run(SwarmAverager._memberships(averager, _Records([nested, active])))  # type: ignore[arg-type]
    assert len(found) == 1


def _membership_reader(
    joined_at: float | None = None, settings: dict[str, Any] | None = None
) -> SimpleNamespace:
    """What :meth:`SwarmAverager._memberships` (and ``_note_versions``) read of its averager."""
    reader = SimpleNamespace(
        config=SimpleNamespace(run_id="r"),
        _joined_at=joined_at,
        left_before_joining=frozenset(),
        settings=settings or {},
        other_settings={},
        other_settings_peers=frozenset(),
        _members_of_other_settings=frozenset(),
        joining={},
        newest_seen_version=None,
        _alive=lambda node, peer: True,
        _seen_in_run=set(),
        _tolerance_s=10.0,
    )
    for name in ("_settings_differ", "_note_other_settings"):
        if hasattr(SwarmAverager, name):
            setattr(reader, name, functools.partial(getattr(SwarmAverager, name), reader))
    return reader


@pytest.mark.parametrize(
    ("record", "kept"),
    [
        ({"state": "left", "version": -1, "inc": "x", "at": 99.0}, False),
        ({"state": "left", "version": -1, "inc": "x", "at": 111.0}, True),  # left after
        ({"state": "left", "version": -1, "inc": "x"}, True),  # (a peer of before: no time)
        ({"state": "active", "version": 3, "inc": "x", "at": 5.0}, True),
    ],
)
def test_a_peer_that_left_before_this_one_joined_is_not_of_its_run(
    record: dict[str, object], kept: bool
) -> None:
    # A run started again under the same name: the earlier run's peer, which left, published
    # round entries this run's peers counted (every round they formed was closed already).
    averager = _membership_reader(joined_at=100.0)
    records = _Records([json.dumps(record).encode()])
    found = asyncio.run(SwarmAverager._memberships(averager, records))  # type: ignore[arg-type]
    assert bool(found) is kept
    assert bool(averager.left_before_joining) is not kept


@pytest.mark.parametrize("seen_active", [False, True])
def test_a_peer_that_left_a_few_seconds_after_a_clock_behind_joined_is_not_of_its_run(
    seen_active: bool,
) -> None:
    # A newcomer whose clock is 7 s behind (its join time is stamped uncorrected: it has no
    # round yet) counted the earlier run's peer that left 3 s before it as one of its run.
    # Within the clock tolerance, only a peer this one read in the run since it joined is.
    averager = _membership_reader(joined_at=100.0)
    if seen_active:
        active = {"state": "active", "version": 3, "inc": "x", "at": 101.0}
        asyncio.run(SwarmAverager._memberships(averager, _Records([json.dumps(active).encode()])))  # type: ignore[arg-type]
    left = {"state": "left", "version": -1, "inc": "x", "at": 107.0}
    records = _Records([json.dumps(left).encode()])
    found = asyncio.run(SwarmAverager._memberships(averager, records))  # type: ignore[arg-type]
    assert bool(found) is seen_active
    assert bool(averager.left_before_joining) is not seen_active
    far = {"state": "left", "version": -1, "inc": "x", "at": 111.0}  # (past the tolerance)
    assert asyncio.run(SwarmAverager._memberships(averager, _Records([json.dumps(far).encode()])))  # type: ignore[arg-type]


class _Peers:
    """A node whose DHT holds one membership record of each peer (by its key's letter)."""

    def __init__(self, records: dict[str, dict[str, Any]]) -> None:
        found = [
            SimpleNamespace(value=json.dumps(r).encode(), publisher_public_key=k.encode() * 32)
            for k, r in records.items()
        ]

        async def get(key: bytes, replicated_only: bool = False) -> list[SimpleNamespace]:
            return found

        self.dht = SimpleNamespace(get=get)
        self.detector = SimpleNamespace(watch=lambda peer_id: None)
        self.peer_id = "me"


@pytest.mark.parametrize("told_by", ["membership", "round"])
def test_the_versions_of_a_peer_of_other_settings_are_not_the_run_s(told_by: str) -> None:
    # An odd peer with a smaller H published higher versions: the run's peers, counting them,
    # were behind at every boundary and downloaded its state (refused) every 0.2 s.
    mine = {"inner_steps": 10, "outer_lr": 0.7}
    odd_cfg = {"inner_steps": 5, "outer_lr": 0.7}
    records = {
        "b": {"state": "active", "version": 3, "inc": "x", "cfg": mine},
        "x": {"state": "active", "version": 7, "inc": "x", "cfg": odd_cfg},
    }
    if told_by == "round":  # (a peer that says none in its membership; its round entry did)
        del records["x"]["cfg"]
    node = _Peers(records)
    averager = _membership_reader(settings=mine)
    if told_by == "round":
        averager.other_settings = {peer_id_of_public_key(b"x" * 32): "swarm.inner_steps"}
    memberships = asyncio.run(SwarmAverager._memberships(averager, node))  # type: ignore[arg-type]
    SwarmAverager._note_versions(averager, node, memberships)  # type: ignore[arg-type]
    assert averager.other_settings_peers == {peer_id_of_public_key(b"x" * 32)}
    assert averager.newest_seen_version == 3


@pytest.mark.parametrize(
    "bad",
    [
        {"max_group_size": 0},  # divided by zero at the first round
        {"join_window_s": -1.0},
        {"round_timeout_s": 0.0},
        {"propagation_grace_s": -0.5},
    ],
)
def test_a_swarm_averager_config_that_cannot_form_a_round_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        SwarmAveragerConfig(run_id="r", **bad)


def _report(contributors: list[list[str]], failed: dict[str, str] | None = None) -> AllReduceReport:
    report = AllReduceReport(round_id="00", peer_id="a", members=["a", "b", "c"], codec="none")
    report.failed = failed or {}
    for index, who in enumerate(contributors):
        outcome = PartOutcome.AVERAGED if who else PartOutcome.KEPT_LOCAL
        report.parts.append(PartReport(index, "abc"[index], "abc"[index], 10, outcome, who))
    return report


def test_a_round_without_anyone_elses_values_counts_this_peer_alone() -> None:
    # A round that ran to its deadline while the others never came said group_size 3 (as
    # complete, in the metrics) with nothing averaged.
    assert _group_size(3, _report([["a"], [], []])) == 1
    assert _group_size(3, _report([["a", "b", "c"]] * 3)) == 3
    assert _group_size(3, _report([["a", "b"]] * 3, failed={"c": "gone"})) == 2


def test_members_that_withheld_their_values_count_alike_on_every_member() -> None:
    # Weights (1, 0, 0): only a's values are in anyone's averages. a counted itself alone and
    # b and c counted 3 (every member not declared failed), so one round read as two kinds.
    only_a = _report([["a"]] * 3)
    for me in "abc":
        only_a.peer_id = me
        assert _group_size(3, only_a) == 1
    assert _group_size(3, _report([["a", "b"]] * 3)) == 2  # c withheld, b and a did not
    assert _group_size(3, _report([[], [], []])) == 1  # no weight anywhere: its own values


def test_an_entry_says_its_peer_takes_torch_on_public_addresses_or_shows_it() -> None:
    assert _forces_torch({"bk": "torch"}, "10.0.0.1")
    assert not _forces_torch({"bk": "auto"}, "10.0.0.1")
    # A peer of a version before "bk": only one set to torch publishes a public store address.
    assert _forces_torch({}, "8.8.8.8")
    assert not _forces_torch({}, "10.0.0.1")
    assert not _forces_torch({"bk": "auto"}, "8.8.8.8")  # (not what auto publishes)


def test_round_entries_outlive_any_formation_and_the_round_s_deadline_covers_it() -> None:
    # Entries lived a fixed 300 s: with a 600 s join window the first peers' entries were gone
    # while late peers still formed the round (and agreed on other member lists). The whole
    # round's deadline allowed two join windows, where a peer stamped a clock tolerance ahead
    # is waited for as long as that tolerance: every member missed the round.
    default = SwarmAveragerConfig(run_id="r")
    assert default.formation_bound_s == 2 * 30.0 + 0.5
    # ...and past any averaging of the round, whose deadline follows the links up to the cap
    assert default.entry_ttl_s >= default.formation_bound_s + default.max_round_timeout_s
    long_window = SwarmAveragerConfig(run_id="r", join_window_s=600.0)
    assert long_window.entry_ttl_s >= 2 * 600.0 + 0.5
    tolerant = SwarmAveragerConfig(run_id="r", join_window_s=10.0, clock_tolerance_s=120.0)
    assert tolerant.formation_bound_s == 10.0 + 120.0 + 0.5


@pytest.mark.parametrize(
    ("addresses", "loopback_only"),
    [
        (["127.0.0.1:7000"], True),
        (["[::1]:7000"], True),
        # (an IPv4-mapped loopback address, as a dual-stack socket shows one: the node itself
        # took it for loopback, the swarm peer did not and asked for dial-back)
        (["[::ffff:127.0.0.1]:7000"], True),
        (["localhost:7000"], True),
        (["127.0.0.1:7000", "10.0.0.7:7000"], False),
        (["127.example.org:7000"], False),
        ([], False),
    ],
)
def test_a_peer_knows_when_only_its_own_machine_can_reach_it(
    addresses: list[str], loopback_only: bool
) -> None:
    node = SimpleNamespace(addresses=addresses)
    assert _on_loopback_only(node) is loopback_only  # type: ignore[arg-type]
