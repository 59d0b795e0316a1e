"""The figures of ``gossamer bench allreduce`` and how they are judged, written and shown.

The driver (:mod:`gossamer.bench.allreduce`) gathers its workers' result files into one
:class:`AllReduceBenchResult` per codec with the helpers here: the median of the repeats' paired
ratios to gloo (:func:`_paired_speedup`), the peers' mean and busiest wire bytes, CPU time, uplink
utilization and extra memory. The result judges itself: a ratio too spread to trust
(:data:`NOISY_SPREAD`), an error vs gloo's mean past what an honest round of its codec gives
(:func:`error_tolerance`). It writes itself as JSON (a figure that is not finite as null) and as
a table; :func:`write_throughput_plot` draws a sweep's results.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "NOISY_SPREAD",
    "AllReduceBenchResult",
    "error_tolerance",
    "write_throughput_plot",
]

_TCP_FRAMING = 1514 / 1448
"""Ethernet + IP + TCP (with timestamps) bytes per payload byte of a full segment."""
NOISY_SPREAD = 2.0
"""Largest over smallest of the repeats' paired ratios above which the table warns that the
median is not to be trusted: the threshold of ``gossamer bench loop`` (its ``NOISY_SPREAD``,
not imported: that module brings the training stack into every worker)."""
_CODEC_ROUNDING = {"none": 0.0, "fp16": 2.0**-11, "bf16": 2.0**-8, "int8": 1 / 254}
"""The most a codec's encoding moves a value, over the largest magnitude of its block (fp16 and
bf16: half a unit in the last place, relative to the value itself; int8: half a step of
``absmax / 127``)."""
_FP32_REORDERING = 1e-5
"""What summing the members' values in another order than gloo's may move the mean, over the
inputs' largest magnitude (float32: 64 members move it by at most about 4e-6)."""
_ERROR_FLOOR = 1e-6
"""Absolute slack under every tolerance (values near zero)."""
_UNEVEN_WIRE = 1.01
"""How much more than the peers' mean the busiest peer sends before the table says so (parts
of a round differ by a few alignment blocks)."""


@dataclass(slots=True)
class AllReduceBenchResult:
    """The figures of one benchmark run (the JSON fields)."""

    peers: int
    size_bytes: int
    codec: str
    backend: str
    rate_bits_per_s: float | None
    seconds: float
    gloo_seconds: float
    speedup_vs_gloo: float
    """The median over repeats of gloo's time over Gossamer's in the same repeat."""
    speedup_vs_gloo_range: list[float]
    """The smallest and the largest of those paired ratios."""
    algorithm_bandwidth_bytes_per_s: float
    share_of_bound: float | None
    """The ring bound's time over the round's: None without a rate, and for a codec other
    than ``none`` (the bound counts fp32 bytes, which such a round does not send)."""
    gloo_share_of_bound: float | None
    ring_bound_seconds: float | None
    wire_bytes_per_peer: int
    """Message bytes a peer sent in a round (comm's frames included; TLS, HTTP/2 and gRPC
    framing not): the mean over peers, the median over repeats. A round's bytes over its peers,
    comparable to the ring's 2(N-1)/N of the tensor's bytes."""
    header_overhead: float
    """``wire_bytes_per_peer`` over the ring's bytes, less 1."""
    max_abs_error_vs_gloo: float
    """The largest difference of a round's result from gloo's mean, over workers and repeats
    (infinite where a result held a value that is not finite: null in JSON)."""
    repeats: int
    all_seconds: list[float]
    all_gloo_seconds: list[float]
    uplink_utilization: float | None = None
    """Bytes the peers' uplinks carried over what their caps allow in the round's time (mean
    over peers, median over repeats); None without a rate."""
    gloo_uplink_utilization: float | None = None
    """The same for gloo's rounds."""
    peak_extra_memory_ratio: float | None = None
    """The most resident memory a round added to a worker (its high-water mark over its size
    when the round began, the tensor and the output buffer already allocated), over the
    tensor's bytes: the largest over workers and repeats; None where it can't be read."""
    gloo_peak_extra_memory_ratio: float | None = None
    """The same for gloo's in-place all-reduce."""
    tcp_congestion_control: str = ""
    """The TCP congestion control the workers' sockets used (their namespace's), for gloo and
    Gossamer alike; it moves the figures on shaped links (see :class:`LabConfig`)."""
    cpu_seconds_per_peer: float | None = None
    """CPU time a worker process spent in a round (all its threads, user and system): the mean
    over workers, median over repeats. Where the peers share fewer cores than they are, as on
    loopback, this is what sets the round's time."""
    gloo_cpu_seconds_per_peer: float | None = None
    """The same for gloo's rounds."""
    ring_left: dict[str, int] = field(default_factory=dict)
    """Rounds of a worker whose averages left the ring and went directly, by why (the reports'
    ``ring_left``), summed over workers and repeats: empty on healthy links."""
    aes_gcm_bytes_per_s: float | None = None
    """AES-128-GCM's speed on this machine (bytes encrypted and decrypted per second of one
    core, in 16 KiB records like TLS's), measured in the same run; None for the torch backend,
    whose links carry no TLS."""
    tls_floor_cpu_seconds_per_peer: float | None = None
    """The CPU a peer's TLS needs at that speed to encrypt what it sends and decrypt what it
    receives in a round: a floor under ``cpu_seconds_per_peer`` that gloo's plain TCP does
    not pay."""
    busiest_peer_wire_bytes: int | None = None
    """Message bytes the peer that sent the most sent in a round (the largest over peers, the
    median over repeats), counted as ``wire_bytes_per_peer`` is. Above that mean where the
    members picked different send orders: one sending directly (all at once) also passes on
    the averages that come to it round the ring, so it sends more and the ring's members less,
    with the round's bytes unchanged (4 peers, 100 MB on loopback: 200 MB against 100-150 MB,
    where the members' measured send rates straddle ``AllReduceConfig.min_step_s``'s rule)."""
    error_tolerance: float | None = None
    """The largest ``max_abs_error_vs_gloo`` an honest round of this codec gives on these
    values (:func:`error_tolerance`); None for a codec whose error bound is not known here."""

    def to_json(self) -> str:
        """The result as one JSON object; a figure that is not finite is written as null (JSON
        has no infinity: ``Infinity`` made the output unreadable to JSON parsers)."""
        return json.dumps(_finite_or_null(asdict(self)), indent=2, allow_nan=False)

    @property
    def noisy(self) -> bool:
        """Whether the repeats' paired ratios differ by more than :data:`NOISY_SPREAD` times."""
        low, high = self.speedup_vs_gloo_range
        return high > NOISY_SPREAD * low

    def noise_warning(self) -> str | None:
        """One line saying that the paired ratios disagree too much to trust their median."""
        if not self.noisy:
            return None
        low, high = self.speedup_vs_gloo_range
        return (
            f"warning: the repeats' ratios to gloo differ by more than {NOISY_SPREAD:g}x "
            f"({low:.2f}..{high:.2f}x, codec {self.codec}): the machine was busy, so the median "
            "is not to be trusted; run again on a quiet machine"
        )

    def error_problem(self) -> str | None:
        """One line naming a wrong result: an error vs gloo's mean that is not finite or is past
        :attr:`error_tolerance`; None when the result is right (or its codec is not judged)."""
        error, tolerance = self.max_abs_error_vs_gloo, self.error_tolerance
        if math.isfinite(error) and (tolerance is None or error <= tolerance):
            return None
        what = f"{error:.3g}" if math.isfinite(error) else "not finite (NaN or infinite values)"
        bound = f"its tolerance {tolerance:.3g}" if tolerance is not None else "any tolerance"
        return (
            f"Gossamer's result is wrong ({self.peers} peers, backend {self.backend}, codec "
            f"{self.codec}): its largest difference from gloo's mean is {what}, past {bound}"
        )

    def _wire_note(self) -> str:
        """What ``header_overhead`` measures here, which depends on the backend and codec."""
        framing = f"TCP/IP framing adds >= {_TCP_FRAMING - 1:.1%} on top"
        if self.backend == "torch":
            return (
                f"(the ring's bytes, counted not measured: gloo's own framing unknown; {framing})"
            )
        what = "compression and comm's frames" if self.codec != "none" else "comm's frames"
        return (
            f"({self.header_overhead:+.3%} vs the ring bound's fp32 bytes: {what}; TLS, HTTP/2 "
            f"and gRPC framing (about 0.2%) and control words not counted; {framing})"
        )

    def table(self) -> str:
        """A human-readable summary."""
        if self.ring_bound_seconds is None or self.gloo_share_of_bound is None:
            bound = "n/a (no --rate)"
        elif self.share_of_bound is None:
            bound = (
                f"n/a for {self.codec} (the bound counts fp32 bytes); gloo "
                f"{self.gloo_share_of_bound:.1%} of {self.ring_bound_seconds:.2f} s"
            )
        else:
            bound = (
                f"{self.share_of_bound:.1%} (gloo {self.gloo_share_of_bound:.1%}) of "
                f"{self.ring_bound_seconds:.2f} s"
            )
        low, high = self.speedup_vs_gloo_range
        speedup = (
            f"  speedup       {self.speedup_vs_gloo:8.2f}x vs gloo (median of the repeats' "
            f"ratios, {low:.2f}..{high:.2f}x)"
        )
        warning = self.noise_warning()
        tolerance = (
            f" (tolerance {self.error_tolerance:.2e})" if self.error_tolerance is not None else ""
        )
        busy = ""
        if self.uplink_utilization is not None and self.gloo_uplink_utilization is not None:
            busy = (
                f"  uplink busy   {self.uplink_utilization:.1%} of the cap's bytes "
                f"(gloo {self.gloo_uplink_utilization:.1%})"
            )
        memory = ""
        if self.peak_extra_memory_ratio is not None:
            gloo_memory = (
                f" (gloo +{self.gloo_peak_extra_memory_ratio:.2f}x)"
                if self.gloo_peak_extra_memory_ratio is not None
                else ""
            )
            memory = (
                f"  peak memory   +{self.peak_extra_memory_ratio:.2f}x the tensor per peer"
                f"{gloo_memory}"
            )
        busiest = ""
        if (
            self.busiest_peer_wire_bytes is not None
            and self.busiest_peer_wire_bytes > _UNEVEN_WIRE * self.wire_bytes_per_peer
        ):
            busiest = (
                f"  busiest peer  {self.busiest_peer_wire_bytes} in a round "
                f"({self.busiest_peer_wire_bytes / self.wire_bytes_per_peer - 1:+.1%}: the "
                "members shared the round's bytes unevenly, some sending directly, some round "
                "the ring)"
            )
        left = ""
        if self.ring_left:
            why = ", ".join(f"{n} {reason}" for reason, n in sorted(self.ring_left.items()))
            left = f"  ring left     by a worker's averages in {why} (of its rounds)"
        cpu = ""
        if self.cpu_seconds_per_peer is not None and self.gloo_cpu_seconds_per_peer is not None:
            cpu = (
                f"  CPU           {self.cpu_seconds_per_peer:.3f} s per peer per round, all "
                f"threads (gloo {self.gloo_cpu_seconds_per_peer:.3f} s)"
            )
        if cpu and self.tls_floor_cpu_seconds_per_peer is not None and self.aes_gcm_bytes_per_s:
            cpu += (
                f"\n  TLS floor     {self.tls_floor_cpu_seconds_per_peer:.3f} s of that: its bytes "
                f"sent and received through AES-128-GCM at {self.aes_gcm_bytes_per_s / 1e9:.2f} "
                "GB/s (measured here)"
            )
        return "\n".join(
            [
                f"all-reduce of {self.size_bytes / 1e6:.1f} MB over {self.peers} peers "
                f"(backend {self.backend}, codec {self.codec}, median of {self.repeats})",
                f"  gossamer      {self.seconds:8.3f} s  "
                f"({self.algorithm_bandwidth_bytes_per_s / 1e6:.1f} MB/s algorithm bandwidth)",
                f"  gloo          {self.gloo_seconds:8.3f} s",
                speedup,
                *([f"  {warning}"] if warning else []),
                f"  ring bound    {bound}",
                f"  wire bytes    {self.wire_bytes_per_peer} per peer {self._wire_note()}",
                *([busiest] if busiest else []),
                f"  max |error|   {self.max_abs_error_vs_gloo:.2e} vs gloo's mean{tolerance}",
                f"  TCP           {self.tcp_congestion_control or 'n/a'} congestion control",
                *([busy] if busy else []),
                *([memory] if memory else []),
                *([cpu] if cpu else []),
                *([left] if left else []),
            ]
        )


def _paired_speedup(gloo_s: Sequence[float], seconds: Sequence[float]) -> tuple[float, list[float]]:
    """Gloo's time over Gossamer's, paired by repeat: the median of the repeats' ratios, and
    the smallest and largest of them.

    Each ratio compares two rounds of one repeat, a moment apart on the same machine; the ratio
    of the two medians compared rounds of different repeats whenever the medians fell on them.
    """
    ratios = [g / s for g, s in zip(gloo_s, seconds, strict=True)]
    return statistics.median(ratios), [min(ratios), max(ratios)]


def error_tolerance(codec: str, input_absmax: float) -> float | None:
    """The largest difference from gloo's mean an honest round of ``codec`` gives, where the
    largest magnitude among the members' values is ``input_absmax``; None for a codec whose
    error bound is not known here.

    A round encodes the members' values for the part's owner and the owner's average for the
    others: each moves a value by at most the codec's rounding of the magnitudes it holds
    (:data:`_CODEC_ROUNDING`), so together at most twice that; the tolerance allows twice as
    much again, plus float32's reordering of the sum. At 20 MB of ``randn`` values
    (``input_absmax`` about 5.3): fp32 5.4e-5 (honest rounds give under 1e-6), int8 0.083
    (honest rounds about 0.02). A round that skipped communication, or left a value unwritten
    (NaN), is off by far more.
    """
    rounding = _CODEC_ROUNDING.get(codec)
    if rounding is None:
        return None
    return (4 * rounding + _FP32_REORDERING) * input_absmax + _ERROR_FLOOR


def _finite_or_null(value: Any) -> Any:
    """``value`` with every float that is not finite replaced by None, in lists and dicts too."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(v) for v in value]
    return value


def _cpu_per_peer(cpu: list[list[float]]) -> float:
    """Median over repeats of the workers' mean CPU time in a round (``cpu[worker][repeat]``)."""
    return statistics.median(statistics.fmean(each) for each in zip(*cpu, strict=True))


def _wire_per_peer(sent: list[list[int]]) -> tuple[int, int]:
    """The bytes a peer sent in a round, from ``sent[worker][repeat]``.

    Returns:
        The workers' mean (a round's bytes over its peers, as the ring bound counts them) and
        the most one worker sent, each the median over repeats.
    """
    rounds = list(zip(*sent, strict=True))
    mean = statistics.median(statistics.fmean(each) for each in rounds)
    return round(mean), round(statistics.median(max(each) for each in rounds))


def _most_memory(so_far: int, extra_bytes: int) -> int:
    """The larger of two extra-memory readings, or -1 once either could not be read (a round
    that could not measure must not read as one that added nothing)."""
    return -1 if min(so_far, extra_bytes) < 0 else max(so_far, extra_bytes)


def _memory_ratio(extra_bytes: list[int], size_bytes: int) -> float | None:
    """The largest extra memory over the tensor's size; None if any worker could not read it."""
    if not extra_bytes or min(extra_bytes) < 0:
        return None
    return max(extra_bytes) / size_bytes


def _utilization(
    sent: list[list[int]], seconds: list[float], caps_bps: Sequence[float] | None
) -> float | None:
    """Median over repeats of the peers' mean uplink bytes over what their caps allow.

    Args:
        sent: per peer, the bytes its link sent in each repeat.
        seconds: each repeat's time (the slowest worker's).
        caps_bps: each peer's link rate; None on loopback.
    """
    if caps_bps is None:
        return None
    shares = [
        statistics.fmean(
            peer[i] / (seconds[i] * cap / 8) for peer, cap in zip(sent, caps_bps, strict=True)
        )
        for i in range(len(seconds))
    ]
    return statistics.median(shares)


def write_throughput_plot(results: Sequence[AllReduceBenchResult], path: Path) -> str:
    """Plot algorithm bandwidth against peers, one line per codec plus gloo; returns a message.

    matplotlib is the ``plot`` extra: without it nothing is written and the message says so.
    """
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return "no plot: matplotlib is not installed (pip install 'gossamer[plot]')"
    figure, axes = plt.subplots(figsize=(6, 4))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in results:
        label = f"gossamer {r.backend} {r.codec}"
        series.setdefault(label, []).append((r.peers, r.algorithm_bandwidth_bytes_per_s / 1e6))
        gloo = (r.peers, r.size_bytes / r.gloo_seconds / 1e6)
        if gloo not in series.setdefault("gloo fp32", []):
            series["gloo fp32"].append(gloo)
    for label, points in sorted(series.items()):
        points.sort()
        axes.plot([p for p, _ in points], [v for _, v in points], marker="o", label=label)
    rate = results[0].rate_bits_per_s if results else None
    where = f"{rate / 1e6:.0f} Mbit/s links" if rate else "loopback"
    axes.set_xticks(sorted({r.peers for r in results}))
    axes.set_xlabel("peers")
    axes.set_ylabel("algorithm bandwidth (MB/s)")
    axes.set_title(f"all-reduce of {results[0].size_bytes / 1e6:.0f} MB, {where}")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return f"plot written to {path}"
