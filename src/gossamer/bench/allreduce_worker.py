"""One worker process of ``gossamer bench allreduce`` (run as a module by its driver).

The driver (:mod:`gossamer.bench.allreduce`) starts one of these per peer, on loopback or inside
the peer's lab namespace, with a JSON spec as the only argument. The worker opens (rank 0) or
joins the rendezvous ``TCPStore`` through the run's folder, makes its random float32 tensor, and
in each repeat times plain gloo ``all_reduce`` of it (the reference) and Gossamer's averaging of
the same tensor for each codec asked for, in the order :func:`_round_order` gives. Around each
timing it reads its CPU time, its uplink's tbf counter (with a rate) and the resident memory the
round added (:class:`_ExtraMemory`), and checks the round's result against gloo's mean. Its
figures go back to the driver as ``result-<rank>.json`` in the run's folder; the driver turns
them into an :class:`~gossamer.bench.allreduce_results.AllReduceBenchResult`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime
import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, TCPStore

from gossamer.bench.allreduce_results import _most_memory
from gossamer.comm.allreduce import AllReduceConfig, all_reduce
from gossamer.comm.bandwidth import BandwidthMeter, SendRates, agreed_send_rates
from gossamer.comm.codecs import CodecPolicy
from gossamer.comm.net_transport import NetCommTransport
from gossamer.comm.torch_backend import TorchGroupAverager, choose_backend
from gossamer.comm.transport import CommMailbox
from gossamer.core.runtime import freeze_startup_heap
from gossamer.net.config import LimitsConfig, NodeConfig
from gossamer.net.node import Node

_PR_SET_PDEATHSIG = 1


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
    # (every rank has its mean: what this one sent has left its queue. Read at its own return,
    # gloo's counted 0.5-1.5% less than it sent, where Gossamer's are read after a barrier)
    dist.barrier()
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


def _new_row() -> dict[str, Any]:
    """One backend's figures over the repeats, empty: per repeat its time, CPU, wire and link
    bytes; over them the worst error and the most extra memory."""
    return {"seconds": [], "cpu": [], "wire": [], "error": 0.0, "link": [], "memory": 0}


def _torch_rounds(
    averager: TorchGroupAverager, tensor: torch.Tensor, spec: dict[str, Any]
) -> dict[str, Any]:
    gloo = _GlooRows()
    row = _new_row()
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
            # (every worker stopped its clock before the check takes CPU, and what this one
            # sent has left its queue before its link is read, as with gloo's)
            dist.barrier()
            row["link"].append(_uplink_sent_bytes(ifname) - sent)
            row["wire"].append(report.bytes_sent)
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
            c: dict(_new_row(), ring_left=[]) for c in spec["codecs"]
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
