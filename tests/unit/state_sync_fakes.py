"""In-memory doubles of the two node methods state sync uses (``on_bulk``, ``send_bulk``)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable

import torch

from gossamer.core.errors import (
    DeadlineExceededError,
    PeerLostError,
    PeerUnavailableError,
    ProtocolError,
)
from gossamer.train.state_sync import StateSnapshot
from gossamer.train.state_sync_wire import (
    REPLY_TOPIC,
    REQUEST_TOPIC,
    ReplyHeader,
    ReplyStatus,
    RequestKind,
    decode_reply,
    decode_request,
    encode_reply,
)

BulkHandler = Callable[[str, str, bytearray], Awaitable[None]]


class FakeBulkNetwork:
    """Nodes that deliver bulk transfers to each other's handlers in memory; nodes can die."""

    def __init__(self) -> None:
        self.nodes: dict[str, FakeBulkNode] = {}
        self.dead: set[str] = set()
        self.bytes_sent: Counter[tuple[str, str]] = Counter()

    def add(self, peer_id: str, node_type: type[FakeBulkNode] | None = None) -> FakeBulkNode:
        node = (node_type or FakeBulkNode)(self, peer_id)
        self.nodes[peer_id] = node
        return node

    def kill(self, peer_id: str) -> None:
        self.dead.add(peer_id)


class FakeBulkNode:
    """A node's ``on_bulk`` and ``send_bulk``, with net's contract: returns once handled."""

    def __init__(self, network: FakeBulkNetwork, peer_id: str) -> None:
        self.network = network
        self._peer_id = peer_id
        self.handlers: dict[str, BulkHandler] = {}
        self.max_bytes: dict[str, int] = {}

    @property
    def peer_id(self) -> str:
        return self._peer_id

    def on_bulk(self, topic: str, handler: BulkHandler, *, max_bytes: int | None = None) -> None:
        self.handlers[topic] = handler
        if max_bytes is None:
            self.max_bytes.pop(topic, None)
        else:
            self.max_bytes[topic] = max_bytes

    def outgoing(self, peer_id: str, topic: str, payload: bytearray) -> bytearray:
        """Hook for faulty nodes: change or refuse what this node sends."""
        return payload

    async def send_bulk(
        self,
        peer_id: str,
        topic: str,
        payload: bytes | bytearray | memoryview,
        *,
        num_streams: int = 1,
        timeout_s: float = 60.0,
    ) -> None:
        await asyncio.sleep(0)
        if self.peer_id in self.network.dead:
            raise PeerLostError(f"{self.peer_id} is dead")
        data = self.outgoing(peer_id, topic, bytearray(payload))
        target = self.network.nodes.get(peer_id)
        if target is None or peer_id in self.network.dead:
            raise PeerUnavailableError(f"{peer_id} is down")
        handler = target.handlers.get(topic)
        if handler is None:
            raise ProtocolError(f"no handler for {topic}")
        if len(data) > target.max_bytes.get(topic, len(data)):
            raise ProtocolError(f"{len(data)} bytes on {topic}: more than its handler takes")
        self.network.bytes_sent[(self.peer_id, peer_id)] += len(data)
        try:
            async with asyncio.timeout(timeout_s):
                await handler(self.peer_id, topic, data)
        except TimeoutError:
            raise DeadlineExceededError(f"bulk to {peer_id} timed out") from None


class FakeSharedLink:
    """A link that carries its transfers at once, each at an equal share of its rate (as TCP
    streams sharing a bottleneck do): eight chunks asked together all arrive after eight
    chunks' time, none sooner."""

    def __init__(self, bytes_per_s: float) -> None:
        self.bytes_per_s = bytes_per_s
        self._left: dict[asyncio.Future[None], float] = {}
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def _advance(self, now: float) -> None:
        if self._left:
            sent = (now - self._last) * self.bytes_per_s / len(self._left)
            for future in self._left:
                self._left[future] -= sent
        self._last = now

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._left:
            loop = asyncio.get_running_loop()
            after_s = min(self._left.values()) * len(self._left) / self.bytes_per_s
            self._timer = loop.call_later(max(0.0, after_s), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._advance(asyncio.get_running_loop().time())
        for future, left in list(self._left.items()):
            if left <= 1e-6 * self.bytes_per_s:  # (sent, within the timer's precision)
                del self._left[future]
                if not future.done():
                    future.set_result(None)
        self._schedule()

    async def carry(self, num_bytes: int) -> None:
        """Wait until ``num_bytes`` have crossed the link."""
        loop = asyncio.get_running_loop()
        self._advance(loop.time())
        future: asyncio.Future[None] = loop.create_future()
        self._left[future] = float(num_bytes)
        self._schedule()
        try:
            await future
        finally:
            if future in self._left:  # (given up: the others get its share)
                self._advance(loop.time())
                del self._left[future]
                self._schedule()


class FaultyBulkNode(FakeBulkNode):
    """A fake node that misbehaves on a script, in the replies it sends as a donor.

    Attributes:
        corrupt_chunks: flip a byte in every chunk reply's body.
        die_after_chunks: die (as if killed) when about to send this many-plus-one chunk reply.
        stall: never deliver replies (waits forever, until the sender's deadline).
        reply_delay_s: every reply leaves this long after it was asked for.
        after_chunk: called after each chunk reply leaves.
    """

    corrupt_chunks = False
    die_after_chunks: int | None = None
    stall = False
    reply_delay_s = 0.0
    after_chunk: Callable[[int], None] | None = None

    def __init__(self, network: FakeBulkNetwork, peer_id: str) -> None:
        super().__init__(network, peer_id)
        self.num_chunk_replies = 0

    def outgoing(self, peer_id: str, topic: str, payload: bytearray) -> bytearray:
        if topic != REPLY_TOPIC:
            return payload
        header, _ = decode_reply(payload)
        if header.kind.name != "CHUNK":
            return payload
        if self.die_after_chunks is not None and self.num_chunk_replies >= self.die_after_chunks:
            self.network.kill(self.peer_id)
            raise PeerLostError(f"{self.peer_id} died")
        self.num_chunk_replies += 1
        if self.after_chunk is not None:
            self.after_chunk(self.num_chunk_replies)
        if self.corrupt_chunks:
            payload[-1] ^= 0xFF
        return payload

    async def send_bulk(
        self,
        peer_id: str,
        topic: str,
        payload: bytes | bytearray | memoryview,
        *,
        num_streams: int = 1,
        timeout_s: float = 60.0,
    ) -> None:
        if self.stall and topic == REPLY_TOPIC:
            await asyncio.Event().wait()  # a donor that hangs; the requester's deadline ends it
        if self.reply_delay_s and topic == REPLY_TOPIC:
            await asyncio.sleep(self.reply_delay_s)  # a slow donor
        await super().send_bulk(
            peer_id, topic, payload, num_streams=num_streams, timeout_s=timeout_s
        )


def answer_with_manifest_only(donor: FakeBulkNode, manifest: bytes) -> None:
    """Make ``donor`` answer every manifest request with ``manifest`` and never send a chunk."""

    async def on_request(sender: str, topic: str, payload: bytearray) -> None:
        request = decode_request(payload)
        if request.kind is RequestKind.CHUNK:
            await asyncio.Event().wait()  # chunks never come
        header = ReplyHeader(
            kind=request.kind,
            status=ReplyStatus.OK,
            request_id=request.request_id,
            version=1,
            index=0,
            body_bytes=len(manifest),
        )
        await donor.send_bulk(sender, REPLY_TOPIC, encode_reply(header, manifest))

    donor.on_bulk(REQUEST_TOPIC, on_request)


class LinkedRepliesNode(FakeBulkNode):
    """A node whose state-sync replies cross ``link``: a donor's own slow uplink, or, given to
    every donor, the newcomer's downlink they all share."""

    link: FakeSharedLink

    async def send_bulk(
        self,
        peer_id: str,
        topic: str,
        payload: bytes | bytearray | memoryview,
        *,
        num_streams: int = 1,
        timeout_s: float = 60.0,
    ) -> None:
        if topic == REPLY_TOPIC:
            await self.link.carry(len(payload))
        await super().send_bulk(
            peer_id, topic, payload, num_streams=num_streams, timeout_s=timeout_s
        )


def add_linked_node(network: FakeBulkNetwork, name: str, link: FakeSharedLink) -> LinkedRepliesNode:
    """A :class:`LinkedRepliesNode` ``name`` on ``network``, its replies crossing ``link``."""
    node = network.add(name, LinkedRepliesNode)
    assert isinstance(node, LinkedRepliesNode)
    node.link = link
    return node


def random_snapshot(numel: int) -> StateSnapshot:
    """Version 7 of a state: ``numel`` random (seeded) float32 weights and a step counter."""
    gen = torch.Generator().manual_seed(0)
    return StateSnapshot(
        version=7,
        tensors={"w": torch.randn(numel, generator=gen), "step": torch.tensor(3)},
        meta={"step": 3},
    )


def assert_same_state(got: StateSnapshot, want: StateSnapshot) -> None:
    """``got`` is ``want``: version, meta and every tensor bit for bit."""
    assert got.version == want.version
    assert got.meta == want.meta
    for name, tensor in want.tensors.items():
        assert torch.equal(got.tensors[name], tensor), name
