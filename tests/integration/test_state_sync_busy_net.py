"""Peers that fill a donor's room for requests and never take their replies, over net's real
TLS gRPC bulk transport on 127.0.0.1: an honest newcomer arriving then still downloads."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time

import torch

from gossamer.net.config import NodeConfig
from gossamer.net.node import Node
from gossamer.train.state_sync import StateDonor, StateSnapshot, download_state
from gossamer.train.state_sync_wire import (
    REPLY_TOPIC,
    REQUEST_TOPIC,
    Request,
    RequestKind,
    encode_request,
)

_NUM_HOSTILE = 4
_PER_PEER = 8


def test_peers_that_never_take_their_replies_do_not_lock_a_newcomer_out() -> None:
    """Made-up peers filled the donor's request slots, each held up to 120 s; an honest
    newcomer arriving then was refused at once, struck the donor off and failed."""

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:

            async def start() -> Node:
                node = Node(NodeConfig(listen_address="127.0.0.1:0"))
                return await stack.enter_async_context(node)

            donor_node = await start()
            address = f"{donor_node.peer_id}@127.0.0.1:{donor_node.port}"
            # Replies wait a minute here: only giving room up, not their deadline, lets the
            # newcomer in within the test's bound.
            donor = StateDonor(
                donor_node,
                max_requests=_NUM_HOSTILE * _PER_PEER,
                max_requests_per_peer=_PER_PEER,
                reply_base_timeout_s=60.0,
            )
            want = StateSnapshot(version=42, tensors={"w": torch.randn(1 << 20)}, meta={"step": 42})
            await asyncio.to_thread(donor.publish, want)
            released = asyncio.Event()  # set at the end: the hostile peers then let go

            async def never_taken(sender: str, topic: str, payload: bytearray) -> None:
                await released.wait()

            asks: list[asyncio.Task[None]] = []
            for _ in range(_NUM_HOSTILE):
                hostile = await start()
                hostile.on_bulk(REPLY_TOPIC, never_taken, max_bytes=64 << 20)
                await asyncio.wait_for(hostile.bootstrap([address]), 30)
                await asyncio.wait_for(
                    donor_node.bootstrap([f"{hostile.peer_id}@127.0.0.1:{hostile.port}"]), 30
                )
                for index in range(_PER_PEER):
                    request = Request(
                        kind=RequestKind.CHUNK,
                        request_id=secrets.token_bytes(16),
                        version=42,
                        index=index % 4,
                        timeout_ms=3_600_000,
                    )
                    payload = encode_request(request)
                    asks.append(
                        asyncio.create_task(
                            hostile.send_bulk(
                                donor_node.peer_id, REQUEST_TOPIC, payload, timeout_s=120
                            )
                        )
                    )
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while donor._num_serving_all < _NUM_HOSTILE * _PER_PEER:
                assert loop.time() < deadline, "the hostile peers did not fill the donor"
                await asyncio.sleep(0.02)  # polling the donor's state under a deadline
            newcomer = await start()
            await asyncio.wait_for(newcomer.bootstrap([address]), 30)
            started = time.monotonic()
            try:
                got, report = await download_state(newcomer, [donor_node.peer_id], timeout_s=30)
            finally:
                released.set()
                for task in asks:
                    task.cancel()
                await asyncio.gather(*asks, return_exceptions=True)
            assert time.monotonic() - started < 30
            assert torch.equal(got.tensors["w"], want.tensors["w"])
            assert report.failed_donors == {}
            assert donor.num_requests_evicted > 0

    asyncio.run(main())
