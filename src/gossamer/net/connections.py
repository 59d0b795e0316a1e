"""Outgoing connections: dial with a deadline, authenticate, call with retries, close cleanly.

A connection is a gRPC channel pinned to the remote's TLS certificate plus the session token the
remote granted in the handshake. The pool keeps one per remote peer, redials after a broken one,
retries retryable errors with backoff and jitter, and guards each peer with a circuit breaker.
gRPC's errors become Gossamer's here.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.message import Message

from gossamer.core.clock import Clock
from gossamer.core.errors import (
    AuthenticationError,
    DeadlineExceededError,
    GossamerError,
    PeerLostError,
    PeerUnavailableError,
    ProtocolError,
    RetryableError,
)
from gossamer.net.circuit_breaker import CircuitBreaker, CircuitBreakers
from gossamer.net.config import NodeConfig
from gossamer.net.counters import NetCounters
from gossamer.net.grpc_errors import answered_by_handler, error_of_rpc_error
from gossamer.net.handshake import SESSION_METADATA_KEY, ClientHandshake
from gossamer.net.identity import Identity, short_peer_id
from gossamer.net.retry import retry_async
from gossamer.net.server import grpc_options
from gossamer.net.tls import TLS_SERVER_NAME, cert_pem_of_der, probe_server_certificate
from gossamer.proto import net_pb2

__all__ = ["ConnectionPool", "DialTarget", "PeerConnection", "ended_under_call"]

_log = logging.getLogger(__name__)
R = TypeVar("R", bound=Message)
_HELLO = "/gossamer.net.v1.Handshake/Hello"
_PROVE = "/gossamer.net.v1.Handshake/Prove"


@dataclass(frozen=True, slots=True)
class DialTarget:
    """One way to reach a peer."""

    address: str
    """HOST:PORT to open the TLS connection to (a relay tunnel's local entrance for relayed)."""
    kind: str = "direct"
    """``direct`` or ``relayed``."""
    cert_der: bytes = b""
    """The peer's TLS certificate if known (from its record); probed otherwise."""
    open_entrance: Callable[[], Awaitable[str]] | None = field(default=None, compare=False)
    """For tunnels: prepares the local entrance and returns its HOST:PORT (used over address)."""
    tunnel_refusal: Callable[[], str | None] | None = field(default=None, compare=False)
    """For tunnels: why the relay refused (or could not carry) a tunnel through the entrance
    since :attr:`open_entrance` last opened it, or None. A refused tunnel reaches gRPC only as
    a closed socket ("Handshake read failed"); the dial's error says this instead."""
    via: str = ""
    """For a tunnel through a relay: the relay's peer id (a relay that hangs takes the
    connections through it down with it)."""


@dataclass(slots=True)
class PeerConnection:
    """An authenticated channel to one remote peer."""

    peer_id: str
    """The remote's proven peer id."""
    target: DialTarget
    """How it was reached."""
    channel: grpc.aio.Channel
    """The pinned TLS channel."""
    metadata: tuple[tuple[str, str], ...]
    """Sent with every call (the session token)."""
    opened_at_s: float
    """Monotonic time it was opened."""
    last_life_s: float = 0.0
    """Monotonic time the connection last showed life: a call on it through the pool or a bulk
    transfer on it completed (or its handler answered), or a streaming call on it took its next
    message (the previous one was written, so the peer's flow-control window let it through: a
    bulk transfer or a tunnel making progress)."""
    num_uploads: int = 0
    """Bulk transfers (:func:`gossamer.net.bulk.send_bulk`) under way on it. One chunk of a
    transfer (up to 4 MiB, a unary call) shows no life until it is through, ~35 s on a 1 Mbit/s
    link: while one is under way, :meth:`ConnectionPool.drop_if_silent` keeps the connection,
    and a call on it that runs out of time is not counted in the peer's circuit breaker (it
    queued behind the upload's data)."""
    _callables: dict[tuple[str, str], Any] = field(default_factory=dict)

    def unary_unary(self, method: str, response_type: type[R]) -> Any:
        """A cached unary callable for ``method``."""
        key = ("uu", method)
        callable_ = self._callables.get(key)
        if callable_ is None:
            callable_ = self.channel.unary_unary(
                method,
                request_serializer=_serialize,
                response_deserializer=response_type.FromString,
            )
            self._callables[key] = callable_
        return callable_

    def unary_stream(self, method: str, response_type: type[R]) -> Any:
        """A cached server-streaming callable for ``method``."""
        return self._cached("us", method, response_type, self.channel.unary_stream)

    def stream_stream(self, method: str, response_type: type[R]) -> Any:
        """A cached bidirectional-streaming callable for ``method``."""
        return self._cached("ss", method, response_type, self.channel.stream_stream)

    def _cached(self, kind: str, method: str, response_type: type[R], make: Any) -> Any:
        callable_ = self._callables.get((kind, method))
        if callable_ is None:
            callable_ = make(
                method,
                request_serializer=_serialize,
                response_deserializer=response_type.FromString,
            )
            self._callables[(kind, method)] = callable_
        return callable_

    def stream_unary(self, method: str, response_type: type[R]) -> Any:
        """A cached client-streaming callable for ``method``."""
        key = ("su", method)
        callable_ = self._callables.get(key)
        if callable_ is None:
            callable_ = self.channel.stream_unary(
                method,
                request_serializer=_serialize,
                response_deserializer=response_type.FromString,
            )
            self._callables[key] = callable_
        return callable_


def _serialize(message: Message) -> bytes:
    return bytes(message.SerializeToString())


class _LivelyChannel:
    """A channel that notes on its connection each message a streaming call on it takes after
    the first (the one before was written): progress of a bulk transfer or a tunnel is life,
    though a heartbeat's answer queued behind it on a thin link came too late."""

    def __init__(self, channel: grpc.aio.Channel, clock: Clock) -> None:
        self._channel = channel
        self._clock = clock
        self.connection: PeerConnection | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)

    def _note(self) -> None:
        if self.connection is not None:
            self.connection.last_life_s = self._clock.monotonic()

    def stream_unary(self, method: str, **kwargs: Any) -> Any:
        """The channel's callable, its request iterator watched."""
        return _Watched(self._channel.stream_unary(method, **kwargs), self._note)

    def stream_stream(self, method: str, **kwargs: Any) -> Any:
        """The channel's callable, its request iterator watched."""
        return _Watched(self._channel.stream_stream(method, **kwargs), self._note)


class _Watched:
    """A streaming callable whose request iterator calls ``note`` at each message past the
    first."""

    def __init__(self, callable_: Any, note: Callable[[], None]) -> None:
        self._callable = callable_
        self._note = note

    def __call__(self, request_iterator: Any = None, **kwargs: Any) -> Any:
        if request_iterator is not None:
            request_iterator = _noting(request_iterator, self._note)
        return self._callable(request_iterator, **kwargs)


async def _noting(requests: Any, note: Callable[[], None]) -> AsyncIterator[Any]:
    first = True
    if hasattr(requests, "__aiter__"):
        async for request in requests:
            if not first:
                note()
            first = False
            yield request
    else:
        for request in requests:
            if not first:
                note()
            first = False
            yield request


def ended_under_call(peer_id: str) -> PeerUnavailableError | None:
    """For a gRPC call that ended in ``CancelledError``: the error to raise instead, or None
    when the cancellation is the calling task's own (then it must go on).

    gRPC also ends a call with ``CancelledError`` when the call's channel was closed under it
    (the connection to the peer was dropped while the call ran). Passed on, that would look to
    the caller like its own cancellation.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        return None
    return PeerUnavailableError(
        f"call to {short_peer_id(peer_id)} ended: its connection was closed under it"
    )


class ConnectionPool:
    """Connections to remote peers, one per peer id (an async context manager).

    Args:
        identity: this node's identity.
        config: the node config.
        clock: time source for deadlines and backoff.
        counters: where traffic, latency and errors are counted.
        resolve: the ways to reach a peer id (from the peer directory and relays).
        own_record: this node's current peer record, sent in the handshake.
        link_busy: whether another connection to a peer has a bulk upload under way (for a
            DHT control pool: its calls queue in the link behind the data connection's upload,
            so a call that times out then counts in the breaker as neither success nor failure,
            as one behind an upload on its own connection does, see :meth:`_count_in_breaker`).
            None: only uploads on the call's own connection count.
    """

    def __init__(
        self,
        identity: Identity,
        config: NodeConfig,
        clock: Clock,
        counters: NetCounters,
        resolve: Callable[[str], list[DialTarget]],
        own_record: Callable[[], net_pb2.SignedPeerRecord | None],
        *,
        link_busy: Callable[[str], bool] | None = None,
    ) -> None:
        self._identity = identity
        self._config = config
        self._clock = clock
        self._counters = counters
        self._resolve = resolve
        self._own_record = own_record
        self._link_busy = link_busy
        self._connections: dict[str, PeerConnection] = {}
        self._dial_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        """Held by dials (and their waiters) only: a lock no one uses goes by itself."""
        self._retired: list[PeerConnection] = []
        self.breakers = CircuitBreakers(config.breaker, clock)
        """One circuit breaker per remote peer."""
        self._rng = random.Random()
        self._closed = False

    @property
    def config(self) -> NodeConfig:
        """The node config the pool dials and calls with."""
        return self._config

    @property
    def clock(self) -> Clock:
        """The pool's time source."""
        return self._clock

    def get(self, peer_id: str) -> PeerConnection | None:
        """The open connection to a peer, if any."""
        return self._connections.get(peer_id)

    @property
    def peer_ids(self) -> list[str]:
        """Peers with an open connection."""
        return list(self._connections)

    async def dial(
        self,
        target: DialTarget,
        *,
        expected_peer_id: str | None,
        timeout_s: float | None = None,
        retire_previous: bool = False,
        keep: bool = True,
    ) -> PeerConnection:
        """Open and authenticate a connection.

        Args:
            target: where to connect.
            expected_peer_id: the peer that must be there; None accepts whoever proves an id.
            timeout_s: deadline of the whole dial (probe, TLS, handshake).
            retire_previous: keep a replaced connection open for the calls running on it, until
                :meth:`close_retired` (an upgrade); otherwise it is closed at once.
            keep: False to only prove the peer can be reached there (a dial back): the new
                connection is closed at once and the pool's connection to the peer, if any, is
                left as it is.

        Raises:
            PeerUnavailableError: nothing answers at the address.
            DeadlineExceededError: the dial ran past its deadline.
            AuthenticationError: the peer is not who it should be, or the swarm secret differs.
        """
        if self._closed:
            raise PeerUnavailableError("the connection pool is closed")
        timeout_s = timeout_s or self._config.connect_timeout_s
        deadline = self._clock.monotonic() + timeout_s
        address = target.address
        if target.open_entrance is not None:
            address = await with_deadline(target.open_entrance(), timeout_s, "opening a tunnel")
        cert_der = target.cert_der
        if not cert_der:
            cert_der = await probe_server_certificate(address, timeout_s)
        channel = grpc.aio.secure_channel(
            address,
            grpc.ssl_channel_credentials(root_certificates=cert_pem_of_der(cert_der)),
            options=[
                *grpc_options(self._config),
                ("grpc.ssl_target_name_override", TLS_SERVER_NAME),
                ("grpc.use_local_subchannel_pool", 1),
                ("grpc.initial_reconnect_backoff_ms", 100),
            ],
        )
        handshake = ClientHandshake(
            self._identity,
            hashlib.sha256(cert_der).digest(),
            self._config.swarm_secret,
            expected_peer_id,
        )
        where = expected_peer_id or target.address
        try:
            hello = channel.unary_unary(
                _HELLO,
                request_serializer=_serialize,
                response_deserializer=net_pb2.HelloResponse.FromString,
            )
            prove = channel.unary_unary(
                _PROVE,
                request_serializer=_serialize,
                response_deserializer=net_pb2.ProveResponse.FromString,
            )
            response = await hello(handshake.hello(), timeout=self._remaining(deadline, where))
            peer_id, proof = handshake.prove(response, self._own_record())
            granted = await prove(proof, timeout=self._remaining(deadline, where))
        except grpc.aio.AioRpcError as exc:
            await channel.close(None)
            error = error_of_rpc_error(exc, where, "handshake")
            if target.tunnel_refusal is not None and (refusal := target.tunnel_refusal()):
                error = type(error)(refusal)
            elif isinstance(error, AuthenticationError):  # (refused for the secret: say so)
                error = handshake.refusal(error, target.address)
            self._counters.error(error)
            raise error from exc
        except BaseException as exc:
            await channel.close(None)
            if isinstance(exc, GossamerError):
                self._counters.error(exc)
            raise
        if not keep:
            await channel.close(None)
        lively = _LivelyChannel(channel, self._clock)
        connection = PeerConnection(
            peer_id=peer_id,
            target=target,
            channel=cast(grpc.aio.Channel, lively),
            metadata=((SESSION_METADATA_KEY, granted.session_token),),
            opened_at_s=self._clock.monotonic(),
            last_life_s=self._clock.monotonic(),
        )
        lively.connection = connection
        if not keep:
            return connection
        # A fresh connection: its breaker, opened by calls on one silently dead (each timing
        # out), lets the next call through as a trial (a live peer back on a new connection
        # stayed refused, its bootstrap too, until the breaker's open time ran out). Not
        # closed: a peer that answers handshakes and hangs on calls would be tried in full.
        if peer_id in self.breakers:
            self.breakers[peer_id].half_open()
        previous = self._connections.get(peer_id)
        self._connections[peer_id] = connection
        self._counters.connections[target.kind] += 1
        if previous is not None and retire_previous:
            self._counters.connections[previous.target.kind] -= 1
            self._retired.append(previous)
        elif previous is not None:
            await self._close_connection(previous)
        _log.debug(
            "peer %s: connected to %s at %s (%s)",
            short_peer_id(self._identity.peer_id),
            short_peer_id(peer_id),
            target.address,
            target.kind,
        )
        return connection

    def _remaining(self, deadline: float, where: str) -> float:
        remaining = deadline - self._clock.monotonic()
        if remaining <= 0:
            raise DeadlineExceededError(f"connecting to {where} ran past its deadline")
        return remaining

    def forget(self, peer_id: str) -> None:
        """Drop the breaker of a peer that left the directory: peers come and go, breakers
        must not pile up (dial locks go by themselves once no dial holds them)."""
        self.breakers.forget(peer_id)

    def dial_lock(self, peer_id: str) -> asyncio.Lock:
        """The lock :meth:`connection` holds while it dials ``peer_id``."""
        lock = self._dial_locks.get(peer_id)
        if lock is None:
            lock = self._dial_locks[peer_id] = asyncio.Lock()
        return lock

    async def connection(self, peer_id: str, timeout_s: float | None = None) -> PeerConnection:
        """The connection to ``peer_id``, dialing it (each known way in turn) if needed.

        Raises:
            PeerUnavailableError: no known way to reach the peer worked, or its breaker is open.
        """
        existing = self._connections.get(peer_id)
        if existing is not None:
            return existing
        budget_s = timeout_s or self._config.connect_timeout_s
        deadline = self._clock.monotonic() + budget_s
        lock = self.dial_lock(peer_id)
        try:
            # Another call's dial of the peer is waited for within this call's own deadline (a
            # heartbeat of 2.5 s waited out a bulk transfer's dial of 60 s: a frozen peer was
            # declared gone that late).
            async with asyncio.timeout(budget_s):
                await lock.acquire()
        except TimeoutError:
            raise DeadlineExceededError(
                f"connecting to {short_peer_id(peer_id)}: another dial of it took the whole "
                f"{budget_s:.1f} s"
            ) from None
        try:
            existing = self._connections.get(peer_id)
            if existing is not None:
                return existing
            targets = list({(t.address, t.kind): t for t in self._resolve(peer_id)}.values())
            if not targets:
                raise PeerUnavailableError(f"no known address for peer {short_peer_id(peer_id)}")
            # One deadline for all the ways in, shared by those not tried yet (one that fails
            # at once leaves its share to the rest): a record listing many addresses that never
            # answer must not make one call take a dial timeout per address, and a first one
            # that hangs must not leave the next none.
            last: GossamerError | None = None
            for num_left in range(len(targets), 0, -1):
                target = targets[-num_left]
                remaining_s = deadline - self._clock.monotonic()
                if remaining_s <= 0:
                    break
                share_s = remaining_s / num_left
                try:
                    return await self.dial(target, expected_peer_id=peer_id, timeout_s=share_s)
                except (RetryableError, ProtocolError) as exc:
                    last = exc
            if last is None:
                raise DeadlineExceededError(
                    f"connecting to {short_peer_id(peer_id)} ran past its deadline"
                )
            raise last
        finally:
            lock.release()

    async def call(
        self,
        peer_id: str,
        method: str,
        request: Message,
        response_type: type[R],
        *,
        timeout_s: float | None = None,
        retry: bool = True,
        use_breaker: bool = True,
    ) -> R:
        """One unary call to a peer, with breaker, retries and error mapping.

        Args:
            peer_id: the remote peer.
            method: the full method path, e.g. ``/gossamer.net.v1.Dht/Ping``.
            request: the request message.
            response_type: the response message class.
            timeout_s: deadline of each attempt (the node's rpc_timeout_s by default).
            retry: retry retryable errors under the retry config; False for one attempt.
            use_breaker: go through the peer's circuit breaker (refused at once while it is
                open) and count the outcome in it. False for heartbeats: they are how a peer's
                liveness is told, and other calls' failures (a slow handler past the caller's
                deadline) opened the breaker and made a live peer look gone. A call that
                runs out of time while a bulk upload is under way on its connection counts as
                neither success nor failure (see :meth:`_count_in_breaker`). A heartbeat that
                runs past its deadline closes its connection if nothing on it showed life
                for ``keepalive_interval_s + keepalive_timeout_s`` and no bulk upload is under
                way on it (see :meth:`drop_if_silent`): the next one dials afresh.

        Raises:
            GossamerError: the mapped error of the last attempt.
        """
        timeout_s = timeout_s or self._config.rpc_timeout_s

        async def attempt() -> R:
            if not use_breaker:
                return await self._call_through(
                    None, peer_id, method, request, response_type, timeout_s
                )
            return await self._call_once(peer_id, method, request, response_type, timeout_s)

        if not retry:
            return await attempt()

        def count_retry(exc: BaseException) -> None:
            self._counters.num_retries += 1

        return await retry_async(
            attempt,
            config=self._config.retry,
            clock=self._clock,
            what=f"{method} to {short_peer_id(peer_id)}",
            rng=self._rng,
            on_retry=count_retry,
        )

    async def _call_once(
        self, peer_id: str, method: str, request: Message, response_type: type[R], timeout_s: float
    ) -> R:
        breaker = self.breakers[peer_id]
        trial = breaker.before_call()
        try:
            return await self._call_through(
                breaker, peer_id, method, request, response_type, timeout_s
            )
        finally:
            if trial:
                breaker.settled()

    async def _call_through(
        self,
        breaker: CircuitBreaker | None,
        peer_id: str,
        method: str,
        request: Message,
        response_type: type[R],
        timeout_s: float,
    ) -> R:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s  # (one for the dial and the call)
        try:
            connection = await self.connection(peer_id, timeout_s=timeout_s)
        except RetryableError:
            if breaker is not None:
                breaker.failed()
            raise
        started = time.perf_counter()
        uploading = self._uploading(connection)  # (or once the call failed: see below)
        try:
            response: R = await connection.unary_unary(method, response_type)(
                request, timeout=max(0.001, deadline - loop.time()), metadata=connection.metadata
            )
        except grpc.aio.AioRpcError as exc:
            self._counters.call_made(peer_id, method, time.perf_counter() - started, ok=False)
            error = await self.failed(connection, exc, method)
            if isinstance(error, DeadlineExceededError):
                # (any call's, not only a heartbeat's: heartbeats go on connections of their
                # own, and a data connection whose packets were silently lost stayed 71 s)
                await self.drop_if_silent(connection)
            elif answered_by_handler(exc):
                connection.last_life_s = self._clock.monotonic()
            if breaker is not None:
                self._count_in_breaker(
                    breaker,
                    connection,
                    error,
                    exc,
                    uploading=uploading or self._uploading(connection),
                )
            raise error from exc
        except asyncio.CancelledError:
            if (unavailable := ended_under_call(peer_id)) is None:
                raise
            self._counters.call_made(peer_id, method, time.perf_counter() - started, ok=False)
            if breaker is not None:
                breaker.failed()
            raise unavailable from None
        connection.last_life_s = self._clock.monotonic()
        if breaker is not None:
            breaker.succeeded()
        self._counters.call_made(peer_id, method, time.perf_counter() - started, ok=True)
        self._counters.sent(peer_id, request.ByteSize())
        self._counters.received(peer_id, response.ByteSize())
        return response

    def _uploading(self, connection: PeerConnection) -> bool:
        """Whether a bulk upload is under way on ``connection`` or beside it on the link."""
        return connection.num_uploads > 0 or (
            self._link_busy is not None and self._link_busy(connection.peer_id)
        )

    def _count_in_breaker(
        self,
        breaker: CircuitBreaker,
        connection: PeerConnection,
        error: GossamerError,
        exc: grpc.aio.AioRpcError,
        *,
        uploading: bool,
    ) -> None:
        """Count a failed call in its peer's breaker: as a failure, a success, or neither.

        A refusal the peer's handler answered (busy, over a rate) says the peer is there: it
        counts as a success (counted as failures, five of them opened the breaker of a live
        peer). A call that ran out of time while a bulk upload was under way on its connection
        (``uploading``: when it started or when it failed) counts as neither: it queued
        behind the upload's data on a busy link, which says nothing of the peer. Counted as
        failures, the DHT's own calls (a FindNode refresh with a 2 s deadline) behind an upload
        on a 1-3 Mbit/s link opened the breaker and kept it open, and every bulk send to the
        peer after it (all-reduce messages, state replies) was refused: healthy members failed
        each other. A peer really gone under an upload is still told by heartbeats and by the
        upload's own deadline; a timeout on an idle connection counts as before.
        """
        if uploading and isinstance(error, DeadlineExceededError):
            _log.debug(
                "peer %s: call to %s ran out of time behind a bulk upload: not counted in its "
                "circuit breaker (%d uploads under way)",
                short_peer_id(self._identity.peer_id),
                short_peer_id(connection.peer_id),
                connection.num_uploads,
            )
        elif isinstance(error, RetryableError) and not answered_by_handler(exc):
            breaker.failed()
        else:
            breaker.succeeded()

    async def failed(
        self, connection: PeerConnection, exc: grpc.aio.AioRpcError, method: str
    ) -> GossamerError:
        """Map a failed call's error, dropping the connection if it is broken."""
        error = error_of_rpc_error(exc, short_peer_id(connection.peer_id), method)
        self._counters.error(error)
        if isinstance(error, AuthenticationError):
            # The remote forgot our session (it restarted or evicted it): redial and retry.
            error = PeerLostError(f"session with {short_peer_id(connection.peer_id)} ended")
            await self.drop(connection.peer_id, connection)
        elif (
            isinstance(error, PeerUnavailableError | PeerLostError)
            and not _refused_stream(exc)
            # The peer's handler refused the call (a relay that is full, say): the connection
            # works, and dropping it failed every other call on it.
            and not answered_by_handler(exc)
        ):
            await self.drop(connection.peer_id, connection)
        return error

    async def drop_if_silent(self, connection: PeerConnection) -> bool:
        """Close ``connection`` (if still current) when nothing on it showed life (see
        :attr:`PeerConnection.last_life_s`) for ``keepalive_interval_s + keepalive_timeout_s``;
        returns whether it did.

        For heartbeats that ran past their deadlines. A connection whose packets are silently
        lost (NAT or conntrack state gone, a partition that healed) is not closed by gRPC until
        ``unacked_data_timeout_s``, and heartbeats kept going over it: a live peer that a fresh
        dial reached stayed gone that long. One that shows life is kept: on a thin link busy
        both ways a heartbeat's answer queues behind a bulk transfer that makes progress.

        One with a bulk upload under way (:attr:`PeerConnection.num_uploads`) is kept too: a
        chunk of up to 4 MiB shows no life until it is through (~35 s at 1 Mbit/s), and closing
        the connection failed the upload, every time, so a peer behind a thin uplink never
        finished one while its failure detector ran. Dead under an upload, the connection is
        closed by the kernel once its data goes unacknowledged for ``unacked_data_timeout_s``,
        or the upload ends at its own deadline and the next heartbeat that times out closes it.
        """
        window_s = self._config.keepalive_interval_s + self._config.keepalive_timeout_s
        quiet_s = self._clock.monotonic() - connection.last_life_s
        if (
            quiet_s < window_s
            or connection.num_uploads > 0
            or self._connections.get(connection.peer_id) is not connection
        ):
            return False
        _log.info(
            "peer %s: connection to %s showed no life for %.1f s and heartbeats time out: "
            "closed, the next one dials afresh",
            short_peer_id(self._identity.peer_id),
            short_peer_id(connection.peer_id),
            quiet_s,
        )
        await self.drop(connection.peer_id, connection)
        return True

    async def drop(self, peer_id: str, connection: PeerConnection | None = None) -> None:
        """Close the connection to a peer (only ``connection``, if given and still current)."""
        current = self._connections.get(peer_id)
        if current is None or (connection is not None and current is not connection):
            return
        del self._connections[peer_id]
        await self._close_connection(current)

    def retire(self, peer_id: str, connection: PeerConnection) -> None:
        """Take ``connection`` out of use if current; it stays open until :meth:`close_retired`."""
        if self._connections.get(peer_id) is connection:
            del self._connections[peer_id]
            self._counters.connections[connection.target.kind] -= 1
            self._retired.append(connection)

    async def close_retired(self, peer_id: str, grace_s: float) -> None:
        """Close retired connections to ``peer_id`` once their calls end (at most ``grace_s``)."""
        retired = [c for c in self._retired if c.peer_id == peer_id]
        self._retired = [c for c in self._retired if c.peer_id != peer_id]
        for connection in retired:
            try:
                await connection.channel.close(grace_s)
            except asyncio.CancelledError:
                await connection.channel.close(None)
                raise

    async def _close_connection(self, connection: PeerConnection) -> None:
        self._counters.connections[connection.target.kind] -= 1
        await connection.channel.close(None)

    async def close(self) -> None:
        """Close every connection; later dials fail."""
        self._closed = True
        connections = list(self._connections.values())
        self._connections.clear()
        for connection in connections:
            await self._close_connection(connection)
        retired, self._retired = self._retired, []
        for connection in retired:
            await connection.channel.close(None)

    async def __aenter__(self) -> ConnectionPool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def with_deadline(awaitable: Awaitable[R], timeout_s: float, what: str) -> R:
    """Await with a deadline, mapping a timeout to :class:`DeadlineExceededError`."""
    try:
        async with asyncio.timeout(timeout_s):
            return await awaitable
    except TimeoutError as exc:
        raise DeadlineExceededError(f"{what} took over {timeout_s} s") from exc


def _refused_stream(exc: grpc.aio.AioRpcError) -> bool:
    """Whether the call was refused for want of a stream (HTTP/2's REFUSED_STREAM: the peer
    carries as many calls on the connection as it allows, ``limits.max_concurrent_streams``).
    The connection is sound: dropping it failed every call on it (13 of 24 in a test at the
    limit). gRPC reports it only in the call's details."""
    return exc.code() == grpc.StatusCode.UNAVAILABLE and "error code 7" in (exc.details() or "")
