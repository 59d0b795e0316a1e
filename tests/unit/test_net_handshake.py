"""The handshake as plain logic: proofs of identity and of the swarm secret, no sockets."""

from __future__ import annotations

import base64
import hashlib
import logging

import pytest

from gossamer.core.clock import FakeClock
from gossamer.core.errors import AuthenticationError, ProtocolError
from gossamer.net.addresses import remote_host
from gossamer.net.handshake import (
    MAX_REFUSAL_WARNINGS,
    REFUSAL_WARNING_INTERVAL_S,
    ClientHandshake,
    HandshakeAuthority,
    RefusalLog,
    SwarmSecretMismatchError,
    swarm_proof,
    swarm_secret_weakness,
    transcript,
)
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
    # (it said the server "does not know this swarm's secret": the two simply differ)
    with pytest.raises(SwarmSecretMismatchError, match="another swarm secret") as refused:
        handshake.prove(authority.hello(handshake.hello()), None)
    assert not refused.value.open_swarm
    assert "--swarm-secret-file" in str(refused.value)


def test_a_client_with_a_secret_refuses_a_server_of_an_open_swarm_saying_so() -> None:
    _, authority, _ = _authority(secret=None)
    handshake = ClientHandshake(Identity.generate(), CERT, SECRET, expected_peer_id=None)
    with pytest.raises(SwarmSecretMismatchError, match="open swarm") as refused:
        handshake.prove(authority.hello(handshake.hello()), None)
    assert refused.value.open_swarm


def test_a_client_without_the_secret_knows_why_the_private_server_refused_it() -> None:
    _, authority, _ = _authority()
    handshake = ClientHandshake(Identity.generate(), CERT, None, expected_peer_id=None)
    _, proof = handshake.prove(authority.hello(handshake.hello()), None)
    assert handshake.server_is_private
    with pytest.raises(AuthenticationError) as refused:
        authority.prove(proof, "ipv4:10.0.0.9:4242")
    meant = handshake.refusal(refused.value, "10.0.0.1:7000")
    assert isinstance(meant, SwarmSecretMismatchError)
    assert "10.0.0.1:7000 is private and this peer has no swarm secret" in str(meant)
    # Refused by a server of an open swarm, it was for something else: said as it was.
    other = AuthenticationError("handshake refused: something else")
    open_server = ClientHandshake(Identity.generate(), CERT, None, expected_peer_id=None)
    open_server.prove(_authority(secret=None)[1].hello(open_server.hello()), None)
    assert open_server.refusal(other, "10.0.0.1:7000") is other


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


def test_refused_proves_warn_once_a_minute_per_host_and_are_all_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each refused Prove wrote a WARNING line: a caller with no secret wrote the log as fast as
    it sent."""
    _, authority, clock = _authority()

    def refused(remote: str) -> None:
        handshake = ClientHandshake(Identity.generate(), CERT, None, expected_peer_id=None)
        _, proof = handshake.prove(authority.hello(handshake.hello()), None)
        with pytest.raises(AuthenticationError):
            authority.prove(proof, remote)

    with caplog.at_level(logging.DEBUG, logger="gossamer.net.handshake"):
        for port in range(5):
            refused(f"ipv4:10.0.0.9:{port}")
        refused("ipv6:[fd00::1]:1")
        clock.advance(REFUSAL_WARNING_INTERVAL_S)
        refused("ipv4:10.0.0.9:9")
    levels = [r.levelno for r in caplog.records if "refused" in r.getMessage()]
    warning, debug = logging.WARNING, logging.DEBUG
    assert levels == [warning, debug, debug, debug, debug, warning, warning]
    assert authority.num_refused == 7


def test_the_refusal_log_remembers_a_bounded_number_of_hosts() -> None:
    clock = FakeClock()
    refusals = RefusalLog(clock)
    assert refusals.level("10.0.0.1") == logging.WARNING
    assert refusals.level("10.0.0.1") == logging.DEBUG
    for index in range(5000):  # hosts cost an attacker little (IPv6)
        refusals.level(f"fd00::{index:x}")
    assert len(refusals._hosts) <= 4096
    assert refusals.level("fd00::1387") == logging.DEBUG  # (seen lately)


def test_refusals_from_ever_new_hosts_warn_a_bounded_number_of_times() -> None:
    # A caller that takes a new source address for each call is a new host every time: the
    # per-host pacing alone gave one WARNING line per refusal.
    clock = FakeClock()
    refusals = RefusalLog(clock)
    levels = [refusals.level(f"fd00::{index:x}") for index in range(1000)]
    assert levels.count(logging.WARNING) == MAX_REFUSAL_WARNINGS <= 10
    assert levels[:MAX_REFUSAL_WARNINGS] == [logging.WARNING] * MAX_REFUSAL_WARNINGS
    clock.advance(REFUSAL_WARNING_INTERVAL_S / 2)
    assert refusals.level("10.0.0.1") == logging.DEBUG  # (the budget is spent)
    clock.advance(REFUSAL_WARNING_INTERVAL_S / 2)
    assert refusals.level("10.0.0.1") == logging.WARNING  # (a new minute, a new budget)
    assert refusals.level("10.0.0.1") == logging.DEBUG  # (and the per-host rule still holds)
    assert refusals.level("10.0.0.2") == logging.WARNING


def test_the_remote_host_is_the_address_without_its_port() -> None:
    assert remote_host("ipv4:10.1.2.3:4567") == "10.1.2.3"
    assert remote_host("ipv6:[fd00::1]:4567") == "fd00::1"
    assert remote_host("ipv6:%5Bfd00::1%5D:4567") == "fd00::1"  # (grpcio 1.85's own form)
    assert remote_host("unix:/tmp/socket") == "unix:/tmp/socket"


@pytest.mark.parametrize(
    "secret",
    [
        b"our-team-swarm-2026",  # recovered offline in 1,144 guesses
        b"the-swarm-secret-0123456789",
        b"correct-horse-battery-staple-xyz",
        b"a" * 64,
        bytes(32),
        b"our team swarm\n2026 secret",  # (whitespace counts as text, not as random bytes)
        b"a \n" * 32,
    ],
)
def test_a_guessable_swarm_secret_is_called_weak(secret: bytes) -> None:
    assert swarm_secret_weakness(secret) is not None


_RANDOM = hashlib.sha256(b"drawn once").digest()
"""32 random-looking bytes (fixed: a random draw is called weak once in ~10,000 at 16 bytes of
hex, where the sample's entropy falls short of what its alphabet allows)."""


@pytest.mark.parametrize(
    "secret",
    [
        _RANDOM.hex().encode(),  # openssl rand -hex 32
        _RANDOM[:16].hex().encode(),
        base64.b64encode(_RANDOM),  # openssl rand -base64 32
        _RANDOM,  # head -c 32 /dev/urandom
        # Random hex in lines, as read from the file (surrounding whitespace stripped): read
        # as bytes, not text, these were said to repeat most of their bytes.
        b"%s\n%s" % (_RANDOM[:30].hex().encode(), _RANDOM[30:].hex().encode()),  # xxd -p
        b"\n ".join(  # od -An -tx1
            b" ".join(b"%02x" % byte for byte in _RANDOM[row : row + 16]) for row in (0, 16)
        ),
        base64.encodebytes(_RANDOM * 2).strip(),  # head -c 64 /dev/urandom | base64
    ],
)
def test_a_random_swarm_secret_is_not_called_weak(secret: bytes) -> None:
    assert swarm_secret_weakness(secret) is None
