"""`gossamer bench diloco`: DiLoCo against synchronous data parallel on the same token budget.

N peers train the same model from the same initial weights on their own streams of the same data,
each for the same number of inner steps, once with synchronous data parallel (gradients averaged
every step) and once with DiLoCo (pseudo-gradients averaged every H steps), and once more with
DiLoCo and the 8-bit codec. The peers are threads of one process and average in process through
``comm/``'s codecs, so what is compared is the algorithm: final validation loss, and the bytes a
ring all-reduce of the encoded tensors puts on the wire.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gossamer.bench import SMALL_GPT
from gossamer.comm.codecs import CodecPolicy
from gossamer.core.config import CheckpointConfig, RunConfig
from gossamer.core.errors import GossamerError
from gossamer.data import load_corpus
from gossamer.train.averaging import InProcessGroup
from gossamer.train.diloco import DiLoCoStrategy
from gossamer.train.diloco_config import DiLoCoConfig
from gossamer.train.strategy import TrainingStrategy
from gossamer.train.sync import SyncStrategy
from gossamer.train.thread_swarm import ThreadSwarmResult, run_thread_swarm

__all__ = [
    "QUALITY_DEFAULTS",
    "DiLoCoBenchResult",
    "MethodResult",
    "bench_diloco_config",
    "run_diloco_bench",
]

QUALITY_DEFAULTS: tuple[tuple[str, str], ...] = (*SMALL_GPT, ("train.eval_batches", "16"))
"""What `gossamer bench diloco` compares the methods on unless config flags say otherwise: the
small GPT, its final validation loss taken over 16 validation batches of 16 sequences (16k
tokens) so that two methods' losses differ by more than the sample's noise: the 256 sequences
its figures were measured on, as 32 batches of its 8 before validation batches were 16
sequences whatever the batch size."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class MethodResult:
    """One training method's outcome."""

    name: str
    """``sync``, ``diloco`` or ``diloco_int8``."""
    val_loss: float
    """Mean validation loss over the peers at the end."""
    bytes_per_peer: int
    """Bytes each peer sent in averaging rounds."""
    seconds: float
    """Wall time of the whole method (threads on this machine)."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DiLoCoBenchResult:
    """Every method's outcome and the ratios the issue asks for."""

    peers: int
    inner_steps: int
    steps: int
    tokens_per_peer: int
    methods: dict[str, MethodResult]
    outer: DiLoCoConfig
    """The DiLoCo settings every DiLoCo method ran with (the outer optimizer's, in the JSON)."""

    def to_json(self) -> dict[str, Any]:
        """The fields of ``--json``."""
        sync, diloco = self.methods["sync"], self.methods["diloco"]
        fields: dict[str, Any] = {
            "peers": self.peers,
            "inner_steps": self.inner_steps,
            "steps": self.steps,
            "tokens_per_peer": self.tokens_per_peer,
            "loss_sync": sync.val_loss,
            "loss_diloco": diloco.val_loss,
            "bytes_sync": sync.bytes_per_peer,
            "bytes_diloco": diloco.bytes_per_peer,
            "bytes_ratio_sync_over_diloco": sync.bytes_per_peer / max(1, diloco.bytes_per_peer),
            "loss_gap_diloco_vs_sync_percent": (diloco.val_loss / sync.val_loss - 1) * 100,
            "seconds": {name: m.seconds for name, m in self.methods.items()},
            "outer_lr": self.outer.outer_lr,
            "outer_momentum": self.outer.outer_momentum,
            "outer_momentum_warmup": self.outer.outer_momentum_warmup,
        }
        if "diloco_overlap" in self.methods:
            overlap = self.methods["diloco_overlap"]
            fields["loss_diloco_overlap"] = overlap.val_loss
            fields["loss_gap_overlap_vs_diloco_percent"] = (
                overlap.val_loss / diloco.val_loss - 1
            ) * 100
        if "diloco_int8" in self.methods:
            int8 = self.methods["diloco_int8"]
            fields["loss_diloco_int8"] = int8.val_loss
            fields["bytes_diloco_int8"] = int8.bytes_per_peer
            fields["loss_gap_int8_vs_diloco_percent"] = (int8.val_loss / diloco.val_loss - 1) * 100
        return fields


class _Stopped(GossamerError):
    """The bench was stopped (Ctrl-C, SIGTERM): a peer thread leaves its training loop."""


class _StoppableGroup(InProcessGroup):
    """An in-process group that :meth:`stop` ends: the peers waiting for a round's others are
    released at once (they waited out the round's timeout, 120 s, once the others had stopped)
    and every later round fails."""

    def __init__(self, num_peers: int, *, codec: CodecPolicy | None = None) -> None:
        super().__init__(num_peers, codec=codec)
        self.stopped = threading.Event()

    def stop(self) -> None:
        """End every round under way, and every later one, with :class:`_Stopped`."""
        with self._lock:
            self.stopped.set()
            for state in self._rounds.values():
                state.arrived = self.num_peers  # (a forming round is ready: it fails at once)
                if state.result is None:
                    state.result = []  # (what wakes its waiters; they raise below)
            self._lock.notify_all()

    def _contribute(
        self, round_key: str, tensors: list[torch.Tensor], weight: float
    ) -> list[torch.Tensor]:
        # (checked under the group's lock, which the round is opened under too: a stop() that
        # came between a check outside it and the lock left this peer alone in a new round,
        # waiting out its timeout; the lock is re-entrant, and its wait releases it)
        with self._lock:
            if self.stopped.is_set():
                raise _Stopped("stopped")
            averaged = super()._contribute(round_key, tensors, weight)
        if self.stopped.is_set():
            raise _Stopped("stopped")
        return averaged


class _StopsWithGroup:
    """A peer's strategy that leaves the training loop (raises :class:`_Stopped`) at its next
    step once its group has stopped; otherwise the strategy it wraps."""

    def __init__(self, inner: TrainingStrategy, group: _StoppableGroup) -> None:
        self.inner = inner
        self.name = inner.name
        self._stopped = group.stopped

    def _check(self) -> None:
        if self._stopped.is_set():
            raise _Stopped("stopped")

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> int | None:
        self._check()
        return self.inner.setup(model, optimizer)

    def on_gradients(self, model: nn.Module, step: int) -> None:
        self._check()
        self.inner.on_gradients(model, step)

    def on_step_end(self, model: nn.Module, step: int) -> int | None:
        self._check()
        return self.inner.on_step_end(model, step)

    def finish(self, model: nn.Module, step: int) -> bool:
        self._check()
        return self.inner.finish(model, step)

    def state_for_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return self.inner.state_for_checkpoint()

    def load_checkpoint_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.inner.load_checkpoint_state(tensors, meta)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:  # the optional hooks, ``bytes_sent``
        return getattr(self.inner, name)


def _run_method(
    name: str,
    config: RunConfig,
    make_strategy: Callable[[InProcessGroup], TrainingStrategy],
    group: _StoppableGroup,
    peers: int,
    corpus: Any,
) -> MethodResult:
    """Train ``peers`` thread-peers with ``make_strategy``'s strategies on ``group``.

    Raises:
        KeyboardInterrupt: Ctrl-C (or a stop signal raised as one): the peers were stopped and
            their threads joined first (the process aborted, ``terminate called without an
            active exception``, where they were left training as it exited).
    """
    strategies = [_StopsWithGroup(make_strategy(group), group) for _ in range(peers)]
    started = time.monotonic()
    outcome: list[ThreadSwarmResult | BaseException] = []
    done = threading.Event()

    def train(tmp: str) -> None:
        try:  # (no deadline: the step budget bounds the run)
            outcome.append(
                run_thread_swarm(
                    config, strategies, checkpoint_root=Path(tmp), corpus=corpus, timeout_s=None
                )
            )
        except BaseException as exc:  # handed to the caller below
            outcome.append(exc)
        finally:
            done.set()

    def said_while_running(record: logging.LogRecord) -> bool:
        # (once stopped, each peer leaving said "another peer failed too": one line says it)
        return not (group.stopped.is_set() and _Stopped.__name__ in record.getMessage())

    swarm_logger = logging.getLogger(run_thread_swarm.__module__)
    swarm_logger.addFilter(said_while_running)
    with (
        contextlib.ExitStack() as cleanup,
        tempfile.TemporaryDirectory(prefix=f"gossamer-bench-{name}-") as tmp,
    ):
        cleanup.callback(swarm_logger.removeFilter, said_while_running)
        runner = threading.Thread(target=train, args=(tmp,), name=f"bench-{name}")
        runner.start()
        # (on an Event: a Thread.join that Ctrl-C interrupted may mark the thread as ended
        # while it runs, and the process then exited under the peers' feet)
        try:
            done.wait()
        except KeyboardInterrupt:
            _stop_and_wait(group, done, tmp)  # (the peers stop within a step)
            raise
        finally:
            runner.join()
    swarm = outcome[0]
    if isinstance(swarm, BaseException):
        raise swarm
    seconds = time.monotonic() - started
    losses = [r.val_loss_after for r in swarm.results]
    sent = [int(getattr(s, "bytes_sent", 0)) for s in strategies]
    return MethodResult(
        name=name,
        val_loss=sum(losses) / len(losses),
        bytes_per_peer=max(sent),
        seconds=seconds,
    )


def _stop_and_wait(group: _StoppableGroup, done: threading.Event, tmp: str) -> None:
    """Stop ``group`` and wait for ``done``; a second Ctrl-C or SIGTERM meanwhile ends the
    process at once, exit 130, with ``tmp`` removed (they were swallowed, and a stop that hung
    left no way out but SIGKILL). It ends it with :func:`os._exit`: the interpreter's exit, the
    peers' threads still running, aborted the process (``terminate called without an active
    exception``)."""

    def at_once(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    # (SIGTERM was ignored after the first: `stop_signals_as_ctrl_c`'s guard for a clean-up)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, at_once) if in_main else None
    try:
        group.stop()
        done.wait()
    except KeyboardInterrupt:
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write("stopped again: exiting at once, the peers still stopping\n")
            sys.stderr.flush()
            sys.stdout.flush()
        os._exit(130)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def bench_diloco_config(config: RunConfig, inner_steps: int) -> DiLoCoConfig:
    """The DiLoCo settings every DiLoCo method of the bench uses: H, and the rest from the run
    config's ``[swarm]`` (the paper's outer lr 0.7 and momentum 0.9 unless a flag says
    otherwise; the outer-momentum warm-up and training while rounds form and average on unless
    turned off). The ``diloco`` method is never overlapped: ``diloco_overlap`` is that."""
    return DiLoCoConfig.from_swarm(
        dataclasses.replace(config.swarm, overlap=False), run_id="bench", inner_steps=inner_steps
    )


def run_diloco_bench(
    *,
    config: RunConfig | None = None,
    peers: int = 4,
    inner_steps: int = 50,
    steps: int = 400,
    with_int8: bool = True,
    with_overlap: bool = True,
) -> DiLoCoBenchResult:
    """Train the same budget with each method and compare.

    Args:
        config: model, data, optimizer and batch settings (steps and checkpoints are set here).
        peers: how many peers train together.
        inner_steps: DiLoCo's H.
        steps: inner steps per peer, for every method (a multiple of ``inner_steps`` ends each
            DiLoCo run right after an outer step).
        with_int8: also run DiLoCo with the 8-bit blockwise codec.
        with_overlap: also run overlapped DiLoCo (``swarm.overlap``).
    """
    base = config or RunConfig()
    base = dataclasses.replace(
        base,
        train=dataclasses.replace(base.train, max_steps=steps, max_seconds=0.0, eval_every=0),
        checkpoint=CheckpointConfig(every_steps=0, resume=False),
    )
    corpus = load_corpus(base.data)
    diloco_config = bench_diloco_config(base, inner_steps)
    methods: dict[str, MethodResult] = {}
    methods["sync"] = _run_method(
        "sync",
        base,
        lambda g: SyncStrategy(g.averager(), run_id="bench"),
        _StoppableGroup(peers),
        peers,
        corpus,
    )
    methods["diloco"] = _run_method(
        "diloco",
        base,
        lambda g: DiLoCoStrategy(diloco_config, g.averager()),
        _StoppableGroup(peers),
        peers,
        corpus,
    )
    if with_overlap:
        methods["diloco_overlap"] = _run_method(
            "diloco_overlap",
            base,
            lambda g: DiLoCoStrategy(
                dataclasses.replace(
                    diloco_config,
                    overlap=True,
                    train_while_forming=False,
                    train_while_averaging=False,
                ),
                g.averager(),
            ),
            _StoppableGroup(peers),
            peers,
            corpus,
        )
    if with_int8:
        methods["diloco_int8"] = _run_method(
            "diloco_int8",
            base,
            lambda g: DiLoCoStrategy(diloco_config, g.averager()),
            _StoppableGroup(peers, codec=CodecPolicy(codec="int8")),
            peers,
            corpus,
        )
    return DiLoCoBenchResult(
        peers=peers,
        inner_steps=inner_steps,
        steps=steps,
        tokens_per_peer=steps
        * base.train.batch_size
        * base.model.context
        * base.train.grad_accum_steps,
        methods=methods,
        outer=diloco_config,
    )
