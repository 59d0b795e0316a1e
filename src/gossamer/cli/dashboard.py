"""`gossamer dashboard`: a live web page of the swarm (peers, links, curves, events)."""

from __future__ import annotations

import contextlib
import logging
from typing import Annotated

import typer

from gossamer.core.errors import GossamerError
from gossamer.obs.dashboard.app import DashboardConfig, DashboardService, create_app
from gossamer.obs.dashboard.scrape import ScrapeConfig, ScrapeSwarmSource, normalize_metrics_url
from gossamer.obs.dashboard.server import bind_socket, serve_forever
from gossamer.obs.dashboard.source import SwarmSource

_log = logging.getLogger(__name__)


def dashboard(
    bootstrap: Annotated[
        list[str] | None,
        typer.Option(
            "--bootstrap", help="A peer of the swarm, HOST:PORT or PEER_ID@HOST:PORT (repeatable)."
        ),
    ] = None,
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
    port: Annotated[int, typer.Option("--port", help="Port of the page (0 picks a free one).")] = (
        8080
    ),
    gone_after_s: Annotated[
        float,
        typer.Option("--gone-after-s", help="A peer silent this long is shown as gone."),
    ] = 2.5,
    poll_interval_s: Annotated[
        float, typer.Option("--poll-interval-s", help="Seconds between looks at the swarm.")
    ] = 0.5,
) -> None:
    """Serve a live web page of the swarm: peers, links, loss and throughput curves, events."""
    try:
        config = DashboardConfig(poll_interval_s=poll_interval_s)
        urls = tuple(normalize_metrics_url(target) for target in scrape or ())
        with contextlib.ExitStack() as stack:
            source: SwarmSource
            if bootstrap:
                from gossamer.net.swarm_view import NetSwarmSource, NetSwarmViewConfig

                source = stack.enter_context(
                    NetSwarmSource(
                        NetSwarmViewConfig(
                            bootstrap=tuple(bootstrap),
                            metrics_urls=urls,
                            gone_after_s=gone_after_s,
                        )
                    )
                )
            elif urls:
                source = ScrapeSwarmSource(ScrapeConfig(urls=urls, gone_after_s=gone_after_s))
            else:
                raise ValueError("name the swarm: --bootstrap HOST:PORT or --scrape URL")
            try:
                sock = bind_socket(host, port)
            except (OSError, OverflowError) as exc:  # gaierror is an OSError
                reason = getattr(exc, "strerror", None) or str(exc)
                raise ValueError(
                    f"cannot serve the dashboard on {host}:{port}: {reason}; pick another "
                    "--port (0: any free one) or --host"
                ) from exc
            shown_host = f"[{host}]" if ":" in host else host
            typer.echo(f"dashboard at http://{shown_host}:{sock.getsockname()[1]}/", err=False)
            serve_forever(create_app(DashboardService(source, config)), sock)
    except (ValueError, OSError, GossamerError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from exc


def register(app: typer.Typer) -> None:
    """Add `gossamer dashboard` to the root command."""
    app.command("dashboard")(dashboard)
