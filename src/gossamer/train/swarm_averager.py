"""Averaging across machines: group formation on the DHT, then comm's fault-tolerant all-reduce.

A round is named by the run and the round key (``run/outer/12``). Every peer that reaches the round
announces itself on the DHT with a time stamp, and waits for the peers that announced the previous
round (those the failure detector reports gone are not waited for) or, at most, a join window from
the round's first announcement. The round closes at the last awaited stamp; every entry stamped by
then is a member, so peers reading the same entries after a propagation grace agree on the members
without a leader. A peer that arrives after the round closed averages with nobody, and the hash
check after the outer step sends it to the donors for the swarm's state.
Members then run comm's all-reduce; a member that dies mid-round is dropped at its deadline and the
others finish with what arrived.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import torch

from gossamer.comm.allreduce import AllReduceConfig, all_reduce
from gossamer.comm.codecs import CodecPolicy, ErrorFeedback
from gossamer.comm.groups import DhtRendezvousBoard, JoinEntry, split_into_groups
from gossamer.comm.net_transport import NetCommTransport
from gossamer.comm.transport import CommMailbox
from gossamer.core.clock import SystemClock
from gossamer.core.errors import DeadlineExceededError
from gossamer.net.bridge import NodeThread
from gossamer.net.node import Node
from gossamer.train.averaging import AverageOutcome

__all__ = ["SwarmAverager", "SwarmAveragerConfig"]

logger = logging.getLogger(__name__)

_ENTRY_TTL_S = 300.0
_POLL_INTERVAL_S = 0.1


@dataclass(frozen=True, kw_only=True, slots=True)
class SwarmAveragerConfig:
    """Rounds across machines."""

    run_id: str
    """Peers of the same run average together; others never."""
    codec: str = "none"
    """Codec of large tensors."""
    join_window_s: float = 30.0
    """Longest a round waits, from its first announcement, for the previous round's peers."""
    propagation_grace_s: float = 0.5
    """Extra wait before reading the members, so late announcements have spread."""
    round_timeout_s: float = 60.0
    """Deadline of the all-reduce."""
    max_group_size: int = 16
    """Peers per group; larger rounds split into several groups."""


class SwarmAverager:
    """A :class:`~gossamer.train.averaging.TensorAverager` over a peer's node.

    Args:
        node_thread: the started node this peer speaks through.
        config: round settings.
    """

    def __init__(self, node_thread: NodeThread, config: SwarmAveragerConfig) -> None:
        self.node_thread = node_thread
        self.config = config
        self.feedback = ErrorFeedback()
        self._clock = SystemClock()
        self._allreduce_config = AllReduceConfig(
            timeout_s=config.round_timeout_s,
            send_timeout_s=min(30.0, config.round_timeout_s / 2),
            codec=CodecPolicy(codec=config.codec),
        )
        self._mailbox: CommMailbox | None = None
        self._previous_key: str | None = None
        self.last_failed: list[str] = []
        """Peers dropped from the last round."""

        async def make_mailbox(node: Node) -> CommMailbox:
            return CommMailbox(NetCommTransport(node), self._clock)

        self._mailbox = node_thread.run(make_mailbox, timeout_s=10)

    @property
    def peer_id(self) -> str:
        """This peer's id."""
        return self.node_thread.node.peer_id

    def average(
        self, tensors: list[torch.Tensor], *, round_key: str, weight: float
    ) -> AverageOutcome:
        """Average with whoever joins ``round_key`` in time; alone if nobody does."""
        started = time.monotonic()
        key = f"{self.config.run_id}/{round_key}"
        deadline_s = (
            self.config.join_window_s * 2
            + self.config.propagation_grace_s
            + self.config.round_timeout_s
            + 10.0
        )

        async def work(node: Node) -> AverageOutcome:
            members = await self._form_group(node, key)
            if len(members) < 2:
                return AverageOutcome(
                    tensors=[t.clone() for t in tensors],
                    group_size=1,
                    bytes_sent=0,
                    bytes_received=0,
                    seconds=time.monotonic() - started,
                )
            assert self._mailbox is not None
            result = await all_reduce(
                tensors,
                mailbox=self._mailbox,
                members=members,
                round_key=key,
                config=self._allreduce_config,
                weight=weight,
                feedback=self.feedback,
            )
            report = result.report
            return AverageOutcome(
                tensors=result.tensors,
                group_size=len(members) - len(report.failed),
                bytes_sent=report.bytes_sent,
                bytes_received=report.bytes_received,
                seconds=time.monotonic() - started,
                failed_peers=sorted(report.failed),
            )

        try:
            outcome = self.node_thread.run(work, timeout_s=deadline_s)
        except DeadlineExceededError:
            logger.warning(
                "round %s did not finish in %.0f s; keeping local values", key, deadline_s
            )
            outcome = AverageOutcome(
                tensors=[t.clone() for t in tensors],
                group_size=1,
                bytes_sent=0,
                bytes_received=0,
                seconds=time.monotonic() - started,
            )
        self.last_failed = outcome.failed_peers
        logger.info(
            "peer %s round %s: %d peers, %d bytes sent, %.2f s",
            self.peer_id[:8],
            key,
            outcome.group_size,
            outcome.bytes_sent,
            outcome.seconds,
        )
        return outcome

    def register(self, round_key: str) -> None:
        """Announce this peer on a round that already ran, so the next round waits for it.

        A newcomer that synced its state after round ``round_key`` calls this: the next round's
        peers expect everyone who announced the previous round.
        """
        key = f"{self.config.run_id}/{round_key}"

        async def announce(node: Node) -> None:
            me = JoinEntry(node.peer_id, self._clock.wall(), 0.0, "")
            await DhtRendezvousBoard(node.dht).announce(key, me, ttl_s=_ENTRY_TTL_S)

        self.node_thread.run(announce, timeout_s=10)
        self._previous_key = key

    async def _form_group(self, node: Node, key: str) -> list[str]:
        """The members of round ``key``, the same on every peer that reads the same entries.

        The round waits for everyone who announced the previous round (a peer reported gone by the
        failure detector is not waited for), or ``join_window_s`` after its first announcement,
        whichever is first. It closes at the last awaited announcement; every entry stamped by
        then is a member, newcomers included.
        """
        board = DhtRendezvousBoard(node.dht)
        grace = self.config.propagation_grace_s
        me = JoinEntry(node.peer_id, self._clock.wall(), 0.0, "")
        await board.announce(key, me, ttl_s=_ENTRY_TTL_S)
        expected: set[str] = set()
        if self._previous_key is not None:
            expected = {e.peer_id for e in await board.entries(self._previous_key)}
            expected.discard(node.peer_id)
        for peer in expected:
            node.detector.watch(peer)
        self._previous_key = key
        close_at: float | None = None
        while close_at is None:
            entries = {e.peer_id: e for e in await board.entries(key)}
            entries[me.peer_id] = me
            opens_at = min(e.announced_at_s for e in entries.values())
            awaited = {p for p in expected if self._alive(node, p)}
            if awaited <= set(entries):
                close_at = max(entries[p].announced_at_s for p in awaited | {me.peer_id})
            elif self._clock.wall() >= opens_at + self.config.join_window_s:
                close_at = opens_at + self.config.join_window_s
            else:
                await asyncio.sleep(_POLL_INTERVAL_S)
        await asyncio.sleep(max(0.0, close_at + grace - self._clock.wall()))
        entries.update({e.peer_id: e for e in await board.entries(key)})
        if me.announced_at_s > close_at:
            logger.warning("peer %s came after round %s closed", node.peer_id[:8], key)
            return [node.peer_id]
        members = [p for p, e in entries.items() if e.announced_at_s <= close_at]
        groups = split_into_groups(key, members, self.config.max_group_size)
        return next(g for g in groups if node.peer_id in g)

    @staticmethod
    def _alive(node: Node, peer_id: str) -> bool:
        liveness = node.detector.liveness(peer_id)
        return liveness is None or liveness.alive
