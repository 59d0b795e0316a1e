"""State sync where the donors, not the newcomer's link, are the bottleneck: the window of
requests in flight grows to use every donor, and still fits a link of the newcomer's that
turns out to be the bottleneck.

Scaled as the swarm's download in test_state_sync_thin_downlink (1/100 in time, 1/256 in bytes):
4 KiB chunks are the swarm's 1 MiB ones, 0.3 s its request timeout of 30 s, 1.2 s its two
minutes of silence.
"""

from __future__ import annotations

import asyncio
import math

import torch
from state_sync_fakes import (
    FakeBulkNetwork,
    FakeSharedLink,
    LinkedRepliesNode,
    add_linked_node,
    assert_same_state,
)

from gossamer.train.state_sync import StateDonor, StateSnapshot, download_state
from gossamer.train.state_sync_requests import _ChunkWindow
from gossamer.train.state_sync_wire import REQUEST_TOPIC, RequestKind, decode_request

CHUNK = 4096
_SCALE_BYTES = 256
_SCALE_TIME = 100
_FLOOR = 32768 / _SCALE_BYTES * _SCALE_TIME
"""The swarm's floor rate (32 KiB/s), scaled."""
_SWARM_ARGS = {
    "timeout_s": 1.2,
    "request_timeout_s": 0.3,
    "min_bytes_per_s": _FLOOR,
    "min_donor_bytes_per_s": _FLOOR,
    "max_quiet_s": 1.2,
}
_UPLINK_BYTES_PER_S = 0.3e6 / 8 / _SCALE_BYTES * _SCALE_TIME
"""0.3 Mbit/s, scaled: a 1 MiB chunk takes 28 s alone on it."""


def _snapshot(num_chunks: int) -> StateSnapshot:
    gen = torch.Generator().manual_seed(0)
    numel = num_chunks * CHUNK // 4 - 64  # (room for the header: num_chunks chunks in all)
    return StateSnapshot(
        version=7, tensors={"w": torch.randn(numel, generator=gen)}, meta={"step": 3}
    )


def _slow_uplink(network: FakeBulkNetwork, name: str) -> LinkedRepliesNode:
    """A donor whose replies cross its own slow uplink, shared by its replies under way."""
    return add_linked_node(network, name, FakeSharedLink(_UPLINK_BYTES_PER_S))


def test_eight_donors_with_slow_uplinks_are_all_kept_busy() -> None:
    """Eight donors at 0.3 Mbit/s up each, a newcomer on a fast link: each donor's uplink is
    the bottleneck, a chunk takes 28 s whatever the window. A window fitted to what came was
    fitted to itself (one or two chunks in flight, 16 MB in 233 s where asking eight at once
    took 63 s). Now it grows while chunk times do not rise with it, and the state comes at
    about the donors' aggregate pace."""
    network = FakeBulkNetwork()
    newcomer = network.add("newcomer")
    num_chunks = 96
    want = _snapshot(num_chunks)
    names = [f"donor{i}" for i in range(8)]
    for name in names:
        StateDonor(_slow_uplink(network, name), chunk_bytes=CHUNK).publish(want)
    got, report = asyncio.run(download_state(newcomer, names, **_SWARM_ARGS))
    assert_same_state(got, want)
    assert report.failed_donors == {}
    # (each donor sends its eighth of the chunks one after another at its uplink's rate)
    bound_s = math.ceil(report.total_bytes / CHUNK / len(names)) * CHUNK / _UPLINK_BYTES_PER_S
    assert report.seconds < 1.3 * bound_s


def test_a_laggy_donor_alone_is_asked_for_many_chunks_at_once() -> None:
    """One donor that answers each chunk request 30 s after it came, however many are out,
    and a fast link: a window fitted to what came stayed at one or two chunks (7.5 times as
    long as asking eight at once); now it grows to the full window."""
    network = FakeBulkNetwork()
    newcomer = network.add("newcomer")
    donor = network.add("donor")
    num_chunks = 48
    want = _snapshot(num_chunks)
    StateDonor(donor, chunk_bytes=CHUNK).publish(want)
    serve = donor.handlers[REQUEST_TOPIC]
    lag_s = 0.3

    async def lagging(sender: str, topic: str, payload: bytearray) -> None:
        if decode_request(payload).kind is RequestKind.CHUNK:
            await asyncio.sleep(lag_s)  # (the donor's lag, not a synchronisation)
        await serve(sender, topic, payload)

    donor.handlers[REQUEST_TOPIC] = lagging
    got, report = asyncio.run(download_state(newcomer, ["donor"], **_SWARM_ARGS))
    assert_same_state(got, want)
    assert report.failed_donors == {}
    full_windows_s = math.ceil(report.total_bytes / CHUNK / 8) * lag_s  # (eight at once)
    assert report.seconds < 1.6 * full_windows_s


def _window() -> _ChunkWindow:
    """Swarm units: 1 MiB chunks, a donor may be silent 120 s."""
    return _ChunkWindow(
        max_size=8, chunk_bytes=1 << 20, grow_below_s=60.0, shrink_above_s=90.0, size=2
    )


def test_the_window_grows_while_chunks_come_quickly_and_settles_where_our_link_fills() -> None:
    """Donors as the bottleneck (28 s a chunk whatever the window): it grows to the full
    window. Our link as the bottleneck (1 Mbit/s, 8.4 s a chunk for each request sharing it):
    it grows while chunks take under 60 s, and holds where they take 60-90 s."""
    window = _window()
    for _ in range(10):
        window.delivered(1 << 20, 28.0)
    assert window.size == 8

    window = _window()
    for _ in range(20):
        window.delivered(1 << 20, 8.4 * window.size)
    assert window.size == 8  # (8 x 8.4 = 67 s: held)

    window = _window()
    for _ in range(20):
        window.delivered(1 << 20, 33.5 * window.size)  # (0.25 Mbit/s)
    assert window.size == 2  # (67 s: held; three would take 100 s)


def test_a_slow_chunk_halves_the_window_and_a_short_one_is_scaled_to_a_full_chunk() -> None:
    """A chunk over three quarters of the silence allowed halves the window (at least one), as
    does a donor struck off. A short last chunk is judged by its time per byte: 20 s for a
    tenth of a chunk is 200 s a chunk (slow), not quick."""
    window = _window()
    window.size = 8
    window.delivered(1 << 20, 100.0)
    assert window.size == 4
    window.delivered(1 << 20, 75.0)
    assert window.size == 4  # (between the marks: held)
    window.delivered((1 << 20) // 10, 20.0)
    assert window.size == 2
    window.size = 1
    window.delivered(1 << 20, 300.0)
    assert window.size == 1
    window.size = 8
    window.lost()  # (a donor struck off: its chunks go to fewer donors)
    assert window.size == 4


def test_one_late_chunk_does_not_pin_the_window() -> None:
    """Two honest donors at 0.3 Mbit/s up and one on a fast uplink that answers its first
    chunk at once, its second 20 s late, then nothing. The late chunk, after a window grown
    on quick ones, read as our link filling up: the window was pinned at one for the rest
    of the download (48 MB in 1257 s, where the two honest uplinks carry it in 640 s). Now
    it halves once, the honest donors' chunks grow it back, and the state comes at about
    their pace plus the silence the hostile one is allowed."""
    network = FakeBulkNetwork()
    newcomer = network.add("newcomer")
    num_chunks = 32
    want = _snapshot(num_chunks)
    hostile = network.add("hostile")
    StateDonor(hostile, chunk_bytes=CHUNK).publish(want)
    serve = hostile.handlers[REQUEST_TOPIC]
    num_asked = 0

    async def late_then_silent(sender: str, topic: str, payload: bytearray) -> None:
        nonlocal num_asked
        if decode_request(payload).kind is RequestKind.CHUNK:
            num_asked += 1
            if num_asked == 2:
                await asyncio.sleep(0.2)  # (20 s late, scaled; not a synchronisation)
            elif num_asked > 2:
                await asyncio.Event().wait()  # (silent: it is struck off)
        await serve(sender, topic, payload)

    hostile.handlers[REQUEST_TOPIC] = late_then_silent
    honest = ["donor0", "donor1"]
    for name in honest:
        StateDonor(_slow_uplink(network, name), chunk_bytes=CHUNK).publish(want)
    got, report = asyncio.run(download_state(newcomer, ["hostile", *honest], **_SWARM_ARGS))
    assert_same_state(got, want)
    assert set(report.failed_donors) == {"hostile"}
    honest_s = report.total_bytes / len(honest) / _UPLINK_BYTES_PER_S
    assert report.seconds < 1.3 * honest_s + _SWARM_ARGS["max_quiet_s"]
