"""Per-peer streams of training batches, and fixed validation batches.

How a :class:`TokenStream` walks its source: the source is cut into non-overlapping windows of
``seq_len + 1`` tokens (inputs plus the target shifted by one) that start at ``offset + i *
seq_len``. Each epoch draws a new ``offset`` in ``[0, seq_len)`` and a new order of the windows
from a numpy ``Generator`` seeded with ``(seed, epoch)`` only; stream ``p`` of ``N`` (its
``peer_index`` and ``num_peers``) then takes windows ``p, p + N, p + 2N, ...`` of it. Within an
epoch the ``N`` streams of one seed are disjoint and together cover the epoch's windows; across
epochs the windows shift and reshuffle. A stream depends on nothing but ``(seed, peer_index,
num_peers)``, the source's length and its position, never on global random state, so it can be
rebuilt anywhere from :meth:`state_dict`.

Who shards: only peers that share a seed and know each other's index: the in-process swarm
(:mod:`gossamer.train.thread_swarm`, which ``gossamer bench diloco`` runs: peer ``p`` of ``N``,
one seed), or a caller of ``Trainer(peer_index=p, num_peers=N)``. A process swarm
(``gossamer train`` with ``--swarm.*``, :func:`gossamer.train.swarm.run_swarm_peer`) does not:
peers come and go, so each peer reads all of its own ``data.path`` as stream 0 of 1, in its own
order, seeded by its peer id. Its peers' draws are independent (two peers read the same window
now and then; a corpus is not split among them), and two peers with one key file read the same
batches (refused: :func:`gossamer.train.swarm.run_swarm_peer` holds the key file).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from gossamer.core.errors import DataError
from gossamer.data.corpus import TokenSource

__all__ = ["VALIDATION_SEQUENCES_PER_BATCH", "TokenStream", "validation_batches"]

Batch = tuple[torch.Tensor, torch.Tensor]

VALIDATION_SEQUENCES_PER_BATCH = 16
"""Sequences per validation batch of ``train.eval_batches``, whatever ``train.batch_size`` is
(16, its default: runs at the default batch size evaluate on the sequences they always did)."""


class TokenStream:
    """An endless, reproducible stream of ``(inputs, targets)`` batches for one peer.

    Args:
        source: The tokens to draw windows from (usually a corpus's training split).
        seq_len: Tokens per sequence (the model's context).
        batch_size: Sequences per batch.
        seed: Seeds the per-epoch window order; streams that shard one source share it.
        peer_index: This stream's shard, in ``0..num_peers - 1``.
        num_peers: How many streams split each epoch between them (1 for a swarm process's
            peer: it reads the whole source, seeded by its peer id).
        vocab_size: If given, a batch holding a token id ``>= vocab_size`` raises
            :class:`DataError` instead of failing later inside the model's embedding.

    Raises:
        ValueError: An argument is out of range.
        DataError: The source is too short for one sequence, or for one per peer.
    """

    def __init__(
        self,
        source: TokenSource,
        *,
        seq_len: int,
        batch_size: int,
        seed: int,
        peer_index: int = 0,
        num_peers: int = 1,
        vocab_size: int | None = None,
    ) -> None:
        if seq_len < 1 or batch_size < 1 or seed < 0:
            raise ValueError(
                f"need seq_len >= 1, batch_size >= 1 and seed >= 0; "
                f"got seq_len={seq_len}, batch_size={batch_size}, seed={seed}"
            )
        if num_peers < 1 or not 0 <= peer_index < num_peers:
            raise ValueError(
                f"peer_index must be in 0..num_peers - 1; got {peer_index} of {num_peers}"
            )
        _check_long_enough(source, seq_len)
        fewest_windows = _num_windows(len(source), seq_len, _max_offset(len(source), seq_len))
        if fewest_windows < num_peers:
            raise DataError(
                f"{source.description} holds {len(source)} tokens, only {fewest_windows} "
                f"sequences of {seq_len}, fewer than the {num_peers} peers sharing it; "
                "add data or use a shorter model.context"
            )
        self._source = source
        self._seq_len = seq_len
        self._batch_size = batch_size
        self._seed = seed
        self._peer_index = peer_index
        self._num_peers = num_peers
        self._vocab_size = vocab_size
        self._epoch = 0
        self._position = 0
        self._shard: npt.NDArray[np.int64] | None = None
        self._window_offsets = np.arange(seq_len + 1, dtype=np.int64)

    @property
    def epoch(self) -> int:
        """How many times this peer's stream has wrapped around its source."""
        return self._epoch

    def next_batch(self) -> Batch:
        """The next ``(inputs, targets)``: int64 tensors ``[batch_size, seq_len]``.

        ``targets[:, t]`` is the token after ``inputs[:, t]``.
        """
        starts = np.empty(self._batch_size, dtype=np.int64)
        filled = 0
        while filled < self._batch_size:
            shard = self._current_shard()
            if self._position >= len(shard):
                self._epoch += 1
                self._position = 0
                self._shard = None
                continue
            taken = shard[self._position : self._position + self._batch_size - filled]
            starts[filled : filled + len(taken)] = taken
            filled += len(taken)
            self._position += len(taken)
        return _gather(self._source, starts, self._window_offsets, self._vocab_size)

    def state_dict(self) -> dict[str, int]:
        """The stream's position, plus what it was built with (checked on load). JSON-safe."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self._seed,
            "peer_index": self._peer_index,
            "num_peers": self._num_peers,
            "seq_len": self._seq_len,
            "num_tokens": len(self._source),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position: the next batches are those the saved stream would give.

        ``batch_size`` may differ from the saved stream's (positions count sequences).

        Raises:
            ValueError: The state is malformed or was saved by a stream over other data, with
                another seed, sequence length or peer layout.
        """
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        if missing:
            raise ValueError(f"stream state lacks {missing}; it was not made by TokenStream")
        for key in ("seed", "peer_index", "num_peers", "seq_len", "num_tokens"):
            if int(state[key]) != expected[key]:
                raise ValueError(
                    f"the data position was saved with {key}={state[key]}, and this run has "
                    f"{key}={expected[key]}"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or position < 0:
            raise ValueError(f"stream state has a negative position: epoch {epoch}, {position}")
        self._epoch, self._position, self._shard = epoch, position, None

    def _current_shard(self) -> npt.NDArray[np.int64]:
        if self._shard is None:
            num_tokens = len(self._source)
            generator = np.random.default_rng([self._seed, self._epoch])
            offset = int(generator.integers(0, _max_offset(num_tokens, self._seq_len) + 1))
            order = generator.permutation(_num_windows(num_tokens, self._seq_len, offset))
            shard = order[self._peer_index :: self._num_peers]
            self._shard = offset + shard.astype(np.int64) * self._seq_len
        return self._shard


def validation_batches(
    source: TokenSource,
    *,
    seq_len: int,
    batch_size: int,
    num_batches: int,
    vocab_size: int | None = None,
) -> list[Batch]:
    """Fixed evaluation batches whose sequences start at evenly spaced points of ``source``.

    ``num_batches`` batches' worth of :data:`VALIDATION_SEQUENCES_PER_BATCH` sequences each are
    taken, whatever the training batch size: cut by it (until 2026-12-06), the validation set,
    and so the loss, changed with ``train.batch_size``, and runs with other batch sizes could
    not be compared. They are cut into batches of ``batch_size`` sequences at most (a divisor
    of :data:`VALIDATION_SEQUENCES_PER_BATCH`, so all batches are of one size and the mean of
    their losses is the mean over every sequence), so evaluation needs no more memory than a
    training step. The same arguments give the same batches on every call and every machine,
    so validation losses are comparable across steps, runs, peers and batch sizes. Sequences
    overlap when the source holds fewer than the sequences taken.

    Args:
        source: the validation tokens.
        seq_len: tokens per sequence.
        batch_size: the most sequences a batch may hold (the training batch size).
        num_batches: how many batches of :data:`VALIDATION_SEQUENCES_PER_BATCH` sequences
            (``train.eval_batches``).
        vocab_size: checks every id fits the vocabulary, where given.

    Raises:
        ValueError: An argument is out of range.
        DataError: ``source`` is shorter than one sequence, or (with ``vocab_size``) holds a
            token id outside the vocabulary.
    """
    if seq_len < 1 or batch_size < 1 or num_batches < 1:
        raise ValueError(
            f"need seq_len, batch_size and num_batches >= 1; "
            f"got {seq_len}, {batch_size}, {num_batches}"
        )
    _check_long_enough(source, seq_len)
    last_start = len(source) - seq_len - 1
    total = VALIDATION_SEQUENCES_PER_BATCH * num_batches
    starts = np.linspace(0, last_start, total).round().astype(np.int64)
    per_batch = max(
        d
        for d in range(1, VALIDATION_SEQUENCES_PER_BATCH + 1)
        if VALIDATION_SEQUENCES_PER_BATCH % d == 0 and d <= batch_size
    )
    window_offsets = np.arange(seq_len + 1, dtype=np.int64)
    return [
        _gather(source, batch_starts, window_offsets, vocab_size)
        for batch_starts in starts.reshape(total // per_batch, per_batch)
    ]


def _check_long_enough(source: TokenSource, seq_len: int) -> None:
    if len(source) < seq_len + 1:
        # (the training split grows as the validation split shrinks: raising the fraction for
        # a training split too short made it shorter still)
        fraction = "raise" if source.description.startswith("validation") else "lower"
        raise DataError(
            f"{source.description} holds {len(source)} tokens, fewer than one sequence needs "
            f"({seq_len} + 1 for the shifted target); add data, {fraction} "
            "data.validation_fraction, use a shorter model.context, or raise "
            "data.max_corpus_bytes if it is set"
        )


def _max_offset(num_tokens: int, seq_len: int) -> int:
    """Largest first-window offset that still leaves one whole window."""
    return min(seq_len - 1, num_tokens - seq_len - 1)


def _num_windows(num_tokens: int, seq_len: int, offset: int) -> int:
    """Windows of ``seq_len + 1`` tokens starting at ``offset + i * seq_len``."""
    return (num_tokens - 1 - offset) // seq_len


def _gather(
    source: TokenSource,
    starts: npt.NDArray[np.int64],
    window_offsets: npt.NDArray[np.int64],
    vocab_size: int | None,
) -> Batch:
    source.check_intact()  # (a mapped page its file lost is a bus error when read)
    windows: npt.NDArray[Any] = source.tokens[starts[:, None] + window_offsets]
    if vocab_size is not None and int(windows.max()) >= vocab_size:
        raise DataError(
            f"{source.description} holds token id {int(windows.max())}, outside the model's "
            f"vocabulary of {vocab_size}; set model.vocab_size above the largest id, or check "
            "data.token_dtype and that the file was made with this tokenizer"
        )
    tokens = torch.from_numpy(windows.astype(np.int64))
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
