"""A training peer in a swarm: DiLoCo or synchronous data parallel across machines.

:func:`run_swarm_peer` starts this peer's node, joins the swarm through the bootstrap peers, and
trains with the configured strategy: :class:`~gossamer.train.swarm_diloco.SwarmDiLoCoStrategy`
(what a DiLoCo peer does besides averaging: see :mod:`gossamer.train.swarm_diloco`) or
:class:`~gossamer.train.swarm_sync.SwarmSyncStrategy`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gossamer.core.config import RunConfig
from gossamer.core.config_loader import read_secret_file
from gossamer.core.errors import PeerUnavailableError
from gossamer.core.stop import StopRequest
from gossamer.net.addresses import host_of, ip_of
from gossamer.net.bridge import NodeThread
from gossamer.net.config import DhtConfig, HeartbeatConfig, NodeConfig
from gossamer.net.identity import held_identity, short_peer_id
from gossamer.net.metrics import register_net_metrics
from gossamer.net.node import Node
from gossamer.obs.metrics import PeerMetrics
from gossamer.obs.trace import SpanRecorder
from gossamer.store.lease import directory_lease
from gossamer.train.diloco_config import DiLoCoConfig
from gossamer.train.loop import ModelFactory, Trainer
from gossamer.train.run_events import ProgressEvent, TrainingListener, TrainResult
from gossamer.train.state_sync_donor import StateDonor
from gossamer.train.strategy import TrainingStrategy
from gossamer.train.swarm_averager import SwarmAverager
from gossamer.train.swarm_averager_config import SwarmAveragerConfig
from gossamer.train.swarm_diloco import SwarmDiLoCoStrategy
from gossamer.train.swarm_observed_averager import ObservedAverager
from gossamer.train.swarm_status_file import StatusFileListener
from gossamer.train.swarm_sync import SwarmSyncStrategy

__all__ = [
    "ListenerGroup",
    "SwarmPeerResult",
    "run_swarm_peer",
    "stream_seed_of",
    "swarm_averager_config",
    "swarm_node_config",
]

logger = logging.getLogger(__name__)
_BOOTSTRAP_WAIT_S = 30.0
"""How long a swarm peer given bootstrap peers tries them before it gives up (and trains
nothing)."""


class ListenerGroup(TrainingListener):
    """Hands every event to several listeners."""

    def __init__(self, listeners: Sequence[TrainingListener]) -> None:
        self.listeners = list(listeners)

    def on_start(self, *, start_step: int, max_steps: int, num_parameters: int) -> None:
        for listener in self.listeners:
            listener.on_start(
                start_step=start_step, max_steps=max_steps, num_parameters=num_parameters
            )

    def on_eval(self, *, step: int, val_loss: float) -> None:
        for listener in self.listeners:
            listener.on_eval(step=step, val_loss=val_loss)

    def on_step(self, event: ProgressEvent) -> None:
        for listener in self.listeners:
            listener.on_step(event)

    def on_checkpoint(self, *, step: int, path: Path) -> None:
        for listener in self.listeners:
            listener.on_checkpoint(step=step, path=path)


@dataclass(frozen=True, kw_only=True, slots=True)
class SwarmPeerResult:
    """What a swarm peer did."""

    peer_id: str
    result: TrainResult
    bytes_sent: int
    bytes_received: int
    resyncs: int
    time_to_productive_s: float | None


def swarm_node_config(config: RunConfig) -> NodeConfig:
    """The node settings of a swarm peer of ``config``: its listen address, bootstrap peers,
    swarm secret, and the DHT and heartbeat timings training rounds rely on."""
    swarm = config.swarm
    secret = None
    if swarm.swarm_secret_file:  # (a regular file, a few KiB at most: not /dev/zero, a fifo)
        secret = read_secret_file(swarm.swarm_secret_file, setting="swarm.swarm_secret_file")
    return NodeConfig(
        listen_address=swarm.listen,
        bootstrap=swarm.bootstrap_addresses,
        swarm_secret=secret,
        dht=DhtConfig(record_ttl_s=30.0, republish_interval_s=10.0, refresh_interval_s=5.0),
        heartbeat=HeartbeatConfig(interval_s=0.5, timeout_s=2.5),
    )


def swarm_averager_config(config: RunConfig) -> SwarmAveragerConfig:
    """The round settings of a swarm peer of ``config``."""
    swarm = config.swarm
    return SwarmAveragerConfig(
        run_id=config.name,
        codec=swarm.codec,
        backend=swarm.backend,
        join_window_s=swarm.join_window_s,
        round_timeout_s=swarm.round_timeout_s,
        max_round_timeout_s=swarm.max_round_timeout_s,
        max_group_size=swarm.max_group_size,
    )


def stream_seed_of(peer_id: str) -> int:
    """The seed of a peer's data stream: peers of a run read different batches."""
    return int.from_bytes(hashlib.sha256(peer_id.encode()).digest()[:4], "little")


def run_swarm_peer(
    config: RunConfig,
    *,
    model_factory: ModelFactory | None = None,
    listener: TrainingListener | None = None,
    spans: SpanRecorder | None = None,
    metrics: PeerMetrics | None = None,
    metrics_url: str | None = None,
    on_address: Callable[[str], None] | None = None,
    stop: StopRequest | None = None,
) -> SwarmPeerResult:
    """Train as one peer of a swarm, with ``config.swarm``'s strategy.

    Args:
        config: the run; ``config.swarm`` says how to reach and average with the others.
        model_factory: builds the model; the built-in GPT if None.
        listener: receives progress events.
        spans: records where time goes.
        metrics: Prometheus metrics to keep up to date (the node's network metrics are added to
            its registry while the node runs); goodput is tracked in a private one if None.
        metrics_url: where ``metrics`` are served, written into the status file for scrapers.
        on_address: called with this peer's ``PEER_ID@HOST:PORT`` once it listens.
        stop: set to pause the run after the step under way (see :attr:`Trainer.stop`).

    Returns:
        The training result and the swarm figures (bytes on the wire, resyncs, time to productive).
    """
    checkpoint_dir = Path(config.checkpoint.directory)
    swarm = config.swarm
    # The directory is held before its peer key is read there: a second peer given the same
    # directory took the first's identity, and so its data stream.
    with contextlib.ExitStack() as held:
        held.enter_context(directory_lease(checkpoint_dir))
        key_file = Path(swarm.key_file) if swarm.key_file else checkpoint_dir / "peer.key"
        # (held too: two peers given one key file are one peer id, and read one data stream)
        identity = held.enter_context(
            held_identity(
                key_file,
                setting="swarm.key_file",
                hint="or leave swarm.key_file unset (each checkpoint.directory then holds its "
                "own peer.key)",
            )
        )
        metrics = metrics or PeerMetrics()
        metrics.set_peer_id(identity.peer_id)
        # Its spans and log lines name this peer: the run's name, which every peer of the run
        # shares, put a swarm's traces, exported together, on one process's rows.
        spans = spans or SpanRecorder()
        if spans.peer in ("", config.name):  # (a name the caller chose is kept: a bench's tag)
            spans.peer = short_peer_id(identity.peer_id)
        node_thread = held.enter_context(NodeThread(swarm_node_config(config), identity))
        net_metrics = register_net_metrics(metrics.registry, node_thread)
        try:
            return _train_on_node(
                config,
                node_thread,
                model_factory=model_factory,
                listener=listener,
                spans=spans,
                metrics=metrics,
                metrics_url=metrics_url,
                on_address=on_address,
                stop=stop,
            )
        finally:
            net_metrics.close()  # before the node stops: later scrapes serve the last view


def _on_loopback_only(node: Node) -> bool:
    """Whether every address ``node`` has is a loopback one: the peers that can reach it are on
    its machine, and dial it there (nothing to ask)."""
    hosts = [host_of(address) for address in node.addresses]
    return bool(hosts) and all(
        h == "localhost" or ((ip := ip_of(h)) is not None and ip.is_loopback) for h in hosts
    )


def _wait_for_a_bootstrap_peer(node_thread: NodeThread, addresses: Sequence[str]) -> None:
    """Return once some peer is known through the bootstrap peers, trying them again for up
    to ``_BOOTSTRAP_WAIT_S`` (a peer started just before this one may not listen yet).

    Raises:
        PeerUnavailableError: none answered: a run asked to join a swarm trained alone and
            ended as a success.
    """

    async def reached(node: Node) -> int:
        return len(node.peers()) or await node.bootstrap(list(addresses))

    deadline = time.monotonic() + _BOOTSTRAP_WAIT_S
    while not node_thread.run(reached, timeout_s=_BOOTSTRAP_WAIT_S + 30):
        if time.monotonic() >= deadline:
            raise PeerUnavailableError(
                f"no bootstrap peer answered within {_BOOTSTRAP_WAIT_S:.0f} s ("
                + ", ".join(addresses)
                + "); check --bootstrap: the address a running peer printed, reachable from "
                "here; leave it out to start a new swarm"
            )
        time.sleep(1.0)


def _train_on_node(
    config: RunConfig,
    node_thread: NodeThread,
    *,
    model_factory: ModelFactory | None,
    listener: TrainingListener | None,
    spans: SpanRecorder | None,
    metrics: PeerMetrics,
    metrics_url: str | None,
    on_address: Callable[[str], None] | None,
    stop: StopRequest | None,
) -> SwarmPeerResult:
    swarm = config.swarm
    node = node_thread.node
    address = f"{node.peer_id}@{node.addresses[0]}"
    logger.info("peer %s listening at %s", node.peer_id[:8], address)
    if on_address is not None:
        on_address(address)
    if swarm.bootstrap_addresses:
        _wait_for_a_bootstrap_peer(node_thread, swarm.bootstrap_addresses)
        if not _on_loopback_only(node):
            # Behind NAT nobody can dial the address it listens on: it takes a relay, and its
            # record says so (it never asked, and every round a peer formed with it failed on
            # the sends to it).
            node_thread.run(lambda n: n.settle_reachability(), timeout_s=20.0)
    averager = SwarmAverager(node_thread, swarm_averager_config(config))

    async def make_donor(n: Node) -> StateDonor:
        return StateDonor(n)

    donor = node_thread.run(make_donor, timeout_s=10)
    tokens_per_step = config.train.grad_accum_steps * config.train.batch_size * config.model.context
    strategy: TrainingStrategy
    if swarm.strategy == "diloco":
        strategy = SwarmDiLoCoStrategy(
            DiLoCoConfig.from_swarm(swarm, run_id=config.name),
            averager,
            node_thread,
            donor,
            join_existing=bool(swarm.bootstrap_addresses),
            metrics=metrics,
            tokens_per_step=tokens_per_step,
            max_steps=config.train.max_steps,
        )
    elif swarm.strategy == "sync":
        swarm_metrics = metrics.enable_swarm()
        strategy = SwarmSyncStrategy(
            ObservedAverager(averager, swarm_metrics),
            averager,
            node_thread,
            donor,
            join_existing=bool(swarm.bootstrap_addresses),
            run_id=config.name,
            weight=float(tokens_per_step),  # gradients count by the tokens behind them
            metrics=swarm_metrics,
            goodput=metrics.goodput,
            tokens_per_step=tokens_per_step,
        )
    else:
        raise ValueError("run_swarm_peer needs swarm.strategy 'sync' or 'diloco'")
    listeners = [listener] if listener is not None else []
    status: StatusFileListener | None = None
    if swarm.status_file:
        status = StatusFileListener(
            Path(swarm.status_file),
            peer_id=node.peer_id,
            strategy=strategy,
            goodput=metrics.goodput,
        )
        published: dict[str, Any] = {"address": address}
        if metrics_url is not None:
            published["metrics_url"] = metrics_url
        status.publish(**published)  # at once: peers joining through this one wait for it
        listeners.append(status)
    stream_seed = stream_seed_of(node.peer_id)
    try:
        with Trainer(
            config,
            model_factory=model_factory,
            strategy=strategy,
            listener=ListenerGroup(listeners),
            stream_seed=stream_seed,
            spans=spans,
            metrics=metrics,
            stop=stop,
        ) as trainer:
            result = trainer.run()
    except BaseException as exc:
        if status is not None:
            status.finish(None, error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        donor.close()
        averager.close()
    if status is not None:
        status.finish(result)
    return SwarmPeerResult(
        peer_id=node.peer_id,
        result=result,
        bytes_sent=int(getattr(strategy, "bytes_sent", 0)),
        bytes_received=int(getattr(strategy, "bytes_received", 0)),
        resyncs=int(getattr(strategy, "resyncs", 0)),
        time_to_productive_s=getattr(strategy, "time_to_productive_s", None),
    )
