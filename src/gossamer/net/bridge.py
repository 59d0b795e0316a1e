"""The bridge between synchronous code (training loops, the CLI) and a node's event loop.

A :class:`NodeThread` runs one :class:`Node` on an event loop in a background thread. Synchronous
code submits coroutines to it and waits for them with a timeout; nothing blocks the loop, and
stopping the thread stops the node first, then the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from gossamer.core.errors import DeadlineExceededError, PeerUnavailableError
from gossamer.net.config import NodeConfig
from gossamer.net.identity import Identity
from gossamer.net.node import Node

__all__ = ["NodeThread"]

_log = logging.getLogger(__name__)
T = TypeVar("T")


class NodeThread:
    """A node on its own event-loop thread (a context manager).

    Args:
        config: the node config.
        identity: the peer's identity (fresh when omitted).
        node_factory: builds the node on the loop thread (for tests and other layers).
    """

    def __init__(
        self,
        config: NodeConfig,
        identity: Identity | None = None,
        *,
        node_factory: Callable[[NodeConfig, Identity | None], Node] | None = None,
    ) -> None:
        self._config = config
        self._identity = identity
        self._factory = node_factory or (lambda c, i: Node(c, i))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="gossamer-net", daemon=True)
        self._node: Node | None = None

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    @property
    def node(self) -> Node:
        """The node (only touch it from coroutines submitted here)."""
        if self._node is None:
            raise RuntimeError("the node thread is not started")
        return self._node

    def start(self, timeout_s: float = 30.0) -> Node:
        """Start the loop thread and the node; returns the node once it is listening."""
        self._thread.start()

        async def start_node() -> Node:
            node = self._factory(self._config, self._identity)
            self._node = node
            await node.start()
            return node

        try:
            return self._submit(start_node(), timeout_s)
        except BaseException:
            self.stop()
            raise

    def run(self, work: Callable[[Node], Coroutine[Any, Any, T]], timeout_s: float) -> T:
        """Run ``work(node)`` on the loop and wait for its result.

        Raises:
            DeadlineExceededError: it did not finish within ``timeout_s`` (it is cancelled).
            PeerUnavailableError: it was cancelled inside the node (a connection closed under it).
        """
        return self._submit(work(self.node), timeout_s)

    def call_soon(self, callback: Callable[[], object]) -> None:
        """Run ``callback()`` on the loop soon, without waiting for it (from any thread)."""
        self._loop.call_soon_threadsafe(callback)

    def _submit(self, coroutine: Coroutine[Any, Any, T], timeout_s: float) -> T:
        try:
            future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        except RuntimeError:  # (the loop is closed)
            coroutine.close()
            raise
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            if not self._loop.is_running() and (
                inspect.getcoroutinestate(coroutine) == inspect.CORO_CREATED
            ):
                # A stopped loop never starts it: closed here, not left to warn at garbage
                # collection that it was never awaited (in whatever test runs then).
                coroutine.close()
            raise DeadlineExceededError(f"node work did not finish within {timeout_s} s") from exc
        except concurrent.futures.CancelledError as exc:
            # Cancelled inside the node, not by us: a connection closed under an RPC it awaited.
            raise PeerUnavailableError("node work was cancelled inside the node") from exc

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the node, then the loop, then join the thread."""
        if not self._thread.is_alive():
            return
        if self._node is not None:
            try:
                self._submit(self._node.stop(), timeout_s)
            except DeadlineExceededError:
                _log.warning("the node did not stop within %.1f s", timeout_s)
        try:
            self._submit(_cancel_remaining_tasks(timeout_s), timeout_s + 1.0)
        except DeadlineExceededError:
            _log.warning("work on the node's loop did not end within %.1f s", timeout_s)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> NodeThread:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


async def _cancel_remaining_tasks(timeout_s: float) -> None:
    """Cancel and await the work still on the loop once the node stopped (a round a caller
    gave up on, say), as ``asyncio.run`` does: a loop closed under it left tasks destroyed while
    pending, and their coroutines failed later, in whatever ran when they were collected."""
    current = asyncio.current_task()
    remaining = [task for task in asyncio.all_tasks() if task is not current]
    for task in remaining:
        task.cancel()
    if remaining:
        await asyncio.wait(remaining, timeout=timeout_s)
