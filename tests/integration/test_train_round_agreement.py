"""A round entry that only its publisher holds is counted by no member.

Three real nodes on 127.0.0.1. ``c`` joined the run, then its entry in round ``outer/3``
reached its own store and nowhere else: what a peer killed during its put leaves behind (its
put stores the record on itself first). Members that asked ``c`` itself would count ``c`` and
members that read after it died would not; they would then form different groups and wait
for each other to their deadlines (a fault test lost 54-62 s that way). Both others must
leave ``c`` out, form the same group of two and say that ``c`` did not come.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import pytest
import torch

from gossamer.comm.bandwidth import BandwidthMeter, SendRates
from gossamer.net.node import Node
from gossamer.net.records import sign_record
from gossamer.train import swarm_averager
from gossamer.train.swarm_averager_config import SwarmAveragerConfig
from gossamer.train.swarm_round_records import round_entry_key
from loopback_nodes import average_all, start_averagers

JOIN_WINDOW_S = 3.0


def test_an_entry_only_its_publisher_holds_is_counted_by_no_member() -> None:
    config = SwarmAveragerConfig(
        run_id="agree", join_window_s=JOIN_WINDOW_S, round_timeout_s=10.0, backend="p2p"
    )
    with contextlib.ExitStack() as stack:
        averagers = start_averagers(stack, 3, config, join_version=3)
        c = averagers[2]
        node = c.node_thread.node
        entry = {"at": time.time(), "bw": 1e7, "inc": c.incarnation}
        key = round_entry_key(f"{config.run_id}/outer/3")
        record = sign_record(
            node.identity, key, json.dumps(entry).encode(), now_s=time.time(), ttl_s=60
        )
        node.dht.handle_store(record)  # on c alone: its put stopped there

        outcomes, _ = average_all(averagers[:2], "outer/3")
        for index in (0, 1):
            outcome = outcomes[index]
            assert outcome.group_size == 2, outcome
            assert outcome.failed_peers == [], outcome  # c was no member anywhere
            assert outcome.missing_peers == [c.peer_id], outcome
            torch.testing.assert_close(outcome.tensors[0], torch.full((100,), 0.5))


def test_a_peer_whose_lookup_is_slower_than_the_window_does_not_split_the_round() -> None:
    """``slow``'s lookup of the round's replicas takes 1.5 s, three times the join window.

    Its entry used to be stamped before the lookup: ``fast`` closed the round at its window's
    end, after that stamp, and read the members for the last time before the entry landed, so
    it averaged alone while ``slow`` counted both and waited for ``fast`` until the round's
    deadline. Stamped after the lookup, the entry lands a store's round trip after its stamp:
    ``slow`` comes after the close and both agree that it missed the round.
    """
    config = SwarmAveragerConfig(
        run_id="slowput",
        join_window_s=0.5,
        propagation_grace_s=0.5,
        round_timeout_s=10.0,
        backend="p2p",
    )
    with contextlib.ExitStack() as stack:
        averagers = start_averagers(stack, 2, config)
        slow = averagers[1]
        key = round_entry_key(f"{config.run_id}/outer/0")

        async def slow_lookups(node: Node) -> None:
            lookup = node.dht.lookup

            async def slowly(target: bytes) -> list[str]:
                if target == key:
                    await asyncio.sleep(1.5)
                return await lookup(target)

            node.dht.lookup = slowly  # type: ignore[method-assign]

        slow.node_thread.run(slow_lookups, timeout_s=10)

        outcomes, took_s = average_all(averagers, "outer/0")
        assert outcomes[0].group_size == 1, outcomes[0]  # fast: the window ended before slow came
        assert outcomes[1].excluded, outcomes[1]  # slow: it came after the close, as fast saw
        torch.testing.assert_close(outcomes[0].tensors[0], torch.zeros(100))
        assert max(took_s.values()) < 5.0, took_s  # nobody waited for a member that never came


def test_a_peer_whose_entry_every_replica_refused_sits_the_round_out_at_once() -> None:
    # Past a key's limit (a run of more peers than it holds) every replica refuses a late
    # peer's entry. Counting itself anyway, it formed a round nobody else had and waited in
    # it to the deadline.
    config = SwarmAveragerConfig(
        run_id="refused", join_window_s=JOIN_WINDOW_S, round_timeout_s=10.0, backend="p2p"
    )
    with contextlib.ExitStack() as stack:
        averagers = start_averagers(stack, 3, config, join_version=3)
        c = averagers[2]
        dht = c.node_thread.node.dht
        refused = round_entry_key(f"{config.run_id}/outer/3")
        put = dht.put

        async def refusing_put(key: bytes, value: bytes, *args: Any, **kwargs: Any) -> int:
            if key == refused:  # stored on c itself (as every put is), refused everywhere else
                dht.handle_store(
                    sign_record(dht.identity, key, value, now_s=time.time(), ttl_s=60), own=True
                )
                return 0
            return await put(key, value, *args, **kwargs)

        dht.put = refusing_put  # type: ignore[method-assign]
        outcomes, took_s = average_all(averagers, "outer/3")
        assert outcomes[2].group_size == 0  # missed the round: it takes the swarm's state
        assert took_s[2] < 5.0  # (not the round's 10 s deadline)
        for index in (0, 1):
            assert outcomes[index].group_size == 2, outcomes[index]
            torch.testing.assert_close(outcomes[index].tensors[0], torch.full((100,), 0.5))


def test_members_whose_meters_differ_pick_their_send_order_by_the_same_rates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each member's own meter picked its send order: where the members' figures straddled the
    rule, one went in pairwise steps and the other sent all at once. Every member must pick by
    the same agreed rates (the slowest member's estimate) and so the same order."""
    rates: dict[str, SendRates | None] = {}
    in_steps: dict[str, bool] = {}
    own_meters = False
    real_all_reduce = swarm_averager.all_reduce

    async def recording(*args: Any, **kwargs: Any) -> Any:
        if own_meters:  # as before the rates were agreed
            kwargs["send_rates"] = None
        result = await real_all_reduce(*args, **kwargs)
        rates[kwargs["mailbox"].peer_id] = kwargs.get("send_rates")
        in_steps[kwargs["mailbox"].peer_id] = result.report.in_steps
        return result

    monkeypatch.setattr(swarm_averager, "all_reduce", recording)
    config = SwarmAveragerConfig(
        run_id="rates", join_window_s=JOIN_WINDOW_S, round_timeout_s=10.0, backend="p2p"
    )
    with contextlib.ExitStack() as stack:
        averagers = start_averagers(stack, 2, config)

        def average(round_key: str) -> None:
            # Two parts of 4,096 values (16 KiB): a step takes 0.16 s at 100 KB/s (in steps)
            # and 0.10 s at 160 KB/s (all at once, under min_step_s).
            for averager, figure in zip(averagers, (1e5, 1.6e5), strict=True):
                averager.meter = BandwidthMeter()
                averager.meter.observe(figure)
            outcomes, _ = average_all(averagers, round_key, numel=8192)
            assert all(o.group_size == 2 for o in outcomes.values()), outcomes

        own_meters = True
        average("outer/0")
        assert sorted(in_steps.values()) == [False, True], in_steps  # the split it had
        own_meters = False
        average("outer/1")
    assert set(rates) == {a.peer_id for a in averagers}
    assert list(rates.values()) == [SendRates(1e5, 1e5)] * 2, rates
    assert list(in_steps.values()) == [True, True], in_steps
