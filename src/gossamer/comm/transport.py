"""The seam between collectives and the network: a per-peer message channel and a mailbox.

A :class:`CommTransport` sends one message to one peer and returns once the peer has handled it
(that is what net's bulk streams do, and what the in-memory fake does). Incoming messages all go
to one receiver, a :class:`CommMailbox`, which reads the small frame header and hands the
message to the round it belongs to. A message for a round that has not opened yet (a fast peer
started first) waits a bounded time for the round to open; one for a round that already ended is
dropped. One for a round this peer is not in, while it is in another round of the same key (its
id starts with the key's bytes, see :func:`~gossamer.comm.plan.round_id_of`), or after it settled
the key without a round (it averaged alone), is refused at once: the sender formed another group
under that key.

Frame header (little-endian)::

    magic "GCM1" | kind u8 | flags u8 | 0 u16 | round id 16 bytes | part u32 | chunk u32
    | peer index u32 | weight f64

followed by tensor pieces (see :mod:`gossamer.comm.wire`) for contributions and results.
"""

from __future__ import annotations

import asyncio
import bisect
import enum
import ipaddress
import itertools
import logging
import struct
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

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
_SHARES = 8
"""One sender may hold at most this fraction of the rounds and messages waiting for unopened
rounds."""
_BYTE_SHARES = 4
"""... and this fraction of their bytes (a quarter of 1 GiB: three messages of the largest
chunk, as many as a member keeps in flight to one peer)."""
_NETWORK_PREFIX = 48
"""IPv6 senders are ranked in the full room by this prefix before their /64 (see
:meth:`CommMailbox._make_room`): a machine with a routed /56 or /48 sends from many /64s."""
_NO_ROOM = "no room here for messages waiting for unopened rounds; try again"
"""What a refusal for lack of room says (see :func:`refused_for_room`): the receiver is alive,
and its waiting room is held by senders that hold more of it than the refused one."""
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


def refused_for_room(exc: BaseException) -> bool:
    """Whether ``exc`` is a receiver's refusal of an early message for lack of room (or its
    eviction to make room for a sender that held less): no failure of the receiver's, and the
    sender tries again until its deadline. It travels as a retryable error whose text the
    sender reads, the only thing of a handler's error that reaches a sender over gRPC."""
    return isinstance(exc, PeerUnavailableError) and _NO_ROOM in str(exc)


def sender_host(address: str) -> str:
    """What a sender at ``address`` (the IP address its connection came from) is ranked by in
    a receiver's full early-message room (see :meth:`CommMailbox._make_room`): an IPv4 address
    as it is, an IPv6 address by its /64 (the room ranks its /48 first), an IPv4-mapped IPv6
    address as its IPv4 address; anything else as it is. A /64 is not one machine: a machine
    with a routed /56 or /48 sends from many /64s (its /48 holds them together), and on a
    shared subnet (SLAAC, a cloud's /64) many machines send from one /64, as many behind one
    NAT send from one IPv4 address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip), 64), strict=False))
    return str(ip)


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


_Path = tuple[str, str, str]
"""Where a waiting message is counted in the room, coarsest first: its sender's network (an
IPv6 /48; an IPv4 address), host (an IPv6 /64; an IPv4 address) and identity."""


def _path_of(sender: str, host: str | None) -> _Path:
    """Where a message of ``sender`` at ``host`` (see :func:`sender_host`; None: this machine,
    or unknown) is counted: a sender of no known host is a network and a host of its own."""
    if host is None:
        return (f"peer {sender}", f"peer {sender}", sender)
    try:
        net = ipaddress.ip_network(host, strict=False)
    except ValueError:
        return (host, host, sender)
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= _NETWORK_PREFIX:
        fine = net.supernet(new_prefix=64) if net.prefixlen > 64 else net
        return (str(net.supernet(new_prefix=_NETWORK_PREFIX)), str(fine), sender)
    return (host, host, sender)


@dataclass(eq=False, slots=True)
class _EarlyMessage:
    """A message waiting here for its round to open (see :meth:`CommMailbox.deliver`)."""

    sender: str
    path: _Path
    """Where it is counted (see :meth:`CommMailbox._make_room`)."""
    round_id: bytes
    nbytes: int
    seq: int = 0
    """Its place in the order messages began to wait (earlier: smaller)."""
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when its round opens (or ends, or its key is settled), or it is evicted."""
    evicted: bool = False
    """Dropped to make room for a sender that held less (see :meth:`CommMailbox._make_room`)."""
    held: bool = False
    """Counted in the waiting room's tables."""


@dataclass(slots=True)
class _Holding:
    """What one sender, host or network holds of the waiting room."""

    messages: list[_EarlyMessage] = field(default_factory=list)
    """Its waiting messages, oldest first."""
    rounds: Counter[bytes] = field(default_factory=Counter)
    """How many of them wait for each round."""
    nbytes: int = 0
    """Their bytes."""

    def amount(self, what: str) -> int:
        """How much of ``what`` (``rounds``, ``messages`` or ``bytes``) it holds."""
        if what == "bytes":
            return self.nbytes
        return len(self.rounds) if what == "rounds" else len(self.messages)

    def add(self, message: _EarlyMessage) -> None:
        """Count ``message`` here (in its place by age: one given back after a plan to make
        room fell through goes back where it was)."""
        bisect.insort(self.messages, message, key=_age_order)
        self.rounds[message.round_id] += 1
        self.nbytes += message.nbytes

    def remove(self, message: _EarlyMessage) -> bool:
        """Stop counting ``message`` here; whether nothing is left."""
        self.messages.remove(message)
        self.rounds[message.round_id] -= 1
        if self.rounds[message.round_id] <= 0:
            del self.rounds[message.round_id]
        self.nbytes -= message.nbytes
        return not self.messages


def _age_order(message: _EarlyMessage) -> int:
    return message.seq


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

    When the waiting room is full, the network (an IPv6 /48; an IPv4 address) whose senders
    hold the most of what is short (rounds, messages or bytes) gives way to a message from a
    network that holds less: the oldest messages of its heaviest host's heaviest sender are
    dropped (refused to their senders as for lack of room). Where no other network holds
    more, the same rule runs among the hosts (an IPv6 /64; an IPv4 address) of the
    newcomer's network, and then among the senders of its host (see :meth:`_make_room`).
    Else the message is refused for lack of room (:func:`refused_for_room`), which its sender
    retries until its deadline rather than taking this peer for failed. A few identities
    (eight, or four by bytes) filled the room for the early-arrival timeout and again after
    it, and every member's early message was refused: its sender dropped this healthy peer
    from the round. Identities are free in an open swarm, and as many as the room has places,
    each holding one message and sending again as fast as it was dropped, had a member's
    young message dropped among them; made up on one host they now give way to the members
    of other hosts. Hosts cap nothing: the senders of one address (behind a NAT, or every
    sender where a proxy rewrites source addresses) fare among themselves as if counted by
    identity alone.
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
        self._max_waiting_rounds = max_waiting_rounds
        self._max_waiting_messages = max_waiting_messages
        self._max_waiting_bytes = max_waiting_bytes
        self._waiting_bytes = 0
        """Bytes of the messages waiting for unopened rounds."""
        self._num_waiting = 0
        """Messages waiting for unopened rounds."""
        self._rounds: dict[bytes, RoundHandler] = {}
        self._opened: dict[bytes, list[_EarlyMessage]] = {}
        """Rounds that messages wait for (to open here), with those messages: the last to stop
        waiting takes the entry."""
        self._by_sender: dict[str, _Holding] = {}
        """What the messages waiting for unopened rounds hold, by sender: one sender (a peer
        in no group of this one's, say) may hold only a share of the room, not all of it."""
        self._by_path: dict[tuple[str, ...], _Holding] = {}
        """... and by network, by host within it and by sender within that (each prefix of
        their paths, see :func:`_path_of`): who gives way in a full room."""
        self._seq = itertools.count()
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
        for waiting in [w for w in self._opened if w[:ROUND_KEY_TAG_NBYTES] == tag]:
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
        for waiting in [w for w in self._opened if w[:ROUND_KEY_TAG_NBYTES] == tag]:
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
                :meth:`_make_room`), so identities made up on one machine give way to senders
                of other hosts. Where the host is unknown (a message from this machine, where
                a swarm on one machine has every member, or one carried through a relay,
                which arrives from this machine too), the sender is a host of its own, as
                before hosts were counted: a relay's peers are not lumped together.
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
                path = _path_of(sender, host)
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
        return any(w[:ROUND_KEY_TAG_NBYTES] == tag for w in self._opened)

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

    async def _wait_open(self, round_id: bytes, nbytes: int, path: _Path) -> RoundHandler | None:
        """Hold a message of ``round_id`` (``nbytes``, from the sender at ``path``) until its
        round opens here; the round's handler then (None if the round ended or its key was
        settled).

        Raises:
            ProtocolError: the sender holds its share of the room already, or the round did not
                open within the early-arrival timeout.
            PeerUnavailableError: no room, or the message was dropped for a sender that held
                less (see :func:`refused_for_room`): the sender tries again.
        """
        sender = path[-1]
        mine = self._by_sender.get(sender, _Holding())
        # One sender may hold a share of each table, not all of it: else its messages alone
        # (1,024 words for one round id, or 8 of the largest) refused everyone else's.
        num_rounds, num_messages = mine.amount("rounds"), mine.amount("messages")
        if round_id not in mine.rounds and num_rounds >= self._share("rounds"):
            raise ProtocolError(
                f"messages from this peer wait for {num_rounds} rounds this peer has not opened, "
                "its share of them"
            )
        if num_messages >= self._share("messages"):
            raise ProtocolError(
                f"{num_messages} messages from this peer wait for rounds this peer has "
                "not opened, its share of them"
            )
        if mine.nbytes + nbytes > self._share("bytes"):
            raise ProtocolError(
                "this peer's messages waiting for rounds this peer has not opened would pass "
                f"its share of their bytes ({self._share('bytes')})"
            )
        lacking = self._make_room(path, round_id, nbytes)
        if lacking is not None:
            raise PeerUnavailableError(
                f"{_NO_ROOM} (too many {lacking} wait for rounds this peer has not opened, and "
                "no network, host or sender holds more of them than this one's)"
            )
        message = _EarlyMessage(sender, path, round_id, nbytes)
        self._hold(message)
        try:
            deadline = self._clock.monotonic() + self._early_timeout_s
            opened = await wait_for_event(message.wake, deadline, self._clock)
        finally:  # woken, timed out, evicted, or its sender gave up (the call cancelled)
            self._release(message)
        if message.evicted:
            raise PeerUnavailableError(
                f"{_NO_ROOM} (this message waited for round {round_id.hex()[:12]} and was "
                "dropped for a sender that held less of the room)"
            )
        handler = self._rounds.get(round_id)
        if handler is None and not opened:
            raise ProtocolError(f"round {round_id.hex()[:12]} did not open on this peer in time")
        return handler

    def _share(self, what: str) -> int:
        """The most of ``what`` (rounds, messages or bytes) one sender may hold."""
        if what == "bytes":
            return self._max_waiting_bytes // _BYTE_SHARES
        if what == "rounds":
            return max(1, self._max_waiting_rounds // _SHARES)
        return max(1, self._max_waiting_messages // _SHARES)

    def _short_of(self, round_id: bytes, nbytes: int) -> str | None:
        """What the waiting room lacks for one more message of ``round_id`` (``nbytes``):
        ``rounds``, ``messages`` or ``bytes``; None if it fits."""
        if self._waiting_bytes + nbytes > self._max_waiting_bytes:
            return "bytes"
        if self._num_waiting >= self._max_waiting_messages:
            return "messages"
        if round_id not in self._opened and len(self._opened) >= self._max_waiting_rounds:
            return "rounds"
        return None

    def _make_room(self, path: _Path, round_id: bytes, nbytes: int) -> str | None:
        """Make room for a message of ``round_id`` (``nbytes``) counted at ``path``; what the
        room still lacks if it cannot (None: it fits). Nothing is dropped then.

        While the room lacks something (rounds, messages or bytes), the network holding the
        most of it gives way, if it holds more than the newcomer's network; within it the host
        holding the most, and within that the sender holding the most, whose oldest message
        goes. Where no other network holds more than the newcomer's, the same rule runs among
        the hosts of its network, and then among the senders of its host: one holding more
        than the newcomer gives. Of two that hold as much, the one whose oldest message came
        first gives (a flood's messages are the old ones). Where the room lacks rounds, a
        round goes whole, and only one every message of which comes from senders that could
        give way (else dropping its messages would free no entry).

        Hosts set no cap of their own: while the room has space a message waits as long as its
        sender holds no more than a sender's share. They rank the senders only where it is
        full, so identities made up on one host take room from each other, not from a member
        of another host that holds less than theirs, and the senders of one host (behind one
        NAT or proxy) fare among themselves as if counted by identity alone. An honest
        member's early messages are a few per round it is in, young (its round opens here
        soon): a sender that floods holds more, and longer, and loses them; a member's
        message dropped is sent again (see :func:`refused_for_room`). The room's bounds never
        move: what is taken is freed first.
        """
        dropping: list[_EarlyMessage] = []
        while (short := self._short_of(round_id, nbytes)) is not None:
            freeing = self._to_give(path, short)
            if not freeing:
                for message in dropping:  # (the room is as it was: nobody loses a message)
                    self._hold(message, again=True)
                return short
            for message in freeing:
                self._release(message)
            dropping += freeing
        for message in dropping:
            self._evict(message)
        return None

    def _to_give(self, path: _Path, what: str) -> list[_EarlyMessage]:
        """The messages that give way to one counted at ``path`` for lack of ``what`` (see
        :meth:`_make_room`): the oldest of the sender that ranks first, or where ``what`` is
        rounds a whole round of senders that all rank above ``path``; none if none does."""
        giving = [
            leaf for leaf in self._by_path if len(leaf) == 3 and self._gives(leaf, path, what)
        ]
        if what != "rounds":
            first = max(giving, key=lambda leaf: self._rank(leaf, what), default=None)
            return [] if first is None else self._by_path[first].messages[:1]
        giving.sort(key=lambda leaf: self._rank(leaf, what), reverse=True)
        can_give = set(giving)
        for leaf in giving:
            for message in self._by_path[leaf].messages:  # (its oldest round first)
                waiting = self._opened[message.round_id]
                if all(other.path in can_give for other in waiting):
                    return list(waiting)
        return []

    def _gives(self, leaf: tuple[str, ...], path: _Path, what: str) -> bool:
        """Whether the sender at ``leaf`` ranks above one at ``path`` for ``what``: where
        their paths part, its network (or host, or itself) holds more than the newcomer's."""
        for depth in range(1, len(path) + 1):
            if leaf[:depth] != path[:depth]:
                theirs = self._by_path.get(path[:depth])
                return self._by_path[leaf[:depth]].amount(what) > (
                    0 if theirs is None else theirs.amount(what)
                )
        return False  # (the newcomer's own messages)

    def _rank(self, leaf: tuple[str, ...], what: str) -> tuple[tuple[int, int], ...]:
        """Order of giving way among senders: by what their network holds of ``what``, then
        their host, then they; at each level the one whose oldest message came first."""
        held = (self._by_path[leaf[:depth]] for depth in range(1, len(leaf) + 1))
        return tuple((h.amount(what), -h.messages[0].seq) for h in held)

    def _evict(self, message: _EarlyMessage) -> None:
        """Drop a waiting message (its room already released) to make room: its sender is
        refused as for lack of room."""
        _log.info(
            "peer %s: dropping %d bytes from %s that waited for round %s, to make room for a "
            "sender holding less of the room",
            self.peer_id[:12],
            message.nbytes,
            message.sender[:12],
            message.round_id.hex()[:12],
        )
        message.evicted = True
        message.wake.set()

    def _hold(self, message: _EarlyMessage, *, again: bool = False) -> None:
        """Count ``message`` in the waiting room (``again``: back in its old place, after a
        plan to make room that fell through)."""
        message.held = True
        if not again:
            message.seq = next(self._seq)
        self._opened.setdefault(message.round_id, []).append(message)
        self._by_sender.setdefault(message.sender, _Holding()).add(message)
        for depth in range(1, len(message.path) + 1):
            self._by_path.setdefault(message.path[:depth], _Holding()).add(message)
        self._waiting_bytes += message.nbytes
        self._num_waiting += 1

    def _release(self, message: _EarlyMessage) -> None:
        """Give back the room ``message`` held (once). The last message of a round takes the
        round's entry with it: entries left by messages that timed out or whose senders gave
        up would fill the table until every early message is refused."""
        if not message.held:
            return
        message.held = False
        self._waiting_bytes -= message.nbytes
        self._num_waiting -= 1
        if self._by_sender[message.sender].remove(message):
            del self._by_sender[message.sender]
        for depth in range(1, len(message.path) + 1):
            if self._by_path[message.path[:depth]].remove(message):
                del self._by_path[message.path[:depth]]
        waiting = self._opened.get(message.round_id)
        if waiting is not None and message in waiting:
            waiting.remove(message)
            if not waiting:
                del self._opened[message.round_id]

    def _wake(self, round_id: bytes) -> None:
        """Wake the messages waiting for ``round_id`` (it opened, ended, or its key was
        settled): they wait no more, and their room is given back now (none of them is then
        dropped to make room in the moment before it is handled)."""
        for message in self._opened.pop(round_id, ()):
            self._release(message)
            message.wake.set()
