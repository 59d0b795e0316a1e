"""Reading a peer's Prometheus ``/metrics`` text into a :class:`PeerSample`.

The names read here are the contract between the metrics a peer exports and the dashboard; a
metric a peer does not export is simply absent from its sample. ``gossamer_peer_info{peer_id}``
(value 1) names the peer, so its traffic can be matched with other peers' ``peer`` labels.

What a peer says is bounded here, where it enters:

- Only the lines the dashboard reads go to ``prometheus_client``'s parser: the samples named in
  :data:`METRIC_NAMES` and their ``# TYPE`` lines. Its parser takes time quadratic in a line's
  length on some lines (1.28 MB of spaces in a comment: 24 s; label values full of ``\\"``) and
  some 45 bytes of memory per byte of a page of tiny samples (8 MiB of ``a 1``: 17 s, 370 MiB);
  one such endpoint held the dashboard's event loop and every peer vanished from the page.
- At most :data:`MAX_LINES` lines of a page are looked at; a line over :data:`MAX_LINE_CHARS`
  characters is left out unread; at most :data:`MAX_SAMPLES_READ` samples go to the parser. What
  was left out is said in :attr:`ParsedMetrics.problem`, shown with the peer.
- The other lines are not parsed, only looked at: one that is neither a comment nor shaped like
  a sample (``name{labels} value``) means the page is not in the exposition format at all (an
  HTML page, a gRPC port named by mistake).
- An id or label longer than :data:`MAX_ID_CHARS` is left out, and a labelled metric keeps its
  :data:`MAX_LABELS_PER_METRIC` largest values (a 2 MB peer id was taken as it was, and a peer
  naming 5,000 remotes at a scrape gave the dashboard 5,000 links); a value that is not a finite
  float (a 400-digit integer) is left out.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from gossamer.obs.dashboard.source import PeerSample

__all__ = [
    "MAX_ID_CHARS",
    "MAX_LABELS_PER_METRIC",
    "MAX_LINES",
    "MAX_LINE_CHARS",
    "MAX_SAMPLES_READ",
    "METRIC_NAMES",
    "ParsedMetrics",
    "parse_metrics",
    "printable",
]

MAX_ID_CHARS = 256
"""A longer peer id or label value is left out (a peer id has 52 characters, a host name at
most 253); a peer whose own id is left out is named by its metrics address."""
MAX_LABELS_PER_METRIC = 512
"""Values kept per labelled metric of one peer (remote peers, phases): the largest."""
MAX_LINES = 20_000
"""Lines of a page looked at; the rest is not read (a peer's page has about 700: its 64 named
remotes times the network layer's per-peer metrics, and some 200 more)."""
MAX_LINE_CHARS = 512
"""A longer line is left out unread (a peer's longest, a ``# HELP`` line, has about 200
characters; a sample the dashboard reads at most some 320, its label value being bounded by
:data:`MAX_ID_CHARS`). Only a sample of a metric the dashboard reads is said to be left out
(another is none of its business: such a line was logged as a warning and shown with the peer
though nothing the dashboard reads was lost)."""
MAX_SAMPLES_READ = 2048
"""Lines handed to the parser at most: samples of the metrics in :data:`METRIC_NAMES` and their
``# TYPE`` lines (a peer exports about 170: its remotes' traffic each way, its phases, a few
figures)."""

METRIC_NAMES = {
    "peer_info": "gossamer_peer_info",
    "step": "gossamer_train_step",
    "loss": "gossamer_train_loss",
    "validation_loss": "gossamer_validation_loss",
    "tokens_total": "gossamer_train_tokens_total",
    "tokens_per_second": "gossamer_train_tokens_per_second",
    "goodput_ratio": "gossamer_goodput_ratio",
    "goodput_kept_tokens": "gossamer_goodput_kept_tokens",
    "goodput_wall_s": "gossamer_goodput_wall_seconds",
    "compute_tokens_per_second": "gossamer_compute_tokens_per_second",
    "num_resyncs": "gossamer_resyncs_total",
    "phase_seconds": "gossamer_time_seconds_total",
    "bytes_sent": "gossamer_net_sent_bytes_total",
    "bytes_received": "gossamer_net_received_bytes_total",
}
"""Field of :class:`PeerSample` (or ``peer_info``) -> the sample name it is read from."""

_SCALARS = (
    "step",
    "loss",
    "validation_loss",
    "tokens_total",
    "tokens_per_second",
    "goodput_ratio",
    "goodput_kept_tokens",
    "goodput_wall_s",
    "compute_tokens_per_second",
    "num_resyncs",
)
_BY_LABEL = {"phase_seconds": "phase", "bytes_sent": "peer", "bytes_received": "peer"}

_FAMILIES = frozenset(METRIC_NAMES.values()) | {
    name.removesuffix("_total") for name in METRIC_NAMES.values()
}
"""Names whose lines go to the parser: the samples read, and the families they belong to (a
counter ``X`` exported as ``# TYPE X counter`` and ``X 5`` is read by the parser as ``X_total``,
so those lines are kept too)."""
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_READ_SAMPLE_START = re.compile(
    r"[ \t]*+(?:" + "|".join(re.escape(name) for name in sorted(_FAMILIES)) + r")[{ \t]"
)
"""The start of a sample line of a metric in :data:`_FAMILIES` (checked on overlong lines)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ParsedMetrics:
    """What one scrape said."""

    peer_id: str | None
    """The id in ``gossamer_peer_info``, if the peer exports it."""
    sample: PeerSample
    """The values the dashboard uses."""
    problem: str | None = None
    """What of the page was left out (too many lines, overlong lines); None if nothing."""


_NEVER_NEGATIVE = {
    "step",
    "tokens_total",
    "tokens_per_second",
    "goodput_kept_tokens",
    "goodput_wall_s",
    "compute_tokens_per_second",
    "num_resyncs",
    "phase_seconds",
    "bytes_sent",
    "bytes_received",
}
"""Counters and counts: a negative value (a peer that misreports) is left out, not shown."""


def _value(field: str, value: float) -> float | None:
    try:
        number = float(value)  # the parser gives an int for an integer, of any length
    except (ArithmeticError, ValueError, TypeError):
        return None
    if not math.isfinite(number) or (field in _NEVER_NEGATIVE and number < 0):
        return None
    return number


def _is_sample_shaped(line: str) -> bool:
    """Whether a line (stripped, not a comment) looks like ``name{labels} value ...``: linear
    in its length, unlike the parser; checked on the lines that are not parsed."""
    opening = line.find("{")
    if opening < 0 or " # " in line[:opening]:  # (what follows " # " is an exemplar)
        name, _, tail = line.replace("\t", " ").partition(" ")
    else:
        name = line[:opening].strip()  # empty where the name is quoted inside the braces
        closing = line.rfind("}")
        if closing < opening:
            return False
        tail = line[closing + 1 :]
    if name and not _NAME.fullmatch(name):
        return False
    fields = tail.split()
    return bool(fields) and _is_number(fields[0])


def printable(text: str) -> str:
    """``text`` with each character that is not printable (a control character: an ANSI
    escape, a carriage return, a newline) written as its escape, ``\\x1b``: what a page says
    goes into log lines and onto the dashboard's page."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _lines_to_parse(text: str) -> tuple[list[str], str | None]:
    """The lines of ``text`` the dashboard reads, and what was left out, if anything.

    Raises:
        ValueError: a line is neither a comment nor shaped like a sample.
    """
    kept: list[str] = []
    num_long = 0
    cut: str | None = None
    start = 0
    number = 0
    # Line by line through find(), not splitlines(): a page of 2 million tiny lines is not
    # copied into as many strings.
    while start < len(text):
        end = text.find("\n", start)
        if end < 0:
            end = len(text)
        number += 1
        if number > MAX_LINES:
            cut = f"page over {MAX_LINES:,} lines: the rest not read"
            break
        if end - start > MAX_LINE_CHARS:
            # Said only where it is a sample the dashboard reads: a comment or another metric's
            # line is not read anyway.
            if _READ_SAMPLE_START.match(text, start, end):
                num_long += 1
            start = end + 1
            continue
        line = text[start:end].strip()
        start = end + 1
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            wanted = len(parts) == 4 and parts[1] == "TYPE" and parts[2] in _FAMILIES
        else:
            matched = _NAME.match(line)
            name = matched.group() if matched else ""
            wanted = name in _FAMILIES and line[len(name) : len(name) + 1] in ("{", " ", "\t")
            if not wanted and not _is_sample_shaped(line):
                raise ValueError(f"line {number} is not a sample: {line[:80]!r}")
        if wanted:
            if len(kept) >= MAX_SAMPLES_READ:
                cut = f"over {MAX_SAMPLES_READ:,} lines the dashboard reads: the rest not read"
                break
            kept.append(line)
    problems = [cut] if cut else []
    if num_long:
        problems.append(f"{num_long:,} line(s) over {MAX_LINE_CHARS:,} characters left out")
    return kept, "; ".join(problems) or None


def parse_metrics(text: str) -> ParsedMetrics:
    """Parse Prometheus text exposition format, in time and memory bounded by the limits above
    (run it off the event loop all the same: up to a second or so on a hostile page).

    Raises:
        ValueError: the text is not in the exposition format.
    """
    wanted = {name: field for field, name in METRIC_NAMES.items()}
    scalars: dict[str, float | None] = {}
    labelled: dict[str, dict[str, float]] = {field: {} for field in _BY_LABEL}
    peer_id: str | None = None
    try:
        lines, problem = _lines_to_parse(text)
        samples = [
            s
            for family in text_string_to_metric_families("\n".join(lines) + "\n")
            for s in family.samples
        ]
    except (ValueError, ArithmeticError, IndexError, KeyError, TypeError) as exc:
        # printable(): the parser's error quotes the page's line, control characters and all
        # (ANSI escapes, a carriage return), and this is logged.
        raise ValueError(f"not Prometheus text format: {printable(str(exc)[:200])}") from exc
    for sample in samples:
        field = wanted.get(sample.name)
        if field is None:
            continue
        if field == "peer_info":
            named = sample.labels.get("peer_id")
            if sample.value == 1 and named and len(named) <= MAX_ID_CHARS:
                peer_id = named
        elif field in _BY_LABEL:
            key = sample.labels.get(_BY_LABEL[field])
            value = _value(field, sample.value)
            if key is not None and len(key) <= MAX_ID_CHARS and value is not None:
                labelled[field][key] = labelled[field].get(key, 0.0) + value
        elif not sample.labels:
            scalars[field] = _value(field, sample.value)
    for field, values in labelled.items():
        if len(values) > MAX_LABELS_PER_METRIC:
            # The busiest remotes, the same ones at each scrape (ties by name).
            kept = sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_LABELS_PER_METRIC]
            labelled[field] = dict(kept)
    peer_sample = PeerSample(
        step=scalars.get("step"),
        loss=scalars.get("loss"),
        validation_loss=scalars.get("validation_loss"),
        tokens_total=scalars.get("tokens_total"),
        tokens_per_second=scalars.get("tokens_per_second"),
        goodput_ratio=scalars.get("goodput_ratio"),
        goodput_kept_tokens=scalars.get("goodput_kept_tokens"),
        goodput_wall_s=scalars.get("goodput_wall_s"),
        compute_tokens_per_second=scalars.get("compute_tokens_per_second"),
        num_resyncs=scalars.get("num_resyncs"),
        phase_seconds=labelled["phase_seconds"],
        bytes_sent=labelled["bytes_sent"],
        bytes_received=labelled["bytes_received"],
    )
    return ParsedMetrics(peer_id=peer_id, sample=peer_sample, problem=problem)
