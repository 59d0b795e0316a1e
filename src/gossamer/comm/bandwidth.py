"""How fast this peer sends, measured from each round's own traffic, and the part weights it sets.

Parts of an all-reduce are sized by bandwidth (see :class:`~gossamer.comm.plan.PartPlan`), so a
peer on a thin link reduces a small part and the round is not held up by it. A peer learns its
own figure from the traffic it already sends: during a round, :class:`SendTally` wraps the
transport and records, for every destination, the bytes delivered, the time at least one
message to it was in flight, and that time shared out among the destinations in flight at once.
Per destination, because a fast peer's messages to a member on a thin link take long because of
the *receiver's* link, and a plain "bytes over the round's busy time" would blame the sender for
it. A round sends in pairwise steps, one destination at a time (:mod:`gossamer.comm.steps`), so
the round's figure is the fastest destination's bytes over its share of the time, capped by the
sum of the plain per-destination rates (for traffic that went to several at once).
:class:`BandwidthMeter` keeps a moving average of these figures across rounds (the first
measurement replaces the default), so the figure follows a link that changes during a run.

Members publish their figure with their group-formation entry
(:class:`~gossamer.comm.groups.JoinEntry`); every member then derives the same part weights from
the same agreed figures with :func:`plan_weights`, which also bounds what one peer's (untrusted)
figure can claim.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from gossamer.comm.transport import CommTransport, Message, MessageReceiver, message_nbytes
from gossamer.core.clock import Clock
from gossamer.core.errors import GossamerError

__all__ = [
    "BandwidthMeter",
    "BandwidthMeterConfig",
    "SendRates",
    "SendTally",
    "agreed_send_rates",
    "plan_weights",
]

DEFAULT_BYTES_PER_S = 12.5e6
"""The figure a peer announces before it measured anything (100 Mbit/s)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class BandwidthMeterConfig:
    """How a peer measures its send throughput."""

    default_bytes_per_s: float = DEFAULT_BYTES_PER_S
    """Estimate before the first measurement."""
    smoothing: float = 0.5
    """Weight of the newest round's figure in the moving average (1.0: the last round only)."""
    min_bytes_per_peer: int = 256 * 1024
    """A destination counts in a round's figure once it was sent this many bytes (below that,
    latency rather than bandwidth sets a transfer's time)..."""
    min_busy_s: float = 1.0
    """...or once messages to it were in flight this long (a slow link that moved little)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.default_bytes_per_s) and self.default_bytes_per_s > 0):
            raise ValueError(
                f"default_bytes_per_s must be positive and finite, got {self.default_bytes_per_s}"
            )
        if not 0 < self.smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {self.smoothing}")
        if self.min_bytes_per_peer < 1:
            raise ValueError(
                f"min_bytes_per_peer must be at least 1, got {self.min_bytes_per_peer}"
            )
        if not self.min_busy_s > 0:
            raise ValueError(f"min_busy_s must be positive, got {self.min_busy_s}")


@dataclass(slots=True)
class _Destination:
    """What one round sent to one peer."""

    bytes_sent: int = 0
    busy_s: float = 0.0
    share_s: float = 0.0
    """Busy time shared out: while k destinations have messages in flight, each gets 1/k."""
    num_in_flight: int = 0
    busy_since: float = 0.0
    failed: bool = False


class SendTally:
    """A :class:`CommTransport` for one round that times what it sends, per destination.

    Args:
        transport: the transport that does the sending.
        clock: time source (the round's clock).
    """

    def __init__(self, transport: CommTransport, clock: Clock) -> None:
        self._transport = transport
        self._clock = clock
        self._destinations: dict[str, _Destination] = {}
        self._busy: set[str] = set()
        """Destinations with a message in flight now."""
        self._shared_until = 0.0
        self._uplink_busy_s = 0.0
        """Time with any message in flight."""

    def _share_out(self) -> None:
        """Give the destinations in flight their shares of the time since the last change."""
        now = self._clock.monotonic()
        if self._busy:
            self._uplink_busy_s += now - self._shared_until
            share = (now - self._shared_until) / len(self._busy)
            for peer_id in self._busy:
                self._destinations[peer_id].share_s += share
        self._shared_until = now

    @property
    def peer_id(self) -> str:
        """This peer's id."""
        return self._transport.peer_id

    def set_receiver(self, receiver: MessageReceiver) -> None:
        """Route incoming messages to ``receiver`` (on the wrapped transport)."""
        self._transport.set_receiver(receiver)

    async def send(self, peer_id: str, message: Message, *, timeout_s: float) -> None:
        """Send through the wrapped transport, timing the transfer.

        A send that fails marks its destination as failed: the time went to a peer that was not
        answering, which says nothing about this peer's link. A send cancelled (the round's
        deadline) keeps its time but adds no bytes, so a link too slow to finish a round still
        yields a (low) figure, where anything got through.
        """
        destination = self._destinations.setdefault(peer_id, _Destination())
        if destination.num_in_flight == 0:
            destination.busy_since = self._clock.monotonic()
            self._share_out()
            self._busy.add(peer_id)
        destination.num_in_flight += 1
        try:
            await self._transport.send(peer_id, message, timeout_s=timeout_s)
        except GossamerError:
            destination.failed = True
            raise
        else:
            destination.bytes_sent += message_nbytes(message)
        finally:
            destination.num_in_flight -= 1
            if destination.num_in_flight == 0:
                destination.busy_s += self._clock.monotonic() - destination.busy_since
                self._share_out()
                self._busy.discard(peer_id)

    def peer_failed(self, peer_id: str) -> None:
        """Leave ``peer_id`` out of the round's figure: the round declared it failed, and sends
        to it that were cancelled then (not failed) spent their time on a peer that was not
        answering, which says nothing about this peer's link."""
        self._destinations.setdefault(peer_id, _Destination()).failed = True

    def _counted(self, config: BandwidthMeterConfig) -> dict[str, _Destination]:
        found = {}
        for peer_id, d in self._destinations.items():
            if d.failed or d.num_in_flight or d.busy_s <= 0 or d.bytes_sent == 0:
                continue  # nothing delivered: no rate to tell, however long it was busy
            if d.bytes_sent >= config.min_bytes_per_peer or d.busy_s >= config.min_busy_s:
                found[peer_id] = d
        return found

    def rates(self, config: BandwidthMeterConfig) -> dict[str, float]:
        """Bytes per second to each destination that counts (see :class:`BandwidthMeterConfig`)."""
        return {p: d.bytes_sent / d.busy_s for p, d in self._counted(config).items()}

    def shared_rates(self, config: BandwidthMeterConfig) -> dict[str, float]:
        """Per destination, bytes over its share of the busy time (what the link would carry for
        it alone): the rate to a destination that had the link to itself, the rate it got times
        k while it shared the link with k - 1 others."""
        return {
            p: d.bytes_sent / d.share_s for p, d in self._counted(config).items() if d.share_s > 0
        }

    def busy_throughput_bytes_per_s(self) -> float | None:
        """Every byte delivered over the time anything was in flight (None when nothing was):
        below the uplink's rate, since small messages' latency counts as busy time, but
        measured by every round, however small."""
        if self._busy or self._uplink_busy_s <= 0:
            return None
        if any(d.failed for d in self._destinations.values()):
            return None  # time spent on a peer that was not answering says nothing of the link
        delivered = sum(d.bytes_sent for d in self._destinations.values())
        return delivered / self._uplink_busy_s if delivered else None

    def throughput_bytes_per_s(self, config: BandwidthMeterConfig) -> float | None:
        """The round's figure; None when nothing counts.

        The fastest destination's rate over its share of the time (a round sends one step at a
        time, to one destination: the one that is not held up by its own downlink shows what
        this peer's uplink carries), but never more than the sum of the plain per-destination
        rates (what the link carried while it served several at once).
        """
        shared = self.shared_rates(config)
        if not shared:
            return None
        return min(max(shared.values()), sum(self.rates(config).values()))


class BandwidthMeter:
    """This peer's send throughput: a moving average over the rounds it took part in.

    Pass it to :func:`~gossamer.comm.allreduce.all_reduce` (``meter=``) and it updates itself
    after every round; publish :attr:`estimate_bytes_per_s` with the next join entry.

    Args:
        config: default, smoothing and what counts as a measurement.
    """

    def __init__(self, config: BandwidthMeterConfig | None = None) -> None:
        self.config = config or BandwidthMeterConfig()
        self._estimate = self.config.default_bytes_per_s
        self.num_measurements = 0
        """Rounds whose traffic updated the estimate."""
        self.last_sample_bytes_per_s: float | None = None
        """The newest round's own figure (None before the first)."""
        self._busy_estimate: float | None = None

    @property
    def floor_bytes_per_s(self) -> float:
        """A figure the send rate is at least (about): the lower of :attr:`estimate_bytes_per_s`
        and the moving average of every round's bytes over its busy time, which small rounds
        measure too. Small rounds' messages are latency more than bandwidth, so it errs low;
        for deciding whether a burst of them would overflow the path's queue, erring low errs
        on the safe side. The default until a round was measured either way."""
        if self._busy_estimate is None:
            return self._estimate
        if self.num_measurements == 0:
            return self._busy_estimate
        return min(self._estimate, self._busy_estimate)

    @property
    def estimate_bytes_per_s(self) -> float:
        """The figure to publish: the default until the first measurement."""
        return self._estimate

    def update(self, tally: SendTally) -> float | None:
        """Fold a finished round's traffic into the estimate; returns the round's figure.

        A round whose traffic does not count (too little, or only to failed peers) leaves the
        estimate as it was and returns None.
        """
        sample = tally.throughput_bytes_per_s(self.config)
        if sample is not None:
            self.observe(sample)
        busy = tally.busy_throughput_bytes_per_s()
        if busy is not None:
            alpha = self.config.smoothing
            previous = self._busy_estimate
            self._busy_estimate = (
                busy if previous is None else alpha * busy + (1 - alpha) * previous
            )
        return sample

    def observe(self, sample_bytes_per_s: float) -> None:
        """Fold one measured figure into the estimate (the first replaces the default)."""
        if not (math.isfinite(sample_bytes_per_s) and sample_bytes_per_s > 0):
            raise ValueError(f"a bandwidth sample must be finite and > 0: {sample_bytes_per_s}")
        if self.num_measurements == 0:
            self._estimate = sample_bytes_per_s
        else:
            alpha = self.config.smoothing
            self._estimate = alpha * sample_bytes_per_s + (1 - alpha) * self._estimate
        self.num_measurements += 1
        self.last_sample_bytes_per_s = sample_bytes_per_s


MAX_FIGURE_BYTES_PER_S = 1e13
"""The largest bandwidth figure taken from a peer (80 Tbit/s): larger ones count as this, so
figures near the float limit cannot sum (or average) to infinity."""


def plan_weights(bandwidths: Sequence[float], *, max_ratio: float = 100.0) -> list[float]:
    """Part weights for members that published ``bandwidths`` (bytes/s, in member order).

    A pure function of the agreed figures, so every member computes the same weights and so the
    same :class:`~gossamer.comm.plan.PartPlan`. Figures come from other peers and are not
    trusted: each is clamped to ``max_ratio`` times the median figure either way (the lower
    middle one of an even count, so in a group of two one peer cannot raise the median itself
    to take the whole buffer), so one peer can neither take the whole buffer nor be left with
    nothing, and to
    :data:`MAX_FIGURE_BYTES_PER_S`. A figure that is missing (0), negative or not finite counts
    as the median. No positive figure at all: equal weights.

    Raises:
        ValueError: no members, or ``max_ratio`` below 1.
    """
    if not bandwidths:
        raise ValueError("no bandwidth figures: the group is empty")
    if not max_ratio >= 1:
        raise ValueError(f"max_ratio must be at least 1, got {max_ratio}")
    # (an infinite figure is unreadable, not the largest: min() made it the cap, 100x the median)
    bandwidths = [min(b, MAX_FIGURE_BYTES_PER_S) if math.isfinite(b) else 0.0 for b in bandwidths]
    known = sorted(b for b in bandwidths if math.isfinite(b) and b > 0)
    if not known:
        return [1.0] * len(bandwidths)
    median = statistics.median_low(known)  # a member's own figure: two members' mean is not
    low, high = median / max_ratio, median * max_ratio
    return [min(max(b, low), high) if math.isfinite(b) and b > 0 else median for b in bandwidths]


@dataclass(frozen=True, slots=True)
class SendRates:
    """The send rates a member picks its send order by (see
    :func:`~gossamer.comm.allreduce.all_reduce`): a :class:`BandwidthMeter`'s own two figures,
    or the ones a round's members agreed on (:func:`agreed_send_rates`)."""

    estimate_bytes_per_s: float
    """The send rate a step's time is expected at."""
    floor_bytes_per_s: float
    """A rate the send rate is at least: whether a burst of short steps overflows a queue."""


def agreed_send_rates(
    estimates: Sequence[float], floors: Sequence[float], *, max_ratio: float = 100.0
) -> SendRates:
    """The send rates every member of a round picks its send order by: the slowest member's
    estimate, clamped as :func:`plan_weights` clamps it (an unreadable one counts as the
    median, none is taken below a ``max_ratio``-th of it), and the members' median floor, no
    higher than that estimate. A pure function of the agreed figures (in member order), so every
    member gets the same, and so the same send order: picked by each member's own meter, a
    round could mix members in pairwise steps with members sending all at once (its bytes the
    same, one uplink carrying up to a third more).

    The floor is the median, not the lowest: a floor measured from small rounds errs low (see
    :attr:`BandwidthMeter.floor_bytes_per_s`; a peer that averaged three rounds of 100 values
    published one 44x below its estimate), and the lowest would let one such peer, or one that
    lies, send every member's short steps all at once where they overflow the path's queue.

    Args:
        estimates: the members' published send-rate estimates (bytes/s).
        floors: their published floors; where one is unreadable or missing (0), that member's
            estimate counts.

    Raises:
        ValueError: no members, lists of different lengths, or ``max_ratio`` below 1.
    """
    if not estimates or len(floors) != len(estimates):
        raise ValueError(f"{len(estimates)} estimates and {len(floors)} floors: one per member")
    if not max_ratio >= 1:
        raise ValueError(f"max_ratio must be at least 1, got {max_ratio}")
    if not any(math.isfinite(e) and e > 0 for e in estimates):
        return SendRates(DEFAULT_BYTES_PER_S, DEFAULT_BYTES_PER_S)
    clamped = plan_weights(estimates, max_ratio=max_ratio)
    estimate = min(clamped)
    readable = [
        f if math.isfinite(f) and f > 0 else e for f, e in zip(floors, clamped, strict=True)
    ]
    floor = min(statistics.median_low(plan_weights(readable, max_ratio=max_ratio)), estimate)
    return SendRates(estimate, floor)
