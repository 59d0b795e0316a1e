"""The DHT records of a swarm run's rounds and memberships: their keys, reading them, and
what a round's records decide (its close settled, the group formation agreed on).

Used by :class:`~gossamer.train.swarm_averager.SwarmAverager` and its parts; see that
module's docstring for how rounds form."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from gossamer.comm.bandwidth import SendRates
from gossamer.core.errors import (
    GossamerError,
)
from gossamer.net.identity import peer_id_of_public_key
from gossamer.net.node import Node

__all__ = [
    "read_json_records",
    "round_entry_key",
    "round_settled",
    "settings_difference",
]

_ENTRY_TTL_S = 300.0


async def read_json_records(
    node: Node, key: bytes, *, replicated_only: bool = False
) -> list[tuple[str, dict[str, Any]]]:
    """(publisher, JSON object) of every record under ``key``; malformed ones are skipped.

    ``replicated_only``: see :meth:`~gossamer.net.dht.Dht.get`.
    """
    found = []
    for record in await node.dht.get(key, replicated_only=replicated_only):
        try:
            value = json.loads(bytes(record.value))
            publisher = peer_id_of_public_key(bytes(record.publisher_public_key))
        except (ValueError, RecursionError, GossamerError):  # (Recursion: nested too deep)
            continue
        if isinstance(value, dict):
            found.append((publisher, value))
    return found


def round_entry_key(round_key: str) -> bytes:
    """The DHT key of round ``round_key``'s entries (``RUN_ID/ROUND``, as rounds name them)."""
    return hashlib.sha256(f"gossamer.train.round/{round_key}".encode()).digest()


def _close_key(round_key: str) -> bytes:
    return hashlib.sha256(f"gossamer.train.close/{round_key}".encode()).digest()


def _members_key(run_id: str) -> bytes:
    return hashlib.sha256(f"gossamer.train.members/{run_id}".encode()).digest()


def _failed_key(round_key: str) -> bytes:
    """The DHT key under which a round's members say that it failed on them."""
    return hashlib.sha256(f"gossamer.train.failed/{round_key}".encode()).digest()


def settings_difference(theirs: object, mine: dict[str, Any]) -> str:
    """How another peer's settings ``theirs`` (from the network) differ from ``mine`` ('' if
    they do not): the first that differs, named as the ``swarm.`` setting it is, with both
    values. A setting ``theirs`` does not hold (a peer of another version) is not compared."""
    if not isinstance(theirs, dict):
        return "their settings are malformed"
    for name, value in mine.items():
        if name not in theirs:
            continue
        other = theirs[name]
        # (True == 1 in Python: a bool is only ever equal to a bool)
        if other != value or isinstance(other, bool) != isinstance(value, bool):
            return f"swarm.{name} is {repr(other)[:40]} there, {value!r} here"
    return ""


def _active(memberships: dict[str, tuple[str, int, str]], me: str) -> set[str]:
    """The run's other peers whose latest membership says they are active."""
    return {p for p, (state, _, _) in memberships.items() if state == "active" and p != me}


def round_settled(
    *,
    me: str,
    stamp: float,
    close_at: float,
    active: set[str],
    entries: dict[str, float],
    closes: dict[str, float],
    join_window_s: float,
) -> bool:
    """Whether a round's members are final before its propagation grace is over.

    The grace protects against an announcement stamped before the close that a reader has not
    seen yet (it would count it, another would not), and against an earlier close still on its
    way (the smallest close counts). Neither can happen once

    - every peer the run lists as active (read after the close) has announced: a peer's membership
      is on the DHT before its first announcement is stamped, so a peer that could still announce
      before the close is listed and makes this false;
    - every member has published a close, all equal to this peer's: a non-member's close is at
      least its own stamp, after this close, unless its join window ran out, and
    - this close comes before the join window of the round's first announcement runs out, so no
      peer can close by the window before it.

    A peer alone keeps the grace: it has no all-reduce to start sooner, and a swarm's first peer
    should not race through its rounds before the next peers can join (they start one after
    another).

    A DHT put returns once the record is on every replica a get asks, so whatever a peer
    published before its close is read by anyone who read its close.

    Args:
        me: this peer's id.
        stamp: this peer's announcement.
        close_at: the close this peer computed and published.
        active: the run's other active peers, read after the close.
        entries: the current announcements, by peer.
        closes: the current closes, by peer (this peer's included once published).
        join_window_s: the round's join window.
    """
    entries = {**entries, me: stamp}
    if not active <= set(entries):
        return False
    if close_at >= min(entries.values()) + join_window_s:
        return False
    others = [p for p, at in entries.items() if at <= close_at and p != me]
    if not others:  # alone: no time to save in the all-reduce, and the pace stays as it was
        return False
    if any(closes.get(p) != close_at for p in others):
        return False
    return min(closes.values(), default=close_at) >= close_at


@dataclass(frozen=True, slots=True)
class _Formed:
    """A round's group as formation agreed on it."""

    members: list[str]
    """This peer's group, in the order every member computed."""
    missing: list[str]
    """The run's peers, alive at the start, that did not come."""
    part_weights: list[float]
    """The members' shares of the p2p all-reduce's parts."""
    send_rates: SendRates | None
    """The send rates every member picks its p2p send order by (None: no group)."""
    entries: dict[str, dict[str, Any]]
    """Every member's round entry (its stamp, figures, store address, held group)."""


def _figure(entry: dict[str, Any], name: str = "bw") -> float:
    """A bandwidth figure of a round entry: its send-rate estimate (``bw``) or its floor
    (``bwf``); 0 (the median in ``plan_weights``, the estimate for a floor) if unreadable."""
    try:
        return float(entry.get(name, 0.0))
    except (TypeError, ValueError, OverflowError):
        return 0.0
