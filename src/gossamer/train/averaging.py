"""How a training strategy averages tensors with the other peers of its round.

Strategies see only :class:`TensorAverager`: hand over tensors and a round key, get back the group's
weighted average and what it cost. Across machines the averager is the fault-tolerant all-reduce of
``comm/`` over the peer-to-peer transport; :class:`InProcessAverager` averages among peers that are
threads of one process, for tests and for the quality benchmark, where the algorithm is what is
measured and the network is not.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol, cast

import torch

from gossamer.comm.codecs import CodecPolicy, ErrorFeedback
from gossamer.core.errors import DeadlineExceededError
from gossamer.obs.trace import record_nested

__all__ = [
    "AverageOutcome",
    "InProcessAverager",
    "InProcessGroup",
    "PendingRound",
    "TensorAverager",
    "all_finite",
    "begin_round",
    "record_round_phases",
    "withhold_if_not_finite",
]

_log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class AverageOutcome:
    """One averaging round, as a strategy sees it."""

    tensors: list[torch.Tensor]
    """The group's weighted average, one tensor per input, same shapes."""
    group_size: int
    """Peers whose contributions are in the average."""
    bytes_sent: int
    """Bytes this peer put on the wire for the round (0 in process)."""
    bytes_received: int
    """Bytes this peer received for the round."""
    seconds: float = 0.0
    """Wall time of the round."""
    failed_peers: list[str] = field(default_factory=list)
    """Peers dropped from the round."""
    missing_peers: list[str] = field(default_factory=list)
    """Peers of the run, alive when the round began, that did not come to it (died, late)."""
    excluded: bool = False
    """This peer came after the round closed: the others averaged without it, and
    ``tensors`` are its own. Its state is now behind theirs."""
    wait_seconds: float = 0.0
    """Of ``seconds``, the time spent waiting for the round's group to form (for the others)."""
    communication_seconds: float = 0.0
    """Of ``seconds``, the time spent exchanging tensors with the group (the all-reduce)."""
    backend: str = ""
    """What averaged the round with the others: ``p2p`` or ``torch`` (torch.distributed); ''
    where nobody else was averaged with, or in process."""


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every floating-point value of ``tensors`` is finite (no NaN, no infinity)."""
    checks = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return not checks or bool(torch.stack(checks).all())  # one sync, not one per tensor


def withhold_if_not_finite(
    tensors: list[torch.Tensor], weight: float, round_key: str
) -> tuple[list[torch.Tensor], float]:
    """``tensors`` and ``weight`` as they go into a round, unless a value is NaN or infinite:
    then zeros of weight 0, so the others' average stays finite (one peer's inf gradient or NaN
    weights turned every peer's model to NaN, and nothing said so). The peer's own values then
    come back as the others' average, or stay zeros where nobody else contributed.

    This guards the sender only: a peer that skips it (another build, a bug, a hostile peer)
    still sends NaN, so a receiver checks the average it gets too (DiLoCo does, see
    :meth:`~gossamer.train.diloco.DiLoCoStrategy._apply_outcome`)."""
    if all_finite(tensors):
        return tensors, weight
    _log.warning(
        "round %s: this peer's values hold NaN or infinite numbers; they are withheld from the "
        "average (weight 0) so that the other peers' stay finite",
        round_key,
    )
    return [torch.zeros_like(t) for t in tensors], 0.0


def record_round_phases(
    round_key: str, *, began_unix_s: float, wait_seconds: float, communication_seconds: float
) -> None:
    """Record a round's waiting and all-reduce as spans nested in the caller's open span.

    The training loop runs strategy hooks inside a span; the round's parts are counted under
    their own phases ("waiting", "communication") instead of the hook's. Nothing is recorded
    outside a span (an averager used on its own).
    """
    if wait_seconds > 0:
        record_nested(
            "waiting", start_unix_s=began_unix_s, duration_s=wait_seconds, round=round_key
        )
    if communication_seconds > 0:
        record_nested(
            "communication",
            start_unix_s=began_unix_s + wait_seconds,
            duration_s=communication_seconds,
            round=round_key,
        )


class TensorAverager(Protocol):
    """Averages tensors with whoever else is in the round; blocks until done or the deadline."""

    def average(
        self, tensors: list[torch.Tensor], *, round_key: str, weight: float
    ) -> AverageOutcome:
        """The weighted average of ``tensors`` over the round's peers (this one included)."""
        ...


class PendingRound(Protocol):
    """A round whose group is forming while the caller goes on (see :func:`begin_round`)."""

    def ready(self) -> bool:
        """Whether the formation has ended (formed, or failed: :meth:`average` then reports
        the round as missed): :meth:`average` does not wait for it."""
        ...

    def average(self, tensors: list[torch.Tensor], *, weight: float) -> AverageOutcome:
        """The weighted average of ``tensors`` over the round's group, once it has formed."""
        ...

    def cancel(self) -> None:
        """Give the round up (the caller is closing); idempotent."""
        ...


class _FormsWhileWaiting(Protocol):
    def begin(self, round_key: str) -> PendingRound: ...


class _FormsOnAverage:
    """The pending round of an averager that forms its group inside ``average``."""

    def __init__(self, averager: TensorAverager, round_key: str) -> None:
        self._averager = averager
        self._round_key = round_key

    def ready(self) -> bool:
        return True

    def average(self, tensors: list[torch.Tensor], *, weight: float) -> AverageOutcome:
        return self._averager.average(tensors, round_key=self._round_key, weight=weight)

    def cancel(self) -> None:
        pass


def begin_round(averager: TensorAverager, round_key: str) -> PendingRound:
    """Start forming round ``round_key``'s group without waiting for it.

    The caller keeps working (training) and asks :meth:`PendingRound.ready` between steps; once
    the group has formed, :meth:`PendingRound.average` exchanges the tensors then, so the caller
    waits only for the exchange, not for the slowest peer to arrive. An averager without a
    ``begin`` method forms its group inside ``average``: its rounds are ready at once.
    """
    begin = getattr(averager, "begin", None)
    if begin is None:
        return _FormsOnAverage(averager, round_key)
    return cast("_FormsWhileWaiting", averager).begin(round_key)


class InProcessGroup:
    """Peers that are threads of one process meet here to average; a fixed-size group.

    Contributions and the average go through the same codecs as on the wire (``comm/``'s, with
    each peer's error feedback), so a lossy codec costs here what it costs across machines; the
    bytes counted are those a ring all-reduce of the encoded tensors sends, 2 (N - 1) / N of them.

    Args:
        num_peers: how many peers take part in every round.
        timeout_s: how long a round waits for all peers before failing.
        codec: which codec each tensor gets; none (fp32) if None.
    """

    def __init__(
        self, num_peers: int, *, timeout_s: float = 120.0, codec: CodecPolicy | None = None
    ) -> None:
        if num_peers < 1:
            raise ValueError(f"num_peers must be at least 1, got {num_peers}")
        self.num_peers = num_peers
        self.timeout_s = timeout_s
        self.codec = codec or CodecPolicy()
        self._lock = threading.Condition()
        self._rounds: dict[str, _Round] = {}

    def averager(self) -> InProcessAverager:
        """An averager for one peer of this group."""
        return InProcessAverager(self)

    def _arrive(self, round_key: str) -> _Round:
        """Count a peer as arrived at ``round_key`` (it will contribute)."""
        with self._lock:
            state = self._rounds.setdefault(round_key, _Round())
            state.arrived += 1
            return state

    def _contribute(
        self, round_key: str, tensors: list[torch.Tensor], weight: float
    ) -> list[torch.Tensor]:
        with self._lock:
            state = self._rounds.setdefault(round_key, _Round())
            state.contributions.append(([t.detach().clone() for t in tensors], weight))
            if len(state.contributions) == self.num_peers:
                total = sum(w for _, w in state.contributions)
                n = len(state.contributions)
                weights = torch.tensor(  # no weight anywhere: every contribution counts alike
                    [w / total if total > 0 else 1 / n for _, w in state.contributions],
                    dtype=torch.float64,
                )
                state.result = [
                    torch.tensordot(
                        weights, torch.stack([ts[i].double() for ts, _ in state.contributions]), 1
                    ).to(tensors[i].dtype)
                    for i in range(len(tensors))
                ]
                self._lock.notify_all()
            elif not self._lock.wait_for(lambda: state.result is not None, self.timeout_s):
                raise DeadlineExceededError(
                    f"round {round_key}: {len(state.contributions)} of {self.num_peers} peers "
                    f"arrived within {self.timeout_s} s"
                )
            state.collected += 1
            result = state.result
            if state.collected == self.num_peers:
                del self._rounds[round_key]
        assert result is not None
        return [t.clone() for t in result]


@dataclass(slots=True)
class _Round:
    contributions: list[tuple[list[torch.Tensor], float]] = field(default_factory=list)
    result: list[torch.Tensor] | None = None
    collected: int = 0
    arrived: int = 0
    """Peers that began the round (:meth:`InProcessAverager.begin`)."""


class InProcessAverager:
    """One thread-peer's handle on an :class:`InProcessGroup`, with its own error feedback."""

    def __init__(self, group: InProcessGroup) -> None:
        self.group = group
        self.feedback = ErrorFeedback()

    def _encode(self, tensor: torch.Tensor, key: str | None) -> tuple[torch.Tensor, int]:
        values = tensor.detach().to(torch.float32).reshape(-1).numpy()
        choice = self.group.codec.choose(values.shape[0])
        if key is None:  # the average on its way back: lossy, no feedback
            payload = choice.codec.encode(values, choice.block_size)
            decoded = choice.codec.decode(memoryview(payload), values.shape[0], choice.block_size)
        else:
            payload, decoded = self.feedback.encode(choice, key, values.shape[0], 0, values)
        restored = torch.from_numpy(decoded.copy()).reshape(tensor.shape).to(tensor.dtype)
        return restored, len(payload)

    def begin(self, round_key: str) -> PendingRound:
        """Arrive at ``round_key``; it is ready once every peer of the group has arrived."""
        return _InProcessPending(self, round_key, self.group._arrive(round_key))

    def average(
        self, tensors: list[torch.Tensor], *, round_key: str, weight: float
    ) -> AverageOutcome:
        tensors, weight = withhold_if_not_finite(tensors, weight, round_key)
        encoded = [self._encode(t, key=str(i)) for i, t in enumerate(tensors)]
        began_unix_s, began = time.time(), time.perf_counter()
        averaged = self.group._contribute(round_key, [t for t, _ in encoded], weight)
        wait_s = time.perf_counter() - began  # in process, the exchange is waiting for the others
        record_round_phases(
            round_key, began_unix_s=began_unix_s, wait_seconds=wait_s, communication_seconds=0.0
        )
        returned = [self._encode(t, key=None) for t in averaged]
        n = self.group.num_peers
        share = (n - 1) / n  # each leg of a ring all-reduce sends (N - 1) / N of the payload
        wire = int(share * (sum(b for _, b in encoded) + sum(b for _, b in returned)))
        return AverageOutcome(
            tensors=[t for t, _ in returned],
            group_size=n,
            bytes_sent=wire,
            bytes_received=wire,
            wait_seconds=wait_s,
        )


class _InProcessPending(_FormsOnAverage):
    """Ready once every peer of the in-process group has arrived at the round."""

    def __init__(self, averager: InProcessAverager, round_key: str, state: _Round) -> None:
        super().__init__(averager, round_key)
        self._num_peers = averager.group.num_peers
        self._state = state

    def ready(self) -> bool:
        return self._state.arrived >= self._num_peers
