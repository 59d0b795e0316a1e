"""When peers last failed, kept only while it still decides a retry."""

from __future__ import annotations

__all__ = ["note_failure"]


def note_failure(failed_at: dict[str, float], peer_id: str, now: float, keep_s: float) -> None:
    """Record that ``peer_id`` failed at ``now`` in ``failed_at``, forgetting failures older
    than ``keep_s`` (past their retry wait: kept, one per peer that ever failed piled up)."""
    for old in [p for p, at in failed_at.items() if now - at >= keep_s]:
        del failed_at[old]
    failed_at[peer_id] = now
