"""A :class:`~gossamer.obs.dashboard.source.SwarmSource` that scrapes a list of ``/metrics`` URLs.

Useful without any peer-to-peer discovery: point it at the metrics endpoints of some peers
(``gossamer dashboard --scrape URL ...``). Failure detection works like the network layer's
heartbeats: a peer whose endpoint has not answered for ``gone_after_s`` is gone, and is reported
back when it answers again. Why a page was not read, in part or at all, is shown with its peer.
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
from gossamer.obs.dashboard.exposition import ParsedMetrics, parse_metrics, printable
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
    timeout_s: float = 2.5
    """Deadline of one scrape: above the second a busy peer's network metrics wait for its
    node's event loop before it serves its last view (``NetMetricsConfig.live_timeout_s``); at
    that second too, a busy but live peer was shown as gone."""
    snapshot_wait_s: float = 1.5
    """How long a snapshot waits for an endpoint's answer; one that comes later, within
    ``timeout_s``, counts at the next snapshot (a peer that does not answer at all then holds
    no snapshot, and so no other peer's figures, for the whole deadline)."""
    gone_after_s: float = 2.5
    """A peer whose endpoint has not answered for this long is shown as gone (judged when its
    own try ends, not when the snapshot's slowest one does)."""

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("ScrapeConfig.urls: name at least one metrics endpoint")
        if len(set(self.urls)) != len(self.urls):
            raise ValueError("ScrapeConfig.urls: an endpoint is listed twice")
        for name in ("timeout_s", "snapshot_wait_s", "gone_after_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"ScrapeConfig.{name}: must be a positive number, not {value}")


MAX_PROBLEM_CHARS = 200
"""A reason shown with a peer is cut to this length (an exception's text may quote the page)."""


@dataclass(slots=True)
class _Target:
    url: str
    address: str
    peer_id: str
    last_answer_s: float | None = None
    last_answer_wall_s: float | None = None
    sample: PeerSample | None = None
    problem: str | None = None
    """Why the last try did not read the page whole (None: it did)."""
    logged: str | None = None
    """The kind of trouble last logged (see :meth:`ScrapeSwarmSource._take`)."""
    fetching: asyncio.Future[None] | None = None
    """The fetch under way (in its own thread): one at a time per endpoint, so a peer that
    answers slower than its deadline holds one thread, not one more at every snapshot."""
    fetch_deadline: float = 0.0
    """Loop time past which the fetch under way is no longer waited for."""


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


def _short(text: str) -> str:
    """``text`` as a reason shown and logged: at most :data:`MAX_PROBLEM_CHARS`, control
    characters escaped (it may quote a page or an HTTP reason line, ANSI escapes and carriage
    returns included, which went into the log as they were)."""
    text = printable(text[: MAX_PROBLEM_CHARS + 1])
    return text if len(text) <= MAX_PROBLEM_CHARS else text[: MAX_PROBLEM_CHARS - 3] + "..."


class ScrapeSwarmSource:
    """Scrape every URL concurrently at each snapshot.

    Each endpoint is fetched and its page parsed in a thread of its own, off the event loop
    (parsing a hostile page takes up to a second or so; on the loop it froze the dashboard). An
    answer is taken in when it comes, so one that comes after the snapshot stopped waiting counts
    at the next.

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

    def _start_fetch(self, target: _Target) -> asyncio.Future[None]:
        """Fetch and parse ``target``'s page in a daemon thread of its own (a thread stuck on a
        peer never holds up other work, nor the process's exit); the outcome is taken in on the
        loop, and the returned future is done then."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def deliver(parsed: ParsedMetrics | None, error: BaseException | None) -> None:
            try:
                self._take(target, parsed, error)
            finally:
                if not future.done():
                    future.set_result(None)

        def work() -> None:
            parsed: ParsedMetrics | None = None
            error: BaseException | None = None
            try:
                parsed = parse_metrics(self._fetch(target.url, self.config.timeout_s))
            except BaseException as exc:  # handed to the loop, which decides
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(deliver, parsed, error)

        target.fetch_deadline = loop.time() + self.config.timeout_s + 0.5
        threading.Thread(target=work, name=f"scrape {target.address}", daemon=True).start()
        return future

    def _take(
        self, target: _Target, parsed: ParsedMetrics | None, error: BaseException | None
    ) -> None:
        """Take in one try's outcome (on the loop). A page that cannot be read is logged once
        when that starts, not at every poll; an endpoint that does not answer at debug level
        (the page shows it gone)."""
        if parsed is not None:
            target.last_answer_s = self._clock.monotonic()
            target.last_answer_wall_s = self._clock.wall()
            target.sample = parsed.sample
            if parsed.peer_id:
                target.peer_id = parsed.peer_id
            kind, problem = ("read in part", parsed.problem) if parsed.problem else (None, None)
        elif isinstance(error, (OSError, TimeoutError)):
            kind, problem = "no answer", f"no answer: {error}"
        elif isinstance(error, ValueError):
            kind, problem = "unreadable", f"page not read: {error}"
        else:
            kind, problem = "failed", f"scrape failed: {error!r}"
        target.problem = None if problem is None else _short(problem)
        if kind == target.logged:
            if kind is not None:
                _log.debug("scrape of %s: %s", target.url, target.problem)
            return
        if kind == "failed":  # a bug of ours: its traceback, once
            _log.error("scrape of %s failed", target.url, exc_info=error)
        elif kind in ("read in part", "unreadable"):
            _log.warning("scrape of %s: %s", target.url, target.problem)
        elif kind == "no answer":
            _log.debug("scrape of %s: %s", target.url, target.problem)
        elif target.logged in ("read in part", "unreadable", "failed"):
            _log.info("scrape of %s: its page is read whole again", target.url)
        target.logged = kind

    async def _scrape(self, target: _Target) -> float:
        """Try ``target`` once, waiting ``snapshot_wait_s`` at most for its answer.

        Returns:
            The clock's monotonic time when its try ended (its answer came, or it was given
            up), at which its liveness is judged.
        """
        loop = asyncio.get_running_loop()
        fetching = target.fetching
        if fetching is None or fetching.done() or fetching.get_loop() is not loop:
            fetching = target.fetching = self._start_fetch(target)
        wait_s = min(self.config.snapshot_wait_s, target.fetch_deadline - loop.time())
        if wait_s > 0:  # (else still under way past its deadline: no answer this time)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await asyncio.shield(fetching)
        return self._clock.monotonic()

    async def snapshot(self) -> SwarmSnapshot:
        targets = self._targets
        async with asyncio.TaskGroup() as group:
            tries = [group.create_task(self._scrape(target)) for target in targets]
        peers: list[PeerView] = []
        samples: dict[str, PeerSample] = {}
        taken: set[str] = set()
        for target, done in zip(targets, tries, strict=True):
            peer_id = _unique_id(target, taken)
            taken.add(peer_id)
            # Judged when its own try ended, not the snapshot: a snapshot waits up to
            # snapshot_wait_s for the slowest endpoint, and a live peer's answer taken at its
            # start was judged that much older at its end (gone, at gone_after_s below it).
            judged_at_s = done.result()
            alive = (
                target.last_answer_s is not None
                and judged_at_s - target.last_answer_s < self.config.gone_after_s
            )
            peers.append(
                PeerView(
                    peer_id=peer_id,
                    address=target.address,
                    status="alive" if alive else "gone",
                    last_seen_wall_s=target.last_answer_wall_s,
                    metrics_url=target.url,
                    problem=target.problem,
                )
            )
            if target.sample is not None:
                samples[peer_id] = target.sample
        return SwarmSnapshot(
            taken_at_wall_s=self._clock.wall(), peers=tuple(peers), samples=samples
        )
