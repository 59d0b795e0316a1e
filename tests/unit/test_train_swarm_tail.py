"""A swarm DiLoCo peer that takes the others' state at the end of the run ends where they do:
at the step budget, on their final outer step and weights, with no round of its own after it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from collections.abc import Callable, Coroutine
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch
from torch import nn

from gossamer.train import swarm_diloco
from gossamer.train.averaging import AverageOutcome
from gossamer.train.diloco_config import DiLoCoConfig
from gossamer.train.state_sync import StateSnapshot
from gossamer.train.swarm_averager import RoundFate
from gossamer.train.swarm_diloco import SwarmDiLoCoStrategy
from gossamer.train.swarm_state_exchange import _hash_key

MODES = {
    "blocking": {},
    "forming": {"train_while_forming": True},
    "overlap": {"overlap": True},
}


class FakeDht:
    """Serves the other peers' records a test sets under a key; logs this peer's puts."""

    def __init__(self) -> None:
        self.records: dict[bytes, list[Any]] = {}
        self.puts: list[tuple[bytes, bytes]] = []

    async def put(
        self, key: bytes, value: bytes, ttl_s: float | None = None, *, renew: bool = True
    ) -> int:
        self.puts.append((key, value))
        return 1

    async def get(self, key: bytes, *, replicated_only: bool = False) -> list[Any]:
        return list(self.records.get(key, []))


class FakeNode:
    peer_id = "a" * 64

    def __init__(self) -> None:
        self.dht = FakeDht()

    def peers(self) -> list[Any]:
        return []


class FakeNodeThread:
    """Runs node work to completion in the calling thread."""

    def __init__(self) -> None:
        self.node = FakeNode()

    def run(self, work: Callable[[Any], Coroutine[Any, Any, Any]], timeout_s: float) -> Any:
        return asyncio.run(work(self.node))


class FakeDonor:
    def publish(self, snapshot: StateSnapshot, *, max_meta_bytes: int | None = None) -> None:
        pass


class RoundLog:
    """A swarm of one (every average is this peer's own) that logs each round's key, weight and
    the step it was averaged at; ``newest_seen_version`` is what the test says the others hold."""

    def __init__(self) -> None:
        self.rounds: list[tuple[int, str, float]] = []
        self.step = -1
        self.newest_seen_version: int | None = None
        self.other_settings: dict[str, str] = {}
        self.other_settings_peers: frozenset[str] = frozenset()
        self.left_before_joining: frozenset[str] = frozenset()

    def average(
        self, tensors: list[torch.Tensor], *, round_key: str, weight: float
    ) -> AverageOutcome:
        self.rounds.append((self.step, round_key, weight))
        return AverageOutcome(
            tensors=[t.clone() for t in tensors], group_size=1, bytes_sent=0, bytes_received=0
        )

    def newest_version(self) -> int:
        return -1

    def round_fate(self, round_key: str) -> RoundFate:
        return RoundFate(failed_everywhere=False)

    def run_states(self) -> dict[str, tuple[str, int]]:
        return {}

    def rounds_awaiting(self) -> list[str]:
        return []

    def report_failed(self, round_key: str) -> None:
        pass

    def join_run(self, version: int) -> None:
        pass

    def leave_run(self) -> None:
        pass


def _peer(
    monkeypatch: pytest.MonkeyPatch, mode: str, inner_steps: int, max_steps: int | None
) -> tuple[SwarmDiLoCoStrategy, RoundLog, nn.Module]:
    monkeypatch.setattr(swarm_diloco, "_FINAL_AGREEMENT_S", 0.0)
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    log = RoundLog()
    strategy = SwarmDiLoCoStrategy(
        DiLoCoConfig(inner_steps=inner_steps, run_id="r", **MODES[mode]),
        cast(Any, log),
        cast(Any, FakeNodeThread()),
        cast(Any, FakeDonor()),
        join_existing=False,
        max_steps=max_steps,
    )
    strategy.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    monkeypatch.setattr(strategy, "_out_of_agreement", lambda outer_step: [])
    return strategy, log, model


def _step(strategy: SwarmDiLoCoStrategy, log: RoundLog, model: nn.Module, step: int) -> int:
    """One inner step and its step end, as Trainer.run takes it; returns the next step."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01)
    log.step = step
    if strategy._inflight is not None:  # (overlap: done, it lands at this step end)
        concurrent.futures.wait([strategy._inflight], timeout=10)
    continue_from = strategy.on_step_end(model, step)
    return step + 1 if continue_from is None else max(step + 1, continue_from)


def _theirs(
    strategy: SwarmDiLoCoStrategy,
    version: int,
    step: int,
    *,
    in_flight: bool = False,
    final: bool = False,
    attempt: int = 0,
) -> StateSnapshot:
    """The others' state of ``version`` as of ``step``: global weights other than this peer's;
    ``final`` where they published it from their finish(), after their last round."""
    tensors, _ = strategy.state_for_checkpoint()
    kept = {k: v for k, v in tensors.items() if k.startswith(("global.", "momentum.", "buffer."))}
    for name in kept:
        if name.startswith("global."):
            kept[name] = kept[name] + 0.5 + 0.01 * version
    meta = {
        "outer_step": version,
        "step": step,
        "round_in_flight": in_flight,
        "final": final,
        "round_attempt": attempt,
    }
    return StateSnapshot(version=version, tensors=kept, meta=meta)


def _assert_on(strategy: SwarmDiLoCoStrategy, model: nn.Module, theirs: StateSnapshot) -> None:
    assert strategy.outer_step == theirs.version  # theirs, not one past it
    for i, (mine, param) in enumerate(zip(strategy._global, model.parameters(), strict=True)):
        assert torch.equal(mine, theirs.tensors[f"global.{i}"])
        assert torch.equal(param.detach(), mine.detach())


@pytest.mark.parametrize("mode", list(MODES))
def test_a_peer_that_takes_the_others_final_state_at_finish_runs_no_round_after_it(
    monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    # It came to its last step (12: not a multiple of H = 5) after the others had run their
    # last round and published its state as of step 12. It took that state in finish() and,
    # but while training while forming, ran that last round again, alone: with blocking
    # rounds at weight 0 (the outer momentum still moved the weights), with overlap at full
    # weight; it ended an outer step past the others on other weights, and every peer waited
    # the whole final agreement for hashes of one outer step.
    strategy, log, model = _peer(monkeypatch, mode, inner_steps=5, max_steps=12)
    step = 0
    while step < 12:
        step = _step(strategy, log, model, step)
    # (with overlap, finish() lands the round in flight first: the others did too)
    theirs = _theirs(
        strategy, strategy.outer_step + 1 + strategy.round_in_flight, step=12, final=True
    )
    monkeypatch.setattr(strategy, "_download", lambda version=None, donors=None: theirs)
    log.newest_seen_version = theirs.version
    rounds_before, resyncs_before = len(log.rounds), strategy.resyncs
    in_flight = [strategy._inflight] if strategy._inflight is not None else []

    assert strategy.finish(model, step)
    strategy.close()

    own_rounds = len(in_flight)  # (the round in flight is this peer's own, launched at step 9)
    assert log.rounds[rounds_before + own_rounds :] == []
    _assert_on(strategy, model, theirs)
    assert strategy.resyncs == resyncs_before + 1  # its last steps gave way to their state


def test_a_peer_behind_at_finish_still_joins_the_last_round_with_nothing_to_add(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The state it takes is as of the last boundary (10), before the others' last round: they
    # run that round after their last step, and this peer joins it (weight 0, blocking).
    strategy, log, model = _peer(monkeypatch, "blocking", inner_steps=5, max_steps=12)
    step = 0
    while step < 12:
        step = _step(strategy, log, model, step)
    theirs = _theirs(strategy, strategy.outer_step + 1, step=10)
    monkeypatch.setattr(strategy, "_download", lambda version=None, donors=None: theirs)
    log.newest_seen_version = theirs.version
    rounds_before = len(log.rounds)
    strategy.finish(model, step)
    strategy.close()
    assert [(key, weight) for _, key, weight in log.rounds[rounds_before:]] == [("r/outer/3", 0.0)]
    assert strategy.outer_step == theirs.version + 1
    assert strategy.resyncs == 1  # (its steps 10 and 11 gave way to their state)


H, MAX_STEPS = 8, 30  # the last segment, steps 24 to 29, is shorter than H


def _set_hash_records(
    monkeypatch: pytest.MonkeyPatch,
    strategy: SwarmDiLoCoStrategy,
    version: int,
    others_final: dict[str, bool | str | None],
) -> None:
    """The other peers' hash records of outer step ``version``, by a name that stands for the
    peer: marked final or not (None: no final field, as a peer from before it publishes). A
    peer not marked final (False) went on: it published its hash of ``version + 1`` too;
    ``"unmarked"``: a record not marked final, of a peer that did not go on (its last
    boundary's put, not yet put again marked).
    Their hashes are none of this peer's: the final agreement reads none (it took the state
    from the majority's holders again and again)."""
    monkeypatch.setattr(strategy, "_published_hashes", lambda outer_step: {})
    dht = cast(FakeDht, strategy.node_thread.node.dht)
    records: list[SimpleNamespace] = []
    went_on: list[SimpleNamespace] = []
    for name, final in others_final.items():
        value: dict[str, Any] = {"hash": "0" * 64}
        if final is not None:
            value["final"] = final is True
        key = name.encode().ljust(32, b".")
        records.append(SimpleNamespace(value=json.dumps(value).encode(), publisher_public_key=key))
        if final is False:
            went_on.append(
                SimpleNamespace(value=b'{"hash": "' + b"1" * 64 + b'"}', publisher_public_key=key)
            )
    dht.records[_hash_key("r", version)] = records
    dht.records[_hash_key("r", version + 1)] = went_on


def _own_hash_records(strategy: SwarmDiLoCoStrategy, version: int) -> list[dict[str, Any]]:
    """The hash records of outer step ``version`` this peer put, in order."""
    dht = cast(FakeDht, strategy.node_thread.node.dht)
    return [json.loads(value) for key, value in dht.puts if key == _hash_key("r", version)]


def _newcomer_behind_at_the_last_boundary(
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    theirs_at: tuple[int, int],
    *,
    final: bool = False,
    max_steps: int | None = MAX_STEPS,
    attempt: int = 0,
    unmarked: bool = False,
    others_final: dict[str, bool | str | None] | None = None,
) -> tuple[SwarmDiLoCoStrategy, RoundLog, nn.Module, StateSnapshot, int]:
    """A newcomer that took version 2 (as of step 16) trains to its boundary at step 23, where
    the others publish version ``theirs_at[0]`` as of step ``theirs_at[1]`` (``unmarked``:
    without the final field, as a peer from before it publishes; ``others_final``: the other
    peers' hash records of that version, see :func:`_set_hash_records`); it trains on as
    Trainer.run does and finishes. Returns the step it finished at."""
    strategy, log, model = _peer(monkeypatch, mode, inner_steps=H, max_steps=max_steps)
    if others_final is not None:
        _set_hash_records(monkeypatch, strategy, theirs_at[0], others_final)
    strategy.outer_step = 2
    strategy._apply_snapshot(strategy._snapshot(step=2 * H))
    version, as_of = theirs_at
    theirs = _theirs(strategy, version, step=as_of, final=final, attempt=attempt)
    if unmarked:
        del theirs.meta["final"]
    monkeypatch.setattr(strategy, "_newest_version", lambda: version)
    monkeypatch.setattr(strategy, "_download", lambda version=None, donors=None: theirs)
    log.newest_seen_version = version
    step = 2 * H
    while step < MAX_STEPS:
        step = _step(strategy, log, model, step)
    strategy.finish(model, step)
    strategy.close()
    return strategy, log, model, theirs, step


def test_a_peer_behind_at_the_last_boundary_joins_the_others_last_round_and_ends_at_the_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # It took their state of the last boundary (version 3, as of 24) and joined the round of
    # outer step 3 (their last, run after their last step) with nothing to add; then it went
    # on from 24 + H = 32, past the 30-step budget.
    strategy, log, _, _, step = _newcomer_behind_at_the_last_boundary(
        monkeypatch, "blocking", theirs_at=(3, 3 * H)
    )
    assert step == MAX_STEPS
    assert [(key, weight) for _, key, weight in log.rounds] == [("r/outer/3", 0.0)]
    assert strategy.outer_step == 4  # the others' after their last round, not one more


@pytest.mark.parametrize("mode", list(MODES))
def test_a_peer_behind_at_the_last_boundary_that_takes_the_others_final_state_ends_on_it(
    monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    # The others had finished (version 4, after their last round, as of step 30). It took
    # that state at its boundary and joined outer step 4's round, alone, with nothing to add
    # (the outer momentum moved it past their weights), then went on from 30 + H = 38.
    strategy, log, model, theirs, step = _newcomer_behind_at_the_last_boundary(
        monkeypatch, mode, theirs_at=(4, MAX_STEPS), final=True
    )
    assert step == MAX_STEPS
    assert log.rounds == []
    _assert_on(strategy, model, theirs)
    assert strategy.resyncs == 1


def test_an_overlap_peer_that_takes_the_last_boundarys_state_joins_its_round_in_flight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # max_steps a multiple of H: with overlap the others publish their state at the last
    # boundary as of max_steps too, with that boundary's round in flight (they land it in
    # finish()). It is not their final state: a peer that takes it there still joins that round.
    strategy, log, model = _peer(monkeypatch, "overlap", inner_steps=H, max_steps=3 * H)
    strategy.outer_step = 1
    strategy._apply_snapshot(strategy._snapshot(step=2 * H))
    theirs = _theirs(strategy, 2, step=3 * H, in_flight=True)
    monkeypatch.setattr(strategy, "_download", lambda version=None, donors=None: theirs)
    log.newest_seen_version = 2
    step = 2 * H
    while step < 3 * H:
        step = _step(strategy, log, model, step)
    assert [(key, weight) for _, key, weight in log.rounds] == [("r/outer/2", 1.0)]
    strategy.finish(model, step)
    strategy.close()
    assert step == 3 * H
    assert strategy.outer_step == 3  # (the round it joined, landed as the others land it)


RETRY_MAX_STEPS = 4 * H  # a multiple of H: the last round is the last boundary's (step 31)


def _behind_a_state_with_a_retry_owed(
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    *,
    others_final: dict[str, bool | str | None] | None = None,
) -> tuple[SwarmDiLoCoStrategy, RoundLog, int]:
    """A peer behind at step 24 takes the others' state of outer step 3 as of the last step,
    with round_attempt 1 (their last round failed on every member), trains to the budget and
    finishes. ``others_final``: that state is marked final, and these are the other peers'
    hash records of outer step 3 (see :func:`_set_hash_records`). Returns the step it
    finished at."""
    strategy, log, model = _peer(monkeypatch, mode, inner_steps=H, max_steps=RETRY_MAX_STEPS)
    strategy.outer_step = 2
    strategy._apply_snapshot(strategy._snapshot(step=3 * H))
    final = others_final is not None
    theirs = _theirs(strategy, 3, step=RETRY_MAX_STEPS, attempt=1, final=final)
    if others_final is not None:
        _set_hash_records(monkeypatch, strategy, 3, others_final)
    monkeypatch.setattr(strategy, "_newest_version", lambda: 3)
    monkeypatch.setattr(strategy, "_download", lambda version=None, donors=None: theirs)
    log.newest_seen_version = 3
    step = 3 * H
    while step < RETRY_MAX_STEPS:
        step = _step(strategy, log, model, step)
    strategy.finish(model, step)
    strategy.close()
    return strategy, log, step


@pytest.mark.parametrize("mode", list(MODES))
def test_a_peer_behind_that_takes_a_state_with_a_retry_owed_joins_the_retry(
    monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    # The others' last boundary round (outer step 3) failed on every member: they published
    # their state as of the last step (32) with round_attempt 1, and run the retry r/outer/3#1
    # in finish(). Taken as their final state (as of max_steps, no round in flight), it ended
    # this peer on it, a round behind them: the swarm ended split, and they waited the whole
    # final agreement. Not marked final, it is joined.
    strategy, log, step = _behind_a_state_with_a_retry_owed(monkeypatch, mode)
    assert step == RETRY_MAX_STEPS
    assert [key for _, key, _ in log.rounds] == ["r/outer/3#1"]
    assert strategy.outer_step == 4  # (the retry's outer step, as the others)


@pytest.mark.parametrize("max_steps", [1000, None])
@pytest.mark.parametrize("mode", list(MODES))
def test_a_run_that_ends_before_max_steps_ends_a_peer_that_takes_its_final_state_on_it(
    monkeypatch: pytest.MonkeyPatch, mode: str, max_steps: int | None
) -> None:
    # The run ends at step 30 (a time budget fitted the schedule shorter; or the strategy
    # knows no max_steps): the others' final state, as of step 30, is short of max_steps.
    # Not taken as final, it had this peer join outer step 4's round alone (the outer
    # momentum moved it past their weights) and go on from 30 + H = 38.
    strategy, log, model, theirs, step = _newcomer_behind_at_the_last_boundary(
        monkeypatch, mode, theirs_at=(4, MAX_STEPS), final=True, max_steps=max_steps
    )
    assert step == MAX_STEPS
    assert log.rounds == []
    _assert_on(strategy, model, theirs)
    assert strategy.resyncs == 1


class RecordingDonor(FakeDonor):
    def __init__(self) -> None:
        self.published: list[StateSnapshot] = []

    def publish(self, snapshot: StateSnapshot, *, max_meta_bytes: int | None = None) -> None:
        self.published.append(snapshot)


@pytest.mark.parametrize("mode", list(MODES))
def test_the_state_after_the_last_round_is_marked_final_where_it_is_first_published(
    monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    # max_steps a multiple of H: the state published after the last boundary's round is as
    # of max_steps, and no round follows it. Published unmarked there and marked only where
    # finish() published it again (after the last checkpoint's save), it had a late peer that
    # took it in between run the last round again alone at weight 0 and end an outer step
    # past the others. With overlap, that boundary publishes with its round in flight: only
    # finish(), which lands it, publishes the final state. (Training while forming, that
    # round forms after the last step and lands in finish().)
    strategy, log, model = _peer(monkeypatch, mode, inner_steps=5, max_steps=10)
    donor = RecordingDonor()
    strategy.donor = cast(Any, donor)
    step = 0
    while step < 10:
        step = _step(strategy, log, model, step)
    strategy._wait_for_publication()
    before_finish = len(donor.published)
    assert not any(s.meta["final"] for s in donor.published[:-1])
    if mode != "forming":
        at_the_end = donor.published[-1]
        assert at_the_end.meta["step"] == 10
        assert at_the_end.meta["final"] is (mode == "blocking")
    strategy.finish(model, step)
    strategy.close()
    assert all(s.meta["final"] for s in donor.published[before_finish:])
    last = donor.published[-1]
    assert last.meta["final"] is True
    assert last.version == strategy.outer_step
    assert last.meta["step"] == 10


class FailingLog(RoundLog):
    """Every round's average holds NaN, and every round failed on all its members."""

    def average(
        self, tensors: list[torch.Tensor], *, round_key: str, weight: float
    ) -> AverageOutcome:
        outcome = super().average(tensors, round_key=round_key, weight=weight)
        return AverageOutcome(
            tensors=[torch.full_like(t, float("nan")) for t in outcome.tensors],
            group_size=2,
            bytes_sent=0,
            bytes_received=0,
        )

    def round_fate(self, round_key: str) -> RoundFate:
        return RoundFate(failed_everywhere=True)


def test_the_state_after_a_last_round_that_failed_everywhere_is_not_marked_final(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The others run that round again in finish(): a late peer that takes this state joins it.
    strategy, _, model = _peer(monkeypatch, "blocking", inner_steps=5, max_steps=10)
    failing = FailingLog()
    donor = RecordingDonor()
    strategy.averager = strategy.swarm_averager = cast(Any, failing)
    strategy.donor = cast(Any, donor)
    step = 0
    while step < 10:
        step = _step(strategy, failing, model, step)  # (both rounds fail: two attempts)
    strategy._wait_for_publication()
    strategy.close()
    assert donor.published[-1].meta["step"] == 10
    assert donor.published[-1].meta["round_attempt"] == 2
    assert donor.published[-1].meta["final"] is False


@pytest.mark.parametrize("value", ["true", 1, None])
def test_a_state_whose_final_marker_is_not_a_boolean_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: object
) -> None:
    strategy, _, _ = _peer(monkeypatch, "blocking", inner_steps=5, max_steps=10)
    theirs = _theirs(strategy, 1, step=5)
    theirs.meta["final"] = value
    assert "'final' is not a boolean" in strategy._unusable(theirs)
    theirs.meta["final"] = True
    assert strategy._unusable(theirs) == ""
    strategy.close()


class FakeGoodput:
    def __init__(self) -> None:
        self.discarded = 0

    def discard(self, tokens: int) -> None:
        self.discarded += tokens


class FakeMetrics:
    def __init__(self) -> None:
        self.goodput = FakeGoodput()


def test_an_overlap_peer_that_takes_the_final_state_at_finish_drops_its_last_steps_from_goodput(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Its steps 10 and 11 (after its last boundary, at 9) went into no round: the others'
    # final state took their place. Counted as a resync, they stayed in goodput (only a
    # boundary took thrown-away steps out of it).
    strategy, log, model = _peer(monkeypatch, "overlap", inner_steps=5, max_steps=12)
    metrics = FakeMetrics()
    strategy.metrics, strategy.tokens_per_step = cast(Any, metrics), 3
    step = 0
    while step < 12:
        step = _step(strategy, log, model, step)
    assert metrics.goodput.discarded == 0
    theirs = _theirs(strategy, strategy.outer_step + 2, step=12, final=True)
    monkeypatch.setattr(strategy, "_download", lambda version=None, donors=None: theirs)
    log.newest_seen_version = theirs.version
    strategy.finish(model, step)
    strategy.close()
    _assert_on(strategy, model, theirs)
    assert metrics.goodput.discarded == 2 * 3


@pytest.mark.parametrize("mode", list(MODES))
def test_a_state_of_a_peer_from_before_the_final_marker_is_final_where_it_ends_the_run(
    monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    # A peer from before the marker publishes its end-of-run state without the field. Read as
    # not final, a new peer that took it ran the last round again alone and ended an outer
    # step past the others (agree False). Without the field, the end is inferred as the old
    # peers inferred it: as of max_steps, no round in flight, none owed.
    strategy, log, model, theirs, step = _newcomer_behind_at_the_last_boundary(
        monkeypatch, mode, theirs_at=(4, MAX_STEPS), unmarked=True
    )
    assert step == MAX_STEPS
    assert log.rounds == []
    _assert_on(strategy, model, theirs)


@pytest.mark.parametrize("mode", list(MODES))
def test_an_unmarked_state_with_a_retry_owed_or_short_of_the_budget_is_not_final(
    monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    # (the old inference: a retry owed, or a boundary short of max_steps, is joined)
    strategy, _, _ = _peer(monkeypatch, mode, inner_steps=H, max_steps=MAX_STEPS)
    for meta in (
        {"step": MAX_STEPS, "round_attempt": 1},
        {"step": MAX_STEPS, "round_in_flight": True},
        {"step": 3 * H},
    ):
        theirs = _theirs(strategy, 4, step=0)
        del theirs.meta["final"]
        theirs.meta.update(meta)
        strategy._apply_snapshot(theirs)
        assert not strategy._took_final_state(), meta
    strategy.close()


def test_a_state_marked_final_mid_run_leaves_the_budget_of_the_states_after_it_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A donor marked its state of outer step 2 (as of 16) final mid-run (hostile, or of
    # another budget): taking it set this peer's max_steps to 16 for good. The honest state
    # taken later, version 4 as of 40, then had it continue from min(48, 16): a boundary off
    # the others for the rest of the run (the swarm split), and no early join of a round.
    # And while it stood on the marked state, it read the others' versions only from its
    # last round's formation (none formed since): it never saw them go on, and ended there.
    strategy, log, model = _peer(monkeypatch, "blocking", inner_steps=H, max_steps=80)
    step = 0
    while step < 2 * H - 1:
        step = _step(strategy, log, model, step)
    current = {"snapshot": _theirs(strategy, 2, step=2 * H, final=True), "version": 2}
    monkeypatch.setattr(log, "newest_version", lambda: current["version"])
    monkeypatch.setattr(
        strategy, "_download", lambda version=None, donors=None, joining=False: current["snapshot"]
    )
    log.newest_seen_version = 2  # (its last formation's read: no round formed after it)
    step = _step(strategy, log, model, step)  # its boundary at 15: it takes the marked state
    assert strategy._took_final_state()
    while step < 4 * H - 1:
        step = _step(strategy, log, model, step)
    assert log.rounds == [(7, "r/outer/0", 1.0)]  # (none on the marked state)
    current["snapshot"], current["version"] = _theirs(strategy, 4, step=5 * H), 4
    assert _step(strategy, log, model, step) == 6 * H  # (joined round 4 -> 5, as the others)
    assert strategy.max_steps == 80
    assert not strategy._took_final_state()
    strategy.close()


def _outcome(
    run: tuple[SwarmDiLoCoStrategy, RoundLog, nn.Module, StateSnapshot, int],
) -> tuple[int, int, list[tuple[str, float]], list[torch.Tensor]]:
    """Where a peer ended: its step, outer step, rounds (key and weight) and global weights."""
    strategy, log, _, _, step = run
    rounds = [(key, weight) for _, key, weight in log.rounds]
    return step, strategy.outer_step, rounds, [t.detach().clone() for t in strategy._global]


@pytest.mark.parametrize("max_steps", [MAX_STEPS, 1000, None])
@pytest.mark.parametrize("mode", list(MODES))
def test_a_state_one_peer_marks_final_mid_run_is_taken_as_any_state_where_the_others_go_on(
    monkeypatch: pytest.MonkeyPatch, mode: str, max_steps: int | None
) -> None:
    # A swarm of 3: x marks its states final mid-run (hostile, or buggy); b published the same
    # outer step 3 (as of 24, the last boundary's) unmarked: it runs the round after it. The
    # newcomer took x's state at its boundary, believed the run had ended there, skipped the
    # others' last round and ended on outer step 3 where they end on 4 (the swarm split; 3 of
    # 14 loopback runs). Outvoted by b (a tie counts against the marker), the marker is
    # ignored: the peer ends exactly as one that took b's state. (max_steps 1000: a time
    # budget ends the run short of it; None: the strategy knows no budget. The step a state
    # is as of tells nothing there, nor where a liar sets it.)
    as_b = _outcome(
        _newcomer_behind_at_the_last_boundary(
            monkeypatch, mode, theirs_at=(3, 3 * H), max_steps=max_steps
        )
    )
    as_x = _outcome(
        _newcomer_behind_at_the_last_boundary(
            monkeypatch,
            mode,
            theirs_at=(3, 3 * H),
            final=True,
            max_steps=max_steps,
            others_final={"b": False, "x": True},
        )
    )
    assert as_x[:3] == as_b[:3]
    assert as_x[2]  # (the others' round after outer step 3, which it ran with them)
    assert all(torch.equal(a, b) for a, b in zip(as_x[3], as_b[3], strict=True))


@pytest.mark.parametrize(
    "others_final",
    [
        {"b": True, "c": True},
        {"b": True, "old": None},
        {"b": True, "c": True, "x": False},
        # (c's last boundary's record, put unmarked, not yet put again marked: a time budget
        # that ends the run on a boundary; read as a vote, it outvoted b and the peer ran a
        # round alone, an outer step past the others)
        {"b": True, "c": "unmarked"},
        {"c": "unmarked"},
    ],
)
@pytest.mark.parametrize("max_steps", [MAX_STEPS, 1000, None])
@pytest.mark.parametrize("mode", list(MODES))
def test_a_final_state_most_of_its_publishers_marked_final_still_ends_a_peer_on_it(
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    max_steps: int | None,
    others_final: dict[str, bool | str | None],
) -> None:
    # The honest end: every peer publishes its last outer step marked final (one from before
    # the marker says nothing, and counts for neither side; one liar is outvoted). A time
    # budget (max_steps 1000) or no budget known ends it short of max_steps.
    strategy, log, model, theirs, step = _newcomer_behind_at_the_last_boundary(
        monkeypatch,
        mode,
        theirs_at=(4, MAX_STEPS),
        final=True,
        max_steps=max_steps,
        others_final=others_final,
    )
    assert step == MAX_STEPS
    assert log.rounds == []
    _assert_on(strategy, model, theirs)


def _standing_on_a_final_state(
    monkeypatch: pytest.MonkeyPatch, mode: str
) -> tuple[SwarmDiLoCoStrategy, RoundLog, nn.Module, int]:
    """A newcomer that took x's state of outer step 3 (as of 24) marked final before anyone
    had gone on past it, and trained on to the budget without a round. Returns the step it
    reached."""
    strategy, log, model = _peer(monkeypatch, mode, inner_steps=H, max_steps=MAX_STEPS)
    strategy.outer_step = 2
    strategy._apply_snapshot(strategy._snapshot(step=2 * H))
    theirs = _theirs(strategy, 3, step=3 * H, final=True)
    monkeypatch.setattr(strategy, "_newest_version", lambda: 3)
    monkeypatch.setattr(strategy, "_download", lambda version=None, donors=None: theirs)
    log.newest_seen_version = 3
    step = 2 * H
    while step < MAX_STEPS:
        step = _step(strategy, log, model, step)
    strategy._wait_for_publication()
    assert strategy._took_final_state()
    assert log.rounds == []
    return strategy, log, model, step


@pytest.mark.parametrize("mode", list(MODES))
def test_a_final_marker_taken_before_the_others_published_is_weighed_again_in_finish(
    monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    # The newcomer took x's state of outer step 3 (as of 24) marked final before any other
    # record of that outer step was out: nothing outvoted it then, and the peer published it
    # marked final too. By finish(), b's record of it is out, unmarked: the marker is weighed
    # again there, the peer runs the others' last round with them (it skipped it, and ended
    # on outer step 3 where they end on 4), and puts its own record of outer step 3 again,
    # unmarked (its echo of x's marker outvoted b for the next peer to weigh it).
    strategy, log, model, step = _standing_on_a_final_state(monkeypatch, mode)
    _set_hash_records(monkeypatch, strategy, 3, {"b": False, "x": True})
    strategy.finish(model, step)
    strategy.close()
    assert step == MAX_STEPS
    assert [key for _, key, _ in log.rounds] == ["r/outer/3"]
    assert strategy.outer_step == 4
    # (training while forming, a state taken goes out after the round that follows it)
    own = [record["final"] for record in _own_hash_records(strategy, 3)]
    assert own == ([] if mode == "forming" else [True, False])


def test_a_retry_owed_after_a_state_whose_final_marker_is_outvoted_is_joined(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # x marked its state after the last round, which failed on every member (round_attempt
    # 1), final: taken at its word, the peer skipped the retry the others run in finish()
    # and ended a round behind them.
    strategy, log, _ = _behind_a_state_with_a_retry_owed(
        monkeypatch, "blocking", others_final={"b": False, "c": False, "x": True}
    )
    assert [key for _, key, _ in log.rounds] == ["r/outer/3#1"]
    assert strategy.outer_step == 4
