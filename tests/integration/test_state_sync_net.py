"""State sync over net's real TLS gRPC bulk transport: three donors and a newcomer on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import pytest
import torch

from gossamer.core.clock import SystemClock
from gossamer.core.errors import ProtocolError
from gossamer.net.config import NodeConfig
from gossamer.net.node import Node
from gossamer.train.state_sync import StateDonor, StateSnapshot, StateSyncLimits, download_state
from gossamer.train.state_sync_wire import MAX_REQUEST_BYTES, REPLY_TOPIC, REQUEST_TOPIC

_log = logging.getLogger(__name__)
_MiB = 1 << 20


def _snapshot(num_bytes: int) -> StateSnapshot:
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(num_bytes // 8, generator=gen)
    return StateSnapshot(
        version=42,
        tensors={
            "model.weight": weights,
            "outer.momentum": torch.randn(num_bytes // 8, generator=gen),
            "model.bias16": torch.randn(1000, generator=gen).to(torch.bfloat16),
            "step": torch.tensor(42),
        },
        meta={"step": 42, "tokens": 123_456},
    )


class _StoppingEndpoint:
    """A node as a donor sees it, that signals once it has sent ``after`` chunk replies."""

    def __init__(self, node: Node, after: int) -> None:
        self.node = node
        self.after = after
        self.num_replies = 0
        self.reached = asyncio.Event()

    @property
    def peer_id(self) -> str:
        return self.node.peer_id

    def on_bulk(
        self,
        topic: str,
        handler: Callable[[str, str, bytearray], Awaitable[None]],
        *,
        max_bytes: int | None = None,
    ) -> None:
        self.node.on_bulk(topic, handler, max_bytes=max_bytes)

    async def send_bulk(
        self,
        peer_id: str,
        topic: str,
        payload: bytes | bytearray | memoryview,
        *,
        num_streams: int = 1,
        timeout_s: float = 60.0,
    ) -> None:
        await self.node.send_bulk(
            peer_id, topic, payload, num_streams=num_streams, timeout_s=timeout_s
        )
        if topic == REPLY_TOPIC and len(payload) > _MiB // 2:
            self.num_replies += 1
            if self.num_replies >= self.after:
                self.reached.set()


async def _run(num_donors: int, state_bytes: int, stop_one_after: int | None) -> dict[str, object]:
    clock = SystemClock()
    async with contextlib.AsyncExitStack() as stack:
        nodes = []
        for _ in range(num_donors + 1):
            node = Node(NodeConfig(listen_address="127.0.0.1:0"), clock=clock)
            nodes.append(await stack.enter_async_context(node))
        newcomer, donor_nodes = nodes[0], nodes[1:]
        addresses = [f"{n.peer_id}@127.0.0.1:{n.port}" for n in donor_nodes]
        assert await asyncio.wait_for(newcomer.bootstrap(addresses), 30) == num_donors
        for node in donor_nodes:  # so replies can dial back without waiting for gossip
            await asyncio.wait_for(
                node.bootstrap([f"{newcomer.peer_id}@127.0.0.1:{newcomer.port}"]), 30
            )
        want = _snapshot(state_bytes)
        stopping = _StoppingEndpoint(donor_nodes[0], stop_one_after or 0)
        for i, node in enumerate(donor_nodes):
            donor = StateDonor(stopping if i == 0 else node)
            await asyncio.to_thread(donor.publish, want)
        download = asyncio.create_task(
            download_state(
                newcomer, [n.peer_id for n in donor_nodes], timeout_s=60, request_timeout_s=10
            )
        )
        if stop_one_after is not None:
            reached = asyncio.create_task(stopping.reached.wait())
            await asyncio.wait([download, reached], return_when="FIRST_COMPLETED")
            assert reached.done(), "the download finished before the donor could be stopped"
            await donor_nodes[0].stop()
        got, report = await download
        assert got.version == 42
        assert got.meta == want.meta
        for name, tensor in want.tensors.items():
            assert torch.equal(got.tensors[name], tensor), name
        return {"report": report, "donors": [n.peer_id for n in donor_nodes]}


def test_three_donors_share_a_20mb_download() -> None:
    result = asyncio.run(_run(3, 20 * _MiB, stop_one_after=None))
    report = result["report"]
    donors = result["donors"]
    assert isinstance(donors, list)
    assert set(report.bytes_per_donor) == set(donors)  # type: ignore[attr-defined]
    assert report.failed_donors == {}  # type: ignore[attr-defined]
    assert report.total_bytes >= 20 * _MiB  # type: ignore[attr-defined]
    _log.info("3 donors: %.1f MiB/s", report.bytes_per_s / _MiB)  # type: ignore[attr-defined]


def test_a_donor_stopped_mid_download_is_replaced_by_the_others() -> None:
    result = asyncio.run(_run(3, 20 * _MiB, stop_one_after=2))
    report = result["report"]
    donors = result["donors"]
    assert isinstance(donors, list)
    assert donors[0] in report.failed_donors  # type: ignore[attr-defined]
    assert set(report.bytes_per_donor) >= set(donors[1:])  # type: ignore[attr-defined]
    assert sum(report.bytes_per_donor.values()) == report.total_bytes  # type: ignore[attr-defined]


def test_state_sync_topics_refuse_oversized_transfers_at_their_first_chunk() -> None:
    """A donor's request topic and a newcomer's reply topic took transfers of up to 8 GiB each
    (16 GiB in all), every byte held before the 512-byte check of a request."""

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            a, b = [
                await stack.enter_async_context(Node(NodeConfig(listen_address="127.0.0.1:0")))
                for _ in range(2)
            ]
            await asyncio.wait_for(b.bootstrap([f"{a.peer_id}@127.0.0.1:{a.port}"]), 30)
            await asyncio.wait_for(a.bootstrap([f"{b.peer_id}@127.0.0.1:{b.port}"]), 30)
            donor = StateDonor(a)
            await asyncio.to_thread(donor.publish, _snapshot(64 * 1024))
            limits = StateSyncLimits(max_chunk_bytes=_MiB, max_num_chunks=16, max_meta_bytes=1024)
            await download_state(b, [a.peer_id], timeout_s=30, limits=limits)
            for sender, receiver, topic, size in [
                (b, a, REQUEST_TOPIC, MAX_REQUEST_BYTES + 1),
                (a, b, REPLY_TOPIC, limits.max_reply_bytes + 1),
            ]:
                with pytest.raises(ProtocolError, match="whose transfers are at most"):
                    await sender.send_bulk(receiver.peer_id, topic, bytes(size), timeout_s=30)
            assert donor.num_requests_refused == 0  # refused by net, before the donor

    asyncio.run(main())
