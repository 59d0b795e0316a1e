"""A circuit breaker per remote peer: after repeated failures, fail fast for a while."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gossamer.core.clock import Clock
from gossamer.core.errors import PeerUnavailableError
from gossamer.net.config import BreakerConfig
from gossamer.net.identity import short_peer_id

__all__ = ["CircuitBreaker", "CircuitBreakers"]

_log = logging.getLogger(__name__)


@dataclass(slots=True)
class CircuitBreaker:
    """Closed: calls go through. Open: calls fail at once. Half-open: one trial call goes through.

    Its caller decides what a call's outcome says of the peer: :class:`ConnectionPool
    <gossamer.net.connections.ConnectionPool>` does not count a refusal the peer's handler
    answered as a failure, and does not count a call that ran out of time behind a bulk upload
    on its connection at all (a busy link, not a dead peer).

    Args:
        peer: the remote peer (id or address) this breaker guards.
        config: threshold and open time.
        clock: time source.
    """

    peer: str
    config: BreakerConfig
    clock: Clock
    num_consecutive_failures: int = 0
    opened_at_s: float | None = None
    _trial_in_flight: bool = False

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half-open``."""
        if self.opened_at_s is None:
            return "closed"
        if self.clock.monotonic() - self.opened_at_s >= self.config.open_s:
            return "half-open"
        return "open"

    def before_call(self) -> bool:
        """Let a call through, or refuse it.

        Returns:
            Whether the call is the half-open trial (its caller calls :meth:`settled` when it
            ends).

        Raises:
            PeerUnavailableError: the breaker is open (or a half-open trial is already running).
        """
        state = self.state
        if state == "closed":
            return False
        if state == "half-open" and not self._trial_in_flight:
            self._trial_in_flight = True
            return True
        assert self.opened_at_s is not None
        remaining_s = self.config.open_s - (self.clock.monotonic() - self.opened_at_s)
        raise PeerUnavailableError(
            f"peer {short_peer_id(self.peer)}: circuit open after "
            f"{self.num_consecutive_failures} failures; next try in {max(0.0, remaining_s):.1f} s"
        )

    def succeeded(self) -> None:
        """Record a successful call: the breaker closes."""
        if self.opened_at_s is not None:
            _log.info("peer %s: circuit closed again", short_peer_id(self.peer))
        self.num_consecutive_failures = 0
        self.opened_at_s = None
        self._trial_in_flight = False

    def half_open(self) -> None:
        """Let the next call through as a trial now, without closing: for a fresh connection
        to the peer, where the failures may have been its old connection's. The trial's
        success closes the breaker; its failure opens it again for its whole open time. (Closed
        at once, a peer that answers handshakes and hangs on every call got five more calls to
        wait out their deadlines at every fresh connection.)"""
        if self.opened_at_s is not None and not self._trial_in_flight:
            self.opened_at_s = min(self.opened_at_s, self.clock.monotonic() - self.config.open_s)

    def settled(self) -> None:
        """The half-open trial ended (called whatever its outcome, after :meth:`succeeded` or
        :meth:`failed` where it had one; by the trial's caller only: another call's end must
        not let a second trial through). A trial that ended with no verdict, its caller
        cancelled or an error that says nothing of the peer's health, lets the next call try.
        Without this the breaker refused every call for good."""
        self._trial_in_flight = False

    def failed(self) -> None:
        """Record a failed call: past the threshold (or a failed trial) the breaker opens."""
        self.num_consecutive_failures += 1
        self._trial_in_flight = False
        if self.num_consecutive_failures >= self.config.failure_threshold:
            if self.opened_at_s is None:
                _log.warning(
                    "peer %s: circuit open after %d consecutive failures",
                    short_peer_id(self.peer),
                    self.num_consecutive_failures,
                )
            self.opened_at_s = self.clock.monotonic()


class CircuitBreakers:
    """One breaker per remote peer, made on first use."""

    def __init__(self, config: BreakerConfig, clock: Clock) -> None:
        self._config = config
        self._clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}

    def __getitem__(self, peer: str) -> CircuitBreaker:
        breaker = self._breakers.get(peer)
        if breaker is None:
            breaker = self._breakers[peer] = CircuitBreaker(peer, self._config, self._clock)
        return breaker

    def __contains__(self, peer: object) -> bool:
        return peer in self._breakers

    def forget(self, peer: str) -> None:
        """Drop a peer's breaker (the peer is gone for good)."""
        self._breakers.pop(peer, None)
