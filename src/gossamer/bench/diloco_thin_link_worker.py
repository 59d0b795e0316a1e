"""One peer process of the thin-link benchmark (run as a module by its driver).

The driver (:mod:`gossamer.bench.diloco_thin_link`) starts one of these per peer inside the
peer's lab namespace, with a JSON spec as the only argument. The peer trains with its method:

- ``diloco``: :func:`gossamer.train.swarm.run_swarm_peer` with ``swarm.strategy = diloco``,
  exactly what ``gossamer train --swarm.strategy diloco`` runs;
- ``sync``: Gossamer's :class:`~gossamer.train.sync.SyncStrategy` over the
  :class:`~gossamer.train.swarm_averager.SwarmAverager`, in the same :class:`Trainer`;
- ``ddp``: the reference, a plain PyTorch loop around ``DistributedDataParallel`` on gloo, with
  the same model, initial weights, optimizer, learning-rate schedule and validation batches;
  ``ddp_fp16`` the same with PyTorch's ``fp16_compress_hook``.

Peers meet through files in a shared folder (namespaces share the file system, not the network):
peer 0 writes its address; every peer writes ``ready`` once it is set up and waits for the
driver's ``go``, so every method's clock starts with all its peers ready. Each evaluation appends
a JSON line (wall time, step, loss, seconds spent per phase so far) to the peer's log, so the
driver reads progress live and loses nothing when it stops the peers at the target.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._C._distributed_c10d import TCPStore
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook
from torch.nn.parallel import DistributedDataParallel

from gossamer.core.config import RunConfig
from gossamer.core.config_loader import load_run_config
from gossamer.core.runtime import freeze_startup_heap
from gossamer.data import TokenStream, load_corpus, validation_batches
from gossamer.models import GPT
from gossamer.net.bridge import NodeThread
from gossamer.net.identity import Identity, load_or_create_identity
from gossamer.obs.trace import Span, SpanRecorder
from gossamer.train.inference import mean_validation_loss
from gossamer.train.loop import Trainer
from gossamer.train.optim import build_optimizer, learning_rate_at
from gossamer.train.run_events import TrainingListener
from gossamer.train.swarm import (
    run_swarm_peer,
    stream_seed_of,
    swarm_averager_config,
    swarm_node_config,
)
from gossamer.train.swarm_averager import SwarmAverager
from gossamer.train.sync import SyncStrategy

_WAIT_S = 120.0
"""Longest a peer waits for the rendezvous files (peer 0's address, the driver's go)."""
_DIST_TIMEOUT_S = 600.0


def _wait_for_file(path: Path, what: str) -> str:
    deadline = time.monotonic() + _WAIT_S
    while not path.exists():  # the writer renames the file into place: no partial reads
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not appear in {_WAIT_S:.0f} s ({path})")
        time.sleep(0.05)
    return path.read_text()


def _write_atomically(path: Path, text: str) -> None:
    staged = path.with_name(f".{path.name}.tmp")
    staged.write_text(text)
    staged.rename(path)


class _PhaseClock:
    """Seconds per span name (compute, communication, evaluation, ...) since the go signal; each
    span counts its own time, so the phases add up to the time spent in spans."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}
        self.counting = False

    def sink(self, span: Span) -> None:
        if not self.counting:
            return
        with self._lock:
            # own time: a round's waiting and all-reduce nest in the hook's span, counted once
            self.seconds[span.name] = self.seconds.get(span.name, 0.0) + span.own_s

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self.seconds)


class _EvalLog:
    """The peer's side of the rendezvous and its JSON-lines evaluation log."""

    def __init__(self, spec: dict[str, Any], phases: _PhaseClock) -> None:
        self.folder = Path(spec["folder"])
        self.tag = f"{spec['method']}-{spec['rank']}"
        self.method = spec["method"]
        self.phases = phases
        self.path = self.folder / f"evals-{self.tag}.jsonl"
        self.go_unix_s = 0.0
        self.group_size: Callable[[], int | None] = lambda: None

    def ready_then_wait_for_go(self) -> None:
        _write_atomically(self.folder / f"ready-{self.tag}", str(os.getpid()))
        self.go_unix_s = float(_wait_for_file(self.folder / f"go-{self.method}", "the go signal"))
        self.phases.counting = True

    def record(self, step: int, val_loss: float) -> None:
        row = {
            "unix_s": time.time(),
            "step": step,
            "val_loss": val_loss,
            "phases_s": self.phases.snapshot(),
            "group_size": self.group_size(),
        }
        with self.path.open("a") as out:
            out.write(json.dumps(row) + "\n")


class _BenchListener(TrainingListener):
    def __init__(self, log: _EvalLog) -> None:
        self.log = log

    def on_start(self, *, start_step: int, max_steps: int, num_parameters: int) -> None:
        self.log.ready_then_wait_for_go()  # set up and joined: the method's clock starts at go

    def on_eval(self, *, step: int, val_loss: float) -> None:
        self.log.record(step, val_loss)


def _rank_identity(rank: int) -> Identity:
    """Rank ``rank``'s identity, the same in every method and every run of the bench.

    A swarm peer's data order follows its peer id (:func:`stream_seed_of`), so fixed ids give
    every run the same batches per rank, and DDP's rank reads the same stream as the swarm
    peers' rank: every method trains on the same data, and the time to the target does not
    move from run to run with random ids' data orders.
    """
    return Identity.from_private_bytes(
        hashlib.sha256(f"gossamer.bench.thin_link/{rank}".encode()).digest()
    )


def _rank_key_file(spec: dict[str, Any]) -> Path:
    """The key file of :func:`_rank_identity` for this worker's rank (written once)."""
    path = Path(spec["folder"]) / f"peer-{spec['rank']}.key"
    if not path.exists():
        staged = path.with_name(f".{path.name}.tmp")
        with os.fdopen(os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(_rank_identity(spec["rank"]).private_pem())
        staged.rename(path)
    return path


def _swarm_config(spec: dict[str, Any], bootstrap: str) -> RunConfig:
    checkpoints = Path(spec["folder"]) / f"checkpoints-{spec['method']}-{spec['rank']}"
    overrides = [
        *[tuple(pair) for pair in spec["overrides"]],
        ("swarm.strategy", "diloco" if spec["method"].startswith("diloco") else spec["method"]),
        ("swarm.overlap", "true" if spec["method"] == "diloco_overlap" else "false"),
        ("swarm.listen", f"{spec['host']}:0"),
        ("swarm.bootstrap", bootstrap),
        ("checkpoint.directory", str(checkpoints)),
        ("swarm.key_file", str(_rank_key_file(spec))),
    ]
    return load_run_config(None, overrides)


def _bootstrap_address(spec: dict[str, Any]) -> str:
    if spec["rank"] == 0:
        return ""
    return _wait_for_file(Path(spec["folder"]) / f"address-{spec['method']}", "peer 0's address")


def _publish_address(spec: dict[str, Any], address: str) -> None:
    if spec["rank"] == 0:
        _write_atomically(Path(spec["folder"]) / f"address-{spec['method']}", address)


def _run_diloco(spec: dict[str, Any], config: RunConfig) -> None:
    phases = _PhaseClock()
    log = _EvalLog(spec, phases)
    config = _swarm_config(spec, _bootstrap_address(spec))
    run_swarm_peer(
        config,
        listener=_BenchListener(log),
        spans=SpanRecorder(peer=log.tag, sinks=[phases.sink]),
        on_address=lambda address: _publish_address(spec, address),
    )


def _run_sync(spec: dict[str, Any], config: RunConfig) -> None:
    """Gossamer's sync strategy over the swarm averager, as a member of the run.

    ``run_swarm_peer`` with ``swarm.strategy = sync`` makes a peer with a bootstrap address join
    elastically: at a later step, with the others' weights and optimizer state. Here every peer
    starts at step 0 from the same weights (the clock starts at go, before any step), so each
    joins the run as a member at once, with the same node and round settings.
    """
    phases = _PhaseClock()
    log = _EvalLog(spec, phases)
    config = _swarm_config(spec, _bootstrap_address(spec))
    folder = Path(config.checkpoint.directory)
    folder.mkdir(parents=True, exist_ok=True)
    node_config = swarm_node_config(config)
    identity = load_or_create_identity(Path(config.swarm.key_file))
    with NodeThread(node_config, identity) as node_thread:
        node = node_thread.node
        _publish_address(spec, f"{node.peer_id}@{node.addresses[0]}")
        averager = SwarmAverager(node_thread, swarm_averager_config(config))
        strategy = SyncStrategy(averager, run_id=config.name)
        log.group_size = lambda: strategy.last_group_size
        averager.join_run(0)
        seed = stream_seed_of(node.peer_id)
        try:
            with Trainer(
                config,
                strategy=strategy,
                listener=_BenchListener(log),
                spans=SpanRecorder(peer=log.tag, sinks=[phases.sink]),
                stream_seed=seed,
            ) as trainer:
                trainer.run()
        finally:
            averager.leave_run()


def _open_store(spec: dict[str, Any]) -> TCPStore:
    folder = Path(spec["folder"])
    timeout = datetime.timedelta(seconds=_DIST_TIMEOUT_S)
    if spec["rank"] == 0:
        store = TCPStore(spec["host"], 0, spec["world"], is_master=True, timeout=timeout,
                         wait_for_workers=False)  # fmt: skip
        _write_atomically(folder / f"address-{spec['method']}", f"{spec['host']}:{store.port}")
        return store
    address = _wait_for_file(folder / f"address-{spec['method']}", "rank 0's store")
    host, _, port = address.rpartition(":")
    return TCPStore(host, int(port), spec["world"], is_master=False, timeout=timeout)


def _run_ddp(spec: dict[str, Any], config: RunConfig) -> None:
    """The reference: plain PyTorch DDP (gloo), gradients all-reduced in every backward."""
    if spec.get("ifname"):
        os.environ["GLOO_SOCKET_IFNAME"] = spec["ifname"]
    rank, world = spec["rank"], spec["world"]
    store = _open_store(spec)
    dist.init_process_group(
        "gloo",
        store=store,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=_DIST_TIMEOUT_S),
    )
    try:
        _ddp_loop(spec, config, rank, world)
    finally:
        dist.destroy_process_group()


def _ddp_loop(spec: dict[str, Any], config: RunConfig, rank: int, world: int) -> None:
    train, model_config = config.train, config.model
    if train.num_threads:
        torch.set_num_threads(train.num_threads)
    corpus = load_corpus(config.data)
    torch.manual_seed(train.seed)  # the same initial weights as the swarm peers
    model = GPT(model_config)
    ddp = DistributedDataParallel(model)
    if spec["method"] == "ddp_fp16":  # PyTorch's own gradient compression for thin links
        ddp.register_comm_hook(state=None, hook=fp16_compress_hook)
    optimizer = build_optimizer(model, config.optim)
    stream = TokenStream(  # the stream the swarm peers of this rank read
        corpus.train,
        seq_len=model_config.context,
        batch_size=train.batch_size,
        seed=stream_seed_of(_rank_identity(rank).peer_id),
    )
    val = validation_batches(
        corpus.validation,
        seq_len=model_config.context,
        batch_size=train.batch_size,
        num_batches=train.eval_batches,
    )
    phases = _PhaseClock()
    spans = SpanRecorder(peer=f"ddp-{rank}", sinks=[phases.sink])
    log = _EvalLog(spec, phases)
    log.group_size = lambda: world
    log.ready_then_wait_for_go()

    def evaluate(step: int) -> None:
        with spans.span("evaluation", step=step):
            loss = mean_validation_loss(model, val)
        log.record(step, loss)

    evaluate(0)
    for step in range(train.max_steps):
        lr = learning_rate_at(step, config=config.optim, max_steps=train.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # DDP all-reduces gradients inside backward, overlapped with it: the span holds both.
        with spans.span("compute_and_communication", step=step):
            for _ in range(train.grad_accum_steps):
                inputs, targets = stream.next_batch()
                logits = ddp(inputs)
                loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
                (loss / train.grad_accum_steps).backward()  # type: ignore[no-untyped-call]
            if config.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done == train.max_steps or (train.eval_every and done % train.eval_every == 0):
            evaluate(done)


def _main() -> None:
    spec = json.loads(sys.argv[1])
    freeze_startup_heap()  # as a `gossamer train` peer does, for every method alike
    try:
        config = load_run_config(None, [tuple(pair) for pair in spec["overrides"]])
        runners = {
            "diloco": _run_diloco,
            "diloco_overlap": _run_diloco,
            "sync": _run_sync,
            "ddp": _run_ddp,
            "ddp_fp16": _run_ddp,
        }
        runners[spec["method"]](spec, config)
    except BaseException:
        traceback.print_exc()
        raise


if __name__ == "__main__":
    _main()
