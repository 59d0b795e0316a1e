"""Which address a peer advertises: this machine's address on its routes and interfaces.

A node listening on a wildcard host (``0.0.0.0``, ``::``) must name in its peer record an address
other machines can dial; these functions pick it from the route to the bootstrap peers, the
default route, or the machine's one interface address.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import sys
from collections.abc import Callable

from gossamer.net.addresses import host_of, ip_of, port_of
from gossamer.net.identity import short_peer_id

__all__ = ["local_interface_addresses", "routable_host"]

_log = logging.getLogger(__name__)

_DEFAULT_ROUTE_PROBES = (("192.0.2.1", 9), ("2001:db8::1", 9))
"""Addresses of no machine (RFC 5737's TEST-NET-1, RFC 3849's documentation prefix): the
kernel's route to one is the default route, whose source address is this machine's address on
its main interface."""
_SIOCGIFFLAGS = 0x8913
_SIOCGIFADDR = 0x8915
_IFF_UP = 0x1
_IFREQ_BYTES = 40
"""Linux's ``struct ifreq``: the interface name (16 bytes), then the union asked for."""


def _route_source(host: str, port: str) -> str | None:
    """This machine's address on its route to ``host`` (None without a route); no packet is
    sent."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with (
        contextlib.suppress(OSError, ValueError),
        socket.socket(family, socket.SOCK_DGRAM) as probe,
    ):
        probe.connect((host, int(port)))
        return str(probe.getsockname()[0])
    return None


def local_interface_addresses() -> list[str]:
    """The IPv4 address of each interface of this machine that is up (Linux; elsewhere none are
    listed, and a wildcard listener with no route out advertises loopback as before)."""
    if not sys.platform.startswith("linux"):
        return []
    import fcntl  # (POSIX only)

    found: list[str] = []
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            request = struct.pack(f"{_IFREQ_BYTES}s", name.encode()[:15])
            try:
                flags = struct.unpack_from("H", fcntl.ioctl(s, _SIOCGIFFLAGS, request), 16)[0]
                if flags & _IFF_UP:
                    found.append(socket.inet_ntoa(fcntl.ioctl(s, _SIOCGIFADDR, request)[20:24]))
            except OSError:  # (an interface with no IPv4 address, or gone meanwhile)
                continue
    return found


def routable_host(
    listen_host: str,
    towards: tuple[str, ...],
    *,
    warn_as: str | None = None,
    route_source: Callable[[str, str], str | None] = _route_source,
    interface_addresses: Callable[[], list[str]] = local_interface_addresses,
) -> str:
    """The address others should dial when listening on a wildcard host.

    In order: the one this machine reaches its bootstrap peers from; its address on the default
    route (IPv4 first; a first peer advertised 127.0.0.1, which no other machine could dial);
    with no default route (a lab's namespace), its one interface address that is not loopback
    or link-local; 127.0.0.1 where it has none (a machine alone: a swarm on it) or several
    (an offline machine with docker0 and virbr0 up: which one others reach is unknown, and a
    local swarm still works on loopback; refusing to start broke it). IPv6 addresses come
    bracketed, as HOST:PORT wants them.

    Args:
        listen_host: the host part of the listen address (an IPv6 one bracketed or not);
            returned as given unless a wildcard.
        towards: the bootstrap entries (HOST:PORT or PEER_ID@HOST:PORT).
        warn_as: the peer id to log a warning for where several addresses leave 127.0.0.1 a
            guess; None logs nothing (a node that does not announce itself: nobody dials it).
        route_source: this machine's address on its route to (host, port), None without one.
        interface_addresses: the addresses of this machine's interfaces that are up.
    """
    if listen_host.strip("[]") not in ("0.0.0.0", "::", ""):
        return listen_host
    probes = [(host_of(entry), str(port_of(entry))) for entry in towards]
    for host, port in [*probes, *((h, str(p)) for h, p in _DEFAULT_ROUTE_PROBES)]:
        source = route_source(host, port)
        found = None if source is None else ip_of(source)  # (its %zone dropped)
        if found is not None and not found.is_unspecified:
            return f"[{found}]" if found.version == 6 else str(found)
    candidates: list[str] = []
    for address in interface_addresses():
        found = ip_of(address)
        if found is not None and not (
            found.is_loopback or found.is_link_local or found.is_unspecified
        ):
            candidates.append(str(found))
    candidates = list(dict.fromkeys(candidates))
    if len(candidates) == 1:
        return candidates[0]
    if candidates and warn_as is not None:
        _log.warning(
            "peer %s: listening on every interface (%s) with no default route, and this machine "
            "has several addresses (%s): which one other machines reach is unknown, so it "
            "advertises 127.0.0.1 (peers on this machine only). For others, pass --advertise "
            "HOST:PORT to `gossamer peer start`, or listen on that address (--swarm.listen "
            "HOST:PORT for train)",
            short_peer_id(warn_as),
            listen_host or "0.0.0.0",
            ", ".join(candidates),
        )
    return "127.0.0.1"
