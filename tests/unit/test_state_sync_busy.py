"""A donor's room for requests: shared fairly (a late reply given up for a peer holding less,
never cut short otherwise), and a newcomer that finds a donor busy asks it again later instead
of striking it off."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import torch
from state_sync_fakes import FakeBulkNetwork, FakeBulkNode

from gossamer.core.clock import FakeClock
from gossamer.core.errors import PeerUnavailableError
from gossamer.train.state_sync import StateDonor, StateSnapshot, download_state
from gossamer.train.state_sync_wire import (
    DONOR_BUSY,
    REPLY_TOPIC,
    REQUEST_TOPIC,
    Request,
    RequestKind,
    encode_request,
)

CHUNK = 4096


def _snapshot(version: int = 7) -> StateSnapshot:
    gen = torch.Generator().manual_seed(0)
    return StateSnapshot(
        version=version,
        tensors={"w": torch.randn(40_000, generator=gen), "step": torch.tensor(3)},
        meta={"step": 3},
    )


def _assert_same(got: StateSnapshot, want: StateSnapshot) -> None:
    assert got.version == want.version
    assert got.meta == want.meta
    assert got.tensors.keys() == want.tensors.keys()
    for name, tensor in want.tensors.items():
        assert torch.equal(got.tensors[name], tensor), name


class _RecordingNode(FakeBulkNode):
    """Records the deadline of every reply it sends."""

    def __init__(self, network: FakeBulkNetwork, peer_id: str) -> None:
        super().__init__(network, peer_id)
        self.reply_timeouts_s: list[float] = []

    async def send_bulk(self, peer_id: str, topic: str, payload: Any, **kwargs: Any) -> None:
        if topic == REPLY_TOPIC:
            self.reply_timeouts_s.append(kwargs["timeout_s"])
        await super().send_bulk(peer_id, topic, payload, **kwargs)


async def _until(condition: Callable[[], bool], what: str) -> None:
    """Wait for ``condition`` (of in-memory nodes on this loop) under a deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while loop.time() < deadline:
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{what} within 5 s")


def _hold(hog: FakeBulkNode, donor: str, version: int, count: int) -> list[asyncio.Task[None]]:
    """Send ``count`` chunk requests of ``hog``, which never takes the replies, asking an hour
    each (the tasks end when the donor gives up on the replies, or refuses)."""
    released = asyncio.Event()

    async def never_handled(sender: str, topic: str, payload: bytearray) -> None:
        await released.wait()  # (never set: the donor's deadline or eviction ends the reply)

    hog.on_bulk(REPLY_TOPIC, never_handled)

    async def ask(index: int) -> None:
        request = Request(
            kind=RequestKind.CHUNK,
            request_id=(1000 + index).to_bytes(16, "big"),
            version=version,
            index=index % 4,
            timeout_ms=3_600_000,
        )
        await hog.send_bulk(donor, REQUEST_TOPIC, encode_request(request), timeout_s=3600)

    return [asyncio.create_task(ask(i)) for i in range(count)]


async def _end(tasks: list[asyncio.Task[None]]) -> list[BaseException | None]:
    """What each of ``tasks`` ended with; those still waiting are cancelled."""
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    return [r if isinstance(r, BaseException) else None for r in results]


def test_a_newcomer_gets_room_from_a_peer_that_fills_the_donor() -> None:
    """A peer that never takes its replies filled every request slot, each held up to 120 s:
    a newcomer arriving then was refused and struck the donor off at once."""
    network = FakeBulkNetwork()
    newcomer, node, hog = network.add("newcomer"), network.add("donor"), network.add("hog")
    want = _snapshot()
    donor = StateDonor(node, chunk_bytes=CHUNK, max_requests=4, max_requests_per_peer=4)
    donor.publish(want)

    async def main() -> list[BaseException | None]:
        asks = _hold(hog, "donor", want.version, 4)
        await _until(lambda: donor._num_serving == {"hog": 4}, "the hog fills the donor")
        async with asyncio.timeout(10):
            got, report = await download_state(newcomer, ["donor"], timeout_s=10)
        _assert_same(got, want)
        assert report.failed_donors == {}
        return await _end(asks)

    results = asyncio.run(main())
    assert donor.num_requests_evicted >= 2  # the newcomer's share: half of the room
    evicted = [r for r in results if isinstance(r, PeerUnavailableError)]
    assert len(evicted) == donor.num_requests_evicted
    assert all(DONOR_BUSY in str(r) and "given up" in str(r) for r in evicted)


def test_a_peer_holding_its_share_is_refused_as_busy_not_given_room() -> None:
    network = FakeBulkNetwork()
    node, hog, other = network.add("donor"), network.add("hog"), network.add("other")
    want = _snapshot()
    donor = StateDonor(node, chunk_bytes=CHUNK, max_requests=4, max_requests_per_peer=4)
    donor.publish(want)

    async def main() -> None:
        asks = _hold(hog, "donor", want.version, 2) + _hold(other, "donor", want.version, 2)
        await _until(lambda: donor._num_serving == {"hog": 2, "other": 2}, "the donor is full")
        (error,) = await asyncio.gather(
            *_hold(other, "donor", want.version, 1), return_exceptions=True
        )
        assert isinstance(error, PeerUnavailableError)
        assert DONOR_BUSY in str(error)
        assert "its share or more" in str(error)
        assert donor.num_requests_evicted == 0
        await _end(asks)

    asyncio.run(main())


def test_a_reply_waits_as_long_as_its_request_asks_whatever_its_size() -> None:
    """Cut at 5 s plus its bytes at 1 MiB/s, a reply to a newcomer behind a link under about
    10 Mbit/s missed its deadline every time (8 chunks of 1 MiB in flight take 16 s at
    4 Mbit/s), and the newcomer could not download at all. Only the cap on what a request may
    ask bounds it; a late reply may be given up for a peer holding less, when the donor is full."""
    network = FakeBulkNetwork()
    node = network.add("donor", _RecordingNode)
    hog = network.add("hog")
    want = _snapshot()
    donor = StateDonor(node, chunk_bytes=CHUNK, max_reply_timeout_s=90.0)
    donor.publish(want)
    assert isinstance(node, _RecordingNode)

    async def main() -> None:
        asks = _hold(hog, "donor", want.version, 2)  # (each asking an hour)
        await _until(lambda: len(node.reply_timeouts_s) == 2, "both replies leave")
        await _end(asks)

    asyncio.run(main())
    assert node.reply_timeouts_s == [90.0, 90.0]


def test_late_replies_of_peers_holding_one_each_are_given_up_for_a_newcomer_holding_none() -> None:
    """Made-up ids holding one request each, never taking the replies, filled the donor: a
    newcomer holding none could take room from nobody (none held two more than it), was
    refused as busy until it struck the donor off, and the ids asked again whenever a reply of
    theirs was dropped."""
    network = FakeBulkNetwork()
    newcomer, node = network.add("newcomer"), network.add("donor")
    hogs = [network.add(f"hog{i}") for i in range(4)]
    want = _snapshot()
    clock = FakeClock()
    donor = StateDonor(
        node, chunk_bytes=CHUNK, max_requests=4, max_requests_per_peer=4, clock=clock
    )
    donor.publish(want)

    async def main() -> list[BaseException | None]:
        asks = [task for hog in hogs for task in _hold(hog, "donor", want.version, 1)]
        await _until(lambda: sum(donor._num_serving.values()) == 4, "the hogs fill the donor")
        fresh = await asyncio.gather(
            *_hold(newcomer, "donor", want.version, 1), return_exceptions=True
        )
        assert isinstance(fresh[0], PeerUnavailableError)  # none late yet: busy
        assert donor.num_requests_evicted == 0
        clock.advance(60.0)  # every hog's reply is late now
        async with asyncio.timeout(10):
            got, report = await download_state(newcomer, ["donor"], timeout_s=10)
        _assert_same(got, want)
        assert report.failed_donors == {}
        return await _end(asks)

    results = asyncio.run(main())
    assert donor.num_requests_evicted >= 1
    evicted = [r for r in results if isinstance(r, PeerUnavailableError)]
    assert evicted
    assert all(DONOR_BUSY in str(r) and "given up" in str(r) for r in evicted)


def test_a_donor_full_of_a_late_reply_makes_room_for_a_newcomer_within_seconds() -> None:
    """With two donors, one full of a reply nobody takes, the newcomer waited the busy one's
    whole request timeout (30 s by default) for a majority. Its busy answer is no vote (one
    fast donor would outvote the rest), but the late reply's room goes to the newcomer."""
    network = FakeBulkNetwork()
    newcomer, full, free, hog = (network.add(n) for n in ("newcomer", "full", "free", "hog"))
    want = _snapshot()
    full_donor = StateDonor(full, chunk_bytes=CHUNK, max_requests=1)
    full_donor.publish(want)
    StateDonor(free, chunk_bytes=CHUNK).publish(want)

    async def main() -> float:
        asks = _hold(hog, "full", want.version, 1)
        await _until(lambda: full_donor._num_serving == {"hog": 1}, "the hog fills the donor")
        loop = asyncio.get_running_loop()
        started = loop.time()
        got, report = await download_state(
            newcomer, ["full", "free"], timeout_s=60, request_timeout_s=30
        )
        took = loop.time() - started
        _assert_same(got, want)
        assert report.failed_donors == {}
        await _end(asks)
        return took

    assert asyncio.run(main()) < 10


def test_a_busy_donor_is_asked_again_later_not_struck_off() -> None:
    """A newcomer asking more chunks at once than a donor serves per peer struck it off at its
    first busy refusal, and with one donor the download failed."""
    network = FakeBulkNetwork()
    newcomer, node = network.add("newcomer"), network.add("donor")
    want = _snapshot()
    donor = StateDonor(node, chunk_bytes=CHUNK, max_requests_per_peer=2)
    donor.publish(want)
    got, report = asyncio.run(
        download_state(newcomer, ["donor"], timeout_s=20, max_chunks_in_flight=8)
    )
    _assert_same(got, want)
    assert report.failed_donors == {}
    assert report.bytes_per_donor == {"donor": report.total_bytes}
    assert donor.num_requests_refused > 0  # it was busy, and asked again


def test_one_fast_donor_does_not_outvote_two_that_were_busy_for_a_moment() -> None:
    """Counting a busy refusal as an answer, the newcomer chose the one manifest that had
    arrived: a hostile donor's, over two honest donors that were full for a moment."""
    network = FakeBulkNetwork()
    newcomer, hog = network.add("newcomer"), network.add("hog")
    want = _snapshot()
    honest = []
    for name in ("b", "c"):
        donor = StateDonor(network.add(name), chunk_bytes=CHUNK, max_requests=1)
        donor.publish(want)
        honest.append(donor)
    lie = StateSnapshot(version=want.version, tensors={"w": torch.full((10,), 666.0)}, meta={})
    StateDonor(network.add("h"), chunk_bytes=CHUNK).publish(lie)

    async def main() -> None:
        asks = _hold(hog, "b", want.version, 1) + _hold(hog, "c", want.version, 1)
        await _until(
            lambda: all(d._num_serving == {"hog": 1} for d in honest), "the hog fills b and c"
        )
        download = asyncio.create_task(
            download_state(newcomer, ["h", "b", "c"], timeout_s=20, request_timeout_s=10)
        )
        await _until(
            lambda: all(d.num_requests_refused >= 1 for d in honest), "b and c refuse as busy"
        )
        await _end(asks)  # (their room comes free)
        got, report = await download
        _assert_same(got, want)
        assert "h" in report.failed_donors

    asyncio.run(main())


def test_a_donor_busy_for_longer_than_a_request_may_take_is_struck_off() -> None:
    """Asked for its manifest, a donor busy past ``request_timeout_s`` is struck off like one
    that did not answer: a download whose only donor stays busy fails then, not at its
    deadline."""
    network = FakeBulkNetwork()
    newcomer, full, hog = (network.add(n) for n in ("newcomer", "full", "hog"))
    want = _snapshot()
    # Room for one request, the hog's, not late yet: the newcomer can take it from nobody.
    full_donor = StateDonor(full, chunk_bytes=CHUNK, max_requests=1)
    full_donor.publish(want)

    async def main() -> float:
        asks = _hold(hog, "full", want.version, 1)
        await _until(lambda: full_donor._num_serving == {"hog": 1}, "the hog fills the donor")
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(PeerUnavailableError) as excinfo:
            await download_state(newcomer, ["full"], timeout_s=60, request_timeout_s=0.5)
        assert DONOR_BUSY in str(excinfo.value)
        assert "times in a row" in str(excinfo.value)
        await _end(asks)
        return loop.time() - started

    assert asyncio.run(main()) < 5
    assert full_donor.num_requests_refused >= 2  # asked again before it was struck off


def test_a_reply_to_a_newcomer_behind_a_thin_link_may_take_minutes() -> None:
    """At 120 s at most, the replies to a newcomer under about 0.55 Mbit/s (8 of 1 MiB share
    its link: 134 s each at 0.5 Mbit/s) were all given up, and it could not download."""
    network = FakeBulkNetwork()
    node = network.add("donor", _RecordingNode)
    hog = network.add("hog")
    want = _snapshot()
    donor = StateDonor(node, chunk_bytes=CHUNK)
    donor.publish(want)
    assert isinstance(node, _RecordingNode)

    async def main() -> None:
        asks = _hold(hog, "donor", want.version, 1)  # (asking an hour)
        await _until(lambda: len(node.reply_timeouts_s) == 1, "the reply leaves")
        await _end(asks)

    asyncio.run(main())
    assert node.reply_timeouts_s == [600.0]
