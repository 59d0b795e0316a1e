"""State sync for newcomers: download the global state from several donors at once.

A newcomer asks every donor for its manifest, picks the version most donors agree on (newest on
a tie; two manifests of one version held by as many donors each are a tie settled at random), and
spreads chunk requests over the donors that hold exactly that manifest, sending each
next chunk to the donor expected to deliver it soonest (its requests in flight times its observed
latency). Every chunk is checked against the manifest's sha256 before it is kept; a donor that
sends a bad chunk, refuses, times out or drops is struck off and its chunks are fetched again from
the others. A donor is judged by its progress, not by how long one request took: its chunk
requests share its link (and ours) with every other request under way, so one stays in good
standing while it delivers a chunk within ``request_timeout_s`` plus the bytes under way at a
floor rate (eight 1 MiB chunks at once over 1 Mbit/s take 67 s each; a fixed 30 s struck every
donor off such a link and fetched nothing), never more than two minutes whatever its manifest
declares, and while it keeps up with that floor rate for its share of the requests under way
(one that trickles chunks slower is struck off, and the error says how fast it was). A donor
that is busy (its room for requests taken) is not struck off: it is asked again later,
after a backoff with jitter, within the download's deadline (for its manifest, within
``request_timeout_s``, as long as any donor may take to answer), and meanwhile its chunks go to
the others. The requests kept in flight follow how long chunks take (more while they come in
under half a donor's silence allowance, half as many once one takes over three quarters of it):
eight 1 MiB chunks at once over a newcomer's 0.25 Mbit/s took 268 s each, past the two minutes
a donor may be silent, and every honest donor was struck off for the newcomer's slowness. Once
one manifest is held by more than half of the donors, the others' answers are not waited for:
one hung donor among agreeing ones does not hold every download up for its request timeout.
Nothing received is unpickled, and every size and count is checked against
:class:`StateSyncLimits` before memory is allocated for it (a reply larger than the limits allow
is refused by net at its first chunk).

Donors live in :mod:`gossamer.train.state_sync_donor`, the message format in
:mod:`gossamer.train.state_sync_wire`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import statistics
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import cast

from gossamer.core.errors import (
    CorruptedDataError,
    DeadlineExceededError,
    GossamerError,
    PeerUnavailableError,
    ProtocolError,
)
from gossamer.train.state_sync_donor import BulkEndpoint, StateDonor
from gossamer.train.state_sync_requests import (
    _MAX_QUIET_S,
    _MIN_DONOR_BYTES_PER_S,
    _busy_backoff_s,
    _ChunkWindow,
    _Donor,
    _DonorBusyError,
    _Download,
    _ReplyRouter,
    _routers,
)
from gossamer.train.state_sync_wire import (
    Manifest,
    Request,
    RequestKind,
    StateSnapshot,
    StateSyncLimits,
    decode_manifest,
    deserialize_snapshot,
)

__all__ = [
    "DownloadReport",
    "StateDonor",
    "StateSnapshot",
    "StateSyncLimits",
    "download_state",
]

_log = logging.getLogger(__name__)
_EWMA_WEIGHT = 0.3
_HEDGE_FACTOR = 4.0
_MIN_HEDGE_S = 0.05
_QUIET_CHUNK_BYTES = 1 << 20
"""The most bytes of one chunk the quiet time allows for (donors' default chunk, see
:class:`StateDonor`): the chunk size is the donor's own declaration, larger ones get no more."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DownloadReport:
    """How a state download went."""

    version: int
    """The version downloaded."""
    total_bytes: int
    """Serialized state bytes."""
    seconds: float
    """Wall time from the first request to tensors in hand (the newcomer's time to state)."""
    bytes_per_donor: dict[str, int]
    """Verified chunk bytes each donor served."""
    failed_donors: dict[str, str]
    """Donors struck off, and why."""
    refetched_chunks: int
    """Chunk requests repeated because a donor failed them or was far slower than the rest."""

    @property
    def bytes_per_s(self) -> float:
        """Download throughput."""
        return self.total_bytes / self.seconds if self.seconds > 0 else float("inf")


async def download_state(
    node: BulkEndpoint,
    donors: Sequence[str],
    *,
    timeout_s: float,
    version: int | None = None,
    max_chunks_in_flight: int = 8,
    request_timeout_s: float = 30.0,
    limits: StateSyncLimits | None = None,
    min_bytes_per_s: float = 0.0,
    min_donor_bytes_per_s: float = _MIN_DONOR_BYTES_PER_S,
    max_quiet_s: float = _MAX_QUIET_S,
) -> tuple[StateSnapshot, DownloadReport]:
    """Download the global state from ``donors`` at once, every chunk checked by hash.

    Args:
        node: this peer's node (on whose event loop this runs).
        donors: peer ids to download from.
        timeout_s: deadline of the whole download.
        version: the version to fetch; when None, the one most donors hold (newest on a
            tie), or where every holder of that one fails, the next one so ranked.
        max_chunks_in_flight: the most chunk requests outstanding at once, over all donors (a
            donor refuses more than its ``max_requests_per_peer`` of one peer, 16 by default, as
            busy: it is then asked no more at once than it was serving). Fewer are kept while
            chunks come slowly: two at first, one more for each chunk that came in under half
            of ``max_quiet_s``, half as many after one that took over three quarters of it (at
            least one), so a thin link of ours keeps each chunk inside a donor's allowance.
        request_timeout_s: a donor taking longer for its manifest is struck off; so is one busy
            for longer than this when asked for it (one busy when asked for a chunk is asked
            again, until the deadline). In the chunk phase, a donor with chunks of ours in
            flight is struck off once it has delivered none for this plus the bytes of a full
            ``max_chunks_in_flight`` window or of every chunk, whichever is fewer (they share
            our link; each counted as at most 1 MiB) at ``min_donor_bytes_per_s``, or for
            ``max_quiet_s``, whichever is sooner; and so is
            one that delivers slower than ``min_donor_bytes_per_s`` for its share of the
            requests under way (after a grace of that quiet time), however steadily.
        limits: sizes and counts accepted from donors.
        min_bytes_per_s: where positive, the deadline moves out while chunks keep coming: to
            ``request_timeout_s`` plus a full window of chunks in flight at
            ``min_donor_bytes_per_s`` (at most ``max_quiet_s``) after the chunk phase began and
            after each chunk came (as long as a donor may go quiet before it is struck off),
            but never past
            ``timeout_s + total_bytes / min_bytes_per_s`` from the start (a hard cap): a state
            too large for ``timeout_s`` still downloads while its chunks keep coming, and one
            whose chunks stop coming (every donor busy, say) still ends soon. Zero:
            ``timeout_s`` is the download's deadline, whatever comes.
        min_donor_bytes_per_s: the floor rate above (32 KiB/s, about 0.26 Mbit/s, by default).
        max_quiet_s: the longest silence allowed a donor with chunk requests of ours out (and
            how far one chunk moves the deadline out), whatever its manifest declares.

    Returns:
        The snapshot and a report of who served what.

    Raises:
        DeadlineExceededError: not finished within ``timeout_s``.
        PeerUnavailableError: no donor holds a usable state, or every donor failed.
        ProtocolError: the verified bytes are not safetensors (the donors agree on them).
        CorruptedDataError: the verified bytes hold no valid snapshot (a tensor named '').
    """
    if timeout_s <= 0 or max_chunks_in_flight < 1 or request_timeout_s <= 0:
        raise ValueError("timeout_s, request_timeout_s and max_chunks_in_flight must be positive")
    if not min_bytes_per_s >= 0:
        raise ValueError(f"min_bytes_per_s must be >= 0, got {min_bytes_per_s}")
    if not min_donor_bytes_per_s > 0:
        raise ValueError(f"min_donor_bytes_per_s must be positive, got {min_donor_bytes_per_s}")
    if not max_quiet_s > 0:
        raise ValueError(f"max_quiet_s must be positive, got {max_quiet_s}")
    unique_donors = list(dict.fromkeys(d for d in donors if d != node.peer_id))
    if not unique_donors:
        raise ValueError("download_state needs at least one donor other than this peer")
    limits = limits or StateSyncLimits()
    loop = asyncio.get_running_loop()
    router = _routers.get(node)
    if router is None:
        router = _routers[node] = _ReplyRouter()
    router.allow(node, limits)
    started = loop.time()
    job = _Download(
        node,
        router,
        loop,
        started + timeout_s,
        request_timeout_s,
        min_donor_bytes_per_s,
        max_quiet_s,
    )
    try:
        ranked = await _choose_manifest(job, unique_donors, version, limits)
        job.manifest_s = loop.time() - started
        for place, (manifest, holders) in enumerate(ranked):
            # Any version will do: where every holder of the first choice fails (often one
            # donor that had just published a newer version), the next one is fetched.
            if place and not set(holders) - set(job.failed):
                continue  # (its holders failed meanwhile)
            if min_bytes_per_s > 0:  # the chunks' time follows their progress
                # (a fixed deadline, or one that assumed 1 MiB/s, cut every download over a
                # slower link short, each try starting over)
                job.latest = started + timeout_s + manifest.total_bytes / min_bytes_per_s
            try:
                chunks, stats, num_refetched = await _fetch_chunks(
                    job, manifest, holders, max_chunks_in_flight
                )
                break
            except PeerUnavailableError as exc:
                rest = [(m, h) for m, h in ranked[place + 1 :] if set(h) - set(job.failed)]
                if version is not None or not rest:
                    raise
                _log.info(
                    "peer %s: %s; taking version %d instead",
                    node.peer_id[:8],
                    exc,
                    rest[0][0].version,
                )
    finally:
        await _cancel(job.late)
    snapshot = await asyncio.to_thread(deserialize_snapshot, manifest, chunks)
    report = DownloadReport(
        version=manifest.version,
        total_bytes=manifest.total_bytes,
        seconds=loop.time() - started,
        bytes_per_donor={d.peer_id: d.num_bytes for d in stats if d.num_bytes},
        failed_donors=dict(job.failed),
        refetched_chunks=num_refetched,
    )
    _log.info(
        "peer %s: state version %d downloaded: %d bytes in %.2f s (%.1f MiB/s) from %d donors, "
        "%d failed, %d chunks refetched",
        node.peer_id[:8],
        report.version,
        report.total_bytes,
        report.seconds,
        report.bytes_per_s / (1 << 20),
        len(report.bytes_per_donor),
        len(report.failed_donors),
        report.refetched_chunks,
    )
    return snapshot, report


async def _choose_manifest(
    job: _Download, donors: list[str], version: int | None, limits: StateSyncLimits
) -> list[tuple[Manifest, list[str]]]:
    """Ask every donor for its manifest; pick the one most donors agree on (newest on a tie).
    Returns it and its holders first, then the other usable manifests of other versions, most
    held first (newest on a tie).

    A busy donor is asked again, after a backoff, for as long as a donor may take to answer
    (``request_timeout_s``); one still busy then is struck off like one that did not answer.
    Its manifest, where it comes after the choice, is taken as any late one is.

    Once one usable manifest (of ``version``, or any) is held by more donors than the next one
    and every donor not heard from yet together, no answer still to come can change the choice:
    the others are not waited for (one silent donor cost every download its request timeout).
    Otherwise every answer is waited for, a busy donor's too: cutting the wait short on time
    alone, or on a busy refusal, would let one fast donor outvote a slower (or busier)
    majority.
    """
    manifests = job.manifests

    async def one(donor: str) -> None:
        busy_until = job.loop.time() + job.request_timeout_s
        num_busy = 0
        while True:
            try:
                _, body = await job.ask(donor, Request(kind=RequestKind.MANIFEST, request_id=b""))
                # (up to 33 MB and a million digests with the default limits: off the event loop)
                manifests[donor] = await asyncio.to_thread(decode_manifest, body, limits)
                return
            except _DonorBusyError as exc:
                num_busy += 1
                wait_s = _busy_backoff_s(num_busy)
                if job.loop.time() + wait_s < min(busy_until, job.deadline):
                    await asyncio.sleep(wait_s)  # a backoff before asking again
                    continue
                job.strike(donor, _DonorBusyError(f"busy {num_busy} times in a row: {exc}"))
                return
            except GossamerError as exc:
                if not (isinstance(exc, DeadlineExceededError) and job.remaining_s() <= 0):
                    job.strike(donor, exc)
                return

    def usable(manifest: Manifest) -> bool:
        return version is None or manifest.version == version

    def decided() -> bool:
        held = sorted(Counter(m.sha256 for m in manifests.values() if usable(m)).values())
        if not held:
            return False
        runner_up = held[-2] if len(held) > 1 else 0
        unheard = sum(1 for d in donors if d not in manifests and d not in job.failed)
        # (a busy donor is unheard: counting its refusal as an answer let one fast hostile
        # donor's manifest be chosen over two honest ones that were busy for a moment)
        return held[-1] > runner_up + unheard

    tasks = {job.loop.create_task(one(d), name=f"state-manifest-{d[:8]}"): d for d in donors}
    pending = set(tasks)
    try:
        while pending and not decided():
            _, pending = await asyncio.wait(pending, return_when="FIRST_COMPLETED")
        _raise_bug(t for t in tasks if t not in pending)
    except BaseException:
        await _cancel(pending)
        raise
    job.late = {task: tasks[task] for task in pending}
    groups: dict[str, list[str]] = {}
    by_hash: dict[str, Manifest] = {}
    for donor in donors:  # in the caller's order
        manifest = manifests.get(donor)
        if manifest is not None and usable(manifest):
            groups.setdefault(manifest.sha256, []).append(donor)
            by_hash[manifest.sha256] = manifest
    if not groups:
        wanted = "any version" if version is None else f"version {version}"
        answers = _answers(job.failed, manifests, donors)
        if job.remaining_s() <= 0:
            raise DeadlineExceededError(
                f"no state manifest of {wanted} arrived before the deadline: {answers}"
            )
        raise PeerUnavailableError(f"no donor offers {wanted} of the state: {answers}")
    rank = max((len(holders), by_hash[h].version) for h, holders in groups.items())
    tied = [h for h, holders in groups.items() if (len(holders), by_hash[h].version) == rank]
    # Two manifests of one version, as many donors each: nothing tells the honest one, and a
    # donor's place in the list is no evidence (the caller's hash checks catch the loser later).
    best = tied[0] if len(tied) == 1 else secrets.choice(tied)
    chosen = by_hash[best]
    why = "the majority's" if len(tied) == 1 else "the one chosen at random of a tie"
    for digest, members in groups.items():
        if digest != best and by_hash[digest].version == chosen.version:
            for donor in members:  # same version, other bytes: a liar or a diverged peer
                job.strike(
                    donor,
                    CorruptedDataError(
                        f"its manifest of version {chosen.version} differs from {why} "
                        f"({len(groups[best])} donor(s) hold that one)"
                    ),
                )
    others = sorted(
        (h for h in groups if by_hash[h].version != chosen.version),
        key=lambda h: (len(groups[h]), by_hash[h].version),
        reverse=True,
    )
    return [(chosen, groups[best])] + [(by_hash[h], groups[h]) for h in others]


async def _fetch_chunks(
    job: _Download, manifest: Manifest, holders: list[str], max_in_flight: int
) -> tuple[list[bytes | bytearray | memoryview], list[_Donor], int]:
    """Fetch every chunk from ``holders``, each to the donor expected to finish it first.

    A chunk still in flight long after most chunks took (``_HEDGE_FACTOR`` times the median)
    is also asked of another donor once, and the first verified copy wins: one hung or slow
    donor then costs the tail of the download a little, not its request timeout. At most a
    :class:`_ChunkWindow` of requests is kept in flight: grown while chunks come in under half
    of ``max_quiet_s``, halved when one takes over three quarters of it, so each chunk's time
    on the wire stays inside a donor's silence allowance however thin our link. A chunk a
    donor refuses as busy goes back in the queue; that donor is asked no more at once than it
    was serving of ours then (one more for each chunk it delivers since), or, where it served
    none of ours, nothing until a backoff has passed.

    A donor with chunks of ours in flight is struck off once it has gone quiet (no chunk, no
    busy refusal) for ``request_timeout_s`` plus a full ``max_in_flight`` window of chunks (or
    every chunk, where there are fewer) at ``min_donor_bytes_per_s`` (each chunk counted as at
    most ``_QUIET_CHUNK_BYTES``: its size is the donor's word), or for ``max_quiet_s``,
    whichever is sooner: the requests under way, to it and to the others, share its link and
    ours, so on a slow one each takes long while the donor is healthy. That whatever the window
    now and however few chunks are left: the window keeps chunk times inside this allowance,
    and one that shrank with the chunks left struck off an honest donor behind a thin link of
    ours, its last chunk still sharing the link with the one before. Each chunk that comes (and
    the chunk phase's start) moves the deadline out, as far as ``job.latest`` allows, by as
    long as a donor with a full window in flight may stay quiet.

    A donor is also judged by its rate: while it has requests out it owes
    ``min_donor_bytes_per_s`` times its share of the requests under way (all of them share our
    link), and once it is behind that by more than a full quiet window's bytes it is struck
    off and its chunks go to the others: one that sends a chunk now and then, never quiet for
    long, held a download to its far deadline. One at or above the floor is kept, however slow.
    """
    donors = [_Donor(peer_id) for peer_id in holders]
    # Each verified chunk as it came (a view of its reply), joined once all are in: memory
    # follows the bytes that came and passed their hash, not the size a manifest announced (a
    # buffer of that size, zeroed on the event loop before any chunk came, took 4.4 s and
    # 4 GiB for a 32 KiB manifest claiming 4 GiB).
    chunks: list[bytes | bytearray | memoryview] = [b""] * manifest.num_chunks
    pending = deque(range(manifest.num_chunks))
    is_done = [False] * manifest.num_chunks
    copies: dict[int, set[asyncio.Task[float]]] = {}
    tasks: dict[asyncio.Task[float], tuple[int, _Donor, float]] = {}
    orphans: list[asyncio.Task[float]] = []
    latencies: list[float] = []
    num_done = num_refetched = num_bytes_done = 0
    chunks_began = accounted_at = job.loop.time()
    floor = job.min_donor_bytes_per_s
    quiet_base_s = job.request_timeout_s
    idle_s = min(
        job.max_quiet_s,
        quiet_base_s + max_in_flight * min(manifest.chunk_bytes, _QUIET_CHUNK_BYTES) / floor,
    )
    # (how long a donor with requests of ours may go quiet: a full window, or every chunk)
    quiet_limit_s = min(
        idle_s,
        quiet_base_s
        + min(max_in_flight, manifest.num_chunks)
        * min(manifest.chunk_bytes, _QUIET_CHUNK_BYTES)
        / floor,
    )
    max_debt_bytes = floor * idle_s  # (the grace of a donor's rate: a full quiet window)
    job.extend(chunks_began + idle_s)
    window = _ChunkWindow(
        max_size=max_in_flight,
        chunk_bytes=manifest.chunk_bytes,
        grow_below_s=job.max_quiet_s / 2,
        shrink_above_s=job.max_quiet_s * 3 / 4,
        size=min(2, max_in_flight),
    )

    def chunk_bytes(index: int) -> int:
        start, stop = manifest.chunk_range(index)
        return stop - start

    def account(now: float) -> None:
        """Each donor's time with requests out, and what it owes for it, up to ``now``."""
        nonlocal accounted_at
        elapsed_s, accounted_at = now - accounted_at, now
        if elapsed_s <= 0 or not tasks:
            return
        for donor in donors:
            if donor.num_in_flight:
                donor.out_s += elapsed_s
                donor.owed_bytes += elapsed_s * floor * donor.num_in_flight / len(tasks)

    async def fetch(index: int, donor: _Donor) -> float:
        started = job.loop.time()
        _, body = await job.ask(
            donor.peer_id,
            Request(
                kind=RequestKind.CHUNK,
                request_id=b"",
                version=manifest.version,
                index=index,
                manifest_sha256=manifest.sha256,
            ),
        )
        start, stop = manifest.chunk_range(index)
        if len(body) != stop - start:
            raise ProtocolError(f"chunk {index} has {len(body)} bytes, expected {stop - start}")
        donor.quiet_since = job.loop.time()
        await asyncio.to_thread(_check_and_place, chunks, body, manifest, index)
        donor.num_chunks_sent += 1
        donor.num_bytes_sent += len(body)
        donor.num_busy = 0
        if donor.max_in_flight is not None:
            donor.max_in_flight += 1  # (it may have room for more again)
        elapsed = job.loop.time() - started
        donor.latency_s = (
            elapsed
            if donor.latency_s is None
            else (1 - _EWMA_WEIGHT) * donor.latency_s + _EWMA_WEIGHT * elapsed
        )
        return elapsed

    def launch(index: int, donor: _Donor) -> None:
        if not donor.num_in_flight:  # (it is judged quiet from now)
            donor.quiet_since = job.loop.time()
        donor.num_in_flight += 1
        task = job.loop.create_task(fetch(index, donor), name=f"state-chunk-{index}")
        tasks[task] = (index, donor, job.loop.time())
        copies.setdefault(index, set()).add(task)

    def forget(task: asyncio.Task[float], *, cancel: bool) -> int:
        index, donor, _ = tasks.pop(task)
        donor.num_in_flight -= 1
        copies[index].discard(task)
        if cancel:
            task.cancel()
            orphans.append(task)
        return index

    def requeue_if_orphaned(index: int) -> int:
        if copies[index] or is_done[index]:
            return 0
        pending.appendleft(index)
        return 1

    try:
        while num_done < manifest.num_chunks:
            if job.remaining_s() <= 0:
                elapsed_s = job.loop.time() - chunks_began
                rate = num_bytes_done / elapsed_s if elapsed_s > 0 else 0.0
                busy = [
                    f"{d.peer_id[:8]}: {d.busy}"
                    for d in donors
                    if d.busy and d.peer_id not in job.failed
                ]
                serving = [
                    f"{d.peer_id[:8]}: {d.rate()}"
                    for d in donors
                    if d.out_s > 0 and d.peer_id not in job.failed
                ]
                raise DeadlineExceededError(
                    f"state version {manifest.version}: {num_done}/{manifest.num_chunks} chunks "
                    f"({num_bytes_done / (1 << 20):.1f} of "
                    f"{manifest.total_bytes / (1 << 20):.1f} MiB) fetched at "
                    f"{rate / (1 << 20):.2f} MiB/s when the deadline passed, too slow for it "
                    f"(the manifests took {job.manifest_s:.1f} s of it); failed donors: "
                    f"{_reasons(job.failed, holders)}"
                    + (f"; donors still asked: {'; '.join(serving)}" if serving else "")
                    + (f"; busy donors, last said: {'; '.join(busy)}" if busy else "")
                )
            _admit_late(job, manifest, donors)
            now = job.loop.time()
            for donor in donors:
                if donor.peer_id in job.failed:
                    continue
                quiet_s = now - donor.quiet_since
                if donor.num_in_flight and quiet_s >= quiet_limit_s:
                    before = f" (before: {donor.rate()})" if donor.num_chunks_sent else ""
                    job.strike(
                        donor.peer_id,
                        DeadlineExceededError(
                            f"no chunk in {quiet_s:.1f} s with {donor.num_in_flight} chunk "
                            f"request(s) of ours there and {len(tasks)} out in all{before}"
                        ),
                    )
                elif donor.owed_bytes - donor.num_bytes_sent > max_debt_bytes:
                    job.strike(
                        donor.peer_id,
                        DeadlineExceededError(
                            f"answered, but too slowly: {donor.rate()}, under the floor of "
                            f"{donor.owed_bytes / donor.out_s / 1024:.1f} KiB/s for its share "
                            f"of our requests"
                        ),
                    )
            struck = {d.peer_id for _, d, _ in tasks.values() if d.peer_id in job.failed}
            for task, (_, donor, _) in list(tasks.items()):
                if donor.peer_id in job.failed:  # struck off: stop waiting for it
                    num_refetched += requeue_if_orphaned(forget(task, cancel=True))
            for _ in struck:  # (its chunks go to fewer donors, each with more of ours)
                window.lost()
            live = [d for d in donors if d.peer_id not in job.failed]
            if not live and not job.late:
                raise PeerUnavailableError(
                    f"state version {manifest.version}: {num_done}/{manifest.num_chunks} chunks "
                    f"fetched and every donor failed: "
                    f"{_reasons(job.failed, [d.peer_id for d in donors])}"
                )
            now = job.loop.time()
            while pending and len(tasks) < window.size:
                ready = [d for d in live if d.askable(now)]
                if not ready:
                    break
                index = pending.popleft()
                if not is_done[index]:
                    launch(index, _pick(ready))
            wake_s = job.remaining_s()
            for donor in live:  # (a donor's quiet time runs out, or it falls behind the floor)
                if donor.num_in_flight:
                    wake_s = min(wake_s, donor.quiet_since + quiet_limit_s - now)
                    owed_per_s = floor * donor.num_in_flight / len(tasks)
                    debt_left = max_debt_bytes - (donor.owed_bytes - donor.num_bytes_sent)
                    wake_s = min(wake_s, debt_left / owed_per_s)
            # (a busy donor's backoff ends: it may take the chunks left)
            backoff_ends = min((d.not_before for d in live if d.not_before > now), default=None)
            if pending and len(tasks) < window.size and backoff_ends is not None:
                wake_s = min(wake_s, backoff_ends - now)
            if not pending and len(live) > 1 and latencies:
                hedge_after_s = max(_MIN_HEDGE_S, _HEDGE_FACTOR * statistics.median(latencies))
                for index, donor, started in sorted(tasks.values(), key=lambda t: t[2]):
                    if len(copies[index]) != 1 or len(tasks) >= window.size:
                        continue
                    others = [d for d in live if d is not donor and d.askable(now)]
                    if now - started < hedge_after_s:
                        wake_s = min(wake_s, started + hedge_after_s - now)
                    elif others:
                        launch(index, _pick(others))
                        num_refetched += 1
                    elif backoff_ends is not None:  # (the others are busy for now)
                        wake_s = min(wake_s, backoff_ends - now)
            if tasks or job.late:
                await asyncio.wait(
                    {*tasks, *job.late}, timeout=max(0.0, wake_s), return_when="FIRST_COMPLETED"
                )
            else:  # every donor left is busy: wait out the first backoff
                await asyncio.sleep(max(0.0, wake_s))
            account(job.loop.time())  # (the donors' requests out were as they are since)
            for task in [t for t in tasks if t.done()]:
                if task not in tasks:  # a copy of a chunk an earlier task of this batch won
                    continue
                _, donor, started = tasks[task]
                index = forget(task, cancel=False)
                exc = task.exception()
                if exc is None:
                    latencies.append(task.result())
                    size_before = window.size
                    window.delivered(chunk_bytes(index), accounted_at - started)
                    if window.size != size_before:
                        _log.debug(
                            "peer %s: state version %d: %d chunk request(s) kept in flight "
                            "(a chunk took %.1f s)",
                            job.node.peer_id[:8],
                            manifest.version,
                            window.size,
                            accounted_at - started,
                        )
                    if not is_done[index]:
                        is_done[index] = True
                        num_done += 1
                        donor.num_bytes += chunk_bytes(index)
                        num_bytes_done += chunk_bytes(index)
                        job.extend(job.loop.time() + idle_s)
                    for sibling in list(copies[index]):
                        forget(sibling, cancel=True)
                elif isinstance(exc, DeadlineExceededError) and job.remaining_s() <= 0:
                    requeue_if_orphaned(index)  # our deadline, not the donor's fault
                elif isinstance(exc, _DonorBusyError):  # healthy: asked again later
                    donor.busy = str(exc)
                    donor.quiet_since = job.loop.time()
                    if donor.num_in_flight:  # asked again once one of those is answered
                        donor.max_in_flight = donor.num_in_flight
                    elif donor.not_before <= job.loop.time():  # (once for a batch refused)
                        donor.num_busy += 1
                        donor.not_before = job.loop.time() + _busy_backoff_s(donor.num_busy)
                    requeue_if_orphaned(index)
                elif isinstance(exc, GossamerError):
                    job.strike(donor.peer_id, exc)
                    num_refetched += requeue_if_orphaned(index)
                    if not donor.num_in_flight:  # (else halved with its others, above)
                        window.lost()
                else:
                    raise exc
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *orphans, return_exceptions=True)
    return chunks, donors, num_refetched


def _admit_late(job: _Download, manifest: Manifest, donors: list[_Donor]) -> None:
    """Donors whose manifest came after the choice: those that hold the chosen one join."""
    done = [task for task in job.late if task.done()]
    _raise_bug(done)
    for task in done:
        donor = job.late.pop(task)
        late = job.manifests.get(donor)
        if late is None or late.version != manifest.version:
            continue
        if late.sha256 == manifest.sha256:
            donors.append(_Donor(donor))
        else:
            job.strike(donor, CorruptedDataError("its manifest differs from the majority's"))


def _raise_bug(tasks: Iterable[asyncio.Task[None]]) -> None:
    """Raise what a finished manifest request raised: a bug, since each keeps only a donor's
    failures (as strikes)."""
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            raise cast(BaseException, task.exception())


async def _cancel(tasks: Iterable[asyncio.Task[None]]) -> None:
    waiting = list(tasks)
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)


def _pick(live: list[_Donor]) -> _Donor:
    """The donor expected to deliver one more chunk soonest; untried donors count as fast."""
    known = [d.latency_s for d in live if d.latency_s is not None]
    optimistic = min(known) if known else 1.0
    return min(
        live,
        key=lambda d: (
            (d.num_in_flight + 1) * (d.latency_s if d.latency_s is not None else optimistic),
            d.num_in_flight,
            d.num_bytes,
        ),
    )


def _check_and_place(
    chunks: list[bytes | bytearray | memoryview], body: memoryview, manifest: Manifest, index: int
) -> None:
    if hashlib.sha256(body).digest() != manifest.chunk_digests[index]:
        raise CorruptedDataError(f"chunk {index} of version {manifest.version} failed its sha256")
    chunks[index] = body


def _reasons(failed: dict[str, str], donors: Sequence[str]) -> str:
    parts = [f"{d[:8]}: {failed[d]}" for d in donors if d in failed]
    return "; ".join(parts) if parts else "none"


def _answers(failed: dict[str, str], manifests: dict[str, Manifest], donors: Sequence[str]) -> str:
    """What each donor answered to the manifest request."""
    parts = []
    for donor in donors:
        if donor in manifests:
            parts.append(f"{donor[:8]}: has version {manifests[donor].version}")
        elif donor in failed:
            parts.append(f"{donor[:8]}: {failed[donor]}")
        else:
            parts.append(f"{donor[:8]}: no answer in time")
    return "; ".join(parts)
