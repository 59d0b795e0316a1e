"""Timelines: spans of compute, communication, waiting, checkpointing and sync.

A peer records spans with :class:`SpanRecorder`; they are kept in a bounded in-memory ring, handed
to sinks (metrics count the seconds per phase), and optionally appended to a JSON-lines file that
``gossamer trace export`` turns into a Chrome trace / Perfetto JSON file.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

__all__ = ["PHASES", "Span", "SpanRecorder", "SpanSink", "export_chrome_trace", "read_spans"]

PHASES = ("compute", "communication", "waiting", "checkpoint", "evaluation", "sync")
"""The phases a peer's time is split into."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Span:
    """One timed stretch of work."""

    name: str
    """The phase (one of :data:`PHASES`) or a finer name."""
    start_unix_s: float
    """Wall-clock start, seconds since the epoch."""
    duration_s: float
    """How long it took."""
    peer: str = ""
    """The peer that did it."""
    step: int = -1
    """The training step it belongs to, or -1."""
    attrs: dict[str, Any] = field(default_factory=dict)
    """Anything else worth showing (bytes, group size)."""


SpanSink = Callable[[Span], None]
"""Receives every finished span; must be quick and never raise."""


class SpanRecorder:
    """Records spans into a bounded ring, to sinks and optionally to a JSON-lines file.

    Args:
        peer: the peer id written into every span.
        max_spans: how many recent spans to keep in memory.
        path: append spans to this JSON-lines file if given.
        sinks: called with each finished span.
        enabled: if False, ``span`` records nothing (the baseline of the overhead benchmark).
    """

    def __init__(
        self,
        *,
        peer: str = "",
        max_spans: int = 10_000,
        path: Path | None = None,
        sinks: Iterable[SpanSink] = (),
        enabled: bool = True,
    ) -> None:
        self.peer = peer
        self.enabled = enabled
        self._spans: deque[Span] = deque(maxlen=max_spans)
        self._sinks = list(sinks)
        self._lock = threading.Lock()
        self._file: TextIO | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", encoding="utf-8")

    def add_sink(self, sink: SpanSink) -> None:
        """Send every later span to ``sink`` too."""
        self._sinks.append(sink)

    @contextmanager
    def span(self, name: str, *, step: int = -1, **attrs: Any) -> Iterator[None]:
        """Time the body of a ``with`` block as a span called ``name``."""
        if not self.enabled:
            yield
            return
        wall = time.time()
        started = time.perf_counter()
        try:
            yield
        finally:
            self.record(
                Span(
                    name=name,
                    start_unix_s=wall,
                    duration_s=time.perf_counter() - started,
                    peer=self.peer,
                    step=step,
                    attrs=attrs,
                )
            )

    def record(self, span: Span) -> None:
        """Keep ``span`` and hand it to the sinks and the file."""
        with self._lock:
            self._spans.append(span)
            if self._file is not None:
                self._file.write(json.dumps(asdict(span)) + "\n")
        for sink in self._sinks:
            sink(span)

    def spans(self) -> list[Span]:
        """The spans still in memory, oldest first."""
        with self._lock:
            return list(self._spans)

    def close(self) -> None:
        """Flush and close the file, if any."""
        with self._lock:
            if self._file is not None:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
                self._file = None


def read_spans(path: Path) -> list[Span]:
    """Spans from a JSON-lines file written by :class:`SpanRecorder`; a torn last line is skipped.

    Raises:
        ValueError: a line other than the last is not a span.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    spans: list[Span] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            spans.append(Span(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as exc:
            if number == len(lines):
                break  # the writer was killed mid-line
            raise ValueError(f"{path}:{number} is not a span: {exc}") from exc
    return spans


def export_chrome_trace(spans: Iterable[Span]) -> dict[str, Any]:
    """Spans as a Chrome trace (the JSON object format Perfetto and chrome://tracing open).

    Each peer is a process; each phase a thread within it, so phases stack as rows.
    """
    events: list[dict[str, Any]] = []
    pids: dict[str, int] = {}
    tids: dict[tuple[str, str], int] = {}
    for span in spans:
        peer = span.peer or "peer"
        if peer not in pids:
            pids[peer] = len(pids) + 1
            events.append(
                {"ph": "M", "name": "process_name", "pid": pids[peer], "args": {"name": peer}}
            )
        if (peer, span.name) not in tids:
            tids[(peer, span.name)] = len(tids) + 1
            events.append(
                {
                    "ph": "M",
                    "name": "thread_name",
                    "pid": pids[peer],
                    "tid": tids[(peer, span.name)],
                    "args": {"name": span.name},
                }
            )
        events.append(
            {
                "ph": "X",
                "name": span.name,
                "cat": "gossamer",
                "pid": pids[peer],
                "tid": tids[(peer, span.name)],
                "ts": span.start_unix_s * 1e6,
                "dur": span.duration_s * 1e6,
                "args": {"step": span.step, **span.attrs},
            }
        )
    return {"traceEvents": events, "displayTimeUnit": "ms"}
