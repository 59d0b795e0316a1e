"""``gossamer bench allreduce``: Gossamer's averaging against plain gloo, same tensor, same run.

N worker processes on loopback each hold a random float32 tensor of the given size. In one run
they time, with a barrier before each: plain ``torch.distributed`` gloo ``all_reduce`` (the
reference), then Gossamer's averaging on the chosen backend (``p2p``: comm over net's TLS gRPC
bulk streams; ``torch``: the torch.distributed backend; ``auto``: torch where every member is
directly reachable, which on loopback it is). A figure is the slowest worker's time.

The ring bound is ``2(N-1)/N * size / rate``; it needs a link rate (``--rate``), which needs the
lab (namespaces, root). Header overhead is reported separately: the bytes Gossamer sent over the
bytes the ring bound counts.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import multiprocessing
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import TCPStore

from gossamer.comm.allreduce import AllReduceConfig, all_reduce
from gossamer.comm.codecs import CodecPolicy
from gossamer.comm.net_transport import NetCommTransport
from gossamer.comm.torch_backend import TorchGroupAverager, choose_backend
from gossamer.comm.transport import CommMailbox
from gossamer.net.config import LimitsConfig, NodeConfig
from gossamer.net.node import Node

__all__ = ["AllReduceBenchResult", "run_allreduce_bench"]

_TIMEOUT_S = 600.0


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
    algorithm_bandwidth_bytes_per_s: float
    share_of_bound: float | None
    ring_bound_seconds: float | None
    wire_bytes_per_peer: int
    header_overhead: float
    max_abs_error_vs_gloo: float

    def to_json(self) -> str:
        """The result as one JSON object."""
        return json.dumps(asdict(self), indent=2)

    def table(self) -> str:
        """A human-readable summary."""
        bound = "n/a (no --rate)" if self.share_of_bound is None else f"{self.share_of_bound:.1%}"
        return "\n".join(
            [
                f"all-reduce of {self.size_bytes / 1e6:.1f} MB over {self.peers} peers "
                f"(backend {self.backend}, codec {self.codec})",
                f"  gossamer      {self.seconds:8.3f} s  "
                f"({self.algorithm_bandwidth_bytes_per_s / 1e6:.1f} MB/s algorithm bandwidth)",
                f"  gloo          {self.gloo_seconds:8.3f} s",
                f"  speedup       {self.speedup_vs_gloo:8.2f}x vs gloo",
                f"  ring bound    {bound}",
                f"  wire bytes    {self.wire_bytes_per_peer} per peer "
                f"({self.header_overhead:+.2%} vs the ring bound's bytes, headers included)",
                f"  max |error|   {self.max_abs_error_vs_gloo:.2e} vs gloo's mean",
            ]
        )


def _worker(rank: int, world: int, port: int, options: dict[str, Any]) -> None:
    store = TCPStore(
        "127.0.0.1", port, world, is_master=False, timeout=datetime.timedelta(seconds=_TIMEOUT_S)
    )
    torch.manual_seed(rank)
    tensor = torch.randn(options["num_elements"])
    averager = TorchGroupAverager(timeout_s=_TIMEOUT_S)
    averager.ensure_group("bench", [str(r) for r in range(world)], rank, store)
    reference = tensor.clone()
    dist.barrier()
    started = time.perf_counter()
    dist.all_reduce(reference)
    gloo_s = time.perf_counter() - started
    reference /= world
    backend = choose_backend(options["backend"], ["127.0.0.1"] * world)
    if backend == "torch":
        dist.barrier()
        started = time.perf_counter()
        result = averager.average([tensor])
        seconds = time.perf_counter() - started
        wire = result.report.bytes_sent
        averaged = result.tensors[0]
    else:
        seconds, wire, averaged = asyncio.run(_p2p(rank, world, store, tensor, options))
    error = float((averaged - reference).abs().max())
    store.set(f"result/{rank}", json.dumps([gloo_s, seconds, wire, error]))
    dist.barrier()
    averager.close()


async def _p2p(
    rank: int, world: int, store: TCPStore, tensor: torch.Tensor, options: dict[str, Any]
) -> tuple[float, int, torch.Tensor]:
    limits = LimitsConfig(max_message_bytes=32 << 20, bulk_chunk_bytes=4 << 20)
    async with Node(NodeConfig(listen_address="127.0.0.1:0", limits=limits)) as node:
        store.set(f"node/{rank}", f"{node.peer_id}@127.0.0.1:{node.port}")
        entries = [store.get(f"node/{r}").decode() for r in range(world)]
        others = [e for r, e in enumerate(entries) if r != rank]
        await asyncio.wait_for(node.bootstrap(others), 60)
        members = [e.partition("@")[0] for e in entries]
        mailbox = CommMailbox(NetCommTransport(node), node.clock)
        config = AllReduceConfig(
            timeout_s=_TIMEOUT_S,
            codec=CodecPolicy(codec=options["codec"]),
            chunk_elements=options["chunk_elements"],
        )
        await asyncio.to_thread(dist.barrier)
        started = time.perf_counter()
        result = await all_reduce(
            [tensor], mailbox=mailbox, members=members, round_key="bench/1", config=config
        )
        seconds = time.perf_counter() - started
        await asyncio.to_thread(dist.barrier)  # nobody stops its node while others still send
        return seconds, result.report.bytes_sent, result.tensors[0]


def run_allreduce_bench(
    *,
    peers: int,
    size_bytes: int,
    codec: str = "none",
    backend: str = "auto",
    rate_bits_per_s: float | None = None,
    chunk_elements: int = 1 << 20,
) -> AllReduceBenchResult:
    """Run the benchmark on loopback and return its figures.

    Raises:
        NotImplementedError: ``rate_bits_per_s`` was given (lab runs are not wired in yet).
    """
    if rate_bits_per_s is not None:
        raise NotImplementedError(
            "--rate needs the benchmark to run its peers in lab namespaces; not wired in yet. "
            "Run without --rate for loopback figures."
        )
    if peers < 2:
        raise ValueError("--peers must be at least 2")
    num_elements = max(1, size_bytes // 4)
    options = {
        "num_elements": num_elements,
        "codec": codec,
        "backend": backend,
        "chunk_elements": chunk_elements,
    }
    store = TCPStore(
        "127.0.0.1",
        0,
        peers + 1,
        is_master=True,
        timeout=datetime.timedelta(seconds=_TIMEOUT_S),
        wait_for_workers=False,
    )
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_worker, args=(rank, peers, store.port, options), daemon=True)
        for rank in range(peers)
    ]
    for worker in workers:
        worker.start()
    try:
        rows = [json.loads(store.get(f"result/{rank}")) for rank in range(peers)]
        for worker in workers:
            worker.join(timeout=60)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=10)
    gloo_s = max(r[0] for r in rows)
    seconds = max(r[1] for r in rows)
    wire = max(int(r[2]) for r in rows)
    real_size = 4 * num_elements
    ring_bytes = 2 * (peers - 1) * real_size / peers
    return AllReduceBenchResult(
        peers=peers,
        size_bytes=real_size,
        codec=codec,
        backend=choose_backend(backend, ["127.0.0.1"] * peers),
        rate_bits_per_s=None,
        seconds=seconds,
        gloo_seconds=gloo_s,
        speedup_vs_gloo=gloo_s / seconds,
        algorithm_bandwidth_bytes_per_s=real_size / seconds,
        share_of_bound=None,
        ring_bound_seconds=None,
        wire_bytes_per_peer=wire,
        header_overhead=wire / ring_bytes - 1.0,
        max_abs_error_vs_gloo=max(float(r[3]) for r in rows),
    )
