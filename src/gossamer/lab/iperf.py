"""Measure TCP throughput between two peers of a lab with iperf3 (Debian package ``iperf3``).

The receiver runs a one-shot ``iperf3 -s -1`` in its namespace; the sender dials the receiver's
public address, so a peer behind NAT cannot be a receiver (nothing can connect to it: that is what
NAT means). The first ``omit_s`` seconds (slow start, and the token bucket's initial burst) are
left out of the figure, as iperf3's ``-O`` does.
"""

from __future__ import annotations

import json
import logging
import subprocess
from dataclasses import dataclass
from typing import Any

from gossamer.core.clock import Clock, SystemClock
from gossamer.core.errors import (
    ConfigError,
    DeadlineExceededError,
    MissingDependencyError,
    PeerUnavailableError,
    ProtocolError,
)
from gossamer.lab.config import tbf_limit_bytes
from gossamer.lab.control import LabControl
from gossamer.lab.runner import RunningProcess

__all__ = ["IPERF_PORT", "ThroughputResult", "measure_tcp_throughput"]

logger = logging.getLogger(__name__)

IPERF_PORT = 5201
"""iperf3's port inside the receiver's namespace (the namespace is the lab's own: no clash)."""

_SERVER_READY_TIMEOUT_S = 5.0
_POLL_INTERVAL_S = 0.02
_CONNECT_TIMEOUT_MS = 3000


@dataclass(frozen=True, slots=True)
class ThroughputResult:
    """One TCP transfer between two peers."""

    sender: str
    """The sending peer."""
    receiver: str
    """The receiving peer."""
    bits_per_second: float
    """Payload bits the receiver got per second (after the omitted start)."""
    bytes_received: int
    """Payload bytes the receiver got (after the omitted start)."""
    duration_s: float
    """Seconds the figure covers."""
    retransmits: int | None
    """TCP retransmissions the sender counted, when iperf3 reports them."""
    bottleneck_bps: int
    """The lower of the two peers' link rates."""
    interval_bps: tuple[float, ...] = ()
    """Throughput the receiver saw in each second of the transfer, omitted start included."""

    @property
    def share_of_bottleneck(self) -> float:
        """Throughput as a fraction of the bottleneck link rate (1.0 = the whole link)."""
        return self.bits_per_second / self.bottleneck_bps

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict, including the share of the bottleneck."""
        return {
            "sender": self.sender,
            "receiver": self.receiver,
            "bits_per_second": self.bits_per_second,
            "bytes_received": self.bytes_received,
            "duration_s": self.duration_s,
            "retransmits": self.retransmits,
            "bottleneck_bps": self.bottleneck_bps,
            "share_of_bottleneck": self.share_of_bottleneck,
            "interval_bps": list(self.interval_bps),
        }


def _wait_for_listener(
    control: LabControl, peer: str, port: int, clock: Clock, server: RunningProcess
) -> None:
    """Wait until ``server`` listens on ``port`` in ``peer``; a listener that is not ``server``
    (a server left by a killed run) would be measured instead, so ``server`` must still run."""
    deadline = clock.monotonic() + _SERVER_READY_TIMEOUT_S
    while clock.monotonic() < deadline:
        listing = control.run_in(peer, ["ss", "-Hltn", f"sport = :{port}"], check=False)
        if server.poll() is not None:
            raise PeerUnavailableError(
                f"the iperf3 server in peer {peer} exited at once: is port {port} held by "
                "another process there (an iperf3 server left by a killed run)?"
            )
        if listing.stdout.strip():
            return
        clock.sleep(_POLL_INTERVAL_S)
    raise DeadlineExceededError(
        f"iperf3 server in peer {peer} was not listening on port {port} "
        f"after {_SERVER_READY_TIMEOUT_S} s"
    )


def _parse_report(stdout: str, sender: str, receiver: str) -> dict[str, Any]:
    try:
        report: dict[str, Any] = json.loads(stdout)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"iperf3 printed no JSON report: {stdout[:200]!r}") from exc
    if "error" in report:
        raise PeerUnavailableError(f"iperf3 from {sender} to {receiver} failed: {report['error']}")
    return report


def _receiver_intervals(report: dict[str, Any]) -> tuple[float, ...]:
    """Per-second throughput as the receiver saw it (the sender's view runs ahead by what its
    socket and the queue hold: 53.9 Mbit/s in the first second of a 50 Mbit/s link, where the
    receiver got 48.0); none when the server's JSON report is missing."""
    server = report.get("server_output_json")
    if not isinstance(server, dict):
        logger.warning("iperf3 returned no JSON report of the receiver; no per-second figures")
        return ()
    return tuple(float(item["sum"]["bits_per_second"]) for item in server.get("intervals", []))


def _drain_s(control: LabControl, sender: str, receiver: str) -> float:
    """How long a full queue of the path's slowest link takes to drain: at the lowest rates the
    lab allows (100 kbit/s: 0.5 s for its queue of 4 frames) the transfer ends that much later."""
    bottleneck = min(control.state.rate_bps(sender), control.state.rate_bps(receiver))
    return tbf_limit_bytes(bottleneck) * 8 / bottleneck


def measure_tcp_throughput(
    control: LabControl,
    sender: str,
    receiver: str,
    *,
    duration_s: float = 3.0,
    omit_s: float = 1.0,
    port: int = IPERF_PORT,
    clock: Clock | None = None,
) -> ThroughputResult:
    """Send TCP from ``sender`` to ``receiver`` for ``omit_s + duration_s`` seconds and measure it.

    Raises:
        ConfigError: unknown peers, a peer sending to itself, or a non-positive duration.
        MissingDependencyError: iperf3 is not installed.
        PeerUnavailableError: the receiver could not be reached (for instance, behind NAT).
        DeadlineExceededError: the server did not start or the transfer did not finish in time.
    """
    clock = clock or SystemClock()
    if sender == receiver:
        raise ConfigError(f"iperf needs two different peers, got {sender} twice")
    # iperf3 counts whole seconds: -t 0.5 became -t 0, which runs until killed.
    if not (duration_s >= 1 and float(duration_s).is_integer()):
        raise ConfigError(f"duration_s must be a whole number of seconds >= 1, got {duration_s}")
    if not (omit_s >= 0 and float(omit_s).is_integer()):
        raise ConfigError(f"omit_s must be a whole number of seconds >= 0, got {omit_s}")
    if not control.runner.which("iperf3"):
        raise MissingDependencyError("iperf3 is not installed; `apt-get install iperf3` (as root)")
    target = control.address_of(receiver)
    # -J: the client's --get-server-output then carries the server's report as JSON (without
    # it, as text only, and the per-second figures were the sender's). Its stdout is discarded.
    server = control.spawn_in(
        receiver,
        ["iperf3", "-s", "-1", "-J", "-p", str(port), "-B", control.peer(receiver).address],
        quiet=True,
    )
    try:
        _wait_for_listener(control, receiver, port, clock, server)
        client = control.run_in(
            sender,
            ["iperf3", "-c", target, "-p", str(port), "-t", f"{duration_s:g}", "-O", f"{omit_s:g}",
             "-J", "--get-server-output", "--connect-timeout", str(_CONNECT_TIMEOUT_MS)],
            check=False,
            timeout_s=duration_s + omit_s + _CONNECT_TIMEOUT_MS / 1000 + 10.0
            + 4 * _drain_s(control, sender, receiver),
        )  # fmt: skip
        report = _parse_report(client.stdout, sender, receiver)
    finally:
        if server.poll() is None:
            server.terminate()
        try:
            server.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=5.0)
    received = report["end"]["sum_received"]
    result = ThroughputResult(
        sender=sender,
        receiver=receiver,
        bits_per_second=float(received["bits_per_second"]),
        bytes_received=int(received["bytes"]),
        duration_s=float(received["seconds"]),
        retransmits=report["end"].get("sum_sent", {}).get("retransmits"),
        bottleneck_bps=min(control.state.rate_bps(sender), control.state.rate_bps(receiver)),
        interval_bps=_receiver_intervals(report),
    )
    logger.info(
        "iperf %s -> %s: %.2f Mbit/s (%.1f%% of the %.0f Mbit/s bottleneck)",
        sender, receiver, result.bits_per_second / 1e6,
        100 * result.share_of_bottleneck, result.bottleneck_bps / 1e6,
    )  # fmt: skip
    return result
