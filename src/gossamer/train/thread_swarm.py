"""Several peers as threads of one process, each with its own Trainer and strategy.

For tests and the quality benchmark: the peers share one corpus (each reads its own stream) and
average through an in-process group, so what is compared is the training algorithm, not the
network.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from gossamer.core.config import CheckpointConfig, RunConfig
from gossamer.core.errors import GossamerError
from gossamer.data import Corpus, load_corpus
from gossamer.train.loop import Trainer
from gossamer.train.run_events import TrainResult
from gossamer.train.strategy import TrainingStrategy

__all__ = ["ThreadSwarmResult", "run_thread_swarm"]


logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ThreadSwarmResult:
    """The peers' trainers (still holding their models) and what each run did."""

    trainers: list[Trainer]
    results: list[TrainResult]


def run_thread_swarm(
    config: RunConfig,
    strategies: Sequence[TrainingStrategy],
    *,
    checkpoint_root: Path,
    corpus: Corpus | None = None,
    timeout_s: float | None = 3600.0,
) -> ThreadSwarmResult:
    """Train one peer per strategy, each in its own thread, until all finish.

    Args:
        config: every peer's run config (each gets its own checkpoint folder under
            ``checkpoint_root``).
        strategies: one per peer, usually sharing an in-process averaging group.
        checkpoint_root: parent of the peers' checkpoint folders.
        corpus: the data, loaded from ``config.data`` if None.
        timeout_s: how long to wait for all the peers (None: until they finish).

    Raises:
        GossamerError: a peer failed with it (the first to fail; the others' are logged).
        RuntimeError: a peer failed otherwise (the first error is chained) or did not finish
            in time.
    """
    corpus = corpus if corpus is not None else load_corpus(config.data)
    num_peers = len(strategies)
    trainers = []
    for index, strategy in enumerate(strategies):
        peer_config = dataclasses.replace(
            config,
            checkpoint=dataclasses.replace(
                config.checkpoint, directory=str(checkpoint_root / f"peer{index}")
            ),
        )
        assert isinstance(peer_config.checkpoint, CheckpointConfig)
        trainers.append(
            Trainer(
                peer_config,
                strategy=strategy,
                corpus=corpus,
                peer_index=index,
                num_peers=num_peers,
            )
        )
    results: list[TrainResult | None] = [None] * num_peers
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            results[index] = trainers[index].run()
        except BaseException as exc:  # handed to the caller below
            errors.append(exc)

    threads = [
        threading.Thread(target=work, args=(i,), name=f"peer{i}", daemon=True)
        for i in range(num_peers)
    ]
    for thread in threads:
        thread.start()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    for thread in threads:  # (one deadline for all: joined one by one, each had timeout_s)
        thread.join(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
    for trainer in trainers:
        trainer.close()
    if errors:
        for error in errors[1:]:
            logger.error("another peer failed too: %s: %s", type(error).__name__, error)
        if isinstance(errors[0], GossamerError):  # (one line at the command line)
            raise errors[0]
        raise RuntimeError(f"{len(errors)} of {num_peers} peers failed") from errors[0]
    finished = [r for r in results if r is not None]
    if len(finished) != num_peers:
        raise RuntimeError(f"only {len(finished)} of {num_peers} peers finished in {timeout_s} s")
    return ThreadSwarmResult(trainers=trainers, results=finished)
