"""The seam between collectives and the network: a per-peer message channel and a mailbox.

A :class:`CommTransport` sends one message to one peer and returns once the peer has handled it
(that is what net's bulk streams do, and what the in-memory fake does). Incoming messages all go
to one receiver, a :class:`CommMailbox`, which reads the small frame header and hands the
message to the round it belongs to. A message for a round that has not opened yet (a fast peer
started first) waits a bounded time for the round to open, in a bounded room (see
:mod:`gossamer.comm.early_room`); one for a round that already ended is dropped. One for a round
this peer is not in, while it is in another round of the same key (its id starts with the key's
bytes, see :func:`~gossamer.comm.plan.round_id_of`), or after it settled the key without a round
(it averaged alone), is refused at once: the sender formed another group under that key.

Frame header (little-endian)::

    magic "GCM1" | kind u8 | flags u8 | 0 u16 | round id 16 bytes | part u32 | chunk u32
    | peer index u32 | weight f64

followed by tensor pieces (see :mod:`gossamer.comm.wire`) for contributions and results.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import struct
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from gossamer.comm.early_room import (
    NO_ROOM,
    EarlyRoom,
    RoomPath,
    path_of,
    refused_for_room,
    sender_host,
)
from gossamer.comm.memory import keep_freed_memory
from gossamer.comm.plan import ROUND_KEY_TAG_NBYTES
from gossamer.core.clock import Clock
from gossamer.core.errors import (
    GossamerError,
    NotInRoundError,
    PeerUnavailableError,
    ProtocolError,
)

__all__ = [
    "CHUNK_ELEMENTS_LIMIT",
    "FLAG_ELSEWHERE",
    "FLAG_REASSIGNED",
    "FLAG_RING",
    "MAX_MESSAGE_BYTES",
    "WEIGHT_RANGE",
    "CommMailbox",
    "CommTransport",
    "FinishedRound",
    "Frame",
    "FrameKind",
    "Message",
    "MessageReceiver",
    "RoundHandler",
    "message_bytes",
    "message_nbytes",
    "pack_frame",
    "refused_for_room",
    "sender_host",
    "unpack_frame",
    "wait_for_event",
    "weight_in_range",
]

_log = logging.getLogger(__name__)
_MAX_ANSWERS_IN_FLIGHT = 64
_ANSWER_TIMEOUT_S = 5.0
"""Deadline of a ROUND_CLOSED answer (best effort: without it the asker waits to its deadline)."""
_MAGIC = b"GCM1"
_FRAME = struct.Struct("<4sBBH16sIIId")
FRAME_NBYTES = _FRAME.size
ROUND_ID_NBYTES = 16
CHUNK_ELEMENTS_LIMIT = 1 << 24
"""Most values in one chunk message (64 MiB of float32; rounds use 2^19-2^20)."""
WEIGHT_RANGE = (1e-12, 1e12)
"""Where a member's weight in an average lies, unless it is 0: the owners sum values times
weights in float32, where a weight of 1e39 is infinite and one of 1e-46 is 0."""


def weight_in_range(weight: float) -> bool:
    """Whether ``weight`` is 0 or within :data:`WEIGHT_RANGE` (False for NaN)."""
    return weight == 0 or WEIGHT_RANGE[0] <= weight <= WEIGHT_RANGE[1]


MAX_MESSAGE_BYTES = 2 * CHUNK_ELEMENTS_LIMIT * 4
"""Largest comm message a peer takes: a chunk of the most values, uncompressed, with room
for the headers of the tensor pieces it spans (a larger one is refused at its first bytes)."""

MessageReceiver = Callable[[str, memoryview, str | None], Awaitable[None]]
"""Called with (sender peer id, message, sender's host) for every message a transport
receives. The host (see :func:`sender_host`) is None where the transport cannot tell it: a
message from this machine, or one carried through a relay."""

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
    receiver's failure report or reassigned contribution arrived, or (with
    :data:`FLAG_ELSEWHERE`) averaged the round's tensors by other means and never joins it: it
    will send nothing more in this round; no payload."""
    PRESENT = 6
    """The sender is in the round (sent at its start when the caller asks, in a round that
    may run without some members: see ``all_reduce``'s ``announce``); no payload."""
    RESULT_HELD = 7
    """(Round the ring) The sender holds the average of chunk ``chunk`` of the receiver's part,
    passed on to it round the ring; no payload."""
    RING_OFF = 8
    """(Round the ring) The sender, owner of part ``part``, sends its averages directly from now
    on (they made no progress round the ring, or its result deadline passed): the receiver
    passes none of them on any more and drops those it has not passed on yet; no payload."""


_HEADER_ONLY = frozenset(
    {
        FrameKind.PEER_FAILED,
        FrameKind.STEP_ASK,
        FrameKind.ROUND_CLOSED,
        FrameKind.PRESENT,
        FrameKind.RESULT_HELD,
        FrameKind.RING_OFF,
    }
)
"""The kinds of frame that carry no payload."""

FLAG_REASSIGNED = 1
"""The frame concerns a part whose owner failed and that a backup reduces instead."""
FLAG_ELSEWHERE = 2
"""(ROUND_CLOSED) The sender averaged the round by other means and never took part."""
FLAG_RING = 4
"""(RESULT) The owner's average travels round the ring: the owner sends it to the member just
behind it, and each member that gets it from the member just ahead passes it on to the one
just behind, up to the member just ahead of the owner (see :mod:`gossamer.comm.steps`)."""
FLAG_DELIVERED = 8
"""(PEER_FAILED naming its sender: it left the round) Every live member holds the sender's
averages of its part (its sends of them returned): its part is not averaged again."""


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
    if not weight_in_range(weight):
        raise ProtocolError(
            f"comm message with weight {weight}; weights are 0 or within {WEIGHT_RANGE}"
        )
    frame = Frame(frame_kind, bytes(round_id), part, chunk, index, weight, flags)
    if frame_kind in _HEADER_ONLY and len(message) > _FRAME.size:
        raise ProtocolError(f"comm {frame_kind.name} message with a payload; it has none")
    return frame, message[_FRAME.size :]


@dataclass(frozen=True, slots=True)
class FinishedRound:
    """What a member keeps of a round it finished with every part's average, to answer the
    members still in it (see :data:`FrameKind.ROUND_CLOSED`)."""

    members: frozenset[str]
    from_owner: frozenset[int]
    """The parts whose averages it took from their own owner (not from a backup)."""
    elsewhere: bool = False
    """It never took part: it averaged this round's tensors by other means (a
    torch.distributed collective that succeeded here and failed on others, which then run
    the round over p2p). Any message of a member is answered."""

    def answers(self, sender: str, frame: Frame) -> bool:
        """Whether ``frame`` from ``sender`` shows a member still in the round that waits for
        an average this one holds from an owner the sender gave up on: a report that the owner
        failed, or a contribution to the owner's part reassigned to this member. Where this one
        took that part from a backup too, the backup's averages are on their way to the sender,
        and nothing is said."""
        if sender not in self.members or frame.kind is FrameKind.ROUND_CLOSED:
            return False
        if self.elsewhere:
            return True
        if frame.kind is FrameKind.PEER_FAILED:  # (one that left with its averages delivered:
            # nothing of its part is reassigned, so the sender waits for nothing of this one's)
            delivered = frame.flags & FLAG_DELIVERED
            return not delivered and frame.peer_index in self.from_owner
        reassigned = frame.kind is FrameKind.CONTRIBUTION and frame.flags & FLAG_REASSIGNED
        return bool(reassigned) and frame.part in self.from_owner


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
        # (asyncio.wait: a cancel of the caller that comes meanwhile still reaches the caller;
        # awaiting the tasks themselves under suppress(CancelledError) would swallow it)
        await asyncio.wait({waiter, sleeper})
    return event.is_set()


class CommMailbox:
    """Dispatches a transport's messages to the open rounds by round id.

    Args:
        transport: the transport whose messages it receives (it registers itself).
        clock: time source for the early-arrival wait.
        early_arrival_timeout_s: how long a message for a not-yet-open round waits for it.
        max_waiting_rounds: distinct unopened rounds messages may wait for at once.
        max_waiting_messages: messages that may wait for unopened rounds at once (each holds
            its payload while it waits: a member's early messages of one round are a few per
            sender, as many as it keeps in flight).
        max_waiting_bytes: bytes those messages may hold at once (a round's messages are at
            most 4 MiB of values each). One sender may hold an eighth of the rounds and
            messages and a quarter of the bytes.

    Those messages wait in an :class:`~gossamer.comm.early_room.EarlyRoom`, which says who
    gives way when it is full.
    """

    def __init__(
        self,
        transport: CommTransport,
        clock: Clock,
        *,
        early_arrival_timeout_s: float = 30.0,
        max_waiting_rounds: int = 64,
        max_waiting_messages: int = 1024,
        max_waiting_bytes: int = 1 << 30,
    ) -> None:
        self.transport = transport
        self._clock = clock
        self._early_timeout_s = early_arrival_timeout_s
        self.early_room = EarlyRoom(
            max_rounds=max_waiting_rounds,
            max_messages=max_waiting_messages,
            max_bytes=max_waiting_bytes,
            peer_id=lambda: self.peer_id,
        )
        """Messages waiting for rounds not opened here yet (read it; the mailbox changes it)."""
        self._rounds: dict[bytes, RoundHandler] = {}
        self._closed: OrderedDict[bytes, FinishedRound | None] = OrderedDict()
        """Rounds that ended here, with what is kept of those that finished with every
        part's average."""
        self._left: OrderedDict[bytes, None] = OrderedDict()
        """Rounds this peer left before they ended (their callers cancelled them): a later
        message of one is refused, so its sender stops waiting for this peer."""
        self._answered: OrderedDict[tuple[bytes, str], None] = OrderedDict()
        """(round, peer) pairs told that the round had closed here (each is told once)."""
        self._settled_keys: OrderedDict[bytes, None] = OrderedDict()
        """Tags of round keys this peer runs no round of (see :meth:`settle_key`)."""
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
        self._left.pop(round_id, None)
        tag = round_id[:ROUND_KEY_TAG_NBYTES]
        self._settled_keys.pop(tag, None)
        for waiting in [w for w in self.early_room.round_ids() if w[:ROUND_KEY_TAG_NBYTES] == tag]:
            # The round itself, or another group's under the same key: those are refused now.
            self._wake(waiting)

    def close_round(self, round_id: bytes, *, finished: FinishedRound | None = None) -> None:
        """Stop routing ``round_id``; later messages of it are dropped.

        Args:
            finished: given when the round ended with every part's average here (not at its
                deadline, not dropped by the others): a member still in it that shows it waits
                for one of them is told that nothing more comes (see :meth:`answer_closed`).
        """
        self._rounds.pop(round_id, None)
        self._closed[round_id] = finished
        self._wake(round_id)  # messages waiting for it to open: it never will
        while len(self._closed) > 1024:
            self._closed.popitem(last=False)

    def leave_round(
        self, round_id: bytes, notice: bytes, members: Sequence[str], *, refuse: bool
    ) -> None:
        """Stop routing ``round_id`` before it ended (its caller cancelled it) and send
        ``notice`` (in the background) to ``members``, the ones still in it, so they stop
        waiting for this peer now instead of at their deadlines: an owner that left with only
        some of its averages sent would otherwise leave each of them with its own values for
        the rest. With ``refuse`` later messages of the round are refused
        (:class:`NotInRoundError`: their senders take this peer for failed, as the notice
        says), without it dropped."""
        self.close_round(round_id)
        if refuse:
            self._left[round_id] = None
            while len(self._left) > 1024:
                self._left.popitem(last=False)
        for member in members:
            self._send_in_background(member, notice, f"leaving round {round_id.hex()[:12]}")

    def settle_key(self, tag: bytes) -> None:
        """This peer runs no round of the key whose ids start with ``tag`` (see
        :func:`~gossamer.comm.plan.round_key_tag`): it averaged alone or by other means. A
        message of a round of that key is refused at once, as one of another group is where
        this peer runs a round of its own: a peer that counted it among its members stops
        waiting for it, instead of holding its messages here to the early-arrival timeout."""
        self._settled_keys[tag] = None
        while len(self._settled_keys) > 1024:
            self._settled_keys.popitem(last=False)
        for waiting in [w for w in self.early_room.round_ids() if w[:ROUND_KEY_TAG_NBYTES] == tag]:
            self._wake(waiting)

    def unsettle_key(self, tag: bytes) -> None:
        """Undo :meth:`settle_key`: this peer forms a round of that key again (a peer that
        went on alone, or whose round of it ended, may come back to the same key). Rounds of
        the key that ended here are forgotten too: another group's round of it would be
        refused while one is remembered, and a late message of theirs now waits (to the
        early-arrival timeout) instead of being dropped."""
        self._settled_keys.pop(tag, None)
        for ended in [r for r in self._closed if r[:ROUND_KEY_TAG_NBYTES] == tag]:
            del self._closed[ended]

    async def deliver(self, sender: str, message: memoryview, host: str | None = None) -> None:
        """The transport's receiver: route one message to its round.

        Args:
            sender: the sender's peer id.
            message: the message.
            host: the sender's host (see :func:`sender_host`), None where the transport cannot
                tell it. Where the waiting room is full, a message that waits for its round to
                open is ranked by its host's network, its host and its sender (see
                :mod:`~gossamer.comm.early_room`), so identities made up on one machine give
                way to senders of other hosts. Where the host is unknown (a message from this
                machine, where a swarm on one machine has every member, or one carried through
                a relay, which arrives from this machine too), the sender is a host of its own,
                as before hosts were counted: a relay's peers are not lumped together.
        """
        frame, body = unpack_frame(message)
        handler = self._rounds.get(frame.round_id)
        if handler is None:
            if frame.round_id in self._left:
                raise NotInRoundError(
                    f"this peer left round {frame.round_id.hex()[:12]} before it ended "
                    "(its caller cancelled it)"
                )
            if frame.round_id not in self._closed:
                self._refuse_other_group(frame.round_id)
                path = path_of(sender, host)
                handler = await self._wait_open(frame.round_id, len(message), path)
                self._refuse_other_group(frame.round_id)
            if handler is None:
                # A straggler of a round that already ended. One that shows the sender still
                # waits for something of this peer's: say that it never comes.
                finished = self._closed.get(frame.round_id)
                if finished is not None and finished.answers(sender, frame):
                    self.answer_closed(sender, frame)
                return
        await handler.handle(sender, frame, body)

    def answer_closed(self, sender: str, frame: Frame) -> None:
        """Tell ``sender`` (in the background, once per round) that the round ``frame`` belongs
        to had finished here with every average, so it stops waiting for this peer."""
        key = (frame.round_id, sender)
        if key in self._answered or len(self._answers) >= _MAX_ANSWERS_IN_FLIGHT:
            return  # (too many at once: the rest stop at their deadlines, as without answers)
        self._answered[key] = None
        while len(self._answered) > 1024:
            self._answered.popitem(last=False)
        finished = self._closed.get(frame.round_id)
        flags = FLAG_ELSEWHERE if finished is not None and finished.elsewhere else 0
        answer = Frame(FrameKind.ROUND_CLOSED, frame.round_id, frame.part, 0, 0, 0.0, flags)
        what = f"telling it that round {frame.round_id.hex()[:12]} closed"
        self._send_in_background(sender, pack_frame(answer), what)

    async def aclose(self) -> None:
        """Cancel the notices still being sent (each ends by itself within
        :data:`_ANSWER_TIMEOUT_S` otherwise) and wait for them."""
        tasks = list(self._answers)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _send_in_background(self, peer: str, message: bytes, what: str) -> None:
        """Send a notice nothing waits for; lost, its receiver stops at its own deadline."""
        if len(self._answers) >= _MAX_ANSWERS_IN_FLIGHT:
            return  # (too many at once: the rest stop at their deadlines, as without notices)

        async def send() -> None:
            try:
                await self.transport.send(peer, message, timeout_s=_ANSWER_TIMEOUT_S)
            except GossamerError as exc:
                _log.debug("%s to %s failed: %s", what, peer[:12], exc)

        task = asyncio.get_running_loop().create_task(send())
        self._answers.add(task)
        task.add_done_callback(self._answers.discard)

    def awaits_round_of_key(self, tag: bytes) -> bool:
        """Whether messages wait for a round of the key whose ids start with ``tag`` (see
        :func:`~gossamer.comm.plan.round_key_tag`): some member already runs such a round."""
        return any(w[:ROUND_KEY_TAG_NBYTES] == tag for w in self.early_room.round_ids())

    def _refuse_other_group(self, round_id: bytes) -> None:
        """Refuse a message of a round this peer is not in while it is (or was) in another
        round of the same key: the sender formed another group under that key (the members
        disagree), and waiting for the round to open would hold the sender to its deadline.

        Raises:
            NotInRoundError: so it is.
        """
        if round_id in self._rounds or round_id in self._closed:
            return
        tag = round_id[:ROUND_KEY_TAG_NBYTES]
        if tag in self._settled_keys:
            raise NotInRoundError(
                f"round {round_id.hex()[:12]} is not this peer's: it runs no round of that key "
                "(it averaged alone or by other means; the members disagree on the group)"
            )
        for other in itertools.chain(self._rounds, reversed(self._closed)):
            if other[:ROUND_KEY_TAG_NBYTES] == tag:
                raise NotInRoundError(
                    f"round {round_id.hex()[:12]} is not this peer's: under the same key it is "
                    f"in round {other.hex()[:12]}, of other members or parts (the members "
                    "disagree on the group)"
                )

    async def _wait_open(self, round_id: bytes, nbytes: int, path: RoomPath) -> RoundHandler | None:
        """Hold a message of ``round_id`` (``nbytes``, from the sender at ``path``) until its
        round opens here; the round's handler then (None if the round ended or its key was
        settled).

        Raises:
            ProtocolError: the sender holds its share of the room already, or the round did not
                open within the early-arrival timeout.
            PeerUnavailableError: no room, or the message was dropped for a sender that held
                less (see :func:`refused_for_room`): the sender tries again.
        """
        message = self.early_room.admit(path, round_id, nbytes)
        try:
            deadline = self._clock.monotonic() + self._early_timeout_s
            opened = await wait_for_event(message.wake, deadline, self._clock)
        finally:  # woken, timed out, evicted, or its sender gave up (the call cancelled)
            self.early_room.release(message)
        if message.evicted:
            raise PeerUnavailableError(
                f"{NO_ROOM} (this message waited for round {round_id.hex()[:12]} and was "
                "dropped for a sender that held less of the room)"
            )
        handler = self._rounds.get(round_id)
        if handler is None and not opened:
            raise ProtocolError(f"round {round_id.hex()[:12]} did not open on this peer in time")
        return handler

    def _wake(self, round_id: bytes) -> None:
        """Wake the messages waiting for ``round_id`` (see :meth:`EarlyRoom.wake_round
        <gossamer.comm.early_room.EarlyRoom.wake_round>`)."""
        self.early_room.wake_round(round_id)
