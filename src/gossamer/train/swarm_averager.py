"""Averaging across machines: group formation on the DHT, then comm's fault-tolerant all-reduce.

A round is named by the run and the round key (``run/outer/12``). Peers join the run by publishing
that they are active (and that they left, when they finish). Every peer that reaches a round
announces itself on the DHT with a time stamp, and waits for the run's active peers (those the
failure detector reports gone are not waited for) or, at most, a join window from the round's
first announcement. The round closes at the last awaited stamp; every entry stamped by
then is a member, so peers reading the same entries after a propagation grace agree on the members
without a leader. A peer that arrives after the round closed averages with nobody, and the hash
check after the outer step sends it to the donors for the swarm's state.
Members then run comm's all-reduce; a member that dies mid-round is dropped at its deadline and the
others finish with what arrived.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

import torch

from gossamer.comm.allreduce import AllReduceConfig, all_reduce
from gossamer.comm.codecs import CodecPolicy, ErrorFeedback
from gossamer.comm.groups import split_into_groups
from gossamer.comm.net_transport import NetCommTransport
from gossamer.comm.transport import CommMailbox
from gossamer.core.clock import SystemClock
from gossamer.core.errors import DeadlineExceededError, GossamerError
from gossamer.net.bridge import NodeThread
from gossamer.net.identity import peer_id_of_public_key
from gossamer.net.node import Node
from gossamer.train.averaging import AverageOutcome

__all__ = ["SwarmAverager", "SwarmAveragerConfig"]

logger = logging.getLogger(__name__)

_ENTRY_TTL_S = 300.0


async def _read_json_records(node: Node, key: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(publisher, JSON object) of every record under ``key``; malformed ones are skipped."""
    found = []
    for record in await node.dht.get(key):
        try:
            value = json.loads(bytes(record.value))
            publisher = peer_id_of_public_key(bytes(record.publisher_public_key))
        except (ValueError, GossamerError):
            continue
        if isinstance(value, dict):
            found.append((publisher, value))
    return found


def _round_key(round_key: str) -> bytes:
    return hashlib.sha256(f"gossamer.train.round/{round_key}".encode()).digest()


def _close_key(round_key: str) -> bytes:
    return hashlib.sha256(f"gossamer.train.close/{round_key}".encode()).digest()


def _members_key(run_id: str) -> bytes:
    return hashlib.sha256(f"gossamer.train.members/{run_id}".encode()).digest()


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
        self.incarnation = secrets.token_hex(8)
        """A nonce of this process: records of a killed predecessor with the same key differ."""
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
            members, missing = await self._form_group(node, key)
            if len(members) < 2:
                return AverageOutcome(
                    tensors=[t.clone() for t in tensors],
                    group_size=len(members),
                    bytes_sent=0,
                    bytes_received=0,
                    seconds=time.monotonic() - started,
                    missing_peers=missing,
                    excluded=not members,
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
                missing_peers=missing,
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

    def join_run(self, version: int) -> None:
        """Tell the run's other peers to wait for this one at their rounds, and its state version.

        Called again after every outer step with the new version, so a peer that fell behind
        (restarted from an older checkpoint, say) sees that it must fetch the newer state.
        """
        self._set_membership("active", version)

    def leave_run(self) -> None:
        """Tell the run's other peers to stop waiting for this one."""
        self._set_membership("left", -1)

    def newest_version(self) -> int:
        """The newest state version among the run's active peers (-1 when none is known)."""

        async def read(node: Node) -> int:
            return max((await self._active_members(node)).values(), default=-1)

        try:
            return self.node_thread.run(read, timeout_s=15)
        except GossamerError:
            return -1

    def _set_membership(self, state: str, version: int) -> None:
        key = _members_key(self.config.run_id)
        value = json.dumps({"state": state, "version": version, "inc": self.incarnation}).encode()

        async def put(node: Node) -> None:
            await node.dht.put(key, value, _ENTRY_TTL_S)

        try:
            self.node_thread.run(put, timeout_s=15)
        except GossamerError as exc:
            logger.warning(
                "peer %s could not publish that it is %s: %s", self.peer_id[:8], state, exc
            )

    async def _memberships(self, node: Node) -> dict[str, tuple[str, int, str]]:
        """Every peer's latest membership record: (state, version, incarnation)."""
        found: dict[str, tuple[str, int, str]] = {}
        for publisher, value in await _read_json_records(node, _members_key(self.config.run_id)):
            try:
                found[publisher] = (str(value["state"]), int(value["version"]), str(value["inc"]))
            except (KeyError, TypeError, ValueError):
                continue
        return found

    async def _active_members(self, node: Node) -> dict[str, int]:
        """The run's other active peers and the state version each published."""
        return {
            peer: version
            for peer, (state, version, _) in (await self._memberships(node)).items()
            if state == "active" and peer != node.peer_id
        }

    async def _current(self, node: Node, key: bytes, field: str) -> dict[str, float]:
        """Records under ``key`` written by the current incarnation of each peer: ``field``."""
        incarnations = {p: inc for p, (_, _, inc) in (await self._memberships(node)).items()}
        incarnations[node.peer_id] = self.incarnation
        found: dict[str, float] = {}
        for publisher, value in await _read_json_records(node, key):
            try:
                number, inc = float(value[field]), str(value["inc"])
            except (KeyError, TypeError, ValueError):
                continue
            if inc == incarnations.get(publisher) and math.isfinite(number):
                found[publisher] = number
        return found

    async def _form_group(self, node: Node, key: str) -> tuple[list[str], list[str]]:
        """The members of round ``key`` and the run's peers that did not come.

        The round waits for every peer that joined the run and has not left (a peer reported gone
        by the failure detector is not waited for), or ``join_window_s`` after its first
        announcement, whichever is first. It closes at the last awaited announcement; every
        entry stamped by then is a member. A peer that closed the round earlier (it expected fewer
        peers) decides for everyone: the earliest published close counts, so a late reader never
        counts a member that already left. Records carry the writer's incarnation (a nonce per
        process), so what a killed incarnation left on the DHT is ignored after a restart.
        """
        grace = self.config.propagation_grace_s
        entry_key = _round_key(key)
        stamp = self._clock.wall()
        await node.dht.put(
            entry_key, json.dumps({"at": stamp, "inc": self.incarnation}).encode(), _ENTRY_TTL_S
        )
        expected = set(await self._active_members(node))
        for peer in expected:
            node.detector.watch(peer)
        alive_at_start = {p for p in expected if self._alive(node, p)}
        close_at: float | None = None
        while close_at is None:
            entries = await self._current(node, entry_key, "at")
            entries[node.peer_id] = stamp
            opens_at = min(entries.values())
            awaited = {p for p in expected if self._alive(node, p)}
            if awaited <= set(entries):
                close_at = max(entries[p] for p in awaited | {node.peer_id})
            elif self._clock.wall() >= opens_at + self.config.join_window_s:
                close_at = opens_at + self.config.join_window_s
            else:
                await asyncio.sleep(_POLL_INTERVAL_S)
        close_key = _close_key(key)
        await node.dht.put(
            close_key,
            json.dumps({"close_at": close_at, "inc": self.incarnation}).encode(),
            _ENTRY_TTL_S,
        )
        await asyncio.sleep(max(0.0, close_at + grace - self._clock.wall()))
        close_at = min([close_at, *(await self._current(node, close_key, "close_at")).values()])
        entries.update(await self._current(node, entry_key, "at"))
        if stamp > close_at:
            logger.warning("peer %s came after round %s closed", node.peer_id[:8], key)
            return [], []
        members = [p for p, at in entries.items() if at <= close_at]
        missing = sorted(alive_at_start - set(members))  # not those already known gone
        groups = split_into_groups(key, members, self.config.max_group_size)
        return next(g for g in groups if node.peer_id in g), missing

    @staticmethod
    def _alive(node: Node, peer_id: str) -> bool:
        liveness = node.detector.liveness(peer_id)
        return liveness is None or liveness.alive
