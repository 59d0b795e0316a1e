"""State sync for a newcomer behind a thin downlink: it keeps in flight what its own link
carries, so its donors are not struck off for its slowness, and hostile donors still are.

Scaled as the swarm's download in test_state_sync_slow_links (1/100 in time, 1/256 in bytes):
4 KiB chunks are the swarm's 1 MiB ones, 0.3 s its request timeout of 30 s, 1.2 s its two
minutes of silence. The newcomer's downlink carries 0.25 Mbit/s (scaled): every donor's replies
cross it, sharing it as TCP streams share a bottleneck.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
from state_sync_fakes import (
    FakeBulkNetwork,
    FakeBulkNode,
    FakeSharedLink,
    LinkedRepliesNode,
    add_linked_node,
    assert_same_state,
    random_snapshot,
)

from gossamer.train.state_sync import StateDonor, StateSnapshot, download_state
from gossamer.train.state_sync_wire import REQUEST_TOPIC, RequestKind, decode_request

CHUNK = 4096
_SCALE_BYTES = 256
_SCALE_TIME = 100
_FLOOR = 32768 / _SCALE_BYTES * _SCALE_TIME
"""The swarm's floor rate (32 KiB/s), scaled."""
_DOWNLINK_BYTES_PER_S = 0.25e6 / 8 / _SCALE_BYTES * _SCALE_TIME
"""0.25 Mbit/s, scaled: a 1 MiB chunk takes 33.5 s alone on it, eight at once 268 s."""
_SWARM_ARGS = {
    "timeout_s": 1.2,
    "request_timeout_s": 0.3,
    "min_bytes_per_s": _FLOOR,
    "min_donor_bytes_per_s": _FLOOR,
    "max_quiet_s": 1.2,
}
_STATE_4_MB = 4_000_000 // 4 // _SCALE_BYTES
"""Parameters (float32) of a 4 MB state, scaled (4 chunks)."""


def _donors(
    network: FakeBulkNetwork, names: list[str], want: StateSnapshot, link: FakeSharedLink
) -> dict[str, LinkedRepliesNode]:
    """Donors of ``want`` whose replies all cross ``link``, the newcomer's downlink."""
    nodes = {}
    for name in names:
        node = add_linked_node(network, name, link)
        StateDonor(node, chunk_bytes=CHUNK).publish(want)
        nodes[name] = node
    return nodes


@pytest.mark.parametrize("num_donors", [1, 2, 3])
def test_a_newcomer_behind_a_quarter_megabit_takes_a_4_mb_state(num_donors: int) -> None:
    """Eight 1 MiB chunks at once over 0.25 Mbit/s take 268 s each (2.68 s scaled), more than
    the two minutes a donor may be silent: honest donors were struck off for the newcomer's
    slowness, or the deadline came with nothing fetched (the lab, 3 donors: '0/4 chunks ...
    when the deadline passed' after 120 s). Now it keeps in flight what its link carries in a
    request timeout (one chunk here), and takes the state at its link's pace (4 MB in about
    130 s). (One donor got by on the old code: its short last chunk came early and reset its
    silence.)"""
    network = FakeBulkNetwork()
    newcomer = network.add("newcomer")
    want = random_snapshot(_STATE_4_MB)
    link = FakeSharedLink(_DOWNLINK_BYTES_PER_S)
    names = [f"donor{i}" for i in range(num_donors)]
    _donors(network, names, want, link)
    got, report = asyncio.run(download_state(newcomer, names, **_SWARM_ARGS))
    assert_same_state(got, want)
    assert report.failed_donors == {}
    wire_s = report.total_bytes / _DOWNLINK_BYTES_PER_S
    assert wire_s * 0.9 < report.seconds < wire_s * 1.6  # (the link's pace, little lost)


def _trickle_with_gaps(
    node: FakeBulkNode, period_s: float, struck: list[float]
) -> Callable[[str, str, bytearray], Awaitable[None]]:
    """Serve ``node``'s chunk requests one at a time, each after ``period_s``; note in ``struck``
    when the newcomer gave one up (struck the donor off)."""
    serve = node.handlers[REQUEST_TOPIC]
    lock = asyncio.Lock()

    async def handler(sender: str, topic: str, payload: bytearray) -> None:
        if decode_request(payload).kind is RequestKind.CHUNK:
            try:
                async with lock:
                    await asyncio.sleep(period_s)
            except asyncio.CancelledError:
                struck.append(time.monotonic())
                raise
        await serve(sender, topic, payload)

    return handler


def test_a_trickling_donor_is_struck_off_as_soon_behind_a_thin_downlink() -> None:
    """Beside an honest donor, behind the thin downlink, a donor that sends a chunk every 250 s
    (2.5 s scaled) is struck off within the two minutes of silence (1.2 s scaled) it would be
    allowed behind a fast link, and the honest donor serves the rest: a thin link loosens
    nothing for it. (The old code struck the honest donor off too, and the download failed.)"""
    network = FakeBulkNetwork()
    newcomer = network.add("newcomer")
    want = random_snapshot(4 * _STATE_4_MB)  # (16 chunks: it outlasts the trickler's gap)
    link = FakeSharedLink(_DOWNLINK_BYTES_PER_S)
    nodes = _donors(network, ["honest", "trickler"], want, link)
    struck: list[float] = []
    nodes["trickler"].handlers[REQUEST_TOPIC] = _trickle_with_gaps(nodes["trickler"], 2.5, struck)

    async def main() -> None:
        got, report = await asyncio.wait_for(
            download_state(newcomer, ["honest", "trickler"], **_SWARM_ARGS), timeout=30
        )
        assert_same_state(got, want)
        assert set(report.failed_donors) == {"trickler"}
        assert "no chunk in" in report.failed_donors["trickler"]
        assert report.bytes_per_donor == {"honest": report.total_bytes}

    started = time.monotonic()
    asyncio.run(main())
    assert struck, "the trickler's request was never given up"
    assert struck[0] - started < 2.0  # (as behind a fast link: test_state_sync_slow_links)


class _CountingDonor(FakeBulkNode):
    """A donor that notes the most chunk requests of ours it held at once."""

    def __init__(self, network: FakeBulkNetwork, peer_id: str) -> None:
        super().__init__(network, peer_id)
        self.num_held = self.most_held = 0

    def start_counting(self) -> None:
        serve = self.handlers[REQUEST_TOPIC]

        async def handler(sender: str, topic: str, payload: bytearray) -> None:
            if decode_request(payload).kind is not RequestKind.CHUNK:
                await serve(sender, topic, payload)
                return
            self.num_held += 1
            self.most_held = max(self.most_held, self.num_held)
            try:
                await asyncio.sleep(0.005)  # (a fast link: each chunk takes 5 ms)
                await serve(sender, topic, payload)
            finally:
                self.num_held -= 1

        self.handlers[REQUEST_TOPIC] = handler


def test_a_newcomer_on_a_fast_link_keeps_its_full_window() -> None:
    """The window begins at two chunks (what the floor rate carries in the silence allowed past
    the request timeout) and grows to all eight as soon as a chunk shows the link is fast."""
    network = FakeBulkNetwork()
    newcomer = network.add("newcomer")
    node = network.add("donor", _CountingDonor)
    assert isinstance(node, _CountingDonor)
    want = random_snapshot(4 * _STATE_4_MB)
    StateDonor(node, chunk_bytes=CHUNK).publish(want)
    node.start_counting()
    got, report = asyncio.run(download_state(newcomer, ["donor"], **_SWARM_ARGS))
    assert_same_state(got, want)
    assert report.failed_donors == {}
    assert node.most_held == 8
