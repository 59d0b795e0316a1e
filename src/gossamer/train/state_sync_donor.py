"""The donor side of state sync: serve this peer's latest snapshot to newcomers, chunk by chunk.

A donor serializes each published snapshot once and answers requests on net's bulk topics: a
manifest request gets the newest manifest, a chunk request gets one chunk of the version it names.
The snapshot it replaces stays available while downloads use it (a request for it within the
last ``grace_s``), so a newcomer halfway through a download is not cut off by the next outer step,
however often the donor publishes, nor by other bytes republished under the same version (chunk
requests name the manifest they began on by its hash): of the replaced snapshots, the one a
download uses is kept (the newer of them when both are, or neither). At most two snapshots are
held, and a reply holds a copy of its chunk only, not the snapshot it came from.

Room for requests is shared fairly: a request that finds the donor full is refused as busy
(:data:`~gossamer.train.state_sync_wire.DONOR_BUSY`: ask again later) unless its peer holds less
than its share, in which case a reply of another peer is given up for it: the oldest of the peer
holding the most where that evens them out, else the oldest reply that has waited past the time
its size allows at a low rate (a few seconds for a chunk). Peers that never take their replies
(made-up ids each holding one included) thus hold their room for seconds, not minutes, while a
newcomer behind a slow link keeps the whole time its request asks: nobody takes its room unless
the donor is full and its reply is late.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from gossamer.core.clock import Clock, SystemClock
from gossamer.core.errors import PeerUnavailableError
from gossamer.train.state_sync_wire import (
    DONOR_BUSY,
    MAX_ERROR_BYTES,
    MAX_REQUEST_BYTES,
    MIN_CHUNK_BYTES,
    REPLY_HEADER_BYTES,
    REPLY_TOPIC,
    REQUEST_TOPIC,
    ReplyHeader,
    ReplyStatus,
    Request,
    RequestKind,
    SerializedSnapshot,
    StateSnapshot,
    decode_request,
    encode_reply,
    serialize_snapshot,
)

__all__ = ["BulkEndpoint", "StateDonor"]

_log = logging.getLogger(__name__)
_MAX_SERVED_ENTRIES = 1024
"""Peers whose last request of a version a donor remembers (see
:meth:`StateDonor.serving_idle_s`); past it the oldest half not being sent to is forgotten."""


class BulkEndpoint(Protocol):
    """The two methods of net's :class:`~gossamer.net.node.Node` that state sync uses."""

    @property
    def peer_id(self) -> str: ...

    def on_bulk(
        self,
        topic: str,
        handler: Callable[[str, str, bytearray], Awaitable[None]],
        *,
        max_bytes: int | None = None,
    ) -> None:
        """Deliver complete transfers on ``topic`` to ``handler``; refuse larger ones than
        ``max_bytes`` at their first chunk."""

    async def send_bulk(
        self,
        peer_id: str,
        topic: str,
        payload: bytes | bytearray | memoryview,
        *,
        num_streams: int = 1,
        timeout_s: float = 60.0,
    ) -> None:
        """Send ``payload`` to ``peer_id``'s handler for ``topic``; returns once it was handled."""


@dataclass(slots=True)
class _Served:
    snapshot: SerializedSnapshot
    superseded_at_s: float | None = None
    last_request_s: float = -math.inf
    """When a newcomer last asked for this snapshot's manifest or one of its chunks."""
    num_in_flight: int = 0
    """Requests copying a chunk out of it right now."""


@dataclass(slots=True, eq=False)
class _Slot:
    """One request being served: the room it holds, and the task serving it."""

    started_s: float
    """(The donor's clock) when it was admitted."""
    task: asyncio.Task[None] | None = None
    evicted: bool = False
    """Given up for a peer holding fewer requests."""


class StateDonor:
    """Serves this peer's latest snapshot to newcomers, in chunks, over net's bulk topics.

    Args:
        node: the peer's node (registers its request handler there).
        chunk_bytes: bytes per chunk; donors of one swarm should agree on it, since newcomers
            only combine donors whose manifests are identical.
        grace_s: how long a replaced snapshot stays available after a download last asked for
            it.
        clock: time source for the grace period.
        max_requests_per_peer: requests of one peer served at once; more are refused as
            busy (a newcomer asks at most ``max_chunks_in_flight`` at once, 8 by default). Each
            holds a copy of its chunk until the reply is handled, so one peer holds at most this
            many.
        max_requests: requests served at once, of all peers together (the copies they hold are
            at most this many chunks). Once full, a request is refused as busy, unless its peer
            holds less than its share (``max_requests`` over the peers holding requests, it
            included): then a reply of a peer holding more is given up for it (that request is
            refused as busy): the oldest of the peer holding the most, where it holds two more,
            else the oldest that is late (see ``reply_base_timeout_s``). So peers that fill the
            donor and never take their replies do not lock newcomers out.
        max_reply_timeout_s: longest a reply may take to be handled, whatever the request asks
            (its ``timeout_ms`` may say an hour; the reply's chunk copy is held that long).
            10 minutes: a newcomer behind a thin link shares it among its 8 replies in flight
            (1 MiB each: 67 s at 1 Mbit/s, 134 s at 0.5 Mbit/s); at 120 s a donor serving a
            newcomer under about 0.55 Mbit/s gave up every reply. What replies hold is bounded
            by ``max_requests`` however long they take.
        reply_base_timeout_s: with ``min_reply_bytes_per_s``, when a reply is late: once it has
            waited this plus a chunk's bytes at that rate for each reply its peer is being sent
            (they share its link). A late reply may be given up for a peer holding less, when
            the donor is full; it is never cut short otherwise (a newcomer behind a 4 Mbit/s
            link takes 16 s for 8 chunks of 1 MiB; cut at that allowance, it could not
            download at all).
        min_reply_bytes_per_s: see ``reply_base_timeout_s``.
    """

    def __init__(
        self,
        node: BulkEndpoint,
        *,
        chunk_bytes: int = 1 << 20,
        grace_s: float = 30.0,
        clock: Clock | None = None,
        max_requests_per_peer: int = 16,
        max_requests: int = 256,
        max_reply_timeout_s: float = 600.0,
        reply_base_timeout_s: float = 5.0,
        min_reply_bytes_per_s: float = float(1 << 20),
    ) -> None:
        if type(chunk_bytes) is not int or chunk_bytes < MIN_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be an int >= {MIN_CHUNK_BYTES}, got {chunk_bytes}")
        if grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {grace_s}")
        if max_requests_per_peer < 1 or max_requests < 1 or not max_reply_timeout_s > 0:
            raise ValueError(
                "max_requests_per_peer, max_requests and max_reply_timeout_s must be positive, "
                f"got {max_requests_per_peer}, {max_requests} and {max_reply_timeout_s}"
            )
        if not reply_base_timeout_s > 0 or not min_reply_bytes_per_s > 0:
            raise ValueError(
                "reply_base_timeout_s and min_reply_bytes_per_s must be positive, got "
                f"{reply_base_timeout_s} and {min_reply_bytes_per_s}"
            )
        self._max_requests_per_peer = max_requests_per_peer
        self._max_requests = max_requests
        self._max_reply_timeout_s = max_reply_timeout_s
        self._reply_base_timeout_s = reply_base_timeout_s
        self._min_reply_bytes_per_s = min_reply_bytes_per_s
        self._serving: dict[str, list[_Slot]] = {}
        """Requests being served, by the peer that sent them, oldest first."""
        self._num_serving_all = 0
        self._node = node
        self._chunk_bytes = chunk_bytes
        self._grace_s = grace_s
        self._clock: Clock = clock or SystemClock()
        self._lock = threading.Lock()
        self._current: _Served | None = None
        self._previous: _Served | None = None
        self._closed = False
        self.num_bytes_served = 0
        """Chunk bytes sent to newcomers so far."""
        self.num_requests_refused = 0
        """Requests answered with an error status, refused as malformed or as busy."""
        self.num_requests_evicted = 0
        """Requests whose reply was given up for a peer holding fewer requests."""
        self._served_s: dict[tuple[int, str], float] = {}
        """(The donor's clock) when a manifest or chunk of each version was last asked for or
        taken: see :meth:`serving_idle_s`."""
        self._num_sending: dict[tuple[int, str], int] = {}
        """Manifest and chunk replies being sent right now, by version."""
        node.on_bulk(REQUEST_TOPIC, self._on_request, max_bytes=MAX_REQUEST_BYTES)

    @property
    def version(self) -> int | None:
        """The version of the newest published snapshot (None before the first)."""
        with self._lock:
            return None if self._current is None else self._current.snapshot.manifest.version

    def serving_idle_s(self, version: int, peers: set[str] | None = None) -> float | None:
        """Seconds since this donor last served ``version``: since a request for its manifest
        or a chunk of it came, or the reply was taken; 0 while such a reply is being sent.

        A peer that has run its last step asks this before it leaves: a peer still fetching
        its state shows here, behind a thin link too, where a chunk's reply takes many seconds
        to cross (the reply being sent counts as serving, not only the reply taken).

        Args:
            version: the state's version.
            peers: count only what these peers asked (None: anyone's requests). A finished
                peer counts the members of its run still to agree: counting anyone's, a node
                outside the run that fetched the state every few seconds held every finished
                peer to ``swarm.max_round_timeout_s`` (900 s), not the 20 s wait.

        Returns:
            The seconds, or None where it served nothing of ``version`` (of the versions it
            still holds) to ``peers``.
        """
        with self._lock:

            def counted(key: tuple[int, str]) -> bool:
                return key[0] == version and (peers is None or key[1] in peers)

            if any(counted(k) and n > 0 for k, n in self._num_sending.items()):
                return 0.0
            times = [t for k, t in self._served_s.items() if counted(k)]
            return None if not times else max(0.0, self._clock.monotonic() - max(times))

    def publish(self, snapshot: StateSnapshot, *, max_meta_bytes: int | None = None) -> None:
        """Make ``snapshot`` the one served to newcomers (thread-safe; blocks while serializing).

        Serializes and hashes in the calling thread: call it from the training thread, never from
        the node's event loop. The snapshot's tensors may be changed once this returns.

        Args:
            snapshot: the state to serve.
            max_meta_bytes: where given, the largest meta newcomers accept (their
                ``StateSyncLimits.max_meta_bytes``): a snapshot with a larger one is refused.

        Raises:
            ValueError: the snapshot cannot be serialized (meta not JSON, odd tensors), or its
                meta is larger than ``max_meta_bytes``.
            RuntimeError: the donor is closed.
        """
        serialized = serialize_snapshot(
            snapshot, chunk_bytes=self._chunk_bytes, max_meta_bytes=max_meta_bytes
        )
        with self._lock:
            if self._closed:
                raise RuntimeError("publish on a closed StateDonor")
            old = self._current
            if old is not None and old.snapshot.manifest.sha256 == serialized.manifest.sha256:
                return  # the same state again: downloads on it go on as they were
            if old is not None:
                # (also of the same version with other bytes, republished: a download that
                # began on the old bytes asks for them by their manifest's hash)
                now = self._clock.monotonic()
                previous = self._previous
                # At most two are held: the older of the replaced ones stays only while a
                # download uses it and none uses the newer one.
                if (
                    previous is None
                    or self._requested_lately(old, now)
                    or not self._requested_lately(previous, now)
                ):
                    self._previous = old
                old.superseded_at_s = now
            self._current = _Served(snapshot=serialized)
            # (one entry per version held or still being sent: not one per outer step run)
            held = {
                served.snapshot.manifest.version
                for served in (self._current, self._previous)
                if served is not None
            }
            self._served_s = {
                k: served_s
                for k, served_s in self._served_s.items()
                if k[0] in held or self._num_sending.get(k, 0) > 0
            }
        _log.info(
            "peer %s: serving state version %d (%d bytes, %d chunks)",
            self._node.peer_id[:8],
            snapshot.version,
            serialized.manifest.total_bytes,
            serialized.manifest.num_chunks,
        )

    def close(self) -> None:
        """Stop serving: drop the snapshots; later requests are answered ``CLOSED``."""
        with self._lock:
            self._closed = True
            self._current = self._previous = None

    @property
    def _num_serving(self) -> dict[str, int]:
        """(Diagnostics.) Requests being served, by the peer that sent them."""
        with self._lock:
            return {peer: len(slots) for peer, slots in self._serving.items()}

    def _requested_lately(self, served: _Served, now: float) -> bool:
        """Whether a download uses ``served``: a request for it is being served, or came within
        the grace period."""
        return served.num_in_flight > 0 or now - served.last_request_s <= self._grace_s

    def _find(self, version: int, manifest_sha256: str = "") -> _Served | None:
        """The snapshot a chunk request names: by its manifest's hash where it gives one, else
        by version (the newest of it)."""
        with self._lock:
            now = self._clock.monotonic()
            previous = self._previous
            if (
                previous is not None
                and not self._requested_lately(previous, now)
                and previous.superseded_at_s is not None
                and now - previous.superseded_at_s > self._grace_s
            ):
                self._previous = previous = None
            for served in (self._current, previous):
                if served is None:
                    continue
                manifest = served.snapshot.manifest
                if manifest.version == version and manifest_sha256 in ("", manifest.sha256):
                    served.num_in_flight += 1
                    served.last_request_s = now
                    return served
            return None

    def _done(self, served: _Served) -> None:
        with self._lock:
            served.num_in_flight -= 1

    async def _on_request(self, sender: str, topic: str, payload: bytearray) -> None:
        try:
            request = decode_request(payload)
        except Exception:
            with self._lock:
                self.num_requests_refused += 1
            raise  # net refuses the transfer; the sender sees a ProtocolError
        slot = self._admit(sender)
        # Served in a task of its own, so that giving its room to another peer cancels it
        # alone (not net's handler, which then answers this request as busy).
        serving = asyncio.get_running_loop().create_task(
            self._serve(sender, request), name=f"state-reply-{sender[:8]}"
        )
        slot.task = serving
        try:
            await serving
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if slot.evicted and (task is None or not task.cancelling()):
                raise PeerUnavailableError(
                    f"{DONOR_BUSY}: this request's reply was given up for a peer holding fewer "
                    "requests (this peer held the most): ask again later"
                ) from None
            raise
        finally:
            self._release(sender, slot)

    async def _serve(self, sender: str, request: Request) -> None:
        if request.kind is RequestKind.MANIFEST:
            await self._serve_manifest(sender, request)
        else:
            await self._serve_chunk(sender, request)

    def _admit(self, sender: str) -> _Slot:
        """Room for one more request of ``sender``, given up by the peer holding the most where
        the donor is full and ``sender`` holds less than its share (event loop only).

        Raises:
            PeerUnavailableError: busy (:data:`DONOR_BUSY`): ``sender`` holds its most already,
                or the donor is full and it holds its share.
        """
        with self._lock:
            held = self._serving.get(sender, [])
            if len(held) >= self._max_requests_per_peer:
                self.num_requests_refused += 1
                raise PeerUnavailableError(
                    f"{DONOR_BUSY}: {len(held)} requests of this peer are being served already "
                    f"(at most {self._max_requests_per_peer}): ask again once some are answered"
                )
            if self._num_serving_all >= self._max_requests:
                victim = self._victim_for(sender, len(held))
                if victim is None:
                    self.num_requests_refused += 1
                    raise PeerUnavailableError(
                        f"{DONOR_BUSY}: {self._num_serving_all} requests are being served "
                        f"already (at most {self._max_requests}), {len(held)} of this peer, its "
                        "share or more: ask again later, or ask another donor"
                    )
                victim_peer, victim_slot = victim
                self._forget_slot(victim_peer, victim_slot)
                victim_slot.evicted = True
                assert victim_slot.task is not None
                victim_slot.task.cancel()
                self.num_requests_evicted += 1
                _log.info(
                    "peer %s: gave a request of peer %s up for one of peer %s (%d held, of %d)",
                    self._node.peer_id[:8],
                    victim_peer[:8],
                    sender[:8],
                    len(held),
                    self._max_requests,
                )
            slot = _Slot(self._clock.monotonic())
            self._serving.setdefault(sender, []).append(slot)
            self._num_serving_all += 1
            return slot

    def _victim_for(self, sender: str, num_held: int) -> tuple[str, _Slot] | None:
        """(Lock held, donor full.) A request to give up for ``sender``, which holds
        ``num_held``, where that is less than its share: the oldest of the peer holding the
        most, where it holds at least two more (the move evens them out); else the oldest late
        one (:meth:`_late_after_s`) of a peer holding more than ``sender`` (many peers holding
        one each, never taking their replies, left a newcomer holding none no room)."""
        num_peers = len(self._serving) + (sender not in self._serving)
        if num_held * num_peers >= self._max_requests:  # its share or more
            return None
        candidates = [(len(slots), peer) for peer, slots in self._serving.items() if peer != sender]
        if not candidates:
            return None
        num_most, peer = max(candidates)
        if num_most >= num_held + 2:
            for slot in self._serving[peer]:  # its oldest still waiting
                if slot.task is not None and not slot.task.done():
                    return peer, slot
        now = self._clock.monotonic()
        late: list[tuple[float, str, _Slot]] = []
        for other, slots in self._serving.items():
            if other == sender or len(slots) <= num_held:
                continue
            late_after_s = self._late_after_s(len(slots))
            for slot in slots:  # its oldest still waiting, if late
                if slot.task is not None and not slot.task.done():
                    if now - slot.started_s > late_after_s:
                        late.append((slot.started_s, other, slot))
                    break
        if not late:
            return None
        _, other, slot = min(late, key=lambda found: found[0])
        return other, slot

    def _late_after_s(self, num_replies: int) -> float:
        """How long a reply may wait before it counts as late, its peer being sent
        ``num_replies`` at once: a base, and a chunk's bytes at the least rate for each."""
        return (
            self._reply_base_timeout_s
            + num_replies * self._chunk_bytes / self._min_reply_bytes_per_s
        )

    def _forget_slot(self, sender: str, slot: _Slot) -> None:
        """(Lock held.) Give ``slot``'s room back, once."""
        slots = self._serving.get(sender)
        if slots is None or slot not in slots:
            return  # given up for another peer already
        slots.remove(slot)
        if not slots:
            del self._serving[sender]
        self._num_serving_all -= 1

    def _release(self, sender: str, slot: _Slot) -> None:
        with self._lock:
            self._forget_slot(sender, slot)

    def _reply_timeout_s(self, request: Request) -> float:
        """How long a reply may take to be handled: what its request asks, at most
        ``max_reply_timeout_s`` (a late one may be given up sooner for a peer holding less)."""
        return min(request.timeout_ms / 1000, self._max_reply_timeout_s)

    async def _serve_manifest(self, sender: str, request: Request) -> None:
        with self._lock:
            closed, current = self._closed, self._current
            if current is not None:
                current.last_request_s = self._clock.monotonic()  # a download starts on it
        if current is None:
            status = ReplyStatus.CLOSED if closed else ReplyStatus.NOTHING_PUBLISHED
            await self._refuse(sender, request, status, "no snapshot published")
            return
        reply = self._ok_reply(request, current, current.snapshot.manifest_bytes)
        version = current.snapshot.manifest.version
        del current  # the reply holds a copy: the snapshot may go while it is sent
        await self._send_serving(sender, request, reply, version)

    async def _serve_chunk(self, sender: str, request: Request) -> None:
        served = self._find(request.version, request.manifest_sha256)
        if served is None:
            with self._lock:
                closed = self._closed
            status = ReplyStatus.CLOSED if closed else ReplyStatus.VERSION_GONE
            held = f"version {request.version}" + (
                f" of manifest {request.manifest_sha256[:12]}" if request.manifest_sha256 else ""
            )
            await self._refuse(sender, request, status, f"{held} not held")
            return
        try:
            num_chunks = served.snapshot.manifest.num_chunks
            reply = self._chunk_reply(request, served) if request.index < num_chunks else None
        finally:
            self._done(served)
        # Nothing of the snapshot is referenced past here: a reply that takes long to be
        # handled holds its own chunk, never the whole snapshot (one of each published
        # version used to stay alive while a slow requester's replies were on their way).
        del served
        if reply is None:
            await self._refuse(
                sender, request, ReplyStatus.BAD_REQUEST, f"chunk {request.index} of {num_chunks}"
            )
            return
        await self._send_serving(sender, request, reply, request.version)
        with self._lock:
            self.num_bytes_served += len(reply) - REPLY_HEADER_BYTES

    async def _send_serving(
        self, sender: str, request: Request, reply: bytes, version: int
    ) -> None:
        """Send a manifest or chunk reply of ``version``, counted as serving it while it is
        sent and when it was taken (see :meth:`serving_idle_s`)."""
        key = (version, sender)
        with self._lock:
            if key not in self._served_s and len(self._served_s) >= _MAX_SERVED_ENTRIES:
                # (many identities asking: the oldest not being sent to go first)
                idle = sorted(
                    (t, k) for k, t in self._served_s.items() if k not in self._num_sending
                )
                for _, stale in idle[: len(idle) // 2 + 1]:
                    del self._served_s[stale]
            self._served_s[key] = self._clock.monotonic()
            self._num_sending[key] = self._num_sending.get(key, 0) + 1
        try:
            await self._send(sender, request, reply)
            with self._lock:
                self._served_s[key] = self._clock.monotonic()
        finally:
            with self._lock:
                left = self._num_sending[key] - 1
                if left:
                    self._num_sending[key] = left
                else:
                    del self._num_sending[key]

    def _chunk_reply(self, request: Request, served: _Served) -> bytes:
        start, stop = served.snapshot.manifest.chunk_range(request.index)
        return self._ok_reply(request, served, memoryview(served.snapshot.blob)[start:stop])

    def _ok_reply(self, request: Request, served: _Served, body: bytes | memoryview) -> bytes:
        header = ReplyHeader(
            kind=request.kind,
            status=ReplyStatus.OK,
            request_id=request.request_id,
            version=served.snapshot.manifest.version,
            index=request.index,
            body_bytes=len(body),
        )
        return encode_reply(header, body)

    async def _send(self, sender: str, request: Request, reply: bytes) -> None:
        await self._node.send_bulk(
            sender, REPLY_TOPIC, reply, timeout_s=self._reply_timeout_s(request)
        )

    async def _refuse(
        self, sender: str, request: Request, status: ReplyStatus, reason: str
    ) -> None:
        with self._lock:
            self.num_requests_refused += 1
        body = reason.encode()[:MAX_ERROR_BYTES]
        header = ReplyHeader(
            kind=request.kind,
            status=status,
            request_id=request.request_id,
            version=request.version,
            index=request.index,
            body_bytes=len(body),
        )
        await self._send(sender, request, encode_reply(header, body))
