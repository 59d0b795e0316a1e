"""Configs of the peer-to-peer layer, one small frozen dataclass per component."""

from __future__ import annotations

from dataclasses import dataclass, field

from gossamer.core.config import is_host_port
from gossamer.core.errors import ConfigError, ProtocolError
from gossamer.net.addresses import split_host_port
from gossamer.net.identity import digest_of_peer_id
from gossamer.net.records import MAX_PEER_RECORD_VALUE_BYTES, RECORD_OVERHEAD_BYTES

__all__ = [
    "BreakerConfig",
    "DhtConfig",
    "HeartbeatConfig",
    "LimitsConfig",
    "NodeConfig",
    "RelayConfig",
    "RetryConfig",
]

_MiB = 1 << 20
_LARGEST_HONEST_PROVE_BYTES = MAX_PEER_RECORD_VALUE_BYTES + RECORD_OVERHEAD_BYTES + 512
"""A Prove carrying the largest peer record (its value, the record's fields, the signature,
the nonce and the proof)."""
_DEFAULT_SENDER_SHARE_BYTES = 1 << 30


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _check_address(key: str, address: str) -> None:
    _require(
        is_host_port(address, lowest_port=0),
        key,
        "expected HOST:PORT, an IPv6 host in brackets ([::]:7000; port 0 picks a free one), "
        f"got {address!r}",
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryConfig:
    """Retries of retryable errors: exponential backoff with full jitter under a total deadline."""

    max_attempts: int = 4
    """Attempts in all, the first included."""
    initial_backoff_s: float = 0.1
    """Upper bound of the first wait."""
    max_backoff_s: float = 2.0
    """Upper bound of any single wait."""
    total_deadline_s: float = 10.0
    """No attempt starts after this much time since the first one."""

    def __post_init__(self) -> None:
        _require(self.max_attempts >= 1, "retry.max_attempts", "must be at least 1")
        _require(self.initial_backoff_s > 0, "retry.initial_backoff_s", "must be positive")
        _require(
            self.max_backoff_s >= self.initial_backoff_s,
            "retry.max_backoff_s",
            f"must be at least retry.initial_backoff_s ({self.initial_backoff_s})",
        )
        _require(self.total_deadline_s > 0, "retry.total_deadline_s", "must be positive")


@dataclass(frozen=True, kw_only=True, slots=True)
class BreakerConfig:
    """The per-peer circuit breaker: stop dialing a peer that keeps failing, for a while."""

    failure_threshold: int = 5
    """Consecutive failures that open the breaker."""
    open_s: float = 5.0
    """How long an open breaker refuses calls before letting one trial call through."""

    def __post_init__(self) -> None:
        _require(self.failure_threshold >= 1, "breaker.failure_threshold", "must be at least 1")
        _require(self.open_s > 0, "breaker.open_s", "must be positive")


@dataclass(frozen=True, kw_only=True, slots=True)
class LimitsConfig:
    """Sizes and counts accepted from the network, checked before anything is allocated."""

    max_message_bytes: int = 8 * _MiB
    """Largest single gRPC message sent or received."""
    bulk_chunk_bytes: int = 4 * _MiB
    """Largest payload of a bulk-stream chunk (a transfer of up to one chunk is one unary call).
    A stream's chunks start at 256 KiB and double while each goes out within a second, so a
    chunk takes seconds on a thin link (see ``bulk._ChunkSizes``)."""
    max_bulk_transfer_bytes: int = 1 << 30
    """Largest bulk transfer accepted (8 GiB until 2026-12-06; comm's messages are at most
    128 MiB, state sync's replies 64 MiB)."""
    max_bulk_inflight_bytes: int = 4 << 30
    """Bytes of all incoming bulk transfers together, counted at the size each announces from
    its first chunk until it failed or its handler returned (16 GiB, more than many machines'
    memory, until 2026-12-06)."""
    max_bulk_sender_bytes: int | None = None
    """One sender's share of ``max_bulk_inflight_bytes`` (None: 1 GiB, within the in-flight
    budget and at least ``max_bulk_transfer_bytes``; see :attr:`bulk_sender_bytes`): without
    it one peer announcing large transfers and trickling their bytes held the whole budget,
    and every other peer's message was refused. A peer's comm round needs about 16 messages
    of up to 8 MiB."""
    max_record_value_bytes: int = 16 * 1024
    """Largest DHT record value."""
    max_records_per_key: int = 1024
    """Records (one per publisher) kept under one DHT key: every peer of a swarm run puts one
    under each of its round's keys, so this bounds a run's size (64 until 2026-12-05)."""
    max_key_bytes: int = 1 << 20
    """Value bytes of the records kept under one DHT key (a lookup's answer carries them)."""
    max_stored_records: int = 100_000
    """Records a node stores for others in all."""
    max_records_per_publisher: int = 10_000
    """Records a node stores of one publisher, and records it stores that one peer sent (a
    tenth of the store by default): publisher keys cost nothing, the sending session is
    authenticated."""
    max_stored_bytes: int = 256 * _MiB
    """Bytes (values plus ``RECORD_OVERHEAD_BYTES`` each) of the records a node stores for
    others: 100,000 records of 16 KiB were 1.7 GB. When full, the peer whose stored records
    take the most gives way (its oldest go first, for a new record of its own or anyone
    else's), so no peer grows past the others and an honest peer always finds room."""
    max_stored_ttl_s: float = 3600.0
    """How long a node keeps a record it stores for others, whatever lifetime the record
    claims (up to a week): records meant to live are republished every
    ``dht.republish_interval_s`` (20 s), and records of a moment live 300-600 s."""
    max_sessions: int = 10_000
    """Authenticated sessions a server keeps; the one unused longest is dropped past this."""
    bulk_idle_timeout_s: float = 30.0
    """An incomplete bulk transfer with no stream moving for this long is dropped."""
    max_concurrent_streams: int = 256
    """Calls one connection carries at once (more wait on the caller's side; at the limit
    gRPC may refuse one, as ``PeerUnavailableError``, where the caller saw a slot free before
    the server did). A peer needs about 64 relay tunnels, 16 comm messages, 8 state chunks
    and a few DHT calls and heartbeats on one connection; each call may hold a message of up
    to ``max_message_bytes``."""
    handshake_read_timeout_s: float = 2.0
    """Deadline for a Hello or Prove request (a few hundred bytes to 9 KiB) to arrive once its
    call has begun: a caller with no session that stalled one byte short of a message kept it
    buffered (up to ``max_message_bytes``) for good."""
    max_handshake_reads: int = 32
    """Hello and Prove requests being read at once, from anyone; one more takes the place of
    the oldest, which is refused (UNAVAILABLE: try again). gRPC buffers what a request announces,
    up to ``max_message_bytes``, while it is read: this bounds what callers with no session
    can make the server hold to ``max_handshake_reads * max_message_bytes`` (256 MiB), each
    for at most
    ``handshake_read_timeout_s``. An honest read takes milliseconds: 50 peers joining through
    one on loopback had at most 2 at once."""
    max_handshake_reads_per_host: int = 8
    """Of those, how many may come from one remote address (64 MiB): one machine cannot take
    them all."""
    max_handshake_message_bytes: int = 16 * 1024
    """Largest Hello or Prove request accepted (a Prove carries the caller's peer record, at
    most 8 KiB of value): a larger one is refused without being decoded."""
    idle_connection_timeout_s: float = 300.0
    """An incoming connection that carries no call for this long is closed (gRPC's
    ``max_connection_idle_ms``): connections from callers that never authenticate held a file
    descriptor each for good. A pool's channel to this node reconnects at its next call (its
    session stays valid), so honest peers only pay a new TLS handshake."""
    transport_handshake_timeout_s: float = 10.0
    """Deadline for a new incoming connection's TLS and HTTP/2 set-up (gRPC's default: 120 s)."""

    def __post_init__(self) -> None:
        _require(
            64 * 1024 <= self.max_message_bytes <= 1 << 30,
            "limits.max_message_bytes",
            f"must be between 64 KiB and 1 GiB, got {self.max_message_bytes}",
        )
        _require(
            0 < self.bulk_chunk_bytes <= self.max_message_bytes - 4096,
            "limits.bulk_chunk_bytes",
            f"must be positive and at least 4 KiB below limits.max_message_bytes "
            f"({self.max_message_bytes}), got {self.bulk_chunk_bytes}",
        )
        _require(self.max_bulk_transfer_bytes > 0, "limits.max_bulk_transfer_bytes", "> 0")
        _require(
            self.max_bulk_inflight_bytes >= self.max_bulk_transfer_bytes,
            "limits.max_bulk_inflight_bytes",
            "must be at least limits.max_bulk_transfer_bytes",
        )
        if self.max_bulk_sender_bytes is not None:
            _require(
                self.max_bulk_transfer_bytes
                <= self.max_bulk_sender_bytes
                <= self.max_bulk_inflight_bytes,
                "limits.max_bulk_sender_bytes",
                f"must be at least limits.max_bulk_transfer_bytes "
                f"({self.max_bulk_transfer_bytes}) and at most limits.max_bulk_inflight_bytes "
                f"({self.max_bulk_inflight_bytes}), got {self.max_bulk_sender_bytes}",
            )
        _require(self.max_record_value_bytes > 0, "limits.max_record_value_bytes", "> 0")
        _require(self.max_records_per_key >= 1, "limits.max_records_per_key", ">= 1")
        answer = self.max_key_bytes + self.max_records_per_key * RECORD_OVERHEAD_BYTES
        _require(
            self.max_record_value_bytes <= self.max_key_bytes
            and answer <= self.max_message_bytes // 2,
            "limits.max_key_bytes",
            f"must be at least limits.max_record_value_bytes ({self.max_record_value_bytes}), "
            f"and with {RECORD_OVERHEAD_BYTES} bytes for each of limits.max_records_per_key "
            f"({self.max_records_per_key}) at most half of limits.max_message_bytes "
            f"({self.max_message_bytes}): a lookup's answer carries a key's records; got "
            f"{self.max_key_bytes}",
        )
        _require(self.max_stored_records >= 1, "limits.max_stored_records", ">= 1")
        _require(self.max_records_per_publisher >= 1, "limits.max_records_per_publisher", ">= 1")
        _require(
            self.max_stored_bytes >= self.max_key_bytes,
            "limits.max_stored_bytes",
            f"must be at least limits.max_key_bytes ({self.max_key_bytes}), got "
            f"{self.max_stored_bytes}",
        )
        _require(
            self.max_stored_ttl_s >= 60.0,
            "limits.max_stored_ttl_s",
            f"must be at least 60 s (records are renewed every dht.republish_interval_s), got "
            f"{self.max_stored_ttl_s}",
        )
        _require(self.max_sessions >= 1, "limits.max_sessions", ">= 1")
        _require(self.bulk_idle_timeout_s > 0, "limits.bulk_idle_timeout_s", "must be positive")
        _require(
            16 <= self.max_concurrent_streams <= 65536,
            "limits.max_concurrent_streams",
            f"must be between 16 and 65536, got {self.max_concurrent_streams}",
        )
        _require(
            self.handshake_read_timeout_s > 0,
            "limits.handshake_read_timeout_s",
            "must be positive",
        )
        _require(self.max_handshake_reads >= 1, "limits.max_handshake_reads", ">= 1")
        _require(
            1 <= self.max_handshake_reads_per_host <= self.max_handshake_reads,
            "limits.max_handshake_reads_per_host",
            f"must be between 1 and limits.max_handshake_reads ({self.max_handshake_reads}), "
            f"got {self.max_handshake_reads_per_host}",
        )
        _require(
            _LARGEST_HONEST_PROVE_BYTES
            <= self.max_handshake_message_bytes
            <= self.max_message_bytes,
            "limits.max_handshake_message_bytes",
            f"must be at least {_LARGEST_HONEST_PROVE_BYTES} (a Prove with the largest peer "
            f"record) and at most limits.max_message_bytes ({self.max_message_bytes}), got "
            f"{self.max_handshake_message_bytes}",
        )
        _require(
            self.idle_connection_timeout_s >= 1.0,
            "limits.idle_connection_timeout_s",
            f"must be at least 1 s, got {self.idle_connection_timeout_s}",
        )
        _require(
            self.transport_handshake_timeout_s > 0,
            "limits.transport_handshake_timeout_s",
            "must be positive",
        )

    @property
    def bulk_sender_bytes(self) -> int:
        """One sender's share of the bulk in-flight budget, as set or by default."""
        if self.max_bulk_sender_bytes is not None:
            return self.max_bulk_sender_bytes
        share = min(_DEFAULT_SENDER_SHARE_BYTES, self.max_bulk_inflight_bytes)
        return max(share, self.max_bulk_transfer_bytes)


@dataclass(frozen=True, kw_only=True, slots=True)
class DhtConfig:
    """The Kademlia DHT."""

    bucket_size: int = 20
    """k: contacts per bucket and results per lookup."""
    parallelism: int = 3
    """alpha: requests in flight per lookup step."""
    record_ttl_s: float = 60.0
    """Lifetime of the records this node signs (its peer record included)."""
    republish_interval_s: float = 20.0
    """How often this node re-signs and republishes its records; below ``record_ttl_s``."""
    refresh_interval_s: float = 5.0
    """How often a random lookup refreshes the routing table and the peer directory."""
    rpc_timeout_s: float = 2.0
    """Deadline of one DHT request."""
    lookup_timeout_s: float = 10.0
    """Deadline of one lookup (all its steps): past it, the nearest peers that answered so far
    are its result. Peers that keep naming new far-off peers, or answer slowly, cannot hold a
    lookup (and the node's maintenance, which runs them) longer."""
    max_peer_directory: int = 10_000
    """Peer records kept in the directory of known peers."""
    max_new_peers_per_source: int = 1024
    """Peers one source (a peer that answered a lookup, or sent a request) may add to the
    directory per ``new_peers_interval_s``; more are ignored until the interval passes. A
    newcomer to a run of 1,024 peers learns them from many sources, a few dozen per answer;
    one peer minting records could otherwise refill a full directory as fast as it sends."""
    new_peers_interval_s: float = 60.0
    """The interval ``max_new_peers_per_source`` counts over."""
    requests_per_s_per_peer: float = 200.0
    """DHT requests (FindNode, FindValue, Store, a Ping carrying a record) one peer may make
    per second on average; past it (and the burst) they are refused with RESOURCE_EXHAUSTED,
    the connection kept. Heartbeats (Pings without a record) are never refused. A FindNode
    flood kept a node so busy that its heartbeats went unanswered and others took it for
    dead; an honest peer asks one peer a few times per lookup, a few lookups per round."""
    request_burst_per_peer: int = 400
    """Requests a peer may make at once above ``requests_per_s_per_peer``."""

    def __post_init__(self) -> None:
        _require(1 <= self.bucket_size <= 64, "dht.bucket_size", "must be in 1..64")
        _require(1 <= self.parallelism <= 16, "dht.parallelism", "must be in 1..16")
        _require(self.record_ttl_s > 0, "dht.record_ttl_s", "must be positive")
        _require(
            0 < self.republish_interval_s < self.record_ttl_s,
            "dht.republish_interval_s",
            f"must be positive and below dht.record_ttl_s ({self.record_ttl_s}) or records "
            "expire before they are renewed",
        )
        _require(self.refresh_interval_s > 0, "dht.refresh_interval_s", "must be positive")
        _require(self.rpc_timeout_s > 0, "dht.rpc_timeout_s", "must be positive")
        _require(
            self.lookup_timeout_s >= self.rpc_timeout_s,
            "dht.lookup_timeout_s",
            f"must be at least dht.rpc_timeout_s ({self.rpc_timeout_s})",
        )
        _require(self.max_peer_directory >= 1, "dht.max_peer_directory", ">= 1")
        _require(self.max_new_peers_per_source >= 1, "dht.max_new_peers_per_source", ">= 1")
        _require(self.new_peers_interval_s > 0, "dht.new_peers_interval_s", "must be positive")
        _require(
            self.requests_per_s_per_peer > 0, "dht.requests_per_s_per_peer", "must be positive"
        )
        _require(self.request_burst_per_peer >= 1, "dht.request_burst_per_peer", ">= 1")


@dataclass(frozen=True, kw_only=True, slots=True)
class HeartbeatConfig:
    """Failure detection between peers that work together."""

    interval_s: float = 0.5
    """Time between heartbeats to one peer."""
    timeout_s: float = 2.5
    """A peer with no answered heartbeat for this long is reported gone."""
    forget_after_s: float = 600.0
    """A peer gone this long is no longer watched (no more heartbeats to it, no liveness):
    without it every peer a long run ever worked with kept a heartbeat loop. Longer than a
    run membership lasts unrenewed (300 s), so a dead peer is not expected back in rounds."""

    def __post_init__(self) -> None:
        _require(self.interval_s > 0, "heartbeat.interval_s", "must be positive")
        _require(
            self.timeout_s > self.interval_s,
            "heartbeat.timeout_s",
            f"must exceed heartbeat.interval_s ({self.interval_s}) or every peer looks gone",
        )
        _require(
            self.forget_after_s > 0,
            "heartbeat.forget_after_s",
            "must be positive (seconds a gone peer is still watched for its return)",
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class RelayConfig:
    """Serving as a relay for peers that cannot be reached, and using relays."""

    serve: bool = True
    """Relay for others when this peer is reachable (opt out with False)."""
    max_reservations: int = 64
    """Relayed peers served at once."""
    max_reservations_per_host: int = 32
    """Of those, how many may come from one address: peer ids cost nothing to make, and one
    machine's throwaway ids filled every reservation (and the direct-reservation table alike).
    Half of them by default, so one address cannot take them all while a site of many peers
    behind one NAT still finds room."""
    bytes_per_s_per_peer: float = 12.5e6
    """Cap on relayed bandwidth per relayed peer (both directions together)."""
    num_relays: int = 2
    """Relays this peer keeps reservations with when it cannot be reached."""

    def __post_init__(self) -> None:
        _require(self.max_reservations >= 0, "relay.max_reservations", "must be >= 0")
        _require(
            self.max_reservations_per_host >= 1,
            "relay.max_reservations_per_host",
            "must be at least 1",
        )
        _require(self.bytes_per_s_per_peer > 0, "relay.bytes_per_s_per_peer", "must be positive")
        _require(self.num_relays >= 1, "relay.num_relays", "must be at least 1")


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeConfig:
    """A peer's network node."""

    listen_address: str = "0.0.0.0:0"
    """HOST:PORT the node's one gRPC server listens on; port 0 picks a free port."""
    advertise_addresses: tuple[str, ...] = ()
    """Addresses others should dial; by default the listen address (with a routable host)."""
    bootstrap: tuple[str, ...] = ()
    """Known peers to join through, as HOST:PORT or PEER_ID@HOST:PORT."""
    swarm_secret: bytes | None = field(default=None, repr=False)
    """Shared secret of a private swarm; peers that cannot prove it are refused."""
    announce: bool = True
    """Publish this node's peer record; False for short-lived observers (`gossamer peers`)."""
    connect_timeout_s: float = 5.0
    """Deadline to open and authenticate a connection."""
    rpc_timeout_s: float = 5.0
    """Default deadline of one request."""
    keepalive_interval_s: float = 10.0
    """HTTP/2 keepalive ping interval on idle connections."""
    keepalive_timeout_s: float = 5.0
    """A relay that answers no heartbeat for ``keepalive_interval_s`` plus this is given up by
    the peers it relays (and by the dialers whose tunnels go through it)."""
    unacked_data_timeout_s: float = 60.0
    """How long data sent on a connection may go unacknowledged before the kernel aborts it
    (``TCP_USER_TIMEOUT``), and how long gRPC waits for a keepalive ping's answer: gRPC takes
    both from its keepalive timeout. Not 5 s, because on a thin link busy both ways a segment
    waits behind the queues (5 s aborted 12-16 connections per NATed peer a run on a 500
    kbit/s link); not 20 s, because a keepalive ping queued behind a tunnel's bulk data on that
    link went unanswered that long, and gRPC closed the tunnelled connection ("ping timeout")
    twice in a run, where at 60 s both transfers went through. It is also how long a server or
    relay keeps a vanished client's socket and reservation. A peer gone is noticed by the
    failure detector's heartbeats, not by this, and a silently dead connection they watch is
    closed after the keepalive window (``ConnectionPool.drop_if_silent``), unless a bulk upload
    is under way on it: that one is left to this timeout (or to the upload's deadline)."""
    ping_ack_timeout_s: float = 300.0
    """How long gRPC waits for the answer to one of its HTTP/2 pings (keepalive's and flow
    control's) before it closes the connection (``grpc.http2.ping_timeout_ms``; gRPC's default
    is 60 s). The answer goes out behind the data its sender has queued on that connection: an
    upload on a link down from 100 Mbit/s to 100 kbit/s had 1.1 MB in its socket, and gRPC
    closed the connection at 60 s ("ping timeout"; the answer took 114 s); 300 s covers a 4
    MiB socket buffer at 112 kbit/s. It is also how long a stopped peer (its kernel still
    acking) keeps an idle connection; one that vanished is cut after
    ``unacked_data_timeout_s``."""
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    """Sizes and counts accepted from the network."""
    retry: RetryConfig = field(default_factory=RetryConfig)
    """Retries of retryable errors."""
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    """Per-peer circuit breaker."""
    dht: DhtConfig = field(default_factory=DhtConfig)
    """Discovery."""
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    """Failure detection."""
    relay: RelayConfig = field(default_factory=RelayConfig)
    """NAT traversal through relays."""

    def __post_init__(self) -> None:
        _check_address("net.listen_address", self.listen_address)
        for address in self.advertise_addresses:
            _check_address("net.advertise_addresses", address)
            _require(
                not address.endswith(":0"),
                "net.advertise_addresses",
                f"{address!r} has port 0; advertise the port others should dial",
            )
            try:
                split_host_port(address)
            except ProtocolError as exc:  # others would refuse the record that names it
                raise ConfigError(f"net.advertise_addresses: {exc}") from exc
        for entry in self.bootstrap:
            expected, at, address = entry.rpartition("@")
            _check_address("net.bootstrap", address)
            try:  # the others' rules: a typo here made the peer start a swarm of its own
                split_host_port(address)
                if at:
                    digest_of_peer_id(expected)
            except ProtocolError as exc:
                raise ConfigError(
                    f"net.bootstrap: {entry!r}: {exc} (expected [PEER_ID@]HOST:PORT; "
                    "`gossamer peer id` prints a peer's id)"
                ) from exc
        _require(
            self.swarm_secret is None or len(self.swarm_secret) >= 16,
            "net.swarm_secret",
            "must be at least 16 bytes; make one with `head -c 32 /dev/urandom > swarm.key`",
        )
        _require(self.connect_timeout_s > 0, "net.connect_timeout_s", "must be positive")
        _require(self.rpc_timeout_s > 0, "net.rpc_timeout_s", "must be positive")
        _require(self.keepalive_interval_s > 0, "net.keepalive_interval_s", "must be positive")
        _require(self.keepalive_timeout_s > 0, "net.keepalive_timeout_s", "must be positive")
        _require(self.unacked_data_timeout_s > 0, "net.unacked_data_timeout_s", "must be positive")
        _require(self.ping_ack_timeout_s > 0, "net.ping_ack_timeout_s", "must be positive")
        _require(  # (else every record this node renews vanished from the others meanwhile)
            self.dht.republish_interval_s < self.limits.max_stored_ttl_s,
            "dht.republish_interval_s",
            f"must be below limits.max_stored_ttl_s ({self.limits.max_stored_ttl_s:g} s), how "
            "long other nodes keep a record",
        )
