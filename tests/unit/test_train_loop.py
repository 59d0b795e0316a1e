"""The one-peer training loop: it learns, resumes bit-exactly, and refuses what it can't use."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from gossamer.core.clock import FakeClock
from gossamer.core.config import (
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)
from gossamer.core.errors import ConfigError, DataError, IncompatibleCheckpointError
from gossamer.core.hashing import sha256_file, sha256_state
from gossamer.obs.metrics import PeerMetrics
from gossamer.store import CheckpointState, CheckpointStore
from gossamer.train import Trainer, train
from gossamer.train.averaging import InProcessGroup
from gossamer.train.diloco import DiLoCoStrategy
from gossamer.train.diloco_config import DiLoCoConfig
from gossamer.train.optim import ScheduleRefit, learning_rate_at
from gossamer.train.run_events import ProgressEvent, TrainingListener
from gossamer.train.strategy import LocalStrategy

TEXT = "def add(a, b):\n    return a + b\n\n" * 200 + "class Point:\n    x: int\n    y: int\n" * 100


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def tiny_config(corpus_file: Path, ckpt_dir: Path, **train_kwargs: object) -> RunConfig:
    train_fields: dict[str, object] = {
        "max_steps": 12,
        "batch_size": 4,
        "eval_every": 0,
        "eval_batches": 2,
        "seed": 3,
        "log_every": 100,
    }
    train_fields.update(train_kwargs)
    return RunConfig(
        model=ModelConfig(num_layers=1, num_heads=2, width=32, context=32, dropout=0.1),
        data=DataConfig(source="text", path=str(corpus_file), validation_fraction=0.1),
        optim=OptimConfig(lr=1e-2, warmup_steps=2),
        train=TrainConfig(**train_fields),  # type: ignore[arg-type]
        checkpoint=CheckpointConfig(directory=str(ckpt_dir), every_steps=4, keep_last=3),
    )


def test_loss_goes_down(corpus_file: Path, tmp_path: Path) -> None:
    config = tiny_config(corpus_file, tmp_path / "ckpt", max_steps=40)
    result = train(config)
    assert result.steps_done == 40
    assert result.val_loss_after < result.val_loss_before - 1.0
    assert result.tokens_trained == 40 * 4 * 32
    assert result.checkpoint_path is not None
    assert result.checkpoint_path.is_dir()


def test_resume_is_bit_exact(corpus_file: Path, tmp_path: Path) -> None:
    """2N steps in one go == N steps, a new process-like Trainer, then N more steps."""
    straight = tiny_config(corpus_file, tmp_path / "a", grad_accum_steps=2)
    with Trainer(straight) as trainer:
        trainer.run()
        expected = sha256_state(trainer.model.state_dict())

    split = tiny_config(corpus_file, tmp_path / "b", grad_accum_steps=2)
    with Trainer(split) as first:
        first.run(stop_at_step=6)
        halfway = sha256_state(first.model.state_dict())
    torch.manual_seed(12345)  # disturb global RNG state as a new process would have other state
    with Trainer(split) as second:
        assert second.step == 6
        assert sha256_state(second.model.state_dict()) == halfway
        result = second.run()
        actual = sha256_state(second.model.state_dict())
    assert result.start_step == 6
    assert result.resumed_from is not None
    assert actual == expected


def test_custom_model_factory(corpus_file: Path, tmp_path: Path) -> None:
    class Bigram(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Embedding(256, 256)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.table(tokens)  # type: ignore[no-any-return]

    config = tiny_config(corpus_file, tmp_path / "ckpt", max_steps=30)
    result = train(config, model_factory=Bigram)
    assert result.val_loss_after < result.val_loss_before
    assert result.num_parameters == 256 * 256


def test_incompatible_checkpoint_is_refused_and_kept(corpus_file: Path, tmp_path: Path) -> None:
    config = tiny_config(corpus_file, tmp_path / "ckpt", max_steps=4)
    result = train(config)
    assert result.checkpoint_path is not None
    files = sorted(result.checkpoint_path.iterdir())
    before = {f.name: sha256_file(f) for f in files}
    wider = RunConfig(
        model=ModelConfig(num_layers=1, num_heads=2, width=64, context=32),
        data=config.data,
        train=config.train,
        checkpoint=config.checkpoint,
    )
    with pytest.raises(
        IncompatibleCheckpointError, match=r"model\.width: checkpoint 32, config 64"
    ):
        Trainer(wider)
    assert {f.name: sha256_file(f) for f in sorted(result.checkpoint_path.iterdir())} == before


def test_corrupted_newest_checkpoint_falls_back_to_previous(
    corpus_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tiny_config(corpus_file, tmp_path / "ckpt", max_steps=8)
    result = train(config)
    assert result.checkpoint_path is not None
    weights = result.checkpoint_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x10
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING), Trainer(config) as trainer:
        assert trainer.step == 4
    assert result.checkpoint_path.name in caplog.text


def test_time_budget_stops_early(corpus_file: Path, tmp_path: Path) -> None:
    class TickingClock(FakeClock):
        def monotonic(self) -> float:
            self.advance(0.5)
            return super().monotonic()

    config = tiny_config(corpus_file, tmp_path / "ckpt", max_steps=1000, max_seconds=5.0)
    with Trainer(config, clock=TickingClock()) as trainer:
        result = trainer.run()
    assert result.stopped_by_time_budget
    assert 0 < result.steps_done < 1000


def test_tokens_outside_the_vocabulary_are_a_data_error(tmp_path: Path) -> None:
    import numpy as np

    path = tmp_path / "tokens.bin"
    np.arange(5000, dtype=np.uint16).tofile(path)
    config = RunConfig(
        model=ModelConfig(num_layers=1, num_heads=2, width=32, context=32, vocab_size=256),
        data=DataConfig(source="tokens", path=str(path), token_dtype="uint16"),
        train=TrainConfig(max_steps=2, batch_size=2, eval_batches=1),
        checkpoint=CheckpointConfig(directory=str(tmp_path / "ckpt")),
    )
    with pytest.raises(DataError, match=r"model\.vocab_size"):
        train(config)


def test_a_corpus_that_records_no_largest_ids_has_its_batches_checked(tmp_path: Path) -> None:
    # (a corpus made by hand: its manifest cannot vouch for its ids)
    import numpy as np

    from gossamer.data import Corpus, TokenSource

    tokens = np.full(4000, 999, dtype=np.uint16)
    corpus = Corpus(TokenSource(tokens, "hand-made tokens"), TokenSource(tokens, "held out"), {})
    config = RunConfig(
        model=ModelConfig(num_layers=1, num_heads=2, width=32, context=32, vocab_size=256),
        train=TrainConfig(max_steps=2, batch_size=2, eval_batches=1),
        checkpoint=CheckpointConfig(directory=str(tmp_path / "ckpt")),
    )
    with pytest.raises(DataError, match=r"token id 999 in held out"):
        Trainer(config, corpus=corpus)


def test_missing_data_path_is_a_data_error(tmp_path: Path) -> None:
    config = RunConfig(
        data=DataConfig(source="text", path=str(tmp_path / "missing.txt")),
        checkpoint=CheckpointConfig(directory=str(tmp_path / "ckpt")),
    )
    with pytest.raises(DataError, match=r"missing\.txt"):
        train(config)


def test_learning_rate_schedule() -> None:
    optim = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10)
    assert learning_rate_at(0, config=optim, max_steps=110) == pytest.approx(0.1)
    assert learning_rate_at(9, config=optim, max_steps=110) == pytest.approx(1.0)
    assert learning_rate_at(10, config=optim, max_steps=110) == pytest.approx(1.0)
    assert learning_rate_at(60, config=optim, max_steps=110) == pytest.approx(0.55)
    assert learning_rate_at(110, config=optim, max_steps=110) == pytest.approx(0.1)
    rates = [learning_rate_at(s, config=optim, max_steps=110) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(rates))
    assert not any(math.isnan(r) for r in rates)


def test_a_run_shorter_than_its_warm_up_still_reaches_its_peak_and_decays() -> None:
    # (10 steps with the default 20 of warm-up climbed to half the peak and never decayed)
    optim = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=20)
    rates = [learning_rate_at(s, config=optim, max_steps=10) for s in range(10)]
    assert max(rates) == pytest.approx(1.0)
    assert rates.index(max(rates)) == 4  # warm-up over half the run
    assert rates[-1] < 0.2
    assert learning_rate_at(10, config=optim, max_steps=10) == pytest.approx(0.1)


def test_a_schedule_fitted_part_way_keeps_its_warm_up() -> None:
    # Fitted to a time budget at step 20, a 1000-step schedule became 41 steps long: capped by
    # the new length, the warm-up ended at once and the rate jumped 5x in one step.
    optim = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=100)
    rates = [
        learning_rate_at(s, config=optim, max_steps=1000 if s < 20 else 41, planned_steps=1000)
        for s in range(18, 23)
    ]
    assert all(b - a == pytest.approx(0.01) for a, b in itertools.pairwise(rates))


def test_a_schedule_fitted_shorter_than_its_warm_up_still_peaks_and_decays() -> None:
    # Fitted at step 20 to 41 steps with 100 of warm-up, the rate climbed to 0.41 of its peak
    # and the run ended there: it never decayed, and never peaked.
    optim = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=100)

    def rate(step: int) -> float:
        fitted = step >= 20
        return learning_rate_at(
            step,
            config=optim,
            max_steps=41 if fitted else 1000,
            planned_steps=1000,
            fitted_at=20 if fitted else None,
        )

    rates = [rate(s) for s in range(41)]
    top = rates.index(max(rates))
    assert max(rates) == pytest.approx(1.0)
    assert 20 < top <= 31  # the rest of the warm-up takes half the steps left at most
    assert all(a < b for a, b in itertools.pairwise(rates[: top + 1]))
    assert all(a >= b for a, b in itertools.pairwise(rates[top:]))
    assert all(b / a < 1.5 for a, b in itertools.pairwise(rates[10:]))  # (no jump)
    assert rates[-1] < 0.15


def test_a_run_whose_budget_ends_inside_its_warm_up_decays_by_its_end(
    corpus_file: Path, tmp_path: Path
) -> None:
    # (3.5 s: the clock ticks at every reading, and the budget spent is read at every
    # checkpoint too: at 3 s the budget ran out a step or two before the fit at step 20)
    config = tiny_config(corpus_file, tmp_path / "ckpt", max_steps=1000, max_seconds=3.5)
    config = dataclasses.replace(config, optim=dataclasses.replace(config.optim, warmup_steps=200))
    with Trainer(config, clock=_SlowClock()) as trainer:
        trainer.run()
        fitted = trainer.schedule_steps
        final_lr = trainer.run_state.optimizer.param_groups[0]["lr"]
    assert 20 < fitted < 200
    assert final_lr < config.optim.lr * 0.2
    with Trainer(config) as resumed:  # the step it was fitted at travels in the checkpoint
        assert resumed.run_state.schedule_fitted_at == 20


def test_schedule_is_fitted_to_the_time_budget(corpus_file: Path, tmp_path: Path) -> None:
    class TickingClock(FakeClock):
        def monotonic(self) -> float:
            self.advance(0.05)
            return super().monotonic()

    config = tiny_config(corpus_file, tmp_path / "ckpt", max_steps=1000, max_seconds=10.0)
    with Trainer(config, clock=TickingClock()) as trainer:
        result = trainer.run()
        fitted = trainer.schedule_steps
        final_lr = trainer.run_state.optimizer.param_groups[0]["lr"]
    assert 20 < fitted < 1000
    assert result.steps_done == fitted
    assert result.stopped_by_time_budget  # the budget ended it (through the fit) before 1000
    assert final_lr == pytest.approx(
        learning_rate_at(fitted - 1, config=config.optim, max_steps=fitted)
    )
    assert final_lr < config.optim.lr * 0.2
    with Trainer(config) as resumed:  # the fitted length travels in the checkpoint
        assert resumed.schedule_steps == fitted


class _SlowClock(FakeClock):
    """Every reading is 50 ms after the one before: a step rate the budget fit can measure."""

    def monotonic(self) -> float:
        self.advance(0.05)
        return super().monotonic()


class _SlowingClock(FakeClock):
    """Readings 10 ms apart, 100 ms apart once ``tick`` is raised."""

    tick = 0.01

    def monotonic(self) -> float:
        self.advance(self.tick)
        return super().monotonic()


class _SlowsDown(TrainingListener):
    """Slows the clock down from ``step`` on (a swarm peer's first steps ran alone, then its
    rounds with others began) and records every step's learning rate."""

    def __init__(self, clock: _SlowingClock, step: int) -> None:
        self.clock, self.step = clock, step
        self.rates: list[float] = []

    def on_step(self, event: ProgressEvent) -> None:
        self.rates.append(event.lr)
        if event.step >= self.step:
            self.clock.tick = 0.1


def test_a_schedule_fitted_to_fast_first_steps_is_fitted_again_when_steps_slow(
    corpus_file: Path, tmp_path: Path
) -> None:
    # Fitted once, after the first 20 steps (here 10x faster than the rest), the schedule
    # planned ~900 steps; the budget ended the run after ~100, the rate still near its peak.
    config = tiny_config(corpus_file, tmp_path / "ckpt", max_steps=5000, max_seconds=30.0)
    clock = _SlowingClock()
    listener = _SlowsDown(clock, step=20)
    with Trainer(config, clock=clock, listener=listener) as trainer:
        result = trainer.run()
        refit = trainer.run_state.schedule_refit
        end = trainer.schedule_steps
    assert refit is not None
    assert result.steps_done == end < 200
    peak, rates = config.optim.lr, listener.rates
    assert max(rates) == pytest.approx(peak)
    assert rates[-1] < 0.15 * peak  # decayed by the budget's end
    top = rates.index(max(rates))
    assert all(b <= a * (1 + 1e-9) for a, b in itertools.pairwise(rates[top:]))
    assert all(a - b < 0.05 * peak for a, b in itertools.pairwise(rates))  # (no jump)
    with Trainer(config) as resumed:  # the refit travels in the checkpoint
        assert resumed.run_state.schedule_refit == refit
        assert resumed.schedule_steps == end


def test_a_stop_asked_for_pauses_the_run_with_a_checkpoint_of_the_step_reached(
    corpus_file: Path, tmp_path: Path
) -> None:
    config = tiny_config(corpus_file, tmp_path / "ckpt", max_steps=40)
    config = dataclasses.replace(
        config, checkpoint=dataclasses.replace(config.checkpoint, every_steps=0)
    )

    class StopAt7(TrainingListener):
        def __init__(self) -> None:
            self.stop = threading.Event()

        def on_step(self, event: ProgressEvent) -> None:
            if event.step == 7:
                self.stop.set()  # (as the signal handler does)

    listener = StopAt7()
    with Trainer(config, listener=listener, stop=listener.stop) as trainer:
        result = trainer.run()
    assert result.interrupted
    assert result.steps_done == 7
    assert CheckpointStore(tmp_path / "ckpt").steps() == [7]
    with Trainer(config) as resumed:  # the same command goes on from there to the end
        again = resumed.run()
    assert (again.start_step, again.steps_done, again.interrupted) == (7, 40, False)


def test_a_resume_with_nothing_left_to_train_leaves_the_checkpoint_as_it_is(
    corpus_file: Path, tmp_path: Path
) -> None:
    # Resumed at step 12 with max_steps 4, the run printed "steps 12 -> 4" and wrote the step
    # again, its config now saying max_steps 4.
    with Trainer(tiny_config(corpus_file, tmp_path / "ckpt")) as trainer:
        trainer.run()
    store = CheckpointStore(tmp_path / "ckpt")
    manifest = (store.path_for(12) / "manifest.json").read_bytes()
    with Trainer(tiny_config(corpus_file, tmp_path / "ckpt", max_steps=4)) as resumed:
        result = resumed.run()
    assert (result.start_step, result.steps_done) == (12, 12)
    assert result.checkpoint_path == store.path_for(12)
    assert (store.path_for(12) / "manifest.json").read_bytes() == manifest


def test_a_resume_from_a_checkpoint_a_dead_writer_set_aside_names_the_folder_it_read(
    corpus_file: Path, tmp_path: Path
) -> None:
    # A writer killed between the fallback's two renames leaves step 12 as .old-step-...: the
    # resume read it, yet resumed_from and the result's checkpoint named step-000000012, which
    # did not exist.
    with Trainer(tiny_config(corpus_file, tmp_path / "ckpt")) as trainer:
        trainer.run()
    store = CheckpointStore(tmp_path / "ckpt")
    set_aside = store.directory / ".old-step-000000012-0123abcd"
    store.path_for(12).rename(set_aside)
    with Trainer(tiny_config(corpus_file, tmp_path / "ckpt")) as resumed:
        assert resumed.resumed_from == set_aside
        result = resumed.run()
    assert result.resumed_from == set_aside
    assert result.checkpoint_path is not None
    assert result.checkpoint_path.is_dir()


class _SyncingStrategy(LocalStrategy):
    """Took the state of ``synced_step`` from other peers in setup; records what it was told."""

    def __init__(self, synced_step: int) -> None:
        self.synced_step = synced_step
        self.told: list[int] = []

    def resume_at(self, step: int) -> None:
        self.told.append(step)

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> int | None:
        return self.synced_step


def test_a_state_taken_from_the_swarm_is_trained_as_of_its_own_step(
    corpus_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Resumed at step 8, the peer took the swarm's state of step 5 and trained it as step 8
    # (the loop took only a higher step): another schedule and data position than its weights.
    config = _paused_at(8, corpus_file, tmp_path)
    older = _SyncingStrategy(5)
    with caplog.at_level(logging.WARNING), Trainer(config, strategy=older) as trainer:
        assert older.told == [8]  # before setup: it can keep its own newer state instead
        assert trainer.step == 5
    assert "took the swarm's state of step 5, older than this peer's own" in caplog.text
    newer = _SyncingStrategy(20)
    with Trainer(config, strategy=newer) as trainer:
        assert trainer.step == 20


def test_a_budgeted_run_paused_and_resumed_keeps_the_schedule_it_was_fitted(
    corpus_file: Path, tmp_path: Path
) -> None:
    # At a steady rate, a resumed session (with a budget of its own) was fitted again to it:
    # paused at step 60 of 125, it went on to 183, its schedule stretched by half.
    def budgeted(folder: str) -> RunConfig:
        return tiny_config(corpus_file, tmp_path / folder, max_steps=5000, max_seconds=20.0)

    with Trainer(budgeted("alone"), clock=_SlowClock()) as alone:
        whole = alone.run()
    with Trainer(budgeted("paused"), clock=_SlowClock()) as first:
        first.run(stop_at_step=60)
    with Trainer(budgeted("paused"), clock=_SlowClock()) as resumed:
        result = resumed.run()
        assert resumed.run_state.schedule_refit is None
    assert result.start_step == 60
    assert result.steps_done == whole.steps_done
    # Resumed at a slower rate, the schedule is fitted again to what is left of the run's
    # budget, not to the session's own: it ends sooner (it ended later, 159 for 124).
    with Trainer(budgeted("slower"), clock=_SlowClock()) as first:
        first.run(stop_at_step=60)
    slower = _SlowingClock()
    slower.tick = 0.0625
    with Trainer(budgeted("slower"), clock=slower) as resumed:
        result = resumed.run()
        assert resumed.run_state.schedule_refit is not None
        final_lr = resumed.run_state.optimizer.param_groups[0]["lr"]
    assert 60 < result.steps_done < whole.steps_done
    assert final_lr < 0.2 * resumed.config.optim.lr


def test_a_refit_schedule_goes_on_from_where_it_stood() -> None:
    optim = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10)
    refit = ScheduleRefit(at_step=100, position=100.0, first_steps=1000)
    before = learning_rate_at(100, config=optim, max_steps=1000)
    assert learning_rate_at(100, config=optim, max_steps=200, refit=refit) == before
    assert learning_rate_at(99, config=optim, max_steps=200, refit=refit) == (
        learning_rate_at(99, config=optim, max_steps=1000)
    )
    assert learning_rate_at(200, config=optim, max_steps=200, refit=refit) == pytest.approx(0.1)
    # Halfway through the steps left, the rate is where the first fit's was halfway through its.
    assert learning_rate_at(150, config=optim, max_steps=200, refit=refit) == pytest.approx(
        learning_rate_at(550, config=optim, max_steps=1000)
    )
    # Fitted again the other way (a longer end): still no jump, still the floor at the end.
    longer = ScheduleRefit(at_step=100, position=100.0, first_steps=1000)
    assert learning_rate_at(100, config=optim, max_steps=3000, refit=longer) == before
    assert learning_rate_at(3000, config=optim, max_steps=3000, refit=longer) == pytest.approx(0.1)


def test_a_malformed_schedule_refit_in_a_checkpoint_is_refused(
    corpus_file: Path, tmp_path: Path
) -> None:
    config = tiny_config(corpus_file, tmp_path / "ckpt", max_steps=4)
    with Trainer(config) as trainer:
        trainer.run()
    store = CheckpointStore(tmp_path / "ckpt")
    state = store.load_latest()
    assert state is not None
    state.meta["schedule_steps"] = 40
    state.meta["schedule_refit"] = {"at_step": "soon"}
    store.save(state)  # (a checkpoint that is whole, and wrong)
    with pytest.raises(IncompatibleCheckpointError, match="schedule_refit"):
        Trainer(config)


def test_a_schedule_fitted_to_a_budget_gives_way_to_new_limits_on_resume(
    corpus_file: Path, tmp_path: Path
) -> None:
    budgeted = tiny_config(corpus_file, tmp_path / "ckpt", max_steps=1000, max_seconds=10.0)
    with Trainer(budgeted, clock=_SlowClock()) as trainer:
        fitted = trainer.run().steps_done
    with Trainer(budgeted) as same:  # the same limits: the run is over
        assert same.run().steps_done == fitted
    # It trained nothing and kept the fit: a resume asking for more steps got none.
    longer = tiny_config(corpus_file, tmp_path / "ckpt", max_steps=fitted + 8)
    with Trainer(longer) as resumed:
        assert resumed.schedule_steps == fitted + 8
        result = resumed.run()
    assert (result.start_step, result.steps_done) == (fitted, fitted + 8)
    assert not result.stopped_by_time_budget


def test_a_fit_on_the_last_step_does_not_add_a_step(corpus_file: Path, tmp_path: Path) -> None:
    # The fit comes after 20 steps of a session; here that is the run's last step, and it set
    # the schedule to 21 steps: the same command run again trained a 21st.
    config = tiny_config(corpus_file, tmp_path / "ckpt", max_steps=20, max_seconds=1000.0)
    with Trainer(config, clock=_SlowClock()) as trainer:
        assert trainer.run().steps_done == 20
        assert trainer.schedule_steps == 20
    with Trainer(config, clock=_SlowClock()) as again:
        assert again.run().steps_done == 20
    assert max(CheckpointStore(tmp_path / "ckpt").steps()) == 20


def _paused_at(step: int, corpus_file: Path, tmp_path: Path) -> RunConfig:
    """A run's config, its checkpoints written up to ``step`` (the run paused there)."""
    config = tiny_config(corpus_file, tmp_path / "ckpt")
    with Trainer(config) as first:
        first.run(stop_at_step=step)
    return config


def test_optimizer_settings_changed_on_resume_take_effect(
    corpus_file: Path, tmp_path: Path
) -> None:
    config = _paused_at(6, corpus_file, tmp_path)
    changed = dataclasses.replace(
        config, optim=dataclasses.replace(config.optim, weight_decay=0.5, beta1=0.5, beta2=0.99)
    )
    with Trainer(changed) as resumed:  # the checkpoint's optimizer state held 0.1 and (0.9, 0.95)
        assert resumed.step == 6
        matrices, others = resumed.run_state.optimizer.param_groups
    assert (matrices["weight_decay"], matrices["betas"]) == (0.5, (0.5, 0.99))
    assert (others["weight_decay"], others["betas"]) == (0.0, (0.5, 0.99))


def test_resuming_with_another_seed_is_an_incompatible_checkpoint(
    corpus_file: Path, tmp_path: Path
) -> None:
    config = _paused_at(4, corpus_file, tmp_path)
    reseeded = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=4))
    with pytest.raises(IncompatibleCheckpointError, match=r"other training data.*seed"):
        Trainer(reseeded)


def test_a_resume_may_change_the_dropout(corpus_file: Path, tmp_path: Path) -> None:
    # (refused as "written for another model"; eval takes any dropout)
    config = _paused_at(4, corpus_file, tmp_path)
    model = dataclasses.replace(config.model, dropout=0.0)
    with Trainer(dataclasses.replace(config, model=model)) as resumed:
        assert resumed.step == 4
    wider = dataclasses.replace(config.model, width=64)
    with pytest.raises(IncompatibleCheckpointError, match="another model"):
        Trainer(dataclasses.replace(config, model=wider))


def test_a_local_run_goes_on_as_a_swarm_peer_with_a_new_data_order(
    corpus_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A swarm peer's stream is seeded by its peer id: a local run's checkpoint was refused
    # ("saved with seed=3, and this run has seed=190259298", a seed the user never set).
    config = _paused_at(4, corpus_file, tmp_path)
    with caplog.at_level(logging.WARNING), Trainer(config, stream_seed=190_259_298) as peer:
        assert peer.step == 4
        assert peer.run().steps_done == config.train.max_steps
    assert "seeded 3, and this run's is seeded 190259298" in caplog.text
    assert "starts afresh" in caplog.text


def test_resuming_on_other_data_of_the_same_size_says_so(
    corpus_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _paused_at(4, corpus_file, tmp_path)
    other = tmp_path / "other.txt"
    other.write_text(TEXT.swapcase())  # as many tokens, other ones
    moved = dataclasses.replace(config, data=dataclasses.replace(config.data, path=str(other)))
    with caplog.at_level(logging.WARNING), Trainer(moved) as resumed:
        assert resumed.step == 4
    assert "written while training on other data" in caplog.text


def test_resuming_with_another_strategy_says_so(
    corpus_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A DiLoCo checkpoint resumed by a local run dropped the global weights and the outer
    # momentum without a word.
    config = _paused_at(4, corpus_file, tmp_path)
    averager = InProcessGroup(1).averager()
    with (
        caplog.at_level(logging.WARNING),
        Trainer(config, strategy=DiLoCoStrategy(DiLoCoConfig(inner_steps=2), averager)) as resumed,
    ):
        assert resumed.step == 4
    assert "written by the 'local' strategy, and this run uses 'diloco'" in caplog.text


def test_a_fresh_run_refuses_a_directory_that_holds_checkpoints(
    corpus_file: Path, tmp_path: Path
) -> None:
    ckpt_dir = tmp_path / "ckpt"
    CheckpointStore(ckpt_dir).save(CheckpointState(step=500, tensors={}, meta={"run": "old"}))
    config = tiny_config(corpus_file, ckpt_dir)
    fresh = dataclasses.replace(
        config, checkpoint=dataclasses.replace(config.checkpoint, resume=False)
    )
    # Mixed in, the old run's step 500 would outrank this run's checkpoints when pruning and
    # be what a later resume of this run loads.
    with pytest.raises(ConfigError) as excinfo:
        Trainer(fresh)
    message = str(excinfo.value)
    assert str(ckpt_dir) in message
    assert "steps 500 to 500" in message
    assert "checkpoint.resume = true" in message
    assert "another checkpoint.directory" in message
    assert CheckpointStore(ckpt_dir).steps() == [500]


def test_a_checkpoint_folder_that_cannot_be_written_is_refused_before_training(
    corpus_file: Path, tmp_path: Path
) -> None:
    # Found at the first save (step 100 by default), it cost every step before it, with a
    # PermissionError's traceback.
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the folder's parent should be")
    config = tiny_config(corpus_file, blocked / "ckpt")
    with pytest.raises(ConfigError, match=r"checkpoint\.directory: .* cannot be written"):
        Trainer(config)


def test_a_resumed_run_shows_its_step_before_its_first_step_ends(
    corpus_file: Path, tmp_path: Path
) -> None:
    # gossamer_train_step read 0 after a resume (on the dashboard too) until a step ended.
    config = tiny_config(corpus_file, tmp_path / "ckpt")
    with Trainer(config) as first:
        first.run(stop_at_step=8)
    metrics = PeerMetrics()
    with Trainer(config, metrics=metrics) as second:
        assert second.step == 8
        assert metrics.registry.get_sample_value("gossamer_train_step") == 8
