"""The handshake as plain logic: proofs of identity and of the swarm secret, no sockets."""

from __future__ import annotations

import hashlib
import logging

import pytest

from gossamer.core.clock import FakeClock
from gossamer.core.errors import AuthenticationError, ProtocolError
from gossamer.net.handshake import ClientHandshake, HandshakeAuthority, swarm_proof, transcript
from gossamer.net.identity import Identity
from gossamer.proto import net_pb2

CERT = hashlib.sha256(b"the server's certificate").digest()
SECRET = b"s" * 32


def _authority(secret: bytes | None = SECRET) -> tuple[Identity, HandshakeAuthority, FakeClock]:
    server = Identity.generate()
    clock = FakeClock()
    return server, HandshakeAuthority(server, CERT, secret, clock, max_sessions=3), clock


def test_both_sides_prove_their_ids_and_the_client_gets_a_session() -> None:
    server, authority, _ = _authority()
    client = Identity.generate()
    handshake = ClientHandshake(client, CERT, SECRET, expected_peer_id=server.peer_id)
    server_id, proof = handshake.prove(authority.hello(handshake.hello()), None)
    token, session, _ = authority.prove(proof, "ipv4:127.0.0.1:1")
    assert server_id == server.peer_id
    assert session.peer_id == client.peer_id
    assert authority.session(token) == session


def test_a_client_without_the_swarm_secret_is_refused_with_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, authority, _ = _authority()
    handshake = ClientHandshake(Identity.generate(), CERT, None, expected_peer_id=None)
    _, proof = handshake.prove(authority.hello(handshake.hello()), None)
    with caplog.at_level(logging.WARNING), pytest.raises(AuthenticationError, match="secret"):
        authority.prove(proof, "ipv4:10.0.0.9:4242")
    assert "refused connection from ipv4:10.0.0.9:4242" in caplog.text
    assert authority.num_refused == 1
    assert authority.num_sessions == 0


def test_a_client_with_another_secret_refuses_the_server() -> None:
    _, authority, _ = _authority()
    handshake = ClientHandshake(Identity.generate(), CERT, b"o" * 32, expected_peer_id=None)
    with pytest.raises(AuthenticationError, match="swarm's secret"):
        handshake.prove(authority.hello(handshake.hello()), None)


def test_a_server_that_is_not_the_expected_peer_is_refused() -> None:
    _, authority, _ = _authority()
    someone_else = Identity.generate().peer_id
    handshake = ClientHandshake(Identity.generate(), CERT, SECRET, expected_peer_id=someone_else)
    with pytest.raises(AuthenticationError, match="expected peer"):
        handshake.prove(authority.hello(handshake.hello()), None)


def test_a_client_claiming_another_peers_key_cannot_sign_for_it() -> None:
    server, authority, _ = _authority()
    victim, impostor = Identity.generate(), Identity.generate()
    honest = ClientHandshake(victim, CERT, SECRET, expected_peer_id=None)
    hello = honest.hello()  # the impostor sends the victim's public key ...
    response = authority.hello(hello)
    message = transcript(
        b"client",
        cert_sha256=CERT,
        client_public_key=victim.public_key,
        server_public_key=server.public_key,
        client_nonce=hello.client_nonce,
        server_nonce=response.server_nonce,
    )
    proof = net_pb2.ProveRequest(  # ... but can only sign with its own key
        server_nonce=response.server_nonce,
        client_signature=impostor.sign(message),
        client_swarm_proof=swarm_proof(SECRET, message),
    )
    with pytest.raises(AuthenticationError, match="signature"):
        authority.prove(proof, "ipv4:127.0.0.1:2")
    assert authority.num_sessions == 0


def test_a_challenge_cannot_be_replayed_or_used_after_it_expires() -> None:
    _, authority, clock = _authority()
    handshake = ClientHandshake(Identity.generate(), CERT, SECRET, expected_peer_id=None)
    _, proof = handshake.prove(authority.hello(handshake.hello()), None)
    authority.prove(proof, "a")
    with pytest.raises(AuthenticationError, match="challenge"):
        authority.prove(proof, "a")
    late = ClientHandshake(Identity.generate(), CERT, SECRET, expected_peer_id=None)
    _, late_proof = late.prove(authority.hello(late.hello()), None)
    clock.advance(11.0)
    with pytest.raises(AuthenticationError, match="challenge"):
        authority.prove(late_proof, "a")


def test_a_client_pinning_another_certificate_is_refused() -> None:
    _, authority, _ = _authority()
    other_cert = hashlib.sha256(b"a man in the middle").digest()
    handshake = ClientHandshake(Identity.generate(), other_cert, SECRET, expected_peer_id=None)
    with pytest.raises(AuthenticationError, match="certificate"):
        authority.hello(handshake.hello())


def test_malformed_hello_is_a_protocol_error() -> None:
    _, authority, _ = _authority()
    with pytest.raises(ProtocolError):
        authority.hello(net_pb2.HelloRequest(version=1, client_public_key=b"short"))
    with pytest.raises(ProtocolError, match="version"):
        authority.hello(net_pb2.HelloRequest(version=7))


def _session_of(authority: HandshakeAuthority, client: Identity | None = None) -> str:
    handshake = ClientHandshake(client or Identity.generate(), CERT, SECRET, expected_peer_id=None)
    _, proof = handshake.prove(authority.hello(handshake.hello()), None)
    return authority.prove(proof, "a")[0]


def test_sessions_are_bounded_the_one_unused_longest_first() -> None:
    _, authority, _ = _authority()
    tokens = [_session_of(authority) for _ in range(3)]
    assert authority.session(tokens[0]) is not None  # a call on it: it was used last
    tokens += [_session_of(authority) for _ in range(2)]
    assert authority.num_sessions == 3
    assert authority.session(tokens[1]) is None
    assert authority.session(tokens[2]) is None
    assert authority.session(tokens[0]) is not None  # the oldest, but in use
    assert authority.session(tokens[-1]) is not None


def test_one_identity_repeating_the_handshake_pushes_out_only_its_own_sessions() -> None:
    """One identity made 1,140 handshakes a second: the oldest sessions went first, everyone
    else's within seconds, and their calls failed (each session also kept the 7 MiB record its
    Prove carried)."""
    server = Identity.generate()
    authority = HandshakeAuthority(server, CERT, SECRET, FakeClock(), max_sessions=100)
    others = [_session_of(authority) for _ in range(10)]
    churner = Identity.generate()
    in_use = _session_of(authority, churner)  # the connection it calls on
    churned = []
    for _ in range(200):
        churned.append(_session_of(authority, churner))
        assert authority.session(in_use) is not None  # a call on it
    assert all(authority.session(token) is not None for token in others)
    assert sum(authority.session(token) is not None for token in churned) == 7
    assert authority.session(churned[-1]) is not None


def test_open_swarm_needs_no_secret() -> None:
    _, authority, _ = _authority(secret=None)
    handshake = ClientHandshake(Identity.generate(), CERT, None, expected_peer_id=None)
    _, proof = handshake.prove(authority.hello(handshake.hello()), None)
    assert authority.prove(proof, "a")[1].peer_id
