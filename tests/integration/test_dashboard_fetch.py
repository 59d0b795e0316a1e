"""Fetching a peer's metrics page from endpoints that misbehave, on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from gossamer.obs.dashboard.scrape import fetch_url


@pytest.fixture
def serve_raw() -> Iterator[Callable[[Callable[[socket.socket], None]], str]]:
    """Serve each connection with a function of the accepted socket; yields a URL maker."""
    listeners: list[socket.socket] = []
    stop = threading.Event()

    def start(answer: Callable[[socket.socket], None]) -> str:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(0.2)
        listeners.append(listener)

        def run() -> None:
            while not stop.is_set():
                try:
                    connection, _ = listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                with connection:
                    connection.recv(65536)
                    answer(connection)

        threading.Thread(target=run, daemon=True).start()
        return f"http://127.0.0.1:{listener.getsockname()[1]}/metrics"

    yield start
    stop.set()
    for listener in listeners:
        listener.close()


def test_an_endpoint_that_is_not_http_is_an_os_error(
    serve_raw: Callable[[Callable[[socket.socket], None]], str],
) -> None:
    # A gRPC port named by mistake answers with HTTP/2 frames: http.client's BadStatusLine is
    # no OSError, and it failed the whole snapshot.
    url = serve_raw(lambda c: c.sendall(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00" + b"\x00" * 18))
    with pytest.raises(OSError, match="not an HTTP answer"):
        fetch_url(url, 2.0)


def test_an_endpoint_that_drips_is_given_up_at_the_deadline(
    serve_raw: Callable[[Callable[[socket.socket], None]], str],
) -> None:
    # urllib's timeout counts per read: a byte every 0.1 s held the fetch for good.
    def drip(connection: socket.socket) -> None:
        connection.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        for _ in range(100):  # bounded: 10 s at most
            try:
                connection.sendall(b"#")
            except OSError:
                return
            time.sleep(0.1)

    url = serve_raw(drip)
    started = time.monotonic()
    with pytest.raises(OSError, match=r"longer than 0\.5 s"):
        fetch_url(url, 0.5)
    assert time.monotonic() - started < 2.0
