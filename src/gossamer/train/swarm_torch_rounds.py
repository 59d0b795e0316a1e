"""The torch.distributed path of a swarm averager's rounds: whether a round's members make
a group (decided alike from their round entries), the group's rendezvous and collective in a
thread of their own, and giving it up for the peer-to-peer path when a member is lost.

:class:`_TorchRounds` is the part of :class:`~gossamer.train.swarm_averager.SwarmAverager`
that does this; see that module's docstring."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch._C._distributed_c10d import Store

from gossamer.comm.allreduce import AllReduceConfig
from gossamer.comm.plan import ROUND_KEY_TAG_NBYTES, round_key_tag
from gossamer.comm.report import AllReduceResult
from gossamer.comm.torch_backend import (
    RetiredRendezvous,
    TorchGroupAverager,
    open_leader_store,
    open_member_store,
    site_local,
)
from gossamer.comm.transport import CommMailbox, Frame, FrameKind, pack_frame
from gossamer.core.errors import (
    DeadlineExceededError,
    GossamerError,
    NotInRoundError,
    PeerLostError,
    ProtocolError,
)
from gossamer.net.addresses import host_of, ip_of, join_host_port, port_of
from gossamer.net.node import Node
from gossamer.train.swarm_membership import _RunMembership
from gossamer.train.swarm_round_records import _Formed

logger = logging.getLogger(__name__)

_MAX_TORCH_SKIP_ROUNDS = 64
"""Most rounds a peer sends over p2p after torch.distributed failures in a row."""


@dataclass(frozen=True, slots=True)
class _TorchPlan:
    """How this peer joins a round's torch.distributed group."""

    name: str
    """The group's name: the held one when every member holds it, else a new one."""
    members: tuple[str, ...]
    rank: int
    leader_address: tuple[str, int]
    """(host, port) of the rendezvous store (the first member's)."""


def _torch_round_id(key: str, plan: _TorchPlan) -> bytes:
    """The mailbox's id of a torch.distributed round: the key's tag (see
    :func:`~gossamer.comm.plan.round_key_tag`), then a hash of the group's name and members,
    which every member of the plan computes alike."""
    digest = hashlib.sha256(b"gossamer.swarm.torch-round/")
    for item in (plan.name, *plan.members):
        digest.update(len(item).to_bytes(8, "little") + item.encode())
    return round_key_tag(key) + digest.digest()[: 16 - ROUND_KEY_TAG_NBYTES]


class _TorchPresence:
    """A torch.distributed round's place in the mailbox, under the round's key.

    Each member tells the others that it is in the round (a PRESENT frame under
    :func:`_torch_round_id`). A member that runs no round of the key (it averaged alone, its
    clock apart) or is in another group's refuses it at once, so this one stops waiting for
    it instead of waiting the torch timeout at the rendezvous or in the collective. While
    open, the round refuses other groups' p2p rounds of the key, as a settled key does.
    """

    def __init__(self, mailbox: CommMailbox, round_id: bytes) -> None:
        self.mailbox = mailbox
        self.round_id = round_id
        self.refused: dict[str, str] = {}
        """Members that refused this one's word, with their reason."""
        self._tasks: list[asyncio.Task[None]] = []

    async def handle(self, sender: str, frame: Frame, body: memoryview) -> None:
        """Take another member's word; a torch round has no other message."""
        if frame.kind is not FrameKind.PRESENT:
            raise ProtocolError(f"a torch.distributed round takes no {frame.kind.name} message")

    def open(self, members: Sequence[str], me: str, timeout_s: float) -> None:
        """Open the round in the mailbox and tell every other member (in the background)."""
        self.mailbox.open_round(self.round_id, self)
        word = pack_frame(Frame(FrameKind.PRESENT, self.round_id, 0, 0, members.index(me), 0.0))
        loop = asyncio.get_running_loop()
        for peer in members:
            if peer != me:
                self._tasks.append(loop.create_task(self._tell(peer, word, timeout_s)))

    async def _tell(self, peer: str, word: bytes, timeout_s: float) -> None:
        try:
            await self.mailbox.transport.send(peer, word, timeout_s=timeout_s)
        except NotInRoundError as exc:
            self.refused[peer] = str(exc)
        except GossamerError as exc:  # gone, late or busy: the detector and timeouts decide
            logger.debug("telling %s of torch round %s failed: %s", peer[:8], self.round_id, exc)

    def close(self) -> None:
        """Stop telling and close the round (later words of it are dropped)."""
        for task in self._tasks:
            task.cancel()
        self.mailbox.close_round(self.round_id)


def _forces_torch(entry: dict[str, Any], host: str) -> bool:
    """Whether the entry's peer takes the torch backend on any address (``backend = "torch"``),
    not only on private ones (``auto``). Its entry says so (``bk``); one of a version before
    that says it only by a store address that is not site-local, which no peer on ``auto``
    publishes."""
    return entry.get("bk") == "torch" or ("bk" not in entry and not site_local(host))


def _store_address(entry: dict[str, Any]) -> tuple[str, int] | None:
    """The (host, port) of a round entry's store address, or None where it is not one.

    Entries come from other peers: only a literal IP address and a port in 1..65535 count (a
    name would be resolved differently by different members, and a malformed one must not
    crash the members that read it)."""
    address = entry.get("tcp", "")
    if not isinstance(address, str):
        return None
    try:
        host, number = host_of(address), port_of(address)
    except ValueError:
        return None
    if ip_of(host) is None or number == 0:
        return None
    return host, number


def _torch_kind() -> str:
    """The kind of group this peer's torch backend makes (see :class:`TorchGroupAverager`)."""
    return "nccl" if torch.cuda.is_available() else "gloo"


class _TorchRounds(_RunMembership):
    """The torch.distributed rounds of a :class:`~gossamer.train.swarm_averager.SwarmAverager`."""

    # Set by SwarmAverager.__init__ (see there).
    _allreduce_config: AllReduceConfig
    _mailbox: CommMailbox | None
    torch_failures: int
    _torch_failures_in_a_row: int
    _torch_rounds_to_skip: int
    _torch: TorchGroupAverager | None
    _retired_rendezvous: RetiredRendezvous
    _abandoned_torch: list[threading.Thread]
    _store: Store | None
    _store_address: str
    _leader_stores: dict[tuple[str, int], Store]
    _torch_host: str

    def _open_torch_store(self) -> None:
        """Open this peer's rendezvous store where the torch backend may be chosen."""
        if self.config.backend == "p2p" or self.config.codec != "none":
            return
        host = host_of(self.node_thread.node.addresses[0])
        if self.config.backend == "auto" and not site_local(host):
            logger.info("peer %s: %s is not site-local: rounds go over p2p", self.peer_id[:8], host)
            return
        timeout_s = self._torch_timeout_s
        try:
            self._store = open_leader_store(host, 1, timeout_s)
        except (OSError, RuntimeError) as exc:  # DistError is a RuntimeError
            logger.warning(
                "peer %s: cannot listen for torch.distributed rendezvous at %s (%s), the first "
                "address this peer advertises: rounds go over p2p (advertise an address of "
                "this machine first to use the torch backend)",
                self.peer_id[:8],
                host,
                exc,
            )
            return
        self._store_address = join_host_port(host, self._store.port)
        self._torch_host = host
        self._torch = TorchGroupAverager(timeout_s=timeout_s, retired=self._retired_rendezvous)

    @property
    def _torch_timeout_s(self) -> float:
        """Deadline of a torch.distributed rendezvous and collective: half the round's, so the
        round can still run again over p2p when the group fails."""
        return self.config.round_timeout_s / 2

    def _torch_plan(
        self, node: Node, key: str, round_: _Formed, deadline_s: float
    ) -> _TorchPlan | None:
        """The torch.distributed group of this round, or None where p2p does it.

        Decided from the members' round entries alone, so every member decides alike: p2p
        where the round's ``deadline_s`` (computed from the same entries, see
        :meth:`SwarmAverager._round_configs
        <gossamer.train.swarm_averager.SwarmAverager._round_configs>`) is past the floor
        ``round_timeout_s``: a torch attempt has half the floor whatever the links (its
        timeout is fixed when the group is made), so on links too slow for the floor, or with
        a member that measured nothing yet, it failed at that timeout and the round ran out
        (torch rounds measure nothing, so no later round came out of it). Over p2p the
        round has its whole deadline and measures the links, and once they are measured fast
        enough for the floor the rounds go back to torch. Otherwise torch
        when every member published a store address (site-local ones, unless every member's
        entry says ``torch``: one peer's own setting decided it for that peer alone; loopback
        ones only where all are) and every member makes the same kind of group (NCCL where it
        has a GPU, gloo where not: the two never meet in a rendezvous); the group held now is
        re-used when every member says it holds it and it has exactly these members, otherwise
        a new one is made, named by the round and its first member's stamp.
        """
        if self._torch is None:
            return None
        if deadline_s > self.config.round_timeout_s:
            logger.info(
                "peer %s round %s: its deadline (%.0f s, by its members' links) is past "
                "swarm.round_timeout_s (%.0f s): it goes over p2p, not torch.distributed",
                node.peer_id[:8],
                key,
                deadline_s,
                self.config.round_timeout_s,
            )
            return None
        entries = [round_.entries.get(p, {}) for p in round_.members]
        parsed = [_store_address(e) for e in entries]
        stores = [a for a in parsed if a is not None]
        hosts = [host for host, _ in stores]
        loopback = [(ip := ip_of(h)) is not None and ip.is_loopback for h in hosts]
        if (
            len(stores) < len(entries)
            or (
                not all(_forces_torch(e, h) for e, h in zip(entries, hosts, strict=True))
                and not all(map(site_local, hosts))
            )
            or (any(loopback) and not all(loopback))  # not one machine: they cannot all meet
            or len({str(e.get("dev", "")) for e in entries}) > 1  # NCCL beside gloo never meet
            # Other tensors (another model under the same run name): gloo would mix unrelated
            # values or end both processes; over p2p the round id tells them apart.
            or len({str(e.get("lay", "")) for e in entries} - {""}) > 1
        ):
            if self.config.backend == "torch":
                logger.warning(
                    "round %s: the members' entries do not all allow a torch.distributed group "
                    "(each needs a store address, the same device kind and the same tensors, "
                    "and public addresses need every member set to torch); the round goes over "
                    "p2p",
                    key,
                )
            return None
        held = {str(e.get("pg", "")) for e in entries}
        current = self._torch.group_hash
        if held == {current} and set(self._torch.members) == set(round_.members):
            assert current is not None  # an empty name is never held
            members = self._torch.members
            return _TorchPlan(current, members, self._torch.rank, stores[0])
        members = tuple(round_.members)
        name = f"{key}@{entries[0].get('at')!r}"
        return _TorchPlan(name, members, members.index(node.peer_id), stores[0])

    async def _torch_round(
        self,
        node: Node,
        plan: _TorchPlan,
        tensors: list[torch.Tensor],
        weight: float,
        p2p_key: str,
        presence: _TorchPresence,
    ) -> AllReduceResult | None:
        """The round over the torch.distributed group; None if it failed or a member went.

        The rendezvous and the collective run in a thread of their own, since gloo's cannot be
        interrupted: a member that dies without closing its connections (or the rendezvous'
        leader, dead before it opened the group) would hold them to their timeout, half the
        round's. Instead, once the failure detector reports a member gone the thread is left
        to end on its own (it closes its group) and a fresh averager takes its place; the
        caller runs the round again over p2p (``p2p_key``), which drops the gone member at
        once. So too when a message of that p2p round arrives during the rendezvous: its sender
        runs the round over p2p already (its rendezvous failed, or it formed another group) and
        never comes; and when a member refuses this one's word (``presence``: it runs no round
        of the key, having averaged alone, or another group's). A failed rendezvous or
        collective closes the group too (the others' collectives fail as well, at once where
        their connections to this peer close, else at gloo's timeout) and the caller runs the
        round over p2p, where messages wait for the members still in their collective (see
        :meth:`SwarmAverager._round_configs`).
        """
        averager = self._torch
        assert averager is not None
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[AllReduceResult | None] = loop.create_future()
        abandoned = threading.Event()
        meeting = threading.Event()
        """Set while the thread waits in the rendezvous for the others."""

        def settle(result: AllReduceResult | None, error: BaseException | None) -> None:
            if finished.done():
                return
            if error is not None:
                finished.set_exception(error)
            else:
                finished.set_result(result)

        handover = threading.Lock()
        """Held while the thread hands its outcome over or the loop abandons it: one or the
        other, never both (a result handed over is used, one not handed over is dropped)."""
        handed = False

        def attempt() -> None:
            nonlocal handed
            result: AllReduceResult | None = None
            error: BaseException | None = None
            try:
                if plan.name != averager.group_hash:
                    meeting.set()
                    store = self._store if plan.rank == 0 else None
                    if store is None:
                        store = self._leader_store(plan.leader_address, abandoned)
                    averager.ensure_group(
                        plan.name, plan.members, plan.rank, store, self._torch_host
                    )
                    meeting.clear()
                result = averager.average(tensors, weight)
            except (PeerLostError, DeadlineExceededError) as exc:
                averager.close()
                error = exc
            except BaseException as exc:  # anything else is a bug: raised in the round
                error = exc
            with handover:
                if abandoned.is_set():
                    averager.close()  # ended after the round gave up on it
                    return
                handed = True
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
                loop.call_soon_threadsafe(settle, result, error)

        thread = threading.Thread(target=attempt, name="gossamer-torch-round", daemon=True)
        thread.start()
        others = [p for p in plan.members if p != node.peer_id]
        gone: list[str] = []
        mailbox = self._mailbox
        assert mailbox is not None
        p2p_tag = round_key_tag(p2p_key)
        why = ""
        # The rendezvous and the collective each end by the torch timeout where gloo's timeout
        # fires; its timeout counts per receive, though, so a collective that stalls with
        # every member alive could run on past the round: it is given up at both timeouts.
        give_up_at = time.monotonic() + 2 * self._torch_timeout_s

        def give_up() -> bool:
            """Leave the thread to end on its own, unless it handed its outcome over already."""
            with handover:
                if not handed:
                    abandoned.set()
            return abandoned.is_set()

        try:
            while not finished.done():
                gone = [p for p in others if not self._alive(node, p)]
                if gone:
                    why = f"{', '.join(p[:8] for p in gone)} reported gone"
                elif presence.refused:
                    peer, reason = next(iter(presence.refused.items()))
                    why = f"{peer[:8]} is not in this round ({reason})"
                elif meeting.is_set() and mailbox.awaits_round_of_key(p2p_tag):
                    why = "a member runs it over p2p and never comes to the rendezvous"
                elif time.monotonic() >= give_up_at:
                    why = f"no outcome in {2 * self._torch_timeout_s:g} s"
                if why:
                    if give_up():
                        break
                    why = ""  # the outcome is on its way: take it
                await asyncio.wait([finished], timeout=self._allreduce_config.liveness_poll_s)
        except asyncio.CancelledError:  # the round's own deadline: leave the thread behind too
            if give_up():
                self._abandon_torch(thread, plan)
            raise
        if why:
            self._abandon_torch(thread, plan)
            logger.warning(
                "peer %s: torch.distributed round %s given up: %s; running it over p2p",
                self.peer_id[:8],
                plan.name,
                why,
            )
            return None
        try:
            result = finished.result()
        except (PeerLostError, DeadlineExceededError) as exc:
            self._leader_stores.pop(plan.leader_address, None)
            self.torch_failures += 1
            self._torch_failures_in_a_row += 1
            self._torch_rounds_to_skip = min(
                _MAX_TORCH_SKIP_ROUNDS, 2 ** (self._torch_failures_in_a_row - 1)
            )
            logger.warning(
                "peer %s: torch.distributed round %s failed (%s); running it over p2p",
                self.peer_id[:8],
                plan.name,
                exc,
            )
            return None
        self._torch_failures_in_a_row = 0
        return result

    def _abandon_torch(self, thread: threading.Thread, plan: _TorchPlan) -> None:
        """Leave a torch round's thread to end on its own (it closes its group when it does)
        and take a fresh averager, so no later round shares its group or staging buffer.
        Until the thread ends it may hold this peer's store (a rendezvous waiting on a gone
        member keeps the store's lock): rounds go over p2p meanwhile."""
        self._abandoned_torch.append(thread)
        self._torch = TorchGroupAverager(
            timeout_s=self._torch_timeout_s, retired=self._retired_rendezvous
        )
        self._leader_stores.pop(plan.leader_address, None)
        self.torch_failures += 1

    def _leader_store(self, address: tuple[str, int], abandoned: threading.Event) -> Store:
        """A connection to the store at ``address``, kept for later groups it leads (not if the
        round that opened it was ``abandoned`` meanwhile: it may be to a dead leader). Only the
        newest leader's is kept: connections to leaders of earlier groups (some long gone)
        would pile up as leaders change; a group still held keeps its own store alive."""
        store = self._leader_stores.get(address)
        if store is None:
            host, port = address
            store = open_member_store(host, port, 1, self._torch_timeout_s)
            if not abandoned.is_set():
                self._leader_stores.clear()
                self._leader_stores[address] = store
        return store
