"""The seam between collectives and the network: a per-peer message channel and a mailbox.

A :class:`CommTransport` sends one message to one peer and returns once the peer has handled it
(that is what net's bulk streams do, and what the in-memory fake does). Incoming messages all go
to one receiver, a :class:`CommMailbox`, which reads the small frame header and hands the
message to the round it belongs to. A message for a round that has not opened yet (a fast peer
started first) waits a bounded time for the round to open; one for a round that already ended is
dropped.

Frame header (little-endian)::

    magic "GCM1" | kind u8 | flags u8 | 0 u16 | round id 16 bytes | part u32 | chunk u32
    | peer index u32 | weight f64

followed by tensor pieces (see :mod:`gossamer.comm.wire`) for contributions and results.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import struct
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from gossamer.comm.memory import keep_freed_memory
from gossamer.core.clock import Clock
from gossamer.core.errors import GossamerError, ProtocolError

__all__ = [
    "CommMailbox",
    "CommTransport",
    "Frame",
    "FrameKind",
    "Message",
    "MessageReceiver",
    "RoundHandler",
    "asks_for_more",
    "message_bytes",
    "message_nbytes",
    "pack_frame",
    "unpack_frame",
    "wait_for_event",
]

_log = logging.getLogger(__name__)
_ANSWER_TIMEOUT_S = 5.0
"""Deadline of a ROUND_CLOSED answer (best effort: without it the asker waits to its deadline)."""
_MAGIC = b"GCM1"
_FRAME = struct.Struct("<4sBBH16sIIId")
FRAME_NBYTES = _FRAME.size
ROUND_ID_NBYTES = 16

MessageReceiver = Callable[[str, memoryview], Awaitable[None]]
"""Called with (sender peer id, message) for every message a transport receives."""

Message = bytes | bytearray | tuple[bytes | memoryview, ...]
"""What a transport sends: one buffer, or byte buffers sent back to back as one message (so a
chunk's values go out from where they lie instead of being copied into a message first)."""


def message_nbytes(message: Message) -> int:
    """Bytes in ``message``."""
    if isinstance(message, tuple):
        return sum(len(piece) for piece in message)
    return len(message)


def message_bytes(message: Message) -> bytes | bytearray:
    """``message`` as one buffer (copied if it is in pieces)."""
    return b"".join(message) if isinstance(message, tuple) else message


class CommTransport(Protocol):
    """Sends messages to peers; implemented over net's bulk streams and in memory for tests."""

    @property
    def peer_id(self) -> str:
        """This peer's id."""
        ...

    async def send(self, peer_id: str, message: Message, *, timeout_s: float) -> None:
        """Deliver ``message`` to ``peer_id``'s receiver; return once the receiver handled it.

        Raises:
            GossamerError: the peer could not be reached, refused the message, or the deadline
                passed.
        """
        ...

    def set_receiver(self, receiver: MessageReceiver) -> None:
        """Route every incoming message to ``receiver``."""
        ...


class FrameKind(enum.IntEnum):
    """What a message carries."""

    CONTRIBUTION = 1
    """A member's values for one chunk of a part, sent to the part's reducer."""
    RESULT = 2
    """The average of one chunk, sent by the part's reducer to every member."""
    PEER_FAILED = 3
    """The sender saw the member at ``peer_index`` fail; no payload."""
    STEP_ASK = 4
    """The sender of step ``chunk`` to the receiver asks whether it may start; the receiver
    handles it once it received everything of the steps before (see :mod:`gossamer.comm.steps`);
    no payload."""
    ROUND_CLOSED = 5
    """The sender had already finished the round, with every part's average, when the
    receiver's failure report or reassigned contribution arrived: it will send nothing more
    in this round; no payload."""


FLAG_REASSIGNED = 1
"""The frame concerns a part whose owner failed and that a backup reduces instead."""


@dataclass(frozen=True, slots=True)
class Frame:
    """A parsed frame header."""

    kind: FrameKind
    round_id: bytes
    part: int
    chunk: int
    peer_index: int
    weight: float
    flags: int = 0


def pack_frame(frame: Frame) -> bytes:
    """The header bytes of ``frame``."""
    assert len(frame.round_id) == ROUND_ID_NBYTES
    return _FRAME.pack(
        _MAGIC,
        int(frame.kind),
        frame.flags,
        0,
        frame.round_id,
        frame.part,
        frame.chunk,
        frame.peer_index,
        frame.weight,
    )


def unpack_frame(message: memoryview) -> tuple[Frame, memoryview]:
    """The frame header and the body after it.

    Raises:
        ProtocolError: not a well-formed comm frame.
    """
    if len(message) < _FRAME.size:
        raise ProtocolError("comm message shorter than its frame header")
    magic, kind, flags, _, round_id, part, chunk, index, weight = _FRAME.unpack_from(message)
    if magic != _MAGIC:
        raise ProtocolError("comm message without the GCM1 magic")
    try:
        frame_kind = FrameKind(kind)
    except ValueError:
        raise ProtocolError(f"comm message of unknown kind {kind}") from None
    if not math.isfinite(weight) or weight < 0:
        raise ProtocolError(f"comm message with weight {weight}; weights are finite and >= 0")
    frame = Frame(frame_kind, bytes(round_id), part, chunk, index, weight, flags)
    return frame, message[_FRAME.size :]


def asks_for_more(frame: Frame) -> bool:
    """Whether ``frame`` shows that its sender is still in the round with a failure on its
    hands: a failure report, or a contribution to a part reassigned to the receiver."""
    if frame.kind is FrameKind.PEER_FAILED:
        return True
    return frame.kind is FrameKind.CONTRIBUTION and bool(frame.flags & FLAG_REASSIGNED)


class RoundHandler(Protocol):
    """What a mailbox hands a round's messages to."""

    async def handle(self, sender: str, frame: Frame, body: memoryview) -> None:
        """Process one message (decode in a thread; raise ProtocolError if malformed)."""
        ...


async def wait_for_event(event: asyncio.Event, deadline_s: float, clock: Clock) -> bool:
    """Wait until ``event`` is set or ``clock`` reaches ``deadline_s``; True if it was set."""
    if event.is_set():
        return True
    remaining = deadline_s - clock.monotonic()
    if remaining <= 0:
        return False
    waiter = asyncio.ensure_future(event.wait())
    sleeper = asyncio.ensure_future(clock.sleep_async(remaining))
    try:
        await asyncio.wait({waiter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (waiter, sleeper):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return event.is_set()


class CommMailbox:
    """Dispatches a transport's messages to the open rounds by round id.

    Args:
        transport: the transport whose messages it receives (it registers itself).
        clock: time source for the early-arrival wait.
        early_arrival_timeout_s: how long a message for a not-yet-open round waits for it.
        max_waiting_rounds: distinct unopened rounds messages may wait for at once.
    """

    def __init__(
        self,
        transport: CommTransport,
        clock: Clock,
        *,
        early_arrival_timeout_s: float = 30.0,
        max_waiting_rounds: int = 64,
    ) -> None:
        self.transport = transport
        self._clock = clock
        self._early_timeout_s = early_arrival_timeout_s
        self._max_waiting_rounds = max_waiting_rounds
        self._rounds: dict[bytes, RoundHandler] = {}
        self._opened: dict[bytes, asyncio.Event] = {}
        self._closed: OrderedDict[bytes, bool] = OrderedDict()
        """Rounds that ended here, and whether each finished with every part's average."""
        self._answered: OrderedDict[tuple[bytes, str], None] = OrderedDict()
        """(round, peer) pairs told that the round had closed here (each is told once)."""
        self._answers: set[asyncio.Task[None]] = set()
        transport.set_receiver(self.deliver)
        keep_freed_memory()  # rounds reuse the pages of their message buffers

    @property
    def peer_id(self) -> str:
        """The local peer id."""
        return self.transport.peer_id

    def open_round(self, round_id: bytes, handler: RoundHandler) -> None:
        """Start routing messages of ``round_id`` to ``handler``."""
        if round_id in self._rounds:
            raise ValueError(f"round {round_id.hex()} is already open on this peer")
        self._rounds[round_id] = handler
        self._closed.pop(round_id, None)
        event = self._opened.pop(round_id, None)
        if event is not None:
            event.set()

    def close_round(self, round_id: bytes, *, finished: bool = False) -> None:
        """Stop routing ``round_id``; later messages of it are dropped.

        Args:
            finished: the round ended with every part's average here (not at its deadline,
                not dropped by the others): a member still in it that reports a failure or
                sends a reassigned contribution is told so (see :meth:`answer_closed`).
        """
        self._rounds.pop(round_id, None)
        self._closed[round_id] = finished
        while len(self._closed) > 1024:
            self._closed.popitem(last=False)

    async def deliver(self, sender: str, message: memoryview) -> None:
        """The transport's receiver: route one message to its round."""
        frame, body = unpack_frame(message)
        handler = self._rounds.get(frame.round_id)
        if handler is None:
            if frame.round_id in self._closed:
                # A straggler of a round that already ended. One that shows the sender still
                # waits for something of this peer's: say that it never comes.
                if self._closed[frame.round_id] and asks_for_more(frame):
                    self.answer_closed(sender, frame)
                return
            handler = await self._wait_open(frame.round_id)
            if handler is None:
                return
        await handler.handle(sender, frame, body)

    def answer_closed(self, sender: str, frame: Frame) -> None:
        """Tell ``sender`` (in the background, once per round) that the round ``frame`` belongs
        to had finished here with every average, so it stops waiting for this peer."""
        key = (frame.round_id, sender)
        if key in self._answered:
            return
        self._answered[key] = None
        while len(self._answered) > 1024:
            self._answered.popitem(last=False)
        answer = Frame(FrameKind.ROUND_CLOSED, frame.round_id, frame.part, 0, 0, 0.0)

        async def send() -> None:
            try:
                await self.transport.send(sender, pack_frame(answer), timeout_s=_ANSWER_TIMEOUT_S)
            except GossamerError as exc:  # it stops at its own deadline instead
                _log.debug("telling %s that round %s closed failed: %s", sender[:12], key, exc)

        task = asyncio.get_running_loop().create_task(send())
        self._answers.add(task)
        task.add_done_callback(self._answers.discard)

    async def _wait_open(self, round_id: bytes) -> RoundHandler | None:
        event = self._opened.get(round_id)
        if event is None:
            if len(self._opened) >= self._max_waiting_rounds:
                raise ProtocolError("too many messages for rounds this peer has not opened")
            event = self._opened[round_id] = asyncio.Event()
        deadline = self._clock.monotonic() + self._early_timeout_s
        opened = await wait_for_event(event, deadline, self._clock)
        if not opened:
            self._opened.pop(round_id, None)
            raise ProtocolError(f"round {round_id.hex()[:12]} did not open on this peer in time")
        return self._rounds.get(round_id)
