"""The one form of address peers may name to each other: HOST:PORT, checked before any dial.

Addresses come in other peers' signed records; signed only says who wrote them, not that they
make sense. A port past 65535, a Unicode digit, a NUL or an over-long hostname label made the
socket layer raise errors that are not Gossamer's (OverflowError, ValueError, UnicodeError) deep
inside a lookup. Every such address is refused where it enters: when its record is parsed.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse

from gossamer.core.config import port_number
from gossamer.core.errors import ProtocolError

__all__ = ["observed_host", "remote_host", "split_host_port"]

_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_MAX_HOSTNAME_CHARS = 253


def split_host_port(address: str) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT``: an IPv4 literal, a bracketed IPv6 literal or a DNS
    hostname (ASCII labels of 1..63 letters, digits, underscores and inner hyphens), and a port
    in 1..65535.

    Raises:
        ProtocolError: anything else, saying what is wrong.
    """
    host, sep, port = address.rpartition(":")
    number = port_number(port)
    if not sep or not number:
        raise ProtocolError(f"not HOST:PORT with a port in 1..65535: {address[:300]!r}")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError as exc:
            raise ProtocolError(f"not an IPv6 literal: {host[:300]!r}") from exc
        return host[1:-1], number
    if len(host) > _MAX_HOSTNAME_CHARS or not all(
        _LABEL.fullmatch(label) for label in host.split(".")
    ):
        raise ProtocolError(f"not an IPv4 literal or DNS hostname: {host[:300]!r}")
    return host, number


def observed_host(grpc_peer: str) -> str:
    """The host in gRPC's ``context.peer()`` form (``ipv4:1.2.3.4:5``; ``ipv6:%5B::1%5D:5``, its
    brackets percent-encoded as grpcio 1.85 writes them, or ``ipv6:[::1]:5``); empty for
    another form (``unix:...``). Before the encoded brackets were decoded an IPv6 caller's
    host read ``%5B::1%5D``: dial-back tried that and every IPv6 peer was taken for
    unreachable."""
    _, _, rest = grpc_peer.partition(":")
    host = urllib.parse.unquote(rest.rpartition(":")[0])
    return host.strip("[]")


def remote_host(grpc_peer: str) -> str:
    """:func:`observed_host`, or the whole string where it has no host (``unix:...``): what
    a caller is known by when counting or pacing by host."""
    return observed_host(grpc_peer) or grpc_peer
