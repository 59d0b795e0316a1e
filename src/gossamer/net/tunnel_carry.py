"""Carrying a local TCP connection's bytes over a relay's tunnel call, at either end.

Both ends of a relayed connection carry a loopback socket over a ``Relay.Connect`` or
``Relay.Accept`` call (see tunnels.py): :func:`carry_socket_over_call` moves the bytes both
ways, reads the local connection ahead of a slow call within the node's
:class:`ReadAheadBudget`, and ends a tunnel whose call stalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar

import grpc

from gossamer.core.errors import GossamerError, PeerUnavailableError
from gossamer.net.connections import ended_under_call
from gossamer.net.grpc_errors import error_of_rpc_error
from gossamer.net.owned_tasks import being_cancelled
from gossamer.proto import net_pb2

__all__ = [
    "FRAME_BYTES",
    "PRESSED_WRITE_S",
    "READ_AHEAD_BUDGET_BYTES",
    "READ_AHEAD_BYTES",
    "STALLED_TUNNEL_S",
    "STUCK_TUNNEL_S",
    "OpenCall",
    "ReadAheadBudget",
    "carry_socket_over_call",
]

_log = logging.getLogger(__name__)
FRAME_BYTES = 256 * 1024
"""Largest tunnel frame: one read from the local socket."""
PRESSED_WRITE_S = 0.1
"""A tunnel call that held a frame back this long before taking it is sending on a link it
fills (a write to a relay that has room takes microseconds)."""
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
                    if being_cancelled():
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
