"""The authentication handshake that opens every connection, as plain logic (no I/O).

Over a TLS channel pinned to the server's certificate the client sends ``Hello`` (its public key,
a nonce, the fingerprint of the certificate it pinned); the server answers with its public key, a
nonce, a signature over the *server transcript* and an HMAC of it under the swarm secret. The
client checks both, then sends ``Prove`` with its own signature and HMAC over the *client
transcript*. The server answers with a session token the client attaches to every later call.

Each transcript binds both keys, both nonces and the certificate fingerprint, so a signature can
neither be replayed on another connection nor relayed by a man in the middle with its own
certificate. Without the swarm secret a peer gets no session, and nothing it sends is processed.

The server answers any caller's Hello with an HMAC under the secret over a transcript the caller
knows whole, so a caller can test guesses of the secret offline as fast as it computes HMACs:
the secret must be random (:func:`swarm_secret_weakness` says when it looks like it is not).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
import string
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass

from gossamer.core.clock import Clock, Pacer
from gossamer.core.errors import AuthenticationError, ProtocolError
from gossamer.net.addresses import remote_host
from gossamer.net.identity import (
    PUBLIC_KEY_BYTES,
    Identity,
    peer_id_of_public_key,
    short_peer_id,
    verify_signature,
)
from gossamer.proto import net_pb2

__all__ = [
    "GOOD_SECRET_COMMAND",
    "HANDSHAKE_VERSION",
    "MAX_REFUSAL_WARNINGS",
    "PASS_THE_SECRET",
    "REFUSAL_WARNING_INTERVAL_S",
    "SESSION_METADATA_KEY",
    "ClientHandshake",
    "HandshakeAuthority",
    "RefusalLog",
    "Session",
    "SwarmSecretMismatchError",
    "swarm_proof",
    "swarm_secret_weakness",
    "transcript",
]

_log = logging.getLogger(__name__)

HANDSHAKE_VERSION = 1
SESSION_METADATA_KEY = "gossamer-session"
NONCE_BYTES = 32
_MAX_PENDING = 4096
_MAX_SESSIONS_PER_PEER = 8
"""Sessions one peer id keeps (a peer reconnecting makes a new one; its calls on the old
connection may still be in flight)."""
REFUSAL_WARNING_INTERVAL_S = 60.0
"""Refusals of callers with no session are logged at WARNING once per remote host per this
long, the rest at DEBUG: 3,000 refused calls from one caller wrote 513 KiB of log in 1.8 s."""
MAX_REFUSAL_WARNINGS = 10
"""Refusals logged at WARNING per :data:`REFUSAL_WARNING_INTERVAL_S`, all hosts together (the
rest at DEBUG): 1,000 refused calls from 1,000 source addresses wrote 1,000 WARNING lines."""
_MAX_HOSTS_PACED = 4096
_MIN_SECRET_BYTES = 32
_MIN_SECRET_BITS = 128
GOOD_SECRET_COMMAND = "openssl rand -hex 32 > swarm.secret"
"""How to make a swarm secret no one can guess."""
PASS_THE_SECRET = (
    "pass the swarm's secret file, the one its peers were started with (--swarm-secret-file; "
    "--swarm.swarm-secret-file to gossamer train)"
)
"""What to do when this peer's swarm secret is not the one of the swarm it dials."""


class SwarmSecretMismatchError(AuthenticationError):
    """This peer and the one it dialed do not share a swarm secret (one has none, or the two
    differ): final for that address, dialing it again is refused the same way.

    Args:
        message: what differs, and what to do.
        open_swarm: the peer dialed has no secret (this one has): it is in an open swarm.
    """

    def __init__(self, message: str, *, open_swarm: bool = False) -> None:
        super().__init__(message)
        self.open_swarm = open_swarm


class RefusalLog:
    """Says at which level to log a refusal of a caller with no session: WARNING for the first
    from a remote host in :data:`REFUSAL_WARNING_INTERVAL_S`, DEBUG for the rest (a caller with
    no secret can be refused as fast as it sends). At most :data:`MAX_REFUSAL_WARNINGS` WARNING
    lines in all in that time: a caller that takes a new source address for each call (an IPv6
    host has a /64 to pick from) is never the same host twice, and wrote one WARNING line per
    refusal. At most ``_MAX_HOSTS_PACED`` hosts are remembered: past them the memory starts
    over (their next refusal is a warning again, within the overall budget).

    Args:
        clock: time source.
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._pacer = Pacer(REFUSAL_WARNING_INTERVAL_S, clock)
        self._hosts: set[str] = set()
        self._warned_at: deque[float] = deque()

    def level(self, host: str) -> int:
        """The level of this refusal's log line (``logging.WARNING`` or ``logging.DEBUG``)."""
        if host not in self._hosts and len(self._hosts) >= _MAX_HOSTS_PACED:
            self._pacer = Pacer(REFUSAL_WARNING_INTERVAL_S, self._clock)
            self._hosts.clear()
        self._hosts.add(host)
        now = self._clock.monotonic()
        while self._warned_at and now - self._warned_at[0] >= REFUSAL_WARNING_INTERVAL_S:
            self._warned_at.popleft()
        # (over budget the host's pacing is left alone: its next refusal may warn once the
        # budget has room again)
        if len(self._warned_at) >= MAX_REFUSAL_WARNINGS or not self._pacer.due(host):
            return logging.DEBUG
        self._warned_at.append(now)
        return logging.WARNING


def swarm_secret_weakness(secret: bytes) -> str | None:
    """Why ``secret`` looks guessable, or None.

    Anyone who can reach a peer of the swarm gets an HMAC under the secret from one Hello and
    can test guesses offline (a team passphrase fell in 1,144 guesses). Text (printable ASCII,
    as people type and ``openssl rand -hex`` writes) is weak under 32 characters, or when its
    estimate is under 128 bits: its length times the bits per character its character classes
    allow, or times the Shannon entropy of its characters where that is much lower (words,
    repeats). A heuristic, meant to catch what people type: a long passphrase may pass it.
    ASCII whitespace is text too, and left out of the estimate: random hex broken into lines
    (``xxd -p``, ``od -An -tx1``) was read as bytes, most of which repeat.
    Other bytes (``head -c 32 /dev/urandom``) are weak only when most of them repeat.
    """
    text = secret.decode("ascii", "replace")
    if not all(
        char.isascii() and (char.isprintable() or char in string.whitespace) for char in text
    ):
        if len(set(secret)) < len(secret) // 2:
            return f"repeats most of its {len(secret)} bytes"
        return None
    text = "".join(char for char in text if char not in string.whitespace)
    besides = " besides whitespace" if len(text) < len(secret) else ""
    if len(text) < _MIN_SECRET_BYTES:
        return f"is text of {len(text)} characters{besides}, fewer than {_MIN_SECRET_BYTES}"
    if all(char in string.hexdigits for char in text):
        alphabet = 16
    else:
        classes = (string.ascii_lowercase, string.ascii_uppercase, string.digits)
        alphabet = sum(len(c) for c in classes if any(char in c for char in text))
        alphabet += len(string.punctuation) + 1 if not text.isalnum() else 0
    counts = Counter(text).values()
    shannon = sum(n / len(text) * math.log2(len(text) / n) for n in counts)
    # Text drawn at random from its alphabet shows nearly the alphabet's bits per character
    # (a short sample a little less: 32 random hex digits show about 3.8 of 4).
    per_char = math.log2(alphabet) if shannon >= 0.75 * math.log2(alphabet) else shannon
    bits = len(text) * per_char
    if bits < _MIN_SECRET_BITS:
        return f"is text of about {bits:.0f} bits of entropy, fewer than {_MIN_SECRET_BITS}"
    return None


def transcript(
    role: bytes,
    *,
    cert_sha256: bytes,
    client_public_key: bytes,
    server_public_key: bytes,
    client_nonce: bytes,
    server_nonce: bytes,
) -> bytes:
    """The bytes each side signs; every part has a fixed length, so the encoding is unambiguous."""
    assert role in (b"client", b"server")
    return b"".join(
        (
            b"gossamer-handshake-v1\x00",
            role,
            cert_sha256,
            client_public_key,
            server_public_key,
            client_nonce,
            server_nonce,
        )
    )


def swarm_proof(secret: bytes | None, message: bytes) -> bytes:
    """HMAC-SHA256 of ``message`` under the swarm secret; empty for an open swarm."""
    if secret is None:
        return b""
    return hmac.new(secret, message, hashlib.sha256).digest()


def _check_sizes(**fields: bytes) -> None:
    sizes = {"cert_sha256": 32, "public_key": PUBLIC_KEY_BYTES, "nonce": NONCE_BYTES}
    for name, value in fields.items():
        expected = next(size for suffix, size in sizes.items() if name.endswith(suffix))
        if len(value) != expected:
            raise ProtocolError(f"handshake field {name} has {len(value)} bytes, not {expected}")


@dataclass(frozen=True, slots=True)
class Session:
    """An authenticated caller of this node's server."""

    peer_id: str
    """The caller's proven peer id."""
    public_key: bytes
    """The caller's public key."""
    created_at_s: float
    """Monotonic time of the handshake."""


@dataclass(frozen=True, slots=True)
class _Pending:
    client_public_key: bytes
    client_nonce: bytes
    created_at_s: float


class HandshakeAuthority:
    """The server side: answers Hello, checks Prove, and keeps the sessions it granted.

    Args:
        identity: this node's identity.
        cert_sha256: fingerprint of this node's TLS certificate.
        swarm_secret: the swarm secret, or None for an open swarm.
        clock: time source for expiring challenges.
        max_sessions: sessions kept; the one unused longest goes first. A peer keeps at most
            ``_MAX_SESSIONS_PER_PEER`` (the one it used least recently goes first), so one
            identity repeating the handshake cannot push the others' out.
        challenge_ttl_s: how long a Hello's challenge stays valid.
    """

    def __init__(
        self,
        identity: Identity,
        cert_sha256: bytes,
        swarm_secret: bytes | None,
        clock: Clock,
        *,
        max_sessions: int = 10_000,
        challenge_ttl_s: float = 10.0,
    ) -> None:
        self._identity = identity
        self._cert_sha256 = cert_sha256
        self._secret = swarm_secret
        self._clock = clock
        self._max_sessions = max_sessions
        self._challenge_ttl_s = challenge_ttl_s
        self._pending: OrderedDict[bytes, _Pending] = OrderedDict()
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        """By token, the one used least recently first."""
        self._tokens_of: dict[str, deque[str]] = {}
        """Each peer's tokens, the one used least recently first."""
        self.num_refused = 0
        """Handshakes refused (bad signature, wrong secret, malformed)."""
        self.refusal_log = RefusalLog(clock)
        """The level of each refusal's log line, by remote host (the server's own refusals of
        callers with no session share it)."""

    def hello(self, request: net_pb2.HelloRequest) -> net_pb2.HelloResponse:
        """Answer a client's Hello with this node's proof and a fresh challenge.

        Raises:
            ProtocolError: a field has the wrong size or version.
        """
        if request.version != HANDSHAKE_VERSION:
            raise ProtocolError(f"handshake version {request.version}, expected 1")
        _check_sizes(
            client_public_key=request.client_public_key,
            client_nonce=request.client_nonce,
            server_cert_sha256=request.server_cert_sha256,
        )
        if not hmac.compare_digest(request.server_cert_sha256, self._cert_sha256):
            raise AuthenticationError("the client pinned a TLS certificate that is not ours")
        self._expire_pending()
        server_nonce = secrets.token_bytes(NONCE_BYTES)
        self._pending[server_nonce] = _Pending(
            request.client_public_key, request.client_nonce, self._clock.monotonic()
        )
        while len(self._pending) > _MAX_PENDING:
            self._pending.popitem(last=False)
        message = transcript(
            b"server",
            cert_sha256=self._cert_sha256,
            client_public_key=request.client_public_key,
            server_public_key=self._identity.public_key,
            client_nonce=request.client_nonce,
            server_nonce=server_nonce,
        )
        return net_pb2.HelloResponse(
            version=HANDSHAKE_VERSION,
            server_public_key=self._identity.public_key,
            server_nonce=server_nonce,
            server_signature=self._identity.sign(message),
            server_swarm_proof=swarm_proof(self._secret, message),
        )

    def prove(
        self, request: net_pb2.ProveRequest, remote: str
    ) -> tuple[str, Session, net_pb2.SignedPeerRecord | None]:
        """Check a client's proof and grant it a session.

        Args:
            request: the client's Prove message.
            remote: the caller's transport address, for the log line.

        Returns:
            The session token, the session, and the peer record the client sent, if any (for
            the caller to check and learn; the session does not keep it).

        Raises:
            AuthenticationError: the signature or the swarm proof is wrong, or the challenge is
                unknown or expired. Logged with the claimed peer id and the address.
        """
        self._expire_pending()
        pending = self._pending.pop(bytes(request.server_nonce), None)
        if pending is None:
            self._refuse(remote, "?", "unknown or expired challenge")
        assert pending is not None
        claimed = peer_id_of_public_key(pending.client_public_key)
        message = transcript(
            b"client",
            cert_sha256=self._cert_sha256,
            client_public_key=pending.client_public_key,
            server_public_key=self._identity.public_key,
            client_nonce=pending.client_nonce,
            server_nonce=bytes(request.server_nonce),
        )
        if self._secret is not None and not hmac.compare_digest(
            request.client_swarm_proof, swarm_proof(self._secret, message)
        ):
            self._refuse(remote, claimed, "it does not know the swarm secret")
        if not verify_signature(pending.client_public_key, request.client_signature, message):
            self._refuse(remote, claimed, "its signature does not match the key of its peer id")
        token = secrets.token_hex(32)
        record = request.client_record if request.HasField("client_record") else None
        session = Session(claimed, pending.client_public_key, self._clock.monotonic())
        self._sessions[token] = session
        tokens = self._tokens_of.setdefault(claimed, deque())
        tokens.append(token)
        if len(tokens) > _MAX_SESSIONS_PER_PEER:
            self._forget(tokens[0])
        while len(self._sessions) > self._max_sessions:
            self._forget(next(iter(self._sessions)))
        _log.debug("peer %s: authenticated %s from %s", self._short, short_peer_id(claimed), remote)
        return token, session, record

    def session(self, token: str) -> Session | None:
        """The session behind a token, or None (a session found counts as used now)."""
        session = self._sessions.get(token)
        if session is not None:
            self._sessions.move_to_end(token)
            tokens = self._tokens_of[session.peer_id]
            if tokens[-1] != token:  # (at most _MAX_SESSIONS_PER_PEER long)
                tokens.remove(token)
                tokens.append(token)
        return session

    def _forget(self, token: str) -> None:
        session = self._sessions.pop(token)
        tokens = self._tokens_of[session.peer_id]
        tokens.remove(token)  # (at most _MAX_SESSIONS_PER_PEER long)
        if not tokens:
            del self._tokens_of[session.peer_id]

    @property
    def num_sessions(self) -> int:
        """Sessions currently granted."""
        return len(self._sessions)

    @property
    def _short(self) -> str:
        return short_peer_id(self._identity.peer_id)

    def _refuse(self, remote: str, claimed: str, why: str) -> None:
        self.num_refused += 1
        _log.log(
            self.refusal_log.level(remote_host(remote)),
            "peer %s: refused connection from %s claiming peer id %s: %s",
            self._short,
            remote,
            claimed,
            why,
        )
        raise AuthenticationError(f"handshake refused: {why}")

    def _expire_pending(self) -> None:
        horizon = self._clock.monotonic() - self._challenge_ttl_s
        while self._pending:
            nonce, pending = next(iter(self._pending.items()))
            if pending.created_at_s >= horizon:
                break
            del self._pending[nonce]


class ClientHandshake:
    """The client side of one handshake.

    Args:
        identity: this node's identity.
        cert_sha256: fingerprint of the server certificate the channel is pinned to.
        swarm_secret: the swarm secret, or None.
        expected_peer_id: the peer id the caller wants to reach, if known.
    """

    def __init__(
        self,
        identity: Identity,
        cert_sha256: bytes,
        swarm_secret: bytes | None,
        expected_peer_id: str | None,
    ) -> None:
        self._identity = identity
        self._cert_sha256 = cert_sha256
        self._secret = swarm_secret
        self._expected = expected_peer_id
        self._nonce = secrets.token_bytes(NONCE_BYTES)
        self.server_is_private = False
        """Whether the server proved a swarm secret (known once :meth:`prove` read its answer):
        with none of its own, this client is then refused, and knows why."""

    def refusal(self, error: AuthenticationError, where: str) -> AuthenticationError:
        """What the server's refusal of this client's Prove means: a
        :class:`SwarmSecretMismatchError` where this client has no secret and the server proved
        one (it is sent all the same: the server logs who it refused), else ``error``."""
        if self._secret is None and self.server_is_private:
            return SwarmSecretMismatchError(
                f"the swarm at {where} is private and this peer has no swarm secret: "
                f"{PASS_THE_SECRET}"
            )
        return error

    def hello(self) -> net_pb2.HelloRequest:
        """The first message."""
        return net_pb2.HelloRequest(
            version=HANDSHAKE_VERSION,
            client_public_key=self._identity.public_key,
            client_nonce=self._nonce,
            server_cert_sha256=self._cert_sha256,
        )

    def prove(
        self, response: net_pb2.HelloResponse, record: net_pb2.SignedPeerRecord | None
    ) -> tuple[str, net_pb2.ProveRequest]:
        """Check the server's answer and build the client's proof.

        Returns:
            The server's proven peer id and the Prove message.

        Raises:
            AuthenticationError: the server is not the expected peer or its signature is wrong.
            SwarmSecretMismatchError: it does not prove this client's swarm secret.
            ProtocolError: the answer is malformed.
        """
        _check_sizes(
            server_public_key=response.server_public_key, server_nonce=response.server_nonce
        )
        server_peer_id = peer_id_of_public_key(response.server_public_key)
        if self._expected is not None and server_peer_id != self._expected:
            raise AuthenticationError(
                f"expected peer {short_peer_id(self._expected)} but the server is "
                f"{short_peer_id(server_peer_id)}"
            )
        parts = {
            "cert_sha256": self._cert_sha256,
            "client_public_key": self._identity.public_key,
            "server_public_key": bytes(response.server_public_key),
            "client_nonce": self._nonce,
            "server_nonce": bytes(response.server_nonce),
        }
        server_message = transcript(b"server", **parts)
        if not verify_signature(
            response.server_public_key, response.server_signature, server_message
        ):
            raise AuthenticationError(
                f"peer {short_peer_id(server_peer_id)} did not prove the key behind its id"
            )
        server = short_peer_id(server_peer_id)
        # (an open swarm's server proves nothing: its proof is empty)
        self.server_is_private = bool(response.server_swarm_proof)
        if self._secret is not None and not hmac.compare_digest(
            response.server_swarm_proof, swarm_proof(self._secret, server_message)
        ):
            if not self.server_is_private:
                raise SwarmSecretMismatchError(
                    f"peer {server} is in an open swarm (it has no swarm secret) and this peer "
                    "has one: leave the secret out to join it",
                    open_swarm=True,
                )
            raise SwarmSecretMismatchError(
                f"peer {server} has another swarm secret than this peer: {PASS_THE_SECRET}"
            )
        client_message = transcript(b"client", **parts)
        request = net_pb2.ProveRequest(
            server_nonce=response.server_nonce,
            client_signature=self._identity.sign(client_message),
            client_swarm_proof=swarm_proof(self._secret, client_message),
        )
        if record is not None:
            request.client_record.CopyFrom(record)
        return server_peer_id, request
