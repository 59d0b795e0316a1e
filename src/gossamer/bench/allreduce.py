"""``gossamer bench allreduce``: Gossamer's averaging against plain gloo, same tensor, same run.

N worker processes each hold a random float32 tensor of the given size. On loopback they run
as plain processes; with a rate (``--rate``, root) each runs inside its own lab namespace behind
a tbf-capped link (``gossamer.lab``). In one run, repeated ``repeats`` times with a barrier
before each timing, every worker times plain ``torch.distributed`` gloo ``all_reduce`` of its
tensor (the reference) and Gossamer's averaging of the same tensor for each codec asked for
(``p2p``: comm over net's TLS gRPC bulk streams; ``torch``: the torch.distributed backend, in
place like gloo; ``auto``: torch where every member is directly reachable). Gloo goes first in
even repeats and last in odd ones (:func:`~gossamer.bench.allreduce_worker._round_order`):
whatever favours a round's place in a repeat (caches, a link's queue, the machine's load as it
changes) does not always favour gloo.
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

This module is the driver. Each worker process runs :mod:`gossamer.bench.allreduce_worker`;
the figures, how they are judged and how they are written and shown are
:mod:`gossamer.bench.allreduce_results` (its public names are importable from here too).
"""

from __future__ import annotations

import collections
import contextlib
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gossamer.bench.allreduce_results import (
    NOISY_SPREAD,
    AllReduceBenchResult,
    _cpu_per_peer,
    _memory_ratio,
    _paired_speedup,
    _utilization,
    _wire_per_peer,
    error_tolerance,
    write_throughput_plot,
)
from gossamer.comm.torch_backend import choose_backend
from gossamer.core.errors import FatalError
from gossamer.lab.config import MAX_PEERS
from gossamer.lab.state import pid_namespace, process_ended, process_start_ticks
from gossamer.net.config import LimitsConfig

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
_TENSORS_PER_WORKER = 5
"""The tensor, gloo's copy, the buffer averages land in, and what a round adds (up to 1.6x)."""
_WORKER_BASE_BYTES = 400_000_000
"""A worker's memory before its tensors (Python, torch, gRPC)."""
_FOLDER_PREFIX = "gossamer-bench-"
"""How a run's temporary folder is named (then a random part)."""
_DRIVER_FILE = "driver.json"
"""In a run's temporary folder: the pid and start time of the driver that made it."""


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
                argv = [*placement.wrap[rank], sys.executable, "-m",
                        "gossamer.bench.allreduce_worker", json.dumps(spec)]  # fmt: skip
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
    record = {"pid": pid, "start_ticks": process_start_ticks(pid), "pid_namespace": pid_namespace()}
    staged.write_text(json.dumps(record))
    staged.rename(folder / _DRIVER_FILE)


def _abandoned(folder: Path) -> bool:
    """Whether a run's folder outlived the driver that made it; False where that cannot be
    told (no record yet: a run starting now, or a run of a version that wrote none)."""
    try:
        driver = json.loads((folder / _DRIVER_FILE).read_text())
        return process_ended(
            int(driver["pid"]), driver.get("start_ticks"), driver.get("pid_namespace")
        )
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
