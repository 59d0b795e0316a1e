"""Pairwise steps: every step a perfect matching, and when each step may start."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch
from comm_fakes import IdleJumpClock, inline_offload

from gossamer.comm.allreduce import AllReduceConfig, _send_order, all_reduce
from gossamer.comm.bandwidth import BandwidthMeter, SendRates, agreed_send_rates
from gossamer.comm.codecs import CodecPolicy
from gossamer.comm.fake_transport import FakeNetwork, FakeTransport
from gossamer.comm.plan import PartPlan
from gossamer.comm.steps import PairwiseSteps
from gossamer.comm.transport import (
    FRAME_NBYTES,
    CommMailbox,
    FrameKind,
    Message,
    message_bytes,
    message_nbytes,
    unpack_frame,
    wait_for_event,
)
from gossamer.core.clock import SystemClock
from gossamer.core.errors import ProtocolError


def _steps(n: int, me: int, chunks: int = 2) -> PairwiseSteps:
    async def make() -> PairwiseSteps:  # its events want a running loop on older Pythons
        return PairwiseSteps(n, me, [chunks] * n)

    return asyncio.run(make())


@pytest.mark.parametrize("n", [2, 3, 4, 7])
def test_every_step_is_a_perfect_matching(n: int) -> None:
    members = [_steps(n, me) for me in range(n)]
    for step in range(2 * (n - 1)):
        receivers = [m.sends_to[step] for m in members]
        assert sorted(receivers) == list(range(n))  # each downlink fed by exactly one sender
        assert all(r != me for me, r in enumerate(receivers))
        for me, member in enumerate(members):  # and the receiver expects exactly that sender
            assert members[member.sends_to[step]].receives_from[step] == me
    # reduce-scatter first (values to the part's owner), then all-gather (averages out),
    # backwards: its first step goes to the member the last reduce-scatter step went to
    first = members[0]
    assert [first.contribution_step(p) for p in (1, 2)][: n - 1] == list(range(min(2, n - 1)))
    assert first.result_step(n - 1) == n - 1
    assert first.result_step(1) == 2 * n - 3
    assert first.sends_to[n - 2] == first.sends_to[n - 1] == n - 1
    for me, member in enumerate(members):  # results arrive in the step their owner sends them
        for step in range(n - 1, 2 * (n - 1)):
            owner = member.receives_from[step]
            assert members[owner].result_step(me) == step


@pytest.mark.parametrize("n", [3, 4, 7])
def test_round_the_ring_every_all_gather_step_goes_to_the_member_behind(n: int) -> None:
    """Step t of the all-gather passes on the part t - 1 places ahead (t = 1: this member's
    own), which arrived from the member ahead in step t - 1; the steps count its chunks."""

    async def make(me: int) -> PairwiseSteps:
        return PairwiseSteps(n, me, [p + 1 for p in range(n)], ring=True)

    members = [asyncio.run(make(me)) for me in range(n)]
    for me, member in enumerate(members):
        assert member.ring
        for t in range(1, n):
            step = n - 2 + t
            assert member.sends_to[step] == member.behind == (me - 1) % n
            assert member.receives_from[step] == member.ahead == (me + 1) % n
            assert member.forward_step((me + t - 1) % n) == step
            assert member._to_send[step] == (me + t - 1) % n + 1  # that part's chunks
            assert member._to_receive[step] == (me + t) % n + 1
        assert member.result_step(member.behind) == n - 1  # its own averages: step 1
        assert member.result_step(member.ahead) is None  # nobody else gets them from it
        # the all-gather continues the last reduce-scatter step's flow: one destination
        assert member.flow_start(2 * n - 3) == n - 2
    # a member receives in all-gather step t what the member ahead passes on in it
    for me, member in enumerate(members):
        for t in range(1, n):
            passed = (member.ahead + t - 1) % n
            assert members[member.ahead].forward_step(passed) == n - 2 + t
            assert passed == (me + t) % n


def test_two_members_have_no_ring_to_go_round() -> None:
    async def make() -> PairwiseSteps:
        return PairwiseSteps(2, 0, [1, 1], ring=True)

    assert not asyncio.run(make()).ring


def test_the_first_all_gather_step_opens_with_the_last_reduce_scatter_step() -> None:
    """Both go to the same member: one flow, nothing to wait for between them."""
    steps = _steps(4, me=0, chunks=2)
    steps.receiver_ready(1, 2)
    steps.sent(0)
    steps.sent(0)
    steps.receiver_ready(2, 3)
    steps.sent(1)
    assert not steps.opened[2].is_set()
    steps.sent(1)
    assert steps.opened[2].is_set()  # the last reduce-scatter step, to member 3
    assert steps.opened[3].is_set()  # and the first all-gather step, to member 3 as well
    assert not steps.opened[4].is_set()  # to member 2: its answer and step 3's sends first


def test_a_step_opens_once_the_one_before_is_sent_and_its_receiver_answered() -> None:
    steps = _steps(4, me=0, chunks=2)
    assert [e.is_set() for e in steps.opened] == [True] + [False] * 5
    steps.receiver_ready(1, 2)  # step 1 goes to member 2, which already said its link is free
    steps.sent(0)
    assert not steps.opened[1].is_set()  # one message of step 0 still going
    assert steps.sent(0)  # the last one
    assert steps.opened[1].is_set()
    steps.sent(1)
    steps.sent(1)
    assert not steps.opened[2].is_set()  # member 3 has not answered
    steps.receiver_ready(2, 3)
    assert steps.opened[2].is_set()
    with pytest.raises(ProtocolError):
        steps.receiver_ready(3, 2)  # step 3 goes to member 1, not 2
    with pytest.raises(ProtocolError):
        steps.receiver_ready(9, 1)


def test_the_downlink_is_free_for_a_step_once_every_step_before_arrived_in_order() -> None:
    steps = _steps(4, me=0, chunks=2)
    assert [e.is_set() for e in steps.downlink_free] == [True] + [False] * 5
    steps.received_contribution(2, 0)  # step 1's sender (member 2) is early: not enough
    steps.received_contribution(2, 1)
    assert not steps.downlink_free[1].is_set()
    assert not steps.downlink_free[2].is_set()
    steps.received_contribution(3, 0)
    steps.received_contribution(3, 0)  # a repeat counts once
    assert not steps.downlink_free[1].is_set()
    steps.received_contribution(3, 1)  # step 0 is in: steps 1 and 2 are free at once
    assert [e.is_set() for e in steps.downlink_free] == [True, True, True] + [False] * 3
    steps.check_asker(1, 2)
    with pytest.raises(ProtocolError):
        steps.check_asker(1, 3)  # member 3 sends step 0 to this member, not step 1
    steps.member_failed(1)  # step 2's sender: nothing more comes from it
    assert steps.downlink_free[3].is_set()
    steps.release()
    assert all(e.is_set() for e in steps.downlink_free)


def test_patience_and_failures_open_steps_without_the_receivers_answer() -> None:
    steps = _steps(3, me=0, chunks=1)
    steps.sent(0)
    assert not steps.opened[1].is_set()
    steps.stop_waiting(1)  # waited long enough for member 2's answer
    assert steps.opened[1].is_set()
    assert steps.opened[2].is_set()  # the first all-gather step goes to member 2 as well
    steps.sent(1)
    steps.sent(2)
    assert not steps.opened[3].is_set()
    steps.member_failed(1)  # step 3 sends to member 1: nobody to wait for
    assert steps.opened[3].is_set()
    failed = _steps(3, me=0, chunks=1)
    failed.member_failed(1)  # step 0 sends to member 1: nothing to send
    assert failed.sends_done[0].is_set()
    assert not failed.opened[1].is_set()  # step 1's receiver (member 2) has not answered
    failed.receiver_ready(1, 2)
    assert failed.opened[1].is_set()


def test_without_words_a_step_opens_as_soon_as_the_one_before_is_sent() -> None:
    steps = _steps(4, me=0, chunks=2)
    steps.without_words()
    assert not steps.asks
    steps.sent(0)
    assert not steps.opened[1].is_set()  # one message of step 0 still going
    steps.sent(0)
    assert steps.opened[1].is_set()  # no receiver answered: none is asked
    assert not steps.opened[2].is_set()  # one destination at a time all the same


def test_all_at_once_nobody_waits_for_a_downlink() -> None:
    steps = _steps(4, me=0, chunks=2)
    steps.open_all()
    assert all(e.is_set() for e in steps.opened)
    assert all(e.is_set() for e in steps.downlink_free)


class _Recording(FakeTransport):
    """A fake peer whose data messages take ``send_s`` each on the clock, recorded as (start,
    end, dest) and their frame kinds in ``kinds``; header-only messages (a step's question) go
    at once, unrecorded."""

    def __init__(
        self,
        network: FakeNetwork,
        peer_id: str,
        log: list[tuple[float, float, str]],
        send_s: float = 1.0,
        *,
        one_at_a_time: bool = False,
    ):
        super().__init__(network, peer_id)
        self.log = log
        self.asks: list[tuple[float, int]] = []
        """(time, step) of each step's question this peer sent."""
        self.kinds: list[int] = []
        self.send_s = send_s
        self.uplink = asyncio.Lock() if one_at_a_time else contextlib.nullcontext()

    async def send(self, peer_id: str, message: Message, *, timeout_s: float) -> None:
        if message_nbytes(message) <= FRAME_NBYTES:
            frame, _ = unpack_frame(memoryview(message_bytes(message)))
            if frame.kind is FrameKind.STEP_ASK:
                self.asks.append((self.network.clock.monotonic(), frame.chunk))
            await super().send(peer_id, message, timeout_s=timeout_s)
            return
        async with self.uplink:  # one message on the wire at a time: the uplink is shared
            started = self.network.clock.monotonic()
            await self.network.clock.sleep_async(self.send_s)
        await super().send(peer_id, message, timeout_s=timeout_s)
        self.log.append((started, self.network.clock.monotonic(), peer_id))
        self.kinds.append(message_bytes(message)[4])  # the frame header's kind byte


_Log = list[tuple[float, float, str]]


def _recorded_round(
    send_s: list[float],
    *,
    order: str = "steps",
    ring: bool = False,
    kinds: dict[str, list[int]] | None = None,
    asks: dict[str, list[tuple[float, int]]] | None = None,
) -> dict[str, _Log]:
    """Four members average (in steps with or without the receivers' word, the all-gather
    round the ring or not, or all at once on uplinks that carry one message at a time); member
    i's data messages take ``send_s[i]``
    each. ``kinds`` receives each member's frame kinds in its log's order, ``asks`` the
    (time, step) of each question it sent."""
    in_steps = order != "open"
    clock = IdleJumpClock()
    members = [f"peer-{i}" for i in range(4)]
    logs: dict[str, _Log] = {m: [] for m in members}
    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randn(4000, generator=gen) for _ in members]
    config = AllReduceConfig(
        timeout_s=600.0,
        chunk_elements=500 if in_steps else 100,
        order=order,
        ring_all_gather=ring,
        codec=CodecPolicy(codec="none", block_size=50, min_compressed_numel=0),
    )

    async def main() -> list[torch.Tensor]:
        network = FakeNetwork(clock)
        boxes = []
        for i, m in enumerate(members):
            transport = _Recording(network, m, logs[m], send_s[i], one_at_a_time=not in_steps)
            network.transports[m] = transport
            boxes.append(CommMailbox(transport, clock))
            if kinds is not None:
                kinds[m] = transport.kinds
            if asks is not None:
                asks[m] = transport.asks
        results = await asyncio.gather(
            *(
                all_reduce(
                    [inputs[i]],
                    mailbox=boxes[i],
                    members=members,
                    round_key="steps",
                    config=config,
                    clock=clock,
                    offload=inline_offload,
                )
                for i in range(4)
            )
        )
        for result in results:
            assert result.report.in_steps == in_steps
        return [r.tensors[0] for r in results]

    averages = asyncio.run(clock.run(main()))
    want = torch.stack(inputs).double().mean(0)
    for average in averages:
        torch.testing.assert_close(average.double(), want, atol=1e-6, rtol=0)
    return logs


@pytest.mark.parametrize(("order", "ring"), [("steps", False), ("ordered", False), ("steps", True)])
def test_a_member_sends_to_one_destination_at_a_time_in_step_order(order: str, ring: bool) -> None:
    logs = _recorded_round([1.0] * 4, order=order, ring=ring)
    members = list(logs)
    for me, member in enumerate(members):
        log = sorted(logs[member])
        dests = [members.index(d) for _, _, d in log]
        shifts = [(d - me) % 4 for d in dests]
        # reduce-scatter to shifts 1, 2, 3, then all-gather to shifts 3, 2, 1 (round the ring
        # every all-gather message to shift 3, the member just behind: its own part's averages
        # and the two parts it passes on, one destination for the rest of the round)
        half = len(shifts) // 2
        gather = [3] * half if ring else sorted(shifts[half:], reverse=True)
        assert shifts == sorted(shifts[:half]) + gather
        for (start, _, dest), (_, end, other) in zip(log[1:], log, strict=False):
            if dest != other:
                assert start >= end  # a new destination only once the last step was sent


def test_the_question_after_a_continued_flow_waits_for_its_earlier_step() -> None:
    """The first all-gather step opens with the last reduce-scatter step; the question for the
    step after them goes once that reduce-scatter step is sent, not when it opens (the
    receiver would wait two steps' time for its answer, past its limit on slow links)."""
    asks: dict[str, list[tuple[float, int]]] = {}
    logs = _recorded_round([1.0] * 4, asks=asks)
    for me, member in enumerate(logs):
        ahead = (me + 3) % 4  # where reduce-scatter step 2 and all-gather step 3 go
        ends = sorted(end for _, end, dest in logs[member] if dest == f"peer-{ahead}")
        asked = {step: at for at, step in asks[member]}
        assert sorted(asked) == [1, 2, 4, 5]  # step 3 continues step 2: nobody to ask
        assert asked[4] >= ends[1], (member, asked, ends)  # after step 2's two messages
        assert asked[4] < ends[-1]  # while step 3's still go


@pytest.mark.parametrize("ring", [False, True])
def test_a_late_member_never_has_two_senders_feeding_its_downlink(ring: bool) -> None:
    """Member 3 sends a little slower: the others wait for their receivers' answers instead of
    starting a step into a downlink that still drains member 3's (the old rule did not)."""
    logs = _recorded_round([1.0, 1.0, 1.0, 1.1], ring=ring)
    into: dict[str, list[tuple[float, float, str]]] = {m: [] for m in logs}
    for sender, log in logs.items():
        for start, end, dest in log:
            into[dest].append((start, end, sender))
    for receiver, arrivals in into.items():
        arrivals.sort()
        for (start, _, sender), (_, end, other) in zip(arrivals[1:], arrivals, strict=False):
            if sender != other:
                assert start >= end - 1e-9, (receiver, sender, other, start, end)


def test_all_at_once_a_member_sends_its_averages_only_after_its_contributions() -> None:
    """Sharing the uplink, early averages slowed the contributions the other owners' averages
    wait on (8-bit codec, 100 Mbit/s lab links: uplinks busy 77-78%)."""
    kinds: dict[str, list[int]] = {}
    logs = _recorded_round([1.0] * 4, order="open", kinds=kinds)
    for member, log in logs.items():
        contributions = [e for (_, e, _), k in zip(log, kinds[member], strict=True) if k == 1]
        averages = [s for (s, _, _), k in zip(log, kinds[member], strict=True) if k == 2]
        assert contributions
        assert averages
        assert min(averages) >= max(contributions)


@pytest.mark.parametrize(
    ("part_elements", "order"),
    [
        (20_000, "open"),  # 80 KB parts: all three at once fit 50 ms of 100 Mbit/s
        (100_000, "ordered"),  # 400 KB parts: one fits, three do not
        (200_000, "open"),  # 800 KB parts: not even one fits; ordering them measured slower
        (500_000, "steps"),  # 2 MB parts: 0.16 s steps, worth the receivers' word
    ],
)
def test_the_send_order_follows_the_queue_the_burst_would_meet(
    part_elements: int, order: str
) -> None:
    config = AllReduceConfig(codec=CodecPolicy(codec="none"), chunk_elements=1 << 20)
    plan = PartPlan.create(
        [f"peer-{i}" for i in range(4)],
        4 * part_elements,
        chunk_elements=config.chunk_elements,
        align=config.codec.block_size,
    )
    assert _send_order(plan, config, None) == order  # a peer that measured nothing: 100 Mbit/s


def _orders_picked(rates_b_per_s: list[float], *, agreed: bool) -> list[bool]:
    """Whether each of four members went in steps, its meter at ``rates_b_per_s[i]``, picking
    by the rates the members agreed on or by its own meter."""
    clock = IdleJumpClock()
    members = [f"peer-{i}" for i in range(4)]
    gen = torch.Generator().manual_seed(5)
    inputs = [torch.randn(20_000, generator=gen) for _ in members]  # 20 KB parts
    config = AllReduceConfig(timeout_s=600.0, codec=CodecPolicy(codec="none"))
    meters = []
    for rate in rates_b_per_s:
        meters.append(BandwidthMeter())
        meters[-1].observe(rate)
    rates = agreed_send_rates(
        [m.estimate_bytes_per_s for m in meters], [m.floor_bytes_per_s for m in meters]
    )

    async def main() -> list[bool]:
        network = FakeNetwork(clock)
        boxes = []
        for m in members:
            network.transports[m] = FakeTransport(network, m)
            boxes.append(CommMailbox(network.transports[m], clock))
        results = await asyncio.gather(
            *(
                all_reduce(
                    [inputs[i]],
                    mailbox=boxes[i],
                    members=members,
                    round_key="order",
                    config=config,
                    meter=meters[i],
                    send_rates=rates if agreed else None,
                    clock=clock,
                    offload=inline_offload,
                )
                for i in range(4)
            )
        )
        want = torch.stack(inputs).double().mean(0)
        for result in results:
            torch.testing.assert_close(result.tensors[0].double(), want, atol=1e-6, rtol=0)
        return [r.report.in_steps for r in results]

    return asyncio.run(clock.run(main()))


def test_every_member_picks_the_send_order_the_agreed_rates_give() -> None:
    # Two members measured 100 KB/s (a 20 KB part: 0.2 s steps), two 1 GB/s (all at once):
    # each by its own meter, the round mixed members in steps with members sending all at once
    # (one uplink then carries up to a third more); by the agreed rates, the slowest member's,
    # every member goes in steps.
    rates = [1e5, 1e9, 1e5, 1e9]
    assert _orders_picked(rates, agreed=False) == [True, False, True, False]
    assert _orders_picked(rates, agreed=True) == [True] * 4


def test_the_agreed_send_rates_are_the_slowest_estimate_and_the_median_floor() -> None:
    assert agreed_send_rates([4e6, 1e6, 2e6], [3e6, 5e5, 0.0]) == SendRates(1e6, 1e6)
    assert agreed_send_rates([4e6, 3e6, 2e6], [3e6, 5e5, 1e6]) == SendRates(2e6, 1e6)
    # the floors above the slowest estimate: that estimate bounds them
    assert agreed_send_rates([4e6, 2e6], [9e6, 8e6]) == SendRates(2e6, 2e6)
    # none (an older peer's entry) or unreadable: that member's estimate counts
    assert agreed_send_rates([4e6, 2e6, 3e6], [float("nan"), 1e6, 0.0]) == SendRates(2e6, 2e6)
    # one peer claiming next to nothing is taken at a hundredth of the median, no lower
    assert agreed_send_rates([1e7, 1e7, 1.0], [1e7, 1e7, 1.0]) == SendRates(1e5, 1e7 / 100)
    # one low floor (a newcomer's, measured from small rounds, or a lie) moves nobody's order
    assert agreed_send_rates([1e7] * 4, [1e7, 1e7, 1e7, 1e6]) == SendRates(1e7, 1e7)
    # nothing readable: the default every peer announces before it measured
    assert agreed_send_rates([0.0, float("inf")], [0.0, 0.0]) == SendRates(12.5e6, 12.5e6)
    with pytest.raises(ValueError, match="one per member"):
        agreed_send_rates([1e6], [])
    with pytest.raises(ValueError, match="one per member"):
        agreed_send_rates([], [])


def test_a_cancel_that_comes_as_the_wait_for_a_step_ends_reaches_the_waiter() -> None:
    # The step opens, and the waiter is cancelled (a pass the owner no longer wants) while the
    # wait cleans up after itself: the waiter must see the cancel, not go on to send.
    async def scenario() -> list[str]:
        clock = SystemClock()
        opened = asyncio.Event()
        log: list[str] = []

        async def waiter() -> None:
            try:
                await wait_for_event(opened, clock.monotonic() + 10.0, clock)
                await asyncio.sleep(0.05)
                log.append("went on")
            except asyncio.CancelledError:
                log.append("cancelled")
                raise

        task = asyncio.create_task(waiter())
        await asyncio.sleep(0.01)
        opened.set()
        for _ in range(3):  # into the wait's clean-up of its helper tasks
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert task.cancelled()
        return log

    assert asyncio.run(scenario()) == ["cancelled"]
