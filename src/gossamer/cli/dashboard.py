"""`gossamer dashboard`: a live web page of the swarm (peers, links, curves, events)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Annotated

import typer

from gossamer.cli.errors import NODE_FLAGS, keys_named_by_flags, one_red_line
from gossamer.cli.peer import BootstrapOption, SecretOption
from gossamer.cli.preflight import MAX_PORT, positive_seconds, read_swarm_secret
from gossamer.core.errors import ConfigError, GossamerError
from gossamer.obs.dashboard.app import DashboardConfig, DashboardService, create_app
from gossamer.obs.dashboard.scrape import ScrapeConfig, ScrapeSwarmSource, normalize_metrics_url
from gossamer.obs.dashboard.server import (
    bind_socket,
    check_allowed_host,
    check_host,
    serve_forever,
)
from gossamer.obs.dashboard.source import SwarmSource

_log = logging.getLogger(__name__)


def dashboard(
    bootstrap: BootstrapOption = None,
    scrape: Annotated[
        list[str] | None,
        typer.Option(
            "--scrape",
            help="A peer's metrics endpoint, HOST:PORT or http://HOST:PORT/metrics (repeatable).",
        ),
    ] = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to serve the page on (0.0.0.0: everyone).")
    ] = "127.0.0.1",
    port: Annotated[
        int,
        typer.Option("--port", help="Port of the page (0 picks a free one).", min=0, max=MAX_PORT),
    ] = 8080,
    gone_after_s: Annotated[
        float,
        typer.Option(
            "--gone-after-s",
            help="A peer silent this long is shown as gone.",
            callback=positive_seconds,
        ),
    ] = 2.5,
    poll_interval_s: Annotated[
        float,
        typer.Option(
            "--poll-interval-s",
            help="Seconds between looks at the swarm.",
            callback=positive_seconds,
        ),
    ] = 0.5,
    swarm_secret_file: SecretOption = None,
    listen: Annotated[
        str,
        typer.Option(
            "--listen",
            help="HOST:PORT of the node that watches the swarm with --bootstrap (port 0: any "
            "free one); the swarm's peers must be able to reach it.",
        ),
    ] = "0.0.0.0:0",
    allowed_hosts: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            help="A name the page may be asked for besides loopback ones, e.g. the name a "
            "reverse proxy on this machine passes on, or this machine's name on its network "
            "(repeatable; no port; '*.example.com' for a domain's names). Given, the page "
            "answers those names only, whatever --host; without it a --host other than "
            "loopback answers any name.",
        ),
    ] = None,
) -> None:
    """Serve a live web page of the swarm: peers, links, loss and throughput curves, events."""
    with one_red_line():
        config = DashboardConfig(poll_interval_s=poll_interval_s)
        with _values_as_config_errors():
            urls = tuple(normalize_metrics_url(target) for target in scrape or ())
            # Checked before anything starts (a wrong one failed as the page was about to be
            # served, with an AssertionError, or was taken and never matched).
            names = tuple(check_allowed_host(name) for name in allowed_hosts or ())
            check_host(host)
        with contextlib.ExitStack() as stack:
            source: SwarmSource
            if bootstrap:
                from gossamer.net.swarm_view import NetSwarmSource, NetSwarmViewConfig

                with _values_as_config_errors():
                    view = NetSwarmViewConfig(
                        bootstrap=tuple(bootstrap),
                        swarm_secret=read_swarm_secret(swarm_secret_file),
                        listen_address=listen,
                        metrics_urls=urls,
                        gone_after_s=gone_after_s,
                    )
                with keys_named_by_flags(NODE_FLAGS):  # (a --listen port in use, too)
                    view.node_config()
                    source = stack.enter_context(NetSwarmSource(view))
            elif urls:
                with _values_as_config_errors():  # (an endpoint given twice)
                    scrape_config = ScrapeConfig(urls=urls, gone_after_s=gone_after_s)
                source = ScrapeSwarmSource(scrape_config)
            else:
                raise ConfigError("name the swarm: --bootstrap HOST:PORT or --scrape URL")
            try:
                sock = bind_socket(host, port)
            except (OSError, OverflowError) as exc:  # gaierror is an OSError
                reason = getattr(exc, "strerror", None) or str(exc)
                raise GossamerError(
                    f"cannot serve the dashboard on {host}:{port}: {reason}; pick another "
                    "--port (0: any free one) or --host"
                ) from exc
            shown_host = f"[{host}]" if ":" in host else host
            typer.echo(f"dashboard at http://{shown_host}:{sock.getsockname()[1]}/", err=False)
            app = create_app(DashboardService(source, config))
            serve_forever(app, sock, host, allowed_hosts=names)


@contextlib.contextmanager
def _values_as_config_errors() -> Iterator[None]:
    """A source config's ValueError (the flags' values) as the one-line wrong-input error."""
    try:
        yield
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def register(app: typer.Typer) -> None:
    """Add `gossamer dashboard` to the root command."""
    app.command("dashboard")(dashboard)
