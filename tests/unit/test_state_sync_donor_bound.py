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
from state_sync_fakes import FakeBulkNetwork, FakeBulkNode, FakeSharedLink

from gossamer.train.state_sync import StateDonor, StateSnapshot, download_state
from gossamer.train.state_sync_requests import _FittedWindow
from gossamer.train.state_sync_wire import REPLY_TOPIC, REQUEST_TOPIC, RequestKind, decode_request

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


def _assert_same(got: StateSnapshot, want: StateSnapshot) -> None:
    assert got.version == want.version
    assert got.meta == want.meta
    for name, tensor in want.tensors.items():
        assert torch.equal(got.tensors[name], tensor), name


class _SlowUplink(FakeBulkNode):
    """A donor whose replies cross its own slow uplink, shared by its replies under way."""

    def __init__(self, network: FakeBulkNetwork, peer_id: str) -> None:
        super().__init__(network, peer_id)
        self.link = FakeSharedLink(_UPLINK_BYTES_PER_S)

    async def send_bulk(
        self,
        peer_id: str,
        topic: str,
        payload: bytes | bytearray | memoryview,
        *,
        num_streams: int = 1,
        timeout_s: float = 60.0,
    ) -> None:
        if topic == REPLY_TOPIC:
            await self.link.carry(len(payload))
        await super().send_bulk(
            peer_id, topic, payload, num_streams=num_streams, timeout_s=timeout_s
        )


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
        StateDonor(network.add(name, _SlowUplink), chunk_bytes=CHUNK).publish(want)
    got, report = asyncio.run(download_state(newcomer, names, **_SWARM_ARGS))
    _assert_same(got, want)
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
    _assert_same(got, want)
    assert report.failed_donors == {}
    full_windows_s = math.ceil(report.total_bytes / CHUNK / 8) * lag_s  # (eight at once)
    assert report.seconds < 1.6 * full_windows_s


def _window() -> _FittedWindow:
    return _FittedWindow(max_size=8, chunk_bytes=CHUNK, window_s=30.0, probe_s=60.0, size=2)


def _deliver(window: _FittedWindow, num_in_flight: int, wire_s: float) -> None:
    """``num_in_flight`` chunks, asked together, came together after ``wire_s``."""
    window.elapse(wire_s, num_in_flight)
    for _ in range(num_in_flight):
        window.delivered("donor", CHUNK, wire_s, wire_s * num_in_flight)


def test_the_window_grows_while_chunk_times_hold_and_fits_our_link_once_they_rise() -> None:
    """Swarm units: 28 s a chunk with two out, then with four out. Held: the donors are the
    bottleneck, so it grows, each step at most doubling. Risen in proportion (a shared link's
    mark): fitted to our link, chunks within the request timeout (30 s), and it grows no
    further by probing."""
    window = _window()
    _deliver(window, 2, 28.0)
    assert window.size == 4
    _deliver(window, 4, 28.0)
    assert window.size == 8
    assert not window.link_bound

    window = _window()
    _deliver(window, 2, 28.0)
    assert window.size == 4
    _deliver(window, 4, 56.0)  # (twice the requests, twice as long)
    assert window.link_bound
    assert window.size == 2  # (4 * 30 / 56)
    _deliver(window, 2, 28.0)
    assert window.size == 2  # (what our link brings in 30 s, not a probe's 60 s)


def test_a_chunk_slower_than_half_the_silence_allowed_fits_the_window_at_once() -> None:
    """A thin link of ours seen from the first chunks (two out, 67 s each behind 0.25 Mbit/s)
    is not probed further: the window is fitted to 30 s at once."""
    window = _window()
    _deliver(window, 2, 67.0)
    assert window.size == 1
