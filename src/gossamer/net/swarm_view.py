"""The swarm as the dashboard sees it, through the network layer: a ``SwarmSource`` over the DHT.

:class:`NetSwarmSource` joins the swarm with a throwaway identity that announces nothing, finds
peers through the DHT, and watches every peer it finds with heartbeats (the network layer's own
failure detector), so a killed peer is shown gone within ``gone_after_s``. Peer records carry no
metrics address yet, so metrics come from endpoints named explicitly (``metrics_urls``); each is
matched to its peer by the ``gossamer_peer_info{peer_id}`` it exports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
from dataclasses import dataclass, replace
from types import TracebackType

from gossamer.core.clock import Clock, Pacer, SystemClock
from gossamer.core.errors import GossamerError
from gossamer.net.bridge import NodeThread
from gossamer.net.config import DhtConfig, HeartbeatConfig, NodeConfig
from gossamer.net.connections import DialTarget
from gossamer.net.dht_service import DHT_METHODS
from gossamer.net.node import Node
from gossamer.net.status import REACHABILITY_NAMES
from gossamer.obs.dashboard.scrape import ScrapeConfig, ScrapeSwarmSource
from gossamer.obs.dashboard.source import PeerSample, PeerView, Reachability, SwarmSnapshot
from gossamer.proto import net_pb2

__all__ = ["NetSwarmSource", "NetSwarmViewConfig"]

_log = logging.getLogger(__name__)

BOOTSTRAP_WARNING_INTERVAL_S = 60.0
"""A bootstrap peer that keeps not answering is logged as a warning this often at most (it was
every poll, twice a second); the page says so at every poll."""


@dataclass(frozen=True, kw_only=True, slots=True)
class NetSwarmViewConfig:
    """How the dashboard joins the swarm and watches it."""

    bootstrap: tuple[str, ...]
    """Known peers, HOST:PORT or PEER_ID@HOST:PORT."""
    swarm_secret: bytes | None = None
    """The private swarm's secret, if it has one."""
    listen_address: str = "0.0.0.0:0"
    """Where the observer node listens (port 0 picks a free one)."""
    metrics_urls: tuple[str, ...] = ()
    """Metrics endpoints to scrape, matched to peers by ``gossamer_peer_info{peer_id}``."""
    gone_after_s: float = 2.5
    """A peer that has not answered a heartbeat for this long is gone."""
    refresh_interval_s: float = 5.0
    """Seconds between DHT lookups that discover new peers."""
    max_watched_peers: int = 512
    """Peers watched with heartbeats at most (each costs about two small calls a second)."""
    look_timeout_s: float = 5.0
    """Deadline of one look at the swarm (a DHT refresh included)."""

    def __post_init__(self) -> None:
        if not self.bootstrap:
            raise ValueError("NetSwarmViewConfig.bootstrap: name at least one peer of the swarm")
        for name in ("gone_after_s", "refresh_interval_s", "look_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(
                    f"NetSwarmViewConfig.{name}: must be a positive number, not {value}"
                )
        if self.max_watched_peers < 1:
            raise ValueError("NetSwarmViewConfig.max_watched_peers: must be at least 1")

    def node_config(self) -> NodeConfig:
        """The observer node's config: it joins, announces nothing, and heartbeats peers."""
        return NodeConfig(
            listen_address=self.listen_address,
            bootstrap=self.bootstrap,
            swarm_secret=self.swarm_secret,
            announce=False,
            dht=DhtConfig(refresh_interval_s=self.refresh_interval_s),
            heartbeat=HeartbeatConfig(
                interval_s=min(0.5, self.gone_after_s / 3), timeout_s=self.gone_after_s
            ),
        )


class NetSwarmSource:
    """A :class:`~gossamer.obs.dashboard.source.SwarmSource` over the DHT (a context manager).

    Args:
        config: bootstrap peers, timings, metrics endpoints.
        clock: time source for refresh pacing.
    """

    def __init__(self, config: NetSwarmViewConfig, *, clock: Clock | None = None) -> None:
        self.config = config
        self._clock = clock or SystemClock()
        self._thread: NodeThread | None = None
        self._last_refresh_s: float | None = None
        self._warnings = Pacer(BOOTSTRAP_WARNING_INTERVAL_S, self._clock)
        """When a bootstrap entry's failure is logged as a warning again."""
        self._scrape = (
            ScrapeSwarmSource(
                ScrapeConfig(urls=config.metrics_urls, gone_after_s=config.gone_after_s)
            )
            if config.metrics_urls
            else None
        )

    def __enter__(self) -> NetSwarmSource:
        thread = NodeThread(self.config.node_config())
        thread.start()
        self._thread = thread
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Leave the swarm: stop heartbeats and the observer node."""
        if self._thread is not None:
            self._thread.stop()
            self._thread = None

    async def _seed(self, node: Node, timeout_s: float) -> str | None:
        """Learn the bootstrap peers' records with one FindNode each.

        A node that does not announce sends no record with its bootstrap Ping, so the answer
        carries none either and its routing table stays empty; FindNode always returns the
        responder's record. (Reported to net: remove once bootstrap handles observers.)

        Returns:
            Why the swarm cannot be seen where no bootstrap peer answered; else None.
        """
        failures: list[str] = []
        for entry in self.config.bootstrap:
            expected, _, address = entry.rpartition("@")
            try:
                async with asyncio.timeout(timeout_s):
                    connection = await node.pool.dial(
                        DialTarget(address), expected_peer_id=expected or None
                    )
                    response = await node.call(
                        connection.peer_id,
                        DHT_METHODS["FindNode"],
                        net_pb2.FindNodeRequest(target=secrets.token_bytes(32)),
                        net_pb2.FindNodeResponse,
                        timeout_s=timeout_s,
                        retry=False,
                    )
            except (GossamerError, TimeoutError) as exc:
                reason = str(exc) or f"no answer within {timeout_s:g} s"
                failures.append(f"{entry} ({reason})")
                self._log_failure(entry, reason)
                continue
            self._warnings.forget(entry)
            if response.HasField("responder"):
                node.dht.learn(response.responder, contacted=connection.peer_id)
            for record in (*response.closest, *response.gossip):
                node.dht.learn(record)
        if len(failures) < len(self.config.bootstrap):
            return None
        return "no bootstrap peer answered: " + "; ".join(failures)

    def _log_failure(self, entry: str, reason: str) -> None:
        if self._warnings.due(entry):
            _log.warning(
                "dashboard: bootstrap peer %s did not answer: %s (said again at most every %g s)",
                entry,
                reason,
                BOOTSTRAP_WARNING_INTERVAL_S,
            )
        else:
            _log.debug("dashboard: bootstrap peer %s did not answer: %s", entry, reason)

    async def _look(self, node: Node) -> tuple[float, list[PeerView], str | None]:
        now_s = self._clock.monotonic()
        problem = None
        if not node.peers():
            problem = await self._seed(node, self.config.look_timeout_s / 4)
        if self._last_refresh_s is None or now_s - self._last_refresh_s >= (
            self.config.refresh_interval_s
        ):
            self._last_refresh_s = now_s
            with contextlib.suppress(GossamerError, TimeoutError):
                async with asyncio.timeout(self.config.look_timeout_s / 2):
                    await node.dht.refresh()
        records = {r.peer_id: r for r in node.peers() if r.peer_id != node.peer_id}
        for peer_id in records:
            if len(node.detector.watched) >= self.config.max_watched_peers:
                break
            node.detector.watch(peer_id)
        wall_s = node.clock.wall()
        monotonic_s = node.clock.monotonic()
        contacts = node.directory.last_contact_wall_s
        views: list[PeerView] = []
        for peer_id in sorted(set(records) | set(node.detector.watched)):
            record = records.get(peer_id)
            liveness = node.detector.liveness(peer_id)
            alive = liveness.alive if liveness is not None else record is not None
            last_seen: float | None = contacts.get(peer_id)
            if liveness is not None and liveness.last_answer_s < monotonic_s:
                last_seen = max(last_seen or 0.0, wall_s - (monotonic_s - liveness.last_answer_s))
            if record is not None:
                last_seen = max(last_seen or 0.0, record.published_at_s)
            reachability: Reachability = "unknown"
            if record is not None:
                name = REACHABILITY_NAMES.get(int(record.reachability), "unknown")
                if name in ("direct", "relayed"):
                    reachability = "direct" if name == "direct" else "relayed"
            views.append(
                PeerView(
                    peer_id=peer_id,
                    address=record.addresses[0] if record and record.addresses else "",
                    status="alive" if alive else "gone",
                    reachability=reachability,
                    last_seen_wall_s=last_seen,
                )
            )
        return wall_s, views, problem

    async def snapshot(self) -> SwarmSnapshot:
        thread = self._thread
        if thread is None:
            raise RuntimeError("NetSwarmSource: use it as a context manager (not started)")
        wall_s, views, problem = await asyncio.to_thread(
            thread.run, self._look, timeout_s=self.config.look_timeout_s
        )
        samples: dict[str, PeerSample] = {}
        if self._scrape is not None:
            scraped = await self._scrape.snapshot()
            by_id = {v.peer_id: i for i, v in enumerate(views)}
            for view in scraped.peers:
                sample = scraped.samples.get(view.peer_id)
                index = by_id.get(view.peer_id)
                if index is None:  # not found through the DHT: show what its endpoint says
                    views.append(view)
                else:
                    # The DHT's view of the peer, with what its endpoint says of its metrics
                    # (why its page was not read was left out, and never shown).
                    views[index] = replace(
                        views[index], metrics_url=view.metrics_url, problem=view.problem
                    )
                if sample is not None:
                    samples[view.peer_id] = sample
        return SwarmSnapshot(
            taken_at_wall_s=wall_s, peers=tuple(views), samples=samples, problem=problem
        )
