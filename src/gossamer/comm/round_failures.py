"""What one member does in an all-reduce round when a member fails, or it leaves or is dropped.

A layer of :class:`~gossamer.comm.round_state.RoundState` (see :mod:`gossamer.comm.round_base`):
a failed member's parts go to their backups and the others are told (a PEER_FAILED frame, see
:func:`failure_report`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from gossamer.comm.round_reducing import RoundReducing
from gossamer.comm.transport import FLAG_DELIVERED, FLAG_REASSIGNED, Frame, FrameKind, pack_frame
from gossamer.core.errors import GossamerError, ProtocolError

__all__ = ["RoundFailures", "failure_report"]

_log = logging.getLogger(__name__)


def failure_report(round_id: bytes, member: int, *, delivered: bool = False) -> bytes:
    """A PEER_FAILED frame naming ``member`` (``delivered``: every member holds its averages,
    see ``FLAG_DELIVERED``)."""
    flags = FLAG_DELIVERED if delivered else 0
    return pack_frame(Frame(FrameKind.PEER_FAILED, round_id, 0, 0, member, 0.0, flags))


class RoundFailures(RoundReducing):
    """A round's failures: declaring members failed, reassigning their parts, leaving."""

    # ---- failures ------------------------------------------------------------------------------

    def peer_failed(
        self,
        member: int,
        reason: str,
        *,
        notify: bool,
        told_by: int | None = None,
        delivered: bool = False,
    ) -> None:
        """Stop waiting for ``member``, reassign what it reduced, and (optionally) tell the rest
        (but ``told_by``, the member that reported it here). With ``delivered`` (it left the
        round saying every member holds its averages) its own part is not reassigned.

        ``member`` itself is told too: if it is alive (wrongly declared failed, or cut off from
        one member only) it stops at once instead of at its deadline, and does not take its own
        averages for the ones the others take from a backup.
        """
        if member == self.me or member in self.failed:
            return
        ring = self._ring_intact()
        if ring:
            self._ring_broken_by = "member failed"
        self.failed[member] = reason
        self.steps.member_failed(member)
        for chunk in list(self._unconfirmed):
            self._waits_no_more(chunk, member)
        if ring:
            self._send_unconfirmed()
        for send in list(self._sends_to[member]):
            send.cancel()
        _log.info(
            "peer %s: member %s failed in round %s: %s",
            self.plan.members[self.me][:12],
            self.plan.members[member][:12],
            self.round_id.hex()[:12],
            reason,
        )
        for reducer in self.reducers.values():
            reducer.expected.discard(member)
            for chunk in reducer.pending_chunks():
                self._check_chunk(reducer, chunk)
        for part in range(self.plan.num_parts):
            held = delivered and part == member  # (every member holds its averages)
            if self.reducer_of[part] == member and self.chunks[part] and not held:
                self._reassign(part)
        message = self._failure_report(member, delivered=delivered)
        if notify:
            for dest in range(self.plan.num_parts):
                if dest not in (self.me, told_by) and dest not in self.failed:
                    self.spawn(self._notify(dest, message))
        self.spawn(self._tell_excluded(member, message))
        self._check_done()

    def leaving(self) -> tuple[bytes, list[str], bool]:
        """What this member tells the others when it leaves the round before its end (its
        caller cancelled it): a failure report naming itself, the members to tell, and whether
        every one of them holds its averages already (the report says so: they do not average
        its part again, which a member whose part's backup had finished would leave the round
        over).
        """
        n = self.plan.num_parts
        live = {m for m in range(n) if m != self.me and m not in self.failed}
        # (a member that reduces a failed owner's part too says nothing of its own: both are
        # reassigned, as after any failure of a backup)
        backup = any(self.reducer_of[p] == self.me for p in range(n) if p != self.me)
        delivered = (
            not backup
            and self.reducer_of[self.me] == self.me
            and all(live <= held for held in self._own_held)
        )
        notice = self._failure_report(self.me, delivered=delivered)
        return notice, [self.plan.members[m] for m in sorted(live)], delivered

    def _failure_report(self, member: int, *, delivered: bool) -> bytes:
        return failure_report(self.round_id, member, delivered=delivered)

    async def _present(self, dest: int, message: bytes) -> None:
        """Tell ``dest`` that this member is in the round (see ``announce``).

        A refusal (it runs no round of this key, or another group's) drops it at once; any
        other failure is left to the data sends and their deadlines: a member still forming
        holds the message until its round opens, and a late answer is no fault of its own.
        """
        if dest in self.failed:
            return
        send = asyncio.ensure_future(self._send(dest, message, word=True))
        self._sends_to[dest].add(send)
        try:
            await send
        except ProtocolError as exc:
            self.peer_failed(dest, f"{type(exc).__name__}: {exc}", notify=True)
        except GossamerError:
            pass
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if dest in self.failed and not (current is not None and current.cancelling()):
                return  # cut short by peer_failed, not by the round's end
            raise
        finally:
            self._sends_to[dest].discard(send)

    async def _tell_excluded(self, member: int, message: bytes) -> None:
        # Best effort: the member is probably gone, and the round never waits for this send.
        with contextlib.suppress(GossamerError):
            await self._send(member, message)

    def _on_excluded(self, reason: str) -> None:
        # The others take a backup's averages for what this member reduced; its own would
        # differ, so they are dropped at the end (fill_missing) and the round ends now.
        if self.excluded is None:
            self.excluded = reason
            _log.info(
                "peer %s: the others dropped it from round %s: %s",
                self.plan.members[self.me][:12],
                self.round_id.hex()[:12],
                reason,
            )
        self.done.set()

    def _authoritative(self, part: int, chunk: int) -> bool:
        """Whether this member's output for the chunk is what the others hold (or will)."""
        if self.excluded is None:
            return self.has_output[part][chunk]
        source = self.result_from[part][chunk]
        return source is not None and source != self.me and self.reducer_of[part] != self.me

    def _reassign(self, part: int) -> None:
        backup = self.plan.backup_of(part, set(self.failed))
        if backup is None:
            return
        self.reducer_of[part] = backup
        if backup == self.me:
            # The survivors resend this part now: give them at least half the time left.
            now = self.clock.monotonic()
            deadline_s = max(self.reduce_deadline_s, now + 0.5 * (self.deadline_s - now))
            self._start_reducer(part, set(range(self.plan.num_parts)), deadline_s)
        else:
            self.spawn(self._send_part(part, backup, flags=FLAG_REASSIGNED, counted=False))
