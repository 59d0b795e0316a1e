"""A bare HTTP/2-over-TLS client for tests that play a caller gRPC's own client will not be: one
that announces a message and stalls before its last byte, opens streams from a chosen local
address, or sits on a connection doing nothing. Enough HTTP/2 to open gRPC streams, send data
under flow control and see how the server ends them; no HPACK decoding (a stream's end is seen,
not its status)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct

__all__ = ["RawHttp2Connection"]

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PING, _GOAWAY, _WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
_END_STREAM, _ACK, _END_HEADERS = 0x1, 0x1, 0x4
_INITIAL_WINDOW_SIZE = 0x4


def _frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream_id)
        + payload
    )


def _hpack_length(value: int) -> bytes:
    if value < 127:
        return bytes([value])
    out, value = [127], value - 127
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    return bytes([*out, value])


def _grpc_headers(path: str) -> bytes:
    """A request's headers, each a literal without indexing (no table to keep)."""
    headers = [
        (":method", "POST"),
        (":scheme", "https"),
        (":path", path),
        (":authority", "gossamer.peer"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    out = b""
    for name, value in headers:
        out += b"\x00" + _hpack_length(len(name)) + name.encode()
        out += _hpack_length(len(value)) + value.encode()
    return out


class RawHttp2Connection:
    """One TLS + HTTP/2 connection, the server's certificate not checked (use as an async
    context manager; :meth:`open` connects)."""

    def __init__(self) -> None:
        self._connection_window = 65535
        self._initial_window = 65535
        self._windows: dict[int, int] = {}
        self._next_stream_id = 1
        self._changed = asyncio.Event()
        self.ended: set[int] = set()
        """Streams the server ended (trailers with END_STREAM, or RST_STREAM)."""
        self.closed = asyncio.Event()
        """Set when the server closed the connection (after a GOAWAY, or not)."""
        self.goaway = False
        """Whether the server sent GOAWAY."""
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    async def open(self, host: str, port: int, local_host: str | None = None) -> RawHttp2Connection:
        """Connect (from ``local_host`` if given), finish TLS and send HTTP/2's preface."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["h2"])
        self._reader, self._writer = await asyncio.open_connection(
            host,
            port,
            ssl=context,
            server_hostname="gossamer.peer",
            local_addr=(local_host, 0) if local_host else None,
        )
        self._writer.write(_PREFACE + _frame(_SETTINGS, 0, 0))
        self._task = asyncio.get_running_loop().create_task(self._read())
        return self

    async def __aenter__(self) -> RawHttp2Connection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection and stop reading."""
        if self._writer is not None:
            self._writer.transport.abort()  # (a TLS close waits for the server's close_notify)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def start_stream(self, path: str) -> int:
        """Open a gRPC call to ``path`` (its headers only); returns the stream id."""
        assert self._writer is not None
        stream_id = self._next_stream_id
        self._next_stream_id += 2
        self._windows[stream_id] = self._initial_window
        self._writer.write(_frame(_HEADERS, _END_HEADERS, stream_id, _grpc_headers(path)))
        return stream_id

    async def send(self, stream_id: int, data: bytes, timeout_s: float) -> int:
        """Send ``data`` on a stream under flow control (never ending it); returns the bytes
        sent, fewer where the windows stayed shut for ``timeout_s`` or the stream ended."""
        assert self._writer is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        sent = 0
        while sent < len(data) and stream_id not in self.ended and not self.closed.is_set():
            size = min(16384, len(data) - sent, self._connection_window, self._windows[stream_id])
            if size <= 0:
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), deadline - loop.time())
                except TimeoutError:
                    break
                continue
            self._writer.write(_frame(_DATA, 0, stream_id, data[sent : sent + size]))
            self._connection_window -= size
            self._windows[stream_id] -= size
            sent += size
            await self._writer.drain()
        return sent

    async def wait_until(
        self, condition_name: str, stream_id: int | None, timeout_s: float
    ) -> bool:
        """Wait up to ``timeout_s`` for ``"ended"`` (the stream) or ``"closed"`` (the
        connection); returns whether it came."""

        def happened() -> bool:
            if condition_name == "ended":
                return stream_id in self.ended
            return self.closed.is_set()

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not happened():
            self._changed.clear()
            left = deadline - loop.time()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return True

    async def _read(self) -> None:
        assert self._reader is not None
        assert self._writer is not None
        try:
            while True:
                head = await self._reader.readexactly(9)
                length, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
                stream_id = struct.unpack(">I", head[5:9])[0] & 0x7FFFFFFF
                payload = await self._reader.readexactly(length)
                if kind == _SETTINGS and not flags & _ACK:
                    for offset in range(0, len(payload), 6):
                        key, value = struct.unpack(">HI", payload[offset : offset + 6])
                        if key == _INITIAL_WINDOW_SIZE:
                            for sid in self._windows:
                                self._windows[sid] += value - self._initial_window
                            self._initial_window = value
                    self._writer.write(_frame(_SETTINGS, _ACK, 0))
                elif kind == _PING and not flags & _ACK:
                    self._writer.write(_frame(_PING, _ACK, 0, payload))
                elif kind == _WINDOW_UPDATE:
                    increment = struct.unpack(">I", payload)[0] & 0x7FFFFFFF
                    if stream_id == 0:
                        self._connection_window += increment
                    else:
                        self._windows[stream_id] = self._windows.get(stream_id, 0) + increment
                elif kind == _RST_STREAM or (kind == _HEADERS and flags & _END_STREAM):
                    self.ended.add(stream_id)
                elif kind == _GOAWAY:
                    self.goaway = True
                self._changed.set()
        except (asyncio.IncompleteReadError, OSError, ssl.SSLError):
            pass
        finally:
            self.closed.set()
            self._changed.set()
