"""The one form of address peers may name to each other: HOST:PORT, checked before any dial;
and the small parsers every other module takes a host, a port or an IP address out of one with.

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

__all__ = [
    "host_of",
    "ip_of",
    "join_host_port",
    "observed_host",
    "port_of",
    "remote_host",
    "split_host_port",
]

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


def host_of(address: str) -> str:
    """The host of ``[PEER_ID@]HOST:PORT`` as a socket call takes it: an IPv6 literal without
    its brackets (a ``%zone`` kept), anything else as written. Unlike :func:`split_host_port`
    the host is not checked to be one others may dial, and the port may be 0 (a listen
    address): this is for addresses this peer wrote or has checked already.

    Raises:
        ValueError: ``address`` has no port after its last colon, no host, or an IPv6 host
            without brackets (``fd00::2`` alone read as host ``fd00:`` at port 2).
    """
    return _host_and_port(address)[0]


def port_of(address: str) -> int:
    """The port (0..65535) of ``[PEER_ID@]HOST:PORT``.

    Raises:
        ValueError: as :func:`host_of`.
    """
    return _host_and_port(address)[1]


def _host_and_port(address: str) -> tuple[str, int]:
    _, _, rest = address.rpartition("@")
    host, sep, port_text = rest.rpartition(":")
    port = port_number(port_text)
    if not sep or port is None:
        raise ValueError(f"not [PEER_ID@]HOST:PORT with a port in 0..65535: {address[:300]!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host or "[" in host or "]" in host:
        raise ValueError(f"an IPv6 host is written in brackets, [HOST]:PORT: {address[:300]!r}")
    if not host:
        raise ValueError(f"no host in {address[:300]!r}")
    return host, port


def join_host_port(host: str, port: int) -> str:
    """``HOST:PORT``, an IPv6 literal bracketed (``[::1]:7000``) unless it is already."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def ip_of(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` (an IPv6 one bracketed or not) as an IP address, or None where it is none (a
    hostname, empty). Comparable across machines: a ``%zone`` (which names an interface of
    one machine) is dropped, and an IPv4-mapped IPv6 address (``::ffff:192.0.2.4``, how a
    dual-stack socket shows an IPv4 peer) is its IPv4 address. Names are not looked up."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


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
