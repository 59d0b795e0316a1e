"""Reading a peer's Prometheus ``/metrics`` text into a :class:`PeerSample`.

The names read here are the contract between the metrics a peer exports and the dashboard; a
metric a peer does not export is simply absent from its sample. ``gossamer_peer_info{peer_id}``
(value 1) names the peer, so its traffic can be matched with other peers' ``peer`` labels.

What a peer says is bounded here, where it enters: an id or label longer than
:data:`MAX_ID_CHARS` is left out, and a labelled metric keeps its :data:`MAX_LABELS_PER_METRIC`
largest values. (A 2 MB peer id was taken as it was, and a peer naming 5,000 remotes at a scrape
gave the dashboard 5,000 links.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from gossamer.obs.dashboard.source import PeerSample

__all__ = [
    "MAX_ID_CHARS",
    "MAX_LABELS_PER_METRIC",
    "METRIC_NAMES",
    "ParsedMetrics",
    "parse_metrics",
]

MAX_ID_CHARS = 256
"""A longer peer id or label value is left out (a peer id has 52 characters, a host name at
most 253); a peer whose own id is left out is named by its metrics address."""
MAX_LABELS_PER_METRIC = 512
"""Values kept per labelled metric of one peer (remote peers, phases): the largest."""

METRIC_NAMES = {
    "peer_info": "gossamer_peer_info",
    "step": "gossamer_train_step",
    "loss": "gossamer_train_loss",
    "validation_loss": "gossamer_validation_loss",
    "tokens_total": "gossamer_train_tokens_total",
    "tokens_per_second": "gossamer_train_tokens_per_second",
    "goodput_ratio": "gossamer_goodput_ratio",
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
    "num_resyncs",
)
_BY_LABEL = {"phase_seconds": "phase", "bytes_sent": "peer", "bytes_received": "peer"}


@dataclass(frozen=True, kw_only=True, slots=True)
class ParsedMetrics:
    """What one scrape said."""

    peer_id: str | None
    """The id in ``gossamer_peer_info``, if the peer exports it."""
    sample: PeerSample
    """The values the dashboard uses."""


_NEVER_NEGATIVE = {
    "step",
    "tokens_total",
    "tokens_per_second",
    "num_resyncs",
    "phase_seconds",
    "bytes_sent",
    "bytes_received",
}
"""Counters and counts: a negative value (a peer that misreports) is left out, not shown."""


def _value(field: str, value: float) -> float | None:
    if not math.isfinite(value) or (field in _NEVER_NEGATIVE and value < 0):
        return None
    return value


def parse_metrics(text: str) -> ParsedMetrics:
    """Parse Prometheus text exposition format.

    Raises:
        ValueError: the text is not in the exposition format.
    """
    wanted = {name: field for field, name in METRIC_NAMES.items()}
    scalars: dict[str, float | None] = {}
    labelled: dict[str, dict[str, float]] = {field: {} for field in _BY_LABEL}
    peer_id: str | None = None
    try:
        samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    except (ValueError, IndexError, KeyError, TypeError) as exc:
        raise ValueError(f"not Prometheus text format: {exc}") from exc
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
        num_resyncs=scalars.get("num_resyncs"),
        phase_seconds=labelled["phase_seconds"],
        bytes_sent=labelled["bytes_sent"],
        bytes_received=labelled["bytes_received"],
    )
    return ParsedMetrics(peer_id=peer_id, sample=peer_sample)
