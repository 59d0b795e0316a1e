"""One state download's dealings with its donors: requests, replies, deadline and strikes.

:class:`_Download` asks a donor (a manifest or a chunk request, each with its timeout) and takes
its reply from the node's :class:`_ReplyRouter`; it keeps the download's deadline (moved out by
progress) and the donors struck off, and why. :class:`_Donor` is one donor's standing in the
chunk phase: requests in flight, latency, busy refusals and their backoff, and the progress it is
judged by (quiet time, bytes owed at the floor rate). :class:`_ChunkWindow` is how many chunk
requests the newcomer keeps in flight: grown while chunks come quickly, halved when they come
near a donor's silence allowance. A busy refusal raises
:class:`_DonorBusyError`: the donor is healthy and asked again later. Used by
:func:`gossamer.train.state_sync.download_state`, which decides what to ask and whom to strike off.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import weakref
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
class _ChunkWindow:
    """How many chunk requests a newcomer keeps in flight, set by how long its chunks take.

    Every request shares the newcomer's downlink: eight 1 MiB chunks asked at once over
    0.25 Mbit/s took 268 s each, longer than the two minutes a donor may be silent, so every
    honest donor was struck off for the newcomer's own slowness. So the window starts at two
    and follows each chunk that comes (its time on the wire scaled to a full chunk, so a short
    last chunk reads neither fast nor slow): under ``grow_below_s`` it grows by one (at most
    ``max_size``); over ``shrink_above_s`` it halves (at least one); between, it holds.

    Where our own link is the bottleneck, a chunk's time grows with the window (the window
    times a chunk, over the link's rate), so the window settles where chunks take between the
    two marks, inside the silence a donor is allowed. Where the donors are (their uplinks, or
    their time to answer), a chunk's time does not depend on our window, so donors answering
    in under ``grow_below_s`` let it grow to ``max_size``. Nothing is kept per donor and
    nothing sticks: one late chunk halves the window once, and the chunks after it grow it
    back (a rule that judged our link once and for all from one late chunk held a download
    at one request in flight to its end).

    A donor struck off with requests of ours out halves it as well: its chunks go to the
    donors left, and a window grown on three donors' uplinks, put on two slow ones, gave each
    six requests at once, its first chunk (all six share its uplink) later than the silence
    it is allowed, and it was struck off in turn.
    """

    max_size: int
    chunk_bytes: int
    """The manifest's chunk size: what each chunk's time is scaled to."""
    grow_below_s: float
    shrink_above_s: float
    size: int
    """Requests to keep in flight now."""

    def delivered(self, num_bytes: int, wire_s: float) -> None:
        """A chunk of ``num_bytes`` came ``wire_s`` after it was asked: grow, hold or halve."""
        full_chunk_s = wire_s * self.chunk_bytes / max(1, num_bytes)
        if full_chunk_s < self.grow_below_s:
            self.size = min(self.max_size, self.size + 1)
        elif full_chunk_s > self.shrink_above_s:
            self.lost()

    def lost(self) -> None:
        """Halve the window (at least one): a chunk was slow, or a donor was struck off."""
        self.size = max(1, self.size // 2)


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
