"""The dashboard's web app: the page, its script and style, and ``/api/state``.

A :class:`DashboardService` polls a :class:`~gossamer.obs.dashboard.source.SwarmSource` about
once a second into a :class:`~gossamer.obs.dashboard.history.SwarmHistory`; :func:`create_app`
serves what it has. The app's lifespan owns the polling task: it starts with the server and is
cancelled and awaited when the server stops. The page (``static/``) is plain HTML, JavaScript
and SVG written for Gossamer; it polls ``/api/state`` and redraws.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse, JSONResponse, Response

from gossamer.core.clock import Clock, SystemClock
from gossamer.core.errors import GossamerError
from gossamer.obs.dashboard.history import HistoryConfig, SwarmHistory
from gossamer.obs.dashboard.source import SwarmSource

__all__ = ["DashboardConfig", "DashboardService", "create_app"]

_log = logging.getLogger(__name__)

_STATIC_TYPES = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}

_PAGE_POLICY = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
}
"""The page runs its own script and style only, fetches from its own origin only, and is framed
by nobody: peer names and addresses shown on it are text, never markup."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DashboardConfig:
    """How often the dashboard looks at the swarm, and what the page is told."""

    poll_interval_s: float = 0.5
    """Seconds between snapshots of the source."""
    snapshot_timeout_s: float = 5.0
    """Deadline of one snapshot; a slower source is reported as an error on the page."""
    page_refresh_s: float = 1.0
    """Seconds between the page's requests for ``/api/state``."""
    title: str = "Gossamer swarm"
    """Shown at the top of the page."""
    history: HistoryConfig = field(default_factory=HistoryConfig)
    """How much is remembered."""

    def __post_init__(self) -> None:
        for name in ("poll_interval_s", "snapshot_timeout_s", "page_refresh_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"DashboardConfig.{name}: must be a positive number, not {value}")


class DashboardService:
    """Polls a source into a history and answers what the page asks.

    Args:
        source: where the swarm's state comes from.
        config: timings.
        clock: time source for sleeping between polls and stamping errors.
    """

    def __init__(
        self, source: SwarmSource, config: DashboardConfig | None = None, clock: Clock | None = None
    ) -> None:
        self.source = source
        self.config = config or DashboardConfig()
        self.history = SwarmHistory(self.config.history)
        self._clock = clock or SystemClock()
        self.last_error: str | None = None
        """Why the last snapshot failed, or what it could not see; None after a good one."""

    async def poll_once(self) -> None:
        """Take one snapshot into the history; a failure is remembered and logged, not raised."""
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that
            # arrives as the snapshot completes, and the polling loop would never stop.
            async with asyncio.timeout(self.config.snapshot_timeout_s):
                snapshot = await self.source.snapshot()
        except TimeoutError:
            self.last_error = f"the swarm did not answer within {self.config.snapshot_timeout_s} s"
            _log.warning("dashboard: %s", self.last_error)
            return
        except GossamerError as exc:
            self.last_error = str(exc)
            _log.warning("dashboard: snapshot failed: %s", exc)
            return
        except Exception as exc:
            # A bug in a source must show on the page, not silently freeze it.
            self.last_error = f"internal error in the swarm source: {exc!r}"
            _log.exception("dashboard: snapshot failed")
            return
        try:
            self.history.record(snapshot)
        except Exception as exc:
            # Likewise a bug in recording: polling goes on, and the page says what broke.
            self.last_error = f"internal error recording the swarm's state: {exc!r}"
            _log.exception("dashboard: recording a snapshot failed")
            return
        self.last_error = snapshot.problem

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            started = self._clock.monotonic()
            await self.poll_once()
            elapsed = self._clock.monotonic() - started
            await self._clock.sleep_async(max(0.0, self.config.poll_interval_s - elapsed))

    def state(self) -> dict[str, Any]:
        """What ``/api/state`` answers."""
        return {
            **self.history.state(),
            "title": self.config.title,
            "page_refresh_s": self.config.page_refresh_s,
            "error": self.last_error,
        }


def _static_text(name: str) -> str:
    return (importlib.resources.files(__package__) / "static" / name).read_text(encoding="utf-8")


def create_app(service: DashboardService, *, poll: bool = True) -> FastAPI:
    """The FastAPI app serving the page and the state.

    Args:
        service: what to serve.
        poll: run the service's polling loop for the app's lifetime (tests drive it by hand).
    """

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if not poll:
            yield
            return
        task = asyncio.get_running_loop().create_task(service.run(), name="dashboard-poll")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = FastAPI(
        title="Gossamer dashboard",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # (the schema was served though the docs pages were not)
    )
    no_store = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(_static_text("index.html"), headers=no_store | _PAGE_POLICY)

    @app.get("/static/{name}")
    async def static(name: str) -> Response:
        media_type = _STATIC_TYPES.get(name)
        if media_type is None:
            raise HTTPException(status_code=404, detail=f"no static file {name!r}")
        return Response(_static_text(name), media_type=media_type, headers=no_store)

    @app.get("/api/state")
    async def state() -> JSONResponse:
        return JSONResponse(service.state(), headers=no_store)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"ok": True, "num_snapshots": service.history.num_snapshots}

    return app
