"""A swarm averager's membership of its run: what it publishes of itself on the DHT (active,
joining, left, with its state version and settings) and how it reads the others' records:
which peers are of this run, their versions, the current incarnations' round records.

:class:`_RunMembership` is the part of
:class:`~gossamer.train.swarm_averager.SwarmAverager` that does this; round formation and
the torch.distributed path build on it."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Sequence
from typing import Any

from gossamer.core.clock import Clock
from gossamer.core.errors import (
    GossamerError,
)
from gossamer.net.bridge import NodeThread
from gossamer.net.node import Node
from gossamer.train.swarm_averager_config import SwarmAveragerConfig
from gossamer.train.swarm_round_records import (
    _ENTRY_TTL_S,
    _active,
    _members_key,
    read_json_records,
    round_entry_key,
    settings_difference,
)

logger = logging.getLogger(__name__)


class _RunMembership:
    """The run's membership records of a :class:`~gossamer.train.swarm_averager.SwarmAverager`."""

    # Set by SwarmAverager.__init__ (see there).
    node_thread: NodeThread
    config: SwarmAveragerConfig
    incarnation: str
    settings: dict[str, Any]
    other_settings: dict[str, str]
    _members_of_other_settings: frozenset[str]
    other_settings_peers: frozenset[str]
    newest_seen_version: int | None
    joining: dict[str, int]
    _correction_s: float
    _joined_at: float | None
    _seen_in_run: set[str]
    left_before_joining: frozenset[str]
    _clock: Clock

    @property
    def peer_id(self) -> str:
        """This peer's id."""
        return self.node_thread.node.peer_id

    def _settings_differ(self, entry: dict[str, Any]) -> str:
        """How the settings of a round entry differ from this peer's ('' where they do not,
        where this peer names none, or where the entry carries none: a peer of before)."""
        if not self.settings or "cfg" not in entry:
            return ""
        return settings_difference(entry["cfg"], self.settings)

    def join_run(self, version: int) -> None:
        """Tell the run's other peers to wait for this one at their rounds, and its state version.

        Called again after every outer step with the new version, so a peer that fell behind
        (restarted from an older checkpoint, say) sees that it must fetch the newer state.
        """
        self._set_membership("active", version)

    def announce_joining(self, step: int) -> None:
        """Tell the run that this peer joins at ``step``: it needs the state the others hold then.

        Not yet awaited at rounds; :meth:`join_run` makes it a member once it has the state.
        """
        self._set_membership("joining", step)

    def run_states(self) -> dict[str, tuple[str, int]]:
        """Every other peer of the run that the failure detector does not report gone: its
        membership state (``active``, ``joining``, ``left``) and version (or joining step).

        Raises:
            GossamerError: the DHT could not be read.
        """

        async def read(node: Node) -> dict[str, tuple[str, int]]:
            return {
                peer: (state, version)
                for peer, (state, version, _) in (await self._memberships(node)).items()
                if peer != node.peer_id and self._alive(node, peer)
            }

        return self.node_thread.run(read, timeout_s=15)

    def round_entrants(self, round_key: str) -> tuple[frozenset[str], frozenset[str]]:
        """The run's other active peers, and those of them whose entry of round ``round_key``
        (as callers name it) is on the DHT: peers of :attr:`other_settings_peers` and those the
        failure detector reports gone are left out of both, and entries of an earlier run of
        the same name or of a killed incarnation are not counted.

        Raises:
            GossamerError: the DHT could not be read.
        """
        key = f"{self.config.run_id}/{round_key}"

        async def read(node: Node) -> tuple[frozenset[str], frozenset[str]]:
            memberships, (entries,) = await self._read_round(node, [(round_entry_key(key), "at")])
            entries = self._this_run_s(node, entries)
            odd = self.other_settings_peers  # (noted from these memberships)
            active = frozenset(
                p
                for p in _active(memberships, node.peer_id)
                if p not in odd and self._alive(node, p)
            )
            return active, active & frozenset(entries)

        return self.node_thread.run(read, timeout_s=10)

    def leave_run(self) -> None:
        """Tell the run's other peers to stop waiting for this one."""
        self._set_membership("left", -1)

    def newest_version(self) -> int:
        """The newest state version among the run's active peers (-1 when none is known, or
        the DHT cannot be read), not those of :attr:`other_settings_peers`."""

        async def read(node: Node) -> int:
            active = await self._active_members(node)
            others = self.other_settings_peers  # (noted from these memberships)
            return max((v for p, v in active.items() if p not in others), default=-1)

        try:
            return self.node_thread.run(read, timeout_s=15)
        except GossamerError:
            return -1

    def _set_membership(self, state: str, version: int) -> None:
        key = _members_key(self.config.run_id)
        at = self._clock.wall() + self._correction_s
        if self._joined_at is None and state != "left":
            self._joined_at = at
        record: dict[str, Any] = {
            "state": state,
            "version": version,
            "inc": self.incarnation,
            "at": at,
        }
        if self.settings:  # (see other_settings_peers)
            record["cfg"] = self.settings
        value = json.dumps(record).encode()

        async def put(node: Node) -> None:
            await node.dht.put(key, value, _ENTRY_TTL_S)

        try:
            self.node_thread.run(put, timeout_s=15)
        except GossamerError as exc:
            logger.warning(
                "peer %s could not publish that it is %s: %s", self.peer_id[:8], state, exc
            )

    async def _memberships(self, node: Node) -> dict[str, tuple[str, int, str]]:
        """Every peer's latest membership record: (state, version, incarnation).

        The active ones are watched from here on: a peer that reads the run (a newcomer
        catching up, say) knows which of them are gone by its first round, instead of waiting
        for each there until the failure detector's timeout (a SIGKILLed peer's record says
        active for minutes).

        A peer that left before this one joined the run (its record says when) is left out,
        with whatever it published (see :attr:`left_before_joining`): it is of an earlier run
        of the same name, or one that ended before this peer came, and no round this peer
        forms is its. Its records live on for minutes after it left: a run started again
        under the name on a node still standing found every round it formed closed by the
        earlier run's entries, missed it, and formed it again as the next attempt, at the
        next boundary: half its outer steps.
        """
        found: dict[str, tuple[str, int, str]] = {}
        left_before: set[str] = set()
        other_settings: set[str] = set()
        for publisher, value in await read_json_records(node, _members_key(self.config.run_id)):
            try:
                found[publisher] = (str(value["state"]), int(value["version"]), str(value["inc"]))
                at = float(value.get("at", math.nan))
            except (KeyError, TypeError, ValueError, OverflowError):  # (int of an inf)
                continue
            if publisher != node.peer_id and self._settings_differ(value):
                other_settings.add(publisher)
            joined_at = self._joined_at
            if joined_at is None:
                continue
            if found[publisher][0] != "left":
                self._seen_in_run.add(publisher)
            # (a peer never seen in the run that left up to a clock tolerance after this one
            # joined: this peer's join time is in its own clock, uncorrected before its first
            # round, and one a few seconds behind counted an earlier run's peer as its run's)
            tolerance_s = 0.0 if publisher in self._seen_in_run else self._tolerance_s
            if found[publisher][0] == "left" and at < joined_at + tolerance_s:
                del found[publisher]  # (a NaN, from a peer of before, compares False: kept)
                left_before.add(publisher)
        if left_before != self.left_before_joining:
            self.left_before_joining = frozenset(left_before)
        self._members_of_other_settings = frozenset(other_settings)
        self._note_other_settings()
        for peer, (state, _, _) in found.items():
            if state == "active" and peer != node.peer_id:
                node.detector.watch(peer)
        return found

    async def _active_members(self, node: Node) -> dict[str, int]:
        """The run's other active peers and the state version each published."""
        return {
            peer: version
            for peer, (state, version, _) in (await self._memberships(node)).items()
            if state == "active" and peer != node.peer_id
        }

    @staticmethod
    async def _records_by_publisher(
        node: Node, key: bytes, field: str, seen: dict[str, dict[str, Any]] | None = None
    ) -> dict[str, tuple[float, str]]:
        """(``field``, incarnation) of every record under ``key`` with a finite number.

        With ``seen``, each such record is put there whole: its other fields (the bandwidth
        figure, the store address) are read from the same record as the field, so whoever
        counts a member knows the same figures.
        """
        found: dict[str, tuple[float, str]] = {}
        # Only records on replicas: one that only its publisher holds (killed during its put)
        # would be counted by the members that asked it and not by the others.
        for publisher, value in await read_json_records(node, key, replicated_only=True):
            try:
                number, inc = float(value[field]), str(value["inc"])
            except (KeyError, TypeError, ValueError, OverflowError):  # (float of 10**400)
                continue
            if math.isfinite(number):
                found[publisher] = (number, inc)
                if seen is not None:
                    seen[publisher] = value
        return found

    async def _read_round(
        self,
        node: Node,
        keys: Sequence[tuple[bytes, str]],
        seen: dict[str, dict[str, Any]] | None = None,
    ) -> tuple[dict[str, tuple[str, int, str]], list[dict[str, float]]]:
        """The memberships and, for every (key, field), the current incarnations' records.

        The reads run at once (one round trip instead of several); a record counts only if it
        was written by the incarnation the publisher's membership names, so what a killed
        process left on the DHT is ignored after its restart. ``seen`` collects the round
        entries whole (those of the ``at`` reads).
        """
        reads = asyncio.gather(
            *(self._records_by_publisher(node, k, f, seen if f == "at" else None) for k, f in keys)
        )
        memberships, raw = await asyncio.gather(self._memberships(node), reads)
        incarnations = {p: inc for p, (_, _, inc) in memberships.items()}
        incarnations[node.peer_id] = self.incarnation
        self._note_versions(node, memberships)
        current = [
            {p: number for p, (number, inc) in found.items() if inc == incarnations.get(p)}
            for found in raw
        ]
        return memberships, current

    def _note_versions(self, node: Node, memberships: dict[str, tuple[str, int, str]]) -> None:
        joining = {
            peer: version
            for peer, (state, version, _) in memberships.items()
            if state == "joining" and peer != node.peer_id
        }
        for peer in joining:
            node.detector.watch(peer)  # one that dies while joining must not be waited for
        self.joining = {p: v for p, v in joining.items() if self._alive(node, p)}
        self.newest_seen_version = max(
            (
                version
                for peer, (state, version, _) in memberships.items()
                if state == "active"
                and peer != node.peer_id
                and peer not in self.other_settings_peers
            ),
            default=-1,
        )

    @property
    def _tolerance_s(self) -> float:
        """How far apart two peers' clocks may be (see
        :attr:`SwarmAveragerConfig.clock_tolerance_s`)."""
        return self.config.clock_tolerance_s or self.config.join_window_s

    def _this_run_s(self, node: Node, stamps: dict[str, float]) -> dict[str, float]:
        """``stamps`` (a round's entries or closes, by writer) less those of an earlier run of
        the same name: stamped before this peer joined the run by a writer the failure
        detector has not heard answer (gone, or not one answer since it was watched).

        A killed peer of an earlier run leaves no 'left' (see :attr:`left_before_joining`):
        its membership says active for minutes, and its entries and closes closed every round
        of the run started again under the name before its peer came; it missed each, and
        formed it again as the next attempt at its next boundary: half the outer steps. A
        newcomer's case stands: the entries of the round in progress when it joined are
        stamped before, by writers alive that answer, and count once they have (this peer
        reads them again while it waits for those writers, as it awaits them).
        """
        joined_at = self._joined_at
        if joined_at is None:
            return stamps
        return {
            p: at
            for p, at in stamps.items()
            if at >= joined_at or p == node.peer_id or self._answered(node, p)
        }

    @staticmethod
    def _answered(node: Node, peer_id: str) -> bool:
        """Whether the failure detector heard ``peer_id`` answer since it was watched (or came
        back), and does not report it gone."""
        liveness = node.detector.liveness(peer_id)
        return (
            liveness is not None
            and liveness.alive
            and liveness.last_answer_s > liveness.changed_at_s
        )

    def _note_other_settings(self) -> None:
        """Update :attr:`other_settings_peers` from round entries and memberships."""
        peers = self._members_of_other_settings | frozenset(self.other_settings)
        if peers != self.other_settings_peers:
            self.other_settings_peers = peers

    @staticmethod
    def _alive(node: Node, peer_id: str) -> bool:
        liveness = node.detector.liveness(peer_id)
        return liveness is None or liveness.alive
