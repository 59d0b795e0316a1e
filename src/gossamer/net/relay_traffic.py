"""What came from each relay over a node's connections, and when: how the node tells a
silent relay from one whose answers wait behind its tunnels' data on a thin link.
"""

from __future__ import annotations

import math
import weakref
from typing import ClassVar

from gossamer.core.clock import Clock
from gossamer.net.connections import ConnectionPool
from gossamer.net.recent_failures import note_failure

__all__ = ["BUSY_RELAY_SILENT_S", "RelayTraffic"]

BUSY_RELAY_SILENT_S = 60.0
"""Longest a relay whose tunnels still take this node's bytes on a thin link may send nothing
back before it is given up (see :class:`RelayTraffic`); gRPC's own ping deadline is 60 s."""


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
