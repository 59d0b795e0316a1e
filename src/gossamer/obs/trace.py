"""Timelines: spans of compute, communication, waiting, checkpointing and sync.

A peer records spans with :class:`SpanRecorder`; they are kept in a bounded in-memory ring, handed
to sinks (metrics count the seconds per phase), and optionally appended to a JSON-lines file that
``gossamer trace export`` turns into a Chrome trace / Perfetto JSON file.

Spans nest. The training loop opens a span around each strategy hook; code deeper down that knows
better what its time was (the averager: waiting for a round's group, then the all-reduce) records
spans inside it with :func:`nested_span` or :func:`record_nested`, without being handed the
recorder: they find the span open on their thread. A span's :attr:`Span.exclusive_s` is its time
not covered by spans nested in it, so counting exclusive seconds per phase counts every second of
a thread once, and the phases add up to at most the wall time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import string
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "MAX_TRACE_FILE_BYTES",
    "PHASES",
    "Span",
    "SpanRecorder",
    "SpanSink",
    "active_recorder",
    "export_chrome_trace",
    "nested_span",
    "read_spans",
    "record_nested",
]

PHASES = ("compute", "communication", "waiting", "checkpoint", "evaluation", "sync")
"""The phases a peer's time is split into."""
MAX_TRACE_FILE_BYTES = 64 << 20
"""A trace file this big is moved to ``NAME.1`` (replacing the one there) and a new one begun:
about 75,000 training steps each, two files at most on disk, and one exported in well under a
gigabyte of memory."""
_FLUSH_EVERY_S = 1.0
"""Spans reach the file at most this late (a killed peer loses those nearest its end)."""
_log = logging.getLogger(__name__)


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
    exclusive_s: float | None = None
    """Seconds of ``duration_s`` not covered by spans nested in it (None: all of it)."""
    within: str = ""
    """The name of the outermost span this one ran inside ('' when it is outermost)."""

    @property
    def own_s(self) -> float:
        """The seconds this span alone accounts for (its duration minus nested spans')."""
        return self.duration_s if self.exclusive_s is None else self.exclusive_s


SpanSink = Callable[[Span], None]
"""Receives every finished span; must be quick and never raise."""


@dataclass(slots=True)
class _OpenSpan:
    """A span still open on some thread: who records it and how much of it nested spans took."""

    recorder: SpanRecorder
    step: int
    outermost: str
    nested_s: float = 0.0


class _OpenSpans(threading.local):
    """The spans open on the current thread, innermost last."""

    def __init__(self) -> None:
        self.stack: list[_OpenSpan] = []


_open = _OpenSpans()


def _innermost() -> _OpenSpan | None:
    stack = _open.stack
    return stack[-1] if stack else None


def active_recorder() -> SpanRecorder | None:
    """The recorder of the innermost span open on this thread (None outside any span)."""
    frame = _innermost()
    return frame.recorder if frame is not None else None


@contextmanager
def nested_span(name: str, **attrs: Any) -> Iterator[None]:
    """Time the body as a span inside the span open on this thread; nothing if none is open.

    For code that is called from inside a training loop's span but is not handed its recorder.
    """
    frame = _innermost()
    if frame is None:
        yield
        return
    with frame.recorder.span(name, step=frame.step, **attrs):
        yield


def record_nested(name: str, *, start_unix_s: float, duration_s: float, **attrs: Any) -> None:
    """Record a span timed elsewhere (on the node's event loop, say) inside this thread's open span.

    Its time is taken out of the open span's exclusive time, so it must have run within it. Does
    nothing when no span is open on this thread (or its recorder is disabled).
    """
    frame = _innermost()
    if frame is None:
        return
    duration_s = max(0.0, duration_s)
    frame.nested_s += duration_s
    recorder = frame.recorder
    recorder.record(
        Span(
            name=name,
            start_unix_s=start_unix_s,
            duration_s=duration_s,
            peer=recorder.peer,
            step=frame.step,
            attrs=attrs,
            exclusive_s=duration_s,
            within=frame.outermost,
        )
    )


def _open_for_appending(path: Path) -> TextIO:
    """``path`` opened to append lines to. A file whose last line is torn (the disk filled up,
    or its writer was killed, mid-line) is first ended with a newline: spans appended by a
    restarted peer went onto the torn line, and the whole file was refused on export.

    Raises:
        OSError: the file cannot be opened or written.
    """
    with path.open("ab") as raw:
        if raw.tell() > 0:
            with path.open("rb") as reader:
                reader.seek(-1, os.SEEK_END)
                torn = reader.read(1) != b"\n"
            if torn:
                raw.write(b"\n")
    return path.open("a", encoding="utf-8")


class SpanRecorder:
    """Records spans into a bounded ring, to sinks and optionally to a JSON-lines file.

    Args:
        peer: the peer id written into every span.
        max_spans: how many recent spans to keep in memory.
        path: append spans to this JSON-lines file if given. A file that cannot be written
            (a full disk) is given up, with one warning: tracing never ends a run.
        sinks: called with each finished span.
        enabled: if False, ``span`` records nothing (the baseline of the overhead benchmark).
        max_file_bytes: the file's size past which it is moved aside (see
            :data:`MAX_TRACE_FILE_BYTES`).
    """

    def __init__(
        self,
        *,
        peer: str = "",
        max_spans: int = 10_000,
        path: Path | None = None,
        sinks: Iterable[SpanSink] = (),
        enabled: bool = True,
        max_file_bytes: int = MAX_TRACE_FILE_BYTES,
    ) -> None:
        self.peer = peer
        self.enabled = enabled
        self._spans: deque[Span] = deque(maxlen=max_spans)
        self._sinks = list(sinks)
        self._lock = threading.Lock()
        self._path = path
        self._max_file_bytes = max_file_bytes
        self._file: TextIO | None = None
        self._file_bytes = 0
        self._unflushed = False
        self._closed = threading.Event()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = _open_for_appending(path)
            self._file_bytes = self._file.tell()
            # Flushed a second after a span is written at the latest, whether or not another
            # comes: a peer waiting long (a round forming) and then killed kept its last spans
            # in the buffer.
            threading.Thread(
                target=self._flush_every_second, name="trace-flush", daemon=True
            ).start()

    def _flush_every_second(self) -> None:
        while not self._closed.wait(_FLUSH_EVERY_S):
            with self._lock:
                if self._file is None:
                    return
                if self._unflushed:
                    self._unflushed = False
                    self._flush_or_give_up()

    def add_sink(self, sink: SpanSink) -> None:
        """Send every later span to ``sink`` too."""
        self._sinks.append(sink)

    @contextmanager
    def span(self, name: str, *, step: int = -1, **attrs: Any) -> Iterator[None]:
        """Time the body of a ``with`` block as a span called ``name``.

        Inside another span of this recorder on the same thread it is nested: its time is taken
        out of the outer span's exclusive time, and it inherits the outer span's step if it has
        none.
        """
        if not self.enabled:
            yield
            return
        stack = _open.stack
        parent = stack[-1] if stack and stack[-1].recorder is self else None
        if parent is not None and step < 0:
            step = parent.step
        frame = _OpenSpan(self, step, parent.outermost if parent is not None else name)
        stack.append(frame)
        wall = time.time()
        started = time.perf_counter()
        try:
            yield
        finally:
            duration_s = time.perf_counter() - started
            stack.pop()
            if parent is not None:
                parent.nested_s += duration_s
            self.record(
                Span(
                    name=name,
                    start_unix_s=wall,
                    duration_s=duration_s,
                    peer=self.peer,
                    step=step,
                    attrs=attrs,
                    exclusive_s=max(0.0, duration_s - frame.nested_s),
                    within=parent.outermost if parent is not None else "",
                )
            )

    def record(self, span: Span) -> None:
        """Keep ``span`` and hand it to the sinks and the file."""
        with self._lock:
            self._spans.append(span)
            if self._file is not None:
                self._write(json.dumps(asdict(span)) + "\n")
        for sink in self._sinks:
            sink(span)

    def _write(self, line: str) -> None:
        assert self._file is not None
        assert self._path is not None
        try:
            if self._file_bytes + len(line) > self._max_file_bytes and self._file_bytes:
                self._file.close()
                self._path.replace(self._path.with_name(self._path.name + ".1"))
                self._file = _open_for_appending(self._path)
                self._file_bytes = self._file.tell()
            self._file.write(line)
            self._file_bytes += len(line)  # (ASCII: json.dumps escapes the rest)
            self._unflushed = True
        except OSError as exc:
            self._give_up(exc)

    def _flush_or_give_up(self) -> None:
        assert self._file is not None
        try:
            self._file.flush()
        except OSError as exc:
            self._give_up(exc)

    def _give_up(self, exc: OSError) -> None:
        _log.warning(
            "trace file %s cannot be written (%s): no more spans go to it; training goes on",
            self._path,
            exc,
        )
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        self._file = None

    def spans(self) -> list[Span]:
        """The spans still in memory, oldest first."""
        with self._lock:
            return list(self._spans)

    def close(self) -> None:
        """Flush and close the file, if any (best effort: a failure is logged, not raised)."""
        self._closed.set()
        with self._lock:
            if self._file is None:
                return
            try:
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError as exc:
                _log.warning("trace file %s: its last spans may be lost (%s)", self._path, exc)
            finally:
                with contextlib.suppress(OSError):
                    self._file.close()
                self._file = None


def read_spans(path: Path) -> list[Span]:
    """Spans from a JSON-lines file written by :class:`SpanRecorder`.

    A line that is not a span is skipped: a torn one (a full disk, or a writer killed
    mid-line), after which a restarted peer appends. Their count and the first of them are
    logged in one warning (not for a torn last line alone: what a killed peer leaves). A file is
    refused when it is not a trace at all: it holds no span, or its first line (blank lines
    aside) is neither a span nor a torn one (the start of a span's JSON, cut off, or NUL bytes
    a crash left).

    Raises:
        ValueError: the file is not a trace, as above.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    spans: list[Span] = []
    num_skipped = 0
    first_skipped = ""
    not_a_trace = ""
    last_is_torn = False
    first_line = True
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line, parse_constant=_not_a_number, parse_float=_finite_float)
            spans.append(_span_of(fields))
            last_is_torn = False
        except (json.JSONDecodeError, TypeError, ValueError, RecursionError) as exc:
            # (RecursionError: a line nested deeper than the parser goes, such as ``[`` * 10**5,
            # stopped the export with a traceback.)
            torn = isinstance(exc, json.JSONDecodeError) and _is_torn(line)
            if first_line and not torn:
                not_a_trace = f"{path}:{number} is not a span: {exc}"
            num_skipped += 1
            first_skipped = first_skipped or f"line {number}: {exc}"
            last_is_torn = torn
        first_line = False
    if not spans:
        raise ValueError(
            f"{path} holds no span; record spans with `gossamer train --trace FILE` and export "
            "that file"
        )
    if not_a_trace:
        raise ValueError(not_a_trace)
    if num_skipped and not (num_skipped == 1 and last_is_torn):
        _log.warning(
            "%s: %d line(s) not spans, skipped (torn by a full disk or a crash?); the first, %s",
            path,
            num_skipped,
            first_skipped,
        )
    return spans


_SPAN_LINE_START = '{"name": '
"""How every line :class:`SpanRecorder` writes begins (``json.dumps`` of a :class:`Span`)."""
_NUL_OR_SPACE = "\x00" + string.whitespace


def _is_torn(line: str) -> bool:
    """Whether a line that is not JSON is a span's line cut off: the start of one, or NUL bytes
    (what a crash can leave where the file system had not yet written the data) around one
    or alone. A file whose first line was NUL bytes was refused whole as not a trace."""
    rest = line.strip(_NUL_OR_SPACE)
    return rest.startswith(_SPAN_LINE_START) or _SPAN_LINE_START.startswith(rest)


_SPAN_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "start_unix_s": (int, float),
    "duration_s": (int, float),
    "peer": (str,),
    "step": (int,),
    "attrs": (dict,),
    "exclusive_s": (int, float, type(None)),
    "within": (str,),
}


def _not_a_number(constant: str) -> Any:
    """(``json.loads``' ``parse_constant``) Python's json reads ``NaN`` and ``Infinity``, which
    no JSON parser of a trace viewer does: the export wrote them on and said it succeeded."""
    raise ValueError(f"{constant} is not a number JSON has (a span's times and attrs are finite)")


def _finite_float(text: str) -> float:
    """(``json.loads``' ``parse_float``) ``1e400`` is read as infinity, which the export cannot
    write (JSON has no infinity)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:30]} is out of range of a float")
    return value


def _span_of(fields: Any) -> Span:
    """A span from one parsed line, its fields' types checked (the file may be anyone's)."""
    if not isinstance(fields, dict):
        raise TypeError(f"a span is a JSON object, not {type(fields).__name__}")
    for key, value in fields.items():
        kinds = _SPAN_FIELD_TYPES.get(key)
        if kinds is None:
            raise TypeError(f"unknown field {key!r}")
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise TypeError(f"{key!r} is a {type(value).__name__}")
    for key in ("start_unix_s", "duration_s", "exclusive_s"):
        value = fields.get(key)
        if value is None:
            continue
        # In microseconds, as the export writes them: 1e305 s was read and became infinite
        # there (a traceback); an integer of 400 digits is no float at all.
        try:
            in_range = math.isfinite(float(value) * 1e6)
        except OverflowError:
            in_range = False
        if not in_range:
            raise ValueError(f"{key!r} is out of range ({str(value)[:30]})")
        if key != "start_unix_s" and value < 0:
            raise ValueError(f"{key!r} is negative ({value})")
    return Span(**fields)


def export_chrome_trace(spans: Iterable[Span]) -> dict[str, Any]:
    """Spans as a Chrome trace (the JSON object format Perfetto and chrome://tracing open).

    Each peer is a process; each phase a thread within it, so phases stack as rows. A nested span
    goes on the row of the outermost span it ran inside, so it is drawn under that span (a hook's
    "communication" span with its "waiting" and all-reduce parts below it).
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
        row = span.within or span.name
        if (peer, row) not in tids:
            tids[(peer, row)] = len(tids) + 1
            events.append(
                {
                    "ph": "M",
                    "name": "thread_name",
                    "pid": pids[peer],
                    "tid": tids[(peer, row)],
                    "args": {"name": row},
                }
            )
        events.append(
            {
                "ph": "X",
                "name": span.name,
                "cat": "gossamer",
                "pid": pids[peer],
                "tid": tids[(peer, row)],
                "ts": span.start_unix_s * 1e6,
                "dur": span.duration_s * 1e6,
                "args": {"step": span.step, **span.attrs},
            }
        )
    return {"traceEvents": events, "displayTimeUnit": "ms"}
