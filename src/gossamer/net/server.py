"""The node's one gRPC server: TLS, the handshake, authentication of every call, and services.

Every layer that speaks on the wire (``net/`` itself, ``comm/``, ``train/``) registers its
services here with :meth:`NetServer.add_servicer`, passing the generated
``add_<Name>Servicer_to_server`` function, at any time before or after start. Calls other than the
handshake must carry a session token; without one the call is refused before its request is even
decoded. Inside a handler, :func:`current_session` names the authenticated caller, and raising a
Gossamer error aborts the call with the matching status.

What a caller with no session can make the server hold is bounded: its calls are refused before
their messages are read; the handshake's requests are read under a deadline, a few at a time per
remote host and in all, and refused past a few KiB; a connection that carries no call for
``limits.idle_connection_timeout_s`` is closed.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import functools
import logging
import socket
import traceback
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc

from gossamer.core.clock import Clock
from gossamer.core.errors import (
    ConfigError,
    DeadlineExceededError,
    GossamerError,
    PeerUnavailableError,
    ProtocolError,
)
from gossamer.net.addresses import host_of, observed_host, port_of, remote_host
from gossamer.net.config import NodeConfig
from gossamer.net.counters import NetCounters
from gossamer.net.grpc_errors import HANDLER_ANSWERED, status_of_error
from gossamer.net.handshake import (
    GOOD_SECRET_COMMAND,
    SESSION_METADATA_KEY,
    HandshakeAuthority,
    Session,
    swarm_secret_weakness,
)
from gossamer.net.identity import Identity, short_peer_id
from gossamer.net.tls import TlsCertificate
from gossamer.proto import net_pb2, net_pb2_grpc

__all__ = ["NetServer", "current_remote_host", "current_session", "grpc_options"]

_log = logging.getLogger(__name__)
_session_var: contextvars.ContextVar[Session] = contextvars.ContextVar("gossamer_session")
_call_var: contextvars.ContextVar[grpc.aio.ServicerContext] = contextvars.ContextVar(
    "gossamer_call"
)
_HANDSHAKE_PREFIX = "/gossamer.net.v1.Handshake/"


def current_session() -> Session:
    """The authenticated caller of the RPC being handled (only valid inside a handler)."""
    return _session_var.get()


def current_remote_host() -> str:
    """The address the RPC being handled came from, as its connection shows it (only valid
    inside a handler; see :func:`~gossamer.net.addresses.observed_host`). A relayed caller's
    connection comes from this machine: tunnels end in a connection to this node's server."""
    return observed_host(_call_var.get().peer())


def grpc_options(config: NodeConfig) -> list[tuple[str, Any]]:
    """Channel and server options shared by both ends: message limits and keepalive."""
    return [
        ("grpc.max_send_message_length", config.limits.max_message_bytes),
        ("grpc.max_receive_message_length", config.limits.max_message_bytes),
        ("grpc.keepalive_time_ms", int(config.keepalive_interval_s * 1000)),
        # gRPC sets every socket's TCP_USER_TIMEOUT to this, and no other option sets that
        # apart: at 5 s (keepalive_timeout_s, once passed here) the kernel aborted connections
        # on a 500 kbit/s link busy both ways, 12-16 times a run per NATed peer behind a relay,
        # as a segment waited behind the queues for its ack. A peer gone is noticed by the
        # failure detector's heartbeats (2.5 s), not by TCP, so this can be long (20 s: none
        # aborted on that link; 60 s kept a vanished client's socket and reservation 60 s).
        ("grpc.keepalive_timeout_ms", int(config.unacked_data_timeout_s * 1000)),
        # grpcio 1.85 holds every ping's ack (keepalive's and flow control's) to its own
        # deadline, 60 s by default, and an ack waits behind the data its sender has queued on
        # the connection: at 5 s a 2 MB round at 1 Mbit/s failed, and at 60 s an upload on a
        # link down from 100 Mbit/s to 100 kbit/s (1.1 MB in the socket, 114 s) failed with
        # "ping timeout". TCP_USER_TIMEOUT stays above; a hung relay is noticed by the
        # reservation's own heartbeats, see tunnels.py.
        ("grpc.http2.ping_timeout_ms", int(config.ping_ack_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", int(config.keepalive_interval_s * 500)),
        ("grpc.http2.max_ping_strikes", 0),
        # Calls one connection carries at once (HTTP/2's SETTINGS_MAX_CONCURRENT_STREAMS; a
        # client queues the rest): each unary call may hold a whole message in gRPC before a
        # handler sees it, so this bounds what one connection can make a server hold.
        ("grpc.max_concurrent_streams", config.limits.max_concurrent_streams),
    ]


def _server_only_options(config: NodeConfig) -> list[tuple[str, Any]]:
    """Options of the server alone: they bound connections that never authenticate."""
    return [
        # gRPC sets SO_REUSEPORT by default: a second peer on a port in use listened beside
        # the first, and callers reached one or the other at random.
        ("grpc.so_reuseport", 0),
        # A connection with no call this long gets a GOAWAY (a client's channel reconnects at
        # its next call): 1,011 idle connections from a caller with no secret took every file
        # descriptor of a node, for good, and honest dials failed.
        ("grpc.max_connection_idle_ms", int(config.limits.idle_connection_timeout_s * 1000)),
        # TLS and HTTP/2 set-up of a new connection (gRPC's default: 120 s).
        (
            "grpc.server_handshake_timeout_ms",
            int(config.limits.transport_handshake_timeout_s * 1000),
        ),
    ]


class _HandlerCollector:
    """Stands in for a server when calling a generated ``add_*_to_server`` function."""

    def __init__(self) -> None:
        self.handlers: list[grpc.GenericRpcHandler] = []
        self.service_names: list[str] = []

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.handlers.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        """Registered methods are only an optimisation; the generic handler covers them."""
        self.service_names.append(service)


class _HandshakeServicer(net_pb2_grpc.HandshakeServicer):
    def __init__(self, server: NetServer) -> None:
        self._server = server

    async def Hello(
        self, request: net_pb2.HelloRequest, context: grpc.aio.ServicerContext
    ) -> net_pb2.HelloResponse:
        try:
            return self._server.authority.hello(request)
        except GossamerError as exc:
            self._server.counters.error(exc)
            await context.abort(*status_of_error(exc))
            raise AssertionError("unreachable") from exc

    async def Prove(
        self, request: net_pb2.ProveRequest, context: grpc.aio.ServicerContext
    ) -> net_pb2.ProveResponse:
        try:
            token, session, record = self._server.authority.prove(request, context.peer())
        except GossamerError as exc:
            self._server.counters.num_handshakes_refused += 1
            self._server.counters.error(exc)
            await context.abort(*status_of_error(exc))
            raise AssertionError("unreachable") from exc
        self._server.on_session(session, record)
        return net_pb2.ProveResponse(session_token=token, session_ttl_s=0.0)


class _Dispatcher(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Finds the handler of a method among the registered services and guards it."""

    def __init__(self, server: NetServer) -> None:
        self._server = server

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method
        handler = self._server.find_handler(handler_call_details)
        if handler is None:
            return None
        if method.startswith(_HANDSHAKE_PREFIX):
            return _handshake_handler(handler, self._server)
        token = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == SESSION_METADATA_KEY:
                token = value if isinstance(value, str) else value.decode("ascii", "replace")
        session = self._server.authority.session(token) if token else None
        if session is None:
            return _refusing_handler(handler, method, self._server)
        return _guarded_handler(handler, method, session, self._server)


def _refusing_handler(
    handler: grpc.RpcMethodHandler, method: str, server: NetServer
) -> grpc.RpcMethodHandler:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        server.counters.num_handshakes_refused += 1
        remote = context.peer()
        _log.log(
            server.authority.refusal_log.level(remote_host(remote)),
            "peer %s: refused %s from %s: no valid session (handshake missing or expired)",
            server.short_id,
            method,
            remote,
        )
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no session: handshake first")

    async def refuse_streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await refuse(request, context)
        yield  # pragma: no cover

    # A streaming request whatever the method's kind: gRPC reads no message before the handler
    # runs, and the refusal resets the stream. For a unary one it read the whole message first
    # (up to limits.max_message_bytes): a caller with no session held 8 MiB a stalled stream,
    # 4 GiB with 512 of them. Raw bytes, nothing decoded either way.
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_streaming)
    return grpc.stream_unary_rpc_method_handler(refuse)


class _Malformed:
    """Stands in for a request that did not decode, so the handler can refuse it cleanly."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf raises DecodeError, and others on odd input
            return _Malformed(exc)

    return deserialize


def _checked(request: Any) -> Any:
    if isinstance(request, _Malformed):
        raise ProtocolError(f"request does not decode: {request.error}")
    return request


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _checked(request)


_HANDSHAKE_GRACE_S = 0.25
"""A handshake read past its deadline gets this long more, once: where the event loop itself
was held up (a collection, a long callback) the request may have arrived meanwhile, and the
loop's first look after it was the deadline's (an honest Hello refused after a 2.5 s stall)."""


@dataclass(eq=False, slots=True)
class _HandshakeRead:
    """A Hello or Prove request being read."""

    host: str
    """The caller's address."""
    evicted: asyncio.Event = field(default_factory=asyncio.Event)
    """Set where a newer read took its place."""


class _HandshakeReads:
    """Hello and Prove requests being read now, in all and by remote host, under the limits
    ``max_handshake_reads`` and ``max_handshake_reads_per_host``.

    Where a limit is reached, the oldest read under it gives way to the new one (its host's
    oldest where its host's share is taken, else the oldest of all): an honest request takes
    milliseconds, so the old ones are the stalled ones. Refusing the newcomer instead let a
    caller with no secret and four addresses keep every place taken with stalled requests,
    each renewed as it ended, and no peer could join.
    """

    def __init__(self, max_reads: int, max_reads_per_host: int) -> None:
        self._max_reads = max_reads
        self._max_reads_per_host = max_reads_per_host
        self._reads: dict[_HandshakeRead, None] = {}
        """Reads in progress, oldest first."""
        self._by_host: dict[str, dict[_HandshakeRead, None]] = {}
        self.num_evicted = 0
        """Reads that gave way to newer ones."""

    @property
    def num_reading(self) -> int:
        """Requests being read now."""
        return len(self._reads)

    def begin(self, host: str) -> _HandshakeRead:
        """Count one more read from ``host``, making room for it where a limit is reached."""
        mine = self._by_host.get(host, {})
        victim: _HandshakeRead | None = None
        if len(mine) >= self._max_reads_per_host:
            victim = next(iter(mine))
        elif len(self._reads) >= self._max_reads:
            victim = next(iter(self._reads))
        if victim is not None:
            self.end(victim)
            victim.evicted.set()
            self.num_evicted += 1
        read = _HandshakeRead(host)
        self._reads[read] = None
        self._by_host.setdefault(host, {})[read] = None
        return read

    def end(self, read: _HandshakeRead) -> None:
        """A read counted by :meth:`begin` ended (or gave way)."""
        if read in self._reads:
            del self._reads[read]
            of_host = self._by_host[read.host]
            del of_host[read]
            if not of_host:
                del self._by_host[read.host]


async def _read_one(
    requests: AsyncIterator[bytes], read: _HandshakeRead, timeout_s: float
) -> bytes | str | None:
    """The first request of a handshake call (None: the call carried none), or why it was not
    read: ``"evicted"`` or ``"late"``."""
    loop = asyncio.get_running_loop()
    reading = asyncio.ensure_future(anext(aiter(requests), None))
    evicted = asyncio.ensure_future(read.evicted.wait())
    deadline = loop.time() + timeout_s
    graced = False
    try:
        while True:
            await asyncio.wait(
                (reading, evicted),
                timeout=max(0.0, deadline - loop.time()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if reading.done():
                return reading.result()
            if evicted.done():
                return "evicted"
            if graced:
                return "late"
            graced, deadline = True, loop.time() + _HANDSHAKE_GRACE_S
    finally:
        for task in (reading, evicted):
            task.cancel()


def _handshake_handler(handler: grpc.RpcMethodHandler, server: NetServer) -> grpc.RpcMethodHandler:
    """A handshake method (unary, no session yet), served as a streaming request so that its
    one message is read here, under bounds: at most ``limits.max_handshake_reads`` at once
    (``max_handshake_reads_per_host`` from one address), each within
    ``limits.handshake_read_timeout_s``, and at most ``limits.max_handshake_message_bytes``.

    Served as unary, gRPC read the whole message (up to ``limits.max_message_bytes``) before
    the handler ran, with no deadline: a caller with no secret announcing 8 MiB Hellos and
    stalling one byte short held 8 MiB each, for good (1,115 MiB with 128 of them). A request
    that does not decode is refused as malformed and counted (gRPC logged a traceback at ERROR
    for each)."""
    behavior = handler.unary_unary
    decode = _tolerant(handler.request_deserializer)
    limits = server.config.limits

    async def refuse(
        context: grpc.aio.ServicerContext,
        host: str,
        error: GossamerError,
        code: grpc.StatusCode | None = None,
    ) -> NoReturn:
        """Count ``error``, log it (paced by host) and abort with its status (or ``code``)."""
        server.counters.num_handshakes_refused += 1
        if isinstance(error, ProtocolError):
            server.counters.protocol_error()
        else:
            server.counters.error(error)
        _log.log(
            server.authority.refusal_log.level(host),
            "peer %s: refused a handshake from %s: %s",
            server.short_id,
            context.peer(),
            error,
        )
        await context.abort(code or status_of_error(error)[0], str(error))
        raise AssertionError("unreachable")  # (abort raises)

    async def run(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
        host = remote_host(context.peer())
        read = server.handshake_reads.begin(host)
        timeout_s = limits.handshake_read_timeout_s
        try:
            data = await _read_one(requests, read, timeout_s)
        finally:
            server.handshake_reads.end(read)
        if data == "evicted":
            # UNAVAILABLE: busy, try again (the caller's retries dial again with backoff); an
            # honest read that gave way to a flood failed for good as a ProtocolError.
            why = "newer handshake requests took its place (too many were being read); try again"
            await refuse(context, host, PeerUnavailableError(why))
        if data == "late":
            why = f"the request did not arrive within {timeout_s:g} s"
            await refuse(context, host, DeadlineExceededError(why))
        assert not isinstance(data, str)
        if data is None:
            await refuse(context, host, ProtocolError("the call carried no request"))
        if len(data) > limits.max_handshake_message_bytes:
            why = (
                f"a handshake request of {len(data)} bytes, over the "
                f"{limits.max_handshake_message_bytes} a handshake takes"
            )
            await refuse(context, host, ProtocolError(why), grpc.StatusCode.RESOURCE_EXHAUSTED)
        request = decode(data) if decode is not None else data
        if isinstance(request, _Malformed):
            server.counters.protocol_error()
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"request does not decode: {request.error}"
            )
        return await behavior(request, context)

    # No deserializer: the raw bytes, measured before they are decoded.
    return grpc.stream_unary_rpc_method_handler(
        run, response_serializer=handler.response_serializer
    )


def _guarded_handler(
    handler: grpc.RpcMethodHandler, method: str, session: Session, server: NetServer
) -> grpc.RpcMethodHandler:
    """Run the handler with the session set, counting it and mapping our errors to statuses."""
    streaming_request = handler.request_streaming

    def checked(request: Any) -> Any:
        return _checked_stream(request) if streaming_request else _checked(request)

    async def on_error(exc: Exception, context: grpc.aio.ServicerContext) -> None:
        server.counters.error(exc)
        server.counters.peers[session.peer_id].num_errors += 1
        if isinstance(exc, ProtocolError):
            server.counters.num_protocol_errors += 1
        if not isinstance(exc, GossamerError):
            _log.exception("peer %s: %s from %s failed", server.short_id, method, session.peer_id)
        # The abort below keeps ``exc`` (as its context) as long as gRPC keeps the call, and
        # ``exc`` keeps the handler's finished frames: let their locals go now (a bulk stream's
        # received chunk, say), not when the cyclic collector gets to them.
        traceback.clear_frames(exc.__traceback__)
        await context.abort(*status_of_error(exc), trailing_metadata=HANDLER_ANSWERED)

    def unary_response(behavior: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(behavior)
        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            _session_var.set(session)
            _call_var.set(context)
            server.counters.call_served(session.peer_id, method)
            try:
                return await behavior(checked(request), context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await on_error(exc, context)

        return run

    def streaming_response(behavior: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(behavior)
        async def run(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            _session_var.set(session)
            _call_var.set(context)
            server.counters.call_served(session.peer_id, method)
            try:
                async for response in behavior(checked(request), context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await on_error(exc, context)

        return run

    kinds = {
        (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler, unary_response),
        (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler, unary_response),
        (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler, streaming_response),
        (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler, streaming_response),
    }
    attr, make, wrap = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        wrap(getattr(handler, attr)),
        request_deserializer=_tolerant(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )


def _bind_problem(address: str) -> str | None:
    """Why ``address`` (a listen address, ``HOST:PORT``) cannot be bound, or None if it can
    (or its port is 0: any free one).

    Found by binding a plain socket to each address the host resolves to, with the options
    gRPC's server binds with (``SO_REUSEADDR``, no ``SO_REUSEPORT``), and letting it go at
    once: only when none binds, as gRPC then fails too. gRPC's core says why on stderr alone,
    in a line of its own before Gossamer's error; this says it in the error.
    """
    try:
        host, port = host_of(address), port_of(address)
    except ValueError:
        return None  # (the config's own check says what is wrong with it)
    if port == 0:
        return None
    try:
        candidates = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (socket.gaierror, UnicodeError) as exc:
        return f"{host} does not resolve: {getattr(exc, 'strerror', None) or exc}"
    reasons: list[str] = []
    for family, kind, proto, _, sockaddr in candidates:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                reasons.append(f"port {port} is in use by another program")
            elif exc.errno == errno.EADDRNOTAVAIL:
                reasons.append(f"{host} is not an address of this machine")
            elif exc.errno == errno.EACCES:
                reasons.append(f"port {port} needs privileges this process lacks")
            else:
                reasons.append(exc.strerror or str(exc))
        else:
            return None
    return "; ".join(dict.fromkeys(reasons)) or None


class NetServer:
    """The one gRPC server of a node (an async context manager).

    Args:
        identity: this node's identity.
        tls: this node's TLS certificate.
        config: the node config (listen address, limits, keepalive, swarm secret).
        clock: time source.
        counters: where calls and errors are counted.
        on_session: called with each newly authenticated session and the peer record its
            caller sent, if any (to check and learn).
    """

    def __init__(
        self,
        identity: Identity,
        tls: TlsCertificate,
        config: NodeConfig,
        clock: Clock,
        counters: NetCounters,
        on_session: Callable[[Session, net_pb2.SignedPeerRecord | None], None] | None = None,
    ) -> None:
        self.identity = identity
        self.tls = tls
        self.config = config
        self.counters = counters
        self.authority = HandshakeAuthority(
            identity,
            tls.sha256,
            config.swarm_secret,
            clock,
            max_sessions=config.limits.max_sessions,
        )
        self.handshake_reads = _HandshakeReads(
            config.limits.max_handshake_reads, config.limits.max_handshake_reads_per_host
        )
        """Hello and Prove requests being read now."""
        self._on_session = on_session
        self._handlers: dict[str, list[grpc.GenericRpcHandler]] = {}
        self._server: grpc.aio.Server | None = None
        self.port = 0
        """The port bound (known after start)."""
        self.add_servicer(net_pb2_grpc.add_HandshakeServicer_to_server, _HandshakeServicer(self))

    @property
    def short_id(self) -> str:
        """This node's short peer id, for logs."""
        return short_peer_id(self.identity.peer_id)

    def add_servicer(self, add_to_server: Callable[[Any, Any], None], servicer: Any) -> None:
        """Serve ``servicer`` through this server; callable before or after start.

        Registering a service again replaces the earlier implementation.

        Args:
            add_to_server: the generated ``add_<Name>Servicer_to_server`` function.
            servicer: the implementation.
        """
        collector = _HandlerCollector()
        add_to_server(servicer, collector)
        name = ",".join(collector.service_names) or type(servicer).__name__
        self._handlers[name] = collector.handlers

    def find_handler(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        """The registered handler for a call, or None."""
        for handlers in list(self._handlers.values()):
            for generic in handlers:
                handler = generic.service(details)
                if handler is not None:
                    return handler
        return None

    def on_session(self, session: Session, record: net_pb2.SignedPeerRecord | None) -> None:
        """Called by the handshake servicer for each new session."""
        if self._on_session is not None:
            self._on_session(session, record)

    async def start(self) -> None:
        """Bind and start serving.

        Raises:
            ConfigError: the listen address cannot be bound.
        """
        self._warn_of_a_weak_secret()
        options = [*grpc_options(self.config), *_server_only_options(self.config)]
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers((_Dispatcher(self),))
        credentials = grpc.ssl_server_credentials([(self.tls.key_pem, self.tls.cert_pem)])
        address = self.config.listen_address
        problem = _bind_problem(address)
        if problem is not None:  # (gRPC's core printed a line of its own to stderr first)
            raise ConfigError(
                f"net.listen_address: cannot listen on {address} ({problem}); pick another "
                "port or use port 0"
            )
        try:
            port = server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            port = 0
            cause: Exception | None = exc
        else:
            cause = None
        if not port:
            raise ConfigError(
                f"net.listen_address: cannot listen on {address} "
                "(in use or not an address of this machine); pick another port or use port 0"
            ) from cause
        await server.start()
        self._server = server
        self.port = port
        _log.info("peer %s: listening on port %d", self.short_id, port)

    def _warn_of_a_weak_secret(self) -> None:
        secret = self.config.swarm_secret
        weakness = swarm_secret_weakness(secret) if secret is not None else None
        if weakness is not None:
            _log.warning(
                "peer %s: the swarm secret (--swarm-secret-file, swarm.swarm_secret_file) %s: "
                "anyone who can reach a peer of the swarm can test guesses of it offline; make "
                "a random one with `%s` and give every peer that file",
                self.short_id,
                weakness,
                GOOD_SECRET_COMMAND,
            )

    async def stop(self, grace_s: float = 1.0) -> None:
        """Stop serving; calls in flight get ``grace_s`` to finish."""
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop(grace_s)

    async def __aenter__(self) -> NetServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
