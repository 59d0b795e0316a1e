"""Serving the dashboard with uvicorn on a socket bound up front (so port 0 can be read back).

A dashboard bound to a loopback address answers only requests that name a loopback host: a web
page elsewhere cannot point a name of its own at 127.0.0.1 (DNS rebinding) and read the swarm's
peer addresses through the user's browser. Bound to any other address, the page was meant for
others, under whatever name they reach it by. Which it is, is read from the address the socket
was bound to, not from how the host was spelled (``127.1`` and ``localhost`` are loopback too).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import threading
import time
from collections.abc import Sequence
from types import TracebackType

import uvicorn
from fastapi import FastAPI
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp

__all__ = [
    "LOOPBACK_HOST_NAMES",
    "DashboardServer",
    "bind_socket",
    "check_allowed_host",
    "check_host",
    "serve_forever",
]

_log = logging.getLogger(__name__)


def check_host(host: str) -> None:
    """Check the address to serve on before binding it.

    Raises:
        ValueError: it is empty (the socket bound every interface, and the page was printed
            as ``http://:PORT/``).
    """
    if not host.strip():
        raise ValueError(
            "--host is empty: name the address to serve on, 127.0.0.1 (this machine only) or "
            "0.0.0.0 (every network it is on)"
        )


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0 picks a free port).

    Raises:
        ValueError: the host is empty, or the port is not one (0..65535).
        OSError: the address cannot be bound (in use, not local).
    """
    check_host(host)
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


_HOST_NAME = re.compile(r"(\*\.)?[a-z0-9_-]+(\.[a-z0-9_-]+)*")
_WITH_PORT = re.compile(r"(?P<name>\[[^\]]*\]|[^:\[\]]+):[0-9]+")


def check_allowed_host(name: str) -> str:
    """``name`` as ``Host`` headers are compared with it: lower case, an IPv6 address in brackets.

    A name (``dash.example``), an address, or a wildcard for the names under a domain
    (``*.example.com``).

    Raises:
        ValueError: not one of those: a name with its port (the port is not compared, so it
            never matched), ``*`` (every name: no check against DNS rebinding left), another
            wildcard (starlette failed on it with an AssertionError), or not a host name.
    """
    text = name.strip().lower()
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        pass
    else:
        return f"[{address}]" if address.version == 6 else str(address)
    if _HOST_NAME.fullmatch(text):
        return text
    if text == "*":
        raise ValueError(
            "--allowed-host '*' would answer every name, and a web page elsewhere could read "
            "the swarm through the browser (DNS rebinding); name the names the page is reached "
            "by, or a domain's as '*.example.com'"
        )
    with_port = _WITH_PORT.fullmatch(text)
    if with_port:
        raise ValueError(
            f"--allowed-host {name!r}: give the name without its port "
            f"({with_port['name']!r}); the port in a request's Host is not compared"
        )
    if "*" in text:
        raise ValueError(
            f"--allowed-host {name!r}: a wildcard stands for a domain's names only, as in "
            "'*.example.com'"
        )
    raise ValueError(
        f"--allowed-host {name!r}: not a host name or address (a name such as dash.example, "
        "an address, or '*.example.com')"
    )


def _is_loopback(bound_address: str) -> bool:
    """Whether a socket bound to ``bound_address`` (as ``getsockname`` says) is loopback only."""
    try:
        address = ipaddress.ip_address(bound_address.partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _as_host_name(host: str) -> str:
    """An address as it reads in a ``Host`` header (IPv6 in brackets), a name as it is."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _uvicorn_server(
    app: FastAPI, host: str, allowed_hosts: Sequence[str], *, bound_address: str
) -> uvicorn.Server:
    served: ASGIApp = app
    names = [check_allowed_host(name) for name in allowed_hosts]
    if _is_loopback(bound_address) or names:
        # (bound elsewhere, the names given are all it answers: they were accepted and then
        # ignored, every name answered)
        spelled = [_as_host_name(host), _as_host_name(bound_address.partition("%")[0])]
        served = TrustedHostMiddleware(app, allowed_hosts=[*LOOPBACK_HOST_NAMES, *spelled, *names])
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
        host: the address to bind; loopback unless others should see the page (whether it is,
            is read from the address bound).
        port: the port; 0 picks a free one (read :attr:`port` back).
        allowed_hosts: ``Host`` names answered besides the loopback ones (a reverse proxy's,
            the machine's names on its network; see :func:`check_allowed_host`); none: where
            ``host`` is not loopback, every name is.

    Raises:
        ValueError: ``host`` is empty, or an allowed host is not one.
        OSError: the address cannot be bound.
    """

    def __init__(
        self,
        app: FastAPI,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        allowed_hosts: Sequence[str] = (),
    ) -> None:
        for name in allowed_hosts:
            check_allowed_host(name)  # (before a socket is bound)
        self._socket = bind_socket(host, port)
        self.host = host
        bound = self._socket.getsockname()
        self.port: int = bound[1]
        """The port it listens on."""
        self._server = _uvicorn_server(app, host, allowed_hosts, bound_address=bound[0])
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
    ``host``: the host ``sock`` was bound to, as given; ``allowed_hosts``: ``Host`` names
    answered besides the loopback ones (every name where there are none and ``sock`` is not
    bound to loopback).

    Raises:
        ValueError: an allowed host is not one (see :func:`check_allowed_host`).
    """
    try:
        bound_address = sock.getsockname()[0]
        _uvicorn_server(app, host, allowed_hosts, bound_address=bound_address).run(sockets=[sock])
    finally:
        sock.close()
