"""``gossamer bench allreduce``: Gossamer's averaging against plain gloo, same tensor, same run.

N worker processes each hold a random float32 tensor of the given size. On loopback they run
as plain processes; with a rate (``--rate``, root) each runs inside its own lab namespace behind
a tbf-capped link (``gossamer.lab``). In one run, repeated ``repeats`` times with a barrier
before each timing, every worker times plain ``torch.distributed`` gloo ``all_reduce`` of its
tensor (the reference) and Gossamer's averaging of the same tensor for each codec asked for
(``p2p``: comm over net's TLS gRPC bulk streams; ``torch``: the torch.distributed backend, in
place like gloo; ``auto``: torch where every member is directly reachable). Gloo goes first in
even repeats and last in odd ones (:func:`_round_order`): whatever favours a round's place in a
repeat (caches, a link's queue, the machine's load as it changes) does not always favour gloo.
A repeat's figure is its slowest worker's time; ``seconds`` and ``gloo_seconds`` are the medians
over repeats, and ``speedup_vs_gloo`` is the median of each repeat's own ratio (gloo's time over
Gossamer's in the same repeat), with the smallest and largest beside it
(``speedup_vs_gloo_range``): two medians taken apart pair no repeat with another, and a control
that timed gloo's same work twice, gloo first, read 0.84-1.08x per repeat.

Each round's result is checked against gloo's mean (the tensors are the same in every repeat,
so against the latest gloo round's): ``max_abs_error_vs_gloo`` is the largest difference over
workers and repeats, and ``error_tolerance`` the most an honest round of that codec can give
(:func:`error_tolerance`); the command fails a run past it.

With a rate, every worker also reads its uplink's own tbf counter (the bytes ``tc -s qdisc``
says the qdisc sent, in its namespace) around each timing: ``uplink_utilization`` is the bytes
its uplink carried, framing included as the tbf charges them, over what the cap allows in the
round's time, averaged over the peers; a tbf passes at most the cap, so 1.0 is a link never
idle. It tells a link left idle (scheduling) from one kept busy with overhead (bytes). (The
interface's own counter, ``/proc/net/dev``, read 1-4% low: it counts a GSO packet's headers
once, where the tbf charges every segment's.)

The ring bound is ``2(N-1)/N * size * 8 / rate`` with ``size`` the tensor's bytes: everything
else on the wire (TCP/IP and Ethernet framing, TLS, gRPC, comm's own headers) counts against
Gossamer (and against gloo). ``share_of_bound`` (the bound over the round's time) is given for
fp32 rounds only: a compressing codec sends fewer bytes than the bound counts (int8 read
322.6%). ``header_overhead`` states Gossamer's application bytes over the ring's bytes; the
framing below it is at least 1514/1448 (+4.6%) for full TCP segments. Both are the peers' mean,
as the ring's figure is: members that pick different send orders (each by its own measured send
rate, see :mod:`gossamer.comm.steps`) share a round's bytes unevenly, the ones sending directly
passing on the averages that come round the ring too, and the busiest peer's figure is stated
apart (``busiest_peer_wire_bytes``).

Workers meet through files in a temporary folder (namespaces share the file system, not the
network): worker 0 opens the ``TCPStore`` on a free port of its own address and writes the
port; results come back as JSON files.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import datetime
import json
import math
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from torch._C._distributed_c10d import PrefixStore, TCPStore

from gossamer.comm.allreduce import AllReduceConfig, all_reduce
from gossamer.comm.bandwidth import BandwidthMeter, SendRates, agreed_send_rates
from gossamer.comm.codecs import CodecPolicy
from gossamer.comm.net_transport import NetCommTransport
from gossamer.comm.torch_backend import TorchGroupAverager, choose_backend
from gossamer.comm.transport import CommMailbox
from gossamer.core.errors import FatalError
from gossamer.core.runtime import freeze_startup_heap
from gossamer.lab.config import MAX_PEERS
from gossamer.lab.state import process_ended, process_start_ticks
from gossamer.net.config import LimitsConfig, NodeConfig
from gossamer.net.node import Node

__all__ = [
    "NOISY_SPREAD",
    "AllReduceBenchResult",
    "BenchWorkerError",
    "aes_gcm_bytes_per_s",
    "check_fits_in_memory",
    "error_tolerance",
    "remove_abandoned_runs",
    "run_allreduce_bench",
    "run_allreduce_sweep",
    "write_throughput_plot",
]

_MIN_TIMEOUT_S = 120.0
"""The least of the workers' own timeouts (the store, gloo, a round)."""
_START_S_PER_WORKER = 3.0
"""What each more worker adds to the start of all of them (importing torch on 2 cores)."""
_STARTUP_S = 120.0
"""What the workers may take to start (import torch, meet in the store, connect)."""
_SLOWEST_LOOPBACK_BYTES_PER_S = 50e6
"""A loopback round's bytes per second on a slow, loaded 2-core host (for the time allowed)."""
_GRACE_S = 5.0
"""How long the other workers may take to end once one failed, before they are stopped."""
_LOG_TAIL_LINES = 15
_PR_SET_PDEATHSIG = 1
_TENSORS_PER_WORKER = 5
"""The tensor, gloo's copy, the buffer averages land in, and what a round adds (up to 1.6x)."""
_WORKER_BASE_BYTES = 400_000_000
"""A worker's memory before its tensors (Python, torch, gRPC)."""
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
_FOLDER_PREFIX = "gossamer-bench-"
"""How a run's temporary folder is named (then a random part)."""
_DRIVER_FILE = "driver.json"
"""In a run's temporary folder: the pid and start time of the driver that made it."""
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


# ---- worker side ---------------------------------------------------------------------------


def _open_store(spec: dict[str, Any]) -> TCPStore:
    folder = Path(spec["folder"])
    timeout = datetime.timedelta(seconds=spec["timeout_s"])
    world = spec["world"]
    if spec["rank"] == 0:
        store = TCPStore(spec["host"], 0, world, is_master=True, timeout=timeout,
                         wait_for_workers=False)  # fmt: skip
        staged = folder / "store.tmp"
        staged.write_text(f"{spec['host']}:{store.port}")
        staged.rename(folder / "store")
        return store
    address = folder / "store"
    deadline = time.monotonic() + 120.0
    while not address.exists():  # worker 0 is starting; a bounded wait for its file
        if time.monotonic() > deadline:
            raise TimeoutError("worker 0 did not open the rendezvous store in 120 s")
        time.sleep(0.05)
    host, _, port = address.read_text().rpartition(":")
    return TCPStore(host, int(port), world, is_master=False, timeout=timeout)


def _uplink_sent_bytes(ifname: str) -> int:
    """Bytes the tbf at the root of ``ifname`` (in this process's network namespace) has sent so
    far, as it charges them against its rate; 0 without an interface (loopback)."""
    if not ifname:
        return 0
    shown = subprocess.run(
        ["tc", "-s", "qdisc", "show", "dev", ifname, "root"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if shown.returncode != 0:
        raise RuntimeError(
            f"`tc -s qdisc show dev {ifname}` failed: {shown.stderr.strip() or shown.returncode}"
        )
    return _tbf_sent_bytes(shown.stdout, ifname)


def _tbf_sent_bytes(shown: str, ifname: str) -> int:
    """The ``Sent N bytes`` of the root tbf in ``tc -s qdisc show``'s output ``shown``.

    Raises:
        RuntimeError: no root tbf there (a counter of another qdisc would read about nothing).
    """
    lines = shown.splitlines()
    for i, line in enumerate(lines):
        words = line.split()
        if words[:2] == ["qdisc", "tbf"] and "root" in words:
            for stats in lines[i + 1 :]:
                sent = stats.split()
                if sent[:1] == ["Sent"] and len(sent) > 2 and sent[2] == "bytes":
                    return int(sent[1])
                if sent[:1] == ["qdisc"]:
                    break
    raise RuntimeError(f"interface {ifname!r} has no root tbf with a Sent counter: {shown!r}")


def _congestion_control() -> str:
    """The TCP congestion control new sockets get in this process's network namespace."""
    try:
        return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    except OSError:
        return ""


def _status_bytes(field: str) -> int:
    """A size from ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _release_free_memory() -> None:
    """Hand the memory malloc holds free back to the kernel (glibc's ``malloc_trim``; nothing
    elsewhere), so that a round cannot reuse pages an earlier round left resident."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


class _ExtraMemory:
    """The most resident memory a block of code added to this process.

    Opening hands the memory malloc holds free back to the kernel, resets the kernel's
    high-water mark of the resident size (``clear_refs`` 5, Linux 4.0+) and reads the resident
    size; closing reads the high-water mark, so a buffer allocated and freed inside the block
    counts. Without the first, a round found the pages an earlier one freed still resident and
    counted little of what it used: the second codec of ``--codec none,int8`` read int8 at
    +1.13x the tensor where alone it read +1.61x. ``extra_bytes`` is -1 where the reset is not
    allowed.
    """

    def __init__(self) -> None:
        self.extra_bytes = -1
        self._before = 0
        self._armed = False

    def __enter__(self) -> _ExtraMemory:
        _release_free_memory()
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return self
        self._before = _status_bytes("VmRSS")
        self._armed = True
        return self

    def __exit__(self, *_: object) -> None:
        if self._armed:
            self.extra_bytes = max(0, _status_bytes("VmHWM") - self._before)


def _worker_main(spec: dict[str, Any]) -> None:
    freeze_startup_heap()  # as a peer process does (`gossamer train`, `gossamer peer start`)
    if spec.get("ifname"):
        os.environ["GLOO_SOCKET_IFNAME"] = spec["ifname"]
    rank, world = spec["rank"], spec["world"]
    store = _open_store(spec)
    torch.manual_seed(rank)
    tensor = torch.randn(spec["num_elements"])
    # the reference: plain torch.distributed, its default group; the averager holds its own
    dist.init_process_group(
        "gloo",
        store=PrefixStore("reference", store),
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=spec["timeout_s"]),
    )
    averager = TorchGroupAverager(timeout_s=spec["timeout_s"])
    averager.ensure_group("bench", [str(r) for r in range(world)], rank, store, spec["host"])
    backend = choose_backend(spec["backend"], [spec["host"]] * world)
    if backend == "torch":
        rows = _torch_rounds(averager, tensor, spec)
    else:
        rows = asyncio.run(_p2p_rounds(store, tensor, spec))
    rows["tcp_congestion_control"] = _congestion_control()
    rows["input_absmax"] = float(tensor.abs().max())  # (the scale of the error's tolerance)
    out = Path(spec["folder"]) / f"result-{rank}.json"
    out.write_text(json.dumps(rows))
    dist.barrier()
    averager.close()
    dist.destroy_process_group()


def _round_order(repeat: int, codecs: Sequence[str]) -> list[str | None]:
    """The rounds of repeat ``repeat`` in the order they are timed: ``None`` for gloo's, a
    codec's name for Gossamer's. Gloo goes first in even repeats and last in odd ones, so that
    neither side always has the place in a repeat that favours it (a control that timed gloo's
    same work twice, gloo first, read 1.08x at 100 MB and up to 1.48x at 20 MB)."""
    ours: list[str | None] = list(codecs)
    return [None, *ours] if repeat % 2 == 0 else [*ours, None]


def _worst_error(so_far: float, result: torch.Tensor, reference: torch.Tensor) -> float:
    """The larger of ``so_far`` and ``result``'s largest difference from ``reference``; inf
    once a difference is not finite (``max`` keeps the first of 0.0 and NaN: a NaN was lost)."""
    error = float((result - reference).abs().max())
    return max(so_far, error if math.isfinite(error) else math.inf)


@dataclass(slots=True)
class _GlooRound:
    seconds: float
    cpu_s: float
    sent: int
    extra_memory: int
    mean: torch.Tensor


def _gloo_round(tensor: torch.Tensor, ifname: str) -> _GlooRound:
    """Time, CPU time, uplink bytes and extra memory of gloo's all-reduce of ``tensor``, and
    its mean."""
    reference = tensor.clone()
    dist.barrier()
    with _ExtraMemory() as memory:  # the reset and reads stay outside the timing
        sent = _uplink_sent_bytes(ifname)
        cpu = time.process_time()
        started = time.perf_counter()
        dist.all_reduce(reference)
        reference /= dist.get_world_size()  # a mean, as Gossamer's rounds give: timed alike
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu
    sent = _uplink_sent_bytes(ifname) - sent
    return _GlooRound(seconds, cpu, sent, memory.extra_bytes, reference)


class _GlooRows:
    """Gloo's figures over the repeats, and the mean its latest round gave (the reference)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.cpu: list[float] = []
        self.link: list[int] = []
        self.memory = 0
        self.reference: torch.Tensor | None = None

    def add(self, done: _GlooRound) -> None:
        self.seconds.append(done.seconds)
        self.cpu.append(done.cpu_s)
        self.link.append(done.sent)
        self.memory = _most_memory(self.memory, done.extra_memory)
        self.reference = done.mean

    def mean(self) -> torch.Tensor:
        """Gloo's mean of the workers' tensors (the same in every repeat: the tensors are)."""
        assert self.reference is not None, "repeat 0 times gloo first"
        return self.reference

    def rows(self, codecs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {
            "gloo": self.seconds,
            "gloo_cpu": self.cpu,
            "gloo_link": self.link,
            "gloo_memory": self.memory,
            "codecs": codecs,
        }


def _torch_rounds(
    averager: TorchGroupAverager, tensor: torch.Tensor, spec: dict[str, Any]
) -> dict[str, Any]:
    gloo = _GlooRows()
    row: dict[str, Any] = {
        "seconds": [],
        "cpu": [],
        "wire": [],
        "error": 0.0,
        "link": [],
        "memory": 0,
    }
    ifname = spec["ifname"]
    for repeat in range(spec["repeats"]):
        for codec in _round_order(repeat, ["none"]):
            if codec is None:
                gloo.add(_gloo_round(tensor, ifname))
                continue
            work = tensor.clone()  # like gloo's reference: allocated before the clock starts
            dist.barrier()
            with _ExtraMemory() as extra:
                sent = _uplink_sent_bytes(ifname)
                cpu_start = time.process_time()
                started = time.perf_counter()
                report = averager.average_([work])
                row["seconds"].append(time.perf_counter() - started)
                row["cpu"].append(time.process_time() - cpu_start)
            row["memory"] = _most_memory(row["memory"], extra.extra_bytes)
            row["link"].append(_uplink_sent_bytes(ifname) - sent)
            row["wire"].append(report.bytes_sent)
            dist.barrier()  # every worker stopped its clock before the check takes CPU
            row["error"] = _worst_error(row["error"], work, gloo.mean())
            del work
    return gloo.rows({"none": row})


async def _p2p_rounds(
    store: TCPStore, tensor: torch.Tensor, spec: dict[str, Any]
) -> dict[str, Any]:
    rank, world = spec["rank"], spec["world"]
    limits = LimitsConfig(bulk_chunk_bytes=spec["bulk_chunk_bytes"])
    host = spec["host"]
    async with Node(NodeConfig(listen_address=f"{host}:0", limits=limits)) as node:
        store.set(f"node/{rank}", f"{node.peer_id}@{host}:{node.port}")
        entries = [store.get(f"node/{r}").decode() for r in range(world)]
        others = [e for r, e in enumerate(entries) if r != rank]
        await asyncio.wait_for(node.bootstrap(others), 60)
        members = [e.partition("@")[0] for e in entries]
        mailbox = CommMailbox(NetCommTransport(node), node.clock)
        gloo = _GlooRows()
        codecs: dict[str, dict[str, Any]] = {
            c: {
                "seconds": [],
                "cpu": [],
                "wire": [],
                "error": 0.0,
                "link": [],
                "memory": 0,
                "ring_left": [],
            }
            for c in spec["codecs"]
        }
        landing = tensor.clone()  # where averages land, allocated once like gloo's buffer
        # like a swarm peer's: its rounds measure its send rate, and before each round the
        # workers agree on the send rates they pick their order by (_agreed_rates)
        meter = BandwidthMeter()
        ifname = spec["ifname"]
        for repeat in range(spec["repeats"]):
            for codec in _round_order(repeat, spec["codecs"]):
                if codec is None:
                    gloo.add(await asyncio.to_thread(_gloo_round, tensor, ifname))
                    continue
                config = AllReduceConfig(
                    timeout_s=spec["timeout_s"],
                    codec=CodecPolicy(codec=codec),
                    chunk_elements=spec["chunk_elements"],
                )
                # Outside the clock: a round that leaves any value unwritten shows as NaN below,
                # not as the previous round's (right) average.
                landing.fill_(math.nan)
                rates = await asyncio.to_thread(
                    _agreed_rates, store, f"rates/{repeat}/{codec}", rank, world, meter
                )
                await asyncio.to_thread(dist.barrier)
                with _ExtraMemory() as extra:
                    sent = await asyncio.to_thread(_uplink_sent_bytes, ifname)
                    cpu_start = time.process_time()
                    started = time.perf_counter()
                    result = await all_reduce(
                        [tensor],
                        mailbox=mailbox,
                        members=members,
                        round_key=f"bench/{repeat}/{codec}",
                        config=config,
                        out=[landing],
                        meter=meter,
                        send_rates=rates,
                    )
                    elapsed = time.perf_counter() - started
                    cpu_s = time.process_time() - cpu_start
                # The check below allocates and scans the whole tensor: only once every worker
                # has stopped its clock, so it never takes CPU from a round still running.
                await asyncio.to_thread(dist.barrier)
                row = codecs[codec]
                row["memory"] = _most_memory(row["memory"], extra.extra_bytes)
                row["seconds"].append(elapsed)
                row["cpu"].append(cpu_s)
                if result.report.ring_left is not None:
                    row["ring_left"].append(result.report.ring_left)
                row["link"].append(await asyncio.to_thread(_uplink_sent_bytes, ifname) - sent)
                row["wire"].append(result.report.bytes_sent)
                row["error"] = _worst_error(row["error"], result.tensors[0], gloo.mean())
        await asyncio.to_thread(dist.barrier)  # nobody stops its node while others still send
        return gloo.rows(codecs)


def _agreed_rates(
    store: TCPStore, key: str, rank: int, world: int, meter: BandwidthMeter
) -> SendRates:
    """The send rates the workers pick their send order by, agreed as a swarm's members agree
    on them (each publishes its meter's figures; all take :func:`agreed_send_rates` of them)."""
    store.set(f"{key}/{rank}", json.dumps([meter.estimate_bytes_per_s, meter.floor_bytes_per_s]))
    figures = [json.loads(store.get(f"{key}/{r}")) for r in range(world)]
    return agreed_send_rates([f[0] for f in figures], [f[1] for f in figures])


# ---- driver side ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Placement:
    hosts: list[str]
    ifnames: list[str]
    wrap: list[list[str]]


@contextlib.contextmanager
def _placement(
    peers: int,
    rate_bits_per_s: float | None,
    peer_rates: Sequence[int] | None,
    tcp_congestion_control: str = "",
) -> Iterator[_Placement]:
    if rate_bits_per_s is None and not peer_rates:
        yield _Placement(["127.0.0.1"] * peers, [""] * peers, [[] for _ in range(peers)])
        return
    from gossamer.lab import LabConfig, open_lab  # root only; the loopback run never needs it

    config = LabConfig(
        num_peers=peers,
        rate_bps=int(rate_bits_per_s or max(peer_rates or [1])),
        peer_rates_bps=tuple(peer_rates or ()),
        name=f"ar{secrets.token_hex(3)}",
        tcp_congestion_control=tcp_congestion_control,
    )
    # (its pid recorded: a driver killed outright leaves the lab, removed at the next run)
    with open_lab(config, owner_pid=os.getpid()) as lab:
        nodes = lab.topology.peers
        yield _Placement(
            [p.address for p in nodes],
            [next(e.device for e in p.shaped_ends if e.namespace == p.namespace) for p in nodes],
            [["ip", "netns", "exec", p.namespace] for p in nodes],
        )


class BenchWorkerError(FatalError):
    """A benchmark worker process failed, was killed, or the run ran past its time."""


def _run_workers(placement: _Placement, options: dict[str, Any]) -> list[dict[str, Any]]:
    peers = len(placement.hosts)
    with tempfile.TemporaryDirectory(prefix=_FOLDER_PREFIX) as folder:
        _write_driver(Path(folder))
        processes = []
        try:
            for rank in range(peers):
                spec = dict(options, rank=rank, world=peers, folder=folder, driver_pid=os.getpid(),
                            host=placement.hosts[rank], ifname=placement.ifnames[rank])  # fmt: skip
                argv = [*placement.wrap[rank], sys.executable, "-m", "gossamer.bench.allreduce",
                        json.dumps(spec)]  # fmt: skip
                log = Path(folder) / f"worker-{rank}.log"
                with log.open("wb") as sink:
                    processes.append(subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT))
            ended = _wait_for_workers(processes, options["budget_s"])
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait(timeout=10)
        results = [Path(folder) / f"result-{rank}.json" for rank in range(peers)]
        failed = [
            r for r in range(peers) if processes[r].returncode != 0 or not results[r].exists()
        ]
        if failed:
            raise _worker_failure(processes, ended, failed, Path(folder), options["budget_s"])
        return [json.loads(result.read_text()) for result in results]


def _write_driver(folder: Path) -> None:
    """Record in a run's folder which process made it (see :func:`remove_abandoned_runs`)."""
    pid = os.getpid()
    staged = folder / f"{_DRIVER_FILE}.tmp"
    staged.write_text(json.dumps({"pid": pid, "start_ticks": process_start_ticks(pid)}))
    staged.rename(folder / _DRIVER_FILE)


def _abandoned(folder: Path) -> bool:
    """Whether a run's folder outlived the driver that made it; False where that cannot be
    told (no record yet: a run starting now, or a run of a version that wrote none)."""
    try:
        driver = json.loads((folder / _DRIVER_FILE).read_text())
        return process_ended(int(driver["pid"]), driver.get("start_ticks"))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def remove_abandoned_runs(*, labs: bool, temp_dir: Path | None = None) -> str | None:
    """Remove what runs of this benchmark left when their driver was killed outright (SIGKILL
    leaves it no say; its workers end with it): their temporary folders, and with ``labs``
    (root) their labs, namespaces and records. Returns one line naming what was removed, None
    where nothing was. (`gossamer lab down --all` removes every lab by hand.)

    Args:
        labs: look for labs too (a run with ``--rate``: needs root and the lab's tools).
        temp_dir: where runs make their folders; the system's temporary folder by default.

    Raises:
        MissingDependencyError: with ``labs``, not root or a lab tool missing.
    """
    removed = []
    if labs:
        from gossamer.lab import remove_abandoned_labs  # root only, as the lab itself

        removed += [f"lab {name}" for name in remove_abandoned_labs()]
    base = temp_dir or Path(tempfile.gettempdir())
    for folder in sorted(base.glob(f"{_FOLDER_PREFIX}*")):
        if folder.is_dir() and _abandoned(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(f"folder {folder}")
    if not removed:
        return None
    return f"removed what killed benchmark runs left behind: {', '.join(removed)}"


def _wait_for_workers(processes: Sequence[subprocess.Popen[bytes]], budget_s: float) -> list[float]:
    """Wait for every worker, at most ``budget_s``; once one fails, the others only a moment
    (they fail at their next message to it, or wait in the store or gloo for their timeout).

    Returns:
        When each worker ended (monotonic; inf for one still running, stopped by the caller).
    """
    deadline = time.monotonic() + budget_s
    ended = [math.inf] * len(processes)
    first_failure = math.inf
    while True:
        now = time.monotonic()
        for rank, process in enumerate(processes):
            if ended[rank] == math.inf and process.poll() is not None:
                ended[rank] = now
                if process.returncode != 0:
                    first_failure = min(first_failure, now)
        if all(t < math.inf for t in ended) or now > min(deadline, first_failure + _GRACE_S):
            return ended
        time.sleep(0.02)  # (workers seen ending in the same poll count as together)


def _worker_failure(
    processes: Sequence[subprocess.Popen[bytes]],
    ended: Sequence[float],
    failed: Sequence[int],
    folder: Path,
    budget_s: float,
) -> BenchWorkerError:
    """The error that names the worker that failed first (the others failed for want of it),
    with the end of its log."""
    if all(ended[r] == math.inf for r in failed):
        return BenchWorkerError(
            f"the benchmark ran past its {budget_s:.0f} s and was stopped (workers "
            f"{', '.join(map(str, failed))} still running); give fewer --repeats or a smaller "
            "--size, or check that nothing else holds this machine's CPUs"
        )
    first = min(ended[r] for r in failed)
    together = [r for r in failed if ended[r] == first]  # (seen ending in the same poll)
    # Of those, one killed by a signal is the cause: the others failed for want of it.
    rank = min(together, key=lambda r: (_exit_code(processes[r]) >= 0, r))
    code = _exit_code(processes[rank])
    how = (
        f"was killed by {signal.Signals(-code).name}"
        if code < 0 and -code in signal.valid_signals()
        else f"exited with {code}"
    )
    also = [r for r in together if r != rank]
    if also:
        how += f" (and worker{'s' * (len(also) > 1)} {', '.join(map(str, also))} with it)"
    log = (folder / f"worker-{rank}.log").read_text(errors="replace").strip().splitlines()
    tail = "\n".join(f"  | {line}" for line in log[-_LOG_TAIL_LINES:]) or "  | (no output)"
    return BenchWorkerError(f"benchmark worker {rank} {how}; the end of its output:\n{tail}")


def _exit_code(process: subprocess.Popen[bytes]) -> int:
    code = process.returncode
    return 0 if code is None else code


def check_fits_in_memory(peers: int, size_bytes: int) -> None:
    """Refuse a run whose workers would not fit in this machine's available memory."""
    need = peers * (_TENSORS_PER_WORKER * size_bytes + _WORKER_BASE_BYTES)
    available = _available_memory_bytes()
    if available is not None and need > available:
        raise ValueError(
            f"{peers} workers of {size_bytes / 1e9:.2f} GB would need about {need / 1e9:.1f} GB "
            f"of memory ({_TENSORS_PER_WORKER} copies of the tensor and "
            f"{_WORKER_BASE_BYTES / 1e9:.1f} GB of Python and torch each), and this machine has "
            f"{available / 1e9:.1f} GB available: give a smaller --size or fewer --peers"
        )


def _available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def run_allreduce_sweep(
    *,
    peers: int,
    size_bytes: int,
    codecs: Sequence[str] = ("none",),
    backend: str = "auto",
    rate_bits_per_s: float | None = None,
    peer_rates_bps: Sequence[int] | None = None,
    chunk_elements: int | None = None,
    bulk_chunk_bytes: int = LimitsConfig().bulk_chunk_bytes,
    repeats: int = 3,
    tcp_congestion_control: str = "",
) -> list[AllReduceBenchResult]:
    """Run the benchmark once for several codecs (same processes, same links, same run).

    With ``rate_bits_per_s`` (or per-peer rates) the peers run in a lab (root); else on
    loopback. The torch backend has no codecs: it runs ``none`` only. ``tcp_congestion_control``
    sets the lab namespaces' (empty: the host's default; loopback always has the host's).
    """
    if tcp_congestion_control and rate_bits_per_s is None and not peer_rates_bps:
        raise ValueError(
            "--tcp-congestion applies to lab links only: give --rate too (loopback uses the "
            "host's net.ipv4.tcp_congestion_control)"
        )
    if peers < 2:
        raise ValueError("--peers must be at least 2")
    if repeats < 1:
        raise ValueError("--repeats must be at least 1")
    if peers > MAX_PEERS:
        raise ValueError(f"--peers is at most {MAX_PEERS} (worker processes on this machine)")
    codecs = list(codecs)
    if backend == "auto" and codecs != ["none"]:
        backend = "p2p"  # (as a swarm round decides: torch.distributed cannot compress)
    # (the workers meet on loopback or on the lab's private links: auto picks torch there)
    resolved = choose_backend(backend, ["127.0.0.1"] * peers)
    if resolved == "torch" and codecs != ["none"]:
        raise ValueError("the torch backend averages fp32 only; use --backend p2p for codecs")
    num_elements = max(1, size_bytes // 4)
    check_fits_in_memory(peers, 4 * num_elements)
    ring_bytes = 2 * (peers - 1) * 4 * num_elements / peers
    slowest = min(peer_rates_bps) if peer_rates_bps else rate_bits_per_s
    round_s = ring_bytes * 8 / slowest if slowest else ring_bytes / _SLOWEST_LOOPBACK_BYTES_PER_S
    # (all workers import torch and meet at once: on 2 cores that takes longer with more)
    timeout_s = max(_MIN_TIMEOUT_S + _START_S_PER_WORKER * peers, 4 * round_s)
    options = {
        "timeout_s": timeout_s,
        # (a gloo round and one per codec in each repeat, each allowed twice the bound's time)
        "budget_s": _STARTUP_S + repeats * (1 + len(codecs)) * 2 * round_s + timeout_s,
        "num_elements": num_elements,
        "codecs": codecs,
        "backend": backend,
        "chunk_elements": chunk_elements,
        "bulk_chunk_bytes": bulk_chunk_bytes,
        "repeats": repeats,
    }
    with _placement(peers, rate_bits_per_s, peer_rates_bps, tcp_congestion_control) as placement:
        rows = _run_workers(placement, options)
    aes_rate = None if resolved == "torch" else aes_gcm_bytes_per_s()
    real_size = 4 * num_elements
    rate = rate_bits_per_s or (min(peer_rates_bps) if peer_rates_bps else None)
    bound = ring_bytes * 8 / rate if rate else None
    gloo_each = [max(r["gloo"][i] for r in rows) for i in range(repeats)]
    gloo_s = statistics.median(gloo_each)
    caps = list(peer_rates_bps) if peer_rates_bps else [rate] * peers if rate else None
    input_absmax = max(float(r["input_absmax"]) for r in rows)
    results = []
    for codec in codecs:
        each = [max(r["codecs"][codec]["seconds"][i] for r in rows) for i in range(repeats)]
        seconds = statistics.median(each)
        speedup, speedup_range = _paired_speedup(gloo_each, each)
        # (the peers' mean: members that picked different send orders share the bytes unevenly)
        wire, busiest = _wire_per_peer([r["codecs"][codec]["wire"] for r in rows])
        results.append(
            AllReduceBenchResult(
                peers=peers,
                size_bytes=real_size,
                codec=codec,
                backend=resolved,
                rate_bits_per_s=rate,
                seconds=seconds,
                gloo_seconds=gloo_s,
                speedup_vs_gloo=speedup,
                speedup_vs_gloo_range=speedup_range,
                algorithm_bandwidth_bytes_per_s=real_size / seconds,
                # (a compressing codec's round sends fewer bytes than the bound counts)
                share_of_bound=bound / seconds if bound and codec == "none" else None,
                gloo_share_of_bound=bound / gloo_s if bound else None,
                ring_bound_seconds=bound,
                wire_bytes_per_peer=wire,
                header_overhead=wire / ring_bytes - 1.0,
                max_abs_error_vs_gloo=max(float(r["codecs"][codec]["error"]) for r in rows),
                repeats=repeats,
                all_seconds=each,
                all_gloo_seconds=gloo_each,
                uplink_utilization=_utilization(
                    [r["codecs"][codec]["link"] for r in rows], each, caps
                ),
                gloo_uplink_utilization=_utilization(
                    [r["gloo_link"] for r in rows], gloo_each, caps
                ),
                peak_extra_memory_ratio=_memory_ratio(
                    [r["codecs"][codec]["memory"] for r in rows], real_size
                ),
                gloo_peak_extra_memory_ratio=_memory_ratio(
                    [r["gloo_memory"] for r in rows], real_size
                ),
                tcp_congestion_control=",".join(
                    sorted({str(r.get("tcp_congestion_control", "")) for r in rows})
                ),
                aes_gcm_bytes_per_s=aes_rate,
                tls_floor_cpu_seconds_per_peer=(
                    2 * wire / aes_rate if aes_rate is not None else None
                ),
                cpu_seconds_per_peer=_cpu_per_peer([r["codecs"][codec]["cpu"] for r in rows]),
                gloo_cpu_seconds_per_peer=_cpu_per_peer([r["gloo_cpu"] for r in rows]),
                ring_left=dict(
                    collections.Counter(
                        why for r in rows for why in r["codecs"][codec].get("ring_left", [])
                    )
                ),
                busiest_peer_wire_bytes=busiest,
                error_tolerance=error_tolerance(codec, input_absmax),
            )
        )
    return results


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


def aes_gcm_bytes_per_s(total_bytes: int = 64 << 20, record_bytes: int = 16 << 10) -> float:
    """AES-128-GCM's speed on this machine: bytes encrypted and then decrypted per second, in
    records of ``record_bytes`` (TLS's largest is 16 KiB), on one core."""
    cipher = AESGCM(AESGCM.generate_key(bit_length=128))
    record = os.urandom(record_bytes)
    count = max(1, total_bytes // record_bytes)
    started = time.perf_counter()
    for i in range(count):
        nonce = i.to_bytes(12, "little")
        cipher.decrypt(nonce, cipher.encrypt(nonce, record, None), None)
    return 2 * count * record_bytes / (time.perf_counter() - started)


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


def run_allreduce_bench(
    *,
    peers: int,
    size_bytes: int,
    codec: str = "none",
    backend: str = "auto",
    rate_bits_per_s: float | None = None,
    chunk_elements: int | None = None,
    repeats: int = 1,
) -> AllReduceBenchResult:
    """Run the benchmark for one codec and return its figures (see :func:`run_allreduce_sweep`)."""
    (result,) = run_allreduce_sweep(
        peers=peers,
        size_bytes=size_bytes,
        codecs=[codec],
        backend=backend,
        rate_bits_per_s=rate_bits_per_s,
        chunk_elements=chunk_elements,
        repeats=repeats,
    )
    return result


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


def _end_with_the_driver(driver_pid: int) -> None:
    """Have the kernel kill this worker when the driver that started it ends (Linux): a driver
    killed outright (SIGKILL) cannot stop its workers itself."""
    with contextlib.suppress(OSError, AttributeError):  # (the C library's symbols, as loaded)
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != driver_pid:  # it ended before the request took hold
        os._exit(1)


def _main() -> None:
    spec = json.loads(sys.argv[1])
    _end_with_the_driver(spec["driver_pid"])
    try:
        _worker_main(spec)
    except BaseException:
        traceback.print_exc()
        raise


if __name__ == "__main__":
    _main()
