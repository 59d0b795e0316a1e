"""Signed, expiring records: what peers publish in the DHT, their peer records included.

A record is signed by its publisher over a canonical encoding of its key, value, public key and
times, and it expires. A receiver checks sizes first, then the signature, then the times, and drops
anything that fails (counting it); a forged or expired record is never stored or passed on.
A *peer record* is the record a peer publishes about itself, under its own DHT position: how to
reach it, whether it is relayed, what it can do, and its TLS certificate.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from gossamer.core.errors import AuthenticationError, ProtocolError
from gossamer.net.addresses import split_host_port
from gossamer.net.identity import (
    PUBLIC_KEY_BYTES,
    Identity,
    digest_of_peer_id,
    peer_id_of_public_key,
    verify_signature,
)
from gossamer.proto import net_pb2

__all__ = [
    "MAX_CLOCK_SKEW_S",
    "MAX_PEER_RECORD_VALUE_BYTES",
    "MAX_RECORD_TTL_S",
    "MAX_TLS_CERT_BYTES",
    "RECORD_OVERHEAD_BYTES",
    "PeerRecord",
    "check_record",
    "parse_peer_record",
    "sign_peer_record",
    "sign_record",
    "signing_time_after",
]

MAX_CLOCK_SKEW_S = 120.0
"""Records published further in the future than this are refused."""
MAX_RECORD_TTL_S = 7 * 24 * 3600.0
"""Longest lifetime a record may claim."""


def signing_time_after(previous_s: float | None, now_s: float) -> float:
    """When to sign a record that replaces one signed at ``previous_s`` (None: none), the wall
    clock reading ``now_s``.

    Later than the one it replaces, by a millisecond at least, since every store and directory
    keeps the newer of a publisher's records: after the wall clock stepped back, a record
    signed at the earlier time was dropped everywhere. Unless that would put it more than half
    ``MAX_CLOCK_SKEW_S`` ahead of the clock: the one it replaces was signed by a clock running
    fast since corrected (peers refused it anyway past the skew), and one signed after it would
    be refused by every peer for as long as the clock had been off.
    """
    if previous_s is None:
        return now_s
    later_s = previous_s + 1e-3
    return max(now_s, later_s) if later_s - now_s <= MAX_CLOCK_SKEW_S / 2 else now_s


RECORD_OVERHEAD_BYTES = 256
"""A signed record's bytes besides its value, at most: key, publisher key, times, signature and
their tags take 158. A record carrying more (fields this version does not know, which protobuf
keeps and passes on) is refused: they are outside the signature and the size limits, and one
peer's records of a few MiB each held the memory of every node storing them and made every
lookup answer larger than a message may be."""
_SIGNATURE_BYTES = 64
_PEER_RECORD_WRAPPER_BYTES = 6
"""``SignedPeerRecord``'s bytes besides its one record: a tag and a length."""
_MAX_ADDRESSES = 16
_MAX_ADDRESS_CHARS = 256
_MAX_RELAYS = 8
_MAX_GPU_NAMES = 16
_MAX_GPU_NAME_CHARS = 256
MAX_PEER_RECORD_VALUE_BYTES = 8192
"""Largest peer record value: a real one holds a 354-byte certificate, a few addresses and
capabilities (under 1 KiB); at the 16 KiB any record may have, a directory of 10,000
throwaway records held 465 MiB."""
MAX_TLS_CERT_BYTES = 2048
"""Largest certificate in a peer record (ours are 354 bytes: ECDSA P-256, self-signed)."""


def _signed_bytes(
    key: bytes, value: bytes, public_key: bytes, published_at_s: float, expires_at_s: float
) -> bytes:
    return b"".join(
        (
            b"gossamer-record-v1\x00",
            key,
            struct.pack(">I", len(value)),
            value,
            public_key,
            struct.pack(">dd", published_at_s, expires_at_s),
        )
    )


def sign_record(
    identity: Identity, key: bytes, value: bytes, *, now_s: float, ttl_s: float
) -> net_pb2.SignedRecord:
    """A record under ``key`` signed by ``identity``, valid from ``now_s`` for ``ttl_s``."""
    if len(key) != 32:
        raise ValueError(f"a DHT key is 32 bytes, got {len(key)}")
    if not 0 < ttl_s <= MAX_RECORD_TTL_S:
        raise ValueError(f"ttl_s must be in (0, {MAX_RECORD_TTL_S}], got {ttl_s}")
    expires_at_s = now_s + ttl_s
    signature = identity.sign(_signed_bytes(key, value, identity.public_key, now_s, expires_at_s))
    return net_pb2.SignedRecord(
        key=key,
        value=value,
        publisher_public_key=identity.public_key,
        published_at_s=now_s,
        expires_at_s=expires_at_s,
        signature=signature,
    )


def check_record(record: net_pb2.SignedRecord, *, now_s: float, max_value_bytes: int) -> str:
    """Check a record received from the network.

    Returns:
        The publisher's peer id.

    Raises:
        ProtocolError: malformed, oversized, expired or from the future.
        AuthenticationError: the signature does not match (a forged or altered record).
    """
    if len(record.key) != 32:
        raise ProtocolError(f"record key has {len(record.key)} bytes, not 32")
    if len(record.value) > max_value_bytes:
        raise ProtocolError(f"record value of {len(record.value)} bytes > {max_value_bytes}")
    if len(record.publisher_public_key) != PUBLIC_KEY_BYTES:
        raise ProtocolError("record publisher key is not 32 bytes")
    if len(record.signature) != _SIGNATURE_BYTES:
        raise ProtocolError(f"record signature has {len(record.signature)} bytes, not 64")
    if record.ByteSize() > len(record.value) + RECORD_OVERHEAD_BYTES:
        raise ProtocolError(
            f"record of {record.ByteSize()} bytes for a value of {len(record.value)}: it carries "
            "fields this version does not know"
        )
    published, expires = record.published_at_s, record.expires_at_s
    if not (published == published and expires == expires):  # NaN
        raise ProtocolError("record times are not numbers")
    if published > now_s + MAX_CLOCK_SKEW_S:
        raise ProtocolError(f"record published {published - now_s:.0f} s in the future")
    if not published < expires <= published + MAX_RECORD_TTL_S:
        raise ProtocolError("record lifetime is empty or longer than allowed")
    if expires <= now_s:
        raise ProtocolError(f"record expired {now_s - expires:.1f} s ago")
    message = _signed_bytes(
        record.key, record.value, record.publisher_public_key, published, expires
    )
    if not verify_signature(record.publisher_public_key, record.signature, message):
        raise AuthenticationError("record signature does not match its publisher")
    return peer_id_of_public_key(record.publisher_public_key)


@dataclass(frozen=True, slots=True)
class PeerRecord:
    """A checked peer record."""

    peer_id: str
    """Whose record it is (proven by the signature)."""
    addresses: tuple[str, ...]
    """Direct addresses, HOST:PORT."""
    reachability: int
    """A ``net_pb2.ReachabilityKind`` value."""
    relays: tuple[tuple[str, str], ...]
    """(relay peer id, relay address) pairs where a relayed peer can be reached."""
    capabilities: net_pb2.Capabilities
    """CPUs, memory, GPUs, measured bandwidth."""
    tls_cert_der: bytes
    """The peer's TLS certificate (may be empty)."""
    relay_service: bool
    """Whether the peer relays for others."""
    published_at_s: float
    """Unix time it was signed."""
    expires_at_s: float
    """Unix time it stops being valid."""
    signed: net_pb2.SignedPeerRecord
    """The record as received, to pass on unchanged."""


def sign_peer_record(
    identity: Identity, value: net_pb2.PeerRecordValue, *, now_s: float, ttl_s: float
) -> net_pb2.SignedPeerRecord:
    """This peer's record about itself."""
    record = sign_record(
        identity, identity.digest, value.SerializeToString(), now_s=now_s, ttl_s=ttl_s
    )
    return net_pb2.SignedPeerRecord(record=record)


def parse_peer_record(
    signed: net_pb2.SignedPeerRecord, *, now_s: float, max_value_bytes: int
) -> PeerRecord:
    """Check and decode a peer record received from the network.

    Raises:
        ProtocolError: malformed, oversized or expired, or filed under someone else's id.
        AuthenticationError: forged.
    """
    record = signed.record
    peer_id = check_record(record, now_s=now_s, max_value_bytes=max_value_bytes)
    if signed.ByteSize() > record.ByteSize() + _PEER_RECORD_WRAPPER_BYTES:
        raise ProtocolError("peer record carries fields this version does not know")
    if record.key != digest_of_peer_id(peer_id):
        raise ProtocolError("a peer record must be filed under its publisher's own id")
    if len(record.value) > MAX_PEER_RECORD_VALUE_BYTES:
        raise ProtocolError(
            f"peer record value of {len(record.value)} bytes > {MAX_PEER_RECORD_VALUE_BYTES}"
        )
    try:
        value = net_pb2.PeerRecordValue.FromString(record.value)
    except DecodeError as exc:
        raise ProtocolError(f"peer record value does not decode: {exc}") from exc
    if len(value.addresses) > _MAX_ADDRESSES or len(value.relays) > _MAX_RELAYS:
        raise ProtocolError("peer record lists too many addresses or relays")
    if any(len(a) > _MAX_ADDRESS_CHARS for a in value.addresses):
        raise ProtocolError("peer record address too long")
    for address in [*value.addresses, *(r.relay_address for r in value.relays)]:
        split_host_port(address)  # one a dial would choke on makes the whole record unusable
    if len(value.capabilities.gpu_names) > _MAX_GPU_NAMES:
        raise ProtocolError("peer record lists too many GPUs")
    if any(len(name) > _MAX_GPU_NAME_CHARS for name in value.capabilities.gpu_names):
        raise ProtocolError("peer record GPU name too long")
    if len(value.tls_cert_der) > MAX_TLS_CERT_BYTES:
        raise ProtocolError(
            f"peer record certificate of {len(value.tls_cert_der)} bytes > {MAX_TLS_CERT_BYTES}"
        )
    return PeerRecord(
        peer_id=peer_id,
        addresses=tuple(value.addresses),
        reachability=value.reachability,
        relays=tuple((r.relay_peer_id, r.relay_address) for r in value.relays),
        capabilities=value.capabilities,
        tls_cert_der=value.tls_cert_der,
        relay_service=value.relay_service,
        published_at_s=record.published_at_s,
        expires_at_s=record.expires_at_s,
        signed=signed,
    )
