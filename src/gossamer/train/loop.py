"""The training loop of one peer.

:class:`Trainer` runs AdamW with warm-up and cosine decay, gradient clipping, gradient accumulation,
periodic evaluation and verified checkpoints, and resumes exactly from the newest valid checkpoint.
How peers cooperate is a :class:`~gossamer.train.strategy.TrainingStrategy` plugged into it, so
synchronous data parallel and DiLoCo reuse this loop unchanged. :func:`train` is the few-lines entry
point; the model may be any ``nn.Module`` factory whose forward maps tokens ``[B, T]`` to logits
``[B, T, vocab]``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import nn

from gossamer.core.clock import Clock, SystemClock
from gossamer.core.config import RunConfig
from gossamer.core.config_loader import config_to_dict
from gossamer.core.errors import ConfigError, DataError, TrainingDivergedError
from gossamer.core.stop import StopRequest
from gossamer.data import Corpus, TokenStream, load_corpus, validation_batches
from gossamer.models import GPT
from gossamer.obs.metrics import PeerMetrics
from gossamer.obs.trace import SpanRecorder
from gossamer.store import CheckpointDiskFullError, CheckpointStore
from gossamer.store.checkpoint import format_num_bytes
from gossamer.store.lease import directory_lease
from gossamer.train.budget_schedule import BudgetFittedSchedule
from gossamer.train.checkpointing import (
    RunState,
    capture_run_state,
    estimate_checkpoint_num_bytes,
    restore_run_state,
)
from gossamer.train.inference import mean_validation_loss
from gossamer.train.optim import build_optimizer
from gossamer.train.run_events import ProgressEvent, TrainingListener, TrainResult
from gossamer.train.strategy import LocalStrategy, TrainingStrategy, optional_hook

__all__ = ["ModelFactory", "Trainer", "train"]

logger = logging.getLogger(__name__)

ModelFactory = Callable[[], nn.Module]
"""Builds a fresh model; called once, after the run's seed is set."""

Batch = tuple[torch.Tensor, torch.Tensor]

_RESUME_WATCHED_KEYS: dict[str, tuple[str, ...]] = {
    "train": ("max_steps", "max_seconds", "batch_size", "grad_accum_steps"),
    "optim": (),  # (every key)
}
"""Settings a resume warns of when they differ from the checkpoint's config: they change the
learning rate's schedule or what one step trains on."""


def _data_sha256(manifest: dict[str, Any]) -> str | None:
    """The training tokens' sha256 from a corpus manifest, if it has one."""
    digest = manifest.get("train_sha256")
    return digest if isinstance(digest, str) else None


class Trainer(BudgetFittedSchedule):
    """Trains one peer's model; the strategy decides how it cooperates with others.

    Args:
        config: the run's config.
        model_factory: builds the model; the built-in GPT from ``config.model`` if None.
        strategy: how to cooperate with other peers; alone if None.
        listener: receives progress events.
        corpus: pre-loaded data; loaded from ``config.data`` if None.
        peer_index: this peer's index among ``num_peers`` (chooses its data stream).
        num_peers: how many peers draw streams from the same data.
        clock: time source for the time budget and throughput.
        spans: records compute, communication, evaluation, checkpoint and sync spans. The
            strategy hooks run inside a "communication" span; what the strategy and its averager
            record inside it (waiting for a round's group, the all-reduce, state downloads) is
            nested and counted under its own phase, the rest as communication.
        metrics: Prometheus metrics to keep up to date (they also receive the spans).
        stream_seed: seeds this peer's data stream; ``train.seed`` if None (the model's
            initialisation always uses ``train.seed``, so peers start from the same weights).

    Raises:
        DataError: the data is missing, empty or shorter than one sequence.
        IncompatibleCheckpointError: the checkpoint to resume from was made for another model,
            or a newer one is of a format this Gossamer cannot read.
        ConfigError: ``checkpoint.resume`` is false but ``checkpoint.directory`` holds
            checkpoints already (this run's would be mixed with them); or it cannot be written,
            or its disk has no room for one checkpoint.
    """

    def __init__(
        self,
        config: RunConfig,
        *,
        model_factory: ModelFactory | None = None,
        strategy: TrainingStrategy | None = None,
        listener: TrainingListener | None = None,
        corpus: Corpus | None = None,
        peer_index: int = 0,
        num_peers: int = 1,
        clock: Clock | None = None,
        spans: SpanRecorder | None = None,
        metrics: PeerMetrics | None = None,
        stream_seed: int | None = None,
        stop: StopRequest | None = None,
    ) -> None:
        self.config = config
        self.stop = stop or StopRequest()
        """Set (from a signal handler, another thread) to pause the run after the step under
        way: it checkpoints the step reached and returns (see :attr:`TrainResult.interrupted`).
        A round the strategy averages in the background lands first (see
        :meth:`_land_before_pause`)."""
        self.store = CheckpointStore(
            config.checkpoint.directory, keep_last=config.checkpoint.keep_last
        )
        try:
            self.store.check_writable()
        except OSError as exc:  # found at the first save, it cost every step before it
            raise ConfigError(
                f"checkpoint.directory: {config.checkpoint.directory} cannot be written "
                f"({exc.strerror or exc}); give a folder this user can write"
            ) from exc
        # One process at a time in the directory (two peers given one shared its checkpoints
        # and its peer key): held until close().
        self._lease = contextlib.ExitStack()
        self._lease.enter_context(directory_lease(Path(config.checkpoint.directory)))
        try:
            if not config.checkpoint.resume:
                self._refuse_another_runs_checkpoints()  # before the slow set-up below
            self.listener = listener or TrainingListener()
            self.clock = clock or SystemClock()
            self.spans = spans or SpanRecorder()
            self.metrics = metrics
            if metrics is not None:
                self.spans.add_sink(metrics.record_span)
            if config.train.num_threads:
                torch.set_num_threads(config.train.num_threads)
            self.corpus = corpus if corpus is not None else load_corpus(config.data)
            seq_len = config.model.context
            torch.manual_seed(config.train.seed)
            model = model_factory() if model_factory is not None else GPT(config.model)
            self.run_state = RunState(
                config=config,
                model=model,
                optimizer=build_optimizer(model, config.optim),
                stream=TokenStream(
                    self.corpus.train,
                    seq_len=seq_len,
                    batch_size=config.train.batch_size,
                    seed=config.train.seed if stream_seed is None else stream_seed,
                    peer_index=peer_index,
                    num_peers=num_peers,
                ),
                strategy=strategy or LocalStrategy(),
                custom_model=model_factory is not None,
                data_sha256=_data_sha256(self.corpus.manifest),
            )
            self.val_batches: list[Batch] = validation_batches(
                self.corpus.validation,
                seq_len=seq_len,
                batch_size=config.train.batch_size,
                num_batches=config.train.eval_batches,
            )
            self._check_batches = not self._check_corpus_vocabulary()
            # (step, seconds into the session) a schedule refit's step rate is measured from
            self._rate_since: tuple[int, float] | None = None
            # When this session's run began, and the budget earlier sessions spent (a refit
            # fits the time left of the whole run's budget: a resumed session, fitted to a
            # budget of its own, stretched the schedule its checkpoint holds)
            self._session_started: float | None = None
            self._spent_before = 0.0
            for inputs, targets in self.val_batches if self._check_batches else ():
                self._check_vocabulary(inputs, targets, self.corpus.validation.description)
            self.resumed_from: Path | None = None
            self._resumed_step: int | None = None
            if config.checkpoint.resume:
                self._resume()
            self._check_room_for_checkpoints()  # (resumed: of the optimizer state it holds)
            self._setup_strategy(model)
            if self.metrics is not None:  # (a resumed peer read step 0 until its first step ended)
                self.metrics.step.set(self.run_state.step)
        except BaseException:
            self._lease.close()
            raise

    def _check_room_for_checkpoints(self) -> None:
        """Refuse a checkpoint directory whose disk has no room for one checkpoint, and warn
        where it has room for fewer than ``checkpoint.keep_last + 1``, before the run trains:
        found at a save, a full disk cost every step since the last checkpoint.

        Not checked for a run resumed at its last step (it writes no checkpoint).

        Raises:
            ConfigError: not even one checkpoint fits beside the newest (a new run: beside its
                first), its size estimated from the model's and the optimizer's tensors.
        """
        if self.run_state.step >= self.config.train.max_steps:
            return  # (a finished run resumed: it trains no step and writes no checkpoint)
        num_bytes = estimate_checkpoint_num_bytes(self.run_state)
        try:
            num_fit = self.store.room_for_checkpoints(num_bytes)
        except CheckpointDiskFullError as exc:
            raise ConfigError(f"checkpoint.directory: {exc}") from exc
        needed = self.config.checkpoint.keep_last + 1
        if num_fit is not None and num_fit < needed:
            logger.warning(
                "peer %s step %d: checkpoint.directory %s has room for %d checkpoint(s) of about "
                "%s (%s free), and a run needs room for checkpoint.keep_last + 1 = "
                "%d (it writes the next checkpoint before it removes the oldest). When the disk "
                "fills, a save removes all checkpoints but the newest to make room; free some "
                "space, lower checkpoint.keep_last or use a larger disk to keep them",
                self.spans.peer,
                self.run_state.step,
                self.store.directory,
                num_fit,
                format_num_bytes(num_bytes),
                format_num_bytes(self.store.free_bytes() or 0),
                needed,
            )

    def _setup_strategy(self, model: nn.Module) -> None:
        """Run the strategy's setup; where it brought the state from other peers, continue from
        the step that state is of, so state and step agree.

        A swarm strategy's setup downloads the swarm's state as a newcomer. One that can tell a
        state older than its own (``resume_at``) is told the step resumed at first, and keeps
        its own where the swarm's is older; a strategy that took an older state all the same
        has its step taken with it (trained under the newer step, it went on with another
        schedule and data position than its weights were trained to, in rounds it was not in).
        """
        run = self.run_state
        if (resume_at := optional_hook(run.strategy, "resume_at")) is not None:
            resume_at(run.step)
        # A swarm strategy's setup downloads the swarm's state as a newcomer: time to sync.
        with self.spans.span("sync", step=run.step, hook="setup"):
            synced_step = run.strategy.setup(model, run.optimizer)
        if synced_step is None or synced_step == run.step:
            return
        if synced_step < run.step:
            logger.warning(
                "peer %s step %d: took the swarm's state of step %d, older than this peer's "
                "own: continuing from step %d (the %d steps of its own since are dropped; its "
                "checkpoints of later steps stay in %s and a resume prefers them: remove them "
                "to resume from the swarm's)",
                self.spans.peer,
                run.step,
                synced_step,
                synced_step,
                run.step - synced_step,
                self.store.directory,
            )
        run.step = synced_step  # state came from other peers: continue from there

    @property
    def model(self) -> nn.Module:
        """The model being trained."""
        return self.run_state.model

    @property
    def step(self) -> int:
        """Optimizer steps taken so far in the run."""
        return self.run_state.step

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        abandon = optional_hook(self.run_state.strategy, "abandon")
        if exc_type is KeyboardInterrupt and abandon is not None:
            abandon()  # a second stop (or Ctrl-C outside a pause): close waits for nothing
        self.close()

    def close(self) -> None:
        """Release the strategy's resources and the checkpoint directory."""
        try:
            self.run_state.strategy.close()
        finally:
            self._lease.close()

    def _refuse_another_runs_checkpoints(self) -> None:
        """Refuse to start a fresh run in a directory that holds checkpoints already.

        Mixed with them, this run's checkpoints would be pruned as the older ones (theirs may have
        higher steps), and a later resume would load their state instead of this run's.
        """
        steps = self.store.steps()
        if steps:
            raise ConfigError(
                f"checkpoint.directory {self.store.directory} already holds checkpoints (steps "
                f"{steps[0]} to {steps[-1]}) and checkpoint.resume is false, so this run would "
                "mix its checkpoints with them. Resume from them with checkpoint.resume = true, "
                "give this run another checkpoint.directory, or remove them"
            )

    def _resume(self) -> None:
        state = self.store.load_latest()  # logs every corrupted checkpoint it skips
        if state is None:
            logger.info(
                "no checkpoint in %s to resume from: starting at step 0",
                self.store.directory.resolve(),
            )
            return
        # (where it was read: a checkpoint a dead writer left set aside is not at path_for)
        self.resumed_from = self.store.loaded_from or self.store.path_for(state.step)
        self._resumed_step = state.step
        restore_run_state(state, self.run_state, where=str(self.resumed_from))
        logger.info("resumed from %s at step %d", self.resumed_from, state.step)
        saved_config = state.meta.get("config")
        if isinstance(saved_config, dict):
            self._warn_of_config_changes(saved_config, state.step)

    def _warn_of_config_changes(self, saved: dict[str, Any], step: int) -> None:
        """Say, in one warning, which settings of the schedule and the batch this resume
        changes from the checkpoint's config, and how the learning rate moves with them.

        They are applied (a resume follows the config it is given), but before this they were
        applied silently: a finished 12-step run extended to 24 steps went from a learning rate
        of 0.0012 at its last step back up to 0.0061, with nothing said.
        """
        now = config_to_dict(self.config)
        changed = []
        for section, keys in _RESUME_WATCHED_KEYS.items():
            then_section = saved.get(section)
            if not isinstance(then_section, dict):
                continue
            for key in keys or now[section]:
                then, current = then_section.get(key), now[section].get(key)
                if then is not None and then != current:
                    changed.append(f"{section}.{key} {then} -> {current}")
        if not changed:
            return
        last = self.run_state.optimizer.param_groups[0]["lr"]
        logger.warning(
            "peer %s step %d: resumed with settings other than the checkpoint's: %s; the "
            "learning rate goes from %.3g (its last step) to %.3g (the next step)",
            self.spans.peer,
            step,
            ", ".join(changed),
            float(last),
            self._learning_rate_at(step),
        )

    def evaluate(self) -> float:
        """Mean loss over the fixed validation batches."""
        with self.spans.span("evaluation", step=self.run_state.step):
            loss = mean_validation_loss(self.run_state.model, self.val_batches)
        if self.metrics is not None:
            self.metrics.validation_loss.set(loss)
        return loss

    def _check_corpus_vocabulary(self) -> bool:
        """Check every id of the corpus fits the model, by the largest ids its manifest records;
        whether it could (a corpus made elsewhere may not record them: its batches are then
        checked as they come)."""
        checked = 0
        for key, source in (
            ("max_train_token_id", self.corpus.train),
            ("max_validation_token_id", self.corpus.validation),
        ):
            largest = self.corpus.manifest.get(key)
            if isinstance(largest, int):
                self._check_largest_id(largest, source.description)
                checked += 1
        return checked == 2

    def _check_vocabulary(self, inputs: torch.Tensor, targets: torch.Tensor, where: str) -> None:
        self._check_largest_id(max(int(inputs.max()), int(targets.max())), where)

    def _check_largest_id(self, largest: int, where: str) -> None:
        vocab_size = self.config.model.vocab_size
        if largest >= vocab_size:
            raise DataError(
                f"token id {largest} in {where} does not fit model.vocab_size = {vocab_size}; "
                "raise model.vocab_size or check data.token_dtype"
            )

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))

    def _train_step(self, step: int) -> float:
        run = self.run_state
        cfg = self.config
        lr = self._learning_rate_at(step)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        accum = cfg.train.grad_accum_steps
        loss_total = 0.0
        spans = self.spans
        with spans.span("compute", step=step):
            for _ in range(accum):
                inputs, targets = run.stream.next_batch()
                if self._check_batches:
                    self._check_vocabulary(inputs, targets, self.corpus.train.description)
                logits = run.model(inputs)
                loss = self._loss(logits, targets)
                value = loss.item()
                if not math.isfinite(value):
                    # Before any of it is averaged or stepped on: the peer stops, the swarm's
                    # rounds drop it, and its last checkpoint holds finite weights.
                    raise TrainingDivergedError(
                        f"training diverged at step {step}: the loss is {value}; resume from "
                        "the last checkpoint with a lower optim.lr or a longer "
                        "optim.warmup_steps"
                    )
                (loss / accum).backward()  # type: ignore[no-untyped-call]
                loss_total += value
        with spans.span("communication", step=step, hook="on_gradients"):
            run.strategy.on_gradients(run.model, step)
        with spans.span("compute", step=step, part="optimizer"):
            if cfg.optim.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.optim.grad_clip)
            else:
                grads = [p.grad for p in run.model.parameters() if p.grad is not None]
                norm = torch.nn.utils.get_total_norm(grads)
            if not torch.isfinite(norm):
                raise TrainingDivergedError(
                    f"training diverged at step {step}: the gradient's norm is {float(norm)}; "
                    "resume from the last checkpoint with a lower optim.lr or a longer "
                    "optim.warmup_steps"
                )
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        tokens = accum * cfg.train.batch_size * cfg.model.context
        if self.metrics is not None:
            # Counted before the hook: a strategy that throws this step's work away there (a
            # round it missed) takes it back from what is kept; counted after, the take-back
            # found nothing of it to take, and a lost first step stayed kept.
            self.metrics.goodput.add_step(tokens)
        with spans.span("communication", step=step, hook="on_step_end"):
            continue_from = run.strategy.on_step_end(run.model, step)
        run.step = step + 1 if continue_from is None else max(step + 1, continue_from)
        run.tokens_trained += tokens
        loss_mean = loss_total / accum
        if self.metrics is not None:
            self.metrics.step.set(run.step)
            self.metrics.loss.set(loss_mean)
            self.metrics.tokens.inc(tokens)
        return loss_mean

    def _land_before_pause(self, step: int) -> int | None:
        """Before a pause's checkpoint, let the strategy land what it has under way (a DiLoCo
        round averaging in the background), so the checkpoint holds it: written without it, a
        paused run resumed without that round's steps, as a killed one does. The strategy's hook
        (``land_before_pause``) is optional; a strategy without one has nothing under way.

        Returns:
            None where nothing was under way; else the step the run stands at after it.
        """
        land = optional_hook(self.run_state.strategy, "land_before_pause")
        if land is None:
            return None

        def announce(what: str) -> None:
            logger.warning(
                "peer %s step %d: stop asked for: waiting for %s (up to the round's deadline) "
                "so that the checkpoint keeps it; stop again to stop at once without it",
                self.spans.peer,
                step,
                what,
            )

        with self.spans.span("communication", step=step, hook="land_before_pause"):
            landed_at: int | None = land(self.run_state.model, step, announce)
        return landed_at

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the current state and return its folder.

        Raises:
            TrainingDivergedError: a weight is NaN or infinite (such a checkpoint would take the
                place of the good ones kept, and a resume would restore the divergence).
        """
        for name, param in self.run_state.model.named_parameters():
            # Trained ones only: a frozen -inf mask is the model's own, not a divergence.
            if param.requires_grad and not bool(torch.isfinite(param).all()):
                raise TrainingDivergedError(
                    f"training diverged by step {self.run_state.step}: weight {name} holds NaN "
                    "or infinite values, so no checkpoint is written; resume from the last one "
                    "with a lower optim.lr or a longer optim.warmup_steps"
                )
        if self._session_started is not None and self.config.train.max_seconds:
            # (the budget this run has spent, its resumed sessions too; also before the schedule
            # is fitted: a run paused in its first steps got a whole new budget on resume)
            self.run_state.schedule_spent_s = self._spent_before + (
                self.clock.monotonic() - self._session_started
            )
        with self.spans.span("checkpoint", step=self.run_state.step):
            path = self.store.save(capture_run_state(self.run_state))
        self.listener.on_checkpoint(step=self.run_state.step, path=path)
        return path

    def run(self, *, stop_at_step: int | None = None) -> TrainResult:
        """Train until ``train.max_steps`` (or ``stop_at_step``, or the time budget).

        Args:
            stop_at_step: stop after this step even if the schedule runs longer (the learning
                rate schedule still spans ``train.max_steps``), e.g. to resume later: the
                strategy is not finished then (no last DiLoCo round), so a run stopped and
                resumed takes the same steps as one that was not (where no round is in flight
                at the stop: one in flight is lost with the process, as at a crash, and a swarm
                peer takes the others' state after it).

        Returns:
            What the run did; a checkpoint of the final state has been written.
        """
        cfg = self.config
        run = self.run_state
        start_step = run.step
        limit = stop_at_step if stop_at_step is not None else math.inf
        stop = min(self.schedule_steps, limit)
        self._rate_since = None
        num_parameters = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
        self.listener.on_start(
            start_step=start_step, max_steps=cfg.train.max_steps, num_parameters=num_parameters
        )
        started = self.clock.monotonic()
        self._session_started, self._spent_before = started, run.schedule_spent_s
        val_before = self.evaluate()
        self.listener.on_eval(step=start_step, val_loss=val_before)
        val_latest = val_before
        train_seconds = 0.0
        tokens_start = run.tokens_trained
        last_loss = math.nan
        stopped_by_time = False
        last_checkpoint: Path | None = None
        last_checkpoint_step = start_step
        interrupted = False
        run.model.train()
        step = start_step
        self.stop.accepted = True  # (from here a stop pauses; before, it stops at once)
        while step < stop:
            step_started = self.clock.monotonic()
            last_loss = self._train_step(step)
            step = run.step
            train_seconds += self.clock.monotonic() - step_started
            elapsed = self.clock.monotonic() - started
            self._fit_schedule_to_budget(step, start_step, elapsed)
            stop = min(limit, self.schedule_steps)  # (a refit may lengthen the schedule)
            tokens = run.tokens_trained - tokens_start
            per_step = elapsed / (step - start_step)
            eta = per_step * (stop - step)
            spent = self._spent_before + elapsed  # (of the time budget, earlier sessions too)
            if cfg.train.max_seconds:
                eta = min(eta, max(0.0, cfg.train.max_seconds - spent))
            if self.metrics is not None and train_seconds:
                self.metrics.tokens_per_second.set(tokens / train_seconds)
            self.listener.on_step(
                ProgressEvent(
                    step=step,
                    max_steps=int(stop),
                    loss=last_loss,
                    lr=run.optimizer.param_groups[0]["lr"],
                    tokens_per_s=tokens / train_seconds if train_seconds else 0.0,
                    elapsed_s=elapsed,
                    eta_s=eta,
                )
            )
            if step % cfg.train.log_every == 0:
                logger.info(
                    "peer %s step %d/%d loss %.4f", self.spans.peer, step, int(stop), last_loss
                )
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < stop:
                val_latest = self.evaluate()
                self.listener.on_eval(step=step, val_loss=val_latest)
            every = cfg.checkpoint.every_steps
            if every and step // every > last_checkpoint_step // every:  # steps may jump (sync)
                last_checkpoint, last_checkpoint_step = self.save_checkpoint(), step
            if cfg.train.max_seconds and spent + per_step > cfg.train.max_seconds:
                stopped_by_time = step < stop
                break
            if self.stop.is_set() and step < stop:
                interrupted = True  # a pause: the strategy is not finished, no last evaluation
                break
        landed = False
        if interrupted:
            landed_at = self._land_before_pause(step)
            if landed_at is not None:
                landed = True
                step = run.step = max(run.step, landed_at)
        if step >= self.schedule_steps < cfg.train.max_steps and not interrupted:
            stopped_by_time = True  # the schedule fitted to the budget ended it before max_steps
        replaced = False
        if not interrupted and (step >= self.schedule_steps or stopped_by_time):  # not a pause
            with self.spans.span("sync", step=step, hook="finish"):
                # Also when no step was left to take: a peer that joined at the very end still
                # ends on the swarm's weights.
                replaced = run.strategy.finish(run.model, step)
        if (step > start_step or replaced) and not interrupted:
            val_latest = self.evaluate()
            self.listener.on_eval(step=step, val_loss=val_latest)
        if step == start_step and not replaced and self._resumed_step == step:
            # Nothing trained (resumed at or past the schedule's end): the checkpoint stays as
            # it is, not written again under this session's config.
            last_checkpoint = self.resumed_from
        elif replaced or landed or last_checkpoint is None or last_checkpoint_step != run.step:
            last_checkpoint = self.save_checkpoint()
        # (still accepted: a stop asked for in the teardown after, a swarm peer's node going
        # down, is nothing to act on, and its run's summary is still written)
        return TrainResult(
            start_step=start_step,
            steps_done=run.step,
            tokens_trained=run.tokens_trained,
            tokens_this_session=run.tokens_trained - tokens_start,
            train_seconds=train_seconds,
            wall_seconds=self.clock.monotonic() - started,
            val_loss_before=val_before,
            val_loss_after=math.nan if interrupted else val_latest,
            final_train_loss=last_loss,
            checkpoint_path=last_checkpoint,
            resumed_from=self.resumed_from,
            stopped_by_time_budget=stopped_by_time,
            num_parameters=num_parameters,
            interrupted=interrupted,
        )


def train(
    config: RunConfig | None = None,
    *,
    model_factory: ModelFactory | None = None,
    listener: TrainingListener | None = None,
    stop_at_step: int | None = None,
) -> TrainResult:
    """Train a model on one peer, resuming from the newest valid checkpoint if there is one.

    Args:
        config: the run's config; all defaults if None.
        model_factory: builds any ``nn.Module`` mapping tokens ``[B, T]`` to logits
            ``[B, T, vocab]``; the built-in GPT from ``config.model`` if None.
            ``config.model.context`` is still the training sequence length.
        listener: receives progress events.
        stop_at_step: stop after this step (the schedule still spans ``train.max_steps``).

    Returns:
        What the run did, including the final checkpoint's folder.
    """
    with Trainer(config or RunConfig(), model_factory=model_factory, listener=listener) as trainer:
        return trainer.run(stop_at_step=stop_at_step)
