"""A member on a thin uplink whose averages reach some members before the result deadline and
others after it: the members must still end the round with the same averages.

Known to fail (strict xfail): the members that lack its averages at their result deadline
declare it failed and reassign its part, a member that already holds them had finished, and the
members that reassigned are dropped from the round for it; four members end with four different
results (steps order, 300 B/s; in open order at 275-325 B/s, three or four). Fixing it needs
the round to settle on the finished member's averages instead (the thin member was still
sending them to the others), not to drop everyone who reassigned.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch
from comm_fakes import IdleJumpClock, inline_offload

from gossamer.comm.allreduce import AllReduceConfig, all_reduce
from gossamer.comm.codecs import CodecPolicy
from gossamer.comm.fake_transport import FakeNetwork, FakeTransport
from gossamer.comm.report import AllReduceResult
from gossamer.comm.transport import CommMailbox, Message, message_nbytes
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


class _FairUplink(FakeTransport):
    """A fake peer whose uplink moves ``bytes_per_s``, shared equally among the messages it
    sends at the time (as TCP shares a link among connections: one begun later slows down one
    begun earlier); a send's deadline covers its time on the wire."""

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


def _run(config: AllReduceConfig, bytes_per_s: float) -> dict[int, AllReduceResult]:
    """One round of 4 members; member 0's uplink moves ``bytes_per_s``."""
    clock = IdleJumpClock()
    members = [f"peer-{i}" for i in range(4)]
    gen = torch.Generator().manual_seed(9)
    inputs = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in members]

    async def main() -> dict[int, AllReduceResult]:
        network = FakeNetwork(clock)
        network.transports[members[0]] = _FairUplink(network, members[0], bytes_per_s)
        transports = [network.transports[members[0]]]
        transports += [network.transport(m) for m in members[1:]]
        mailboxes = [CommMailbox(t, clock) for t in transports]

        async def one(i: int) -> AllReduceResult:
            return await all_reduce(
                inputs[i],
                mailbox=mailboxes[i],
                members=members,
                round_key="run/thin-uplink",
                config=config,
                clock=clock,
                offload=inline_offload,
            )

        async with asyncio.TaskGroup() as group:
            tasks = {i: group.create_task(one(i)) for i in range(len(members))}
        return {i: t.result() for i, t in tasks.items()}

    return asyncio.run(clock.run(main()))


@pytest.mark.xfail(reason="members that reassigned a finished member's part are dropped")
def test_members_end_a_round_with_a_thin_uplink_member_on_the_same_averages() -> None:
    config = dataclasses.replace(CONFIG, order="steps", ring_all_gather=False)
    results = _run(config, bytes_per_s=300.0)
    kept = [i for i, r in results.items() if r.report.excluded is None]
    summary = {i: (r.report.excluded, r.report.failed) for i, r in results.items()}
    # At most the thin member is dropped, and the others hold the same averages.
    assert len(kept) >= 3, summary
    for i in kept:
        for got, first in zip(results[i].tensors, results[kept[0]].tensors, strict=True):
            torch.testing.assert_close(got, first, atol=0, rtol=0)
