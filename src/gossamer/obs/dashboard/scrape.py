"""A :class:`~gossamer.obs.dashboard.source.SwarmSource` that scrapes a list of ``/metrics`` URLs.

Useful without any peer-to-peer discovery: point it at the metrics endpoints of some peers
(``gossamer dashboard --scrape URL ...``). Failure detection works like the network layer's
heartbeats: a peer whose endpoint has not answered for ``gone_after_s`` is gone, and is reported
back when it answers again.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from gossamer.core.clock import Clock, SystemClock
from gossamer.obs.dashboard.exposition import parse_metrics
from gossamer.obs.dashboard.source import PeerSample, PeerView, SwarmSnapshot

__all__ = ["Fetch", "ScrapeConfig", "ScrapeSwarmSource", "fetch_url", "normalize_metrics_url"]

_log = logging.getLogger(__name__)

Fetch = Callable[[str, float], str]
"""Fetch the text at a URL within a timeout in seconds; raise ``OSError`` on failure."""

MAX_METRICS_BYTES = 8 * 1024 * 1024
"""A larger ``/metrics`` answer is refused (a peer's is a few KiB)."""


def normalize_metrics_url(target: str) -> str:
    """``host:port`` or a URL -> the full ``http://host:port/metrics`` URL.

    Raises:
        ValueError: not a ``host:port`` or an http(s) URL.
    """
    url = target if "://" in target else f"http://{target}"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--scrape {target!r}: expected HOST:PORT or http://HOST:PORT/metrics")
    try:
        parts.port  # noqa: B018  # raises on a bad port
    except ValueError as exc:
        raise ValueError(f"--scrape {target!r}: bad port ({exc})") from exc
    if parts.path in ("", "/"):
        parts = parts._replace(path="/metrics")
    return urllib.parse.urlunsplit(parts)


def fetch_url(url: str, timeout_s: float) -> str:
    """Fetch a metrics page over HTTP (blocking; run it in a thread).

    Raises:
        OSError: the peer did not answer, answered with an error, or answered too much.
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            body: bytes = response.read(MAX_METRICS_BYTES + 1)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise OSError(f"{url}: {exc}") from exc
    if len(body) > MAX_METRICS_BYTES:
        raise OSError(f"{url}: answer larger than {MAX_METRICS_BYTES} bytes")
    return body.decode("utf-8", errors="replace")


@dataclass(frozen=True, kw_only=True, slots=True)
class ScrapeConfig:
    """Which endpoints to scrape and when a silent one counts as gone."""

    urls: tuple[str, ...]
    """Full metrics URLs (see :func:`normalize_metrics_url`)."""
    timeout_s: float = 1.0
    """Deadline of one scrape."""
    gone_after_s: float = 2.5
    """A peer whose endpoint has not answered for this long is shown as gone."""

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("ScrapeConfig.urls: name at least one metrics endpoint")
        if len(set(self.urls)) != len(self.urls):
            raise ValueError("ScrapeConfig.urls: an endpoint is listed twice")
        if self.timeout_s <= 0:
            raise ValueError(f"ScrapeConfig.timeout_s: must be positive, not {self.timeout_s}")
        if self.gone_after_s <= 0:
            raise ValueError(
                f"ScrapeConfig.gone_after_s: must be positive, not {self.gone_after_s}"
            )


@dataclass(slots=True)
class _Target:
    url: str
    address: str
    peer_id: str
    last_answer_s: float | None = None
    last_answer_wall_s: float | None = None
    sample: PeerSample | None = None


class ScrapeSwarmSource:
    """Scrape every URL concurrently at each snapshot.

    Args:
        config: the endpoints and timings.
        fetch: how a page is fetched (:func:`fetch_url`; tests pass an in-memory one).
        clock: time source for failure detection.
    """

    def __init__(
        self, config: ScrapeConfig, *, fetch: Fetch | None = None, clock: Clock | None = None
    ) -> None:
        self.config = config
        self._fetch = fetch or fetch_url
        self._clock = clock or SystemClock()
        self._targets: list[_Target] = []
        for url in config.urls:
            self.add_url(url)

    def add_url(self, url: str) -> None:
        """Scrape ``url`` too from the next snapshot on (a peer that started later); a URL
        already scraped is ignored. Safe to call from another thread.
        """
        if any(t.url == url for t in self._targets):
            return
        address = urllib.parse.urlsplit(url).netloc
        # Replaced, not appended to, so a snapshot iterating the old list is undisturbed.
        self._targets = [*self._targets, _Target(url=url, address=address, peer_id=address)]

    async def _scrape(self, target: _Target) -> None:
        try:
            async with asyncio.timeout(self.config.timeout_s + 0.5):
                text = await asyncio.to_thread(self._fetch, target.url, self.config.timeout_s)
            parsed = parse_metrics(text)
        except (OSError, TimeoutError, ValueError) as exc:
            _log.debug("scrape of %s failed: %s", target.url, exc)
            return
        target.last_answer_s = self._clock.monotonic()
        target.last_answer_wall_s = self._clock.wall()
        target.sample = parsed.sample
        if parsed.peer_id:
            target.peer_id = parsed.peer_id

    async def snapshot(self) -> SwarmSnapshot:
        targets = self._targets
        async with asyncio.TaskGroup() as group:
            for target in targets:
                group.create_task(self._scrape(target))
        now = self._clock.monotonic()
        peers: list[PeerView] = []
        samples: dict[str, PeerSample] = {}
        for target in targets:
            # Two endpoints claiming one peer id: keep them apart by address.
            peer_id = target.peer_id
            if any(p.peer_id == peer_id for p in peers):
                peer_id = f"{peer_id}@{target.address}"
            alive = (
                target.last_answer_s is not None
                and now - target.last_answer_s < self.config.gone_after_s
            )
            peers.append(
                PeerView(
                    peer_id=peer_id,
                    address=target.address,
                    status="alive" if alive else "gone",
                    last_seen_wall_s=target.last_answer_wall_s,
                    metrics_url=target.url,
                )
            )
            if target.sample is not None:
                samples[peer_id] = target.sample
        return SwarmSnapshot(
            taken_at_wall_s=self._clock.wall(), peers=tuple(peers), samples=samples
        )
