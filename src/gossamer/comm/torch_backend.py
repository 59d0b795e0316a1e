"""The torch.distributed backend: the same averaging API over a gloo (CPU) or NCCL (GPU) group.

Where every member reaches every other directly (one site, one cluster), the existing engine
does the work. A process group is made for the agreed group (rendezvous at the leader's
``TCPStore``, on a port the leader picked) and torn down and made again when membership changes.
Each :class:`TorchGroupAverager` holds a process group of its own, not torch.distributed's
default one, so several peers may share a process (and a program may keep its own default
group beside). Its calls block: run them in a thread, never on the event loop.

torch.distributed's store and gloo's connections are plain TCP without authentication, as in
any torch.distributed job: ``auto`` picks this backend only where every member's address is on
a loopback or private network (:func:`site_local`), and the leader's store listens on its
advertised address only.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch._C._distributed_c10d import Backend, PrefixStore, Store, TCPStore

from gossamer.comm.report import AllReduceReport, AllReduceResult, PartOutcome, PartReport
from gossamer.comm.transport import WEIGHT_RANGE, weight_in_range
from gossamer.core.errors import DeadlineExceededError, PeerLostError
from gossamer.net.addresses import ip_of

__all__ = [
    "RetiredRendezvous",
    "TorchGroupAverager",
    "choose_backend",
    "layout_signature",
    "open_leader_store",
    "open_member_store",
    "site_local",
]

_log = logging.getLogger(__name__)
_MAX_RETIRED = 64
"""At most this many failed rendezvous' keys wait for their members' timeout to be deleted."""


def choose_backend(requested: str, addresses: Sequence[str]) -> str:
    """``torch`` or ``p2p``: ``auto`` picks torch when every member's address (a literal host)
    is on a loopback or private network (:func:`site_local`), all on loopback or none (the
    members of a group with some on loopback are not on one machine, and cannot all meet).
    It picked torch for any addresses, public ones included: gloo's unauthenticated TCP
    between hosts on the internet."""
    if requested not in ("auto", "p2p", "torch"):
        raise ValueError(f"backend must be auto, p2p or torch, got {requested!r}")
    if requested != "auto":
        return requested
    if not addresses or not all(map(site_local, addresses)):
        return "p2p"
    loopback = [(ip := ip_of(a)) is not None and ip.is_loopback for a in addresses]
    return "torch" if all(loopback) or not any(loopback) else "p2p"


def layout_signature(tensors: Sequence[torch.Tensor]) -> str:
    """A short hex digest of the tensors' shapes, in order: members whose digests differ hold
    other tensors (another model), and averaging them would mix unrelated values. Dtypes are
    left out, as the p2p path's round id leaves them out: every value is averaged in float32,
    so a member in bfloat16 beside one in float32 averages the same model."""
    text = "/".join(str(tuple(t.shape)) for t in tensors)
    return hashlib.blake2b(text.encode(), digest_size=7).hexdigest()  # (an int64 holds 7 bytes)


def site_local(host: str) -> bool:
    """Whether ``host`` is a loopback or private address (RFC 1918, RFC 4193, link-local).

    Names are not resolved: only a literal address counts, so the answer is the same on every
    member that reads it.
    """
    ip = ip_of(host)
    return ip is not None and (ip.is_loopback or ip.is_private or ip.is_link_local)


def open_leader_store(host: str, world_size: int, timeout_s: float) -> TCPStore:
    """The leader's store on a free port of ``host`` (read it back from ``.port`` and tell the
    members).

    It listens on ``host`` only: left to itself a ``TCPStore`` listens on every interface of the
    machine, so anyone reaching any of them could write the rendezvous keys.

    Raises:
        OSError: ``host`` is not an address of this machine (a container's or a port mapping's
            advertised address): no store could be reached there anyway.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind((host, 0))
        listener.listen(socket.SOMAXCONN)
        port = listener.getsockname()[1]
        fd = listener.detach()  # the store's from here on (it closes it)
    return TCPStore(
        host,
        port,
        world_size,
        is_master=True,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
        master_listen_fd=fd,
    )


def open_member_store(host: str, port: int, world_size: int, timeout_s: float) -> TCPStore:
    """A member's connection to the leader's store."""
    try:
        return TCPStore(
            host, port, world_size, is_master=False, timeout=datetime.timedelta(seconds=timeout_s)
        )
    except (RuntimeError, ValueError, OSError, dist.DistStoreError) as exc:
        raise PeerLostError(f"cannot reach the group leader's store at {host}:{port}") from exc


def _gloo_group(
    store: Store, rank: int, size: int, timeout: datetime.timedelta, host: str
) -> Backend:
    """A gloo group of its own (not torch.distributed's default) listening on ``host``.

    These are the options ``init_process_group`` gives gloo, under the names torch's own
    code uses (its type stubs name them otherwise).
    """
    gloo = dist.ProcessGroupGloo
    options: Any = gloo._Options()  # type: ignore[attr-defined]
    options._timeout = timeout
    options._devices = [gloo.create_device(hostname=host) if host else gloo.create_default_device()]
    return gloo(store, rank, size, options)


def _delete_keys(store: Store, size: int) -> None:
    """Delete a gloo group's rendezvous keys (each rank's address on device 0) from ``store``."""
    try:
        for rank in range(size):
            store.delete_key(f"0/{rank}")
    except (RuntimeError, dist.DistError) as exc:  # the store's own failure: nothing to do
        _log.debug("deleting a rendezvous' keys: %s", exc)


def _scale_(tensor: torch.Tensor, scale: float) -> None:
    """``tensor *= scale`` in place; on CPU in one thread, as numpy does. A scale of 0 makes
    exact zeros: a weight-0 member's values are in no average, and 0 x NaN (or inf) is NaN,
    which the all-reduce then spread to every member.

    torch's ``mul_`` splits the pass over its OpenMP threads, whose spinning after the pass
    takes CPU from gloo's transfer that follows; the pass is memory-bound, so one thread is
    as fast and costs a third less CPU (9 ms instead of 14 ms for 100 MB here).
    """
    if scale == 1.0:
        return
    cpu_float32 = tensor.device.type == "cpu" and tensor.dtype == torch.float32
    if cpu_float32 and tensor.is_contiguous():
        values = tensor.detach().numpy()
        if scale == 0.0:
            values.fill(0.0)
        else:
            np.multiply(values, np.float32(scale), out=values)
    elif scale == 0.0:
        tensor.zero_()
    else:
        tensor.mul_(scale)


class RetiredRendezvous:
    """Rendezvous keys of a leader's failed groups, each deleted once its members' timeout
    passed (thread-safe: an averager given up on may still add to it from its thread).

    Args:
        clock: monotonic seconds.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._due: deque[tuple[float, Store, int]] = deque()
        self._lock = threading.Lock()

    def add(self, store: Store, size: int, timeout_s: float) -> None:
        """Delete the keys of a group of ``size`` in ``store`` once ``timeout_s`` passed (at
        once, past the most kept)."""
        with self._lock:
            self._due.append((self.clock() + timeout_s, store, size))
            overflow = [self._due.popleft() for _ in range(len(self._due) - _MAX_RETIRED)]
        for _, old_store, old_size in overflow:
            _delete_keys(old_store, old_size)

    def delete_due(self) -> None:
        """Delete the keys whose time came."""
        now = self.clock()
        with self._lock:
            due = []
            while self._due and self._due[0][0] <= now:
                due.append(self._due.popleft())
        for _, store, size in due:
            _delete_keys(store, size)

    def __len__(self) -> int:
        with self._lock:
            return len(self._due)


class TorchGroupAverager:
    """Averages tensors over a torch.distributed group re-made for each membership.

    Args:
        timeout_s: deadline of the rendezvous and of each collective.
        retired: where the keys of this averager's failed rendezvous wait to be deleted; share
            one among the averagers that take each other's place on one store (a round given
            up on ends in an averager nobody uses again).
    """

    def __init__(self, timeout_s: float = 60.0, retired: RetiredRendezvous | None = None) -> None:
        self.timeout_s = timeout_s
        self.retired = retired if retired is not None else RetiredRendezvous()
        self._group_hash: str | None = None
        self.members: tuple[str, ...] = ()
        self.rank = -1
        self._buffer: torch.Tensor | None = None
        self.groups_made = 0
        """Process groups made so far (one per membership)."""
        self._pg: Any = None
        """The group's gloo or NCCL backend (torch's stubs give Backend no collectives)."""
        self._rendezvous: tuple[Store, int] | None = None
        """On the leader (rank 0) of a gloo group: the group's keys in its store, and the
        group's size, until they are deleted (see :meth:`_forget_rendezvous`)."""

    def ensure_group(
        self, group_hash: str, members: Sequence[str], rank: int, store: Store, host: str = ""
    ) -> None:
        """Join the group named ``group_hash``; tears down the old one if membership changed.

        Args:
            group_hash: the group's name, the same on every member (it prefixes the store's keys).
            members: the group's members, in rank order.
            rank: this member's index in ``members``.
            store: the leader's store (the leader's own, on the leader).
            host: the address gloo listens on and tells the others (empty: the machine's
                default interface, as torch.distributed picks it).

        Raises:
            DeadlineExceededError: the others did not all come within ``timeout_s``.
        """
        if group_hash == self._group_hash:
            return
        self.close()
        prefixed = PrefixStore(f"gossamer/{group_hash}", store)
        timeout = datetime.timedelta(seconds=self.timeout_s)
        try:
            if torch.cuda.is_available():
                nccl = dist.ProcessGroupNCCL
                options = nccl.Options()
                options._timeout = timeout  # as init_process_group sets it (else NCCL's 10 min)
                self._pg = nccl(prefixed, rank, len(members), options)
            else:
                if rank == 0:
                    self._rendezvous = (prefixed, len(members))
                self._pg = _gloo_group(prefixed, rank, len(members), timeout, host)
        except (RuntimeError, dist.DistError, MemoryError) as exc:
            # (MemoryError too: the members' addresses in the store come unchecked over plain
            # TCP, and gloo makes std::bad_alloc of one it misreads)
            self._retire_rendezvous()
            raise DeadlineExceededError(f"torch.distributed rendezvous failed: {exc}") from exc
        self._group_hash, self.members, self.rank = group_hash, tuple(members), rank
        self.groups_made += 1
        _log.info(
            "torch.distributed %s group of %d made (rank %d)",
            "nccl" if torch.cuda.is_available() else "gloo",
            len(members),
            rank,
        )

    @property
    def group_hash(self) -> str | None:
        """The name of the group held now (None when none is)."""
        return self._group_hash

    def close(self) -> None:
        """Tear the group down (idempotent)."""
        self._retire_rendezvous()  # (a group whose first collective never went through)
        pg, self._pg = self._pg, None
        if pg is not None:
            try:
                pg.shutdown()
            except (RuntimeError, dist.DistError) as exc:  # a broken group: nothing left to do
                _log.debug("closing the torch.distributed group: %s", exc)
        self._buffer = None
        self._group_hash, self.members, self.rank = None, (), -1

    def _forget_rendezvous(self) -> None:
        """On the leader, once a collective went through (every member joined): delete the
        group's rendezvous keys (each member's address, about 200 bytes) from its store, which
        lives as long as the peer: else a swarm whose members come and go left a set in it for
        every group ever made. The keys of a group that never completed a collective stay
        until its members' timeout (:meth:`_retire_rendezvous`): a member still in that
        rendezvous would wait for them to its timeout instead of failing at once against the
        closed group (and keep its next rounds off torch meanwhile)."""
        rendezvous, self._rendezvous = self._rendezvous, None
        if rendezvous is not None:
            _delete_keys(*rendezvous)
        self.retired.delete_due()

    def _retire_rendezvous(self) -> None:
        """The leader's group never completed a collective: its keys are deleted once no
        member can still be in its rendezvous (``timeout_s`` from now), at the next group or
        collective of an averager sharing ``retired``. Kept for ever, a swarm whose rounds
        kept failing (a member killed mid-round each time) left a set for every group tried."""
        rendezvous, self._rendezvous = self._rendezvous, None
        if rendezvous is not None:
            self.retired.add(*rendezvous, self.timeout_s)
        self.retired.delete_due()

    def _agree(self, tensors: Sequence[torch.Tensor], weight: float, numel: int) -> list[float]:
        """Every member's weight, in rank order, once every member is found to hold tensors of
        the same layout (one small all-gather before the data moves; also a liveness check).

        Raises:
            PeerLostError: a member failed, or holds other tensors. gloo checks nothing of the
                kind: a member with more values than another ended both processes (a C++
                exception on gloo's thread, no Python handler ran), one with the same number
                in another order averaged unrelated values without a word. The group is
                closed either way; the swarm runs such a round over p2p, whose round id hashes
                the layout, so the members holding other tensors drop each other.
        """
        layout = layout_signature(tensors)
        weight_bits = torch.tensor([weight], dtype=torch.float64).view(torch.int64)
        mine = torch.cat([torch.tensor([numel, int(layout, 16)], dtype=torch.int64), weight_bits])
        if torch.cuda.is_available():
            mine = mine.cuda()
        rows = [torch.empty_like(mine) for _ in self.members]
        self._collective(lambda pg: pg.allgather([rows], [mine]))
        table = torch.stack(rows).cpu()
        for rank, (their_numel, their_layout) in enumerate(table[:, :2].tolist()):
            if (their_numel, their_layout) != (numel, int(layout, 16)):
                member = self.members[rank]
                self.close()
                raise PeerLostError(
                    f"the members do not average the same tensors: {member[:8]} "
                    f"holds {their_numel} values (layout {their_layout:x}), this member "
                    f"{numel} (layout {layout}); every member must average tensors of the same "
                    "shapes in the same order (the same model)"
                )
        return [float(w) for w in table[:, 2].contiguous().view(torch.float64).tolist()]

    def _all_reduce(self, tensor: torch.Tensor) -> None:
        self._collective(lambda pg: pg.allreduce([tensor]))

    def _collective(self, start: Callable[[Any], Any]) -> None:
        """Run the collective ``start(pg)`` begins and wait for it.

        Raises:
            PeerLostError: it failed (a member gone); the group is closed.
        """
        pg = self._pg
        if pg is None:
            raise ValueError("no group: call ensure_group first")
        try:
            start(pg).wait()
            self._forget_rendezvous()  # every member has joined: the keys are not read again
        except (RuntimeError, dist.DistError) as exc:
            self.close()
            raise PeerLostError(f"torch.distributed collective failed: {exc}") from exc

    def _staging(self, numel: int, device: torch.device) -> torch.Tensor:
        """A flat float32 buffer re-used across rounds (fresh pages cost more than the copy)."""
        buffer = self._buffer
        if buffer is None or buffer.numel() != numel or buffer.device != device:
            buffer = self._buffer = torch.empty(numel, dtype=torch.float32, device=device)
        return buffer

    def _check_round(self, tensors: Sequence[torch.Tensor], weight: float) -> torch.device:
        """The group's device, once the arguments of a round are checked.

        Raises:
            ValueError: no group, no tensors, or a weight neither 0 nor within
                ``WEIGHT_RANGE`` (as the p2p backend: it rides in float32, where 1e39 raised
                on this member alone and left the others waiting in the collective).
        """
        if self._group_hash is None:
            raise ValueError("no group: call ensure_group first")
        if not tensors:
            raise ValueError("nothing to average: the tensor list is empty")
        if not weight_in_range(weight):
            raise ValueError(
                f"weight must be 0 or within {WEIGHT_RANGE[0]:g}..{WEIGHT_RANGE[1]:g}, got {weight}"
            )
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

    def average_(self, tensors: Sequence[torch.Tensor], weight: float = 1.0) -> AllReduceReport:
        """Replace ``tensors`` by their weighted average across the group, in place.

        This is the same work as ``dist.all_reduce`` on the tensors plus the scaling: the
        members first gather each other's weights and check that they hold the same tensors
        (one tiny all-gather), each member scales its values by ``weight / total`` and the sum
        of the scaled values is the average (a weight-0 member's are exact zeros, whatever they
        held: NaN times 0 made every member's average NaN). One float32 contiguous tensor on
        the group's device is reduced where it lies; anything else goes through a staging
        buffer re-used across rounds.

        Raises:
            PeerLostError: a member failed during the collective, or holds other tensors (the
                group must be re-made). After a failure in the data's collective ``tensors``
                hold partial results (scaled, perhaps partly reduced): a caller that must run
                the round again on its own values keeps a copy, or calls :meth:`average`,
                which leaves its inputs alone.
        """
        device = self._check_round(tensors, weight)
        started = time.perf_counter()
        numel = sum(t.numel() for t in tensors)
        weights = self._agree(tensors, weight, numel)
        total_weight = sum(weights)  # the same on every member (the same list, the same order)
        if total_weight > 0:
            scale = weight / total_weight
            only = tensors[0]
            direct = (
                len(tensors) == 1
                and only.dtype == torch.float32
                and only.is_contiguous()
                and only.device == device
            )
            if direct:
                with torch.no_grad():
                    _scale_(only, scale)
                    self._all_reduce(only)
            else:
                flat = self._staging(numel, device)
                offset = 0
                for t in tensors:
                    flat[offset : offset + t.numel()].copy_(t.detach().reshape(-1))
                    offset += t.numel()
                _scale_(flat, scale)
                self._all_reduce(flat)
                offset = 0
                with torch.no_grad():
                    for t in tensors:
                        t.copy_(flat[offset : offset + t.numel()].reshape(t.shape))
                        offset += t.numel()
        # else no weight anywhere: nothing is averaged, each member keeps its own values, as in
        # :meth:`average` and the p2p path (every member skips the collective alike)
        report = self._report(numel, weights)
        report.total_s = report.reduce_scatter_s = time.perf_counter() - started
        return report

    def average(self, tensors: Sequence[torch.Tensor], weight: float = 1.0) -> AllReduceResult:
        """Weighted average of ``tensors`` across the group as new tensors (blocks; thread it).

        The members gather each other's weights and check that they hold the same tensors (one
        tiny all-gather); one all-reduce of the values scaled by ``weight / total`` then makes
        the weighted average (scaled first, a sum of values times weights up to 1e12 did not
        overflow float32 where the average is finite). A weight-0 member sends exact zeros,
        whatever its values hold. Leaves ``tensors`` untouched. Where the weights sum to zero
        each member keeps its own values, as in the p2p path.

        Raises:
            PeerLostError: a member failed during the collective, or holds other tensors (the
                group must be re-made).
        """
        device = self._check_round(tensors, weight)
        started = time.perf_counter()
        numel = sum(t.numel() for t in tensors)
        weights = self._agree(tensors, weight, numel)
        total = sum(weights)
        with torch.no_grad():
            if total > 0:
                flat = self._staging(numel, device)
                scale = weight / total
                offset = 0
                for t in tensors:
                    values, into = t.detach().reshape(-1), flat[offset : offset + t.numel()]
                    if scale == 0.0:  # (0 x NaN is NaN: a weight-0 member sends zeros)
                        into.zero_()
                    elif values.device == into.device:
                        torch.mul(values, scale, out=into)
                    else:  # a CPU tensor on a GPU host: staged onto the group's device first
                        into.copy_(values).mul_(scale)
                    offset += t.numel()
                self._all_reduce(flat)
                out = []
                offset = 0
                for t in tensors:
                    mean = flat[offset : offset + t.numel()].reshape(t.shape)
                    # (a copy: the staging buffer is the next round's)
                    out.append(mean.to(device=t.device, dtype=t.dtype, copy=True))
                    offset += t.numel()
            else:  # no weight anywhere: nothing was averaged, each member keeps its own values
                out = [t.detach().clone() for t in tensors]
        report = self._report(numel, weights)
        report.total_s = report.reduce_scatter_s = time.perf_counter() - started
        return AllReduceResult(out, report)

    def _report(self, numel: int, weights: Sequence[float]) -> AllReduceReport:
        """The report of one all-reduce of ``numel`` float32 values over the whole group, whose
        members' weights were ``weights`` (rank order).

        The contributors are the members with a weight, as on the p2p path; with none the
        values stayed where they were (``kept_local``) and nothing was sent. Bytes are the
        ring algorithm's share per member, 2(N-1)/N of the tensor each way (gloo reports none
        of its own).
        """
        assert self._group_hash is not None
        n = len(self.members)
        contributors = [m for m, w in zip(self.members, weights, strict=True) if w > 0]
        wire = 2 * (n - 1) * numel * 4 // max(n, 1) if contributors else 0
        report = AllReduceReport(
            round_id=self._group_hash,
            peer_id=self.members[self.rank],
            members=list(self.members),
            codec="none",
            bytes_sent=wire,
            bytes_received=wire,
            fp32_bytes_sent=wire,
        )
        report.parts = [
            PartReport(
                index=0,
                owner="torch.distributed",
                reducer="torch.distributed",
                num_elements=numel,
                outcome=PartOutcome.AVERAGED if contributors else PartOutcome.KEPT_LOCAL,
                contributors=contributors,
            )
        ]
        return report
