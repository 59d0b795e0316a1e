"""The donor side of state sync: serve this peer's latest snapshot to newcomers, chunk by chunk.

A donor serializes each published snapshot once and answers requests on net's bulk topics: a
manifest request gets the newest manifest, a chunk request gets one chunk of the version it names.
The snapshot it replaces stays available for ``grace_s`` (and while requests for it are in flight),
so a newcomer halfway through a download is not cut off by the next outer step; at most two
snapshots are ever held.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from gossamer.core.clock import Clock, SystemClock
from gossamer.core.errors import PeerUnavailableError
from gossamer.train.state_sync_wire import (
    MAX_ERROR_BYTES,
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
_MIN_CHUNK_BYTES = 4096


class BulkEndpoint(Protocol):
    """The two methods of net's :class:`~gossamer.net.node.Node` that state sync uses."""

    @property
    def peer_id(self) -> str: ...

    def on_bulk(
        self, topic: str, handler: Callable[[str, str, bytearray], Awaitable[None]]
    ) -> None:
        """Deliver complete transfers on ``topic`` to ``handler``."""

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
    num_in_flight: int = 0


class StateDonor:
    """Serves this peer's latest snapshot to newcomers, in chunks, over net's bulk topics.

    Args:
        node: the peer's node (registers its request handler there).
        chunk_bytes: bytes per chunk; donors of one swarm should agree on it, since newcomers
            only combine donors whose manifests are identical.
        grace_s: how long a replaced snapshot stays available to downloads in progress.
        clock: time source for the grace period.
        max_requests_per_peer: requests of one peer served at once; more are refused (a
            newcomer asks at most ``max_chunks_in_flight`` at once, 8 by default). Each holds a
            copy of its chunk until the reply is handled, so one peer holds at most this many.
        max_reply_timeout_s: longest a reply may take to be handled, whatever the request asks
            (its ``timeout_ms`` may say an hour; the reply's chunk copy is held that long).
    """

    def __init__(
        self,
        node: BulkEndpoint,
        *,
        chunk_bytes: int = 1 << 20,
        grace_s: float = 30.0,
        clock: Clock | None = None,
        max_requests_per_peer: int = 16,
        max_reply_timeout_s: float = 120.0,
    ) -> None:
        if type(chunk_bytes) is not int or chunk_bytes < _MIN_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be an int >= {_MIN_CHUNK_BYTES}, got {chunk_bytes}")
        if grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {grace_s}")
        if max_requests_per_peer < 1 or not max_reply_timeout_s > 0:
            raise ValueError(
                "max_requests_per_peer and max_reply_timeout_s must be positive, got "
                f"{max_requests_per_peer} and {max_reply_timeout_s}"
            )
        self._max_requests_per_peer = max_requests_per_peer
        self._max_reply_timeout_s = max_reply_timeout_s
        self._num_serving: dict[str, int] = {}
        """Requests being served, by the peer that sent them."""
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
        """Requests answered with an error status or refused as malformed."""
        node.on_bulk(REQUEST_TOPIC, self._on_request)

    @property
    def version(self) -> int | None:
        """The version of the newest published snapshot (None before the first)."""
        with self._lock:
            return None if self._current is None else self._current.snapshot.manifest.version

    def publish(self, snapshot: StateSnapshot) -> None:
        """Make ``snapshot`` the one served to newcomers (thread-safe; blocks while serializing).

        Serializes and hashes in the calling thread: call it from the training thread, never from
        the node's event loop. The snapshot's tensors may be changed once this returns.

        Raises:
            ValueError: the snapshot cannot be serialized (meta not JSON, odd tensors).
            RuntimeError: the donor is closed.
        """
        serialized = serialize_snapshot(snapshot, chunk_bytes=self._chunk_bytes)
        with self._lock:
            if self._closed:
                raise RuntimeError("publish on a closed StateDonor")
            old = self._current
            if old is not None and old.snapshot.manifest.version != snapshot.version:
                old.superseded_at_s = self._clock.monotonic()
                self._previous = old  # the one before it is dropped: at most two are held
            self._current = _Served(snapshot=serialized)
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

    def _find(self, version: int) -> _Served | None:
        with self._lock:
            previous = self._previous
            if (
                previous is not None
                and previous.num_in_flight == 0
                and previous.superseded_at_s is not None
                and self._clock.monotonic() - previous.superseded_at_s > self._grace_s
            ):
                self._previous = previous = None
            for served in (self._current, previous):
                if served is not None and served.snapshot.manifest.version == version:
                    served.num_in_flight += 1
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
        with self._lock:
            num_serving = self._num_serving.get(sender, 0)
            if num_serving >= self._max_requests_per_peer:
                self.num_requests_refused += 1
                raise PeerUnavailableError(
                    f"{num_serving} requests of this peer are being served already (at most "
                    f"{self._max_requests_per_peer}): ask again once some are answered"
                )
            self._num_serving[sender] = num_serving + 1
        try:
            if request.kind is RequestKind.MANIFEST:
                await self._serve_manifest(sender, request)
            else:
                await self._serve_chunk(sender, request)
        finally:
            with self._lock:
                self._num_serving[sender] -= 1
                if not self._num_serving[sender]:
                    del self._num_serving[sender]

    def _reply_timeout_s(self, request: Request) -> float:
        return min(request.timeout_ms / 1000, self._max_reply_timeout_s)

    async def _serve_manifest(self, sender: str, request: Request) -> None:
        with self._lock:
            closed, current = self._closed, self._current
        if current is None:
            status = ReplyStatus.CLOSED if closed else ReplyStatus.NOTHING_PUBLISHED
            await self._refuse(sender, request, status, "no snapshot published")
            return
        await self._reply(sender, request, current.snapshot.manifest_bytes, current)

    async def _serve_chunk(self, sender: str, request: Request) -> None:
        served = self._find(request.version)
        if served is None:
            with self._lock:
                closed = self._closed
            status = ReplyStatus.CLOSED if closed else ReplyStatus.VERSION_GONE
            await self._refuse(sender, request, status, f"version {request.version} not held")
            return
        try:
            manifest = served.snapshot.manifest
            if request.index >= manifest.num_chunks:
                await self._refuse(
                    sender,
                    request,
                    ReplyStatus.BAD_REQUEST,
                    f"chunk {request.index} of {manifest.num_chunks}",
                )
                return
            start, stop = manifest.chunk_range(request.index)
            body = memoryview(served.snapshot.blob)[start:stop]
            await self._reply(sender, request, body, served)
            with self._lock:
                self.num_bytes_served += stop - start
        finally:
            self._done(served)

    async def _reply(
        self, sender: str, request: Request, body: bytes | memoryview, served: _Served
    ) -> None:
        header = ReplyHeader(
            kind=request.kind,
            status=ReplyStatus.OK,
            request_id=request.request_id,
            version=served.snapshot.manifest.version,
            index=request.index,
            body_bytes=len(body),
        )
        await self._node.send_bulk(
            sender,
            REPLY_TOPIC,
            encode_reply(header, body),
            timeout_s=self._reply_timeout_s(request),
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
        await self._node.send_bulk(
            sender,
            REPLY_TOPIC,
            encode_reply(header, body),
            timeout_s=self._reply_timeout_s(request),
        )
