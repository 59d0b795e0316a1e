"""DiLoCo peers as real processes on loopback: killed peers, a newcomer, a restart of everyone."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gossamer.core.hashing import sha256_state
from gossamer.store import CheckpointStore
from swarm_processes import SwarmProcesses

MAX_STEPS = 200  # long enough that the newcomer finds the swarm still running
SYNC_MAX_STEPS = 140  # a sync step averages every step: 90 steps after the kill take ~40 s
OVERLAP_MAX_STEPS = 600  # overlapped rounds never block: the same run takes a third of the time
INNER_STEPS = 5
KILL_INNER_STEPS = 10  # the kill test's rounds: more of its run trains, kills land in any phase


class Swarm(SwarmProcesses):
    """The fault-swarm run's peers, with what these tests check at the end."""

    def __init__(
        self,
        root: Path,
        *,
        overlap: bool = False,
        train_while_forming: bool = True,
        strategy: str = "diloco",
        backend: str = "auto",
        max_steps: int | None = None,
        inner_steps: int = INNER_STEPS,
    ) -> None:
        self.backend = backend
        self.inner_steps = inner_steps
        self.max_steps = max_steps or (OVERLAP_MAX_STEPS if overlap else MAX_STEPS)
        super().__init__(
            root,
            run_name="fault-swarm",
            extra_args=[
                "--train.max-steps",
                str(self.max_steps),
                "--train.batch-size",
                "4",
                "--train.eval-batches",
                "2",
                "--checkpoint.every-steps",
                "10",
                *(["--swarm.overlap"] if overlap else []),
                "--swarm.train-while-forming",
                str(train_while_forming).lower(),
                "--swarm.strategy",
                strategy,
                "--swarm.inner-steps",
                str(inner_steps),
                "--swarm.backend",
                backend,
            ],
        )

    def wait_done(self, names: list[str], timeout_s: float) -> None:
        self.wait_for(
            lambda: all(self.processes[n].poll() is not None for n in names),
            timeout_s,
            f"{names} finishing",
        )
        for name in names:
            assert self.processes[name].returncode == 0, (self.root / f"{name}.log").read_text()

    def log_tails(self, names: list[str], *, last: int = 60) -> str:
        """The last ``last`` lines of each peer's log (for failure messages)."""
        return "\n".join(
            f"--- {name}:\n"
            + "\n".join(
                (self.root / f"{name}.log").read_text(errors="replace").splitlines()[-last:]
            )
            for name in names
        )

    def final_weights(self, name: str) -> str:
        state = CheckpointStore(self.root / name).load_latest()
        assert state is not None
        return sha256_state(state.tensors["model"])


def assert_rounds_went_over(swarm: Swarm, names: list[str]) -> None:
    """Every peer of ``names`` averaged over the swarm's backend (auto on loopback: torch)."""
    backend = "torch" if swarm.backend == "auto" else swarm.backend
    for name in names:
        rounds = swarm.status(name)["rounds_by_backend"]
        assert rounds[backend] > 0, f"{name} averaged over {rounds}, not {backend}"


# Rounds that train while their group forms and averages (the default) run on the default
# backend (torch on loopback) and on the p2p path (what peers far apart use); rounds that stop
# at the boundary on torch, overlapped ones on p2p: all see the kills.
MODES = [(False, True, "auto"), (False, True, "p2p"), (False, False, "auto"), (True, False, "p2p")]
MODE_IDS = ["forming-torch", "forming-p2p", "blocking-torch", "overlap-p2p"]
# Restarting everyone from checkpoints: resuming does not depend on the rounds' transport, so
# training while forming is restarted over torch only (~30 s saved); rounds over p2p after a
# restart are the overlapped mode's, and forming rounds over p2p through kills the kill test's.
RESTART_MODES = [m for m, i in zip(MODES, MODE_IDS, strict=True) if i != "forming-p2p"]
RESTART_MODE_IDS = [i for i in MODE_IDS if i != "forming-p2p"]


def _running(root: Path, mode: tuple[bool, bool, str], inner_steps: int) -> Iterator[Swarm]:
    overlap, train_while_forming, backend = mode
    running = Swarm(
        root,
        overlap=overlap,
        train_while_forming=train_while_forming,
        backend=backend,
        inner_steps=inner_steps,
    )
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(params=MODES, ids=MODE_IDS)
def swarm(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Swarm]:
    yield from _running(tmp_path, request.param, KILL_INNER_STEPS)


@pytest.fixture(params=RESTART_MODES, ids=RESTART_MODE_IDS)
def restarting_swarm(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Swarm]:
    yield from _running(tmp_path, request.param, INNER_STEPS)


def test_killed_peer_survivors_agree_and_newcomer_joins(swarm: Swarm) -> None:
    # Every process imports while the first starts: one started only when needed took 20 s to
    # import torch on a host with a cold file cache; the first had run most of the run alone
    # by then, and the newcomer came after the survivors had finished.
    for name in ("b", "c", "d"):
        swarm.prepare(name)
    swarm.start("a")
    address = swarm.address("a")
    swarm.start("b", address)
    swarm.start("c", address)
    names = ["a", "b", "c"]
    swarm.wait_for(
        lambda: all(swarm.status(n).get("group_size") == 3 for n in names), 120, "a group of 3"
    )
    chance = random.Random()
    kill_at = swarm.status("a")["step"] + chance.randint(0, 2 * swarm.inner_steps)  # any phase
    swarm.wait_for(lambda: swarm.status("a").get("step", 0) >= kill_at, 120, "step reached")
    victim = chance.choice(names)  # the bootstrap peer, or the torch group's leader, too
    swarm.kill(victim)
    killed_at = time.monotonic()
    killed_unix_s = time.time()
    survivors = [n for n in names if n != victim]
    swarm.start("d", swarm.address(survivors[0]))
    swarm.wait_done([*survivors, "d"], timeout_s=180)
    assert time.monotonic() - killed_at < 180
    hashes = {swarm.final_weights(n) for n in [*survivors, "d"]}
    assert len(hashes) == 1, (
        f"survivors' final weights differ (victim {victim}):\n" + swarm.log_tails([*survivors, "d"])
    )
    for name in survivors:
        status = swarm.status(name)
        assert status["state"] == "done"
        assert status["stall_s"] <= 5.0, (
            f"{name} lost {status['stall_s']} s to failures (victim {victim}, killed at step "
            f"{kill_at}):\n{swarm.log_excerpt(name)}"
        )
        # No survivor stops training for more than 5 s after the kill: the dead peer is
        # reported gone by the failure detector within 2.5 s, and no round waits for it past
        # that (nor for the newcomer). Pauses over 1 s are listed with the time they ended.
        for ended_unix_s, pause, step in status["pauses"]:
            if ended_unix_s > killed_unix_s:
                assert pause <= 5.0, (
                    f"{name} stalled {pause:.1f} s at step {step} (victim {victim}):\n"
                    f"{swarm.log_excerpt(name)}"
                )
    survivors.append("d")
    assert_rounds_went_over(swarm, survivors)
    newcomer = swarm.status("d")
    assert newcomer["time_to_productive_s"] is not None
    # 22 KB of state over loopback: the bound is the 10 s of the issue plus the transfer time.
    assert newcomer["time_to_productive_s"] < 10.0 + 1.0
    assert newcomer["outer_step"] == swarm.max_steps // swarm.inner_steps


def test_everyone_killed_then_restarted_resumes_from_checkpoints(restarting_swarm: Swarm) -> None:
    swarm = restarting_swarm
    swarm.start("a")
    address = swarm.address("a")
    swarm.start("b", address)
    swarm.wait_for(lambda: swarm.status("b").get("step", 0) >= 25, 120, "step 25")
    reached = min(swarm.status("a").get("step", 0), swarm.status("b").get("step", 0))
    swarm.kill("a")
    swarm.kill("b")
    for name in ("a", "b"):
        (swarm.root / f"{name}.json").unlink()  # the new processes write their own
        swarm.prepare(name)  # both import at once: one far behind would find the run over
    swarm.start("a")
    swarm.start("b", swarm.address("a"))
    swarm.wait_done(["a", "b"], timeout_s=180)
    summaries = [json.loads((swarm.root / f"{n}.summary.json").read_text()) for n in ("a", "b")]
    # The run resumes from a checkpoint (a peer without one of its own takes the swarm's state).
    assert any(s["resumed_from"] is not None for s in summaries)
    for summary in summaries:
        assert summary["start_step"] >= reached - 10  # lost at most the checkpoint interval
        assert summary["steps"] == swarm.max_steps
    assert swarm.final_weights("a") == swarm.final_weights("b"), (
        f"final weights differ; summaries {summaries}:\n" + swarm.log_tails(["a", "b"])
    )


def test_sync_peers_stay_identical_through_a_kill_and_a_newcomer(tmp_path: Path) -> None:
    swarm = Swarm(tmp_path, strategy="sync", max_steps=SYNC_MAX_STEPS)
    try:
        swarm.start("a")
        address = swarm.address("a")
        swarm.start("b", address)
        swarm.start("c", address)
        # b and c join at a step the run has not reached, with its exact weights and optimizer.
        swarm.wait_for(
            lambda: all(swarm.status(n).get("time_to_productive_s") for n in ("b", "c")),
            120,
            "b and c joined",
        )
        # (Killed at step 30 with the run cut to 110 steps, a had averaged over p2p only, the
        # kill landing in its first torch round: the kill must come after rounds over torch.)
        swarm.wait_for(lambda: swarm.status("a").get("step", 0) >= 50, 120, "step 50")
        victim = random.Random().choice(["b", "c"])
        swarm.kill(victim)
        swarm.start("d", address)
        survivors = [n for n in ("a", "b", "c", "d") if n != victim]
        swarm.wait_done(survivors, timeout_s=180)
        # Every step's update is the same average on the same state: the weights are identical.
        assert len({swarm.final_weights(n) for n in survivors}) == 1
        assert swarm.status("d")["time_to_productive_s"] is not None
        for name in survivors:
            assert swarm.status(name)["step"] == swarm.max_steps
        assert_rounds_went_over(swarm, survivors)
    finally:
        swarm.stop()
