"""Random, truncated and oversized bytes into every decoder and handler: clean, counted errors."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossamer.core.clock import FakeClock
from gossamer.core.errors import AuthenticationError, ProtocolError
from gossamer.net.bulk import BulkReceiver, ReceivedChunk, decode_chunk
from gossamer.net.config import DhtConfig, LimitsConfig
from gossamer.net.counters import NetCounters
from gossamer.net.handshake import HandshakeAuthority, Session
from gossamer.net.identity import Identity
from gossamer.net.peer_filter import MAX_FILTER_BYTES
from gossamer.net.records import check_record, parse_peer_record, sign_peer_record, sign_record
from gossamer.net.routing import RoutingTable, bucket_index, xor_distance
from gossamer.net.server import _session_var
from gossamer.net.tls import cert_pem_of_der
from gossamer.proto import net_pb2
from net_fakes import FakeDhtNetwork

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CLOCK = FakeClock()


def _decode(message_type: Any, data: bytes) -> Any:
    try:
        return message_type.FromString(data)
    except DecodeError:
        return None


def _mutations(valid: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=2048),
        st.integers(0, len(valid)).map(lambda n: valid[:n]),  # truncated
        st.binary(min_size=1, max_size=64).map(lambda junk: valid + junk),  # trailing junk
        st.tuples(st.integers(0, max(0, len(valid) - 1)), st.integers(0, 255)).map(
            lambda m: valid[: m[0]] + bytes([m[1]]) + valid[m[0] + 1 :]  # one byte flipped
        ),
    )


_IDENTITY = Identity.generate()
_VALID_RECORD = sign_peer_record(
    _IDENTITY, net_pb2.PeerRecordValue(addresses=["127.0.0.1:1"]), now_s=CLOCK.wall(), ttl_s=60
).SerializeToString()


@FUZZ
@given(_mutations(_VALID_RECORD))
def test_peer_records_from_random_bytes_fail_cleanly(data: bytes) -> None:
    message = _decode(net_pb2.SignedPeerRecord, data)
    if message is None:
        return
    try:
        record = parse_peer_record(message, now_s=CLOCK.wall(), max_value_bytes=16 * 1024)
    except (ProtocolError, AuthenticationError):
        return
    assert record.peer_id == _IDENTITY.peer_id  # only an intact record passes


@FUZZ
@given(st.binary(max_size=4096))
def test_signed_records_from_random_bytes_fail_cleanly(data: bytes) -> None:
    message = _decode(net_pb2.SignedRecord, data)
    if message is not None:
        with contextlib.suppress(ProtocolError, AuthenticationError):
            check_record(message, now_s=CLOCK.wall(), max_value_bytes=1024)


def test_oversized_record_value_is_refused_before_verifying() -> None:
    record = sign_record(_IDENTITY, b"k" * 32, b"x" * 5000, now_s=CLOCK.wall(), ttl_s=10)
    with pytest.raises(ProtocolError, match="5000 bytes"):
        check_record(record, now_s=CLOCK.wall(), max_value_bytes=4096)


def _unknown_field(num_bytes: int) -> bytes:
    """Field 99, length-delimited: no record type has it."""
    size, length = num_bytes, bytearray()
    while size > 0x7F:
        length.append(0x80 | (size & 0x7F))
        size >>= 7
    length.append(size)
    return b"\x9a\x06" + bytes(length) + b"u" * num_bytes


def test_records_carrying_fields_nobody_signed_are_refused() -> None:
    """Protobuf keeps fields it does not know and passes them on: a 1-byte value with a 7 MiB
    unknown field passed the signature and the value limit, was stored for its 7 days, and two
    of them under a key made every lookup answer larger than a message may be."""
    record = sign_record(_IDENTITY, b"k" * 32, b"v", now_s=CLOCK.wall(), ttl_s=10)
    assert check_record(record, now_s=CLOCK.wall(), max_value_bytes=1024)  # intact: fine
    bloated = net_pb2.SignedRecord.FromString(record.SerializeToString() + _unknown_field(1 << 20))
    with pytest.raises(ProtocolError, match="does not know"):
        check_record(bloated, now_s=CLOCK.wall(), max_value_bytes=1024)
    long_signature = net_pb2.SignedRecord()
    long_signature.CopyFrom(record)
    long_signature.signature += b"s" * 1000
    with pytest.raises(ProtocolError, match="signature"):
        check_record(long_signature, now_s=CLOCK.wall(), max_value_bytes=1024)

    peer = net_pb2.SignedPeerRecord.FromString(_VALID_RECORD)
    assert parse_peer_record(peer, now_s=CLOCK.wall(), max_value_bytes=1024)
    for wrapped in (
        _VALID_RECORD + _unknown_field(1 << 20),  # beside the record
        net_pb2.SignedPeerRecord(
            record=net_pb2.SignedRecord.FromString(
                peer.record.SerializeToString() + _unknown_field(1 << 20)
            )
        ).SerializeToString(),  # inside it
    ):
        with pytest.raises(ProtocolError, match="does not know"):
            parse_peer_record(
                net_pb2.SignedPeerRecord.FromString(wrapped),
                now_s=CLOCK.wall(),
                max_value_bytes=1024,
            )


@FUZZ
@given(st.binary(max_size=512), st.binary(max_size=512))
def test_handshake_messages_from_random_bytes_fail_cleanly(hello: bytes, prove: bytes) -> None:
    authority = HandshakeAuthority(Identity.generate(), b"c" * 32, b"s" * 16, CLOCK)
    for message_type, handle in (
        (net_pb2.HelloRequest, authority.hello),
        (net_pb2.ProveRequest, lambda m: authority.prove(m, "fuzz")),
    ):
        message = _decode(message_type, hello if message_type is net_pb2.HelloRequest else prove)
        if message is not None:
            with contextlib.suppress(ProtocolError, AuthenticationError):
                handle(message)
    assert authority.num_sessions == 0


@FUZZ
@given(st.binary(max_size=2048))
def test_tls_certificates_from_random_bytes_fail_cleanly(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        cert_pem_of_der(data)


_NETWORK = FakeDhtNetwork(CLOCK, DhtConfig(bucket_size=4))
_DHT = _NETWORK.add_node()


@FUZZ
@given(
    st.binary(max_size=256),
    st.binary(max_size=2048),
    st.one_of(st.binary(max_size=64), st.binary(min_size=8198, max_size=8202)),
)
def test_dht_handlers_given_random_requests_fail_cleanly(
    target: bytes, store: bytes, known_filter: bytes
) -> None:
    for call in (
        lambda: _DHT.handle_find_node("fuzz", target),
        lambda: _DHT.handle_find_value("fuzz", target),
    ):
        try:
            call()
        except ProtocolError:
            assert len(target) != 32
    if len(known_filter) > MAX_FILTER_BYTES or 0 < len(known_filter) <= 8:
        with pytest.raises(ProtocolError):
            _DHT.gossip_records("fuzz", known_filter)
    else:
        assert len(_DHT.gossip_records("fuzz", known_filter)) <= 4
    record = _decode(net_pb2.SignedRecord, store)
    if record is not None:
        with contextlib.suppress(ProtocolError, AuthenticationError):
            _DHT.handle_store(record)


def _session() -> Session:
    return Session("s" * 52, b"p" * 32, 0.0)


async def _push(receiver: BulkReceiver, chunks: list[net_pb2.BulkChunk]) -> Any:
    async def stream() -> AsyncIterator[ReceivedChunk]:
        for chunk in chunks:
            yield decode_chunk(chunk.SerializeToString())

    _session_var.set(_session())
    return await receiver.Push(stream(), None)  # type: ignore[arg-type]


@FUZZ
@given(st.lists(st.binary(max_size=300), max_size=6), st.integers(0, 1 << 62))
def test_bulk_receiver_given_random_chunks_never_allocates_unbounded(
    raw: list[bytes], total: int
) -> None:
    limits = LimitsConfig(
        max_bulk_transfer_bytes=1 << 20,
        max_bulk_sender_bytes=1 << 20,
        max_bulk_inflight_bytes=1 << 20,
    )
    receiver = BulkReceiver(limits, NetCounters())
    delivered: list[bytes] = []

    async def handler(sender: str, topic: str, payload: bytearray) -> None:
        delivered.append(bytes(payload))

    receiver.register("t", handler)
    chunks = [c for c in (_decode(net_pb2.BulkChunk, r) for r in raw) if c is not None]
    if chunks:
        chunks[0].total_bytes = total
        chunks[0].topic = chunks[0].topic if len(chunks) % 2 else "t"
        chunks[0].transfer_id = chunks[0].transfer_id or "x"
        chunks[0].num_streams = 1
    with contextlib.suppress(ProtocolError):  # any other error fails the test
        asyncio.run(_push(receiver, chunks))
    assert receiver._inflight_bytes == 0  # nothing left allocated after the stream ended
    assert all(len(p) <= limits.max_bulk_transfer_bytes for p in delivered)


def test_bulk_receiver_assembles_parallel_streams_and_refuses_oversize() -> None:
    receiver = BulkReceiver(LimitsConfig(max_bulk_transfer_bytes=1000), NetCounters())
    got: list[bytes] = []

    async def handler(sender: str, topic: str, payload: bytearray) -> None:
        got.append(bytes(payload))

    receiver.register("t", handler)
    head = {"transfer_id": "x1", "topic": "t", "total_bytes": 10, "num_streams": 2}

    async def scenario() -> None:
        first = await _push(receiver, [net_pb2.BulkChunk(**head, offset=5, data=b"56789")])
        assert not first.transfer_complete
        second = await _push(receiver, [net_pb2.BulkChunk(**head, offset=0, data=b"01234")])
        assert second.transfer_complete
        with pytest.raises(ProtocolError, match="exceeds"):
            await _push(
                receiver,
                [net_pb2.BulkChunk(transfer_id="y", topic="t", total_bytes=1001, num_streams=1)],
            )

    asyncio.run(scenario())
    assert got == [b"0123456789"]


def test_a_topic_registered_with_a_largest_transfer_refuses_a_larger_one_at_once() -> None:
    receiver = BulkReceiver(LimitsConfig(max_bulk_transfer_bytes=1000), NetCounters())
    got: list[bytes] = []

    async def handler(sender: str, topic: str, payload: bytearray) -> None:
        got.append(bytes(payload))

    receiver.register("small", handler, max_bytes=10)
    receiver.register("big", handler)

    async def scenario() -> None:
        head = {"transfer_id": "a", "num_streams": 1, "offset": 0}
        with pytest.raises(ProtocolError, match="at most 10 bytes"):
            await _push(
                receiver, [net_pb2.BulkChunk(**head, topic="small", total_bytes=11, data=b"x")]
            )
        assert receiver._inflight_bytes == 0
        await _push(
            receiver, [net_pb2.BulkChunk(**head, topic="big", total_bytes=11, data=b"x" * 11)]
        )
        head["transfer_id"] = "b"
        await _push(
            receiver, [net_pb2.BulkChunk(**head, topic="small", total_bytes=10, data=b"y" * 10)]
        )

    asyncio.run(scenario())
    assert got == [b"x" * 11, b"y" * 10]


@FUZZ
@given(
    st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=60, unique=True),
    st.binary(min_size=32, max_size=32),
)
def test_routing_table_closest_matches_brute_force(digests: list[bytes], target: bytes) -> None:
    own = hashlib.sha256(b"own").digest()
    table = RoutingTable(own, bucket_size=64)
    for digest in digests:
        if digest != own:
            table.add(digest.hex(), digest)
    expected = sorted((d for d in digests if d != own), key=lambda d: xor_distance(d, target))
    assert table.closest(target, 5) == [d.hex() for d in expected[:5]]
    for digest in digests:
        if digest != own:
            assert 0 <= bucket_index(own, digest) < 256
