"""The swarm demo kills a peer that averages with the others, and says so when none does."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gossamer.train import demo_swarm
from gossamer.train.demo_swarm import SwarmDemoPlan

PLAN = SwarmDemoPlan(
    num_peers=3, max_steps=60, inner_steps=10, batch_size=8, kill_at_step=12, join_at_step=12
)


class _Process:
    def __init__(self, returncode: int | None) -> None:
        self.returncode = returncode

    def poll(self) -> int | None:
        return self.returncode


class _Swarm:
    """Peer 0 steps once per poll; peer 1 averages its first round at poll ``peer1_round_at``
    or exits at once; nothing ever finishes (the demo then stops at its time limit)."""

    def __init__(self, *, peer1_round_at: int | None) -> None:
        self.processes: dict[str, Any] = {}
        self.killed: dict[str, float] = {}
        self.polls = 0
        self.peer1_round_at = peer1_round_at
        self.rounds_when_killed: int | None = None
        self.calls: list[str] = []
        self.newcomer_trains_at: int | None = None
        self.newcomer_status: dict[str, Any] = {
            "state": "training",
            "step": 20,
            "time_to_productive_s": 1.5,
        }

    def prepare(self, name: str) -> None:
        self.calls.append(f"prepare {name}")

    def start(self, name: str, bootstrap: str | None) -> None:
        self.calls.append(f"start {name}")
        exits = name == "peer1" and self.peer1_round_at is None
        self.processes[name] = _Process(1 if exits else None)

    def _peer1_rounds(self) -> int:
        at = self.peer1_round_at
        return int(at is not None and self.polls >= at)

    def statuses(self) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {"peer0": {"address": "a@127.0.0.1:1"}}
        found["peer0"]["step"] = self.polls
        found["peer1"] = {"step": 0, "rounds_by_backend": {"p2p": self._peer1_rounds()}}
        if self.newcomer_trains_at is not None and self.polls >= self.newcomer_trains_at:
            found["peer3"] = dict(self.newcomer_status)
        return found

    def wait_for(
        self, condition: Callable[[], bool], timeout_s: float, view: Callable[[], None]
    ) -> bool:
        for _ in range(200):
            if condition():
                return True
            self.polls += 1
        return False

    def kill(self, name: str) -> None:
        self.rounds_when_killed = self._peer1_rounds()
        self.killed[name] = 0.0

    def stop_all(self) -> None:
        pass


def _run(swarm: _Swarm, tmp_path: Path, events: list[str] | None = None) -> list[str]:
    events = [] if events is None else events
    demo_swarm._run(
        tmp_path,
        PLAN,
        swarm,  # type: ignore[arg-type]
        events,
        lambda line="": None,
        0.0,
        1.0,
        10,
        None,  # type: ignore[arg-type]
    )
    return events


def test_the_peer_killed_has_averaged_with_the_others_though_it_came_late(tmp_path: Path) -> None:
    # Peer 0 passes the kill step at poll 12; peer 1 is still importing until poll 40.
    swarm = _Swarm(peer1_round_at=40)
    with pytest.raises(RuntimeError, match="did not finish"):
        _run(swarm, tmp_path)
    assert swarm.rounds_when_killed == 1
    assert swarm.statuses()["peer0"]["step"] >= 40


def test_a_peer_that_exits_before_it_averages_fails_the_demo_at_once(tmp_path: Path) -> None:
    swarm = _Swarm(peer1_round_at=None)
    with pytest.raises(RuntimeError, match=r"peer1 never averaged.*peer1\.log"):
        _run(swarm, tmp_path)
    assert swarm.killed == {}
    assert swarm.polls == 0  # not the whole time limit


def test_the_later_peers_import_while_the_first_one_starts(tmp_path: Path) -> None:
    # A later peer started only at its turn spent seconds importing torch first (6 s on a busy
    # machine): the first peer trained past the rounds the second was to join, and the newcomer
    # came after the survivors had finished (the demo failed).
    swarm = _Swarm(peer1_round_at=0)
    with pytest.raises(RuntimeError, match="did not finish"):
        _run(swarm, tmp_path)
    assert swarm.calls[:4] == ["start peer0", "prepare peer1", "prepare peer2", "prepare peer3"]
    assert swarm.calls[4:] == ["start peer1", "start peer2", "start peer3"]


@pytest.mark.parametrize(
    ("status", "said"),
    [
        (
            {"state": "training", "step": 20, "time_to_productive_s": 1.5},
            "peer3 took the swarm's state and trains from step 20",
        ),
        # a download that brought nothing: it trains from its own step-0 weights
        (
            {"state": "training", "step": 0, "time_to_productive_s": None},
            "peer3 took no state from donors and trains from its own",
        ),
        (
            {"state": "done", "step": 60, "time_to_productive_s": 1.5},
            "peer3 took the swarm's state and finished",
        ),
    ],
)
def test_the_progress_line_says_when_the_newcomer_took_the_state_and_trains(
    tmp_path: Path, status: dict[str, Any], said: str
) -> None:
    # The last event stayed "peer3 joined and syncs from donors" while peer3 trained.
    swarm = _Swarm(peer1_round_at=0)
    swarm.newcomer_trains_at = 30
    swarm.newcomer_status = status
    events: list[str] = []
    with pytest.raises(RuntimeError, match="did not finish"):
        _run(swarm, tmp_path, events)
    assert events[-2:] == ["peer3 joined and syncs from donors", said]
