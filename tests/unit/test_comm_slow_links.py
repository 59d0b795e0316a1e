"""Members on thin links whose messages share them (a downlink taking the others' messages at
once, an uplink carrying a member's own at once) are not failed while their links carry the
round in time, where a failure detector watches them; each message is slower than its own share
of the round implies. A member that takes nothing is still failed within the round."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import pytest
import torch
from comm_fakes import IdleJumpClock, inline_offload

from gossamer.comm.allreduce import AllReduceConfig, all_reduce
from gossamer.comm.codecs import CodecPolicy
from gossamer.comm.fake_transport import FakeNetwork, FakeTransport
from gossamer.comm.report import AllReduceResult, PartOutcome
from gossamer.comm.transport import CommMailbox, Message, message_nbytes
from gossamer.core.clock import FakeClock
from gossamer.core.errors import DeadlineExceededError

CONFIG = AllReduceConfig(
    timeout_s=60.0,
    send_timeout_s=5.0,
    chunk_elements=500,
    max_in_flight_per_peer=2,
    codec=CodecPolicy(codec="none", block_size=64, min_compressed_numel=0),
)
SHAPES = [(40, 50), (7,), (3, 300), (1,)]
"""2908 values: 11.6 KB a member, a part of about 2.9 KB in two messages."""
ORDERS = [("open", False), ("ordered", False), ("steps", False), ("steps", True)]


def _always_alive(clock: FakeClock, peer: str) -> bool:
    return True


class _ThinDownlink(FakeTransport):
    """A fake peer whose downlink takes ``bytes_per_s``, one message at a time in the order
    they came (a queue ahead of a message delays it as a fair share of the link would: the
    last of k messages at once ends when all k are through)."""

    def __init__(self, network: FakeNetwork, peer_id: str, bytes_per_s: float) -> None:
        super().__init__(network, peer_id)
        self.bytes_per_s = bytes_per_s
        self._wire = asyncio.Lock()

    async def accept(self, sender: str, message: Message) -> None:
        async with self._wire:
            await self.network.clock.sleep_async(message_nbytes(message) / self.bytes_per_s)
        await super().accept(sender, message)


class _FairUplink(FakeTransport):
    """A fake peer whose uplink moves ``bytes_per_s``, shared equally among the messages it
    sends at the time (as TCP shares a link among connections: one begun later slows down
    one begun earlier); a send's deadline covers its time on the wire."""

    _QUANTUM_S = 0.05

    def __init__(self, network: FakeNetwork, peer_id: str, bytes_per_s: float) -> None:
        super().__init__(network, peer_id)
        self.bytes_per_s = bytes_per_s
        self._num_sending = 0

    async def send(self, peer_id: str, message: Message, *, timeout_s: float) -> None:
        clock = self.network.clock
        deadline_s = clock.monotonic() + timeout_s
        left = float(message_nbytes(message))
        self._num_sending += 1
        try:
            while left > 0:
                if clock.monotonic() >= deadline_s:
                    raise DeadlineExceededError(f"{peer_id} did not take it in {timeout_s} s")
                share = self.bytes_per_s / self._num_sending
                step_s = min(self._QUANTUM_S, left / share)
                await clock.sleep_async(step_s)
                left -= share * step_s
        finally:
            self._num_sending -= 1
        await super().send(peer_id, message, timeout_s=max(0.001, deadline_s - clock.monotonic()))


def _run(
    inputs: list[list[torch.Tensor]],
    config: AllReduceConfig,
    bytes_per_s: float,
    thin: Callable[[FakeNetwork, str, float], FakeTransport] = _ThinDownlink,
    detector: Callable[[FakeClock, str], bool] | None = _always_alive,
) -> tuple[dict[int, AllReduceResult], dict[int, float]]:
    """One round of ``len(inputs)`` members; member 0's transport is ``thin(network, peer,
    bytes_per_s)``; every member's failure detector says ``detector(clock, peer)`` (None:
    no detector). Returns each member's result and when it ended, on the round's clock."""
    clock = IdleJumpClock()
    members = [f"peer-{i}" for i in range(len(inputs))]
    watch = detector
    ended_at: dict[int, float] = {}
    alive = None if watch is None else (lambda peer: watch(clock, peer))

    async def main() -> dict[int, AllReduceResult]:
        network = FakeNetwork(clock)
        network.transports[members[0]] = thin(network, members[0], bytes_per_s)
        transports = [network.transports[members[0]]]
        transports += [network.transport(m) for m in members[1:]]
        mailboxes = [CommMailbox(t, clock) for t in transports]

        async def one(i: int) -> AllReduceResult:
            result = await all_reduce(
                inputs[i],
                mailbox=mailboxes[i],
                members=members,
                round_key="run/slow-downlink",
                config=config,
                clock=clock,
                offload=inline_offload,
                alive=alive,
            )
            ended_at[i] = clock.monotonic()
            return result

        async with asyncio.TaskGroup() as group:
            tasks = {i: group.create_task(one(i)) for i in range(len(inputs))}
        return {i: t.result() for i, t in tasks.items()}

    results = asyncio.run(clock.run(main()))
    return results, ended_at


@pytest.mark.parametrize(("order", "ring"), ORDERS)
def test_a_member_on_a_thin_downlink_that_takes_the_round_in_time_is_not_failed(
    order: str, ring: bool
) -> None:
    # Member 0's downlink takes 400 B/s: its round (the three others' contributions to its
    # part and their averages, about 17 KB) takes some 44 s of the round's 60 s. The three
    # send to it at once, so each message waits behind the others' (up to 12 KB queued, 30 s),
    # where the allowance from the sender's own share of the round gave about 15-26 s: they
    # failed member 0 (lab: tests/netlab/test_comm_slow_member.py).
    gen = torch.Generator().manual_seed(0)
    inputs = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(4)]
    config = dataclasses.replace(CONFIG, order=order, ring_all_gather=ring)
    results, ended_at = _run(inputs, config, bytes_per_s=400.0)
    want = [torch.stack([x[t].double() for x in inputs]).mean(0) for t in range(len(SHAPES))]
    for i, result in results.items():
        assert result.report.failed == {}, (i, result.report.failed)
        assert all(p.outcome is PartOutcome.AVERAGED for p in result.report.parts), i
        for got, expected in zip(result.tensors, want, strict=True):
            torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=0)
    assert max(ended_at.values()) > CONFIG.send_timeout_s + 15.0  # (the downlink was that slow)


def test_a_member_on_a_thin_uplink_that_sends_its_messages_at_once_fails_nobody() -> None:
    # Member 0's uplink moves 400 B/s, shared among its messages: sending its contributions
    # to the three other parts at once (six messages, 8.7 KB), each ends some 22 s in, where
    # the first had been given the send timeout plus its own share of the round (15 s): it
    # failed its first receiver (lab: tests/netlab/test_comm_slow_member.py). Its whole round
    # (about 17 KB) takes some 44 s of 60.
    gen = torch.Generator().manual_seed(1)
    inputs = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(4)]
    config = dataclasses.replace(CONFIG, order="open", ring_all_gather=False)
    results, ended_at = _run(inputs, config, bytes_per_s=400.0, thin=_FairUplink)
    want = [torch.stack([x[t].double() for x in inputs]).mean(0) for t in range(len(SHAPES))]
    for i, result in results.items():
        assert result.report.failed == {}, (i, result.report.failed)
        assert all(p.outcome is PartOutcome.AVERAGED for p in result.report.parts), i
        for got, expected in zip(result.tensors, want, strict=True):
            torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=0)
    assert max(ended_at.values()) > CONFIG.send_timeout_s + 15.0  # (the uplink was that slow)


class _TakesNothing(FakeTransport):
    """A fake peer that takes no message (its handler stuck) but sends its own, and answers
    its failure detector's heartbeats (``bytes_per_s`` unused)."""

    def __init__(self, network: FakeNetwork, peer_id: str, bytes_per_s: float) -> None:
        super().__init__(network, peer_id)

    async def accept(self, sender: str, message: Message) -> None:
        await asyncio.Event().wait()  # never taken: the sender's deadline ends it


def _survivors_agree_without_member_0(results: dict[int, AllReduceResult]) -> None:
    """Members 1-3 failed member 0, ended before the deadline, with the same averages."""
    for i in (1, 2, 3):
        assert "peer-0" in results[i].report.failed, (i, results[i].report.failed)
        assert not results[i].report.deadline_hit, i
        for got, first in zip(results[i].tensors, results[1].tensors, strict=True):
            torch.testing.assert_close(got, first, atol=0, rtol=0)


@pytest.mark.parametrize(("order", "ring"), ORDERS)
def test_a_watched_member_that_takes_nothing_is_failed_within_the_round(
    order: str, ring: bool
) -> None:
    # The detector reports member 0 alive throughout, so a message to it may take the
    # allowance of links shared with the others' sends (its part: half the round, plus the
    # send timeout), but no longer: the others fail it and end the round together, before
    # its deadline, each with the same averages.
    gen = torch.Generator().manual_seed(2)
    inputs = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(4)]
    config = dataclasses.replace(CONFIG, order=order, ring_all_gather=ring)
    results, _ = _run(inputs, config, 0.0, thin=_TakesNothing)
    _survivors_agree_without_member_0(results)


def test_without_a_detector_a_member_that_takes_nothing_is_failed_by_its_first_sends() -> None:
    # With nothing to say whether member 0 is alive, a send to it may take the send timeout
    # plus the sender's own share of the round (a quarter of the buffer here: 5 + 15 s), not
    # the longer allowance of shared links: the others fail it about as early as before.
    gen = torch.Generator().manual_seed(3)
    inputs = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(4)]
    config = dataclasses.replace(CONFIG, order="open", ring_all_gather=False)
    results, ended_at = _run(inputs, config, 0.0, thin=_TakesNothing, detector=None)
    _survivors_agree_without_member_0(results)
    _, watched_ended_at = _run(inputs, config, 0.0, thin=_TakesNothing)
    survivors = (1, 2, 3)
    # (the detector's word is what buys the longer wait)
    assert max(ended_at[i] for i in survivors) < min(watched_ended_at[i] for i in survivors)
    assert max(ended_at[i] for i in survivors) < CONFIG.send_timeout_s + 0.5 * CONFIG.timeout_s


def test_a_member_that_hangs_is_failed_when_the_detector_reports_it_gone() -> None:
    # Member 0 takes nothing from the start; the detector reports it gone 3 s in (a paused
    # process stops answering heartbeats): the others fail it then, not at the end of the
    # allowance of shared links, and end their round well before the send timeout's.

    def gone_at_3_s(clock: FakeClock, peer: str) -> bool:
        return peer != "peer-0" or clock.monotonic() < 3.0

    gen = torch.Generator().manual_seed(4)
    inputs = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(4)]
    config = dataclasses.replace(CONFIG, order="open", ring_all_gather=False)
    results, ended_at = _run(inputs, config, 0.0, thin=_TakesNothing, detector=gone_at_3_s)
    _survivors_agree_without_member_0(results)
    reasons = [results[i].report.failed["peer-0"] for i in (1, 2, 3)]
    assert any("failure detector" in why for why in reasons), reasons
    assert max(ended_at[i] for i in (1, 2, 3)) < CONFIG.send_timeout_s
