"""How a tunnel ends and what it holds meanwhile, in memory (no sockets): its local
connection is a stream reader fed by the test, its call a far side that takes the frames it is
let take (as gRPC does, within its flow-control window)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gossamer.core.errors import PeerUnavailableError
from gossamer.net import tunnel_carry
from gossamer.net.tunnel_carry import FRAME_BYTES, READ_AHEAD_BYTES, carry_socket_over_call
from gossamer.proto import net_pb2
from loopback_nodes import until

_MIB = 1024 * 1024


class _FakeWriter:
    """The local connection's write side, in memory."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        pass


class _FarSide:
    """A tunnel call in memory. It takes at most ``num_taken`` frames (None: all) and sends
    back what :meth:`reply` gives it. Like gRPC, it cancels the call when the request iterator
    raises, and its reader then gets ``CancelledError``."""

    def __init__(
        self, frames: AsyncIterator[net_pb2.TunnelFrame], num_taken: int | None = None
    ) -> None:
        self.received = bytearray()
        self.num_frames = 0
        self.got_close = False
        self.answered_close = False
        self.cancelled = False
        self.cut_off = False
        """Cancelled before it ended the call itself."""
        self.may_take = asyncio.Event()
        if num_taken is None:
            self.may_take.set()
        self._num_taken = num_taken
        self._replies: asyncio.Queue[net_pb2.TunnelFrame | None] = asyncio.Queue()
        self._taking = asyncio.ensure_future(self._take(frames))

    async def _take(self, frames: AsyncIterator[net_pb2.TunnelFrame]) -> None:
        try:
            async for frame in frames:
                self.num_frames += 1
                self.received += frame.data
                self.got_close = self.got_close or frame.close
                if self._num_taken is not None and self.num_frames >= self._num_taken:
                    await self.may_take.wait()
        except Exception:
            self.cancel()

    def reply(self, frame: net_pb2.TunnelFrame) -> None:
        self.answered_close = self.answered_close or frame.close
        self._replies.put_nowait(frame)

    def __aiter__(self) -> _FarSide:
        return self

    async def __anext__(self) -> net_pb2.TunnelFrame:
        frame = await self._replies.get()
        if frame is None:
            raise asyncio.CancelledError  # (what gRPC raises for a call it cancelled)
        return frame

    def cancel(self) -> None:
        if not self.cancelled:
            self.cut_off = not self.answered_close
        self.cancelled = True
        self._taking.cancel()
        self._replies.put_nowait(None)


def _local_connection(data: bytes, *, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=FRAME_BYTES)
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


@pytest.mark.parametrize("closed", [True, False], ids=["closed", "open"])
def test_a_tunnel_whose_far_side_takes_nothing_is_ended(
    monkeypatch: pytest.MonkeyPatch, closed: bool
) -> None:
    """The grace for a closed local connection started only once the call had taken every
    frame read ahead: a far side (a dialer that stopped reading) that took none held the
    tunnel, and its place under the node's caps, for good (15 s and on in the review), and
    the connection's end, behind more data than the read-ahead holds, was not even seen. Now
    the tunnel ends once a frame waited STALLED_TUNNEL_S (here 0.5 s) to be taken."""
    monkeypatch.setattr(tunnel_carry, "STALLED_TUNNEL_S", 0.5, raising=False)

    async def main() -> None:
        calls: list[_FarSide] = []

        def open_call(frames: AsyncIterator[net_pb2.TunnelFrame]) -> _FarSide:
            calls.append(_FarSide(frames, num_taken=1))
            return calls[0]

        loop = asyncio.get_running_loop()
        started_at = loop.time()
        carrying = asyncio.ensure_future(
            carry_socket_over_call(
                _local_connection(bytes(READ_AHEAD_BYTES + 2 * FRAME_BYTES), eof=closed),
                _FakeWriter(),  # type: ignore[arg-type]
                open_call,
                net_pb2.TunnelFrame(tunnel_id="t"),
            )
        )
        done, _ = await asyncio.wait({carrying}, timeout=10)
        for call in calls:
            call.cancel()
        assert carrying in done, "the tunnel still ran 10 s after its far side stopped taking"
        carrying.result()
        assert loop.time() - started_at < 5.0
        assert calls[0].num_frames == 1
        assert calls[0].cancelled

    asyncio.run(main())


def test_a_closed_connection_s_tail_is_not_cut_off_while_the_far_side_takes_it() -> None:
    """The far side ended the call 2.5 s after gRPC took the close (what gRPC had taken in
    its window still crossing a thin link): the 2 s grace, counted from that moment, cut the
    call and the tail of the connection (2.3 of 6 MiB delivered in the review). Now the
    far side has STALLED_TUNNEL_S (30 s) from the last frame taken, the close."""

    async def main() -> None:
        payload = bytes(range(256)) * (4 * FRAME_BYTES // 256)
        calls: list[_FarSide] = []

        def open_call(frames: AsyncIterator[net_pb2.TunnelFrame]) -> _FarSide:
            calls.append(_FarSide(frames))
            return calls[0]

        carrying = asyncio.ensure_future(
            carry_socket_over_call(
                _local_connection(payload),
                _FakeWriter(),  # type: ignore[arg-type]
                open_call,
                net_pb2.TunnelFrame(tunnel_id="t"),
            )
        )
        await until(lambda: bool(calls) and calls[0].got_close, 5, "the close taken")
        far = calls[0]
        delivered = asyncio.ensure_future(asyncio.sleep(2.5))  # (the tail crossing the link)
        await asyncio.wait({carrying, delivered}, return_when=asyncio.FIRST_COMPLETED)
        cut_off = far.cut_off
        far.reply(net_pb2.TunnelFrame(close=True))  # (the far side ends the call)
        await asyncio.wait_for(carrying, 5)
        delivered.cancel()
        assert not cut_off, "the call was cancelled before the far side had the tail"
        assert far.received == payload

    asyncio.run(main())


def test_a_local_connection_that_breaks_ends_the_tunnel_with_its_error() -> None:
    """gRPC cancels a call whose request iterator raised: a reset local connection ended the
    tunnel task as cancelled (nobody had cancelled it), and its owner logged nothing of it."""

    async def main() -> None:
        calls: list[_FarSide] = []

        def open_call(frames: AsyncIterator[net_pb2.TunnelFrame]) -> _FarSide:
            calls.append(_FarSide(frames))
            return calls[0]

        reader = _local_connection(b"x" * 1000, eof=False)
        carrying = asyncio.ensure_future(
            carry_socket_over_call(
                reader,
                _FakeWriter(),  # type: ignore[arg-type]
                open_call,
                net_pb2.TunnelFrame(tunnel_id="t"),
            )
        )
        await until(lambda: bool(calls) and len(calls[0].received) == 1000, 5, "the bytes taken")
        reader.set_exception(ConnectionResetError("Connection reset by peer"))
        done, _ = await asyncio.wait({carrying}, timeout=5)
        assert carrying in done
        assert not carrying.cancelled(), "the tunnel ended as cancelled"
        assert isinstance(carrying.exception(), ConnectionResetError), carrying.exception()
        assert calls[0].cancelled

    asyncio.run(main())


def test_tunnels_read_ahead_within_the_node_s_budget_past_a_frame_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Read-ahead had no limit past 8 MiB a tunnel: 32 tunnels whose far side took one frame
    held 256 MiB in the review. Now all of a node's tunnels hold at most its budget (here 2
    MiB), past one frame each, and every tunnel still delivers all its bytes once its call
    takes them."""
    monkeypatch.setattr(tunnel_carry, "READ_AHEAD_BUDGET_BYTES", 2 * _MIB, raising=False)
    num_tunnels = 16
    size = 2 * _MIB

    async def main() -> None:
        calls: list[_FarSide] = []
        readers: list[asyncio.StreamReader] = []
        carrying = []
        for i in range(num_tunnels):
            readers.append(_local_connection(bytes([i]) * size))

            def open_call(frames: AsyncIterator[net_pb2.TunnelFrame]) -> _FarSide:
                calls.append(_FarSide(frames, num_taken=2))
                return calls[-1]

            carrying.append(
                asyncio.ensure_future(
                    carry_socket_over_call(
                        readers[-1],
                        _FakeWriter(),  # type: ignore[arg-type]
                        open_call,
                        net_pb2.TunnelFrame(tunnel_id=f"t{i}"),
                    )
                )
            )

        def num_held() -> int:  # (read from the local connections, not taken by the calls)
            num_read = sum(size - len(reader._buffer) for reader in readers)
            return num_read - sum(len(call.received) for call in calls)

        await until(lambda: len(calls) == num_tunnels, 5, "the calls opened")
        held = -1
        for _ in range(100):  # (until the read-aheads stop reading: each waits for room)
            held, last = num_held(), held
            if held == last:
                break
            await asyncio.sleep(0.01)
        # (unbudgeted: all but the frame each call took, 28 MiB)
        assert 2 * _MIB <= held <= 2 * _MIB + num_tunnels * FRAME_BYTES, held
        for call in calls:
            call.may_take.set()
        await until(lambda: all(call.got_close for call in calls), 10, "every tail taken")
        for i, call in enumerate(calls):
            call.reply(net_pb2.TunnelFrame(close=True))
            assert call.received == bytes([i]) * size
        await asyncio.wait_for(asyncio.gather(*carrying), 5)
        assert tunnel_carry.ReadAheadBudget.of_running_loop().num_bytes == 0

    asyncio.run(main())


class _SlowFarSide(_FarSide):
    """A far side behind a thin link: it takes a frame every ``frame_s`` (a frame's time on
    the link), and meanwhile its connection carries other traffic."""

    def __init__(self, frames: AsyncIterator[net_pb2.TunnelFrame], frame_s: float) -> None:
        self._frame_s = frame_s
        super().__init__(frames)

    async def _take(self, frames: AsyncIterator[net_pb2.TunnelFrame]) -> None:
        try:
            async for frame in frames:
                self.num_frames += 1
                self.received += frame.data
                self.got_close = self.got_close or frame.close
                await asyncio.sleep(self._frame_s)  # (the frame crossing the link)
        except Exception:
            self.cancel()


@pytest.mark.parametrize("traffic", ["on_the_call", "on_the_relay"])
def test_a_slow_tunnel_whose_connection_moves_is_kept(
    monkeypatch: pytest.MonkeyPatch, traffic: str
) -> None:
    """On a 500 kbit/s link a frame waits 8-23 s to be taken while the tunnel receives steadily:
    a tunnel whose offered frame went STALLED_TUNNEL_S (30 s) untaken was ended (1.9 of 6 MiB
    delivered in the review). Now a wait is a stall only once nothing moved on the tunnel's
    connection that long: frames brought by this call, or anything from or through its relay
    (here STALLED_TUNNEL_S is 0.5 s and a frame takes 0.8 s)."""
    monkeypatch.setattr(tunnel_carry, "STALLED_TUNNEL_S", 0.5)

    async def main() -> None:
        payload = bytes(range(256)) * (4 * FRAME_BYTES // 256)
        calls: list[_SlowFarSide] = []
        relay_marks = [0]

        def open_call(frames: AsyncIterator[net_pb2.TunnelFrame]) -> _SlowFarSide:
            calls.append(_SlowFarSide(frames, frame_s=0.8))
            return calls[0]

        writer = _FakeWriter()
        kwargs: dict[str, object] = {}
        if traffic == "on_the_relay":
            kwargs["moved"] = lambda: relay_marks[0]
        carrying = asyncio.ensure_future(
            carry_socket_over_call(
                _local_connection(payload),
                writer,  # type: ignore[arg-type]
                open_call,
                net_pb2.TunnelFrame(tunnel_id="t"),
                **kwargs,  # type: ignore[arg-type]
            )
        )
        await until(lambda: bool(calls), 5, "the call opened")
        far = calls[0]
        while not far.got_close and not carrying.done():  # (steady traffic meanwhile)
            if traffic == "on_the_call":
                far.reply(net_pb2.TunnelFrame(data=b"r"))
            else:
                relay_marks[0] += 1
            await asyncio.sleep(0.1)
        far.reply(net_pb2.TunnelFrame(close=True))
        await asyncio.wait_for(carrying, 5)
        assert not far.cut_off, "a slow tunnel whose connection moved was ended"
        assert far.received == payload

    asyncio.run(main())


def test_a_tunnel_whose_far_side_takes_nothing_is_ended_though_its_relay_is_busy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Other tunnels keep the relay connection moving: a far side that stopped reading is
    still ended, once its frame waited STUCK_TUNNEL_S (here 1 s)."""
    monkeypatch.setattr(tunnel_carry, "STALLED_TUNNEL_S", 0.5)
    monkeypatch.setattr(tunnel_carry, "STUCK_TUNNEL_S", 1.0, raising=False)

    async def main() -> None:
        calls: list[_FarSide] = []
        loop = asyncio.get_running_loop()

        def open_call(frames: AsyncIterator[net_pb2.TunnelFrame]) -> _FarSide:
            calls.append(_FarSide(frames, num_taken=1))
            return calls[0]

        carrying = asyncio.ensure_future(
            carry_socket_over_call(
                _local_connection(bytes(READ_AHEAD_BYTES + 2 * FRAME_BYTES), eof=False),
                _FakeWriter(),  # type: ignore[arg-type]
                open_call,
                net_pb2.TunnelFrame(tunnel_id="t"),
                moved=loop.time,  # (a mark that always changed: the relay is busy)
            )
        )
        done, _ = await asyncio.wait({carrying}, timeout=10)
        for call in calls:
            call.cancel()
        assert carrying in done, "the tunnel still ran 10 s after its far side stopped taking"
        carrying.result()
        assert calls[0].num_frames == 1

    asyncio.run(main())


def test_a_call_whose_connection_is_closed_under_it_ends_the_tunnel_with_an_error() -> None:
    """The pool closed the channel under the tunnel (its relay given up): gRPC ended the call
    with ``CancelledError``, which the tunnel passed on, as if its task had been cancelled.
    Now it ends with ``PeerUnavailableError`` ("closed under it")."""

    async def main() -> None:
        calls: list[_FarSide] = []

        def open_call(frames: AsyncIterator[net_pb2.TunnelFrame]) -> _FarSide:
            calls.append(_FarSide(frames))
            return calls[0]

        carrying = asyncio.ensure_future(
            carry_socket_over_call(
                _local_connection(bytes(FRAME_BYTES), eof=False),
                _FakeWriter(),  # type: ignore[arg-type]
                open_call,
                net_pb2.TunnelFrame(tunnel_id="t"),
            )
        )
        await until(lambda: bool(calls) and calls[0].num_frames >= 2, 5, "a frame taken")
        calls[0].cancel()  # (the channel closed under the call)
        await asyncio.wait({carrying}, timeout=5)
        assert carrying.done()
        assert not carrying.cancelled(), "the tunnel ended as if its task had been cancelled"
        with pytest.raises(PeerUnavailableError, match="closed under it"):
            carrying.result()

    asyncio.run(main())
