"""A member whose caller cancels its round after its first average went out (unit tests over
the in-memory transport, integration tests over real gRPC)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from gossamer.comm.transport import FrameKind, Message, message_bytes, unpack_frame


class CancelsAfterItsFirstAverage:
    """Goes between a transport's sends and the wire: once the first average (a ``RESULT``)
    went out, the rest wait and the round's task (``task``) is cancelled. The member sent some
    of its averages, not all, and it is alive (its messages of the round are refused, not
    lost)."""

    def __init__(self) -> None:
        self.task: asyncio.Task[Any] | None = None
        self._sent_one = False

    async def send(self, message: Message, send: Callable[[], Awaitable[None]]) -> None:
        """Send ``message`` with ``send`` (the transport's own), as above."""
        frame, _ = unpack_frame(memoryview(message_bytes(message)))
        if frame.kind is not FrameKind.RESULT:
            await send()
            return
        if self._sent_one:  # the rest wait for the cancel
            await asyncio.Event().wait()
        self._sent_one = True
        await send()
        assert self.task is not None
        self.task.cancel()
