"""What a node knows, as plain data: for ``gossamer peers``, status files and ``obs/``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gossamer.net.node import Node
from gossamer.net.records import PeerRecord
from gossamer.proto import net_pb2

__all__ = ["REACHABILITY_NAMES", "node_status", "peer_row", "write_status_file"]

REACHABILITY_NAMES: dict[int, str] = {
    net_pb2.REACHABILITY_UNKNOWN: "unknown",
    net_pb2.REACHABILITY_DIRECT: "direct",
    net_pb2.REACHABILITY_RELAYED: "relayed",
}


def peer_row(record: PeerRecord, now_wall_s: float, last_contact_s: float | None) -> dict[str, Any]:
    """One peer as a JSON-ready dict."""
    caps = record.capabilities
    seen = max(record.published_at_s, last_contact_s or 0.0)
    return {
        "peer_id": record.peer_id,
        "addresses": list(record.addresses),
        "reachability": REACHABILITY_NAMES.get(int(record.reachability), "unknown"),
        "relays": [{"peer_id": p, "address": a} for p, a in record.relays],
        "capabilities": {
            "num_cpus": caps.num_cpus,
            "memory_bytes": caps.memory_bytes,
            "num_gpus": caps.num_gpus,
            "gpu_names": list(caps.gpu_names),
            "measured_bandwidth_bytes_per_s": caps.measured_bandwidth_bytes_per_s,
        },
        "relay_service": record.relay_service,
        "last_seen_s_ago": round(max(0.0, now_wall_s - seen), 3),
        "record_expires_in_s": round(record.expires_at_s - now_wall_s, 3),
    }


def node_status(node: Node) -> dict[str, Any]:
    """The node's own view: who it is, how it is reached, the peers it knows, its counters.

    Call on the node's event loop.
    """
    now = node.clock.wall()
    contacts = node.directory.last_contact_wall_s
    return {
        "peer_id": node.peer_id,
        "addresses": list(node.addresses),
        "port": node.port,
        "reachability": REACHABILITY_NAMES.get(int(node.reachability), "unknown"),
        "relays": [{"peer_id": p, "address": a} for p, a in node.relays],
        # reachable peers this relayed node gave a direct way back (their traffic skips relays)
        "direct_ways_back": sorted(node.upgrades.active),
        "peers": [peer_row(r, now, contacts.get(r.peer_id)) for r in node.peers()],
        "counters": node.counters.snapshot(),
        "written_at_s": now,
    }


def write_status_file(path: Path, status: dict[str, Any]) -> None:
    """Write the status atomically (temporary file, rename), so readers never see half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(status, indent=1, sort_keys=True))
    os.replace(tmp, path)
