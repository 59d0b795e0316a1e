"""Heartbeats and the circuit breaker on loopback gRPC: other calls' failures open a peer's
breaker, but its heartbeats still go through (the breaker does not decide whether a peer is
alive), and a refusal the peer's handler answered does not count against its breaker."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from gossamer.core.errors import DeadlineExceededError, PeerUnavailableError
from gossamer.net.config import BreakerConfig, HeartbeatConfig, NodeConfig
from gossamer.net.connections import DialTarget
from gossamer.net.grpc_errors import HANDLER_ANSWERED
from gossamer.net.node import Node
from gossamer.proto import net_pb2
from loopback_nodes import until

SECRET = b"integration-secret-0123456789"
BREAKER = BreakerConfig(failure_threshold=5, open_s=60.0)
"""Open for longer than the tests run: no half-open trial closes it under them."""


def _config() -> NodeConfig:
    return NodeConfig(
        listen_address="127.0.0.1:0",
        swarm_secret=SECRET,
        breaker=BREAKER,
        heartbeat=HeartbeatConfig(interval_s=0.2, timeout_s=1.0),
    )


def _run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


def _adder(
    method: str, handler: Callable[[Any, Any], Awaitable[Any]]
) -> Callable[[Any, Any], None]:
    def add(servicer: object, server: Any) -> None:
        rpc = grpc.unary_unary_rpc_method_handler(
            handler,
            request_deserializer=net_pb2.PingRequest.FromString,
            response_serializer=net_pb2.PingResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("test.Peer", {method: rpc})]
        )

    return add


def test_a_live_peer_whose_breaker_other_calls_opened_still_answers_heartbeats() -> None:
    # Five calls slower than their deadline opened the breaker; heartbeats, through it, then
    # failed at once and the detector reported the live peer gone 2.5 s later.
    async def scenario() -> None:
        released = asyncio.Event()  # never set before the calls' deadlines

        async def hang(request: Any, context: Any) -> net_pb2.PingResponse:
            await released.wait()
            return net_pb2.PingResponse()

        async with Node(_config()) as a, Node(_config()) as b:
            b.add_servicer(_adder("Hang", hang), object())
            await a.pool.dial(DialTarget(b.addresses[0]), expected_peer_id=b.peer_id)
            for _ in range(BREAKER.failure_threshold):
                with pytest.raises(DeadlineExceededError):
                    await a.call(
                        b.peer_id,
                        "/test.Peer/Hang",
                        net_pb2.PingRequest(),
                        net_pb2.PingResponse,
                        timeout_s=0.1,
                        retry=False,
                    )
            breaker = a.pool.breakers[b.peer_id]
            assert breaker.state == "open"
            with pytest.raises(PeerUnavailableError, match="circuit open"):
                await a.ping(b.peer_id)  # other calls still fail fast
            opened_at_s = a.clock.monotonic()
            a.detector.watch(b.peer_id)
            liveness = a.detector.liveness(b.peer_id)
            assert liveness is not None
            # Heartbeats answered while the breaker is open, for longer than the gone timeout
            # (or the peer reported gone: the old way).
            timeout_s = a.config.heartbeat.timeout_s
            await until(
                lambda: not liveness.alive or liveness.last_answer_s > opened_at_s + timeout_s,
                10.0,
                "heartbeats to the live peer were answered or it was reported gone",
            )
            assert liveness.alive, "a live peer was reported gone: its breaker was open"
            assert breaker.state == "open"  # (heartbeats neither count in it nor close it)
            released.set()

    _run(scenario)


def test_a_refusal_the_peer_s_handler_answered_does_not_count_against_its_breaker() -> None:
    # A handler's own retryable refusal ("a dial back for this peer is under way already")
    # counted as a failure: five opened the breaker of a peer that answered each of them.
    async def scenario() -> None:
        async def refuse(request: Any, context: Any) -> net_pb2.PingResponse:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "busy: try later", trailing_metadata=HANDLER_ANSWERED
            )
            raise AssertionError("abort returns no more")

        async with Node(_config()) as a, Node(_config()) as b:
            b.add_servicer(_adder("Refuse", refuse), object())
            await a.pool.dial(DialTarget(b.addresses[0]), expected_peer_id=b.peer_id)
            for _ in range(2 * BREAKER.failure_threshold):
                with pytest.raises(PeerUnavailableError, match="busy: try later"):
                    await a.call(
                        b.peer_id,
                        "/test.Peer/Refuse",
                        net_pb2.PingRequest(),
                        net_pb2.PingResponse,
                        timeout_s=5.0,
                        retry=False,
                    )
            breaker = a.pool.breakers[b.peer_id]
            assert breaker.state == "closed"
            assert breaker.num_consecutive_failures == 0
            await a.ping(b.peer_id)  # and calls go through

    _run(scenario)
