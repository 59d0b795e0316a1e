"""The bounded room where a mailbox keeps messages for rounds that have not opened here yet.

A fast peer may start a round first: its messages of that round arrive before the round
opens on this peer, and wait (a bounded time, see :class:`~gossamer.comm.transport.CommMailbox`)
in an :class:`EarlyRoom` until it opens. The room holds at most so many distinct rounds,
messages and bytes at once, and one sender may hold at most a share of each (an eighth of the
rounds and messages, a quarter of the bytes).

When the room is full, the network (an IPv6 /48; an IPv4 address) whose senders hold the most
of what is short (rounds, messages or bytes) gives way to a message from a network that holds
less: the oldest messages of its heaviest host's heaviest sender are dropped (refused to their
senders as for lack of room). Where no other network holds more, the same rule runs among the
hosts (an IPv6 /64; an IPv4 address) of the newcomer's network, and then among the senders of
its host (see :meth:`EarlyRoom._make_room`). Else the message is refused for lack of room
(:func:`refused_for_room`), which its sender retries until its deadline rather than taking this
peer for failed. A few identities (eight, or four by bytes) filled the room for the
early-arrival timeout and again after it, and every member's early message was refused: its
sender dropped this healthy peer from the round. Identities are free in an open swarm, and as
many as the room has places, each holding one message and sending again as fast as it was
dropped, had a member's young message dropped among them; made up on one host they now give
way to the members of other hosts. Hosts cap nothing: the senders of one address (behind a
NAT, or every sender where a proxy rewrites source addresses) fare among themselves as if
counted by identity alone.
"""

from __future__ import annotations

import asyncio
import bisect
import ipaddress
import itertools
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from gossamer.core.errors import PeerUnavailableError, ProtocolError

__all__ = [
    "NO_ROOM",
    "EarlyMessage",
    "EarlyRoom",
    "Holding",
    "RoomPath",
    "path_of",
    "refused_for_room",
    "sender_host",
]

_log = logging.getLogger(__name__)
_SHARES = 8
"""One sender may hold at most this fraction of the rounds and messages waiting for unopened
rounds."""
_BYTE_SHARES = 4
"""... and this fraction of their bytes (a quarter of 1 GiB: three messages of the largest
chunk, as many as a member keeps in flight to one peer)."""
_NETWORK_PREFIX = 48
"""IPv6 senders are ranked in the full room by this prefix before their /64 (see
:meth:`EarlyRoom._make_room`): a machine with a routed /56 or /48 sends from many /64s."""
NO_ROOM = "no room here for messages waiting for unopened rounds; try again"
"""What a refusal for lack of room says (see :func:`refused_for_room`): the receiver is alive,
and its waiting room is held by senders that hold more of it than the refused one."""


def refused_for_room(exc: BaseException) -> bool:
    """Whether ``exc`` is a receiver's refusal of an early message for lack of room (or its
    eviction to make room for a sender that held less): no failure of the receiver's, and the
    sender tries again until its deadline. It travels as a retryable error whose text the
    sender reads, the only thing of a handler's error that reaches a sender over gRPC."""
    return isinstance(exc, PeerUnavailableError) and NO_ROOM in str(exc)


def sender_host(address: str) -> str:
    """What a sender at ``address`` (the IP address its connection came from) is ranked by in
    a receiver's full early-message room (see :meth:`EarlyRoom._make_room`): an IPv4 address
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


RoomPath = tuple[str, str, str]
"""Where a waiting message is counted in the room, coarsest first: its sender's network (an
IPv6 /48; an IPv4 address), host (an IPv6 /64; an IPv4 address) and identity."""


def path_of(sender: str, host: str | None) -> RoomPath:
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
class EarlyMessage:
    """A message waiting here for its round to open (see
    :meth:`~gossamer.comm.transport.CommMailbox.deliver`)."""

    sender: str
    path: RoomPath
    """Where it is counted (see :meth:`EarlyRoom._make_room`)."""
    round_id: bytes
    nbytes: int
    seq: int = 0
    """Its place in the order messages began to wait (earlier: smaller)."""
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when its round opens (or ends, or its key is settled), or it is evicted."""
    evicted: bool = False
    """Dropped to make room for a sender that held less (see :meth:`EarlyRoom._make_room`)."""
    held: bool = False
    """Counted in the waiting room's tables."""


@dataclass(slots=True)
class Holding:
    """What one sender, host or network holds of the waiting room."""

    messages: list[EarlyMessage] = field(default_factory=list)
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

    def add(self, message: EarlyMessage) -> None:
        """Count ``message`` here (in its place by age: one given back after a plan to make
        room fell through goes back where it was)."""
        bisect.insort(self.messages, message, key=_age_order)
        self.rounds[message.round_id] += 1
        self.nbytes += message.nbytes

    def remove(self, message: EarlyMessage) -> bool:
        """Stop counting ``message`` here; whether nothing is left."""
        self.messages.remove(message)
        self.rounds[message.round_id] -= 1
        if self.rounds[message.round_id] <= 0:
            del self.rounds[message.round_id]
        self.nbytes -= message.nbytes
        return not self.messages


def _age_order(message: EarlyMessage) -> int:
    return message.seq


class EarlyRoom:
    """The messages waiting for rounds not opened here yet, within fixed bounds.

    Args:
        max_rounds: distinct unopened rounds messages may wait for at once.
        max_messages: messages that may wait at once (each holds its payload while it waits).
        max_bytes: bytes those messages may hold at once.
        peer_id: the local peer id (for log lines).
    """

    def __init__(
        self, *, max_rounds: int, max_messages: int, max_bytes: int, peer_id: Callable[[], str]
    ) -> None:
        self._max_rounds = max_rounds
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._peer_id = peer_id
        self._nbytes = 0
        """Bytes of the messages waiting for unopened rounds."""
        self._num_messages = 0
        """Messages waiting for unopened rounds."""
        self._by_round: dict[bytes, list[EarlyMessage]] = {}
        """Rounds that messages wait for (to open here), with those messages: the last to stop
        waiting takes the entry."""
        self._by_sender: dict[str, Holding] = {}
        """What the messages waiting for unopened rounds hold, by sender: one sender (a peer
        in no group of this one's, say) may hold only a share of the room, not all of it."""
        self._by_path: dict[tuple[str, ...], Holding] = {}
        """... and by network, by host within it and by sender within that (each prefix of
        their paths, see :func:`path_of`): who gives way in a full room."""
        self._seq = itertools.count()

    @property
    def num_rounds(self) -> int:
        """Distinct rounds messages wait for."""
        return len(self._by_round)

    @property
    def num_messages(self) -> int:
        """Messages waiting."""
        return self._num_messages

    @property
    def nbytes(self) -> int:
        """Bytes of the messages waiting."""
        return self._nbytes

    @property
    def max_bytes(self) -> int:
        """The most bytes messages may hold here at once."""
        return self._max_bytes

    def waiting(self) -> list[EarlyMessage]:
        """The messages waiting, by round."""
        return [m for messages in self._by_round.values() for m in messages]

    def holdings_by_sender(self) -> dict[str, Holding]:
        """What each sender holds of the room now."""
        return dict(self._by_sender)

    def holdings_by_path(self) -> dict[tuple[str, ...], Holding]:
        """What each network, host and sender holds of the room now, keyed by each prefix of
        their :data:`RoomPath`."""
        return dict(self._by_path)

    def round_ids(self) -> list[bytes]:
        """The rounds messages wait for."""
        return list(self._by_round)

    def share(self, what: str) -> int:
        """The most of ``what`` (rounds, messages or bytes) one sender may hold."""
        if what == "bytes":
            return self._max_bytes // _BYTE_SHARES
        if what == "rounds":
            return max(1, self._max_rounds // _SHARES)
        return max(1, self._max_messages // _SHARES)

    def admit(self, path: RoomPath, round_id: bytes, nbytes: int) -> EarlyMessage:
        """Count a message of ``round_id`` (``nbytes``, from the sender at ``path``) in the
        room, making room for it if needed (see :meth:`_make_room`); it waits until
        :meth:`wake_round` or :meth:`release`.

        Raises:
            ProtocolError: the sender holds its share of the room already.
            PeerUnavailableError: no room (see :func:`refused_for_room`): the sender tries
                again.
        """
        sender = path[-1]
        mine = self._by_sender.get(sender, Holding())
        # One sender may hold a share of each table, not all of it: else its messages alone
        # (1,024 words for one round id, or 8 of the largest) refused everyone else's.
        num_rounds, num_messages = mine.amount("rounds"), mine.amount("messages")
        if round_id not in mine.rounds and num_rounds >= self.share("rounds"):
            raise ProtocolError(
                f"messages from this peer wait for {num_rounds} rounds this peer has not opened, "
                "its share of them"
            )
        if num_messages >= self.share("messages"):
            raise ProtocolError(
                f"{num_messages} messages from this peer wait for rounds this peer has "
                "not opened, its share of them"
            )
        if mine.nbytes + nbytes > self.share("bytes"):
            raise ProtocolError(
                "this peer's messages waiting for rounds this peer has not opened would pass "
                f"its share of their bytes ({self.share('bytes')})"
            )
        lacking = self._make_room(path, round_id, nbytes)
        if lacking is not None:
            raise PeerUnavailableError(
                f"{NO_ROOM} (too many {lacking} wait for rounds this peer has not opened, and "
                "no network, host or sender holds more of them than this one's)"
            )
        message = EarlyMessage(sender, path, round_id, nbytes)
        self._hold(message)
        return message

    def release(self, message: EarlyMessage) -> None:
        """Give back the room ``message`` held (once). The last message of a round takes the
        round's entry with it: entries left by messages that timed out or whose senders gave
        up would fill the table until every early message is refused."""
        if not message.held:
            return
        message.held = False
        self._nbytes -= message.nbytes
        self._num_messages -= 1
        if self._by_sender[message.sender].remove(message):
            del self._by_sender[message.sender]
        for depth in range(1, len(message.path) + 1):
            if self._by_path[message.path[:depth]].remove(message):
                del self._by_path[message.path[:depth]]
        waiting = self._by_round.get(message.round_id)
        if waiting is not None and message in waiting:
            waiting.remove(message)
            if not waiting:
                del self._by_round[message.round_id]

    def wake_round(self, round_id: bytes) -> None:
        """Wake the messages waiting for ``round_id`` (it opened, ended, or its key was
        settled): they wait no more, and their room is given back now (none of them is then
        dropped to make room in the moment before it is handled)."""
        for message in self._by_round.pop(round_id, ()):
            self.release(message)
            message.wake.set()

    def _short_of(self, round_id: bytes, nbytes: int) -> str | None:
        """What the waiting room lacks for one more message of ``round_id`` (``nbytes``):
        ``rounds``, ``messages`` or ``bytes``; None if it fits."""
        if self._nbytes + nbytes > self._max_bytes:
            return "bytes"
        if self._num_messages >= self._max_messages:
            return "messages"
        if round_id not in self._by_round and len(self._by_round) >= self._max_rounds:
            return "rounds"
        return None

    def _make_room(self, path: RoomPath, round_id: bytes, nbytes: int) -> str | None:
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
        dropping: list[EarlyMessage] = []
        while (short := self._short_of(round_id, nbytes)) is not None:
            freeing = self._to_give(path, short)
            if not freeing:
                for message in dropping:  # (the room is as it was: nobody loses a message)
                    self._hold(message, again=True)
                return short
            for message in freeing:
                self.release(message)
            dropping += freeing
        for message in dropping:
            self._evict(message)
        return None

    def _to_give(self, path: RoomPath, what: str) -> list[EarlyMessage]:
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
                waiting = self._by_round[message.round_id]
                if all(other.path in can_give for other in waiting):
                    return list(waiting)
        return []

    def _gives(self, leaf: tuple[str, ...], path: RoomPath, what: str) -> bool:
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

    def _evict(self, message: EarlyMessage) -> None:
        """Drop a waiting message (its room already released) to make room: its sender is
        refused as for lack of room."""
        _log.info(
            "peer %s: dropping %d bytes from %s that waited for round %s, to make room for a "
            "sender holding less of the room",
            self._peer_id()[:12],
            message.nbytes,
            message.sender[:12],
            message.round_id.hex()[:12],
        )
        message.evicted = True
        message.wake.set()

    def _hold(self, message: EarlyMessage, *, again: bool = False) -> None:
        """Count ``message`` in the waiting room (``again``: back in its old place, after a
        plan to make room that fell through)."""
        message.held = True
        if not again:
            message.seq = next(self._seq)
        self._by_round.setdefault(message.round_id, []).append(message)
        self._by_sender.setdefault(message.sender, Holding()).add(message)
        for depth in range(1, len(message.path) + 1):
            self._by_path.setdefault(message.path[:depth], Holding()).add(message)
        self._nbytes += message.nbytes
        self._num_messages += 1
