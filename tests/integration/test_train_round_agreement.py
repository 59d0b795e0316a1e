"""A round entry that only its publisher holds is counted by no member.

Three real nodes on 127.0.0.1. ``c`` joined the run, then its entry in round ``outer/3``
reached its own store and nowhere else: what a peer killed during its put leaves behind (its
put stores the record on itself first). Members that asked ``c`` itself would count ``c`` and
members that read after it died would not; they would then form different groups and wait
for each other to their deadlines (a fault test lost 54-62 s that way). Both others must
leave ``c`` out, form the same group of two and say that ``c`` did not come.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time

import torch

from gossamer.net.records import sign_record
from gossamer.train.averaging import AverageOutcome
from gossamer.train.swarm_averager import SwarmAverager, SwarmAveragerConfig, round_entry_key
from loopback_nodes import start_node_threads

JOIN_WINDOW_S = 3.0


def test_an_entry_only_its_publisher_holds_is_counted_by_no_member() -> None:
    config = SwarmAveragerConfig(
        run_id="agree", join_window_s=JOIN_WINDOW_S, round_timeout_s=10.0, backend="p2p"
    )
    outcomes: dict[int, AverageOutcome] = {}
    errors: list[BaseException] = []
    with contextlib.ExitStack() as stack:
        averagers = []
        for node_thread in start_node_threads(stack, 3):
            averager = SwarmAverager(node_thread, config)
            stack.callback(averager.close)
            averager.join_run(3)
            averagers.append(averager)
        c = averagers[2]
        node = c.node_thread.node
        entry = {"at": time.time(), "bw": 1e7, "inc": c.incarnation}
        key = round_entry_key(f"{config.run_id}/outer/3")
        record = sign_record(
            node.identity, key, json.dumps(entry).encode(), now_s=time.time(), ttl_s=60
        )
        node.dht.handle_store(record)  # on c alone: its put stopped there

        def peer(index: int) -> None:
            try:
                outcomes[index] = averagers[index].average(
                    [torch.full((100,), float(index))], round_key="outer/3", weight=1.0
                )
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=peer, args=(i,)) for i in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not errors, errors
        for index in (0, 1):
            outcome = outcomes[index]
            assert outcome.group_size == 2, outcome
            assert outcome.failed_peers == [], outcome  # c was no member anywhere
            assert outcome.missing_peers == [c.peer_id], outcome
            torch.testing.assert_close(outcome.tensors[0], torch.full((100,), 0.5))
