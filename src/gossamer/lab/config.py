"""What a lab is made of: the config a user gives, link rates, and the token-bucket sizing.

Rates are in bits per second and written as tc writes them (``100mbit``, ``1gbit``, ``500kbit``):
decimal prefixes, and always *bits*. tc's own ``mbps`` means megabytes per second, a classic trap,
so it is refused with a message rather than guessed at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gossamer.core.errors import ConfigError

__all__ = [
    "LAB_PREFIX",
    "MAX_PEERS",
    "LabConfig",
    "format_rate",
    "namespace_prefix",
    "parse_rate",
    "parse_rates",
    "tbf_burst_bytes",
    "tbf_limit_bytes",
]

LAB_PREFIX = "gsl-"
"""Every namespace the lab creates starts with this, so `lab down` finds exactly its own."""


def namespace_prefix(name: str) -> str:
    """The prefix of every namespace lab ``name`` creates, e.g. ``gsl-lab-``."""
    return f"{LAB_PREFIX}{name}-"


MAX_PEERS = 64
"""Most peers one lab holds (addresses are drawn from one /24 per role)."""

MIN_RATE_BPS = 100_000
MAX_RATE_BPS = 10_000_000_000

_RATE_UNITS = {"bit": 1, "kbit": 1_000, "mbit": 1_000_000, "gbit": 1_000_000_000}
_RATE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$")
# Used with fullmatch: "$" also matches before a trailing newline, which would let "ab\n" in.
_NAME_PATTERN = re.compile(r"[a-z0-9]{1,8}")
_CONGESTION_PATTERN = re.compile(r"[a-z0-9_]{1,16}")

# Token bucket sizing, measured on veth pairs (see docs/lab.md): a bucket of 5 ms of traffic lets
# TSO-sized bursts through without starving the link, and a queue of 50 ms absorbs TCP's
# window growth without drops that would keep it below the cap. Below ~21 Mbit/s the queue
# holds 128 KiB, but never more than 200 ms of traffic: 128 KiB alone was 1.05 s of queueing
# at 1 Mbit/s (a peer's connect behind its own upload took 1.04 s, and iperf got 83-85% of
# the cap); 100 ms there kept TCP at 78-83%, 200 ms at 96-100%. At the lowest rates it still
# holds 4 full frames (484 ms at 100 kbit/s, where 200 ms is less than 2).
_BURST_S = 0.005
_MIN_BURST_BYTES = 16 * 1024
_QUEUE_S = 0.050
_QUEUE_BYTES = 128 * 1024
_MAX_QUEUE_S = 0.200
_MIN_QUEUE_BYTES = 4 * 1514


def parse_rate(text: str, *, key: str = "rate") -> int:
    """Parse a link rate such as ``100mbit`` into bits per second.

    Args:
        text: a number followed by ``bit``, ``kbit``, ``mbit`` or ``gbit``.
        key: the config key or flag named in error messages.

    Raises:
        ConfigError: the text is not a rate in bits, or is outside what the lab can shape.
    """
    match = _RATE_PATTERN.match(text.lower())
    if match is None:
        raise ConfigError(f"{key}: {text!r} is not a rate; write it like 100mbit, 1gbit or 500kbit")
    number, unit = match.groups()
    if unit.endswith("bps"):
        raise ConfigError(
            f"{key}: {text!r} is ambiguous (tc reads 'bps' as bytes per second); "
            f"write bits, e.g. {number}{unit[:-3] or ''}bit"
        )
    if unit not in _RATE_UNITS:
        raise ConfigError(f"{key}: unknown unit {unit!r} in {text!r}; use bit, kbit, mbit or gbit")
    value = float(number) * _RATE_UNITS[unit]
    if not MIN_RATE_BPS <= value <= MAX_RATE_BPS:  # (before rounding: 1e400 is inf)
        raise ConfigError(
            f"{key}: {text!r} is outside what the lab shapes reliably "
            f"({format_rate(MIN_RATE_BPS)} to {format_rate(MAX_RATE_BPS)})"
        )
    return round(value)


def parse_rates(text: str, *, key: str = "rates") -> tuple[int, ...]:
    """Parse a comma-separated list of rates (``10mbit,100mbit``) into bits per second."""
    parts = text.split(",")
    if not any(part.strip() for part in parts):
        raise ConfigError(f"{key}: give at least one rate, e.g. 10mbit,100mbit")
    if any(not part.strip() for part in parts):  # '1mbit,,2mbit' meant three peers' rates
        raise ConfigError(f"{key}: {text!r} has an empty rate between commas; e.g. 10mbit,100mbit")
    return tuple(parse_rate(part, key=key) for part in parts)


def format_rate(bps: int) -> str:
    """Write ``bps`` the way a person reads it: ``100mbit``, ``1.5gbit``, ``800kbit``."""
    for unit, scale in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if bps >= scale:
            return f"{bps / scale:g}{unit}"
    return f"{bps}bit"


def tbf_burst_bytes(rate_bps: int) -> int:
    """Token bucket depth for a tbf at ``rate_bps``: 5 ms of traffic, at least 16 KiB."""
    return max(_MIN_BURST_BYTES, round(rate_bps / 8 * _BURST_S))


def tbf_limit_bytes(rate_bps: int) -> int:
    """Queue length for a tbf at ``rate_bps``: 50 ms of traffic, at least 128 KiB but at most
    200 ms of traffic, and at least 4 full frames.

    Full, it delays everything behind it by its length over the rate: 50 ms from 21 Mbit/s
    up, 50-100 ms from 10.5 Mbit/s, 100-200 ms from 5.2 Mbit/s, 200 ms down to 242 kbit/s,
    then up to 484 ms at 100 kbit/s.
    """
    bytes_per_s = rate_bps / 8
    bounded = min(_QUEUE_BYTES, round(bytes_per_s * _MAX_QUEUE_S))
    return max(round(bytes_per_s * _QUEUE_S), bounded, _MIN_QUEUE_BYTES)


@dataclass(frozen=True, kw_only=True, slots=True)
class LabConfig:
    """A lab topology: how many peers, how fast each one's link is, how many sit behind NAT."""

    num_peers: int
    """Peers to create, each in its own network namespace (1 to 64)."""
    rate_bps: int = 100_000_000
    """Link rate of every peer without its own entry in ``peer_rates_bps`` (bits per second)."""
    peer_rates_bps: tuple[int, ...] = ()
    """One rate per peer, in peer order; empty to give every peer ``rate_bps``."""
    num_nat: int = 0
    """How many peers sit behind a NAT router (the last ``num_nat`` peers)."""
    name: str = "lab"
    """This lab's name (1 to 8 of a-z, 0-9); its namespaces are called ``gsl-<name>-...``."""
    tcp_congestion_control: str = ""
    """TCP congestion control in every peer's namespace (``cubic``, ``bbr``, ...: one the kernel
    has, see ``/proc/sys/net/ipv4/tcp_available_congestion_control``); empty keeps what a new
    namespace gets from the host. It moves results: over 100 Mbit/s lab links a 100 MB all-reduce
    of 4 peers took 12.95 s with cubic and 13.20 s with bbr (gloo 12.81 s and 12.95 s), bbr's
    periodic probes (ProbeRTT) stalling single flows for 200 ms."""

    def __post_init__(self) -> None:
        if not 1 <= self.num_peers <= MAX_PEERS:
            raise ConfigError(
                f"lab.num_peers: must be between 1 and {MAX_PEERS}, got {self.num_peers}"
            )
        if not MIN_RATE_BPS <= self.rate_bps <= MAX_RATE_BPS:
            raise ConfigError(
                f"lab.rate_bps: {self.rate_bps} is outside {MIN_RATE_BPS}..{MAX_RATE_BPS} bit/s"
            )
        if self.peer_rates_bps and len(self.peer_rates_bps) != self.num_peers:
            raise ConfigError(
                f"lab.peer_rates_bps: {len(self.peer_rates_bps)} rates for {self.num_peers} "
                "peers; give exactly one rate per peer, or none to use lab.rate_bps for all"
            )
        for rate in self.peer_rates_bps:
            if not MIN_RATE_BPS <= rate <= MAX_RATE_BPS:
                raise ConfigError(
                    f"lab.peer_rates_bps: {rate} is outside {MIN_RATE_BPS}..{MAX_RATE_BPS} bit/s"
                )
        if not 0 <= self.num_nat <= self.num_peers:
            raise ConfigError(
                f"lab.num_nat: must be between 0 and num_peers ({self.num_peers}), "
                f"got {self.num_nat}"
            )
        if self.tcp_congestion_control and not _CONGESTION_PATTERN.fullmatch(
            self.tcp_congestion_control
        ):
            raise ConfigError(
                f"lab.tcp_congestion_control: {self.tcp_congestion_control!r} is not a congestion "
                "control's name (a-z, 0-9, _; e.g. cubic or bbr); leave it empty for the host's"
            )
        if not _NAME_PATTERN.fullmatch(self.name):
            raise ConfigError(
                f"lab.name: {self.name!r} must be 1 to 8 characters of a-z and 0-9 "
                "(it becomes part of every namespace name)"
            )

    @property
    def namespace_prefix(self) -> str:
        """The prefix of every namespace this lab creates, e.g. ``gsl-lab-``."""
        return namespace_prefix(self.name)

    def peer_rate_bps(self, index: int) -> int:
        """The link rate of peer ``index`` in bits per second."""
        return self.peer_rates_bps[index] if self.peer_rates_bps else self.rate_bps

    def is_behind_nat(self, index: int) -> bool:
        """Whether peer ``index`` sits behind a NAT router."""
        return index >= self.num_peers - self.num_nat
