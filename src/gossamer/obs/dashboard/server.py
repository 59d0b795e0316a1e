"""Serving the dashboard with uvicorn on a socket bound up front (so port 0 can be read back).

A dashboard bound to a loopback address answers only requests that name a loopback host: a web
page elsewhere cannot point a name of its own at 127.0.0.1 (DNS rebinding) and read the swarm's
peer addresses through the user's browser. Bound to any other address, the page was meant for
others, under whatever name they reach it by.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Sequence
from types import TracebackType

import uvicorn
from fastapi import FastAPI
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp

__all__ = ["LOOPBACK_HOST_NAMES", "DashboardServer", "bind_socket", "serve_forever"]

_log = logging.getLogger(__name__)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0 picks a free port).

    Raises:
        ValueError: the port is not one (0..65535).
        OSError: the address cannot be bound (in use, not local).
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is not a TCP port (0..65535; 0 picks a free one)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


LOOPBACK_HOST_NAMES = ("127.0.0.1", "localhost", "[::1]")
"""The ``Host`` names a dashboard bound to loopback answers (the port aside)."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: whoever serves under it means others to use it
        return False


def _uvicorn_server(app: FastAPI, host: str, allowed_hosts: Sequence[str]) -> uvicorn.Server:
    served: ASGIApp = app
    if _is_loopback(host) or allowed_hosts:
        # (bound elsewhere, the names given are all it answers: they were accepted and then
        # ignored, every name answered)
        names = [*LOOPBACK_HOST_NAMES, host, *allowed_hosts]
        served = TrustedHostMiddleware(app, allowed_hosts=names)
    config = uvicorn.Config(
        served,
        http="h11",
        ws="none",
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    return uvicorn.Server(config)


class DashboardServer:
    """The dashboard served from a background thread (a context manager).

    Args:
        app: the app from :func:`~gossamer.obs.dashboard.app.create_app`.
        host: the address to bind; loopback unless others should see the page.
        port: the port; 0 picks a free one (read :attr:`port` back).
        allowed_hosts: ``Host`` names answered besides the loopback ones (a reverse proxy's,
            the machine's names on its network); none: where ``host`` is not loopback, every
            name is.
    """

    def __init__(
        self,
        app: FastAPI,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        allowed_hosts: Sequence[str] = (),
    ) -> None:
        self._socket = bind_socket(host, port)
        self.host = host
        self.port: int = self._socket.getsockname()[1]
        """The port it listens on."""
        self._server = _uvicorn_server(app, host, allowed_hosts)
        self._thread = threading.Thread(target=self._serve, name="gossamer-dashboard", daemon=True)
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """The page's address."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def _serve(self) -> None:
        try:
            self._server.run(sockets=[self._socket])
        except BaseException as exc:  # reported by start()
            self._error = exc

    def start(self, timeout_s: float = 10.0) -> DashboardServer:
        """Start serving; returns once the server accepts requests.

        Raises:
            RuntimeError: it did not start within ``timeout_s``.
        """
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the dashboard did not start: {self._error or 'timed out'}")
            self._thread.join(timeout=0.02)
        return self

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop serving and wait for the server thread."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():
            _log.warning("dashboard: server thread still running after %s s", timeout_s)
        self._socket.close()

    def __enter__(self) -> DashboardServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def serve_forever(
    app: FastAPI, sock: socket.socket, host: str, *, allowed_hosts: Sequence[str] = ()
) -> None:
    """Serve in the calling thread until interrupted (Ctrl-C or SIGTERM); for the CLI.
    ``host``: the address ``sock`` was bound to; ``allowed_hosts``: ``Host`` names answered
    besides the loopback ones (every name where there are none and ``host`` is not loopback)."""
    try:
        _uvicorn_server(app, host, allowed_hosts).run(sockets=[sock])
    finally:
        sock.close()
