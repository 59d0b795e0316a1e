"""A peer behind NAT opens outbound connections; nothing can connect to it from outside."""

from __future__ import annotations

from netlab_support import MakeLab, probe, start_probe_server


def test_outbound_from_behind_nat_works_and_is_masqueraded(make_lab: MakeLab) -> None:
    with make_lab(num_peers=2, num_nat=1, rate_bps=50_000_000) as lab:
        server = start_probe_server(lab, "p0")
        answer = probe(lab, "p1", lab.address_of("p0"))
        natted = lab.peer("p1")
    server.wait(timeout=10)
    # p0 saw the router's public address, never p1's private one
    assert answer == f"seen {natted.public_address}"
    assert natted.address != natted.public_address


def test_nothing_connects_to_a_peer_behind_nat(make_lab: MakeLab) -> None:
    with make_lab(num_peers=3, num_nat=1, rate_bps=50_000_000) as lab:
        natted = lab.peer("p2")
        server = start_probe_server(lab, "p2")
        # from inside its own LAN the server answers: it is up and listening
        assert probe(lab, "p2", "127.0.0.1") == "seen 127.0.0.1"
        # from outside: its public address leads to the router, which drops the attempt
        assert probe(lab, "p0", natted.public_address) is None
        # even a peer that routes the private LAN through the router is dropped at it
        lan = natted.address.rsplit(".", 1)[0] + ".0/24"
        lab.run_in("p1", ["ip", "route", "add", lan, "via", natted.public_address])
        assert probe(lab, "p1", natted.address) is None
        # and the established-only rule still lets p2's own outbound connections back in
        outside = start_probe_server(lab, "p0")
        assert probe(lab, "p2", lab.address_of("p0")) == f"seen {natted.public_address}"
    server.wait(timeout=10)
    outside.wait(timeout=10)
