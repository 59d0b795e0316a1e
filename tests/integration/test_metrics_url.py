"""The metrics endpoint's printed URL is one a scraper can use, IPv6 included."""

from __future__ import annotations

import socket
import urllib.request

import pytest

from gossamer.obs.metrics import PeerMetrics, serve_metrics


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_an_ipv6_metrics_url_has_its_host_in_brackets_and_answers() -> None:
    # It printed http://::1:PORT/metrics, which no URL parser takes for a host and a port.
    server = serve_metrics(PeerMetrics().registry, host="::1", port=0)
    try:
        assert server.url == f"http://[::1]:{server.port}/metrics"
        with urllib.request.urlopen(server.url, timeout=10) as response:
            assert b"gossamer_" in response.read()
    finally:
        server.close()
