"""One state download's dealings with its donors: requests, replies, deadline and strikes.

:class:`_Download` asks a donor (a manifest or a chunk request, each with its timeout) and takes
its reply from the node's :class:`_ReplyRouter`; it keeps the download's deadline (moved out by
progress) and the donors struck off, and why. :class:`_Donor` is one donor's standing in the
chunk phase: requests in flight, latency, busy refusals and their backoff, and the progress it is
judged by (quiet time, bytes owed at the floor rate). :class:`_FittedWindow` is how many chunk
requests the newcomer keeps in flight: grown while the donors are the bottleneck, fitted to
what its own link carries in a request timeout once that link is. A busy refusal raises
:class:`_DonorBusyError`: the donor is healthy and asked again later. Used by
:func:`gossamer.train.state_sync.download_state`, which decides what to ask and whom to strike off.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import weakref
from collections import deque
from dataclasses import dataclass, field

from gossamer.core.errors import (
    DeadlineExceededError,
    GossamerError,
    PeerLostError,
    PeerUnavailableError,
    ProtocolError,
)
from gossamer.train.state_sync_donor import BulkEndpoint
from gossamer.train.state_sync_wire import (
    DONOR_BUSY,
    MAX_TIMEOUT_MS,
    REPLY_TOPIC,
    REQUEST_TOPIC,
    Manifest,
    ReplyHeader,
    ReplyStatus,
    Request,
    RequestKind,
    StateSyncLimits,
    decode_reply,
    encode_request,
)

_log = logging.getLogger(__name__)
_BUSY_FIRST_BACKOFF_S = 0.05
"""Wait before asking a busy donor again, the first time; it doubles each time, up to:"""
_BUSY_MAX_BACKOFF_S = 2.0
_MIN_DONOR_BYTES_PER_S = float(32 << 10)
"""The floor rate a download's chunks under way are allowed to come at (about 0.26 Mbit/s)."""
_MAX_QUIET_S = 120.0
"""Longest silence allowed a donor with chunk requests of ours out, however many bytes are under
way: a donor declaring 64 MiB chunks (or a full window of 1 MiB ones at the floor rate) held a
newcomer for hours, or 286 s, before it was struck off. A window of eight 1 MiB chunks over
1 Mbit/s comes in 67 s."""


_INTAKE_HORIZON_WINDOWS = 4
"""The newcomer's intake rate is measured over its last this many ``window_s`` with requests
out: long enough to span a window's chunks, short enough to follow a link that changes."""


def _rose(base: tuple[float, float], num_sharing: float, wire_s: float) -> bool:
    """Whether a chunk that took ``wire_s``, its time shared with ``num_sharing`` requests of
    ours, took longer than ``base`` (the same) by more than half of what sharing one link
    with more requests would add."""
    base_sharing, base_s = base
    return num_sharing > base_sharing + 0.5 and wire_s > base_s * (
        1 + (num_sharing / base_sharing - 1) / 2
    )


class _DonorBusyError(PeerUnavailableError):
    """A donor refused a request for want of room: it is healthy, ask it again later."""


def _busy_backoff_s(num_busy: int) -> float:
    """How long to wait before asking a donor again that was busy ``num_busy`` times in a row:
    doubling, bounded, with jitter (newcomers turned away together come back apart)."""
    backoff_s = min(_BUSY_MAX_BACKOFF_S, _BUSY_FIRST_BACKOFF_S * (1 << min(num_busy - 1, 16)))
    return backoff_s * random.uniform(0.5, 1.0)


class _ReplyRouter:
    """Hands replies on a node's reply topic to the request that waits for them.

    Holds no reference to its node: :data:`_routers` keeps it as long as the node lives, and
    one holding the node kept every node that ever downloaded state alive (with its donor's
    snapshots) for the life of the process.
    """

    def __init__(self) -> None:
        self._waiting: dict[bytes, tuple[str, asyncio.Future[tuple[ReplyHeader, memoryview]]]] = {}
        self._max_bytes = 0

    def allow(self, node: BulkEndpoint, limits: StateSyncLimits) -> None:
        """Accept replies on ``node`` (this router's) as large as ``limits`` allow (and as
        earlier downloads' limits did)."""
        if limits.max_reply_bytes > self._max_bytes:
            self._max_bytes = limits.max_reply_bytes
            node.on_bulk(REPLY_TOPIC, self._on_reply, max_bytes=self._max_bytes)

    def expect(self, donor: str) -> tuple[bytes, asyncio.Future[tuple[ReplyHeader, memoryview]]]:
        request_id = secrets.token_bytes(16)
        future = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = (donor, future)
        return request_id, future

    def forget(self, request_id: bytes) -> None:
        self._waiting.pop(request_id, None)

    async def _on_reply(self, sender: str, topic: str, payload: bytearray) -> None:
        header, body = decode_reply(payload)
        waiting = self._waiting.get(header.request_id)
        if waiting is None or waiting[0] != sender:
            raise ProtocolError("state reply to no request of ours")
        if not waiting[1].done():
            waiting[1].set_result((header, body))


_routers: weakref.WeakKeyDictionary[BulkEndpoint, _ReplyRouter] = weakref.WeakKeyDictionary()


@dataclass(slots=True)
class _Donor:
    peer_id: str
    num_in_flight: int = 0
    latency_s: float | None = None
    num_bytes: int = 0
    num_busy: int = 0
    """Busy refusals in a row, of requests asked while none of ours was in flight there."""
    not_before: float = -float("inf")
    """(Loop time) when it may be asked again, after a busy refusal with none of ours in
    flight there."""
    max_in_flight: int | None = None
    """Our requests it served at once when it refused one more as busy (plus one per chunk it
    delivered since): more are not asked of it. None: no refusal yet."""
    busy: str = ""
    """Its last busy refusal."""
    quiet_since: float = 0.0
    """(Loop time) its last sign of life: a chunk or busy refusal, or the request that found
    none of ours in flight there."""
    out_s: float = 0.0
    """How long it has had chunk requests of ours out."""
    owed_bytes: float = 0.0
    """What it would have delivered meanwhile at the floor rate, for its share of the requests
    under way (they share our link)."""
    num_chunks_sent: int = 0
    num_bytes_sent: int = 0
    """Verified chunks (and their bytes) it delivered, copies that lost the race too."""

    def rate(self) -> str:
        """What it delivered, and how fast while asked, for messages."""
        per_s = self.num_bytes_sent / self.out_s if self.out_s > 0 else 0.0
        return (
            f"{self.num_chunks_sent} chunk(s) ({self.num_bytes_sent / (1 << 20):.2f} MiB) in "
            f"{self.out_s:.1f} s with requests of ours out, {per_s / 1024:.1f} KiB/s"
        )

    def askable(self, now: float) -> bool:
        """Whether one more request may go to it now (it is not known to be busy)."""
        return self.not_before <= now and (
            self.max_in_flight is None or self.num_in_flight < self.max_in_flight
        )


@dataclass(slots=True)
class _FittedWindow:
    """How many chunk requests a newcomer keeps in flight: as many as its donors serve at once,
    unless its own link is the bottleneck; then about what that link delivers in ``window_s``
    (at least one, at most ``max_size``), so each chunk's time on the wire stays near
    ``window_s``, well inside the silence a donor is allowed.

    Every request shares the newcomer's downlink: eight 1 MiB chunks asked at once over
    0.25 Mbit/s take 268 s each, longer than the two minutes a donor may be silent, so every
    honest donor was struck off for the newcomer's own slowness and it took no state at all.
    But a window fitted to what came is fitted to the window itself where the donors are the
    bottleneck (each one's uplink, or its time to answer): eight donors at 0.3 Mbit/s up took
    16 MB in 233 s with one or two chunks in flight, not 63 s with eight. So the window probes:
    each chunk that comes tells how long it took (``wire_s``) and how many of our requests it
    shared the time with on average (``num_sharing``). While chunk times do not rise with the
    requests in flight, the donors are the bottleneck and the window grows: at most doubling,
    and no further than would keep chunks within ``probe_s`` if our link were the bottleneck
    after all. Once they rise as a shared link's do, the window is fitted to the link (and
    follows it from then on, as before). A chunk slower than ``probe_s``, whatever the cause,
    fits the window at once.
    """

    max_size: int
    chunk_bytes: int
    window_s: float
    probe_s: float
    """How long a chunk may take while the window probes (half the silence a donor is
    allowed); a chunk slower than this fits the window to our link at once."""
    size: int
    """Requests to keep in flight now."""
    out_s: float = 0.0
    """How long requests of ours have been out, in all."""
    request_s: float = 0.0
    """Seconds of each request of ours out, summed over the requests (a chunk's share of
    it, over its time on the wire, is how many requests it shared that time with)."""
    intake: deque[tuple[float, int]] = field(default_factory=deque)
    """Chunks that came within the horizon: (``out_s`` then, bytes)."""
    intake_bytes: int = 0
    per_s: float = 0.0
    """The intake rate measured (bytes a second with requests out); 0 until a chunk came."""
    probe_base: tuple[float, float] | None = None
    """(Requests shared with, seconds) of the chunk that last grew the window by a probe."""
    by_donor: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Each donor's chunk that later ones of it are compared with: (requests of ours it
    shared its time with, seconds). A donor's own, since donors differ: one four times as
    fast as the rest is no sign of our link."""
    link_bound: bool = False
    """Chunk times rose with the requests in flight: the window is fitted to our link."""

    @staticmethod
    def first_size(
        max_size: int, num_chunks: int, chunk_bytes: int, floor: float, spare_quiet_s: float
    ) -> int:
        """The window before any chunk has come: as many chunks as the floor rate carries in
        the silence a donor is allowed past its request timeout (``spare_quiet_s``), so even a
        link just at the floor brings them before any donor's silence runs out; at least one.
        Two in the swarm: 1 MiB chunks, 32 KiB/s, 120 s less 30 s."""
        fits = int(spare_quiet_s * floor / max(1, chunk_bytes))
        return max(1, min(max_size, num_chunks, fits))

    def elapse(self, elapsed_s: float, num_in_flight: int) -> None:
        """``elapsed_s`` passed with ``num_in_flight`` requests of ours out."""
        self.out_s += elapsed_s
        self.request_s += elapsed_s * num_in_flight

    def delivered(self, donor: str, num_bytes: int, wire_s: float, request_s: float) -> None:
        """A chunk came from ``donor`` (of ``num_bytes``, after ``wire_s``, while ``request_s``
        seconds of requests of ours were out): fit the window, or probe."""
        self.intake.append((self.out_s, num_bytes))
        self.intake_bytes += num_bytes
        horizon_s = _INTAKE_HORIZON_WINDOWS * self.window_s
        while self.intake and self.intake[0][0] < self.out_s - horizon_s:
            self.intake_bytes -= self.intake.popleft()[1]
        span_s = min(self.out_s, horizon_s)
        if span_s <= 0 or wire_s <= 0:
            return  # (no time measured yet: nothing to fit to)
        self.per_s = self.intake_bytes / span_s
        num_sharing = max(1.0, request_s / wire_s)
        # (the window that would bring chunks in window_s if our link carried these at most)
        fit = self._clamp(int(num_sharing * self.window_s / wire_s))
        # A shared link's chunk times rise in proportion to the requests sharing it; a
        # donor's own do not. Risen by more than half of that, on one donor: our link is the
        # bottleneck (or the donor's, shared by more of ours: fitted as well).
        base = self.by_donor.get(donor)
        if base is None or abs(num_sharing - base[0]) > 0.5:
            self.by_donor[donor] = (num_sharing, wire_s)
        if base is not None and _rose(base, num_sharing, wire_s):
            self.link_bound = True
            self.size = fit
        elif wire_s > self.probe_s:  # (too near a donor's silence allowance, whatever the cause)
            self.size = fit
        elif self.link_bound:
            self.size = self._clamp(int(self.per_s * self.window_s / self.chunk_bytes))
        elif (
            base is not None
            or self.probe_base is None
            or not _rose(self.probe_base, num_sharing, wire_s)
        ):
            # (a donor's first chunk is compared with the one that last grew the window: it
            # may be a slower donor's, so it grows nothing if it rose, and tells nothing of our
            # link either. At most doubling, so a link that falls meanwhile finds few requests
            # out; and from no more than it keeps now, as a chunk asked before the window
            # shrank shared its time with more.)
            probe = min(num_sharing, self.size) * min(2.0, self.probe_s / wire_s)
            probe = self._clamp(int(probe))
            if probe > self.size:
                self.size, self.probe_base = probe, (num_sharing, wire_s)

    def _clamp(self, size: int) -> int:
        return max(1, min(self.max_size, size))

    def overdue_s(self) -> float | None:
        """How long a request may be out before it no longer holds its place in the window:
        twice what one chunk of a fitted window takes on our link. A donor that sits on the one
        request a thin link allows then stalls the others for that long, not for the silence
        it is allowed (two minutes). None until a chunk came (nothing measured yet)."""
        if self.per_s <= 0:
            return None
        return 2 * max(self.window_s, self.size * self.chunk_bytes / self.per_s)


@dataclass(slots=True)
class _Download:
    """One download's progress, owned by :func:`download_state`."""

    node: BulkEndpoint
    router: _ReplyRouter
    loop: asyncio.AbstractEventLoop
    deadline: float
    request_timeout_s: float
    min_donor_bytes_per_s: float = _MIN_DONOR_BYTES_PER_S
    max_quiet_s: float = _MAX_QUIET_S
    latest: float = -float("inf")
    """(Loop time) how far progress may move ``deadline`` out (not past where it is now)."""
    failed: dict[str, str] = field(default_factory=dict)
    manifest_s: float = 0.0
    """How long the manifests took."""
    manifests: dict[str, Manifest] = field(default_factory=dict)
    """Each donor's manifest, as it came."""
    late: dict[asyncio.Task[None], str] = field(default_factory=dict)
    """Manifest requests still under way when the choice was made, and their donors: one
    that brings the chosen manifest joins the chunk phase."""

    def remaining_s(self) -> float:
        return self.deadline - self.loop.time()

    def extend(self, until: float) -> None:
        """Progress: move the deadline out to ``until``, at most to ``latest``."""
        self.deadline = max(self.deadline, min(self.latest, until))

    async def ask(self, donor: str, request: Request) -> tuple[ReplyHeader, memoryview]:
        """Send ``request`` to ``donor`` and wait for its OK reply (any failure raises).

        A manifest request may take ``request_timeout_s``; a chunk request as long as the
        download may last (its donor's progress is judged by :func:`_fetch_chunks`: the
        request shares the link with the others under way, so its own time says little).
        """
        if request.kind is RequestKind.MANIFEST:
            timeout_s = min(self.remaining_s(), self.request_timeout_s)
        else:
            timeout_s = max(self.deadline, self.latest) - self.loop.time()
        if timeout_s <= 0:
            raise DeadlineExceededError("no time left for the request")
        request_id, future = self.router.expect(donor)
        request = Request(
            kind=request.kind,
            request_id=request_id,
            version=request.version,
            index=request.index,
            timeout_ms=min(MAX_TIMEOUT_MS, max(1, int(timeout_s * 1000))),
            manifest_sha256=request.manifest_sha256,
        )
        try:
            async with asyncio.timeout(timeout_s):
                await self.node.send_bulk(
                    donor, REQUEST_TOPIC, encode_request(request), timeout_s=timeout_s
                )
                header, body = await future  # donors reply before their handler returns
        except TimeoutError:
            raise DeadlineExceededError(f"no reply within {timeout_s:.1f} s") from None
        except PeerUnavailableError as exc:
            if DONOR_BUSY in str(exc):  # (net carries the donor's refusal in its text)
                raise _DonorBusyError(str(exc)) from exc
            raise
        except (GossamerError, AssertionError):
            raise
        except Exception as exc:
            # net should map every transport error; a stray one (gRPC's UsageError from a
            # channel closed under a call) must still only cost us this donor.
            raise PeerLostError(f"transport error: {exc!r}") from exc
        finally:
            self.router.forget(request_id)
        if header.kind is not request.kind or header.index != request.index:
            raise ProtocolError("reply does not match its request")
        if request.kind is RequestKind.CHUNK and header.version != request.version:
            raise ProtocolError("reply does not match its request")
        if header.status is not ReplyStatus.OK:
            reason = bytes(body[:200]).decode(errors="replace")
            raise PeerUnavailableError(f"refused: {header.status.name} ({reason})")
        return header, body

    def strike(self, donor: str, exc: BaseException) -> None:
        if donor not in self.failed:
            self.failed[donor] = f"{type(exc).__name__}: {exc}"
            _log.warning("state sync: dropping donor %s: %s", donor[:8], self.failed[donor])
