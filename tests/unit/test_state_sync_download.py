"""State sync between in-memory nodes: multi-donor download, faults, versions, deadlines."""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
import weakref
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
import torch
from state_sync_fakes import (
    FakeBulkNetwork,
    FakeBulkNode,
    FaultyBulkNode,
    answer_with_manifest_only,
)

from gossamer.core.clock import FakeClock
from gossamer.core.errors import DeadlineExceededError, PeerUnavailableError, ProtocolError
from gossamer.train import state_sync
from gossamer.train.state_sync import (
    DownloadReport,
    StateDonor,
    StateSnapshot,
    StateSyncLimits,
    download_state,
)
from gossamer.train.state_sync_wire import (
    REPLY_TOPIC,
    REQUEST_TOPIC,
    ReplyHeader,
    ReplyStatus,
    Request,
    RequestKind,
    SerializedSnapshot,
    decode_reply,
    encode_manifest,
    encode_reply,
    encode_request,
)

T = TypeVar("T")
CHUNK = 4096


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def snapshot(version: int = 7, seed: int = 0, numel: int = 40_000) -> StateSnapshot:
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(numel, generator=gen)
    weights[3] = float("nan")  # bit-exact means NaNs and signs survive too
    weights[4] = -0.0
    return StateSnapshot(
        version=version,
        tensors={
            "model.w": weights.reshape(200, -1),
            "model.b16": torch.randn(33, 5, generator=gen).to(torch.bfloat16),
            "model.h16": torch.randn(17, generator=gen).to(torch.float16),
            "outer.momentum": torch.randn(1000, generator=gen, dtype=torch.float64),
            "step": torch.tensor(12345, dtype=torch.int64),
            "scale": torch.tensor(0.5),
            "mask": torch.rand(9, generator=gen) > 0.5,
            "ids": torch.randint(-100, 100, (3, 4), generator=gen, dtype=torch.int8),
            "empty": torch.zeros(0, 3, dtype=torch.int32),
        },
        meta={"step": 12345, "tokens": 10**12, "config_hash": "ab" * 32, "lr": [0.7, 0.9]},
    )


def assert_bit_exact(got: StateSnapshot, want: StateSnapshot) -> None:
    assert got.version == want.version
    assert got.meta == want.meta
    assert got.tensors.keys() == want.tensors.keys()
    for name, tensor in want.tensors.items():
        out = got.tensors[name]
        assert out.dtype == tensor.dtype, name
        assert out.shape == tensor.shape, name
        assert out.flatten().view(torch.uint8).tolist() == (
            tensor.flatten().view(torch.uint8).tolist()
        ), name


def swarm(
    num_donors: int, node_type: type[FakeBulkNode] | None = None
) -> tuple[FakeBulkNetwork, FakeBulkNode, list[FakeBulkNode]]:
    network = FakeBulkNetwork()
    newcomer = network.add("newcomer")
    donors = [network.add(f"donor{i}", node_type) for i in range(num_donors)]
    return network, newcomer, donors


def donate(nodes: list[FakeBulkNode], snap: StateSnapshot, **kwargs: Any) -> list[StateDonor]:
    out = []
    for node in nodes:
        donor = StateDonor(node, chunk_bytes=CHUNK, **kwargs)
        donor.publish(snap)
        out.append(donor)
    return out


def test_round_trip_is_bit_exact_from_one_donor() -> None:
    _, newcomer, nodes = swarm(1)
    want = snapshot()
    donate(nodes, want)
    got, report = run(download_state(newcomer, ["donor0"], timeout_s=10))
    assert_bit_exact(got, want)
    assert report.version == 7
    assert report.bytes_per_donor == {"donor0": report.total_bytes}
    assert report.failed_donors == {}
    assert report.refetched_chunks == 0


def test_chunks_are_spread_over_three_donors() -> None:
    _, newcomer, nodes = swarm(3)
    want = snapshot()
    donate(nodes, want)
    got, report = run(download_state(newcomer, [n.peer_id for n in nodes], timeout_s=10))
    assert_bit_exact(got, want)
    assert set(report.bytes_per_donor) == {"donor0", "donor1", "donor2"}
    assert sum(report.bytes_per_donor.values()) == report.total_bytes
    assert all(b >= CHUNK for b in report.bytes_per_donor.values())


class CorruptingNode(FaultyBulkNode):
    pass


def test_corrupted_chunk_is_refetched_elsewhere_and_the_donor_dropped() -> None:
    network, newcomer, nodes = swarm(2)
    liar = network.add("liar", CorruptingNode)
    liar.corrupt_chunks = True  # type: ignore[attr-defined]
    want = snapshot()
    donate([*nodes, liar], want)
    got, report = run(download_state(newcomer, ["liar", "donor0", "donor1"], timeout_s=10))
    assert_bit_exact(got, want)
    assert "liar" in report.failed_donors
    assert "sha256" in report.failed_donors["liar"]
    assert "liar" not in report.bytes_per_donor
    assert report.refetched_chunks >= 1


def test_donor_dying_mid_download_is_replaced_by_the_others() -> None:
    network, newcomer, nodes = swarm(2)
    dying = network.add("dying", FaultyBulkNode)
    dying.die_after_chunks = 2  # type: ignore[attr-defined]
    want = snapshot()
    donate([*nodes, dying], want)
    got, report = run(download_state(newcomer, ["dying", "donor0", "donor1"], timeout_s=10))
    assert_bit_exact(got, want)
    assert "dying" in network.dead
    assert "dying" in report.failed_donors
    # It served two chunks before dying; a chunk is credited to the donor whose copy was used,
    # and a hedged copy from another donor may win the race for one of them.
    assert report.bytes_per_donor.get("dying", 0) <= 2 * CHUNK
    assert sum(report.bytes_per_donor.values()) == report.total_bytes
    assert report.refetched_chunks >= 1


def test_every_donor_failing_raises_peer_unavailable() -> None:
    _network, newcomer, nodes = swarm(2, FaultyBulkNode)
    for node in nodes:
        node.die_after_chunks = 1  # type: ignore[attr-defined]
    donate(nodes, snapshot())
    with pytest.raises(PeerUnavailableError, match="every donor failed"):
        run(download_state(newcomer, [n.peer_id for n in nodes], timeout_s=10))


def test_majority_version_is_chosen_newest_on_a_tie() -> None:
    _, newcomer, nodes = swarm(4)
    old, new = snapshot(version=5, seed=1), snapshot(version=6, seed=2)
    donate(nodes[:2], old)
    donate(nodes[2:3], new)
    ids = [n.peer_id for n in nodes[:3]]
    got, report = run(download_state(newcomer, ids, timeout_s=10))
    assert_bit_exact(got, old)
    assert set(report.bytes_per_donor) <= {"donor0", "donor1"}
    assert report.failed_donors == {}  # other versions are not failures

    got, _ = run(download_state(newcomer, ids, timeout_s=10, version=6))
    assert_bit_exact(got, new)

    donate(nodes[3:], new)  # 2 and 2: the newest wins
    got, _ = run(download_state(newcomer, [n.peer_id for n in nodes], timeout_s=10))
    assert got.version == 6

    with pytest.raises(PeerUnavailableError, match="version 9"):
        run(download_state(newcomer, ids, timeout_s=10, version=9))


def test_when_every_holder_of_the_chosen_version_fails_another_version_is_fetched() -> None:
    # One donor has just published its next version: 1 and 1, the newest is chosen, and its
    # donor dies two chunks in. The other still serves a whole state: any version will do.
    network, newcomer, (steady,) = swarm(1)
    dying = network.add("dying", FaultyBulkNode)
    dying.die_after_chunks = 2  # type: ignore[attr-defined]
    old = snapshot(version=5, seed=1)
    donate([steady], old)
    donate([dying], snapshot(version=6, seed=2))
    got, report = run(download_state(newcomer, ["donor0", "dying"], timeout_s=10))
    assert_bit_exact(got, old)
    assert "dying" in report.failed_donors
    assert set(report.bytes_per_donor) == {"donor0"}

    # Asked for a version, it is that version or nothing.
    network, newcomer, (steady,) = swarm(1)
    dying = network.add("dying", FaultyBulkNode)
    dying.die_after_chunks = 2  # type: ignore[attr-defined]
    donate([steady], old)
    donate([dying], snapshot(version=6, seed=2))
    with pytest.raises(PeerUnavailableError, match="every donor failed"):
        run(download_state(newcomer, ["donor0", "dying"], timeout_s=10, version=6))


def test_donor_with_other_bytes_at_the_same_version_is_struck_off() -> None:
    _, newcomer, nodes = swarm(3)
    want = snapshot(version=5, seed=1)
    donate(nodes[:2], want)
    donate(nodes[2:], snapshot(version=5, seed=99))
    got, report = run(download_state(newcomer, [n.peer_id for n in nodes], timeout_s=10))
    assert_bit_exact(got, want)
    assert "differs from the majority" in report.failed_donors["donor2"]


def test_previous_snapshot_is_served_to_a_download_in_progress() -> None:
    network, newcomer, _ = swarm(0)
    node = network.add("donor", FaultyBulkNode)
    old, new = snapshot(version=1, seed=1), snapshot(version=2, seed=2)
    (donor,) = donate([node], old)
    node.after_chunk = lambda n: donor.publish(new) if n == 1 else None  # type: ignore[attr-defined]
    got, _report = run(download_state(newcomer, ["donor"], timeout_s=10))
    assert_bit_exact(got, old)
    assert donor.version == 2


def test_a_download_goes_on_when_its_version_is_republished_with_other_bytes() -> None:
    # Chunk requests named the version only: a donor that published other bytes under the same
    # version (after a missed round) answered with chunks of those, and the honest donor was
    # struck off as corrupted and the download failed.
    network, newcomer, _ = swarm(0)
    node = network.add("donor", FaultyBulkNode)
    old, new = snapshot(version=5, seed=1), snapshot(version=5, seed=2)
    (donor,) = donate([node], old)
    node.after_chunk = lambda n: donor.publish(new) if n == 1 else None  # type: ignore[attr-defined]
    got, report = run(download_state(newcomer, ["donor"], timeout_s=10, max_chunks_in_flight=1))
    assert_bit_exact(got, old)
    assert report.failed_donors == {}
    got, _ = run(download_state(newcomer, ["donor"], timeout_s=10))  # a new one takes the new
    assert_bit_exact(got, new)


def test_previous_snapshot_is_dropped_after_its_grace() -> None:
    network, newcomer, _ = swarm(0)
    clock = FakeClock()
    node = network.add("donor", FaultyBulkNode)
    old, new = snapshot(version=1, seed=1), snapshot(version=2, seed=2)
    (donor,) = donate([node], old, grace_s=5.0, clock=clock)

    def next_outer_step(num_replies: int) -> None:
        if num_replies == 1:
            donor.publish(new)
            clock.advance(6.0)

    node.after_chunk = next_outer_step  # type: ignore[attr-defined]
    with pytest.raises(PeerUnavailableError, match="VERSION_GONE"):
        run(download_state(newcomer, ["donor"], timeout_s=10))


def test_stalled_donor_is_dropped_after_the_request_timeout() -> None:
    network, newcomer, nodes = swarm(2)
    staller = network.add("staller", FaultyBulkNode)
    want = snapshot()
    donate([*nodes, staller], want)
    staller.stall = True  # type: ignore[attr-defined]  # answers nothing from now on
    got, report = run(  # one of two agreeing is no majority: the staller's answer is awaited
        download_state(newcomer, ["staller", "donor0"], timeout_s=10, request_timeout_s=0.2)
    )
    assert_bit_exact(got, want)
    assert "DeadlineExceeded" in report.failed_donors["staller"]


def test_deadline_is_respected() -> None:
    _network, newcomer, nodes = swarm(1, FaultyBulkNode)
    donate(nodes, snapshot())
    nodes[0].stall = True  # type: ignore[attr-defined]
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError, match="manifest"):
        run(download_state(newcomer, ["donor0"], timeout_s=0.3))
    assert time.monotonic() - started < 2.0


def test_deadline_during_chunks_raises_deadline_exceeded() -> None:
    network, newcomer, _ = swarm(0)
    node = network.add("donor", FaultyBulkNode)
    donate([node], snapshot())

    def stall_from_now(num_replies: int) -> None:
        node.stall = True  # type: ignore[attr-defined]

    node.after_chunk = stall_from_now  # type: ignore[attr-defined]
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError, match="chunks"):
        run(download_state(newcomer, ["donor"], timeout_s=0.3, request_timeout_s=5))
    assert time.monotonic() - started < 2.0


def test_junk_requests_are_refused_and_the_donor_keeps_serving() -> None:
    _network, newcomer, nodes = swarm(1)
    (donor,) = donate(nodes, snapshot())
    junk = [
        b"",
        b"\x00\xff" * 10,
        b"[1,2]",
        b'{"kind":"chunk"}',
        b'{"kind":"chunk","request_id":"' + b"0" * 32 + b'","timeout_ms":1000,"index":-1,'
        b'"version":7}',
        b'{"kind":"chunk","request_id":"' + b"0" * 32 + b'","timeout_ms":1000,"index":1e99,'
        b'"version":7}',
    ]
    oversized = b"{" + b" " * 100_000 + b"}"  # refused by net before the donor sees it

    async def main() -> None:
        for payload in [*junk, oversized]:
            with pytest.raises(ProtocolError):
                await newcomer.send_bulk("donor0", REQUEST_TOPIC, payload)

    run(main())
    assert donor.num_requests_refused == len(junk)
    got, _ = run(download_state(newcomer, ["donor0"], timeout_s=10))
    assert got.version == 7


class LyingManifestNode(FakeBulkNode):
    """A donor that answers every manifest request with a crafted manifest."""

    manifest = b""

    def __init__(self, network: FakeBulkNetwork, peer_id: str) -> None:
        super().__init__(network, peer_id)
        self.on_bulk(REQUEST_TOPIC, self._answer)

    async def _answer(self, sender: str, topic: str, payload: bytearray) -> None:
        import json

        request = json.loads(payload)
        header = ReplyHeader(
            kind=RequestKind.MANIFEST,
            status=ReplyStatus.OK,
            request_id=bytes.fromhex(request["request_id"]),
            version=0,
            index=0,
            body_bytes=len(self.manifest),
        )
        await self.send_bulk(sender, REPLY_TOPIC, encode_reply(header, self.manifest))


@pytest.mark.parametrize(
    ("total", "chunk", "num_chunks"),
    [(1 << 50, 1 << 20, 1 << 30), (1 << 20, 1 << 40, 1), (10, 1, 10**9), (100, 10, 3)],
)
def test_manifest_with_huge_or_inconsistent_sizes_is_refused(
    total: int, chunk: int, num_chunks: int
) -> None:
    network, newcomer, _ = swarm(0)
    liar = network.add("liar", LyingManifestNode)
    liar.manifest = (
        encode_manifest(  # type: ignore[attr-defined]
            version=1, total_bytes=total, chunk_bytes=chunk, meta={}, digests=[b"\0" * 32]
        )[:48]
        + b""
    )  # header only: the counts claim far more than the bytes hold
    with pytest.raises(PeerUnavailableError, match="ProtocolError"):
        run(download_state(newcomer, ["liar"], timeout_s=5, limits=StateSyncLimits()))


def test_unsolicited_and_junk_replies_are_refused() -> None:
    _, newcomer, nodes = swarm(1)
    donate(nodes, snapshot())
    run(download_state(newcomer, ["donor0"], timeout_s=10))  # registers the reply router

    async def main() -> None:
        header = ReplyHeader(
            kind=RequestKind.CHUNK,
            status=ReplyStatus.OK,
            request_id=b"\1" * 16,
            version=7,
            index=0,
            body_bytes=3,
        )
        for payload in (b"junk", encode_reply(header, b"abc"), encode_reply(header, b"abc")[:-1]):
            with pytest.raises(ProtocolError):
                await nodes[0].send_bulk("newcomer", REPLY_TOPIC, payload)

    run(main())


def test_bad_arguments() -> None:
    _network, newcomer, nodes = swarm(1)
    with pytest.raises(ValueError, match="at least one donor"):
        run(download_state(newcomer, ["newcomer"], timeout_s=1))
    with pytest.raises(ValueError, match="chunk_bytes"):
        StateDonor(nodes[0], chunk_bytes=10)
    with pytest.raises(ValueError, match="JSON"):
        StateDonor(nodes[0]).publish(StateSnapshot(version=1, tensors={}, meta={"x": object()}))
    with pytest.raises(ValueError, match="version"):
        StateSnapshot(version=-1, tensors={}, meta={})
    report = DownloadReport(
        version=1,
        total_bytes=10,
        seconds=2.0,
        bytes_per_donor={},
        failed_donors={},
        refetched_chunks=0,
    )
    assert report.bytes_per_s == 5.0


def test_closed_donor_refuses() -> None:
    _, newcomer, nodes = swarm(1)
    (donor,) = donate(nodes, snapshot())
    donor.close()
    with pytest.raises(PeerUnavailableError, match="CLOSED"):
        run(download_state(newcomer, ["donor0"], timeout_s=5))


def test_hung_donor_is_hedged_without_waiting_for_its_timeout() -> None:
    network, newcomer, nodes = swarm(2)
    hung = network.add("hung", FaultyBulkNode)
    want = snapshot()
    donate([*nodes, hung], want)

    def hang_from_now(num_replies: int) -> None:
        hung.stall = True  # type: ignore[attr-defined]

    hung.after_chunk = hang_from_now  # type: ignore[attr-defined]
    started = time.monotonic()
    got, report = run(
        download_state(newcomer, ["hung", "donor0", "donor1"], timeout_s=30, request_timeout_s=20)
    )
    assert time.monotonic() - started < 5.0
    assert_bit_exact(got, want)
    assert report.refetched_chunks >= 1
    assert sum(report.bytes_per_donor.values()) == report.total_bytes


class BothCopiesAtOnceNode(FakeBulkNode):
    """Holds its reply with chunk ``gated`` until a second donor's reply with it is held too,
    then lets both go: the original and its hedged copy finish in the same wake-up."""

    gate: asyncio.Event
    num_held = 0
    gated = 0

    async def send_bulk(self, peer_id: str, topic: str, payload: Any, **kwargs: Any) -> None:
        if topic == REPLY_TOPIC:
            header, _ = decode_reply(bytearray(payload))
            if header.kind is RequestKind.CHUNK and header.index == self.gated:
                cls = BothCopiesAtOnceNode
                cls.num_held += 1
                if cls.num_held == 2:
                    cls.gate.set()
                await cls.gate.wait()
        await super().send_bulk(peer_id, topic, payload, **kwargs)


def test_a_chunk_and_its_hedged_copy_arriving_together_do_not_break_the_download() -> None:
    """Taking the first copy forgot the second; the loop then looked the second up (KeyError)."""
    want = snapshot()
    for _ in range(5):  # the copies' checks race in threads: a few downloads, each exact

        async def main() -> tuple[StateSnapshot, DownloadReport]:
            BothCopiesAtOnceNode.gate = asyncio.Event()
            BothCopiesAtOnceNode.num_held = 0
            _, newcomer, nodes = swarm(2, BothCopiesAtOnceNode)
            donate(nodes, want)
            return await download_state(
                newcomer, ["donor0", "donor1"], timeout_s=20, request_timeout_s=10
            )

        got, report = run(main())
        assert_bit_exact(got, want)
        assert report.refetched_chunks >= 1  # chunk 0 was hedged


def test_one_peer_cannot_hold_a_donor_s_replies_beyond_its_caps() -> None:
    """A peer that never handles replies, asking an hour per request: at most
    ``max_requests_per_peer`` of its requests are served at once, each for at most
    ``max_reply_timeout_s``, and other newcomers download meanwhile."""
    network, newcomer, nodes = swarm(1)
    want = snapshot()
    (donor,) = donate(nodes, want, max_requests_per_peer=8, max_reply_timeout_s=0.5)
    hog = network.add("hog")

    async def never_handled(sender: str, topic: str, payload: bytearray) -> None:
        await asyncio.Event().wait()

    hog.on_bulk(REPLY_TOPIC, never_handled)

    async def main() -> list[BaseException | None]:
        async def ask(index: int) -> None:
            request = Request(
                kind=RequestKind.CHUNK,
                request_id=index.to_bytes(16, "big"),
                version=want.version,
                index=index,
                timeout_ms=3_600_000,
            )
            await hog.send_bulk("donor0", REQUEST_TOPIC, encode_request(request), timeout_s=3600)

        started = time.monotonic()
        asks = [asyncio.create_task(ask(i)) for i in range(10)]
        await asyncio.sleep(0.05)
        # Served meanwhile (8 chunks in flight, the default: the cap is per peer).
        got, _ = await download_state(newcomer, ["donor0"], timeout_s=10)
        assert_bit_exact(got, want)
        results = await asyncio.gather(*asks, return_exceptions=True)
        assert time.monotonic() - started < 5.0
        return [r if isinstance(r, BaseException) else None for r in results]

    results = run(main())
    refused = [r for r in results if isinstance(r, PeerUnavailableError)]
    timed_out = [r for r in results if isinstance(r, DeadlineExceededError)]
    assert len(refused) == 2, results
    assert "at most 8" in str(refused[0])
    assert len(timed_out) == 8, results  # the donor gave up on its replies after 0.5 s
    assert donor.num_requests_refused == 2


def test_a_manifest_announcing_a_huge_state_takes_no_memory_before_its_chunks_come() -> None:
    """A 32 KiB manifest claiming 1 GiB, and no chunk ever: the newcomer allocated and zeroed
    the whole 1 GiB on its event loop at once (4.4 s for 4 GiB)."""
    network, newcomer, _ = swarm(0)
    liar = network.add("liar")
    total, chunk = 1 << 30, 1 << 20
    manifest = encode_manifest(
        version=1, total_bytes=total, chunk_bytes=chunk, meta={}, digests=[bytes(32)] * 1024
    )
    answer_with_manifest_only(liar, manifest)
    tracemalloc.start()
    try:
        with pytest.raises(PeerUnavailableError):  # (struck off: a fast link's floor)
            run(
                download_state(
                    newcomer,
                    ["liar"],
                    timeout_s=3,
                    request_timeout_s=1,
                    min_donor_bytes_per_s=float(1 << 30),
                )
            )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"peak {peak >> 20} MiB"


def test_a_download_outlives_a_donor_that_publishes_every_few_chunks() -> None:
    """DiLoCo publishes every outer step. Each publication used to replace the snapshot kept for
    downloads in progress, so a download spanning two outer steps got VERSION_GONE from every
    donor and started over, never to finish where outer steps are quicker than a download."""
    network, newcomer, _ = swarm(0)
    node = network.add("donor", FaultyBulkNode)
    (donor,) = donate([node], snapshot(version=1, seed=1), clock=FakeClock(start_s=1000.0))
    want = snapshot(version=1, seed=1)

    def next_outer_step(num_replies: int) -> None:
        if num_replies % 3 == 0:
            version = (donor.version or 0) + 1
            donor.publish(snapshot(version=version, seed=version))

    node.after_chunk = next_outer_step  # type: ignore[attr-defined]
    got, _ = run(download_state(newcomer, ["donor"], timeout_s=10))
    assert_bit_exact(got, want)
    assert (donor.version or 0) >= 4  # three and more publications while it downloaded


def test_a_donor_holds_at_most_two_snapshots_whatever_its_replies_wait_for() -> None:
    """A peer asking one chunk of each new version, its replies never handled: each request in
    flight kept the whole snapshot it was served from alive, one per version."""
    network = FakeBulkNetwork()
    node, hog = network.add("donor"), network.add("hog")
    donor = StateDonor(node, chunk_bytes=CHUNK)

    arrived = asyncio.Event()

    async def never_handled(sender: str, topic: str, payload: bytearray) -> None:
        arrived.set()
        await asyncio.Event().wait()

    hog.on_bulk(REPLY_TOPIC, never_handled)

    def alive() -> int:
        gc.collect()
        return sum(type(o) is SerializedSnapshot for o in gc.get_objects())

    async def main() -> int:
        before = alive()  # (other tests' may linger in tracebacks pytest keeps)
        asks = []
        for version in range(1, 9):
            donor.publish(snapshot(version=version, seed=version, numel=4_000))
            request = Request(
                kind=RequestKind.CHUNK,
                request_id=version.to_bytes(16, "big"),
                version=version,
                index=0,
                timeout_ms=3_600_000,
            )
            payload = encode_request(request)
            arrived.clear()
            asks.append(asyncio.create_task(hog.send_bulk("donor", REQUEST_TOPIC, payload)))
            await asyncio.wait_for(arrived.wait(), 5)  # its reply is on its way, never handled
        held = alive() - before
        for task in asks:
            task.cancel()
        await asyncio.gather(*asks, return_exceptions=True)
        return held

    assert run(main()) <= 2


def test_one_hung_donor_holds_the_manifests_up_for_the_grace_only() -> None:
    """The manifests were gathered from every donor before any was chosen: one donor that
    answers nothing cost every download its request timeout (30 s in a swarm)."""
    network, newcomer, nodes = swarm(2)
    hung = network.add("hung", FaultyBulkNode)
    want = snapshot()
    donate([*nodes, hung], want)
    hung.stall = True  # type: ignore[attr-defined]
    started = time.monotonic()
    got, report = run(
        download_state(newcomer, ["hung", "donor0", "donor1"], timeout_s=30, request_timeout_s=20)
    )
    assert_bit_exact(got, want)
    assert time.monotonic() - started < 10  # two of three agree: the third is not waited for
    assert set(report.bytes_per_donor) <= {"donor0", "donor1"}
    assert "hung" not in report.failed_donors  # slow is not struck off: it was not heard


def test_a_fast_donor_does_not_outvote_a_slower_majority() -> None:
    network, newcomer, _ = swarm(0)
    honest = [network.add(f"honest{i}", FaultyBulkNode) for i in range(2)]
    for node in honest:
        node.reply_delay_s = 0.3  # type: ignore[attr-defined]
    liar = network.add("liar")
    want = snapshot(version=5, seed=1)
    donate(honest, want)
    donate([liar], snapshot(version=5, seed=99))
    got, report = run(download_state(newcomer, ["liar", "honest0", "honest1"], timeout_s=30))
    assert_bit_exact(got, want)
    assert "differs from the majority" in report.failed_donors["liar"]


def test_a_tie_between_two_manifests_of_one_version_is_no_majority() -> None:
    """One honest donor and one with other bytes of the same version: the first listed won
    and the other was struck off as disagreeing with 'the majority'."""
    honest, forged = snapshot(version=5, seed=1), snapshot(version=5, seed=99)
    winners = set()
    for _ in range(24):
        _, newcomer, nodes = swarm(2)
        donate(nodes[:1], honest)
        donate(nodes[1:], forged)
        got, report = run(download_state(newcomer, ["donor0", "donor1"], timeout_s=10))
        (loser,) = report.failed_donors
        assert "tie" in report.failed_donors[loser]
        winners.add(int(got.tensors["model.w"].flatten()[0] == honest.tensors["model.w"][0, 0]))
    assert winners == {0, 1}  # either, by chance: not by place in the list (2**-23 to fail)


def test_no_donor_with_the_version_says_what_each_one_has() -> None:
    _, newcomer, nodes = swarm(2)
    donate(nodes, snapshot(version=4))
    with pytest.raises(PeerUnavailableError, match=r"version 5 .*donor0: has version 4"):
        run(download_state(newcomer, ["donor0", "donor1"], timeout_s=10, version=5))


def test_of_the_replaced_snapshots_the_donor_keeps_the_one_a_download_uses() -> None:
    clock = FakeClock(start_s=1000.0)
    donor = StateDonor(FakeBulkNetwork().add("donor"), chunk_bytes=CHUNK, grace_s=5.0, clock=clock)

    def asked(version: int) -> bool:
        """Whether a chunk request for ``version`` finds it (and counts as its use)."""
        served = donor._find(version)
        if served is not None:
            donor._done(served)
        return served is not None

    donor.publish(snapshot(version=1, seed=1, numel=2_000))
    assert asked(1)  # a download of version 1 is under way
    donor.publish(snapshot(version=2, seed=2, numel=2_000))
    donor.publish(snapshot(version=3, seed=3, numel=2_000))  # nobody asked for version 2
    assert not asked(2)
    clock.advance(3.0)
    assert asked(1)
    donor.publish(snapshot(version=4, seed=4, numel=2_000))  # version 1 still in use
    assert asked(1)
    clock.advance(6.0)  # past the grace since version 1 was last asked for
    assert not asked(1)
    donor.publish(snapshot(version=5, seed=5, numel=2_000))
    clock.advance(4.0)
    assert asked(4)  # replaced, and asked for within the grace
    clock.advance(4.0)
    assert asked(4)  # asked for within the grace
    clock.advance(6.0)
    assert not asked(4)


def test_a_bug_while_reading_a_manifest_reaches_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a donor's failures are kept as strikes; a bug in reading its answer was swallowed
    with the manifest requests' tasks and the download went on without that donor."""
    _, newcomer, nodes = swarm(1)
    donate(nodes, snapshot())

    def broken(body: object, limits: object) -> object:
        raise RuntimeError("a bug")

    monkeypatch.setattr(state_sync, "decode_manifest", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        run(download_state(newcomer, ["donor0"], timeout_s=10))


def test_a_node_that_downloaded_state_is_not_kept_alive_by_it() -> None:
    # The reply router, kept per node in a WeakKeyDictionary, held its node: every node that
    # ever downloaded state stayed alive for the life of the process, its donors' snapshots too.
    def download_once() -> weakref.ref[FakeBulkNode]:
        network, newcomer, _ = swarm(0)
        donate([network.add("donor")], snapshot())
        run(download_state(newcomer, ["donor"], timeout_s=10))
        return weakref.ref(newcomer)

    gone = download_once()
    gc.collect()
    assert gone() is None


def test_a_state_too_large_for_the_deadline_downloads_while_its_chunks_keep_coming() -> None:
    # A fixed deadline made a state of more than its transfer time impossible to download (each
    # try started over); the chunks' time now follows the state's size at a floor rate.
    _network, newcomer, nodes = swarm(1, FaultyBulkNode)
    want = snapshot()
    donate(nodes, want)
    nodes[0].reply_delay_s = 0.05  # type: ignore[attr-defined]  # 42 chunks: 2 s, one at a time
    got, report = run(
        download_state(
            newcomer, ["donor0"], timeout_s=0.5, max_chunks_in_flight=1, min_bytes_per_s=1024
        )
    )
    assert_bit_exact(got, want)
    assert report.seconds > 0.5
    # Slower than the floor: the error says the download was too slow, and how fast it went.
    with pytest.raises(DeadlineExceededError, match=r"fetched at [0-9.]+ MiB/s .* too slow"):
        run(
            download_state(
                newcomer, ["donor0"], timeout_s=0.5, max_chunks_in_flight=1, min_bytes_per_s=1e12
            )
        )
