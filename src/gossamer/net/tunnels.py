"""Using relays: reservations for a peer nobody can dial, tunnels for the peers that dial it.

Both ends of a relayed connection are ordinary TCP sockets on loopback carried over a relay's
byte tunnel:

* the dialer's gRPC channel connects to a local *entrance* (127.0.0.1, a port picked by the OS);
  each connection accepted there opens ``Relay.Connect`` towards the target through a relay;
* the relayed peer, told about the tunnel on its reservation stream, opens ``Relay.Accept`` and a
  TCP connection to its own server, and carries bytes between the two.

TLS and the handshake run end to end inside the tunnel, so the relayed connection is exactly as
authenticated as a direct one and the rest of the node uses it through the same API.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import random
import weakref
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc

from gossamer.core.clock import Clock
from gossamer.core.errors import GossamerError, PeerUnavailableError, ProtocolError
from gossamer.net.config import NodeConfig
from gossamer.net.connections import (
    ConnectionPool,
    DialTarget,
    PeerConnection,
    ended_under_call,
)
from gossamer.net.counters import NetCounters
from gossamer.net.directory import PeerDirectory
from gossamer.net.grpc_errors import answered_by_handler, error_of_rpc_error
from gossamer.net.identity import digest_of_peer_id, short_peer_id
from gossamer.net.relay import (
    ACCEPT_METHOD,
    CONNECT_METHOD,
    MAX_PENDING_PER_PEER,
    MAX_TUNNELS_PER_TARGET,
    RESERVE_METHOD,
    TUNNEL_ID_CHARS,
    RelayServicer,
)
from gossamer.proto import net_pb2

__all__ = [
    "BUSY_RELAY_SILENT_S",
    "FRAME_BYTES",
    "MAX_ACCEPTED_DIRECT_TUNNELS",
    "MAX_ACCEPTED_TUNNELS",
    "MAX_ACCEPTED_TUNNELS_PER_DIRECT_RESERVATION",
    "MAX_ACCEPTED_TUNNELS_PER_RESERVATION",
    "MAX_IDLE_ENTRANCES",
    "PRESSED_WRITE_S",
    "READ_AHEAD_BUDGET_BYTES",
    "READ_AHEAD_BYTES",
    "REVERSED_ADDRESS",
    "STALLED_TUNNEL_S",
    "STUCK_TUNNEL_S",
    "AcceptedTunnels",
    "OwnedTasks",
    "ReadAheadBudget",
    "RelayDialer",
    "RelayReservations",
    "RelayTraffic",
    "accept_tunnel",
    "announcement_fault",
    "carry_socket_over_call",
    "note_failure",
    "printable_reason",
]

_log = logging.getLogger(__name__)
REVERSED_ADDRESS = "reversed over its own connection"
"""The address of a dial target through a direct reservation (no address of its own)."""
FRAME_BYTES = 256 * 1024
"""Largest tunnel frame: one read from the local socket."""
_LOCAL_CONNECT_TIMEOUT_S = 5.0
MAX_IDLE_ENTRANCES = 64
"""Entrances with no tunnel open kept listening (the most recently dialled): one per relayed
peer ever dialled would hold a listening socket each for the node's life."""
_RETRY_RELAY_AFTER_S = 10.0
MAX_ACCEPTED_TUNNELS_PER_RESERVATION = MAX_TUNNELS_PER_TARGET + MAX_PENDING_PER_PEER
"""Tunnels a node carries at once from one reservation: an honest relay announces no more (its
own caps). Each takes two sockets, so a relay that announced tunnels without end took all of
the node's file descriptors."""
MAX_ACCEPTED_TUNNELS = 256
"""Tunnels a node carries at once over all its relay reservations."""
MAX_ACCEPTED_TUNNELS_PER_DIRECT_RESERVATION = 4
"""Tunnels a node carries at once from one direct reservation. An honest holder dials back
through it for one connection: its pool keeps one per peer, and a channel that reconnects (an
idle connection's GOAWAY, a lost keepalive) or a dial retried opens another while the last
one's tunnel winds down. It had a relay's 96: three throwaway identities claiming to be
reachable took all of a node's places, and nobody reached it through its relays."""
MAX_ACCEPTED_DIRECT_TUNNELS = 64
"""Tunnels a node carries at once over all its direct reservations, apart from its relay
reservations' :data:`MAX_ACCEPTED_TUNNELS`: one for each of the (at most) 64 peers it holds one
with, honestly. Holders that take them all cost the node its direct ways back, not its relays."""
_MAX_REASON_CHARS = 240
"""Characters of a relay's refusal kept for the dialer's error and log (the rest is cut)."""
_FAILED_RELAY_LAST_FOR_S = 60.0
"""How long a relay that refused a tunnel, could not be reached or hung is dialled after the
target's other relays."""
_PING_METHOD = "/gossamer.net.v1.Dht/Ping"
_NO_ANSWER = frozenset(
    {
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)
"""Statuses of a heartbeat that say nothing came back from the relay (others are answers)."""
PRESSED_WRITE_S = 0.1
"""A tunnel call that held a frame back this long before taking it is sending on a link it
fills (a write to a relay that has room takes microseconds)."""
BUSY_RELAY_SILENT_S = 60.0
"""Longest a relay whose tunnels still take this node's bytes on a thin link may send nothing
back before it is given up (see :class:`RelayTraffic`); gRPC's own ping deadline is 60 s."""
READ_AHEAD_BYTES = 1024 * 1024
"""Most bytes of its local connection one tunnel reads ahead of its call (see
:func:`carry_socket_over_call`): four frames, so the socket is read again each time the call
takes one."""
READ_AHEAD_BUDGET_BYTES = 64 * 1024 * 1024
"""Most bytes a node's tunnels read ahead of their calls all together (:class:`ReadAheadBudget`),
past one frame each: 8 MiB a tunnel, unshared, held 256 MiB for 32 tunnels whose far side had
stopped taking bytes."""
STALLED_TUNNEL_S = 60.0
"""How long a tunnel may wait on its call with nothing moving, before it is ended: a frame it
offered still untaken, or, once the local connection ended, the call not yet ended (the far
side then ends it once it has the close), and meanwhile neither a frame taken or brought by this
call nor anything from or through its relay (:class:`RelayTraffic`). The relay connection's
``TCP_USER_TIMEOUT`` (60 s) likewise ends a connection that moved nothing that long. Not one
frame's wait: on a thin link that is 8-23 s and more behind other data (a 30 s rule on it
ended healthy tunnels that were receiving steadily). A far side that took nothing (a dialer
that stopped reading) held the tunnel, and its place among the node's, for good: the local
connection's end, behind data the read-ahead had no room for, was never seen."""
STUCK_TUNNEL_S = 300.0
"""Longest a tunnel's offered frame may wait untaken (or its call go on after the close was
taken) even while other tunnels keep its relay connection moving: a far side that stopped
reading is ended in bounded time however busy the relay is."""

OpenCall = Callable[[AsyncIterator[net_pb2.TunnelFrame]], Any]
"""Starts a bidirectional tunnel call with the given request frames; returns the call."""


async def carry_socket_over_call(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    open_call: OpenCall,
    first: net_pb2.TunnelFrame,
    failed: Callable[[grpc.aio.AioRpcError], Awaitable[GossamerError]] | None = None,
    refused: Callable[[grpc.aio.AioRpcError], None] | None = None,
    heard: Callable[[], None] | None = None,
    sent: Callable[[], None] | None = None,
    read_ahead: ReadAheadBudget | None = None,
    moved: Callable[[], object] | None = None,
    peer_id: str = "",
) -> None:
    """Carry a local TCP connection's bytes over a tunnel call until either side ends, or
    until the call stalls: nothing moved for :data:`STALLED_TUNNEL_S` while it waited on the
    call (a frame offered untaken, or the call's end once the local connection ended), or this
    call took nothing for :data:`STUCK_TUNNEL_S` meanwhile.

    The local connection is read ahead of the call, up to :data:`READ_AHEAD_BYTES` within the
    node's :class:`ReadAheadBudget`: its other end is gRPC's socket, whose ``TCP_USER_TIMEOUT``
    ends the connection once the reader has left its window shut that long. With a 5 s timeout
    (``keepalive_timeout_s``, before ``unacked_data_timeout_s``), read a frame at a time as the
    call took them, a 256 KiB frame waited 4 s and more behind a 500 kbit/s link's data, and a
    relayed connection with bulk data both ways was lost to it (``recvmsg:Connection timed
    out``) within 15 s.

    Args:
        reader: the local connection's read side.
        writer: the local connection's write side (closed on return).
        open_call: starts the tunnel call with an iterator of outgoing frames.
        first: the frame that names the tunnel (target peer or tunnel id).
        failed: maps the call's error (the pool's, which drops a broken connection).
        refused: told of a call that failed before the far side sent anything (the relay
            refused the tunnel), before the local connection is closed: all its owner sees
            of it is the socket closing.
        heard: told of every frame the call brings (the relay that carries it is alive).
        sent: told when the call took a frame after holding the last one back for
            :data:`PRESSED_WRITE_S` or more (a thin link's data is leaving: see
            :class:`RelayTraffic`).
        read_ahead: the budget read-ahead is held in (the running loop's node-wide one).
        moved: a mark of the call's connection's traffic, which changes whenever something
            comes from it or leaves through it (:meth:`RelayTraffic.moved`): while it changes,
            the tunnel's wait is not a stall. None: only this call's own frames count.
        peer_id: the peer the call goes to (the relay), for errors.

    Raises:
        GossamerError: the tunnel call failed (mapped from gRPC's error), or its connection
            was closed under it.
        OSError: the local connection broke (the call is cancelled).
    """

    call: Any = None
    carrying = True
    answered = False
    loop = asyncio.get_running_loop()
    # Ends the call once it stalled (see above), by :func:`check` (at most once: set to expire
    # now, never rescheduled after).
    stalled: asyncio.Timeout | None = None
    waiting = False
    """A frame is offered and not yet taken."""
    own_at = loop.time()
    """When this call last took or brought a frame."""
    moved_at = own_at
    """When anything was last seen moving: this call's frames, or its connection's traffic."""
    mark = moved() if moved is not None else None
    check_handle: asyncio.TimerHandle | None = None

    def check() -> None:
        nonlocal check_handle, mark, moved_at
        check_handle = None
        if not carrying or stalled is None or stalled.expired():
            return
        now = loop.time()
        if moved is not None and (new_mark := moved()) != mark:
            mark, moved_at = new_mark, now
        if not waiting and not ahead.ended:
            return  # (idle: nothing waits on the call; armed again by the next frame offered)
        if now - moved_at >= STALLED_TUNNEL_S or now - own_at >= STUCK_TUNNEL_S:
            stalled.reschedule(now)
            return
        # (sampled a few times a window: a stall is seen within 1.25 windows of the last move)
        check_handle = loop.call_at(
            min(moved_at + STALLED_TUNNEL_S, own_at + STUCK_TUNNEL_S, now + STALLED_TUNNEL_S / 4),
            check,
        )

    def watch() -> None:
        """Something waits on the call: watch it, from now if nothing did."""
        nonlocal own_at, moved_at, mark
        if check_handle is None and carrying:
            now = loop.time()
            own_at, moved_at = max(own_at, now), max(moved_at, now)
            mark = moved() if moved is not None else None
            check()

    def offered() -> None:
        nonlocal waiting
        waiting = True
        watch()

    def progressed() -> None:
        nonlocal own_at, moved_at
        own_at = moved_at = loop.time()

    def taken() -> None:
        nonlocal waiting
        waiting = False
        progressed()

    ahead = _ReadAhead(reader, read_ahead or ReadAheadBudget.of_running_loop(), on_end=watch)
    try:
        async with asyncio.timeout(None) as stalled:
            # (at once: gRPC asks for the next frame only once the first is sent, seconds on a
            # thin link)
            ahead.start()

            async def frames() -> AsyncIterator[net_pb2.TunnelFrame]:
                offered()
                yield first
                taken()
                while data := await ahead.get():
                    offered_at = loop.time()
                    offered()
                    yield net_pb2.TunnelFrame(data=data)
                    taken()
                    if sent is not None and loop.time() - offered_at >= PRESSED_WRITE_S:
                        sent()
                offered()
                yield net_pb2.TunnelFrame(close=True)
                taken()

            try:
                try:
                    call = open_call(frames())
                except grpc.aio.UsageError as exc:  # the connection closed since looked up
                    raise PeerUnavailableError(
                        f"the tunnel's connection is closed ({exc})"
                    ) from exc
                try:
                    async for frame in call:
                        answered = True
                        progressed()
                        if heard is not None:
                            heard()
                        if frame.data:
                            writer.write(frame.data)
                            await writer.drain()
                        if frame.close:
                            break
                except asyncio.CancelledError:
                    # gRPC cancels a call whose request iterator raised (the local reset), and
                    # one whose connection was closed under it: not a cancellation of this
                    # task, which must go on
                    if _cancelling():
                        raise
                    if ahead.error is not None:
                        raise ahead.error from None
                    closed = ended_under_call(peer_id) if peer_id else None
                    raise closed or PeerUnavailableError(
                        "the tunnel's call ended: its connection was closed under it"
                    ) from None
            finally:
                carrying = False
                if check_handle is not None:
                    check_handle.cancel()
    except TimeoutError:
        if stalled is None or not stalled.expired():
            raise
        _log.info(
            "ended a tunnel whose call took no frame for %.0f s (nothing moved on its connection "
            "for %.0f s; its local connection %s)",
            loop.time() - own_at,
            loop.time() - moved_at,
            "ended" if ahead.ended else "waiting",
        )
    except grpc.aio.AioRpcError as exc:
        if refused is not None and not answered:
            refused(exc)
        raise (
            await failed(exc) if failed is not None else error_of_rpc_error(exc, "relay", "tunnel")
        ) from exc
    finally:
        carrying = False
        if check_handle is not None:
            check_handle.cancel()
        if call is not None:
            call.cancel()
        await ahead.close()
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(1.0):
                await writer.wait_closed()


class ReadAheadBudget:
    """The bytes a node's tunnels hold read ahead of their calls, all together: at most
    ``max_bytes``, past one frame each (a tunnel always reads a frame into an empty read-ahead,
    so none waits on the others).

    One per event loop (:meth:`of_running_loop`): a node's, shared by the nodes of one loop
    (tests). Nothing of the loop is kept in it, so it outlives none.
    """

    _of_loop: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ReadAheadBudget]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = READ_AHEAD_BUDGET_BYTES if max_bytes is None else max_bytes
        self.num_bytes = 0
        """Bytes held now."""
        self._waiters: set[asyncio.Future[None]] = set()

    @classmethod
    def of_running_loop(cls) -> ReadAheadBudget:
        """The budget of the running loop's node(s) (made on first use)."""
        loop = asyncio.get_running_loop()
        budget = cls._of_loop.get(loop)
        if budget is None:
            budget = cls._of_loop[loop] = cls()
        return budget

    def has_room(self, num_bytes: int) -> bool:
        """Whether ``num_bytes`` more fit."""
        return self.num_bytes + num_bytes <= self.max_bytes

    def take(self, num_bytes: int) -> None:
        """``num_bytes`` more are held."""
        self.num_bytes += num_bytes

    def give_back(self, num_bytes: int) -> None:
        """``num_bytes`` are no longer held: wake every read-ahead waiting for room."""
        self.num_bytes -= num_bytes
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def freed(self) -> None:
        """Return once bytes were given back (by any tunnel)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await waiter
        finally:
            self._waiters.discard(waiter)


class _ReadAhead:
    """Reads a local connection into a bounded queue in a task of its own, so that the
    connection's window stays open while the tunnel call waits on a slow link (see
    :func:`carry_socket_over_call`). :meth:`get` hands out what was read, in frames of at
    most :data:`FRAME_BYTES`; b"" once the connection ended (its error raised, if it broke).

    It holds at most ``max_bytes`` (:data:`READ_AHEAD_BYTES`), and more than one frame only
    while ``budget`` has room.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        budget: ReadAheadBudget,
        max_bytes: int | None = None,
        on_end: Callable[[], None] | None = None,
    ) -> None:
        self._reader = reader
        self._budget = budget
        self._max_bytes = READ_AHEAD_BYTES if max_bytes is None else max_bytes
        self._on_end = on_end
        self._frames: deque[bytes] = deque()
        self._num_bytes = 0
        self._readable = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.ended = False
        """The connection ended (EOF or an error): nothing more is read."""
        self.error: BaseException | None = None
        """What the connection broke with."""

    def _may_read(self) -> bool:
        if not self._frames:
            return True
        return self._num_bytes + FRAME_BYTES <= self._max_bytes and self._budget.has_room(
            FRAME_BYTES
        )

    async def _pump(self) -> None:
        try:
            while True:
                while not self._may_read():
                    await self._budget.freed()  # (this tunnel's own get gives back too)
                data = await self._reader.read(FRAME_BYTES)
                if not data:
                    return
                self._frames.append(data)
                self._num_bytes += len(data)
                self._budget.take(len(data))
                self._readable.set()
        except Exception as exc:  # (a reset local socket: raised to the call's reader)
            self.error = exc
        finally:
            self.ended = True
            self._readable.set()
            if self._on_end is not None:
                self._on_end()

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._pump())

    async def get(self) -> bytes:
        while not self._frames and not self.ended:
            self._readable.clear()
            await self._readable.wait()
        if self._frames:
            data = self._frames.popleft()
            self._num_bytes -= len(data)
            self._budget.give_back(len(data))
            return data
        if self.error is not None:
            raise self.error
        return b""

    async def close(self) -> None:
        """Stop reading and give back what is held (its reader is gone)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._frames.clear()
        self._budget.give_back(self._num_bytes)
        self._num_bytes = 0


class RelayTraffic:
    """What came from each relay over one node's connections, and when: a frame on any call
    through it (a reservation's event, a tunnel's bytes, dialled or accepted), and when its
    tunnels last took this node's bytes on a thin link. The node's relay dialer and
    reservations share it (one per connection pool), and both watch a relay by it as well as
    by heartbeats: on a thin link a heartbeat's answer waits behind the tunnels' data.

    A relay is silent once nothing came from it for ``keepalive_interval_s +
    keepalive_timeout_s`` (15 s): a hung one sends nothing, so this is as soon as with
    heartbeats alone. While its tunnels still take this node's bytes on a thin link (a frame
    held back :data:`PRESSED_WRITE_S` or more and then taken, within that window), it may be
    quiet up to :data:`BUSY_RELAY_SILENT_S`: a heartbeat's request then waits behind this
    node's own data (a tunnel that only sends brings back nothing for long: HTTP/2 returns
    window as half of it is used). A hung relay's kernel takes bytes for a while yet, at most
    the flow-control window gRPC still grants and its socket buffers, so that bound holds.
    """

    _MAX_RELAYS = 1024
    _of_pool: ClassVar[weakref.WeakKeyDictionary[ConnectionPool, RelayTraffic]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._heard_at: dict[str, float] = {}
        self._sent_at: dict[str, float] = {}
        self._given_up_at: dict[str, float] = {}

    @classmethod
    def of(cls, pool: ConnectionPool) -> RelayTraffic:
        """The record of ``pool``'s node (made on first use)."""
        traffic = cls._of_pool.get(pool)
        if traffic is None:
            traffic = cls._of_pool[pool] = cls(pool.clock)
        return traffic

    def _note(self, times: dict[str, float], relay_id: str) -> None:
        if len(times) >= self._MAX_RELAYS and relay_id not in times:
            del times[min(times, key=times.__getitem__)]
        times[relay_id] = self._clock.monotonic()

    def heard(self, relay_id: str) -> None:
        """Something came from ``relay_id`` just now."""
        self._note(self._heard_at, relay_id)

    def sent(self, relay_id: str) -> None:
        """A tunnel through ``relay_id`` took a frame it had held back (a thin link)."""
        self._note(self._sent_at, relay_id)

    def moved(self, relay_id: str) -> tuple[float, float]:
        """A mark that changes whenever something comes from ``relay_id`` or a tunnel through
        it takes a held-back frame (see :func:`carry_socket_over_call`)."""
        return self.heard_at(relay_id), self._sent_at.get(relay_id, -math.inf)

    def gave_up(self, relay_id: str, keep_s: float) -> None:
        """``relay_id`` was given up for silence (by the dialer's watch): its reservation is
        not taken again at once either (:meth:`given_up_at`)."""
        note_failure(self._given_up_at, relay_id, self._clock.monotonic(), keep_s)

    def given_up_at(self, relay_id: str) -> float:
        """When ``relay_id`` was last given up for silence (-inf: not lately)."""
        return self._given_up_at.get(relay_id, -math.inf)

    def heard_at(self, relay_id: str) -> float:
        """When something last came from ``relay_id`` (-inf: never)."""
        return self._heard_at.get(relay_id, -math.inf)

    def _silent_from(self, relay_id: str, answered_at: float, silent_s: float) -> float:
        """When ``relay_id`` (its last heartbeat answer ``answered_at``) is silent (above)."""
        heard_at = max(answered_at, self.heard_at(relay_id))
        sent_at = self._sent_at.get(relay_id, -math.inf)
        return max(
            heard_at + silent_s,
            min(sent_at + silent_s, heard_at + max(silent_s, BUSY_RELAY_SILENT_S)),
        )

    def silent_for(self, relay_id: str, answered_at: float, silent_s: float) -> float | None:
        """How long nothing has come from ``relay_id`` (its last heartbeat answer
        ``answered_at``), if it is silent (see above); else None."""
        now = self._clock.monotonic()
        if now < self._silent_from(relay_id, answered_at, silent_s):
            return None
        return now - max(answered_at, self.heard_at(relay_id))

    def heartbeat_deadline_s(
        self, relay_id: str, answered_at: float, silent_s: float, at_least_s: float
    ) -> float:
        """The deadline of the next heartbeat to ``relay_id``: until it would be silent, so
        that a late answer still counts and silence is seen in time (``at_least_s`` if that
        is past)."""
        left_s = self._silent_from(relay_id, answered_at, silent_s) - self._clock.monotonic()
        return max(left_s, at_least_s)


class OwnedTasks:
    """Tasks this object started and must cancel and await on close."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coroutine: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coroutine)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def cancel_all(self) -> None:
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()


def note_failure(failed_at: dict[str, float], peer_id: str, now: float, keep_s: float) -> None:
    """Record that ``peer_id`` failed at ``now`` in ``failed_at``, forgetting failures older
    than ``keep_s`` (past their retry wait: kept, one per peer that ever failed piled up)."""
    for old in [p for p, at in failed_at.items() if now - at >= keep_s]:
        del failed_at[old]
    failed_at[peer_id] = now


def printable_reason(text: str, max_chars: int = _MAX_REASON_CHARS) -> str:
    """``text`` from the network made safe for an error or a log line: at most ``max_chars``
    characters of it (a note says how many were cut), and every character that is not
    printable (newlines, escapes, bidirectional overrides) written as its escape sequence."""
    cut = len(text) - max_chars
    text = text[:max_chars]
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    return f"{text}... ({cut} more characters)" if cut > 0 else text


@dataclass(slots=True)
class _Entrance:
    """A local listening socket whose connections are tunnelled to one target."""

    server: asyncio.Server
    relay_address: str
    """Where the relay is dialled when no connection to it is open: the address the target's
    record named for it at the latest dial (a relay restarted elsewhere is followed there)."""
    tunnels: int = 0
    """Connections accepted here whose tunnel is still open."""
    refusal: str | None = None
    """Why the latest tunnel from here was refused, since the latest dial opened it."""
    dials: int = 0
    """Dials through here so far: a tunnel accepted under an earlier dial (refused late, in its
    grace after that dial gave up) must not put its refusal on the latest dial's error."""


class RelayDialer:
    """Dial targets through relays: a local entrance per (target, relay) pair.

    Entrances with no tunnel open are closed beyond the :data:`MAX_IDLE_ENTRANCES` used last
    (a later dial opens a new one).

    A relay's refusal of a tunnel is what the dial through it fails with (gRPC sees only the
    entrance's socket close). A relay that tunnels go through is watched as the relayed peers
    watch theirs: one that answers no heartbeat for ``keepalive_interval_s +
    keepalive_timeout_s`` is given up with the connections through it, so that the next dial
    goes through another relay (only gRPC's ping deadline, 60 s, ended them before). A relay
    that failed a tunnel is dialled after the target's other relays for a while.

    Args:
        pool: the node's connections (the relay is dialed through it).
        directory: where the target's record (its relays and certificate) comes from.
        own_peer_id: this node's id.
        counters: relayed dials are counted here.
        local_relay: this node's relay service, for targets that hold a reservation here.
    """

    def __init__(
        self,
        pool: ConnectionPool,
        directory: PeerDirectory,
        own_peer_id: str,
        counters: NetCounters,
        local_relay: RelayServicer | None = None,
    ) -> None:
        self._local_relay = local_relay
        self._pool = pool
        self._directory = directory
        self._own_peer_id = own_peer_id
        self._counters = counters
        self._entrances: OrderedDict[tuple[str, str], _Entrance] = OrderedDict()
        """Open entrances, the least recently dialled first."""
        self._tasks = OwnedTasks()
        self._closed = False
        self._tunnels_via: Counter[str] = Counter()
        """Tunnels open through each relay (its connection dialled, this node not the relay)."""
        self._watches: dict[str, tuple[PeerConnection, asyncio.Task[Any]]] = {}
        """The heartbeat watch of each relay tunnels go through, and the connection it watches."""
        self._relay_failed_at: dict[str, float] = {}

    @functools.cached_property
    def _traffic(self) -> RelayTraffic:
        return RelayTraffic.of(self._pool)

    def direct_target(self, peer_id: str) -> DialTarget | None:
        """The way back to ``peer_id`` through its direct reservation here, if it holds one.

        The tunnel runs over the connection the peer opened to this node, so its bytes cross no
        third peer: a connection reversal, counted as ``direct``.
        """
        record = self._directory.get(peer_id)
        if self._local_relay is None or record is None or not self._local_relay.has_direct(peer_id):
            return None
        return DialTarget(
            REVERSED_ADDRESS,
            "direct",
            record.tls_cert_der,
            open_entrance=functools.partial(
                self._entrance, peer_id, self._own_peer_id, "", direct=True
            ),
            tunnel_refusal=functools.partial(self._refusal, (peer_id, "direct")),
        )

    def targets(self, peer_id: str) -> list[DialTarget]:
        """Ways to reach ``peer_id``: back over its direct reservation, then its relays."""
        record = self._directory.get(peer_id)
        if record is None:
            return []
        reversed_ = self.direct_target(peer_id)
        now = self._pool.clock.monotonic()
        relays = sorted(  # (those that failed lately last)
            record.relays,
            key=lambda hop: (
                now - self._relay_failed_at.get(hop[0], -1e9) < _FAILED_RELAY_LAST_FOR_S
            ),
        )
        return ([reversed_] if reversed_ else []) + [
            DialTarget(
                f"relay {short_peer_id(relay_id)} at {relay_address}",
                "relayed",
                record.tls_cert_der,
                open_entrance=functools.partial(self._entrance, peer_id, relay_id, relay_address),
                tunnel_refusal=functools.partial(self._refusal, (peer_id, relay_id)),
                via=relay_id,
            )
            for relay_id, relay_address in relays
            if relay_id != peer_id and (relay_id != self._own_peer_id or self._local_relay)
        ]

    async def _entrance(
        self, target: str, relay_id: str, relay_address: str, *, direct: bool = False
    ) -> str:
        if self._closed:
            raise PeerUnavailableError("the node is stopping")
        key = (target, "direct" if direct else relay_id)
        entrance = self._entrances.get(key)
        if entrance is None:
            server = await asyncio.start_server(
                functools.partial(self._serve, key, direct), "127.0.0.1", 0
            )
            if self._closed:  # (stopped while it started)
                server.close()
                raise PeerUnavailableError("the node is stopping")
            entrance = self._entrances[key] = _Entrance(server, relay_address)
            self._close_idle_entrances()
        entrance.relay_address = relay_address
        entrance.refusal = None  # (this dial's own refusal, not an earlier one's)
        entrance.dials += 1
        self._entrances.move_to_end(key)
        if not direct:
            self._counters.num_relayed_dials += 1
        return f"127.0.0.1:{entrance.server.sockets[0].getsockname()[1]}"

    def _close_idle_entrances(self) -> None:
        """Close the least recently dialled entrances with no tunnel open, beyond
        :data:`MAX_IDLE_ENTRANCES` of them."""
        idle = [key for key, entrance in self._entrances.items() if entrance.tunnels == 0]
        for key in idle[: max(0, len(idle) - MAX_IDLE_ENTRANCES)]:
            self._entrances.pop(key).server.close()

    def _refusal(self, key: tuple[str, str]) -> str | None:
        entrance = self._entrances.get(key)
        return entrance.refusal if entrance is not None else None

    @property
    def num_entrances(self) -> int:
        """Entrances listening now."""
        return len(self._entrances)

    async def _relay_connection(self, relay_id: str, relay_address: str) -> PeerConnection:
        """The connection to a relay: the one open, or a dial of the address the target's
        record names for it. Never resolved through relays: two records naming each other as
        relays made every dial go round between them, for good."""
        async with self._pool.dial_lock(relay_id):
            existing = self._pool.get(relay_id)
            if existing is not None:
                return existing
            return await self._pool.dial(DialTarget(relay_address), expected_peer_id=relay_id)

    def _serve(
        self,
        key: tuple[str, str],
        direct: bool,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        # A plain callback: the tunnel runs in a task this object owns (cancelled on close).
        target, relay_id = key[0], self._own_peer_id if direct else key[1]
        entrance = self._entrances.get(key)
        if entrance is None:  # closed after it accepted this connection
            writer.close()
            return
        entrance.tunnels += 1
        dial = entrance.dials

        async def tunnel() -> None:
            try:
                await self._tunnel(entrance, dial, target, relay_id, reader, writer, direct=direct)
            finally:
                entrance.tunnels -= 1

        self._tasks.spawn(tunnel(), f"tunnel-{target[:8]}")

    async def _tunnel(
        self,
        entrance: _Entrance,
        dial: int,
        target: str,
        relay_id: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        direct: bool = False,
    ) -> None:
        local = relay_id == self._own_peer_id and self._local_relay is not None
        to = short_peer_id(target)

        def refused(reason: str, what: str = "refused the tunnel to") -> None:
            # Kept for the dial through the entrance, before its socket closes (see DialTarget),
            # if that dial is still the latest.
            reason = printable_reason(reason)
            relay = "this node's relay" if local else f"relay {short_peer_id(relay_id)}"
            message = (
                f"the way back to {to} over its direct reservation here failed: {reason}; "
                f"dial {to} through its relays instead (the node does, if its record names any)"
                if direct
                else f"{relay} {what} {to}: {reason}. A dial tries each relay {to}'s record "
                f"names; if every one fails, {to} cannot be reached through relays now: check "
                "that it runs and holds relay reservations (its log says 'relayed through')"
            )
            if dial == entrance.dials:
                entrance.refusal = message
            if not local and not direct:
                note_failure(
                    self._relay_failed_at,
                    relay_id,
                    self._pool.clock.monotonic(),
                    _FAILED_RELAY_LAST_FOR_S,
                )

        try:
            if local:
                # This node is the target's relay, or holds its direct reservation: splice the
                # socket into the reservation here.
                assert self._local_relay is not None
                try:
                    await self._local_relay.carry_local(
                        self._own_peer_id, target, reader, writer, FRAME_BYTES, direct=direct
                    )
                except GossamerError as exc:  # (raised before it carries anything)
                    refused(str(exc))
                    raise
                return
            try:
                connection = await self._relay_connection(relay_id, entrance.relay_address)
            except GossamerError as exc:
                refused(str(exc), "could not be reached for a tunnel to")
                raise
            self._tunnels_via[relay_id] += 1
            try:
                self._watch(relay_id, connection)
                tunnel = connection.stream_stream(CONNECT_METHOD, net_pb2.TunnelFrame)

                def open_call(frames: AsyncIterator[net_pb2.TunnelFrame]) -> Any:
                    return tunnel(frames, metadata=connection.metadata)

                await carry_socket_over_call(
                    reader,
                    writer,
                    open_call,
                    net_pb2.TunnelFrame(target_peer_id=target),
                    failed=lambda exc: self._pool.failed(connection, exc, CONNECT_METHOD),
                    heard=functools.partial(self._traffic.heard, relay_id),
                    sent=functools.partial(self._traffic.sent, relay_id),
                    moved=functools.partial(self._traffic.moved, relay_id),
                    peer_id=relay_id,
                    refused=lambda exc: refused(
                        exc.details() or "",
                        "refused the tunnel to"
                        if answered_by_handler(exc)
                        else f"did not carry the tunnel ({exc.code().name}) to",
                    ),
                )
            finally:
                self._tunnels_via[relay_id] -= 1
                if self._tunnels_via[relay_id] <= 0:
                    del self._tunnels_via[relay_id]
        except GossamerError as exc:
            _log.info(
                "peer %s: tunnel to %s via %s ended: %s",
                short_peer_id(self._own_peer_id),
                short_peer_id(target),
                short_peer_id(relay_id),
                printable_reason(str(exc)),
            )
        except OSError as exc:  # (the local side reset the entrance's socket: a dropped connection)
            _log.info(
                "peer %s: tunnel to %s via %s ended: its local connection broke (%s)",
                short_peer_id(self._own_peer_id),
                short_peer_id(target),
                short_peer_id(relay_id),
                exc,
            )
        except Exception:
            _log.exception("tunnel to %s failed", short_peer_id(target))
        finally:  # (cancelled too, while it dialled the relay)
            writer.close()

    def _watch(self, relay_id: str, connection: PeerConnection) -> None:
        """Heartbeat ``relay_id`` over ``connection`` while tunnels go through it (one watch
        per relay)."""
        watched = self._watches.get(relay_id)
        if watched is not None and watched[0] is connection and not watched[1].done():
            return
        if watched is not None:
            watched[1].cancel()  # (it watched a connection the relay's tunnels left)
        task = self._tasks.spawn(
            self._watch_relay(relay_id, connection), f"relay-watch-{relay_id[:8]}"
        )
        self._watches[relay_id] = (connection, task)

        def done(_: asyncio.Task[Any]) -> None:
            if self._watches.get(relay_id, (None, None))[1] is task:
                del self._watches[relay_id]

        task.add_done_callback(done)

    async def _watch_relay(self, relay_id: str, connection: PeerConnection) -> None:
        """While tunnels go through ``relay_id`` on ``connection``, give it up once nothing
        has come from it for ``keepalive_interval_s + keepalive_timeout_s``: no answer to a
        heartbeat and no frame on any call through it (:class:`RelayTraffic`).

        One heartbeat is in flight at a time, with what is left of that window as its deadline
        (as the relayed peer's own watch, :meth:`RelayReservations._until_silent`). On a thin
        link its answer waits behind the tunnels' data: 8-23 s behind bulk data both
        ways at 500 kbit/s, so a watch of heartbeats alone gave up a healthy relay, and the
        connections through it, while their data flowed. A hung relay sends nothing at all, so
        it is given up as soon as before. Not gRPC's ping deadline either (see server.py).
        """
        config, clock = self._pool.config, self._pool.clock
        interval_s = config.heartbeat.interval_s
        silent_s = config.keepalive_interval_s + config.keepalive_timeout_s
        ping = connection.unary_unary(_PING_METHOD, net_pb2.PingResponse)
        answered_at = clock.monotonic()

        def silent_for() -> float | None:
            return self._traffic.silent_for(relay_id, answered_at, silent_s)

        while self._tunnels_via[relay_id] > 0 and self._pool.get(relay_id) is connection:
            try:
                await ping(
                    net_pb2.PingRequest(),
                    timeout=self._traffic.heartbeat_deadline_s(
                        relay_id, answered_at, silent_s, interval_s
                    ),
                    metadata=connection.metadata,
                )
                answered_at = clock.monotonic()
                self._traffic.heard(relay_id)
            except grpc.aio.AioRpcError as exc:
                if answered_by_handler(exc) or exc.code() not in _NO_ANSWER:
                    answered_at = clock.monotonic()  # (an answer all the same)
                    self._traffic.heard(relay_id)
                elif (silent_for_s := silent_for()) is not None:
                    await self._give_up(relay_id, connection, silent_for_s)
                    return
            except grpc.aio.UsageError:
                return  # (its connection was closed: tunnels on the next one watch that)
            except asyncio.CancelledError:
                if ended_under_call(relay_id) is None:
                    raise
                return  # (the same, closed under the heartbeat)
            await clock.sleep_async(interval_s)  # (pacing, not a wait on a condition)

    async def _give_up(
        self, relay_id: str, connection: PeerConnection, silent_for_s: float
    ) -> None:
        """Close the connection to a relay that stopped answering, and those through it (their
        peers' breakers reset): a dial after it goes through another relay (this one is tried
        last for a while)."""
        note_failure(
            self._relay_failed_at, relay_id, self._pool.clock.monotonic(), _FAILED_RELAY_LAST_FOR_S
        )
        # (shared with the reservations: one with this relay ends as the connection is dropped,
        # and must not take it again at once)
        self._traffic.gave_up(relay_id, max(_FAILED_RELAY_LAST_FOR_S, _RETRY_RELAY_AFTER_S))
        through = [
            (peer_id, relayed)
            for peer_id in self._pool.peer_ids
            if (relayed := self._pool.get(peer_id)) is not None
            and relayed.target.kind == "relayed"
            and relayed.target.via == relay_id
        ]
        _log.warning(
            "peer %s: relay %s answered no heartbeat and carried no tunnel byte for %.1f s; "
            "closing the connection to it and the %d through it (to %s): they are dialled "
            "again through other relays",
            short_peer_id(self._own_peer_id),
            short_peer_id(relay_id),
            silent_for_s,
            len(through),
            ", ".join(short_peer_id(peer_id) for peer_id, _ in through) or "none",
        )
        for peer_id, relayed in through:
            await self._pool.drop(peer_id, relayed)
            # (its calls' failures were the relay's: the next call tries another way at once,
            # not once the breaker they opened lets one through)
            self._pool.breakers.forget(peer_id)
        await self._pool.drop(relay_id, connection)

    async def close(self) -> None:
        """Close every entrance and the tunnels through them."""
        self._closed = True
        servers = [entrance.server for entrance in self._entrances.values()]
        self._entrances.clear()
        for server in servers:
            server.close()
        await self._tasks.cancel_all()
        for server in servers:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await server.wait_closed()


class _ClosedUnderReservationError(PeerUnavailableError):
    """A reservation's connection was closed under it (dropped by the pool: a redial that
    replaced it, a watch that gave the relay up): the relay is dialled again at once."""


class RelayReservations:
    """Keeps reservations with relays while this node cannot be reached, and accepts tunnels.

    Args:
        pool: the node's connections.
        directory: where relay candidates come from (peers that relay and are reachable).
        config: the node config (``relay.num_relays``, timeouts).
        clock: time source.
        own_peer_id: this node's id.
        local_address: HOST:PORT of this node's own server, where tunnels are delivered.
        needs_relay: whether this node should hold reservations now.
        on_change: called after the set of active relays changed (re-sign and publish).
        bootstrap_peers: peers dialed at start; tried too when their record is unknown (an
            observer that announces nothing gets no records back from a lone bootstrap peer).
        accepted: the node's count of tunnels it carries (shared with its direct reservations).
        heartbeat: one heartbeat to a peer with a deadline (the node's); with it, a relay that
            answers none for ``keepalive_interval_s + keepalive_timeout_s`` is given up (a
            hung relay kept the reservation, and this node named it, for over a minute).
    """

    def __init__(
        self,
        pool: ConnectionPool,
        directory: PeerDirectory,
        config: NodeConfig,
        clock: Clock,
        own_peer_id: str,
        local_address: Callable[[], str],
        needs_relay: Callable[[], bool],
        on_change: Callable[[], Awaitable[None]],
        bootstrap_peers: Callable[[], list[str]] = list,
        accepted: AcceptedTunnels | None = None,
        heartbeat: Callable[[str, float], Awaitable[None]] | None = None,
    ) -> None:
        self._heartbeat = heartbeat
        self._bootstrap_peers = bootstrap_peers
        self._accepted = accepted or AcceptedTunnels()
        self._pool = pool
        self._directory = directory
        self._config = config
        self._clock = clock
        self._own_peer_id = own_peer_id
        self._local_address = local_address
        self._needs_relay = needs_relay
        self._on_change = on_change
        self.on_tunnel: Callable[[str], None] | None = None
        """Called with the dialer's peer id for every tunnel a relay announces."""
        self.active: dict[str, str] = {}
        """Relays holding a reservation for this node: relay peer id -> its address."""
        self._holding: set[str] = set()
        self._failed_at: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._tasks = OwnedTasks()
        self._rng = random.Random()

    @functools.cached_property
    def _traffic(self) -> RelayTraffic:
        return RelayTraffic.of(self._pool)

    def wake(self) -> None:
        """Look at the reservations now (after reachability changed)."""
        self._wake.set()

    def candidates(self) -> list[str]:
        """Peers that may relay for this node, reachable ones first."""
        now = self._clock.monotonic()
        found = [
            r
            for r in self._directory.records()
            if r.relay_service
            and r.peer_id != self._own_peer_id
            and r.reachability != net_pb2.REACHABILITY_RELAYED
            and r.peer_id not in self._holding
            and not self._failed_lately(r.peer_id, now)
        ]
        self._rng.shuffle(found)
        found.sort(key=lambda r: r.reachability != net_pb2.REACHABILITY_DIRECT)
        extra = [
            p
            for p in self._bootstrap_peers()
            if p not in self._directory
            and p not in self._holding
            and not self._failed_lately(p, now)
        ]
        return [r.peer_id for r in found] + extra

    def _failed_lately(self, relay_id: str, now: float) -> bool:
        """Whether ``relay_id`` failed a reservation, or was given up by the node's relay
        dialer (:meth:`RelayTraffic.gave_up`), within :data:`_RETRY_RELAY_AFTER_S`."""
        failed_at = max(self._failed_at.get(relay_id, -1e9), self._traffic.given_up_at(relay_id))
        return now - failed_at < _RETRY_RELAY_AFTER_S

    async def run(self, check_interval_s: float = 1.0) -> None:
        """Keep ``relay.num_relays`` reservations while needed (runs until cancelled)."""
        try:
            while True:
                if self._needs_relay():
                    wanted = self._config.relay.num_relays - len(self._holding)
                    for relay_id in self.candidates()[: max(0, wanted)]:
                        self._holding.add(relay_id)
                        self._tasks.spawn(self._hold(relay_id), f"relay-hold-{relay_id[:8]}")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(check_interval_s):
                        await self._wake.wait()
                self._wake.clear()
        finally:
            await self._tasks.cancel_all()

    async def _hold(self, relay_id: str) -> None:
        call: Any = None
        connection: PeerConnection | None = None
        try:
            connection = await self._pool.connection(relay_id)
            reserve = connection.unary_stream(RESERVE_METHOD, net_pb2.RelayEvent)
            call = reserve(net_pb2.ReserveRequest(), metadata=connection.metadata)
            async with asyncio.timeout(self._config.rpc_timeout_s):
                first = await call.read()
            if first is grpc.aio.EOF or not first.reserved:
                raise PeerUnavailableError("the relay ended the reservation at once")
            # The address this node reached the relay at is one that works from outside.
            address = connection.target.address
            if connection.target.kind != "direct":
                record = self._directory.get(relay_id)
                address = record.addresses[0] if record and record.addresses else address
            self.active[relay_id] = address
            _log.info("relayed through %s (%s)", short_peer_id(relay_id), self.active[relay_id])
            await self._on_change()
            # A reservation lives as long as the relay keeps it and answers heartbeats.
            await self._read_events(relay_id, call, connection)
        except _ClosedUnderReservationError as exc:
            _log.info("reservation with %s ended: %s", short_peer_id(relay_id), exc)
        except grpc.aio.AioRpcError as exc:
            _log.info(
                "reservation with %s ended: %s",
                short_peer_id(relay_id),
                printable_reason(exc.details() or ""),
            )
            if connection is not None:  # (a broken one is dropped, not kept for the next try)
                await self._pool.failed(connection, exc, RESERVE_METHOD)
            note_failure(self._failed_at, relay_id, self._clock.monotonic(), _RETRY_RELAY_AFTER_S)
        except (GossamerError, TimeoutError) as exc:
            _log.info(
                "reservation with %s failed: %s", short_peer_id(relay_id), str(exc) or repr(exc)
            )
            note_failure(self._failed_at, relay_id, self._clock.monotonic(), _RETRY_RELAY_AFTER_S)
        finally:
            if call is not None:
                call.cancel()
            self._holding.discard(relay_id)
            if self.active.pop(relay_id, None) is not None and not _cancelling():
                await self._on_change()
            self.wake()

    async def _read_events(self, relay_id: str, call: Any, connection: PeerConnection) -> None:
        """Take the relay's tunnel announcements until it ends the reservation, or until
        nothing has come from it (see :meth:`_until_silent`) for ``keepalive_interval_s +
        keepalive_timeout_s``.

        Raises:
            PeerUnavailableError: the relay stopped answering, or the reservation's connection
                was closed under it (:class:`_ClosedUnderReservationError`).
            grpc.aio.AioRpcError: the reservation's call failed.
        """

        heard = functools.partial(self._traffic.heard, relay_id)
        sent = functools.partial(self._traffic.sent, relay_id)

        async def events() -> None:
            while (event := await call.read()) is not grpc.aio.EOF:
                heard()
                if event.tunnel_id:
                    accepted = self._accepted.accept(
                        self._tasks,
                        connection,
                        event,
                        self._local_address(),
                        heard=heard,
                        sent=sent,
                        moved=functools.partial(self._traffic.moved, relay_id),
                    )
                    if accepted and self.on_tunnel is not None:
                        self.on_tunnel(event.dialer_peer_id)

        if self._heartbeat is None:  # (nothing to watch the relay with)
            try:
                await events()
            except asyncio.CancelledError:
                if _cancelling():
                    raise
                raise _ClosedUnderReservationError(
                    "its connection to the relay was closed under it"
                ) from None
            return
        reader = asyncio.ensure_future(events())
        watchdog = asyncio.ensure_future(self._until_silent(relay_id, self._heartbeat))
        try:
            await asyncio.wait({reader, watchdog}, return_when=asyncio.FIRST_COMPLETED)
            # (gRPC ends a call whose channel was closed under it in CancelledError)
            closed_under = any(task.done() and task.cancelled() for task in (reader, watchdog))
        finally:
            for task in (reader, watchdog):
                task.cancel()
            await asyncio.gather(reader, watchdog, return_exceptions=True)
        if not reader.cancelled() and reader.exception() is None:
            return  # (the relay ended it)
        if not reader.cancelled() and (error := reader.exception()) is not None:
            raise error
        if closed_under:
            # (not the relay's silence: the relay is not to blame)
            raise _ClosedUnderReservationError(
                "its connection to the relay was closed under it (the relay is not to blame)"
            )
        if not watchdog.cancelled() and (error := watchdog.exception()) is not None:
            # (a heartbeat on a connection closed under it: not the relay's silence, which
            # the reservation's end was put down to)
            await self._pool.drop(relay_id, connection)
            raise PeerUnavailableError(
                f"the reservation's heartbeat failed: {str(error) or type(error).__name__}"
            ) from error
        silent_s = self._config.keepalive_interval_s + self._config.keepalive_timeout_s
        # (its connection too: the next reservation reused the hung one, and a tunnel through
        # it stayed counted until gRPC's own ping deadline, 60 s)
        await self._pool.drop(relay_id, connection)
        raise PeerUnavailableError(
            f"the relay answered no heartbeat and sent nothing for {silent_s:g} s"
        )

    async def _until_silent(
        self, relay_id: str, heartbeat: Callable[[str, float], Awaitable[None]]
    ) -> None:
        """Return once nothing has come from ``relay_id`` for ``keepalive_interval_s +
        keepalive_timeout_s``: no answer to a heartbeat and no frame on any call through it,
        the reservation's and the tunnels' (:class:`RelayTraffic`).

        One heartbeat is in flight at a time, with what is left of that window as its
        deadline: on a thin link its answer waits behind the tunnels' data (3.7-4.7 s at 1
        Mbit/s; 8-23 s behind bulk data both ways at 500 kbit/s, where a watch of
        heartbeats alone gave up a healthy relay), and with the failure detector's 2.5 s every
        heartbeat missed. A hung relay sends nothing at all, so it is given up as soon as
        before. Not gRPC's ping deadline either (see server.py)."""
        interval_s = self._config.heartbeat.interval_s
        silent_s = self._config.keepalive_interval_s + self._config.keepalive_timeout_s
        answered_at = self._clock.monotonic()
        while True:
            try:
                await heartbeat(
                    relay_id,
                    self._traffic.heartbeat_deadline_s(relay_id, answered_at, silent_s, interval_s),
                )
                answered_at = self._clock.monotonic()
                self._traffic.heard(relay_id)
            except (GossamerError, TimeoutError, grpc.aio.AioRpcError) as exc:
                silent_for_s = self._traffic.silent_for(relay_id, answered_at, silent_s)
                if silent_for_s is not None:
                    _log.info(
                        "peer %s: relay %s answered no heartbeat and sent nothing for %.1f s "
                        "(%s); giving it up",
                        short_peer_id(self._own_peer_id),
                        short_peer_id(relay_id),
                        silent_for_s,
                        str(exc) or type(exc).__name__,
                    )
                    return
            await self._clock.sleep_async(interval_s)  # (pacing, not a wait on a condition)

    async def close(self) -> None:
        """End every reservation and tunnel."""
        await self._tasks.cancel_all()


class AcceptedTunnels:
    """The tunnels a node carries into its own server, counted by the peer holding the
    reservation they were announced on, relay and direct reservations apart: at most
    :data:`MAX_ACCEPTED_TUNNELS_PER_RESERVATION` from one relay reservation and
    :data:`MAX_ACCEPTED_TUNNELS` over all of them; at most
    :data:`MAX_ACCEPTED_TUNNELS_PER_DIRECT_RESERVATION` from one direct reservation and
    :data:`MAX_ACCEPTED_DIRECT_TUNNELS` over all of them. A tunnel past them is not accepted
    (its dialer's relay gives up on it), and the first one past them is logged.

    An announcement is checked before anything is kept of it: a tunnel id longer than a relay
    makes, a dialer that is not a peer id, or (on a direct reservation) a dialer other than the
    holder is refused. Unchecked, 8 MiB ids were kept for each tunnel's life (2 GiB).
    """

    def __init__(self) -> None:
        self._open = {False: Counter[str](), True: Counter[str]()}
        """Tunnels open now by holder, of relay (False) and direct (True) reservations."""
        self._refusing: set[tuple[str, bool]] = set()
        self._malformed_from: set[str] = set()
        """Holders whose malformed announcement was logged at WARNING (later ones at DEBUG)."""

    def open_from(self, holder: str, *, direct: bool = False) -> int:
        """Tunnels open now that were announced by ``holder`` (on its direct reservation)."""
        return self._open[direct][holder]

    def num_open(self, *, direct: bool = False) -> int:
        """Tunnels open now, over all relay (or all direct) reservations."""
        return self._open[direct].total()

    @staticmethod
    def _caps(direct: bool) -> tuple[int, int]:
        if direct:
            return MAX_ACCEPTED_TUNNELS_PER_DIRECT_RESERVATION, MAX_ACCEPTED_DIRECT_TUNNELS
        return MAX_ACCEPTED_TUNNELS_PER_RESERVATION, MAX_ACCEPTED_TUNNELS

    def accept(
        self,
        tasks: OwnedTasks,
        connection: PeerConnection,
        event: net_pb2.RelayEvent,
        local_address: str,
        *,
        direct: bool = False,
        heard: Callable[[], None] | None = None,
        sent: Callable[[], None] | None = None,
        moved: Callable[[], object] | None = None,
    ) -> bool:
        """Carry the announced tunnel (a task of ``tasks``) if it is well formed and the caps
        allow; whether it does. ``direct``: announced on a direct reservation; ``heard`` and
        ``sent``: told of its traffic, ``moved``: a mark of its connection's (see
        :func:`carry_socket_over_call`)."""
        holder = connection.peer_id
        fault = announcement_fault(event, holder if direct else None)
        if fault is not None:
            self._log_malformed(holder, fault)
            return False
        per_holder, in_all = self._caps(direct)
        counts = self._open[direct]
        if counts[holder] >= per_holder or counts.total() >= in_all:
            if (holder, direct) not in self._refusing:
                self._refusing.add((holder, direct))
                _log.warning(
                    "not accepting tunnels announced by %s on its %s: %d of its are open, %d "
                    "in all (an honest one announces at most %d at once)",
                    short_peer_id(holder),
                    "direct reservation" if direct else "relay reservation",
                    counts[holder],
                    counts.total(),
                    per_holder,
                )
            return False
        counts[holder] += 1
        # Only the checked strings are kept for the tunnel's life, not the message.
        tunnel_id, dialer = event.tunnel_id, event.dialer_peer_id
        task = tasks.spawn(
            accept_tunnel(connection, tunnel_id, dialer, local_address, heard, sent, moved),
            f"accept-{tunnel_id[:8]}",
        )
        # (a done callback runs even for a task cancelled before it started)
        task.add_done_callback(lambda _: self._closed(holder, direct))
        return True

    def _log_malformed(self, holder: str, fault: str) -> None:
        if len(self._malformed_from) >= 1024:
            self._malformed_from.clear()
        first = holder not in self._malformed_from
        self._malformed_from.add(holder)
        _log.log(
            logging.WARNING if first else logging.DEBUG,
            "refused a tunnel announced by %s: %s",
            short_peer_id(holder),
            fault,
        )

    def _closed(self, holder: str, direct: bool) -> None:
        counts = self._open[direct]
        counts[holder] -= 1
        if counts[holder] <= 0:
            del counts[holder]
        # (refused for the total, a holder with none open here was never cleared)
        per_holder, in_all = self._caps(direct)
        total = counts.total()
        self._refusing = {
            (h, d)
            for h, d in self._refusing
            if d != direct or self._open[d][h] >= per_holder or total >= in_all
        }


def announcement_fault(event: net_pb2.RelayEvent, direct_holder: str | None) -> str | None:
    """Why a tunnel announcement is refused, or None: a tunnel id longer than a relay makes, a
    dialer id that is not a peer id, or, on ``direct_holder``'s direct reservation, a dialer
    other than that holder (only its own node dials back through it)."""
    if len(event.tunnel_id) > TUNNEL_ID_CHARS:
        return f"a tunnel id of {len(event.tunnel_id)} characters (a relay makes {TUNNEL_ID_CHARS})"
    try:
        digest_of_peer_id(event.dialer_peer_id)
    except ProtocolError as exc:
        return f"its dialer: {exc}"
    if direct_holder is not None and event.dialer_peer_id != direct_holder:
        return "a tunnel from another peer than the holder, on a direct reservation"
    return None


async def accept_tunnel(
    connection: PeerConnection,
    tunnel_id: str,
    dialer_peer_id: str,
    local_address: str,
    heard: Callable[[], None] | None = None,
    sent: Callable[[], None] | None = None,
    moved: Callable[[], object] | None = None,
) -> None:
    """Accept an announced tunnel: carry it into this node's own server at ``local_address``
    (``heard``, ``sent``: told of its traffic, ``moved``: a mark of its connection's, see
    :func:`carry_socket_over_call`)."""
    host, _, port = local_address.rpartition(":")
    try:
        async with asyncio.timeout(_LOCAL_CONNECT_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(host, int(port))
        accept = connection.stream_stream(ACCEPT_METHOD, net_pb2.TunnelFrame)

        def open_call(frames: AsyncIterator[net_pb2.TunnelFrame]) -> Any:
            return accept(frames, metadata=connection.metadata)

        await carry_socket_over_call(
            reader,
            writer,
            open_call,
            net_pb2.TunnelFrame(tunnel_id=tunnel_id),
            heard=heard,
            sent=sent,
            moved=moved,
            peer_id=connection.peer_id,
        )
    except (GossamerError, OSError, TimeoutError) as exc:
        _log.info(
            "tunnel from %s via %s ended: %s",
            short_peer_id(dialer_peer_id),
            short_peer_id(connection.peer_id),
            exc,
        )


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
