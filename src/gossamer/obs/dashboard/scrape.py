"""A :class:`~gossamer.obs.dashboard.source.SwarmSource` that scrapes a list of ``/metrics`` URLs.

Useful without any peer-to-peer discovery: point it at the metrics endpoints of some peers
(``gossamer dashboard --scrape URL ...``). Failure detection works like the network layer's
heartbeats: a peer whose endpoint has not answered for ``gone_after_s`` is gone, and is reported
back when it answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import math
import threading
import time
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

    ``timeout_s`` bounds each wait for the peer and the whole body: an endpoint that sends a
    byte now and then is given up at the deadline (urllib's timeout alone counts per read).

    Raises:
        OSError: the peer did not answer, answered with an error, too slowly, too much, or
            not in HTTP (a gRPC port named by mistake, say).
    """
    deadline = time.monotonic() + timeout_s
    chunks: list[bytes] = []
    num_bytes = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            while chunk := response.read1(64 * 1024):  # (read() waits for all 64 KiB)
                chunks.append(chunk)
                num_bytes += len(chunk)
                if num_bytes > MAX_METRICS_BYTES:
                    raise OSError(f"{url}: answer larger than {MAX_METRICS_BYTES} bytes")
                if time.monotonic() > deadline:
                    raise OSError(f"{url}: the answer took longer than {timeout_s} s")
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise OSError(f"{url}: {exc}") from exc
    except http.client.HTTPException as exc:
        raise OSError(f"{url}: not an HTTP answer ({exc!r}); is it the metrics port?") from exc
    return b"".join(chunks).decode("utf-8", errors="replace")


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
        for name in ("timeout_s", "gone_after_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"ScrapeConfig.{name}: must be a positive number, not {value}")


@dataclass(slots=True)
class _Target:
    url: str
    address: str
    peer_id: str
    last_answer_s: float | None = None
    last_answer_wall_s: float | None = None
    sample: PeerSample | None = None
    fetching: asyncio.Future[str] | None = None
    """The fetch under way (in its own thread): one at a time per endpoint, so a peer that
    answers slower than its deadline holds one thread, not one more at every snapshot."""


def _unique_id(target: _Target, taken: set[str]) -> str:
    """``target``'s peer id, or where another endpoint claims it, ``id@address`` (then a count):
    the renamed id is checked too, since an endpoint may export such a name itself (a snapshot
    with one id twice is refused, and the page showed no peer at all)."""
    if target.peer_id not in taken:
        return target.peer_id
    renamed = f"{target.peer_id}@{target.address}"
    count = 2
    while renamed in taken:
        renamed = f"{target.peer_id}@{target.address}#{count}"
        count += 1
    return renamed


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

    def _start_fetch(self, target: _Target) -> asyncio.Future[str]:
        """Fetch ``target`` in a daemon thread of its own (a thread stuck on a peer never
        holds up other work, nor the process's exit)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()

        def deliver(result: str | None, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result or "")

        def work() -> None:
            try:
                text = self._fetch(target.url, self.config.timeout_s)
            except BaseException as exc:  # handed to the loop, which decides
                outcome: tuple[str | None, BaseException | None] = (None, exc)
            else:
                outcome = (text, None)
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(deliver, *outcome)

        # Retrieved here too: a fetch whose snapshot gave up on it ends with nobody awaiting.
        future.add_done_callback(lambda done: done.cancelled() or done.exception())
        threading.Thread(target=work, name=f"scrape {target.address}", daemon=True).start()
        return future

    async def _scrape(self, target: _Target) -> None:
        if target.fetching is not None and not target.fetching.done():
            return  # the last fetch is still under way: no answer this time
        target.fetching = self._start_fetch(target)
        try:
            async with asyncio.timeout(self.config.timeout_s + 0.5):
                text = await asyncio.shield(target.fetching)
            parsed = parse_metrics(text)
        except (OSError, TimeoutError, ValueError) as exc:
            _log.debug("scrape of %s failed: %s", target.url, exc)
            return
        except Exception:  # one endpoint never fails the others' snapshot
            _log.exception("scrape of %s failed", target.url)
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
        taken: set[str] = set()
        for target in targets:
            peer_id = _unique_id(target, taken)
            taken.add(peer_id)
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
