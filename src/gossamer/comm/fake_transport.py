"""In-memory transports for tests: a fake network of peers, and peers that fail on a script.

``FakeTransport`` delivers a message by calling the receiver of the destination directly and
returns once it was handled, like net's bulk streams. ``FaultyTransport`` follows a
:class:`FaultScript`: crash after some sends (the peer goes dark both ways, like a killed
process), refuse to send to some peers, refuse incoming messages (a peer that fails while
reducing), answer slowly, or hang (like a paused process: sends to it time out).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from gossamer.comm.transport import Message, MessageReceiver, message_bytes, message_nbytes
from gossamer.core.clock import Clock
from gossamer.core.errors import DeadlineExceededError, PeerLostError, PeerUnavailableError

__all__ = ["FakeNetwork", "FakeTransport", "FaultScript", "FaultyTransport"]


class FakeNetwork:
    """Peers that reach each other in memory.

    Args:
        clock: time source for send deadlines (of hung peers) and delays.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.transports: dict[str, FakeTransport] = {}
        self.hosts: dict[str, str] = {}
        """The host each peer sends from, where it has one (see
        :func:`~gossamer.comm.transport.sender_host`); a peer without one reaches the others
        as from an unknown host (from their own machine, or through a relay)."""

    def transport(
        self, peer_id: str, script: FaultScript | None = None, *, host: str | None = None
    ) -> FakeTransport:
        """A new peer on this network (faulty when ``script`` is given), sending from
        ``host``."""
        if peer_id in self.transports:
            raise ValueError(f"peer {peer_id} is already on the fake network")
        made = (
            FakeTransport(self, peer_id)
            if script is None
            else FaultyTransport(self, peer_id, script)
        )
        self.transports[peer_id] = made
        if host is not None:
            self.hosts[peer_id] = host
        return made


class FakeTransport:
    """One peer of a :class:`FakeNetwork`."""

    def __init__(self, network: FakeNetwork, peer_id: str) -> None:
        self.network = network
        self._peer_id = peer_id
        self.receiver: MessageReceiver | None = None
        self.num_sent = 0
        self.bytes_sent = 0

    @property
    def peer_id(self) -> str:
        """This peer's id."""
        return self._peer_id

    def set_receiver(self, receiver: MessageReceiver) -> None:
        """Route incoming messages to ``receiver``."""
        self.receiver = receiver

    def is_down(self) -> bool:
        """Whether this peer has crashed (refuses everything)."""
        return False

    def is_hung(self) -> bool:
        """Whether this peer is paused (accepts connections but never answers)."""
        return False

    async def accept(self, sender: str, message: Message) -> None:
        """Handle one incoming message (called by the sender's transport)."""
        if self.is_hung():
            await asyncio.Event().wait()  # a paused process: the sender's deadline ends it
        if self.receiver is None:
            raise PeerUnavailableError(f"peer {self._peer_id} has no receiver")
        view = memoryview(bytearray(message_bytes(message)))
        await self.receiver(sender, view, self.network.hosts.get(sender))

    async def send(self, peer_id: str, message: Message, *, timeout_s: float) -> None:
        """Deliver ``message`` to ``peer_id``; return once it was handled."""
        if self.is_down():
            raise PeerLostError(f"peer {self._peer_id} is down and cannot send")
        target = self.network.transports.get(peer_id)
        if target is None or target.is_down():
            raise PeerUnavailableError(f"peer {peer_id} refused the connection")
        handled = asyncio.ensure_future(target.accept(self._peer_id, message))
        expired = asyncio.ensure_future(self.network.clock.sleep_async(timeout_s))
        try:
            await asyncio.wait({handled, expired}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (handled, expired):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        if not handled.done() or handled.cancelled():
            raise DeadlineExceededError(f"peer {peer_id} did not answer in {timeout_s} s")
        handled.result()
        self.num_sent += 1
        self.bytes_sent += message_nbytes(message)


@dataclass(frozen=True, kw_only=True, slots=True)
class FaultScript:
    """When and how a :class:`FaultyTransport` fails."""

    crash_after_sends: int | None = None
    """After this many send attempts the peer goes dark both ways (0: dark from the start)."""
    refuse_sends_to: frozenset[str] = field(default_factory=frozenset)
    """Sends to these peers fail (a one-way link cut)."""
    fail_receiving_after: int | None = None
    """After this many handled messages, incoming ones fail (a peer failing while reducing)."""
    send_delay_s: float = 0.0
    """Each send first waits this long (a slow peer)."""
    receive_delay_s: float = 0.0
    """Each incoming message is handled this long after it came (a slow downlink)."""
    hung: bool = False
    """Sends to this peer never complete (a paused process)."""


class FaultyTransport(FakeTransport):
    """A fake peer that fails as its script says."""

    def __init__(self, network: FakeNetwork, peer_id: str, script: FaultScript) -> None:
        super().__init__(network, peer_id)
        self.script = script
        self.num_received = 0
        self.num_send_attempts = 0

    def is_down(self) -> bool:
        limit = self.script.crash_after_sends
        return limit is not None and self.num_send_attempts > limit

    def is_hung(self) -> bool:
        return self.script.hung

    async def accept(self, sender: str, message: Message) -> None:
        limit = self.script.fail_receiving_after
        if limit is not None and self.num_received >= limit:
            raise PeerLostError(f"peer {self.peer_id} failed while handling a message")
        self.num_received += 1
        if self.script.receive_delay_s:
            await self.network.clock.sleep_async(self.script.receive_delay_s)
        await super().accept(sender, message)

    async def send(self, peer_id: str, message: Message, *, timeout_s: float) -> None:
        self.num_send_attempts += 1
        if self.script.send_delay_s:
            await self.network.clock.sleep_async(self.script.send_delay_s)
        if peer_id in self.script.refuse_sends_to:
            raise PeerUnavailableError(f"link {self.peer_id} -> {peer_id} is cut")
        if self.script.hung:
            await self.network.clock.sleep_async(timeout_s)
            raise DeadlineExceededError(f"peer {self.peer_id} is paused")
        await super().send(peer_id, message, timeout_s=timeout_s)
